"""How long a checkpoint takes to write here, to size the early-warning signal's lead (README "Saves that beat the
kill").

    .venv/bin/python benchmarks/checkpoint_save_speed.py [--model vit_s16_moe_upcycled] [--model-kwargs '{...}']
        [--rounds 3] [--output-dir /tmp/ckpt_speed]

Builds the model with AdamW state (after one step) and an EMA (timm ModelEmaV3), then writes the trainer's checkpoint
(`vit_moe.training.checkpoints.write_checkpoint`: Accelerate's save_state into a hidden folder, fsync, rename) `--rounds`
times, one process. Prints the bytes, the seconds of each round and the write rate. Under FSDP2 every process writes
its own shard in parallel (torch.distributed.checkpoint), so a node writes its processes' share of the bytes.
"""
import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import timm
import torch

import vit_moe  # noqa: F401  registers the models


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='vit_s16_moe_upcycled')
    parser.add_argument('--model-kwargs', type=json.loads, default={'num_experts': 8})
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--output-dir', default=None, help='where to write (default: a temporary folder)')
    args = parser.parse_args(argv)
    from accelerate import Accelerator
    from timm.utils import ModelEmaV3
    from vit_moe.training.checkpoints import write_checkpoint
    from vit_moe.training.optim import create_optimizer

    accelerator = Accelerator(cpu=True)
    model = timm.create_model(args.model, num_classes=10, **args.model_kwargs)
    optimizer = create_optimizer(model, 'adamw', 1e-4, 0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    model(torch.randn(2, 3, 224, 224)).sum().backward()
    optimizer.step()  # AdamW's two moments exist from here on
    accelerator.register_for_checkpointing(ModelEmaV3(accelerator.unwrap_model(model), decay=0.999))
    root = Path(args.output_dir or tempfile.mkdtemp(prefix='ckpt_speed_'))
    seconds = []
    for step in range(1, args.rounds + 1):
        start = time.perf_counter()
        folder = write_checkpoint(accelerator, root, step, 'benchmark: true\n')
        seconds.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in folder.rglob('*') if f.is_file())
        shutil.rmtree(folder)
    params = sum(p.numel() for p in model.parameters())
    median = statistics.median(seconds)
    print(f'{args.model} {args.model_kwargs}: {params / 1e6:.1f} M parameters; checkpoint {size / 1e9:.2f} GB '
          f'(weights, AdamW, EMA, RNG states)')
    print(f'write: {", ".join(f"{s:.2f} s" for s in seconds)}; median {median:.2f} s = {size / 1e9 / median:.2f} GB/s '
          f'into {root}')
    if not args.output_dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
