"""Evaluate a dense or MoE checkpoint on an ImageNet-style split: top-1, top-5 (torchmetrics), loss, images/s,
per-expert routing statistics.

    python train_scripts/validate.py --model NAME --checkpoint FILE_OR_FOLDER --data-dir DIR [--split val]
        [--batch-size 64] [--model-kwargs '{num_experts: 8}'] [--json results.json]
    accelerate launch --num_processes N train_scripts/validate.py ...   (every sample counted once)

    python train_scripts/validate.py --onnx model.onnx --data-dir DIR   (ONNX Runtime, timm preprocessing)
        [--model NAME --checkpoint C]   (also the PyTorch model it came from: top-1 agreement on the same images)

--checkpoint: a trainer output folder (model.safetensors + config.json), a .safetensors / .pth file,
'default' (timm's Hub weights) or 'hf-hub:org/name'.

A bad argument, path, checkpoint or model file exits with 2 and one line on stderr; --debug (or VIT_MOE_DEBUG=1)
shows the traceback instead. --verbose shows other libraries' INFO logs and warnings.
"""
import json

import timm
import yaml

from vit_moe import _cli

MODEL_NAME = _cli.name_type(lambda name: ':' in name or timm.is_model(name), timm.list_models,
                            'a registered timm / vit_moe model (see timm.list_models())')


def _is_main_process() -> bool:
    try:
        from accelerate import PartialState
    except ImportError:  # --onnx with the [onnx] extra alone: one process
        return True
    return PartialState().is_main_process


def main(argv=None) -> int:
    parser = _cli.ArgumentParser(description=__doc__)
    parser.add_argument('--model', type=MODEL_NAME, help='registered timm / vit_moe model name')
    parser.add_argument('--onnx', help='evaluate this exported ONNX model in ONNX Runtime instead')
    parser.add_argument('--checkpoint', default=None)
    parser.add_argument('--data-dir', required=True)
    parser.add_argument('--split', default='val')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--num-workers', type=int, default=2)
    parser.add_argument('--model-kwargs', type=_cli.mapping_type(yaml.safe_load), default=None,
                        help="YAML mapping, e.g. '{img_size: 32}'")
    parser.add_argument('--mixed-precision', default='no', choices=['no', 'bf16', 'fp16'])
    parser.add_argument('--expert-parallel-size', type=int, default=1,
                        help="spread each MoE layer's experts over groups of N processes of the launch")
    parser.add_argument('--capacity-factor', type=_cli.capacity_type(yaml.safe_load), default=None,
                        help='capacity factor at inference: a number (every MoE layer) or {layer: number}; fewer slots, less compute')
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    _cli.setup_logging(args.verbose)

    if args.model is None and args.checkpoint:  # a model folder says what it is
        from vit_moe.models import saved_architecture
        args.model = saved_architecture(args.checkpoint)
    if args.onnx:  # needs only the [onnx] extra
        from vit_moe.onnx import evaluate_onnx
        file_capacity = _onnx_capacity(parser, args)
        reference = None
        if args.model:  # the PyTorch model it was exported from, at the file's capacity: top-1 agreement
            from vit_moe.models import create_model_from_checkpoint
            reference = create_model_from_checkpoint(args.model, args.checkpoint, capacity_factor=file_capacity,
                                                     **(args.model_kwargs or {})).eval()
        elif args.checkpoint:
            parser.error(f'--checkpoint {args.checkpoint} has no config.json naming its architecture; give --model')
        result = evaluate_onnx(args.onnx, args.data_dir, args.split, args.batch_size, args.num_workers,
                               reference=reference)
        result.update(layers={}, capacity_factor=file_capacity)
    elif args.model:
        from vit_moe.training import validate
        result = validate(args.model, args.checkpoint, args.data_dir, args.split, args.batch_size, args.num_workers,
                          args.model_kwargs, args.mixed_precision, args.expert_parallel_size, args.capacity_factor)
    else:
        parser.error('give --model NAME (PyTorch; or --checkpoint a model folder, whose config.json names it) or '
                     '--onnx FILE (ONNX Runtime)')
    if _is_main_process():
        print(f'{args.onnx or args.model} on {result["split"]}: top-1 {result["top1"]:.2f}  '
              f'top-5 {result["top5"]:.2f}  loss {result["loss"]:.4f}  {result["images_per_s"]:.0f} images/s  '
              f'({result["num_samples"]} images{_capacity_note(result.get("capacity_factor"), args.onnx)})')
        if 'top1_agreement' in result:
            print(f'  PyTorch {args.model}: top-1 {result["reference_top1"]:.2f}; top-1 agreement with ONNX Runtime '
                  f'{result["top1_agreement"]:.2%}')
        if result.get('excluded'):
            print(f'  {len(result["excluded"])} unreadable image(s) left out of the metrics: '
                  + ', '.join(result['excluded']))
        for name, layer in result['layers'].items():
            print(f'  {name}: importance per expert {[round(v, 3) for v in layer["importance"]]}, '
                  f'tokens routed to no expert {layer["dropped_fraction"]:.1%}')
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(result, f, indent=2)
    return 0


