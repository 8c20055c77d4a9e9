""" Sparse upcycling of a dense timm VisionTransformer or Eva (Komatsuzaki et al., 2022, arXiv 2212.05055).

The MLP of the chosen blocks becomes an MoE layer whose experts all start as copies of that MLP;
a new router (N(0, 0.02)) is added; everything else is copied unchanged.
"""
import copy
import dataclasses
from typing import Optional, Union

import torch.nn as nn
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from ..layers import MOE_OPTIONS, MoeConfig, MoeMlp, moe_layer_like, set_moe_config
from .conversion import convert_dense_to_moe, resolve_moe_blocks

__all__ = ['upcycle', 'replace_mlps_with_moe', 'moe_config_of']

Backbone = Union[VisionTransformer, Eva]
BACKBONES = (VisionTransformer, Eva)


def _check_backbone(model: nn.Module) -> None:
    if not isinstance(model, BACKBONES):
        raise TypeError(
            f'Expected a timm VisionTransformer or Eva (e.g. timm.create_model("vit_small_patch16_224") or '
            f'"eva02_small_patch14_224"), got {type(model).__name__}')


def _block_mlp(model: nn.Module, index: int) -> nn.Module:
    """Block `index`'s MLP module; a block whose MLP is fused into another projection has none to upcycle."""
    block = model.blocks[index]
    mlp = getattr(block, 'mlp', None)
    if not isinstance(mlp, nn.Module):
        raise TypeError(f'block {index} ({type(block).__name__}) has no separate MLP module (.mlp) to upcycle; '
                        f'accepted: blocks with an .mlp (timm Block, ResPostBlock, EvaBlock, EvaBlockPostNorm)')
    return mlp


def moe_config_of(options: dict) -> MoeConfig:
    """The `MoeConfig` of flat MoE keyword arguments; an unknown one is named with the accepted ones."""
    unknown = sorted(set(options) - set(MOE_OPTIONS))
    if unknown:
        raise TypeError(f'unknown MoE option(s) {", ".join(unknown)}; accepted: {", ".join(MOE_OPTIONS)}')
    return MoeConfig(**options)


def replace_mlps_with_moe(model: Backbone, config: Optional[MoeConfig] = None, **options) -> MoeConfig:
    """Replace, in place, the MLP of the chosen blocks by a randomly initialised MoE layer (`config`, or the flat
    options of `MoeConfig`). Returns the config with the block indices resolved, also stored as `model.moe_config`."""
    _check_backbone(model)
    config = config if config is not None else moe_config_of(options)
    indices = resolve_moe_blocks(config.moe_blocks, len(model.blocks))
    mlps = {i: _block_mlp(model, i) for i in indices}  # refuse before changing any block
    for i, mlp in mlps.items():
        if isinstance(mlp, MoeMlp):
            raise ValueError(f'block {i} is already an MoE layer; upcycle a dense model')
    for i, mlp in mlps.items():
        ref = next(mlp.parameters())
        moe = moe_layer_like(mlp, config, num_prefix_tokens=int(model.num_prefix_tokens))
        moe = moe.to(device=ref.device, dtype=ref.dtype)
        moe.layer_name = f'blocks.{i}.mlp'
        model.blocks[i].mlp = moe
    return set_moe_config(model, dataclasses.replace(config, moe_blocks=indices))


def upcycle(dense_model: Backbone, **options) -> Backbone:
    """Return a new MoE model upcycled from `dense_model` (which is left unchanged).

    Args:
        dense_model: any timm VisionTransformer (class token or not, registers, layer scale, qk-norm, any pooling,
            MLP: Mlp, GluMlp / SwiGLUPacked, SwiGLU, GatedMlp) or Eva (EVA02, rope, SwiGLU with hidden norm).
        **options: the MoE options (`vit_moe.layers.MoeConfig`: num_experts, moe_blocks, router, capacity_factor,
            top_k, router_norm, expert_init, drop_ratio, output_scale, prefix_tokens, num_shared_experts,
            expert_granularity, slots_per_expert, soft_scale, ...); an option the router does not use is refused.
            expert_init: 'copy' (every expert = the dense MLP), 'random' (ablation) or 'drop' (Drop-Upcycling:
            copy, then re-initialise `drop_ratio` of each expert's hidden units; Nakamura et al., 2025).
    """
    _check_backbone(dense_model)
    config = moe_config_of(options)
    moe_model = copy.deepcopy(dense_model)
    replace_mlps_with_moe(moe_model, config)
    moe_model.load_state_dict(convert_dense_to_moe(dense_model.state_dict(), moe_model, expert_init=config.expert_init,
                                                   drop_ratio=config.drop_ratio or 0.5))
    return moe_model
