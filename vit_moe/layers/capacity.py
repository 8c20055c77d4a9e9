""" Capacity as an inference-time knob: fewer slots per expert, less compute, graceful loss (V-MoE's C at test time).

`set_capacity_factor(model, 1.0)` gives every expert-choice / token-choice layer capacity factor C (or a mapping of
layer -> C); the weights are unchanged, only how many slots each expert fills per image. Soft MoE layers have no
capacity (their slots are parameters): refused by name. `capacity_factors(model)` reads what the layers use.
"""
import dataclasses
from typing import Dict, Mapping, Union

import torch.nn as nn

from .moe_mlp import moe_layers

__all__ = ['set_capacity_factor', 'capacity_factors']


def capacity_factors(model: nn.Module) -> Dict[str, float]:
    """MoE layer -> the capacity factor its router uses (Soft MoE layers: none)."""
    return {name: layer.config.capacity_factor for name, layer in moe_layers(model).items()
            if layer.config.capacity_factor is not None}


def set_capacity_factor(model: nn.Module, factor: Union[float, Mapping[str, float]]) -> Dict[str, float]:
    """Give every MoE layer (or each layer a mapping names) capacity factor C; returns layer -> C as set."""
    layers = moe_layers(model)
    wanted = dict(factor) if isinstance(factor, Mapping) else {name: factor for name in layers}
    unknown = sorted(set(wanted) - set(layers))
    if unknown:
        raise ValueError(f'capacity factor for {", ".join(unknown)}: not an MoE layer of {type(model).__name__}; '
                         f'accepted: {", ".join(layers) or "none (a dense model)"}')
    for name, value in wanted.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f'capacity factor {value!r} for {name} is not valid; expected a number > 0')
        layer = layers[name]
        if layer.config.capacity_factor is None:
            raise ValueError(f'{name} is a {layer.config.router!r} layer, whose slots are parameters '
                             f'(slots_per_expert), not a capacity; accepted: expert_choice / token_choice layers')
    for name, value in wanted.items():
        layer = layers[name]
        config = dataclasses.replace(layer.config, capacity_factor=float(value))
        layer.config = layer.router.config = config
        layer.router.capacity_factor = float(value)
    return {name: float(value) for name, value in wanted.items()}