def _onnx_capacity(parser, args):
    """The capacity factors the ONNX file was exported with (its metadata), after refusing what cannot apply to it:
    another --capacity-factor (naming the export command that makes the right file), the PyTorch-only options, and a
    --model other than the file's architecture."""
    from vit_moe.onnx import read_metadata
    metadata = read_metadata(args.onnx)
    for flag, value, default in (('--mixed-precision', args.mixed_precision, 'no'),
                                 ('--expert-parallel-size', args.expert_parallel_size, 1)):
        if value != default:
            parser.error(f'{flag} {value} does not apply to --onnx (ONNX Runtime runs the file as exported, in one '
                         f'process); remove it')
    architecture = metadata.get('architecture')
    if args.model and architecture and args.model != architecture:
        parser.error(f'{args.onnx} was exported from a {architecture}; --model {args.model} names another '
                     f'architecture (give --model {architecture})')
    recorded = metadata.get('capacity_factor') or None
    if args.capacity_factor is None:
        return recorded
    if not recorded:
        parser.error(f'--capacity-factor {args.capacity_factor}: {args.onnx} has no expert / token choice MoE layer '
                     f'(a dense or Soft MoE file), so no capacity to set')
    asked = dict(recorded, **args.capacity_factor) if isinstance(args.capacity_factor, dict) else \
        {name: args.capacity_factor for name in recorded}
    if {k: float(v) for k, v in asked.items()} != {k: float(v) for k, v in recorded.items()}:
        quantize = ' --quantize int8' if metadata.get('int8') else ''
        parser.error(f'{args.onnx} was exported at capacity factor {_capacity_text(recorded)}, and a file\'s capacity '
                     f'is fixed in its graph; for {_capacity_text(asked)} export one: python export/onnx_export.py '
                     f'--model {architecture or args.model or "NAME"} --checkpoint {args.checkpoint or "CHECKPOINT"} '
                     f'--output {_stem(args.onnx)}_{_file_suffix(asked)}.onnx --capacity-factor '
                     f'"{_capacity_text(asked)}"{quantize}')
    return recorded


def _capacity_text(factors) -> str:
    """'1' when every layer has the same capacity factor, else '{blocks.2.mlp: 2, blocks.3.mlp: 0.5}'."""
    values = set(map(float, factors.values()))
    if len(values) == 1:
        return f'{values.pop():g}'
    return '{' + ', '.join(f'{k}: {float(v):g}' for k, v in factors.items()) + '}'


def _file_suffix(factors) -> str:
    values = set(map(float, factors.values()))
    return f'c{values.pop():g}' if len(values) == 1 else 'capacity'


def _stem(path: str) -> str:
    from pathlib import Path
    return str(Path(path).with_suffix(''))


def _capacity_note(factors, onnx) -> str:
    if not factors:
        return ''
    return f'; capacity factor {_capacity_text(factors)}' + (" (the file's)" if onnx else '')


if __name__ == '__main__':
    _cli.run_and_exit(main)
