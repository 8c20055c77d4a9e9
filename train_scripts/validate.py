"""Evaluate a dense or MoE checkpoint on an ImageNet-style split: top-1, top-5 (torchmetrics), loss, images/s,
per-expert routing statistics.

    python train_scripts/validate.py --model NAME --checkpoint FILE_OR_FOLDER --data-dir DIR [--split val]
        [--batch-size 64] [--model-kwargs '{num_experts: 8}'] [--json results.json]
    accelerate launch --num_processes N train_scripts/validate.py ...   (every sample counted once)

    python train_scripts/validate.py --onnx model.onnx --data-dir DIR   (ONNX Runtime, timm preprocessing)

--checkpoint: a trainer output folder (model.safetensors + config.json), a .safetensors / .pth file,
'default' (timm's Hub weights) or 'hf-hub:org/name'.
"""
import argparse
import json
import sys

import yaml

from vit_moe.training import validate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', help='registered timm / vit_moe model name')
    parser.add_argument('--onnx', help='evaluate this exported ONNX model in ONNX Runtime instead')
    parser.add_argument('--checkpoint', default=None)
    parser.add_argument('--data-dir', required=True)
    parser.add_argument('--split', default='val')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--num-workers', type=int, default=2)
    parser.add_argument('--model-kwargs', type=yaml.safe_load, default=None, help="YAML mapping, e.g. '{img_size: 32}'")
    parser.add_argument('--mixed-precision', default='no', choices=['no', 'bf16', 'fp16'])
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    args = parser.parse_args(argv)

    if args.onnx:
        from vit_moe.onnx import evaluate_onnx
        result = evaluate_onnx(args.onnx, args.data_dir, args.split, args.batch_size, args.num_workers)
        result['layers'] = {}
    elif args.model:
        result = validate(args.model, args.checkpoint, args.data_dir, args.split, args.batch_size, args.num_workers,
                          args.model_kwargs, args.mixed_precision)
    else:
        parser.error('give --model NAME (PyTorch) or --onnx FILE (ONNX Runtime)')
    from accelerate import PartialState
    if PartialState().is_main_process:
        print(f'{args.onnx or args.model} on {result["split"]}: top-1 {result["top1"]:.2f}  top-5 {result["top5"]:.2f}  '
              f'loss {result["loss"]:.4f}  {result["images_per_s"]:.0f} images/s  ({result["num_samples"]} images)')
        for name, layer in result['layers'].items():
            print(f'  {name}: importance per expert {[round(v, 3) for v in layer["importance"]]}, '
                  f'tokens routed to no expert {layer["dropped_fraction"]:.1%}')
        if args.json:
            with open(args.json, 'w') as f:
                json.dump(result, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
