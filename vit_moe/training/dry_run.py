""" A dry run before a cluster launch: the launch a config resolves to, and whether it fits the GPUs.

    python train_scripts/train.py --config configs/finetune_eva02.yaml --dry-run \
        --accelerate-config configs/accelerate/ddp.yaml [--num-processes 8] [--gpu-memory-gb 40]

Builds the model on the meta device (no weights, no data, no GPU), resolves the launch (DDP or FSDP2, processes,
mixed precision from the accelerate config unless the training config sets it; global batch; the lr after
`lr_base_size` scaling) and estimates the memory of the fullest process with the memory model
(`vit_moe.planning.memory`: parameters, gradients, AdamW state, transient buffers, the EMA, and the activations
with and without gradient checkpointing). With `expert_parallel_size` N a process holds E / N routed experts of each
MoE layer (their parameters, gradients, AdamW state and EMA), or under FSDP2 its shards of them over the W / N
data-parallel replicas, E / W, where W / N divides E / N (each bank an FSDP unit over 'dp', as the trainer makes it);
N must divide the processes and every MoE layer's experts, as in the real launch. With `gpu_memory_gb` it says
whether the run fits; the estimate leaves out the CUDA context, the allocator's caching and the gradients of the
activations, so `MARGIN` of the card is kept free.
Without an accelerate config or `num_processes` it plans one process (and says so).
"""
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from .config import ConfigError, TrainConfig, read_yaml, scaled_lr
from ..layers import moe_layers
from ..planning.memory import (
    GB, ParameterMemory, activation_memories, expert_shard_numel, experts_sharded_over_dp, fsdp_shard_numel,
    parameter_memory, routed_expert_parameters)

__all__ = ['Launch', 'MemoryPlan', 'resolve_launch', 'plan_memory', 'dry_run', 'expert_parallel_sizes', 'MARGIN']

