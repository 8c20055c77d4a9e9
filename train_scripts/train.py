"""Train a timm / vit_moe model on ImageNet-style folders with Hugging Face Accelerate.

    python train_scripts/train.py --config configs/vit_b16_moe_imagenet.yaml [--any-key value ...]
    accelerate launch [--config_file configs/accelerate/X.yaml] train_scripts/train.py --config ...

Every config key (see vit_moe/training/config.py and the commented configs/) can be overridden as
--key value. Writes OUTPUT_DIR/{config.yaml, log.jsonl, checkpoints/checkpoint_step_N/, model/, model_ema/}. A run stopped
by SIGTERM or Ctrl-C saves a checkpoint and exits with 128 + the signal number; continue it in place with
--resume latest (or launch with --resume auto every time on a preemptible cluster).

A bad key, value, path or image exits with 2 and one line on stderr; --debug (or VIT_MOE_DEBUG=1) shows the
traceback instead. --verbose shows other libraries' INFO logs (Accelerate's checkpointing, ...) and warnings.

Before a cluster launch, --dry-run builds the model on the meta device, resolves the launch (processes, DDP / FSDP2,
expert parallelism, global batch, lr) and estimates the memory per process; with --gpu-memory-gb it exits 0 if that
fits, 2 (one line naming what does not) if not:
    python train_scripts/train.py --config ... --dry-run --accelerate-config configs/accelerate/ddp.yaml \
        [--num-processes 8] [--gpu-memory-gb 40]
"""
import argparse
import sys

from vit_moe import _cli


def _dry_run_flags(argv):
    """(the dry-run options, the other arguments)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('--dry-run', action='store_true')
    parser.add_argument('--accelerate-config', default=None)
    parser.add_argument('--num-processes', type=int, default=None)
    parser.add_argument('--gpu-memory-gb', type=float, default=None)
    flags, rest = parser.parse_known_args(argv)
    if not flags.dry_run and (flags.accelerate_config or flags.num_processes is not None
                              or flags.gpu_memory_gb is not None):
        parser.error('--accelerate-config, --num-processes and --gpu-memory-gb go with --dry-run')
    return flags, rest


def main(argv=None) -> int:
    argv, _, verbose = _cli.pop_common_flags(argv)
    _cli.setup_logging(verbose)
    from vit_moe.training import parse_train_args, train
    with _cli.raise_usage_errors():
        flags, argv = _dry_run_flags(argv)
        cfg = parse_train_args(argv, description=__doc__)
    if flags.dry_run:
        from vit_moe.training.dry_run import dry_run
        report = dry_run(cfg, flags.accelerate_config, flags.num_processes, flags.gpu_memory_gb)
        print('\n'.join(report['lines']))
        if report['fits'] is False:
            raise _cli.UsageError(report['problem'])
        return 0
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
