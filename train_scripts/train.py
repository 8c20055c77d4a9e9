"""Train a timm / vit_moe model on ImageNet-style folders with Hugging Face Accelerate.

    python train_scripts/train.py --config configs/vit_b16_moe_imagenet.yaml [--any-key value ...]
    accelerate launch [--config_file configs/accelerate/X.yaml] train_scripts/train.py --config ...

Every config key (see vit_moe/training/config.py and the commented configs/) can be overridden as
--key value. Writes OUTPUT_DIR/{config.yaml, log.jsonl, checkpoints/checkpoint_step_N/, model/, model_ema/}. A run stopped
by SIGTERM or Ctrl-C saves a checkpoint and exits with 128 + the signal number; continue it in place with
--resume latest (or launch with --resume auto every time on a preemptible cluster).

A bad key, value, path or image exits with 2 and one line on stderr; --debug (or VIT_MOE_DEBUG=1) shows the
traceback instead. --verbose shows other libraries' INFO logs (Accelerate's checkpointing, ...) and warnings.
"""
import sys

from vit_moe import _cli


def main(argv=None) -> int:
    argv, _, verbose = _cli.pop_common_flags(argv)
    _cli.setup_logging(verbose)
    from vit_moe.training import parse_train_args, train
    with _cli.raise_usage_errors():
        cfg = parse_train_args(argv, description=__doc__)
    summary = train(cfg)
    if not summary['main_process']:
        return 128 + summary['interrupted'] if summary['interrupted'] else 0  # the main process reports
    if summary['interrupted']:
        print(f'interrupted at step {summary["step"]}; checkpoint: {summary["checkpoint"]}', file=sys.stderr)
        return 128 + summary['interrupted']
    result = summary['eval']
    print(f'step {summary["step"]}: top-1 {result["top1"]:.2f}  top-5 {result["top5"]:.2f}  loss {result["loss"]:.4f}'
          f'  ({result["num_samples"]} images); model saved to {summary["model_dir"]}')
    if summary['ema_model_dir']:
        print(f'EMA weights: top-1 {result["ema_top1"]:.2f}  top-5 {result["ema_top5"]:.2f}  loss {result["ema_loss"]:.4f}'
              f'; saved to {summary["ema_model_dir"]}')
    if summary['skipped_images']:
        print(f'{len(summary["skipped_images"])} unreadable image(s) skipped (validation: {result["num_excluded"]} '
              f'left out of the metrics): ' + ', '.join(summary['skipped_images']))
    return 0


if __name__ == '__main__':
    _cli.run_and_exit(main)
