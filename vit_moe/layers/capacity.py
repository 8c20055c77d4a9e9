""" Capacity as an inference-time knob: fewer slots per expert, less compute, graceful loss (V-MoE's C at test time).

A model's `moe_config` is the one home of its capacity: every router reads its layer's view of it
(`MoeConfig.for_layer`) when it runs, and `config.json` records it. `set_capacity_factor(model, 1.0)` (or a mapping
layer -> C for some layers) replaces that config, so what is saved afterwards is what runs; the weights are unchanged,
only how many slots each expert fills per image. Soft MoE layers have no capacity (their slots are parameters):
refused by name. `capacity_factors(model)` reads what the layers use.
"""
import dataclasses
from typing import Dict, Mapping, Union

import torch.nn as nn

from .moe_config import MoeConfig
from .moe_mlp import moe_layers

__all__ = ['set_capacity_factor', 'capacity_factors', 'set_moe_config']


def capacity_factors(model: nn.Module) -> Dict[str, float]:
    """MoE layer -> the capacity factor its router uses (Soft MoE layers: none)."""
    return {name: layer.config.capacity_factor for name, layer in moe_layers(model).items()
            if layer.config.capacity_factor is not None}


def set_moe_config(model: nn.Module, config: MoeConfig) -> MoeConfig:
    """Make `config` the model's `moe_config` and give every MoE layer's router its view of it (`for_layer`)."""
    layers = moe_layers(model)
    unknown = sorted(set(config.layer_capacity_factors or ()) - set(layers))
    if unknown:
        raise ValueError(f'capacity factor for {", ".join(unknown)}: not an MoE layer of {type(model).__name__}; '
                         f'accepted: {", ".join(layers) or "none (a dense model)"}')
    model.moe_config = config
    for name, layer in layers.items():
        layer.router.config = config.for_layer(name)
    return config


def set_capacity_factor(model: nn.Module, factor: Union[float, Mapping[str, float]]) -> Dict[str, float]:
    """Give every MoE layer (or each layer a mapping names) capacity factor C: one change of `model.moe_config`
    (`capacity_factor`, or `layer_capacity_factors` for a mapping). Returns layer -> C as the layers now run."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f'capacity factor {factor!r}: {type(model).__name__} has no MoE layer (a dense model); a '
                         f'capacity applies to expert_choice / token_choice MoE layers')
    wanted = dict(factor) if isinstance(factor, Mapping) else {name: factor for name in layers}
    for name, value in wanted.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f'capacity factor {value!r} for {name} is not valid; expected a number > 0')
        layer = layers.get(name)
        if layer is not None and layer.config.capacity_factor is None:
            raise ValueError(f'{name} is a {layer.config.router!r} layer, whose slots are parameters '
                             f'(slots_per_expert), not a capacity; accepted: expert_choice / token_choice layers')
    config = getattr(model, 'moe_config', None)
    if not isinstance(config, MoeConfig):  # a bare MoE layer or a model built by hand: its layers share one config
        configs = {layer.config for layer in layers.values()}
        if len(configs) != 1:
            raise ValueError(f'{type(model).__name__} has no moe_config and its MoE layers differ; set the capacity '
                             f'on each layer, or build the model with vit_moe.upcycle / timm.create_model')
        config = next(iter(configs))
    if isinstance(factor, Mapping):
        per_layer = dict(config.layer_capacity_factors or {}, **{k: float(v) for k, v in wanted.items()})
        config = dataclasses.replace(config, layer_capacity_factors=per_layer)
    else:
        config = dataclasses.replace(config, capacity_factor=float(factor), layer_capacity_factors=None)
    set_moe_config(model, config)
    return {name: capacity_factors(model)[name] for name in wanted}

