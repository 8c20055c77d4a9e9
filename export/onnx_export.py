"""Export a (MoE) ViT to ONNX with a dynamic batch axis and static capacity, check it, and check parity
against PyTorch in ONNX Runtime, layer by layer.

    python export/onnx_export.py --model NAME [--checkpoint FILE_OR_FOLDER] --output model.onnx
        [--opset 18] [--img-size S] [--fp16 | --quantize int8 [--int8-target auto|vnni|avx2]] [--optimize]
        [--expert-kernel matmul | --expert-kernel qmoe --quantize int8|int4-experts]
        [--model-kwargs '{num_experts: 8}'] [--capacity-factor C | '{blocks.11.mlp: C}']
        [--data-dir DIR [--split val] [--max-images 1000]] [--triton-repo DIR [--triton-max-batch-size 32]]
        [--atol 1e-3] [--tie-rtol 1e-5] [--expert-rtol R] [--min-agreement A] [--min-data-agreement A]
        [--verbose] [--debug]

--capacity-factor: the capacity at inference (V-MoE's knob: fewer slots per expert, less compute, a graceful loss),
for every MoE layer or per layer; recorded in the file's metadata. --triton-repo DIR: a Triton Inference Server model
repository (DIR/<name>/config.pbtxt + DIR/<name>/1/model.onnx; dynamic batching is exact for float files, since an
image's logits never depend on its batch-mates, not for int8 ones, whose activation scale is taken per batch).

--quantize int8: ONNX Runtime dynamic int8 weights for every MatMul with constant weights (every expert, per expert
and output column), the routers kept float32, the experts unrolled into per-expert 2-D matmuls in the graph
(--no-unroll-experts keeps them batched). The weight range suits the CPU the file is for (--int8-target): 'vnni'
(x86 with AVX-512 VNNI / AVX-VNNI, and ARM: full range), 'avx2' (any x86 CPU: 7-bit weights, since without VNNI
ONNX Runtime's int8 kernel saturates on full-range ones), 'auto' (default: the CPU running the export); the choice
is stored in the file. --optimize: ONNX Runtime's graph optimisations saved in the file.

--expert-kernel qmoe: each MoE layer's experts and combine in one ONNX Runtime com.microsoft.QMoE node (k = E, the
router's combine weights as `router_weights`), 8-bit experts (--quantize int8, per output channel) or 4-bit
(--quantize int4-experts, blocks of 32 inputs), the rest int8; recorded in the file (`expert_kernel`). QMoE's GELU is
the tanh form, so the file is checked against the PyTorch model with the same quantized experts and tanh GELU twice:
its graph before the rest is quantized (QMoE nodes, all else float32) to 1e-3 of max |logit| (the node's own error;
--no-routing-check skips it), and the file end to end to 0.25 (the int8 rest; --rtol sets it); with --data-dir, its
top-1 agreement with the PyTorch float32 model on real images (default 0.97, as int8). Expert choice and token choice
layers with fc1 -> GELU / ReLU / SiLU -> fc2 experts.
Slower than the default on the CPUs measured so far (README): the default stays --expert-kernel matmul.

Parity (fresh random batches of 1, 3 and 8 images): for MoE models a debug export of the same trace (the deployed file
is that graph with only its logits kept) exposes every MoE
layer's input, slot decisions, combine weights, expert outputs and output (never the deployed file, which must give
the same logits; --no-routing-check skips it), and each MoE layer is checked on ONNX Runtime's own tensors: every
slot filled differently from PyTorch's router on the same input must be a routing tie (probabilities equal within
--tie-rtol, default 1e-5 relative), the combine weights must be the router's probabilities, each expert's outputs
must match PyTorch's float32 expert on the same tokens within --expert-rtol (relative RMS error; default 1e-4 for
float32, 2e-2 for --fp16, 0.25 for int8, where rounding gives 1-5 %), and the combine must be exact. The first layer
that fails is named with the reason. A float32 graph's logits must also match PyTorch on ONNX Runtime's routing
(--atol) with top-1 agreement >= --min-agreement (default 1.0). For int8 and fp16 the end-to-end logit difference and
the slots PyTorch float32 fills differently are reported, not judged: e.g.
`batch 8: max |logit diff| 8.4e-01 (0.11 of max |logit|; 6 of 432 slots filled differently from PyTorch float32);
layer by layer on ONNX Runtime's own inputs: 0 routing ties, experts within 3.1e-02 (allowed 0.25): ok`.
With --data-dir, the deployed file and the PyTorch model also classify real images (the --split folder, at most
--max-images of them, evenly spaced) and their top-1 agreement must reach --min-data-agreement (default 0.999 for
float32, 0.99 for fp16, 0.97 for int8: int8 may change the prediction of an image near a class boundary, and more
than 3 in 100 means the quantization does not suit the model or the CPU).
Soft MoE layers (router soft) mix all tokens into every slot, so there is no slot routing to check layer by layer:
their files are checked end to end (float32: --atol; fp16 / int8: max |logit diff| <= 0.25 of max |logit| unless
--rtol is given), and --data-dir is the check that counts for int8.

Weights over 1.8 GB (vit_b16_moe_upcycled is 3.9 GB in fp32) go to <output>.data (ONNX external data).
Prints the file(s) written and one parity line per batch size. Exits 1 when a check fails; 2 with one line on
stderr for a bad argument, checkpoint or model option (--debug or VIT_MOE_DEBUG=1: the traceback instead).
--verbose shows the exporter's own INFO logs (onnxscript, onnx_ir) and other libraries' warnings.
"""
import copy
import sys
import tempfile
from pathlib import Path
from typing import Optional

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


