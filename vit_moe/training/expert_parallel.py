""" Expert parallelism in the trainer: a (data parallel) x (expert parallel) device mesh, expert shards, their
gradients, clipping and checkpoints.

With `expert_parallel_size` N the W processes form a DeviceMesh ('dp', 'ep') of (W / N) x N. Each MoE layer keeps E / N
experts per process (`vit_moe.layers.shard_experts`; the all-to-alls are in the layer), and everything else stays as
the launch has it: replicated under DDP (which ignores the expert shards), sharded under FSDP2 (whose units leave the
expert banks out). After the backward of an optimizer step, each expert shard's gradient, which holds the
contributions of the N processes of its group, is summed over its W / N data-parallel replicas and divided by W: the
mean over all processes, as DDP's all-reduce gives every other parameter. The gradient norm for clipping is the norm
of the whole model (expert shards summed over their group).

Checkpoints: Accelerate saves everything but the expert shards (state-dict hooks leave them out of the model, EMA and
optimizer state it writes and reads); `ExpertShards.save` writes them, with their optimizer state and EMA, with
torch.distributed.checkpoint into `<checkpoint>/experts` as DTensors sharded over the mesh's 'ep' dimension: every
process writes its shard, and a resume reshards them for another expert-parallel size (1 included: whole tensors).
"""
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..layers import expert_parameter_names, moe_layers, shard_experts, unsharded_state_dict
from .config import ConfigError

__all__ = ['ExpertShards', 'expert_parallel_mesh', 'EXPERTS_FOLDER', 'load_expert_checkpoint',
           'accept_checkpoint_without_experts', 'gather_for_saving', 'ExpertSwitch', 'leaving_out',
           'whole_expert_names']

EXPERTS_FOLDER = 'experts'  # inside a checkpoint folder: the expert shards (torch.distributed.checkpoint)


