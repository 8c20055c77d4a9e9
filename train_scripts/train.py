"""Train a timm / vit_moe model on ImageNet-style folders with Hugging Face Accelerate.

    python train_scripts/train.py --config configs/vit_b16_moe_imagenet.yaml [--any-key value ...]
    accelerate launch [--num_processes N] train_scripts/train.py --config ...

Every config key (see vit_moe/training/config.py and the commented configs/) can be overridden as
--key value. Writes OUTPUT_DIR/{config.yaml, log.jsonl, checkpoints/, model/}. A run stopped by SIGTERM
or Ctrl-C saves a checkpoint and exits with 128 + the signal number; continue it with --resume latest.
"""
import logging
import sys

from vit_moe.training import parse_train_args, train


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
    cfg = parse_train_args(argv, description=__doc__)
    summary = train(cfg)
    if summary['interrupted']:
        print(f'interrupted at step {summary["step"]}; checkpoint: {summary["checkpoint"]}', file=sys.stderr)
        return 128 + summary['interrupted']
    result = summary['eval']
    print(f'step {summary["step"]}: top-1 {result["top1"]:.2f}  top-5 {result["top5"]:.2f}  loss {result["loss"]:.4f}'
          f'  ({result["num_samples"]} images); model saved to {summary["model_dir"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