def build_parser() -> _cli.ArgumentParser:
    parser = _cli.ArgumentParser(description=__doc__)
    parser.add_argument('--model', required=True, type=MODEL_NAME)
    parser.add_argument('--checkpoint', default=None, help="file, trainer output folder, 'default' or hf-hub:org/name")
    parser.add_argument('--output', required=True)
    parser.add_argument('--opset', type=int, default=18)
    parser.add_argument('--img-size', type=int, default=None)
    parser.add_argument('--fp16', action='store_true')
    parser.add_argument('--quantize', choices=['int8', 'int4-experts'], default=None,
                        help='dynamic int8 weights (routers float32); int4-experts: 4-bit experts (--expert-kernel qmoe)')
    parser.add_argument('--expert-kernel', choices=['matmul', 'qmoe'], default='matmul',
                        help="the experts as standard-op matmuls (default) or one ONNX Runtime QMoE node per layer")
    parser.add_argument('--optimize', action='store_true', help="save ONNX Runtime's graph optimisations")
    parser.add_argument('--no-unroll-experts', dest='unroll_experts', action='store_false',
                        help='with --quantize: keep the batched expert matmuls')
    parser.add_argument('--model-kwargs', type=_cli.mapping_type(yaml.safe_load), default=None)
    parser.add_argument('--capacity-factor', type=_cli.capacity_type(yaml.safe_load), default=None,
                        help='capacity factor at inference: a number (every MoE layer) or {layer: number}; fewer '
                             'slots, less compute (recorded in the file)')
    parser.add_argument('--triton-repo', default=None,
                        help='also write a Triton Inference Server model repository for the file into this folder')
    parser.add_argument('--triton-max-batch-size', type=int, default=32)
    parser.add_argument('--triton-gpu', action='store_true',
                        help='Triton: a GPU instance with the TensorRT accelerator (default for --fp16 files)')
    parser.add_argument('--num-classes', type=int, default=None)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 3, 8])
    parser.add_argument('--int8-target', default='auto', choices=['auto', 'vnni', 'avx2'],
                        help='with --quantize: the CPU the file is for (weight range); auto: this one')
    parser.add_argument('--atol', type=float, default=None, help='float32 logits on the same routing (default 1e-3)')
    parser.add_argument('--min-agreement', type=float, default=None,
                        help='float32: top-1 agreement required on the random batches (0-1, default 1.0)')
    parser.add_argument('--no-routing-check', dest='routing_check', action='store_false',
                        help='skip the debug export that checks each MoE layer on its own inputs (MoE models)')
    parser.add_argument('--rtol', type=float, default=None,
                        help='also require max |logit diff| <= rtol x max |logit| (default: reported only)')
    parser.add_argument('--tie-rtol', type=float, default=None,
                        help='relative router-probability gap up to which a flipped slot is a tie (default 1e-5)')
    parser.add_argument('--expert-rtol', type=float, default=None,
                        help='relative RMS error allowed per expert on its own inputs (default by precision)')
    parser.add_argument('--data-dir', default=None, help='also measure top-1 agreement with PyTorch on real images')
    parser.add_argument('--split', default='val')
    parser.add_argument('--max-images', type=int, default=1000)
    parser.add_argument('--min-data-agreement', type=float, default=None,
                        help='top-1 agreement required on --data-dir (default 0.999 fp32, 0.99 fp16, 0.97 int8)')
    return parser


