""" Parallelism applied to a model in one place, as the launch asks for it (torchtitan's parallelize step).

`Parallelism(accelerator, expert_parallel_size)` reads the launch: one process, DDP or FSDP2 (Accelerate's, from
`accelerate launch` and its config), each optionally with expert parallelism N on a ('dp', 'ep') DeviceMesh.
`apply` does everything that depends on it, in order: each MoE layer's experts sharded E / N per process (under
FSDP2 each expert bank also its own FSDP unit over 'dp'), the optimizer made (its parameter groups depend on the
model and the config only), timm's `ModelEmaV3` copy (one process, DDP), FSDP2 units from the model's blocks,
`accelerator.prepare`, and under FSDP2 the EMA of each process's shards. The trainer then asks it for `reduce_gradients` (expert shards: the mean
over every process), `clip_grad_norm_` (the whole model's norm, of the gradients that will be applied: unscaled
first under fp16), `as_global` (expert shards as DTensors for the checkpoint) and `full_state_dict` (the whole
model, gathered, for `model/`). Accelerate keeps launching, preparing, autocasting and accumulating.
"""
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
from accelerate.utils import DistributedType
from torch.distributed.fsdp import MixedPrecisionPolicy
from timm.utils import ModelEmaV3

from ..layers import moe_layers, unsharded_state_dict
from .ema import ShardedEma
from .expert_parallel import ExpertShards, routed_expert_names
from .fsdp_wrap import wrap_every_block

__all__ = ['Parallelism', 'Prepared']


@dataclass
class Prepared:
    """What `Parallelism.apply` returns: the prepared model (DDP / FSDP2 / compiled), the module under it, the
    optimizer, the data loaders, and the EMA (None, `ModelEmaV3` or `ShardedEma`)."""
    model: nn.Module
    unwrapped: nn.Module
    optimizer: Any
    loaders: List[Any]
    ema: Optional[Any]


class Parallelism:
    """How this launch spreads a model over its processes."""

    def __init__(self, accelerator, expert_parallel_size: int = 1):
        self.accelerator = accelerator
        self.fsdp = accelerator.distributed_type == DistributedType.FSDP
        self.expert_parallel_size = expert_parallel_size
        self.shards = ExpertShards(expert_parallel_size, accelerator.num_processes, accelerator.device.type) \
            if expert_parallel_size > 1 else None

    def describe(self) -> str:
        """'one process', 'DDP on 2 processes', 'FSDP2 on 8 processes, expert parallelism 4', ..."""
        processes = self.accelerator.num_processes
        kind = f'{"FSDP2" if self.fsdp else "DDP"} on {processes} processes' if processes > 1 else 'one process'
        return kind + (f', expert parallelism {self.expert_parallel_size}' if self.shards else '')

    def experts_per_process(self, model: nn.Module) -> Dict[str, int]:
        """MoE layer -> the routed experts a process holds at rest."""
        from torch.distributed.tensor import DTensor
        weights = {name: layer.experts.fc2.weight for name, layer in moe_layers(model).items()}
        return {name: (w.to_local() if isinstance(w, DTensor) else w).shape[0] for name, w in weights.items()}

    def apply(self, model: nn.Module, make_optimizer: Callable[[nn.Module], Any], loaders=(),
              ema_decay: float = 0.0, ema_warmup: bool = False) -> Prepared:
        accelerator = self.accelerator
        plugin = accelerator.state.fsdp_plugin if self.fsdp else None
        banks_sharded = False
        if self.shards is not None:
            self.shards.shard(model)  # this process's experts, before the EMA copies the model
            if self.fsdp:  # and under FSDP2 each bank its own unit over 'dp', before the optimizer sees them
                banks_sharded = self.shards.shard_over_dp(
                    model, mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
                    reshard_after_forward=plugin.reshard_after_forward)
        optimizer = make_optimizer(model)
        # the EMA copies the model before `prepare` wraps its forward (mixed precision) or the module (DDP)
        ema = ModelEmaV3(model, decay=ema_decay, use_warmup=ema_warmup, device=accelerator.device) \
            if ema_decay and not self.fsdp else None
        if self.fsdp:
            wrap_every_block(model, plugin)
            if self.shards is not None and not banks_sharded:
                plugin.ignored_modules = self.shards.expert_banks(model)  # they stay this process's E / N experts
        model, optimizer, *loaders = accelerator.prepare(model, optimizer, *loaders)
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        if ema_decay and self.fsdp:
            ema = ShardedEma(unwrapped, decay=ema_decay, use_warmup=ema_warmup)
        return Prepared(model, unwrapped, optimizer, loaders, ema)

    # ------------------------------------------------------------------------------------------- a step
    def reduce_gradients(self, unwrapped: nn.Module) -> None:
        """After the backward of an optimizer step: the expert shards' gradients averaged over every process."""
        if self.shards is not None:
            self.shards.reduce_gradients(unwrapped)

    def clip_grad_norm_(self, model: nn.Module, unwrapped: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip by the whole model's gradient norm, computed on the gradients the update will apply."""
        if self.shards is None:
            return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)  # unscales first itself
        self.accelerator.unscale_gradients()  # fp16: the loss scale out first (a no-op otherwise)
        return self.shards.clip_grad_norm_(unwrapped, max_norm)

    # ------------------------------------------------------------------------------------- checkpoints
    def expert_names(self, model: nn.Module) -> List[str]:
        """The routed experts' parameter names: optimizer groups of their own on every launch."""
        return routed_expert_names(model)

    def as_global(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor of parameter `name` as it is saved: expert shards as DTensors of the whole bank."""
        if self.shards is not None and name in self.shards.names:
            return self.shards.as_global(tensor)
        return tensor

    def full_state_dict(self, model: nn.Module, unwrapped: nn.Module, ema: Optional[Any] = None
                        ) -> Dict[str, torch.Tensor]:
        """The whole weights (every expert) for `model/` or, with `ema`, `model_ema/`: gathered from every process (a
        collective: every process calls it; the main one gets them all)."""
        if isinstance(ema, ModelEmaV3):  # a whole copy of the model (expert-parallel: of its shards)
            state = ema.module.state_dict()
            return unsharded_state_dict(ema.module, state) if self.shards is not None else state
        with ema.weights_in(unwrapped) if ema is not None else nullcontext():  # ShardedEma: its weights, meanwhile
            state = self.accelerator.get_state_dict(model)  # FSDP2: gathered from the shards
            return unsharded_state_dict(unwrapped, state) if self.shards is not None else state
