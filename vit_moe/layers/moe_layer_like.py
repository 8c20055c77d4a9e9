""" The MoE layer that replaces a dense timm MLP: its expert banks shaped like the MLP, its class by router.

`moe_layer_like(mlp, config)` (or flat options: `moe_layer_like(mlp, num_experts=8, router='soft')`) builds a
randomly initialised `MoeMlp` (expert / token choice) or `SoftMoeMlp`: routed experts as 1/G hidden slices of the
MLP with expert granularity G, and `num_shared_experts` always-on experts of the MLP's full size. The upcycled
weights come from the conversion rules (`vit_moe.models.conversion`).
"""
from typing import Optional

import torch.nn as nn

from .experts import expert_bank_like
from .moe_config import MoeConfig
from .moe_mlp import MoeMlp
from .soft_moe import SoftMoeMlp

__all__ = ['moe_layer_like']


def moe_layer_like(mlp: nn.Module, config: Optional[MoeConfig] = None, num_prefix_tokens: int = 0,
                   **options) -> MoeMlp:
    """An MoE layer shaped like the dense timm MLP `mlp` (`Mlp`, `GluMlp` / `SwiGLUPacked`, `SwiGLU`, `GatedMlp`
    without a gate), for tokens of which the first `num_prefix_tokens` are prefix tokens (class token, registers)."""
    if config is not None and options:
        raise TypeError(f'give the MoE options either as config or as keyword arguments, not both: {sorted(options)}')
    config = config if config is not None else MoeConfig(**options)
    experts = expert_bank_like(mlp, config.num_experts, granularity=config.groups)
    if experts.out_features != experts.in_features:
        raise TypeError(f'{type(mlp).__name__} maps {experts.in_features} to {experts.out_features} features; a MoE '
                        f'layer replaces a block MLP whose output width equals its input width')
    shared = expert_bank_like(mlp, config.num_shared_experts) if config.num_shared_experts else None
    layer_class = SoftMoeMlp if config.router == 'soft' else MoeMlp
    return layer_class(experts.in_features, experts.hidden_features, config, experts=experts, shared_experts=shared,
                       num_prefix_tokens=num_prefix_tokens)
