"""Export a (MoE) ViT to ONNX with a dynamic batch axis and static capacity, check it, and check parity
against PyTorch in ONNX Runtime.

    python export/onnx_export.py --model NAME [--checkpoint FILE_OR_FOLDER] --output model.onnx
        [--opset 18] [--img-size S] [--fp16] [--model-kwargs '{num_experts: 8}'] [--atol 1e-3] [--verbose] [--debug]

Weights over 2 GB (vit_b16_moe_upcycled is 3.9 GB in fp32) go to <output>.data (ONNX external data).
Prints the file(s) written and one parity line per batch size. Exits 1 when the max |logit difference| exceeds
--atol or top-1 agreement is below --min-agreement on fresh random batches of 1, 3 and 8 images; 2 with one line on
stderr for a bad argument, checkpoint or model option (--debug or VIT_MOE_DEBUG=1: the traceback instead).
--verbose shows the exporter's own INFO logs (onnxscript, onnx_ir) and other libraries' warnings.
"""
import sys
from pathlib import Path

import timm
import yaml

from vit_moe import _cli

MODEL_NAME = _cli.name_type(lambda name: ':' in name or timm.is_model(name), timm.list_models,
                            'a registered timm / vit_moe model (see timm.list_models())')


def describe_files(path: Path) -> str:
    """'model.onnx (12.3 MB)', plus its external data file when there is one."""
    text = f'{path} ({path.stat().st_size / 1e6:.1f} MB)'
    data = path.with_name(path.name + '.data')
    return text + (f' + {data} ({data.stat().st_size / 1e6:.1f} MB)' if data.is_file() else '')


def main(argv=None) -> int:
    parser = _cli.ArgumentParser(description=__doc__)
    parser.add_argument('--model', required=True, type=MODEL_NAME)
    parser.add_argument('--checkpoint', default=None, help="file, trainer output folder, 'default' or hf-hub:org/name")
    parser.add_argument('--output', required=True)
    parser.add_argument('--opset', type=int, default=18)
    parser.add_argument('--img-size', type=int, default=None)
    parser.add_argument('--fp16', action='store_true')
    parser.add_argument('--model-kwargs', type=_cli.mapping_type(yaml.safe_load), default=None)
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 3, 8])
    parser.add_argument('--atol', type=float, default=None, help='default 1e-3 (fp32) / 5e-2 (fp16)')
    parser.add_argument('--min-agreement', type=float, default=1.0, help='top-1 agreement required (0-1)')
    args = parser.parse_args(argv)
    _cli.setup_logging(args.verbose)
    from vit_moe.models import create_model_from_checkpoint
    from vit_moe.onnx import check_onnx_parity, export_onnx  # the [onnx] extra

    model = create_model_from_checkpoint(args.model, args.checkpoint, num_classes=args.num_classes,
                                         **(args.model_kwargs or {})).eval()
    path = export_onnx(model, args.output, img_size=args.img_size, opset=args.opset, fp16=args.fp16)
    print(f'exported {describe_files(path)}; onnx.checker full check passed')
    parity_model = model.half() if args.fp16 else model
    atol = args.atol if args.atol is not None else (5e-2 if args.fp16 else 1e-3)
    results = check_onnx_parity(parity_model, path, batch_sizes=args.batch_sizes)
    ok = True
    for batch, r in results.items():
        good = r['max_abs_diff'] <= atol and r['top1_agreement'] >= args.min_agreement
        ok &= good
        print(f'batch {batch:3d}: max |logit diff| {r["max_abs_diff"]:.2e}  top-1 agreement '
              f'{r["top1_agreement"]:.3f}  {"ok" if good else "FAIL"}')
    if not ok:
        print(f'parity check failed (atol {atol}, min top-1 agreement {args.min_agreement})', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(_cli.run(main))
