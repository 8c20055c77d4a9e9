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

    if args.onnx:  # needs only the [onnx] extra
        from vit_moe.onnx import evaluate_onnx
        reference = None
        if args.model:  # the PyTorch model it was exported from: top-1 agreement on the same images
            from vit_moe.models import create_model_from_checkpoint
            reference = create_model_from_checkpoint(args.model, args.checkpoint, **(args.model_kwargs or {})).eval()
            if args.capacity_factor is not None:
                from vit_moe.layers import set_capacity_factor
                set_capacity_factor(reference, args.capacity_factor)
        result = evaluate_onnx(args.onnx, args.data_dir, args.split, args.batch_size, args.num_workers,
                               reference=reference)
        result['layers'] = {}
    elif args.model:
        from vit_moe.training import validate
        result = validate(args.model, args.checkpoint, args.data_dir, args.split, args.batch_size, args.num_workers,
                          args.model_kwargs, args.mixed_precision, args.expert_parallel_size, args.capacity_factor)
    else:
        parser.error('give --model NAME (PyTorch) or --onnx FILE (ONNX Runtime)')
    if _is_main_process():
        print(f'{args.onnx or args.model} on {result["split"]}: top-1 {result["top1"]:.2f}  '
              f'top-5 {result["top5"]:.2f}  loss {result["loss"]:.4f}  {result["images_per_s"]:.0f} images/s  '
              f'({result["num_samples"]} images)')
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


if __name__ == '__main__':
    _cli.run_and_exit(main)
