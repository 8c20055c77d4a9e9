"""How long the trainer's checkpoint takes to write and to read back here, to size the early-warning signal's lead
(README "Saves that beat the kill") and the cost of a resume.

    .venv/bin/python benchmarks/checkpoint_save_speed.py [--model vit_s16_moe_upcycled] [--model-kwargs '{...}']
        [--rounds 3] [--output-dir /tmp/ckpt_speed]
    ACCELERATE_USE_CPU=1 .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        benchmarks/checkpoint_save_speed.py [--expert-parallel-size 2]     # DDP (+ EP) on 2 processes
    ... tests/fsdp_on_cpu.py benchmarks/checkpoint_save_speed.py         # FSDP2 (Accelerate's, on CPU processes)

Builds the model through the trainer's parallelize step (`vit_moe.training.parallelize`), with AdamW state (after
one step) and an EMA, then writes the trainer's checkpoint (`write_checkpoint` + `save_training_state`: the state by
name through torch.distributed.checkpoint into a hidden folder, fsync, rename) and reads it back
(`load_training_state`) `--rounds` times. Prints the bytes, the seconds of each save and load and the rates (main
process). Every process writes only its own pieces (replicated tensors once), in parallel.
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
    parser.add_argument('--expert-parallel-size', type=int, default=1)
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--output-dir', default=None, help='where to write (default: a temporary folder)')
    args = parser.parse_args(argv)
    from accelerate import Accelerator
    from vit_moe.training.checkpoints import TrainState, write_checkpoint
    from vit_moe.training.optim import create_optimizer
    from vit_moe.training.parallelize import Parallelism
    from vit_moe.training.training_state import load_training_state, save_training_state

    accelerator = Accelerator()
    parallel = Parallelism(accelerator, args.expert_parallel_size)
    model = timm.create_model(args.model, num_classes=10, **args.model_kwargs)
    params = sum(p.numel() for p in model.parameters())
    prepared = parallel.apply(model, lambda m: create_optimizer(m, 'adamw', 1e-4, 0.05,
                                                                 apart=parallel.expert_names(m)), ema_decay=0.999)
    prepared.model(torch.randn(2, 3, 224, 224)).sum().backward()
    prepared.optimizer.step()  # AdamW's two moments exist from here on
    root = Path(args.output_dir or tempfile.mkdtemp(prefix='ckpt_speed_'))
    if accelerator.num_processes > 1:
        root = Path(accelerator.gather_for_metrics([str(root)], use_gather_object=True)[0])  # the main one's
    state = dict(unwrapped=prepared.unwrapped, optimizer=prepared.optimizer.optimizer, ema=prepared.ema,
                 parallel=parallel)
    saves, loads = [], []
    for step in range(1, args.rounds + 1):
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        folder = write_checkpoint(accelerator, root, step, 'benchmark: true\n', save=lambda f: save_training_state(
            f, TrainState(step=step), is_main=accelerator.is_main_process, **state))
        saves.append(time.perf_counter() - start)
        start = time.perf_counter()
        load_training_state(folder, **state)
        accelerator.wait_for_everyone()
        loads.append(time.perf_counter() - start)
        size = sum(f.stat().st_size for f in folder.rglob('*') if f.is_file())
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(folder)
    if accelerator.is_main_process:
        save, load = statistics.median(saves), statistics.median(loads)
        print(f'{args.model} {args.model_kwargs}, {parallel.describe()}: {params / 1e6:.1f} M parameters; checkpoint '
              f'{size / 1e9:.2f} GB (weights, AdamW, EMA)')
        print(f'save: {", ".join(f"{s:.2f} s" for s in saves)}; median {save:.2f} s = {size / 1e9 / save:.2f} GB/s')
        print(f'load: {", ".join(f"{s:.2f} s" for s in loads)}; median {load:.2f} s = {size / 1e9 / load:.2f} GB/s')
        if not args.output_dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
    main()
