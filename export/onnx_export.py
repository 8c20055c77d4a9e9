"""Export a (MoE) ViT to ONNX with a dynamic batch axis and static capacity, check it, and check parity
against PyTorch in ONNX Runtime.

    python export/onnx_export.py --model NAME [--checkpoint FILE_OR_FOLDER] --output model.onnx
        [--opset 18] [--img-size S] [--fp16 | --quantize int8] [--optimize] [--model-kwargs '{num_experts: 8}']
        [--atol 1e-3] [--min-agreement 1.0] [--tie-rtol 1e-5] [--verbose] [--debug]

--quantize int8: ONNX Runtime dynamic int8 weights for every MatMul with constant weights (every expert, per expert
and output column), the routers kept float32, the experts unrolled into per-expert 2-D matmuls in the graph
(--no-unroll-experts keeps them batched). --optimize: ONNX Runtime's graph optimisations saved in the file.
Parity (fresh random batches of 1, 3 and 8 images) tells routing from arithmetic for MoE models: a debug export of
the same graph exposing each MoE layer's slot decisions (never the deployed file; --no-routing-check skips it) lets
PyTorch replay ONNX Runtime's routing, so the logits are compared on the same routing (--atol), every MoE layer's
output too (the first one off is named), and every slot the two runtimes fill differently must be a tie (router
probabilities equal within --tie-rtol, default 1e-5 relative) or the check fails naming layer, image, expert and
slot. Printed as e.g.
`batch 8: max |logit diff| 3.5e-02 (2 routing ties of 1664 slots, gap <= 3e-07); with ONNX Runtime's routing
replayed 2.1e-06; top-1 agreement 1.000: ok`. A quantized or fp16 model moves probabilities more than float noise:
flips are reported, and the logits are judged relative to their scale (max |logit diff| <= --rtol x max |logit|,
default 0.1); its accuracy is measured on real images with validate.py --onnx --model ... (top-1 agreement).

Weights over 2 GB (vit_b16_moe_upcycled is 3.9 GB in fp32) go to <output>.data (ONNX external data).
Prints the file(s) written and one parity line per batch size. Exits 1 when parity fails or top-1 agreement is below
--min-agreement; 2 with one line on stderr for a bad argument, checkpoint or model option (--debug or
VIT_MOE_DEBUG=1: the traceback instead).
--verbose shows the exporter's own INFO logs (onnxscript, onnx_ir) and other libraries' warnings.
"""
import sys
import tempfile
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
    parser.add_argument('--quantize', choices=['int8'], default=None, help='dynamic int8 weights (routers float32)')
    parser.add_argument('--optimize', action='store_true', help="save ONNX Runtime's graph optimisations")
    parser.add_argument('--no-unroll-experts', dest='unroll_experts', action='store_false',
                        help='with --quantize: keep the batched expert matmuls')
    parser.add_argument('--model-kwargs', type=_cli.mapping_type(yaml.safe_load), default=None)
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 3, 8])
    parser.add_argument('--atol', type=float, default=None, help='float32 logits on the same routing (default 1e-3)')
    parser.add_argument('--min-agreement', type=float, default=None,
                        help='top-1 agreement required (0-1); default 1.0, 0 (reported only) with --quantize')
    parser.add_argument('--no-routing-check', dest='routing_check', action='store_false',
                        help='skip the debug export that tells routing ties from wrong arithmetic (MoE models)')
    parser.add_argument('--rtol', type=float, default=0.1,
                        help='with --quantize: max |logit diff| allowed as a fraction of max |logit|')
    parser.add_argument('--tie-rtol', type=float, default=None,
                        help='relative router-probability gap up to which a flipped slot is a tie (default 1e-5)')
    args = parser.parse_args(argv)
    if args.tie_rtol is not None and not 0 <= args.tie_rtol < 1:
        parser.error(f'--tie-rtol must be in [0, 1), got {args.tie_rtol}')
    _cli.setup_logging(args.verbose)
    from vit_moe.models import create_model_from_checkpoint
    from vit_moe.layers import moe_layers
    from vit_moe.onnx import DEFAULT_TIE_RTOL, check_onnx_parity, export_onnx, format_parity  # the [onnx] extra

    model = create_model_from_checkpoint(args.model, args.checkpoint, num_classes=args.num_classes,
                                         **(args.model_kwargs or {})).eval()
    path = export_onnx(model, args.output, img_size=args.img_size, opset=args.opset, fp16=args.fp16,
                       quantize=args.quantize, optimize=args.optimize, unroll_experts=args.unroll_experts)
    done = ', '.join(['onnx.checker full check passed'] + (['int8 weights, routers float32'] if args.quantize else [])
                     + (['optimised'] if args.optimize else []))
    print(f'exported {describe_files(path)}; {done}')
    parity_model = model.half() if args.fp16 else model
    exact = not (args.quantize or args.fp16)  # float32: every routing flip must be a tie, logits to atol
    atol = args.atol if args.atol is not None else (1e-3 if exact else None)
    min_agreement = args.min_agreement if args.min_agreement is not None else (1.0 if exact else 0.0)
    checked = path
    with tempfile.TemporaryDirectory(prefix='vit_moe_parity_') as tmp:
        if args.routing_check and moe_layers(model):
            checked = export_onnx(model, Path(tmp) / 'debug.onnx', img_size=args.img_size, opset=args.opset,
                                  fp16=args.fp16, quantize=args.quantize, unroll_experts=args.unroll_experts,
                                  check=False, expose_routing=True)
            same = same_logits(path, checked)
            if same > 1e-5:
                print(f'the deployed file and its debug export differ by {same:.1e}: cannot vouch for it',
                      file=sys.stderr)
                return 1
        results = check_onnx_parity(parity_model, checked, batch_sizes=args.batch_sizes, atol=atol, rtol=args.rtol,
                                    tie_rtol=DEFAULT_TIE_RTOL if args.tie_rtol is None else args.tie_rtol)
    ok = True
    for batch, r in results.items():
        good = r['ok'] and r['top1_agreement'] >= min_agreement
        ok &= good
        print(format_parity(batch, dict(r, ok=good)))
    if not ok:
        limit = f'atol {atol}' if atol is not None else f'rtol {args.rtol} of max |logit|'
        print(f'parity check failed ({limit}, min top-1 agreement {min_agreement})', file=sys.stderr)
        return 1
    return 0


def same_logits(a: Path, b: Path) -> float:
    """Max |difference| of two files' logits on one random batch (the deployed file vs its debug export)."""
    import numpy as np
    from vit_moe.onnx import OnnxClassifier
    first, second = OnnxClassifier(a), OnnxClassifier(b)
    x = np.random.default_rng(0).standard_normal((2, *first.data_config['input_size'])).astype(np.float32)
    return float(np.abs(first(x).astype(np.float32) - second(x).astype(np.float32)).max())


if __name__ == '__main__':
    sys.exit(_cli.run(main))
