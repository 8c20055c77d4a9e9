"""time(MoE layer) / time(dense MLP) at ViT-B/16 shapes, measured side by side (interleaved) in one run.

    python benchmarks/moe_layer_speed.py [--batch 8] [--tokens 197] [--dim 768] [--experts 32] [--capacity-factor 2]
    python benchmarks/moe_layer_speed.py --designs      # every design beside the dense MLP, a markdown table

The FLOP ratio is (E * capacity) / tokens (2.11 for the defaults): the speed limit to aim at. With --designs, at
equal expert FLOPs per token: expert choice (C), token choice (top-2, C = 1), Soft MoE (ceil(C * T / E) slots per
expert, plus its dispatch and combine matmuls), 1 shared expert + expert choice C - 1, fine-grained experts (G = 4:
4 E quarter-size experts, C).
"""
import argparse
import statistics
import time

import torch
from timm.layers import Mlp

from vit_moe.layers import MoeConfig, moe_layer_like


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
    parser.add_argument('--designs', action='store_true', help='every MoE design beside the dense MLP (a table)')
    args = parser.parse_args(argv)
    if args.designs:
        return compare_designs(args)

    torch.manual_seed(0)
    hidden = int(args.dim * args.mlp_ratio)
    dense = Mlp(args.dim, hidden).eval()
    moe = moe_layer_like(dense, num_experts=args.experts, router=args.router,
                         capacity_factor=args.capacity_factor).eval()
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


def _designs(dense: Mlp, args) -> dict:
    """Design name -> (layer, expert FLOPs per token relative to the dense MLP), at equal FLOPs per token."""
    E, C, T = args.experts, args.capacity_factor, args.tokens
    slots = MoeConfig(num_experts=E, capacity_factor=C).capacity(T)
    designs = {
        f'expert choice C={C:g}': dict(num_experts=E, capacity_factor=C),
        'token choice top-2, C=1': dict(num_experts=E, router='token_choice', top_k=2, capacity_factor=1.0),
        f'Soft MoE, {slots} slots/expert': dict(num_experts=E, router='soft', slots_per_expert=slots),
        f'1 shared + expert choice C={C - 1:g}': dict(num_experts=E, num_shared_experts=1, capacity_factor=C - 1),
        f'fine-grained G=4, E={4 * E}, C={C:g}': dict(num_experts=4 * E, expert_granularity=4, capacity_factor=C),
    }
    out = {}
    for name, options in designs.items():
        layer = moe_layer_like(dense, **options).eval()
        out[name] = (layer, layer.config.expert_evaluations(T) / T)  # every slot computed, empty or not
    return out


def compare_designs(args) -> None:
    torch.manual_seed(0)
    hidden = int(args.dim * args.mlp_ratio)
    dense = Mlp(args.dim, hidden).eval()
    designs = _designs(dense, args)
    x = torch.randn(args.batch, args.tokens, args.dim)
    times = {name: [] for name in ['dense MLP', *designs]}
    layers = dict({'dense MLP': dense}, **{name: layer for name, (layer, _) in designs.items()})
    with torch.inference_mode():
        for layer in layers.values():  # warm-up
            layer(x)
        for _ in range(args.rounds):  # interleaved: every design sees the same machine state in each round
            for name, layer in layers.items():
                times[name].append(_time(layer, x, args.repeats))
    print(f'shapes: batch {args.batch}, tokens {args.tokens}, dim {args.dim}, hidden {hidden}, experts {args.experts}, '
          f'threads {torch.get_num_threads()}, {args.rounds} interleaved rounds')
    print('| layer | expert FLOPs / dense | median ms | time / dense (median, min-max over rounds) |')
    print('|---|---|---|---|')
    for name, t in times.items():
        ratios = [a / b for a, b in zip(t, times['dense MLP'])]
        flops = 1.0 if name == 'dense MLP' else designs[name][1]
        print(f'| {name} | {flops:.2f} | {statistics.median(t) * 1e3:.1f} | {statistics.median(ratios):.2f} '
              f'({min(ratios):.2f}-{max(ratios):.2f}) |')


if __name__ == '__main__':
    main()