def _check_ranges(parser: _cli.ArgumentParser, args) -> None:
    """One parser error naming a threshold outside its range."""
    fraction, positive = (lambda v: 0 <= v <= 1, 'in [0, 1]'), (lambda v: v > 0, '> 0')
    for flag, (valid, accepted) in dict(
            tie_rtol=(lambda v: 0 <= v < 1, 'in [0, 1)'), min_agreement=fraction, min_data_agreement=fraction,
            atol=positive, rtol=positive, expert_rtol=positive, max_images=(lambda v: v >= 1, '>= 1')).items():
        value = getattr(args, flag)
        if value is not None and not valid(value):
            parser.error(f'--{flag.replace("_", "-")} must be {accepted}, got {value}')


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_ranges(parser, args)
    _cli.setup_logging(args.verbose)
    from vit_moe.models import create_model_from_checkpoint, take_capacity_factor
    from vit_moe.onnx import export_onnx  # the [onnx] extra

    if args.data_dir:
        from vit_moe.data import check_image_folder
        check_image_folder(args.data_dir, args.split)  # a bad folder fails before the export
    model_kwargs, num_classes = _cli.take_num_classes(args.model_kwargs, args.num_classes)
    capacity_factor, model_kwargs = take_capacity_factor(model_kwargs, args.capacity_factor)
    model = create_model_from_checkpoint(args.model, args.checkpoint, num_classes=num_classes,
                                         capacity_factor=capacity_factor, **model_kwargs).eval()
    export_kwargs = dict(img_size=args.img_size, opset=args.opset, fp16=args.fp16, quantize=args.quantize,
                         unroll_experts=args.unroll_experts, int8_target=args.int8_target,
                         expert_kernel=args.expert_kernel)
    kind = 'int8' if args.quantize else 'fp16' if args.fp16 else 'fp32'
    with tempfile.TemporaryDirectory(prefix='vit_moe_parity_') as tmp:
        debug = Path(tmp) / 'debug.onnx' if _checks_routing(model, args) else None
        path = export_onnx(model, args.output, optimize=args.optimize, debug_output=debug, **export_kwargs)
        done = ', '.join(['onnx.checker full check passed'] + (['int8 weights, routers float32'] if args.quantize
                                                                 else []) + (['optimised'] if args.optimize else [])
                         + ([f'experts in one QMoE node per MoE layer ({_qmoe_bits(args)}, tanh GELU)']
                            if args.expert_kernel == 'qmoe' else []))
        print(f'exported {describe_files(path)}; {done}{_int8_note(path) if args.quantize else ""}')
        if not _parity_holds(model, path, debug, args, kind):
            return 1
    if args.data_dir and _check_real_images(path, model, args, kind):
        return 1
    if args.triton_repo:
        from vit_moe.onnx.triton import write_triton_repository
        folder = write_triton_repository(path, args.triton_repo, max_batch_size=args.triton_max_batch_size,
                                         gpu=args.triton_gpu or args.fp16)
        print(f'Triton model repository: {folder} (config.pbtxt, 1/{path.name} as model.onnx)')
    return 0


def _checks_routing(model, args) -> bool:
    """Whether parity checks each MoE layer on a debug export (slot-routed MoE models, unless --no-routing-check)."""
    from vit_moe.layers import moe_layers, soft_moe_layers
    return args.routing_check and bool(moe_layers(model)) and not soft_moe_layers(model)  # Soft MoE: end to end


def _qmoe_bits(args) -> str:
    from vit_moe.onnx.fused_experts import QMOE_EXPERT_BITS
    bits, block = QMOE_EXPERT_BITS[args.quantize]
    return f'{bits}-bit experts' + (f', blocks of {block}' if block else ', per channel')


