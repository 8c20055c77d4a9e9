""" Expert parallelism in the trainer: a (data parallel) x (expert parallel) device mesh, expert shards, their
gradients and clipping.

With `expert_parallel_size` N the W processes form a DeviceMesh ('dp', 'ep') of (W / N) x N. Each MoE layer keeps E / N
experts per process (`vit_moe.layers.shard_experts`; the all-to-alls are in the layer), and everything else stays as
the launch has it: replicated under DDP (which ignores the expert shards), sharded under FSDP2 (whose units leave the
expert banks out). After the backward of an optimizer step, each expert shard's gradient, which holds the
contributions of the N processes of its group, is summed over its W / N data-parallel replicas and divided by W: the
mean over all processes, as DDP's all-reduce gives every other parameter. The gradient norm for clipping is the norm
of the whole model (expert shards summed over their group).

In a checkpoint each shard is a DTensor over the mesh (`ExpertShards.as_global`: Shard(0) over 'ep', Replicate over
'dp'), so the training state holds every expert under its own name with its whole shape, whatever the launch
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

    def as_global(self, local: torch.Tensor):
        """This process's shard [E / N, ...] as the DTensor [E, ...] it is a piece of (replicated over 'dp')."""
        from torch.distributed.tensor import DTensor, Replicate, Shard
        return DTensor.from_local(local, self.mesh, [Replicate(), Shard(0)], run_check=False)

    @torch.no_grad()
    def reduce_gradients(self, model: nn.Module) -> None:
        """Each shard's gradient summed over its data-parallel replicas, divided by every process: the mean."""
        for p in self.parameters(model):
            if p.grad is None:
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
            local = torch.nn.utils.get_total_norm([p.grad for p in experts], 2.0) ** 2
            dist.all_reduce(local, group=self.ep_group)
            squares.append(local)
        total = torch.stack(squares).sum().sqrt()
        with implicit_replication():
            torch.nn.utils.clip_grads_with_norm_([p for p in others + experts], max_norm, total)
        return total
