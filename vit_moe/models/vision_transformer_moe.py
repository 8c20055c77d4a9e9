""" Upcycled Vision Transformer Mixture-of-Experts models for timm (timm's `VisionTransformer` backbone).

Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints (Komatsuzaki et al., 2022)
    https://arxiv.org/abs/2212.05055
Mixture-of-Experts with Expert Choice Routing (Zhou et al., 2022) https://arxiv.org/abs/2202.09368

A `VisionTransformerMoE` is timm's `VisionTransformer` with the MLP of some blocks replaced by
`MoeMlp`; every other part of the timm model contract is inherited. `pretrained=True` loads the
*dense* timm weights (Hub, or `pretrained_cfg_overlay=dict(file=...)`) and upcycles them in the
checkpoint filter; a file that already holds MoE weights loads as-is.

Registered families (MoE in the last half of the blocks, 32 experts, expert choice, C = 2; each model's
arguments are its dense source's timm entrypoint's): augreg ViT-Ti/S/B/L/16, DINOv2 S/B/L/g/14 (with and without
4 registers; giant has SwiGLU-packed MLPs), DeiT3-B/16, SigLIP B/16 (MAP head, no class token), CLIP B/16
(OpenAI, quick_gelu, pre-norm).
"""
from functools import partial

import torch.nn as nn
from timm.layers import LayerNorm, SwiGLUPacked
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from .upcycled import UpcycledMoE, create_upcycled, upcycled_cfgs, upcycling_filter

__all__ = ['VisionTransformerMoE']


class VisionTransformerMoE(UpcycledMoE, VisionTransformer):
    """timm VisionTransformer whose chosen blocks have an MoE MLP (arguments: `UpcycledMoE`, then timm's)."""


checkpoint_filter_fn = upcycling_filter(vit_checkpoint_filter_fn)
_deit3_filter_fn = upcycling_filter(partial(vit_checkpoint_filter_fn, adapt_layer_scale=True))


