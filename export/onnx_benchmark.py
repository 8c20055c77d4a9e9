"""Latency and throughput: PyTorch eager vs ONNX Runtime, an upcycled MoE vs its dense source, side by side.

    python export/onnx_benchmark.py [--moe vit_b16_moe_upcycled] [--dense vit_base_patch16_224]
        [--batch-sizes 1 8 32] [--rounds 5] [--variants fp32 int8] [--no-pytorch] [--gap-ms 50]
        [--model-kwargs '{...}'] [--moe-kwargs '{num_experts: 8}'] [--onnx-dir DIR [--reuse]] [--json F] [--markdown F]

Same inputs for every configuration; warm-up calls first; then `rounds` rounds, each timing one call of every
(model, runtime) in turn (interleaved, so machine noise hits all alike), after a pause (--gap-ms) that lets ONNX
Runtime's spinning worker threads settle. Reports the median and the spread (min-max) per call, images/s, the
ratios MoE / dense (per runtime), MoE int8 / dense fp32 and ONNX Runtime / PyTorch (per model), and file sizes.

A bad argument or model option exits with 2 and one line on stderr; --debug (or VIT_MOE_DEBUG=1) shows the
traceback instead. --verbose shows the exporter's own INFO logs and other libraries' warnings.
"""
import json
from pathlib import Path

import timm
import torch
import yaml

from vit_moe import _cli  # importing vit_moe registers the MoE models

MODEL_NAME = _cli.name_type(lambda name: ':' in name or timm.is_model(name), timm.list_models,
                            'a registered timm / vit_moe model (see timm.list_models())')


def main(argv=None) -> int:
    parser = _cli.ArgumentParser(description=__doc__)
    parser.add_argument('--moe', default='vit_b16_moe_upcycled', type=MODEL_NAME)
    parser.add_argument('--dense', default='vit_base_patch16_224', type=MODEL_NAME)
    parser.add_argument('--model-kwargs', type=_cli.mapping_type(yaml.safe_load), default=None, help='for both models')
    parser.add_argument('--moe-kwargs', type=_cli.mapping_type(yaml.safe_load), default=None,
                        help='MoE only, e.g. {num_experts: 8}')
    parser.add_argument('--capacity-factor', type=_cli.capacity_type(yaml.safe_load), default=None,
                        help='capacity factor at inference: a number (every MoE layer) or {layer: number}; fewer slots, less compute')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8, 32])
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--onnx-dir', default=None, help='where to export (default: a temp folder)')
    parser.add_argument('--reuse', action='store_true',
                        help='reuse ONNX files already in --onnx-dir (exported again when made at another capacity)')
    parser.add_argument('--variants', nargs='+', choices=['fp32', 'int8'], default=['fp32', 'int8'],
                        help='ONNX variants to time (int8: export_onnx(quantize="int8"))')
    parser.add_argument('--no-pytorch', dest='pytorch', action='store_false', help='time ONNX Runtime only')
    parser.add_argument('--gap-ms', type=float, default=50.0,
                        help="pause before each timed call (ONNX Runtime's spinning threads otherwise skew the next)")
    parser.add_argument('--json', default=None)
    parser.add_argument('--markdown', default=None)
    args = parser.parse_args(argv)
    _cli.setup_logging(args.verbose)
    from vit_moe.onnx import benchmark_inference, format_benchmark  # the [onnx] extra

    torch.manual_seed(0)
    kwargs = args.model_kwargs or {}
    from vit_moe.models import create_model_from_checkpoint, take_capacity_factor
    capacity_factor, moe_kwargs = take_capacity_factor(dict(kwargs, **(args.moe_kwargs or {})), args.capacity_factor)
    models = {'dense': timm.create_model(args.dense, **kwargs),
              'moe': create_model_from_checkpoint(args.moe, None, num_classes=moe_kwargs.pop('num_classes', None),
                                                  capacity_factor=capacity_factor, **moe_kwargs)}
    result = benchmark_inference(models, args.batch_sizes, args.rounds, args.warmup, args.onnx_dir, args.reuse,
                                 variants=args.variants, pytorch=args.pytorch, gap_s=args.gap_ms / 1e3)
    result.update(moe=args.moe, dense=args.dense, model_kwargs=kwargs, moe_kwargs=args.moe_kwargs,
                  capacity_factor=args.capacity_factor)
    text = format_benchmark(result, title=f'{args.moe} vs {args.dense}, ')
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(text + '\n')
    return 0


if __name__ == '__main__':
    _cli.run_and_exit(main)
