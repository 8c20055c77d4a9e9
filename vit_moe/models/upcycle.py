""" Sparse upcycling of a dense timm VisionTransformer or Eva (Komatsuzaki et al., 2022, arXiv 2212.05055).

The MLP of the chosen blocks becomes an MoE layer whose experts all start as copies of that MLP;
a new router (N(0, 0.02)) is added; everything else is copied unchanged.
"""
import copy
from typing import Any, Dict, Optional, Union

import torch.nn as nn
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer

from ..layers import MoeMlp
from .conversion import MoeBlocks, check_expert_init, convert_dense_to_moe, resolve_moe_blocks

__all__ = ['upcycle', 'replace_mlps_with_moe']


# Soft MoE's initial logit scale for upcycled models: sharp dispatch and combine keep each slot close to one token.
# Validation loss right after upcycling the digits ViT (dense 0.699; expert choice C = 2: 0.709): scale 1 (vmoe's
# from-scratch init) 0.730, 10: 0.725, 30: 0.712, 100: 0.705, 300: 0.705 (benchmarks/results/digits_upcycled_start.md)
SOFT_UPCYCLING_SCALE = 100.0

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


PREFIX_TOKENS = ('compete', 'always')


def _priority_tokens(model: nn.Module, prefix_tokens: str) -> int:
    """How many leading tokens of an image the routers process first (`prefix_tokens` option)."""
    if prefix_tokens not in PREFIX_TOKENS:
        raise ValueError(f'prefix_tokens={prefix_tokens!r} is not valid; accepted: {", ".join(PREFIX_TOKENS)}')
    return int(model.num_prefix_tokens) if prefix_tokens == 'always' else 0


def replace_mlps_with_moe(
        model: Backbone,
        moe_blocks: Optional[MoeBlocks] = None,
        num_experts: int = 32,
        expert_init: str = 'copy',
        drop_ratio: float = 0.5,
        prefix_tokens: str = 'compete',
        **moe_kwargs,
) -> Dict[str, Any]:
    """Replace, in place, the MLP of the chosen blocks by a randomly initialised `MoeMlp`.

    Returns the MoE configuration, also stored as `model.moe_config` (block indices resolved).
    """
    _check_backbone(model)
    check_expert_init(expert_init, drop_ratio)
    priority_tokens = _priority_tokens(model, prefix_tokens)
    indices = resolve_moe_blocks(moe_blocks, len(model.blocks))
    mlps = {i: _block_mlp(model, i) for i in indices}  # refuse before changing any block
    for i, mlp in mlps.items():
        if isinstance(mlp, MoeMlp):
            raise ValueError(f'block {i} is already an MoE layer; upcycle a dense model')
    for i, mlp in mlps.items():
        ref = next(mlp.parameters())
        moe = MoeMlp.from_mlp(mlp, num_experts, priority_tokens=priority_tokens, **moe_kwargs)
        moe = moe.to(device=ref.device, dtype=ref.dtype)
        moe.layer_name = f'blocks.{i}.mlp'
        model.blocks[i].mlp = moe
    model.moe_config = dict(num_experts=num_experts, moe_blocks=indices, expert_init=expert_init,
                            drop_ratio=drop_ratio, prefix_tokens=prefix_tokens, **moe_kwargs)
    return model.moe_config


def upcycle(
        dense_model: Backbone,
        num_experts: int = 32,
        moe_blocks: Optional[MoeBlocks] = None,
        router: str = 'expert_choice',
        capacity_factor: float = 2.0,
        top_k: int = 2,
        router_norm: bool = False,
        expert_init: str = 'copy',
        capacity_multiple_of: Optional[int] = None,
        drop_ratio: float = 0.5,
        output_scale: bool = False,
        prefix_tokens: str = 'compete',
        **router_kwargs: Any,
) -> Backbone:
    """Return a new MoE model upcycled from `dense_model` (which is left unchanged).

    Args:
        dense_model: any timm VisionTransformer (class token or not, registers, layer scale, qk-norm, any pooling,
            MLP: Mlp, GluMlp / SwiGLUPacked, SwiGLU, GatedMlp) or Eva (EVA02, rope, SwiGLU with hidden norm).
        num_experts: experts per MoE layer (32 in the paper).
        moe_blocks: blocks to convert: None = last half, int N = last N, 'every_other', or a list of indices.
        router: 'expert_choice' (default for vision), 'token_choice' or 'soft' (Soft MoE).
        capacity_factor: C (2.0 in the paper).
        top_k: experts per token for 'token_choice'.
        router_norm: rescale each token's combine weights to sum to 1.
        expert_init: 'copy' (every expert = the dense MLP), 'random' (ablation) or 'drop' (Drop-Upcycling: copy,
            then re-initialise `drop_ratio` of each expert's hidden units; Nakamura et al., 2025).
        capacity_multiple_of: round capacity up to a multiple of this (V-MoE uses 4).
        drop_ratio: with expert_init='drop', the fraction of each expert's hidden units re-initialised.
        output_scale: a learnable output scale per MoE layer initialised to E / C (a near function-preserving start).
        prefix_tokens: 'compete' (class token and registers compete for expert slots like patches, as in the
            paper) or 'always' (every expert processes them in its first slots; token choice: they claim their
            experts first).
        router_kwargs: batch_priority, aux_loss_weight, z_loss_weight (token choice); slots_per_expert, soft_scale
            (router='soft'; soft_scale defaults to 100 here, the measured upcycling start); num_shared_experts,
            expert_granularity (see `vit_moe.models.UpcycledMoE`).
    """
    _check_backbone(dense_model)
    if router == 'soft':
        router_kwargs.setdefault('soft_scale', SOFT_UPCYCLING_SCALE)
    moe_model = copy.deepcopy(dense_model)
    replace_mlps_with_moe(
        moe_model, moe_blocks, num_experts, expert_init, drop_ratio, prefix_tokens, router=router,
        capacity_factor=capacity_factor, top_k=top_k, router_norm=router_norm,
        capacity_multiple_of=capacity_multiple_of, output_scale=output_scale, **router_kwargs)
    moe_model.load_state_dict(convert_dense_to_moe(dense_model.state_dict(), moe_model, expert_init=expert_init,
                                                   drop_ratio=drop_ratio))
    return moe_model
