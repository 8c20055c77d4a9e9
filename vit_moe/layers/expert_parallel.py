""" Expert parallelism with static all-to-alls: each process holds E / N experts of every MoE layer.

Routing groups are images, so every router fixes the slots of each (image, expert) pair from the shapes alone
(expert choice: the capacity; token choice: the capacity, empty slots included; Soft MoE: slots_per_expert). A
process routes its own images, then one `all_to_all_single` of a size known from the shapes sends each expert's slots
to the process that holds the expert, the local experts run as one batched matmul over every process's slots, and a
second all-to-all sends the outputs back. No count exchange, no host synchronisation, no data-dependent shape:
`torch.compile(fullgraph=True)` captures the layer. Autograd flows through both exchanges (functional collectives).

    [E, S, D] this process's slots, expert-major      (S = its images x capacity)
      -> [N, E/N, S, D]: chunk r holds the slots for rank r's experts   -- all-to-all -->
      [N, E/N, S, D]: chunk s holds rank s's slots for my experts -> [E/N, N*S, D] -> local experts -> back the same way

`shard_experts(model, ...)` keeps each process's E / N experts in every MoE layer (the bank's stacked tensors sliced
along the expert axis, under their usual names) and gives the layer an `ExpertParallel` exchange. Every process of
an expert-parallel group must run the layer with the same number of images (the trainer's loaders give every process
the same batch size; evaluation pads the last batch).
"""
from typing import Dict, List

import torch
import torch.nn as nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from .moe_mlp import moe_layers

__all__ = ['ExpertParallel', 'shard_experts', 'expert_parameter_names', 'gather_experts', 'unsharded_state_dict']


class ExpertParallel:
    """The exchange of one MoE layer in an expert-parallel group of `size` processes (this one: `rank`)."""

    def __init__(self, num_experts: int, group, size: int, rank: int):
        self.num_experts, self.group, self.size, self.rank = num_experts, group, size, rank

    def __deepcopy__(self, memo) -> 'ExpertParallel':
        return self  # a copy of the model (the EMA) exchanges with the same group

    def local_experts(self) -> range:
        """Indices (in the layer) of the experts this process holds."""
        per = self.num_experts // self.size
        return range(self.rank * per, (self.rank + 1) * per)

    def __call__(self, x: torch.Tensor, bank: nn.Module) -> torch.Tensor:
        """[E, S, D] every expert's slots of this process's images -> [E, S, D'] their outputs, `bank` holding this
        process's E / N experts."""
        E, S, D = x.shape
        N = self.size
        local = E // N
        send = x.reshape(N * local * S, D)  # chunk r: my slots for rank r's experts
        received = all_to_all_single_autograd(send, None, None, self.group)  # chunk s: rank s's slots for mine
        slots = received.view(N, local, S, D).transpose(0, 1).reshape(local, N * S, D)  # [E/N, N*S, D]
        out = bank(slots)  # [E/N, N*S, D']
        D_out = out.shape[-1]
        back = out.view(local, N, S, D_out).transpose(0, 1).reshape(N * local * S, D_out)  # chunk s: rank s's outputs
        returned = all_to_all_single_autograd(back, None, None, self.group)  # chunk r: rank r's experts on my slots
        return returned.view(E, S, D_out)  # [E, S, D'] expert-major again

    def __repr__(self) -> str:
        experts = self.local_experts()
        return f'ExpertParallel(experts {experts.start}-{experts.stop - 1} of {self.num_experts}, group of {self.size})'


def shard_experts(model: nn.Module, group, size: int, rank: int) -> nn.Module:
    """Keep, in every MoE layer of `model`, the routed experts `rank` holds in a group of `size` (E / size of them,
    in order) and give the layer its exchange: in place. Shared experts, routers and everything else stay whole."""
    layers = moe_layers(model)
    for name, layer in layers.items():
        if layer.num_experts % size:
            raise ValueError(f'{name}: num_experts={layer.num_experts} is not divisible by expert_parallel_size='
                             f'{size}; expected a divisor of {layer.num_experts}')
        if layer.expert_parallel is not None:
            raise ValueError(f'{name} is already expert-parallel')
    for layer in layers.values():
        E = layer.num_experts
        keep = slice(rank * E // size, (rank + 1) * E // size)
        with torch.no_grad():
            for module in layer.experts.modules():
                for key, param in list(module.named_parameters(recurse=False)):
                    setattr(module, key, nn.Parameter(param[keep].clone(), requires_grad=param.requires_grad))
                if hasattr(module, 'num_experts'):
                    module.num_experts = E // size
        layer.expert_parallel = ExpertParallel(E, group, size, rank)
    return model


def expert_parameter_names(model: nn.Module) -> List[str]:
    """Names (in `model`) of the routed experts' parameters of expert-parallel layers: each process holds a shard."""
    return [f'{name}.experts.{key}' for name, layer in moe_layers(model).items() if layer.expert_parallel is not None
            for key, _ in layer.experts.named_parameters()]


def gather_experts(shard: torch.Tensor, group, size: int) -> torch.Tensor:
    """The whole stacked tensor [E, ...] from every process's shard [E / N, ...] (a collective of the group)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    if isinstance(shard, DTensor):  # FSDP2's pieces of this process's experts: whole first
        shard = shard.full_tensor()
    full = shard.new_empty((size * shard.shape[0], *shard.shape[1:]))
    dist.all_gather_into_tensor(full, shard.detach().contiguous(), group=group)
    return full


def unsharded_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`state_dict` (keyed like `model`'s; possibly empty on processes other than the one that saves) with every
    expert-parallel bank's tensors gathered whole from `model`'s shards: what one process loads. A collective of every
    expert-parallel group (call it on every process)."""
    state = dict(state_dict)
    for name, layer in moe_layers(model).items():
        exchange = layer.expert_parallel
        if exchange is None:
            continue
        for key, shard in layer.experts.named_parameters():
            state[f'{name}.experts.{key}'] = gather_experts(shard, exchange.group, exchange.size)
    return state
