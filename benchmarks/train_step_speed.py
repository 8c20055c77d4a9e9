"""Training step time of an upcycled MoE vs its dense source at equal batch size, interleaved in one run.

    python benchmarks/train_step_speed.py [--moe vit_b16_moe_upcycled] [--dense vit_base_patch16_224] [--batch 8]
        [--optimizer] [--rounds 5]

A step is forward + loss (+ MoE aux loss) + backward (+ an AdamW step with --optimizer; off by default because
AdamW state for the 0.97 B-parameter MoE needs ~15 GB on a CPU box). The FLOP ratio of forward/backward for
ViT-B/16 with E=32, C=2 in the last 6 of 12 blocks is about 1.36.
"""
import argparse
import statistics
import time

import timm
import torch
import yaml

import vit_moe


def _step_fn(model, images, targets, optimizer):
    def step():
        with vit_moe.capture_routing() as routing:
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits, targets) + routing.aux_loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--moe', default='vit_b16_moe_upcycled')
    parser.add_argument('--dense', default='vit_base_patch16_224')
    parser.add_argument('--model-kwargs', type=yaml.safe_load, default={}, help='for both models, e.g. {depth: 4}')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--optimizer', action='store_true', help='include an AdamW step')
    parser.add_argument('--rounds', type=int, default=5)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dense = timm.create_model(args.dense, **args.model_kwargs).train()
    moe = timm.create_model(args.moe, **args.model_kwargs).train()
    size = dense.pretrained_cfg['input_size'][1:] if 'img_size' not in args.model_kwargs else \
        timm.layers.to_2tuple(args.model_kwargs['img_size'])
    images = torch.randn(args.batch, 3, *size)
    targets = torch.randint(0, dense.num_classes, (args.batch,))
    steps = {}
    for name, model in (('dense', dense), ('moe', moe)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5) if args.optimizer else None
        steps[name] = _step_fn(model, images, targets, opt)
        steps[name]()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    ratios = [m / d for m, d in zip(times['moe'], times['dense'])]
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f'batch {args.batch}, {"forward+backward+AdamW" if args.optimizer else "forward+backward"}, '
          f'threads {torch.get_num_threads()}, {args.rounds} interleaved rounds')
    for name, model in (('dense', dense), ('moe', moe)):
        t = statistics.median(times[name])
        print(f'{name:5s} {type(model).__name__:22s} {count(model):8.1f} M params  step {t:7.3f} s  '
              f'{args.batch / t:7.2f} images/s')
    print(f'step time ratio MoE / dense: median {statistics.median(ratios):.2f} '
          f'(min {min(ratios):.2f}, max {max(ratios):.2f})')


if __name__ == '__main__':
    main()
