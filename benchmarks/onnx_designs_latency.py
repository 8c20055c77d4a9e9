"""ONNX Runtime latency of every MoE design beside the dense model, one run, interleaved (vit_moe.onnx.benchmark).

    python benchmarks/onnx_designs_latency.py [--moe vit_ti16_moe_upcycled --dense vit_tiny_patch16_224]
        [--batch-sizes 1 8] [--rounds 5] [--markdown out.md]

Random weights (latency does not depend on them), 224 px, E = 32, MoE in the last half of the blocks, at equal
expert FLOPs per token (as configs/sweeps/designs.yaml): expert choice C = 2, token choice top-2 C = 1, Soft MoE with
13 slots per expert, 1 shared expert + expert choice C = 1, fine-grained G = 4 (E = 128, C = 2). Each exported in
fp32 and int8 (dynamic, per channel, every expert weight) and timed in ONNX Runtime on this machine's CPU threads.
"""
import argparse

import timm
import torch

import vit_moe  # noqa: F401  registers the models
from vit_moe.onnx.benchmark import benchmark_inference, format_benchmark

DESIGNS = {
    'expert choice': {},
    'token choice': dict(router='token_choice', top_k=2, capacity_factor=1.0),
    'soft': dict(router='soft', slots_per_expert=13),
    'shared + EC C=1': dict(num_shared_experts=1, capacity_factor=1.0),
    'fine-grained G=4': dict(num_experts=128, expert_granularity=4),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--moe', default='vit_ti16_moe_upcycled')
    parser.add_argument('--dense', default='vit_tiny_patch16_224')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--variants', nargs='+', default=['fp32', 'int8'])
    parser.add_argument('--model-kwargs', default='{}', help='YAML mapping for every model (e.g. smaller sizes)')
    parser.add_argument('--markdown', default=None)
    args = parser.parse_args(argv)
    import yaml
    common = yaml.safe_load(args.model_kwargs) or {}
    torch.manual_seed(0)
    models = {'dense': timm.create_model(args.dense, **common).eval()}
    for name, kwargs in DESIGNS.items():
        models[name] = timm.create_model(args.moe, **dict(common, **kwargs)).eval()
    result = benchmark_inference(models, batch_sizes=args.batch_sizes, rounds=args.rounds, variants=args.variants,
                                 pytorch=False)
    dense = {(r['runtime'], r['batch']): r['median_ms'] for r in result['rows'] if r['model'] == 'dense'}
    lines = [format_benchmark(result, title=f'{args.moe} designs vs {args.dense}: '), '',
             '| design | ' + ' | '.join(f'{v} b{b} / dense {v}' for b in args.batch_sizes for v in args.variants) + ' |',
             '|---' * (1 + len(args.batch_sizes) * len(args.variants)) + '|']
    ms = {(r['model'], r['runtime'], r['batch']): r['median_ms'] for r in result['rows']}
    for name in DESIGNS:
        lines.append(f'| {name} | ' + ' | '.join(
            f'{ms[(name, f"onnxruntime {v}", b)] / dense[(f"onnxruntime {v}", b)]:.2f}'
            for b in args.batch_sizes for v in args.variants) + ' |')
    text = '\n'.join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, 'w') as f:
            f.write(text + '\n')


if __name__ == '__main__':
    main()
