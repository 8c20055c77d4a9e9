""" EMA of the weights under FSDP2: timm's ModelEmaV3 arithmetic on the same shards the parameters have.

Under DDP or one process the trainer keeps timm's `ModelEmaV3` of the model as timm does (a full copy). Under FSDP2
a full copy on every process would undo the sharding, so `ShardedEma` keeps the EMA of each process's own shards:
`ModelEmaV3` built on a module that holds the detached (DTensor) shards of `model.state_dict()`, so the decay, warm-up
and update are timm's own code, run on DTensors (each process updates its shard). It is checkpointed by name with
the rest of the training state (`vit_moe.training.training_state`: every process writes its shard; resumable on any
launch), and the EMA weights are evaluated and gathered for `model_ema/` by copying them into the model's shards for that time
(`ShardedEma.weights_in(model)`), then restoring the trained weights.
"""
from contextlib import contextmanager
from typing import Dict, List

import torch
import torch.nn as nn
from timm.utils import ModelEmaV3

__all__ = ['ShardedEma']


class _Shards(nn.Module):
    """The state of `model` (`model.state_dict()`: parameters and persistent buffers, in that order), detached: under
    FSDP2 the DTensor shards this process holds. Its `state_dict()` lines up value by value with the model's."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.names: List[str] = []
        for i, (name, value) in enumerate(model.state_dict().items()):  # parameters: ModelEmaV3 looks for one
            self.register_parameter(f't{i}', nn.Parameter(value.detach().clone(), requires_grad=False))
            self.names.append(name)


class ShardedEma:
    """timm's `ModelEmaV3` (same decay, warm-up and update) of an FSDP2 model's shards. Call `update(model, step)`
    after each optimizer step, as with `ModelEmaV3`."""

    def __init__(self, model: nn.Module, decay: float, use_warmup: bool = False):
        from torch.distributed.tensor import DTensor
        shards = _Shards(model)
        kinds = {isinstance(t, DTensor) for t in shards.parameters()}  # expert banks left out of FSDP2: plain tensors
        self.ema = ModelEmaV3(shards, decay=decay, use_warmup=use_warmup, foreach=len(kinds) == 1)

    def update(self, model: nn.Module, step: int) -> None:
        self.ema.update(model, step=step)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """name in the model -> EMA shard (DTensor)."""
        shards = self.ema.module
        return dict(zip(shards.names, shards.state_dict().values()))

    @torch.no_grad()
    def copy_into(self, model: nn.Module) -> None:
        for value, ema in zip(model.state_dict().values(), self.ema.module.state_dict().values()):
            value.copy_(ema)

    @contextmanager
    def weights_in(self, model: nn.Module):
        """`model` holds the EMA weights inside the block, its own again after it (each process: its shards)."""
        with torch.no_grad():
            saved = [v.detach().clone() for v in model.state_dict().values()]
        self.copy_into(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for value, own in zip(model.state_dict().values(), saved):
                    value.copy_(own)
