""" A dry run before a cluster launch: the launch a config resolves to, and whether it fits the GPUs.

    python train_scripts/train.py --config configs/finetune_eva02.yaml --dry-run \
        --accelerate-config configs/accelerate/ddp.yaml [--num-processes 8] [--gpu-memory-gb 40]

Builds the model on the meta device (no weights, no data, no GPU), resolves the launch (DDP or FSDP2, processes,
mixed precision from the accelerate config unless the training config sets it; global batch; the lr after
`lr_base_size` scaling) and estimates the memory of the fullest process with the memory model
(`vit_moe.planning.memory`: parameters, gradients, AdamW state, transient buffers, the EMA, and the activations
with and without gradient checkpointing). With `gpu_memory_gb` it says whether the run fits; the estimate leaves out
the CUDA context, the allocator's caching and the gradients of the activations, so `MARGIN` of the card is kept
free.
"""
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from .config import ConfigError, TrainConfig, read_yaml, scaled_lr
from ..planning.memory import GB, activation_memory, fsdp_shard_numel, parameter_memory

__all__ = ['Launch', 'MemoryPlan', 'resolve_launch', 'plan_memory', 'dry_run', 'MARGIN']

MARGIN = 0.9  # the share of a card the estimate may use (CUDA context, allocator caching, activation gradients)
_PRECISION = {'no': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


@dataclass(frozen=True)
class Launch:
    """How the training config runs under a launch."""
    strategy: str  # 'single', 'ddp' or 'fsdp2'
    num_processes: int
    mixed_precision: str
    global_batch: int
    lr: float


def resolve_launch(cfg: TrainConfig, accelerate_config: Optional[str] = None,
                   num_processes: Optional[int] = None) -> Launch:
    """The launch of `cfg` under an accelerate config file (its distributed_type, processes x machines and mixed
    precision; `cfg.mixed_precision` wins, as in the trainer) and/or `num_processes`."""
    launch: Dict[str, Any] = {}
    if accelerate_config:
        launch = read_yaml(accelerate_config, 'accelerate config', ConfigError) or {}
        if not isinstance(launch, dict):
            raise ConfigError(f'accelerate config {accelerate_config!r} must hold a mapping')
    processes = num_processes or int(launch.get('num_processes', 1)) * int(launch.get('num_machines', 1))
    if processes < 1:
        raise ConfigError(f'--num-processes {processes} is not valid; expected an integer >= 1')
    kind = launch.get('distributed_type', 'MULTI_GPU')
    strategy = 'fsdp2' if kind == 'FSDP' else ('ddp' if processes > 1 else 'single')
    precision = cfg.mixed_precision or launch.get('mixed_precision') or 'no'
    precision = 'no' if precision is False else str(precision)
    global_batch = cfg.batch_size * processes * cfg.grad_accum_steps
    return Launch(strategy, processes, precision, global_batch, scaled_lr(cfg, global_batch))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of the fullest process."""
    params: int
    grads: int
    optimizer: int
    transient: int
    ema: int
    activations: int  # with the config's grad_checkpointing
    activations_other: int  # with the other setting (for the advice)
    num_params: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.transient + self.ema + self.activations


def _meta_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    import timm
    kwargs = {k: v for k, v in cfg.model_kwargs.items() if k != 'num_classes'}
    with torch.device('meta'):
        return timm.create_model(cfg.model, num_classes=num_classes, **kwargs)


def plan_memory(cfg: TrainConfig, launch: Launch, num_classes: int = 1000) -> MemoryPlan:
    """The memory of the fullest process of `launch`: the memory model on `cfg`'s model built on the meta device."""
    model = _meta_model(cfg, num_classes)
    single = launch.strategy == 'single'  # like DDP without its gradient buckets
    state = parameter_memory(model, 'ddp' if single else launch.strategy, launch.num_processes,
                             launch.mixed_precision, gradient_as_bucket_view=single)
    ema = 0
    if cfg.ema_decay:  # fp32 copies of the state: whole (DDP, one process) or this process's shards (FSDP2)
        tensors = list(model.parameters()) + list(model.buffers())
        ema = 4 * sum(fsdp_shard_numel(t.shape, launch.num_processes) if launch.strategy == 'fsdp2' else t.numel()
                      for t in tensors)
    dtype = _PRECISION[launch.mixed_precision]
    acts = {ckpt: activation_memory(model, cfg.batch_size, ckpt, dtype).total
            for ckpt in (cfg.grad_checkpointing, not cfg.grad_checkpointing)}
    return MemoryPlan(state.params, state.grads, state.optimizer, state.transient, ema, acts[cfg.grad_checkpointing],
                      acts[not cfg.grad_checkpointing], state.num_params)


def _count_classes(cfg: TrainConfig) -> int:
    train = Path(cfg.data_dir or '') / cfg.train_split
    if cfg.data_dir and train.is_dir():
        classes = [p for p in train.iterdir() if p.is_dir()]
        if classes:
            return len(classes)
    return int(cfg.model_kwargs.get('num_classes', 1000))


def dry_run(cfg: TrainConfig, accelerate_config: Optional[str] = None, num_processes: Optional[int] = None,
            gpu_memory_gb: Optional[float] = None) -> Dict[str, Any]:
    """{'lines': the report, 'fits': bool or None (no gpu_memory_gb), 'problem': one line when it does not fit}."""
    launch = resolve_launch(cfg, accelerate_config, num_processes)
    plan = plan_memory(cfg, launch, _count_classes(cfg))
    gb = lambda n: f'{n / GB:.1f} GB'  # noqa: E731
    ckpt = 'with' if cfg.grad_checkpointing else 'without'
    other = 'with' if not cfg.grad_checkpointing else 'without'
    lines = [
        f'model {cfg.model}: {plan.num_params / 1e6:.1f} M parameters',
        f'launch: {launch.strategy}, {launch.num_processes} process(es), mixed precision {launch.mixed_precision}, '
        f'global batch {launch.global_batch} ({cfg.batch_size} per process x {launch.num_processes} x '
        f'{cfg.grad_accum_steps} accumulation), lr {launch.lr:.3g}'
        + (f' ({cfg.lr:g} at a global batch of {cfg.lr_base_size}, {cfg.lr_base_scale})' if cfg.lr_base_size else ''),
        f'memory of the fullest process: parameters {gb(plan.params)}, gradients {gb(plan.grads)}, AdamW '
        f'{gb(plan.optimizer)}, transient {gb(plan.transient)}, EMA {gb(plan.ema)}, activations {gb(plan.activations)} '
        f'({ckpt} gradient checkpointing; {other}: {gb(plan.activations_other)}): {gb(plan.total)}',
    ]
    result = dict(lines=lines, fits=None, problem='', launch=launch, plan=plan)
    if gpu_memory_gb is not None:
        budget = gpu_memory_gb * GB * MARGIN
        result['fits'] = plan.total <= budget
        verdict = 'fits' if result['fits'] else 'does NOT fit'
        lines.append(f'{verdict} a {gpu_memory_gb:g} GB GPU ({MARGIN:.0%} usable: {gb(budget)})')
        if not result['fits']:
            result['problem'] = _advice(cfg, launch, plan, gpu_memory_gb, budget)
    return result


def _advice(cfg: TrainConfig, launch: Launch, plan: MemoryPlan, gpu_memory_gb: float, budget: float) -> str:
    """One line naming what does not fit and what would."""
    parts = [f'{name} {value / GB:.1f} GB' for name, value in (
        ('model state', plan.params + plan.grads + plan.optimizer + plan.transient), ('EMA', plan.ema),
        ('activations', plan.activations)) if value]
    hints: List[str] = []
    if not cfg.grad_checkpointing and plan.total - plan.activations + plan.activations_other <= budget:
        hints.append(f'grad_checkpointing: true ({(plan.activations_other) / GB:.1f} GB of activations)')
    per_image = plan.activations / max(cfg.batch_size, 1)
    room = budget - (plan.total - plan.activations)
    if room > 0 and per_image > 0:
        hints.append(f'batch_size <= {max(1, math.floor(room / per_image))} with grad_accum_steps to keep the global '
                     f'batch')
    if launch.strategy != 'fsdp2':
        hints.append('FSDP2 (configs/accelerate/fsdp2.yaml) to shard the model state')
    return (f'{cfg.model} at batch_size {cfg.batch_size} needs {plan.total / GB:.1f} GB per process ('
            f'{", ".join(parts)}) of a {gpu_memory_gb:g} GB GPU ({budget / GB:.1f} GB usable); try '
            + ('; '.join(hints) if hints else 'more processes'))
