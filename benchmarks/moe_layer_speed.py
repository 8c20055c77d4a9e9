"""time(MoE layer) / time(dense MLP) at ViT-B/16 shapes, measured side by side (interleaved) in one run.

    python benchmarks/moe_layer_speed.py [--batch 8] [--tokens 197] [--dim 768] [--experts 32] [--capacity-factor 2]

The FLOP ratio is (E * capacity) / tokens (2.11 for the defaults): the speed limit to aim at.
"""
import argparse
import statistics
import time

import torch
from timm.layers import Mlp

from vit_moe import MoeMlp


def _time(fn, x, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return (time.perf_counter() - start) / repeats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--tokens', type=int, default=197)
    parser.add_argument('--dim', type=int, default=768)
    parser.add_argument('--mlp-ratio', type=float, default=4.0)
    parser.add_argument('--experts', type=int, default=32)
    parser.add_argument('--capacity-factor', type=float, default=2.0)
    parser.add_argument('--router', default='expert_choice', choices=['expert_choice', 'token_choice'])
    parser.add_argument('--rounds', type=int, default=15, help='interleaved measurement rounds')
    parser.add_argument('--repeats', type=int, default=3, help='calls per round')
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    hidden = int(args.dim * args.mlp_ratio)
    dense = Mlp(args.dim, hidden).eval()
    moe = MoeMlp.from_mlp(dense, args.experts, router=args.router, capacity_factor=args.capacity_factor).eval()
    x = torch.randn(args.batch, args.tokens, args.dim)
    capacity = moe.router.capacity(args.tokens)
    flop_ratio = args.experts * capacity / args.tokens  # token-MLPs computed vs dense

    with torch.inference_mode():
        for _ in range(3):  # warm-up
            dense(x), moe(x)
        dense_t, moe_t = [], []
        for _ in range(args.rounds):
            dense_t.append(_time(dense, x, args.repeats))
            moe_t.append(_time(moe, x, args.repeats))
    ratios = [m / d for m, d in zip(moe_t, dense_t)]
    print(f'shapes: batch {args.batch}, tokens {args.tokens}, dim {args.dim}, hidden {hidden}, '
          f'experts {args.experts}, C {args.capacity_factor}, capacity {capacity}, router {args.router}, '
          f'threads {torch.get_num_threads()}')
    print(f'dense MLP  median {statistics.median(dense_t) * 1e3:8.2f} ms')
    print(f'MoE layer  median {statistics.median(moe_t) * 1e3:8.2f} ms')
    print(f'FLOP ratio {flop_ratio:.2f}')
    print(f'time ratio MoE / dense: median {statistics.median(ratios):.2f} '
          f'(min {min(ratios):.2f}, max {max(ratios):.2f}) over {args.rounds} interleaved rounds')


if __name__ == '__main__':
    main()