def expert_parallel_mesh(size: int, world: int, device_type: str):
    """The ('dp', 'ep') DeviceMesh of `world` processes with expert groups of `size`; one line when it cannot be."""
    if world % size:
        raise ConfigError(f'expert_parallel_size={size} does not divide the {world} processes of the launch; expected '
                          f'a divisor of {world}')
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device_type, (world // size, size), mesh_dim_names=('dp', 'ep'))


class ExpertShards:
    """The expert-parallel side of one training run: set up with `shard(model)` before the EMA copy and `prepare`."""

    def __init__(self, size: int, world: int, device_type: str):
        self.size, self.world = size, world
        self.mesh = expert_parallel_mesh(size, world, device_type)
        self.ep_group, self.dp_group = self.mesh['ep'].get_group(), self.mesh['dp'].get_group()
        self.ep_rank = self.mesh.get_local_rank('ep')
        self.names: List[str] = []
        self.leaving_out = False  # while Accelerate saves or loads: the hooks leave the shards out

    # ------------------------------------------------------------------------------------------- set-up
    def shard(self, model: nn.Module) -> nn.Module:
        """Keep this process's experts of every MoE layer; hook the model's state dict for Accelerate's saves."""
        if not moe_layers(model):
            raise ConfigError(f'expert_parallel_size={self.size}: the model has no MoE layer to spread over processes')
        shard_experts(model, self.ep_group, self.size, self.ep_rank)
        self.names = expert_parameter_names(model)
        self.hook_state_dict(model)
        model._ddp_params_and_buffers_to_ignore = list(self.names)  # DDP leaves the shards alone
        return model

    def expert_banks(self, model: nn.Module) -> List[nn.Module]:
        """The routed expert banks (FSDP2's `ignored_modules`: they stay this process's shard)."""
        return [layer.experts for layer in moe_layers(model).values() if layer.expert_parallel is not None]

    def hook_state_dict(self, module: nn.Module) -> None:
        hook_state_dict(module, self.names, self)

    def hook_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
        """While `leaving_out_shards()`, the optimizer's state dict leaves out the expert shards' state."""
        expert_params = {id(p) for n, p in model.named_parameters() if n in self.names}

        def drop(optimizer, state_dict):
            if not self.leaving_out:
                return state_dict
            index, ids = 0, {}
            for group in optimizer.param_groups:
                for p in group['params']:
                    ids[index] = id(p)
                    index += 1
            state_dict['state'] = {i: s for i, s in state_dict['state'].items() if ids.get(i) not in expert_params}
            return state_dict

        optimizer.register_state_dict_post_hook(drop)

    @contextmanager
    def leaving_out_shards(self, model: Optional[nn.Module] = None):
        """Accelerate's save_state / load_state inside: without the expert shards (`save` / `load_expert_checkpoint`
        write and read them)."""
        with leaving_out(self, self.parameters(model) if model is not None else []):
            yield

    # ------------------------------------------------------------------------------------------- a step
    def parameters(self, model: nn.Module) -> List[nn.Parameter]:
        return [p for n, p in model.named_parameters() if n in self.names]

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
        """Clip every gradient by the norm of the whole model's (the shards' squares summed over the expert group)."""
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

    # ------------------------------------------------------------------------------------- checkpoints
    def _as_dtensor(self, local: torch.Tensor):
        from torch.distributed.tensor import DTensor, Replicate, Shard
        return DTensor.from_local(local, self.mesh, [Replicate(), Shard(0)], run_check=False)

    def _state(self, model: nn.Module, optimizer, ema: Optional[nn.Module]) -> Dict[str, torch.Tensor]:
        """Every expert shard (weights, optimizer state, EMA) as a DTensor over the mesh, keyed by name."""
        params = dict(model.named_parameters())
        state = {f'model.{n}': self._as_dtensor(params[n].detach()) for n in self.names}
        for n in self.names:
            for key, value in optimizer.state.get(params[n], {}).items():
                if torch.is_tensor(value) and value.dim() > 0:
                    state[f'optim.{n}.{key}'] = self._as_dtensor(value)
                elif torch.is_tensor(value):
                    state[f'optim.{n}.{key}'] = value  # a scalar (AdamW's step): the same on every process
        if ema is not None:
            tensors = ema_tensors(ema)
            for n in self.names:
                state[f'ema.{n}'] = self._as_dtensor(tensors[n])
        return state

    def save(self, checkpoint: Path, model: nn.Module, optimizer, ema: Optional[nn.Module] = None) -> None:
        """Every process writes its shards into `checkpoint/experts` (a collective)."""
        import torch.distributed.checkpoint as dcp
        dcp.save(self._state(model, optimizer, ema), checkpoint_id=str(Path(checkpoint) / EXPERTS_FOLDER))


def _named(names) -> Callable[[str], bool]:
    """Whether a state-dict key is one of the model's parameters `names` (or ends with one: timm's EMA `module.`)."""
    names = set(names)
    return lambda key: key in names or any(key.endswith('.' + n) for n in names)


def hook_state_dict(module: nn.Module, names: List[str], switch) -> None:
    """While `switch.leaving_out`, `module.state_dict()` leaves out the parameters `names`; loading a state dict
    without them (what such a save wrote) reports no missing key for them (`forgive_missing`)."""
    named = _named(names)

    def drop(module, state_dict, prefix, local_metadata):
        if switch.leaving_out:
            for key in [k for k in state_dict if k.startswith(prefix) and named(k[len(prefix):])]:
                del state_dict[key]
        return state_dict

    module._register_state_dict_hook(drop)
    forgive_missing(module, names)


def forgive_missing(module: nn.Module, names: List[str]) -> None:
    """Loading a state dict into `module` reports no missing key for the parameters `names`."""
    named = _named(names)

    def forgive(module, incompatible):
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not named(k)]

    module.register_load_state_dict_post_hook(forgive)


