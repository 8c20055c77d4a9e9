""" Expert parallelism in the trainer: a (data parallel) x (expert parallel) device mesh, expert shards, their
gradients and clipping.

With `expert_parallel_size` N the W processes form a DeviceMesh ('dp', 'ep') of (W / N) x N. Each MoE layer keeps E / N
experts per process (`vit_moe.layers.shard_experts`; the all-to-alls are in the layer), and everything else stays as
the launch has it: replicated under DDP (which ignores the expert shards), sharded under FSDP2. Under FSDP2 each
expert bank is also its own FSDP unit over the 'dp' dimension (`shard_over_dp`): a process holds E / W experts at rest
(E / N gathered for the layer's forward), where W / N divides E / N. After the backward of an optimizer step, each
expert shard's gradient, which holds the contributions of the N processes of its group, is averaged over all W
processes, as DDP's all-reduce averages every other parameter: summed over its W / N data-parallel replicas (DDP) or
averaged over them by FSDP2's reduce-scatter, then divided by what is left. The gradient norm for clipping is the
norm of the whole model (expert shards summed over the mesh).

In a checkpoint each shard is a DTensor of its whole bank over the mesh (`ExpertShards.as_global`: Shard(0) over 'ep'
and, under FSDP2, the 'dp' shards within each process's block of experts, else Replicate over 'dp'), so the training
state holds every expert under its own name with its whole shape, whatever the launch
(`vit_moe.training.training_state`).
"""
from typing import List

import torch
import torch.distributed as dist
import torch.nn as nn

from ..layers import expert_parameter_names, moe_layers, shard_experts
from .config import ConfigError

__all__ = ['ExpertShards', 'expert_parallel_mesh', 'routed_expert_names']


def expert_parallel_mesh(size: int, world: int, device_type: str):
    """The ('dp', 'ep') DeviceMesh of `world` processes with expert groups of `size`; one line when it cannot be."""
    if world % size:
        raise ConfigError(f'expert_parallel_size={size} does not divide the {world} processes of the launch; expected '
                          f'a divisor of {world}')
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (world // size, size), mesh_dim_names=('dp', 'ep'))


def routed_expert_names(model: nn.Module) -> List[str]:
    """Names of the routed experts' parameters of every MoE layer, sharded or whole (the same names either way)."""
    return [f'{name}.experts.{key}' for name, layer in moe_layers(model).items()
            for key, _ in layer.experts.named_parameters()]


class ExpertShards:
    """The expert-parallel side of one launch: `shard(model)` before the EMA copy and `prepare`."""

    def __init__(self, size: int, world: int, device_type: str):
        self.size, self.world = size, world
        self.mesh = expert_parallel_mesh(size, world, device_type)
        self.ep_group, self.dp_group = self.mesh['ep'].get_group(), self.mesh['dp'].get_group()
        self.ep_rank = self.mesh.get_local_rank('ep')
        self.names: List[str] = []

    def shard(self, model: nn.Module) -> nn.Module:
        """Keep this process's experts of every MoE layer; DDP leaves them alone."""
        if not moe_layers(model):
            raise ConfigError(f'expert_parallel_size={self.size}: the model has no MoE layer to spread over processes')
        shard_experts(model, self.ep_group, self.size, self.ep_rank)
        self.names = expert_parameter_names(model)
        model._ddp_params_and_buffers_to_ignore = list(self.names)
        return model

    def expert_banks(self, model: nn.Module) -> List[nn.Module]:
        """The routed expert banks (FSDP2's `ignored_modules`: they stay this process's shard)."""
        return [layer.experts for layer in moe_layers(model).values() if layer.expert_parallel is not None]

    def parameters(self, model: nn.Module) -> List[nn.Parameter]:
        return [p for n, p in model.named_parameters() if n in self.names]

    def shard_over_dp(self, model: nn.Module, **fsdp_kwargs) -> bool:
        """FSDP2: every expert bank its own FSDP unit over 'dp' (each process then holds E / W experts at rest); False
        (nothing done) where the W / N replicas do not divide a layer's E / N experts."""
        from torch.distributed.fsdp import fully_shard
        banks = self.expert_banks(model)
        replicas = self.world // self.size
        if any(bank.fc2.weight.shape[0] % replicas for bank in banks):
            return False
        for bank in banks:
            fully_shard(bank, mesh=self.mesh['dp'], **fsdp_kwargs)
        return True

    def as_global(self, local: torch.Tensor):
        """This process's shard [E / N, ...] (or FSDP2's piece of it, a DTensor over 'dp') as the DTensor [E, ...] of
        the whole bank."""
        from torch.distributed.tensor import DTensor, Replicate, Shard
        from torch.distributed.tensor.placement_types import _StridedShard
        if isinstance(local, DTensor):  # E / N experts split over 'dp' within this process's block of the bank
            return DTensor.from_local(local.to_local(), self.mesh, [_StridedShard(0, split_factor=self.size), Shard(0)],
                                      run_check=False, shape=(local.shape[0] * self.size, *local.shape[1:]),
                                      stride=local.stride())
        return DTensor.from_local(local, self.mesh, [Replicate(), Shard(0)], run_check=False)

    @torch.no_grad()
    def reduce_gradients(self, model: nn.Module) -> None:
        """Each shard's gradient averaged over every process: summed over its data-parallel replicas (FSDP2 has
        averaged them already), divided by the rest."""
        from torch.distributed.tensor import DTensor
        for p in self.parameters(model):
            if p.grad is None:
                continue
            if isinstance(p.grad, DTensor):  # FSDP2's reduce-scatter averaged it over 'dp'
                p.grad.div_(self.size)
                continue
            if self.world // self.size > 1:
                dist.all_reduce(p.grad, group=self.dp_group)
            p.grad.div_(self.world)

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip every gradient by the norm of the whole model's (the shards' squares summed over the expert group).
        The gradients must be unscaled already (fp16)."""
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor.experimental import implicit_replication
        experts = [p for p in self.parameters(model) if p.grad is not None]
        expert_ids = {id(p) for p in experts}
        others = [p for p in model.parameters() if p.grad is not None and id(p) not in expert_ids]
        squares = []
        if others:
            norm = torch.nn.utils.get_total_norm([p.grad for p in others], 2.0)
            squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
        if experts:
            norm = torch.nn.utils.get_total_norm([p.grad for p in experts], 2.0)
            local = (norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2  # over 'dp' (FSDP2's pieces)
            dist.all_reduce(local, group=self.ep_group)
            squares.append(local)
        total = torch.stack(squares).sum().sqrt()
        with implicit_replication():
            for params in (others, experts):  # apart: under FSDP2 they are DTensors of different meshes
                if params:
                    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total