def _create_vit_moe(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    return create_upcycled(VisionTransformerMoE, variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs(upcycled_cfgs({
    'vit_ti16_moe_upcycled': 'vit_tiny_patch16_224.augreg_in21k_ft_in1k',
    'vit_s16_moe_upcycled': 'vit_small_patch16_224.augreg_in21k_ft_in1k',
    'vit_b16_moe_upcycled': 'vit_base_patch16_224.augreg2_in21k_ft_in1k',
    'vit_l16_moe_upcycled': 'vit_large_patch16_224.augreg_in21k_ft_in1k',
    'vit_s14_dinov2_moe_upcycled': 'vit_small_patch14_dinov2.lvd142m',
    'vit_b14_dinov2_moe_upcycled': 'vit_base_patch14_dinov2.lvd142m',
    'vit_l14_dinov2_moe_upcycled': 'vit_large_patch14_dinov2.lvd142m',
    'vit_g14_dinov2_moe_upcycled': 'vit_giant_patch14_dinov2.lvd142m',
    'vit_s14_reg4_dinov2_moe_upcycled': 'vit_small_patch14_reg4_dinov2.lvd142m',
    'vit_b14_reg4_dinov2_moe_upcycled': 'vit_base_patch14_reg4_dinov2.lvd142m',
    'vit_l14_reg4_dinov2_moe_upcycled': 'vit_large_patch14_reg4_dinov2.lvd142m',
    'deit3_b16_moe_upcycled': 'deit3_base_patch16_224.fb_in22k_ft_in1k',
    'vit_b16_siglip_moe_upcycled': 'vit_base_patch16_siglip_224.v2_webli',
    'vit_b16_clip_moe_upcycled': 'vit_base_patch16_clip_quickgelu_224.openai',
}))


@register_model
def vit_ti16_moe_upcycled(pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    """ViT-Ti/16 with MoE (E=32, expert choice C=2) in the last 6 blocks, from vit_tiny_patch16_224."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_vit_moe('vit_ti16_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_s16_moe_upcycled(pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    """ViT-S/16 with MoE (E=32, expert choice C=2) in the last 6 blocks, from vit_small_patch16_224."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_vit_moe('vit_s16_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_b16_moe_upcycled(pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    """ViT-B/16 with MoE (E=32, expert choice C=2) in the last 6 blocks, from vit_base_patch16_224."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_vit_moe('vit_b16_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_l16_moe_upcycled(pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    """ViT-L/16 with MoE (E=32, expert choice C=2) in the last 12 blocks, from vit_large_patch16_224."""
    model_args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create_vit_moe('vit_l16_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_s14_dinov2_moe_upcycled(pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    """DINOv2 ViT-S/14 (LayerScale, 518 px) with MoE in the last 6 blocks, from vit_small_patch14_dinov2."""
    model_args = dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5)
    return _create_vit_moe('vit_s14_dinov2_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_b14_dinov2_moe_upcycled(pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    """DINOv2 ViT-B/14 with MoE in the last 6 blocks, from vit_base_patch14_dinov2."""
    model_args = dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5)
    return _create_vit_moe('vit_b14_dinov2_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_l14_dinov2_moe_upcycled(pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    """DINOv2 ViT-L/14 with MoE in the last 12 blocks, from vit_large_patch14_dinov2."""
    model_args = dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5)
    return _create_vit_moe('vit_l14_dinov2_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_g14_dinov2_moe_upcycled(pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    """DINOv2 ViT-g/14 (SwiGLU-packed MLPs) with MoE in the last 20 blocks, from vit_giant_patch14_dinov2."""
    model_args = dict(patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                      mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    return _create_vit_moe('vit_g14_dinov2_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_s14_reg4_dinov2_moe_upcycled(pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    """DINOv2 ViT-S/14 with 4 registers, MoE in the last 6 blocks, from vit_small_patch14_reg4_dinov2."""
    model_args = dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5, reg_tokens=4,
                      no_embed_class=True)
    return _create_vit_moe('vit_s14_reg4_dinov2_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_b14_reg4_dinov2_moe_upcycled(pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    """DINOv2 ViT-B/14 with 4 registers, MoE in the last 6 blocks, from vit_base_patch14_reg4_dinov2."""
    model_args = dict(patch_size=14, embed_dim=768, depth=12, num_heads=12, init_values=1e-5, reg_tokens=4,
                      no_embed_class=True)
    return _create_vit_moe('vit_b14_reg4_dinov2_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_l14_reg4_dinov2_moe_upcycled(pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    """DINOv2 ViT-L/14 with 4 registers, MoE in the last 12 blocks, from vit_large_patch14_reg4_dinov2."""
    model_args = dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5, reg_tokens=4,
                      no_embed_class=True)
    return _create_vit_moe('vit_l14_reg4_dinov2_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def deit3_b16_moe_upcycled(pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    """DeiT III ViT-B/16 (LayerScale) with MoE in the last 6 blocks, from deit3_base_patch16_224."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, no_embed_class=True, init_values=1e-6)
    return create_upcycled(VisionTransformerMoE, 'deit3_b16_moe_upcycled', pretrained, _deit3_filter_fn,
                           **dict(model_args, **kwargs))


@register_model
def vit_b16_siglip_moe_upcycled(pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    """SigLIP 2 ViT-B/16 (no class token, MAP head) with MoE in the last 6 blocks, from vit_base_patch16_siglip_224."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, class_token=False, global_pool='map')
    return _create_vit_moe('vit_b16_siglip_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def vit_b16_clip_moe_upcycled(pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    """OpenAI CLIP ViT-B/16 (quick_gelu, pre-norm) with MoE in the last 6 blocks, from
    vit_base_patch16_clip_quickgelu_224."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, pre_norm=True,
                      norm_layer=partial(LayerNorm, eps=1e-5), act_layer='quick_gelu')
    return _create_vit_moe('vit_b16_clip_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))
