""" The optimizer, with parameter groups built the timm way.

* no weight decay on biases (stacked expert biases [E, out] included), norms (1-D, and the experts' stacked hidden
  norms [E, n]) and what the model's `no_weight_decay()` lists (position embedding, class token, ...),
* optional layer-wise learning-rate decay (`layer_decay`, timm's `param_groups_layer_decay`: block i of
  depth L gets lr * layer_decay ** (L + 1 - i), the head the full lr),
* optional learning-rate multiplier for the MoE routers (`router_lr_mult`),
* AdamW betas and eps from the config; every other option is timm's `create_optimizer_v2`,
* parameters named in `apart` (expert-parallel shards) in groups of their own, with their group's settings: a
  foreach update never mixes them with parameters of another kind (FSDP2's DTensors).

Each group carries `lr_scale`; the training loop sets `group['lr'] = schedule(step) * group['lr_scale']`.
"""
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
from timm.optim import create_optimizer_v2, param_groups_layer_decay, param_groups_weight_decay

from ..layers import StackedLayerNorm

__all__ = ['param_groups', 'create_optimizer', 'ROUTER_PATTERN']

ROUTER_PATTERN = '.router.'  # MoeMlp.router.gate.weight


def _is_router(name: str) -> bool:
    return ROUTER_PATTERN in f'.{name}'


def param_groups(
        model: torch.nn.Module,
        weight_decay: float,
        layer_decay: Optional[float] = None,
        router_lr_mult: float = 1.0,
        apart: Iterable[str] = (),
) -> List[Dict[str, Any]]:
    """Parameter groups with `weight_decay`, `lr_scale` and `param_names` set on each (see the module docstring)."""
    no_decay = set(getattr(model, 'no_weight_decay', lambda: set())()) | {'*.bias'}
    # stacked experts' hidden norms are 2-D ([E, n]): timm would decay them; their dense originals are not decayed
    no_decay |= {f'{name}.weight' for name, m in model.named_modules() if isinstance(m, StackedLayerNorm)}
    if layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in groups:
        group = dict(group, lr_scale=group.get('lr_scale', 1.0))
        group['param_names'] = [names[id(p)] for p in group['params']]
        routers = [p for p in group['params'] if _is_router(names[id(p)])]
        if routers and router_lr_mult != 1.0:
            others = [p for p in group['params'] if not _is_router(names[id(p)])]
            out.append(dict(group, params=routers, param_names=[names[id(p)] for p in routers],
                            lr_scale=group['lr_scale'] * router_lr_mult))
            group.update(params=others, param_names=[names[id(p)] for p in others])
        if group['params']:
            out.append(group)
    apart = set(apart)
    if apart:
        split = []
        for group in out:
            for keep in (False, True):
                params = [(p, n) for p, n in zip(group['params'], group['param_names']) if (n in apart) == keep]
                if params:
                    split.append(dict(group, params=[p for p, _ in params], param_names=[n for _, n in params]))
        out = split
    return out


def create_optimizer(
        model: torch.nn.Module,
        opt: str = 'adamw',
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        layer_decay: Optional[float] = None,
        router_lr_mult: float = 1.0,
        betas: Optional[Sequence[float]] = None,
        eps: Optional[float] = None,
        apart: Iterable[str] = (),
) -> torch.optim.Optimizer:
    """timm's optimizer factory over `param_groups(...)`; `betas` / `eps` for Adam-type optimizers."""
    kwargs: Dict[str, Any] = {}
    if betas is not None:
        kwargs['betas'] = tuple(betas)
    if eps is not None:
        kwargs['eps'] = eps
    groups = param_groups(model, weight_decay, layer_decay, router_lr_mult, apart)
    return create_optimizer_v2(groups, opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)