def _parity_holds(model, path: Path, debug: Optional[Path], args, kind: str) -> bool:
    """Parity with PyTorch on random batches (MoE layers one by one on `debug`, the debug export of the same trace);
    prints one line per batch size, and on stderr what failed."""
    from vit_moe.layers import soft_moe_layers
    from vit_moe.onnx import DEFAULT_TIE_RTOL, check_onnx_parity, format_parity
    parity_model = copy.deepcopy(model).half() if args.fp16 else model
    if args.expert_kernel == 'qmoe':  # the model the file stands for: its quantized experts, tanh GELU
        from vit_moe.onnx.fused_experts import QMOE_EXPERT_BITS, qmoe_reference
        parity_model = qmoe_reference(model, *QMOE_EXPERT_BITS[args.quantize])
    atol = args.atol if args.atol is not None else 1e-3
    min_agreement = args.min_agreement if args.min_agreement is not None else 1.0
    checked = path
    if debug is not None and args.expert_kernel == 'qmoe':  # its graph before the rest went int8, checked tightly
        ok = True
        for batch, r in check_onnx_parity(parity_model, debug, batch_sizes=args.batch_sizes, atol=None,
                                          rtol=QMOE_FLOAT_REST_RTOL).items():
            ok &= r['ok']
            print(f'QMoE nodes, the rest float32: batch {batch:3d}: max |logit diff| {r["max_abs_diff"]:.1e} '
                  f'({r["relative_diff"]:.0e} of max |logit|, allowed {QMOE_FLOAT_REST_RTOL:g}): '
                  f'{"ok" if r["ok"] else "FAIL"}')
        if not ok:
            print('parity check failed: the QMoE nodes do not compute the PyTorch model with the same quantized '
                  'experts and tanh GELU', file=sys.stderr)
            return False
    elif debug is not None:
        checked = debug
        same = same_logits(path, debug)
        if same > 1e-5:
            print(f'the deployed file and its debug export differ by {same:.1e}: cannot vouch for it',
                  file=sys.stderr)
            return False
    rtol = args.rtol
    if rtol is None and kind != 'fp32' and (soft_moe_layers(model) or args.expert_kernel == 'qmoe'):  # end to end
        rtol = SOFT_END_TO_END_RTOL
    results = check_onnx_parity(parity_model, checked, batch_sizes=args.batch_sizes, atol=atol, rtol=rtol,
                                tie_rtol=DEFAULT_TIE_RTOL if args.tie_rtol is None else args.tie_rtol,
                                expert_rtol=args.expert_rtol)
    ok = True
    for batch, r in results.items():
        good = r['ok'] and (kind != 'fp32' or r['top1_agreement'] >= min_agreement)
        ok &= good
        print(format_parity(batch, dict(r, ok=good)))
    if not ok:
        limit = f'atol {atol}, min top-1 agreement {min_agreement}' if kind == 'fp32' else 'layer by layer'
        print(f'parity check failed ({limit})', file=sys.stderr)
    return ok


DATA_AGREEMENT = {'fp32': 0.999, 'fp16': 0.99, 'int8': 0.97}  # default --min-data-agreement
# QMoE files: the graph before the rest is quantized against qmoe_reference, max |logit diff| / max |logit| (measured
# 1e-6 with 8-bit experts, 5e-5 with 4-bit: float32 rounding of the node's own sums)
QMOE_FLOAT_REST_RTOL = 1e-3
# Soft MoE int8 / fp16: max |logit diff| / max |logit| allowed when no layer-by-layer check exists (its layers mix
# tokens into slots: there is no slot routing to expose); pass --data-dir for the agreement on real images
SOFT_END_TO_END_RTOL = 0.25


def _int8_note(path: Path) -> str:
    from vit_moe.onnx import OnnxClassifier
    int8 = OnnxClassifier(path, providers=['CPUExecutionProvider']).int8 or {}
    return f'; int8 target {int8.get("target")} ({int8.get("chosen")})'


def _check_real_images(path: Path, model, args, kind: str) -> int:
    """Top-1 agreement of the deployed file with the PyTorch model on real images, against the threshold."""
    from vit_moe.onnx import evaluate_onnx
    threshold = args.min_data_agreement if args.min_data_agreement is not None else DATA_AGREEMENT[kind]
    r = evaluate_onnx(path, args.data_dir, args.split, num_workers=0, reference=model, max_images=args.max_images)
    good = r['top1_agreement'] >= threshold
    print(f'real images ({r["num_samples"]} of {r["split"]}): top-1 {r["top1"]:.2f} vs PyTorch float32 '
          f'{r["reference_top1"]:.2f}, top-1 agreement {r["top1_agreement"]:.2%} (required {threshold:.1%}): '
          f'{"ok" if good else "FAIL"}')
    return 0 if good else 1


def same_logits(a: Path, b: Path) -> float:
    """Max |difference| of two files' logits on one random batch (the deployed file vs its debug export)."""
    import numpy as np
    from vit_moe.onnx import OnnxClassifier
    first, second = OnnxClassifier(a), OnnxClassifier(b)
    x = np.random.default_rng(0).standard_normal((2, *first.data_config['input_size'])).astype(np.float32)
    return float(np.abs(first(x).astype(np.float32) - second(x).astype(np.float32)).max())


if __name__ == '__main__':
    _cli.run_and_exit(main)