@contextmanager
def leaving_out(switch, params: List[nn.Parameter]):
    """`switch.leaving_out` inside, and `params` frozen: FSDP2's strict optimizer-state load (torch.distributed.
    checkpoint) skips frozen parameters, whose state `experts/` holds."""
    flags = [p.requires_grad for p in params]
    switch.leaving_out = True
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        switch.leaving_out = False
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class ExpertSwitch:
    """The hooks' switch for a model without expert parallelism that resumes a checkpoint written with it."""
    leaving_out = False


def whole_expert_names(model: nn.Module) -> List[str]:
    """Names of the routed experts' parameters of every MoE layer (a model without expert parallelism)."""
    return [f'{name}.experts.{key}' for name, layer in moe_layers(model).items()
            for key, _ in layer.experts.named_parameters()]


def accept_checkpoint_without_experts(model: nn.Module, switch: ExpertSwitch, ema: Optional[nn.Module] = None) -> None:
    """A model without expert parallelism resuming a checkpoint written with it: Accelerate's files lack the experts
    (they are in `experts/`), so while `switch` is on its state dict leaves them out (FSDP2 plans its load from it)
    and loading reports no missing expert key."""
    names = whole_expert_names(model)
    hook_state_dict(model, names, switch)
    if ema is not None:
        forgive_missing(ema, names)


def ema_tensors(ema) -> Dict[str, torch.Tensor]:
    """The EMA's tensors keyed by the model's names: timm's ModelEmaV3 (its copy of the model) or a ShardedEma."""
    module = getattr(ema, 'module', None)
    if isinstance(module, nn.Module):
        return {n: t.data for n, t in list(module.named_parameters()) + list(module.named_buffers())}
    return ema.state_dict()


def _checkpoint_metadata(folder: Path):
    import torch.distributed.checkpoint as dcp
    return dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata


def load_expert_checkpoint(checkpoint: Path, model: nn.Module, optimizer, ema: Optional[nn.Module],
                           shards: Optional[ExpertShards]) -> bool:
    """Restore the expert weights, optimizer state and EMA that `checkpoint/experts` holds into a model that is
    expert-parallel (`shards`) with any size, or not (whole tensors). False when the checkpoint has none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor
    folder = Path(checkpoint) / EXPERTS_FOLDER
    if not folder.is_dir():
        if shards is not None:
            raise ConfigError(f'{checkpoint} was written without expert parallelism: resume it with '
                              f'expert_parallel_size=1 (a checkpoint written with it resumes with any size)')
        return False
    metadata = _checkpoint_metadata(folder)
    params = dict(model.named_parameters())
    ema_state = ema_tensors(ema) if ema is not None else {}
    wrap = shards._as_dtensor if shards is not None else (lambda t: t)
    state: Dict[str, torch.Tensor] = {}
    for key, meta in metadata.items():
        kind, name = key.split('.', 1)
        if kind == 'model':
            state[key] = wrap(params[name].data)
        elif kind == 'ema' and ema is not None:
            state[key] = wrap(ema_state[name])
        elif kind == 'optim':
            name, slot = name.rsplit('.', 1)
            param = params[name]
            slots = optimizer.state.setdefault(param, {})
            if len(meta.size) == 0:
                slots[slot] = torch.zeros((), dtype=meta.properties.dtype)
                state[key] = slots[slot]
            elif isinstance(param.data, DTensor):  # FSDP2's own shard of a whole bank (no expert parallelism)
                slots[slot] = state[key] = torch.zeros_like(param.data, dtype=meta.properties.dtype)
            else:
                local = list(meta.size)
                local[0] = param.shape[0]  # this process's rows (all of them without expert parallelism)
                slots[slot] = torch.zeros(local, dtype=meta.properties.dtype, device=param.device)
                state[key] = wrap(slots[slot])
    dcp.load(state, checkpoint_id=str(folder))
    return True


def gather_for_saving(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A state dict of the whole model (every expert) from one with shards: a collective."""
    return unsharded_state_dict(model, state_dict)

