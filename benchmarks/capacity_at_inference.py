"""Capacity at inference: ONNX Runtime latency of one MoE exported at several capacity factors, side by side with its
dense model, and (with a trained checkpoint) top-1 at each capacity.

    python benchmarks/capacity_at_inference.py [--moe vit_s16_moe_upcycled --dense vit_small_patch16_224]
        [--capacities 2 1 0.5 0.25] [--batch-sizes 1 8] [--rounds 9] [--variant int8] [--onnx-dir DIR [--reuse]]
        [--checkpoint outputs/main_job/moe/model --checkpoint-model NAME --data-dir outputs/main_job/data]

Latency: random weights (latency does not depend on them), every file timed in the same interleaved rounds
(`vit_moe.onnx.benchmark_inference`), so the ratios to the dense model are measured side by side. Top-1: the
checkpoint at each capacity in PyTorch (`validate(capacity_factor=C)`) and as the exported `--variant` file in ONNX
Runtime, on `--data-dir/val`.
"""
import argparse
import copy
import sys
import tempfile
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vit_moe  # noqa: E402,F401  registers the models
from vit_moe.layers import set_capacity_factor  # noqa: E402
from vit_moe.onnx import benchmark_inference, evaluate_onnx, export_onnx  # noqa: E402


def latency_rows(args) -> list:
    torch.manual_seed(0)
    moe = timm.create_model(args.moe).eval()
    models = {'dense': timm.create_model(args.dense).eval()}
    for c in args.capacities:
        models[f'moe C={c:g}'] = copy.deepcopy(moe)
        set_capacity_factor(models[f'moe C={c:g}'], c)
    result = benchmark_inference(models, batch_sizes=args.batch_sizes, rounds=args.rounds, onnx_dir=args.onnx_dir,
                                 reuse_onnx=args.reuse, variants=[args.variant], pytorch=False)
    ms = {(r['model'], r['batch']): r['median_ms'] for r in result['rows']}
    rows = []
    for c in args.capacities:
        row = dict(capacity=c)
        for b in args.batch_sizes:
            row[f'batch {b} ms'] = ms[(f'moe C={c:g}', b)]
            row[f'batch {b} / dense'] = ms[(f'moe C={c:g}', b)] / ms[('dense', b)]
        rows.append(row)
    dense = dict(capacity='dense')
    for b in args.batch_sizes:
        dense[f'batch {b} ms'], dense[f'batch {b} / dense'] = ms[('dense', b)], 1.0
    return rows + [dense]


def accuracy_rows(args) -> list:
    from vit_moe.models.loading import create_model_from_checkpoint
    from vit_moe.training.evaluation import validate
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.capacities:
            pytorch = validate(args.checkpoint_model, args.checkpoint, args.data_dir, num_workers=0, capacity_factor=c)
            model = create_model_from_checkpoint(args.checkpoint_model, args.checkpoint, capacity_factor=c).eval()
            path = export_onnx(model, Path(tmp) / f'c{c:g}.onnx', check=False,
                               quantize=None if args.variant == 'fp32' else args.variant)
            ort = evaluate_onnx(path, args.data_dir, num_workers=0)
            rows.append({'capacity': c, 'PyTorch fp32 top-1 (%)': pytorch['top1'],
                         f'ONNX Runtime {args.variant} top-1 (%)': ort['top1'], 'images': ort['num_samples']})
    return rows


def markdown(rows: list) -> str:
    keys = list(rows[0])
    lines = ['| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
    for r in rows:
        lines.append('| ' + ' | '.join(f'{r[k]:.2f}' if isinstance(r[k], float) and not k == 'capacity'
                                       else f'{r[k]:g}' if isinstance(r[k], float) else str(r[k]) for k in keys) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--moe', default='vit_s16_moe_upcycled')
    parser.add_argument('--dense', default='vit_small_patch16_224')
    parser.add_argument('--capacities', type=float, nargs='+', default=[2.0, 1.0, 0.5, 0.25])
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--rounds', type=int, default=9)
    parser.add_argument('--variant', choices=['fp32', 'int8'], default='int8')
    parser.add_argument('--onnx-dir', default=None)
    parser.add_argument('--reuse', action='store_true', help='reuse ONNX files already in --onnx-dir')
    parser.add_argument('--no-latency', action='store_true')
    parser.add_argument('--checkpoint', default=None, help='a trained MoE (trainer output folder) for top-1')
    parser.add_argument('--checkpoint-model', default=None, help='its registered model name')
    parser.add_argument('--data-dir', default=None, help='ImageFolder root with a val/ split, for top-1')
    args = parser.parse_args(argv)
    if (args.checkpoint is None) != (args.data_dir is None) or (args.checkpoint and not args.checkpoint_model):
        parser.error('top-1 needs --checkpoint, --checkpoint-model and --data-dir together')
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    if not args.no_latency:
        print(f'{args.moe} ({args.variant}) at each capacity vs {args.dense} ({args.variant}), ONNX Runtime, '
              f'{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds, random weights\n')
        print(markdown(latency_rows(args)) + '\n')
    if args.checkpoint:
        print(f'{args.checkpoint} on {args.data_dir}/val at each capacity\n')
        print(markdown(accuracy_rows(args)))


if __name__ == '__main__':
    main()