MARGIN = 0.9  # the share of a card the estimate may use (CUDA context, allocator caching, activation gradients)
_PRECISION = {'no': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
ONE_PROCESS = ('one process planned (no --accelerate-config or --num-processes); a cluster launch needs '
               '--accelerate-config (configs/accelerate/) or --num-processes')


@dataclass(frozen=True)
class Launch:
    """How the training config runs under a launch."""
    strategy: str  # 'single', 'ddp' or 'fsdp2'
    num_processes: int
    mixed_precision: str
    global_batch: int
    lr: float
    expert_parallel_size: int = 1


def expert_parallel_sizes(num_processes: int, num_experts: Iterable[int] = ()) -> List[int]:
    """The expert-parallel sizes a launch accepts: the divisors of its processes and of every MoE layer's experts."""
    common = math.gcd(num_processes, *num_experts)
    return [n for n in range(1, common + 1) if common % n == 0]


def _num_processes(launch: Dict[str, Any], accelerate_config: Optional[str], num_processes: Optional[int]) -> int:
    """`num_processes` if given, else the accelerate config's processes x machines (1 without one)."""
    if num_processes is not None:
        if num_processes < 1:
            raise ConfigError(f'--num-processes {num_processes} is not valid; expected an integer >= 1')
        return num_processes
    processes = int(launch.get('num_processes', 1)) * int(launch.get('num_machines', 1))
    if processes < 1:
        raise ConfigError(f'accelerate config {accelerate_config!r}: num_processes x num_machines = {processes} is not '
                          f'valid; expected >= 1')
    return processes


def resolve_launch(cfg: TrainConfig, accelerate_config: Optional[str] = None,
                   num_processes: Optional[int] = None) -> Launch:
    """The launch of `cfg` under an accelerate config file (its distributed_type, processes x machines and mixed
    precision; `cfg.mixed_precision` wins, as in the trainer) and/or `num_processes`; one line when
    `cfg.expert_parallel_size` does not divide its processes (as `expert_parallel_mesh` refuses it)."""
    launch: Dict[str, Any] = {}
    if accelerate_config:
        launch = read_yaml(accelerate_config, 'accelerate config', ConfigError) or {}
        if not isinstance(launch, dict):
            raise ConfigError(f'accelerate config {accelerate_config!r} must hold a mapping')
    processes = _num_processes(launch, accelerate_config, num_processes)
    ep = cfg.expert_parallel_size
    if processes % ep:
        alone = f'; {ONE_PROCESS}' if not accelerate_config and num_processes is None else ''
        raise ConfigError(f'expert_parallel_size={ep} does not divide the {processes} process(es) of the launch; '
                          f'expected a divisor of {processes}: {_listed(expert_parallel_sizes(processes))}{alone}')
    kind = launch.get('distributed_type', 'MULTI_GPU')
    strategy = 'fsdp2' if kind == 'FSDP' else ('ddp' if processes > 1 else 'single')
    precision = cfg.mixed_precision or launch.get('mixed_precision') or 'no'
    precision = 'no' if precision is False else str(precision)
    global_batch = cfg.batch_size * processes * cfg.grad_accum_steps
    return Launch(strategy, processes, precision, global_batch, scaled_lr(cfg, global_batch), ep)


def _listed(values: Iterable[int]) -> str:
    return ', '.join(map(str, values))


def _accepted_sizes(model: torch.nn.Module, launch: Launch) -> List[int]:
    """The expert-parallel sizes `launch` accepts for `model` (none without an MoE layer)."""
    layers = moe_layers(model)
    return expert_parallel_sizes(launch.num_processes, [m.num_experts for m in layers.values()]) if layers else []


def _check_experts(model: torch.nn.Module, launch: Launch) -> None:
    """One line when the launch's expert-parallel size does not divide every MoE layer's experts (as
    `vit_moe.layers.shard_experts` refuses it) or the model has none."""
    ep = launch.expert_parallel_size
    layers = moe_layers(model) if ep > 1 else {}
    if ep > 1 and not layers:
        raise ConfigError(f'expert_parallel_size={ep}: the model has no MoE layer to spread over processes')
    for name, layer in layers.items():
        if layer.num_experts % ep:
            raise ConfigError(f'expert_parallel_size={ep} does not divide num_experts={layer.num_experts} of {name}; '
                              f'expected a divisor of the experts and of the {launch.num_processes} process(es): '
                              f'{_listed(_accepted_sizes(model, launch))}')


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
    expert_params: int = 0  # the routed experts' (whole model); a process holds 1 / expert_parallel_size of them
    # (FSDP2, where the replicas divide its experts: 1 / the processes)

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.transient + self.ema + self.activations


def _meta_model(cfg: TrainConfig, num_classes: int) -> torch.nn.Module:
    import timm
    kwargs = {k: v for k, v in cfg.model_kwargs.items() if k != 'num_classes'}
    with torch.device('meta'):
        return timm.create_model(cfg.model, num_classes=num_classes, **kwargs)


def _model_state(model: torch.nn.Module, cfg: TrainConfig, launch: Launch) -> Tuple[ParameterMemory, int]:
    """(parameters, gradients, AdamW and transient buffers; the EMA's bytes) of the fullest process of `launch`."""
    single = launch.strategy == 'single'  # like DDP without its gradient buckets
    state = parameter_memory(model, 'ddp' if single else launch.strategy, launch.num_processes,
                             launch.mixed_precision, gradient_as_bucket_view=single,
                             expert_parallel_size=launch.expert_parallel_size)
    return state, (_ema_bytes(model, launch) if cfg.ema_decay else 0)


def _ema_bytes(model: torch.nn.Module, launch: Launch) -> int:
    """fp32 copies of the state a process holds: whole (DDP, one process) or its shards (FSDP2); of the routed
    experts under expert parallelism N, what the process holds of them: E / N whole (DDP; FSDP2 where the W / N
    replicas do not divide E / N), or its FSDP2 shards of them over the replicas, E / W (the sharded EMA)."""
    ep = launch.expert_parallel_size
    experts = {id(p) for p in routed_expert_parameters(model)} if ep > 1 else set()
    over_dp = bool(experts) and launch.strategy == 'fsdp2' and experts_sharded_over_dp(model, launch.num_processes, ep)

    def held(t: torch.Tensor) -> int:
        if id(t) in experts:
            return expert_shard_numel(t.shape, launch.num_processes, ep, over_dp)
        return fsdp_shard_numel(t.shape, launch.num_processes) if launch.strategy == 'fsdp2' else t.numel()
    return 4 * sum(held(t) for t in [*model.parameters(), *model.buffers()])


def plan_memory(cfg: TrainConfig, launch: Launch, num_classes: int = 1000,
                model: Optional[torch.nn.Module] = None) -> MemoryPlan:
    """The memory of the fullest process of `launch`: the memory model on `cfg`'s model built on the meta device
    (or `model`, on it)."""
    model = _meta_model(cfg, num_classes) if model is None else model
    _check_experts(model, launch)
    state, ema = _model_state(model, cfg, launch)
    dtype = _PRECISION[launch.mixed_precision]
    # both settings (the other one for the advice) from the same passes without checkpointing
    acts = {ckpt: memory.total for ckpt, memory in activation_memories(model, cfg.batch_size, dtype).items()}
    ckpt = bool(cfg.grad_checkpointing)
    return MemoryPlan(state.params, state.grads, state.optimizer, state.transient, ema, acts[ckpt], acts[not ckpt],
                      state.num_params,
                      sum(p.numel() for p in routed_expert_parameters(model)))


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
    model = _meta_model(cfg, _count_classes(cfg))
    plan = plan_memory(cfg, launch, model=model)
    gb = lambda n: f'{n / GB:.1f} GB'  # noqa: E731
    ckpt = 'with' if cfg.grad_checkpointing else 'without'
    other = 'with' if not cfg.grad_checkpointing else 'without'
    lines = [
        f'model {cfg.model}: {plan.num_params / 1e6:.1f} M parameters' + _experts_note(plan, launch, model),
        f'launch: {launch.strategy}, {launch.num_processes} process(es), mixed precision {launch.mixed_precision}, '
        f'global batch {launch.global_batch} ({cfg.batch_size} per process x {launch.num_processes} x '
        f'{cfg.grad_accum_steps} accumulation), lr {launch.lr:.3g}'
        + (f' ({cfg.lr:g} at a global batch of {cfg.lr_base_size}, {cfg.lr_base_scale})' if cfg.lr_base_size else ''),
        f'memory of the fullest process: parameters {gb(plan.params)}, gradients {gb(plan.grads)}, AdamW '
        f'{gb(plan.optimizer)}, transient {gb(plan.transient)}, EMA {gb(plan.ema)}, activations {gb(plan.activations)} '
        f'({ckpt} gradient checkpointing; {other}: {gb(plan.activations_other)}): {gb(plan.total)}',
    ]
    if not accelerate_config and num_processes is None:
        lines.append(f'note: {ONE_PROCESS}')
    result = dict(lines=lines, fits=None, problem='', launch=launch, plan=plan)
    if gpu_memory_gb is not None:
        budget = gpu_memory_gb * GB * MARGIN
        result['fits'] = plan.total <= budget
        verdict = 'fits' if result['fits'] else 'does NOT fit'
        lines.append(f'{verdict} a {gpu_memory_gb:g} GB GPU ({MARGIN:.0%} usable: {gb(budget)})')
        if not result['fits']:
            result['problem'] = _advice(cfg, launch, plan, gpu_memory_gb, budget, model)
    return result


def _expert_share(model: torch.nn.Module, launch: Launch) -> Tuple[str, str]:
    """The share of the routed experts a process holds at rest under expert parallelism N, and how: ('1/N', ''), or
    under FSDP2 where each bank is sharded again over the W / N data-parallel replicas ('1/W', ', each bank ...')."""
    ep, processes = launch.expert_parallel_size, launch.num_processes
    if launch.strategy == 'fsdp2' and processes > ep and experts_sharded_over_dp(model, processes, ep):
        return f'1/{processes}', f', each bank sharded again by FSDP2 over {processes // ep} data-parallel replicas'
    return f'1/{ep}', ''


def _experts_note(plan: MemoryPlan, launch: Launch, model: torch.nn.Module) -> str:
    """The routed experts' share of the parameters and of each process."""
    if not plan.expert_params:
        return ''
    ep = launch.expert_parallel_size
    share, how = _expert_share(model, launch)
    spread = f', {share} of them on each process: expert_parallel_size {ep}{how}' if ep > 1 else ''
    return f' ({plan.expert_params / 1e6:.1f} M in routed experts{spread})'


def _larger_expert_parallelism(model: torch.nn.Module, cfg: TrainConfig, launch: Launch, plan: MemoryPlan,
                               budget: float) -> str:
    """The hint for the smallest larger expert-parallel size the launch accepts with which the run fits ('' if none)."""
    for ep in (n for n in _accepted_sizes(model, launch) if n > launch.expert_parallel_size):
        larger = replace(launch, expert_parallel_size=ep)
        state, ema = _model_state(model, cfg, larger)
        if state.total + ema + plan.activations <= budget:
            share, how = _expert_share(model, larger)
            return (f'expert_parallel_size: {ep} ({share} of the routed experts on each process{how}: model state '
                    f'{state.total / GB:.1f} GB' + (f', EMA {ema / GB:.1f} GB)' if ema else ')'))
    return ''


def _advice(cfg: TrainConfig, launch: Launch, plan: MemoryPlan, gpu_memory_gb: float, budget: float,
            model: torch.nn.Module) -> str:
    """One line naming what does not fit and what would."""
    parts = [f'{name} {value / GB:.1f} GB' for name, value in (
        ('model state', plan.params + plan.grads + plan.optimizer + plan.transient), ('EMA', plan.ema),
        ('activations', plan.activations)) if value]
    hints: List[str] = []
    if not cfg.grad_checkpointing and plan.total - plan.activations + plan.activations_other <= budget:
        hints.append(f'grad_checkpointing: true ({(plan.activations_other) / GB:.1f} GB of activations)')
    larger = _larger_expert_parallelism(model, cfg, launch, plan, budget)
    if larger:
        hints.append(larger)
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
