""" Upcycled EVA02 Mixture-of-Experts models for timm (timm's `Eva` backbone: rotary embeddings, SwiGLU MLPs).

EVA-02: A Visual Representation for Neon Genesis (Fang et al., 2023) https://arxiv.org/abs/2303.11331

An `EvaMoE` is timm's `Eva` with the MLP of some blocks replaced by `MoeMlp` (same arguments and loading as
`VisionTransformerMoE`). EVA02-T/S use a packed GluMlp (SiLU, gate first), EVA02-B/L a SwiGLU with separate gate and
value projections and a hidden LayerNorm (`scale_mlp`): each maps onto its expert bank key by key.
"""
from timm.models import generate_default_cfgs, register_model
from timm.models.eva import Eva
from timm.models.eva import checkpoint_filter_fn as eva_checkpoint_filter_fn

from .upcycled import UpcycledMoE, create_upcycled, upcycled_cfgs, upcycling_filter

__all__ = ['EvaMoE']


class EvaMoE(UpcycledMoE, Eva):
    """timm Eva whose chosen blocks have an MoE MLP (arguments: `UpcycledMoE`, then timm's Eva)."""


checkpoint_filter_fn = upcycling_filter(eva_checkpoint_filter_fn)


def _create_eva_moe(variant: str, pretrained: bool = False, **kwargs) -> EvaMoE:
    return create_upcycled(EvaMoE, variant, pretrained, checkpoint_filter_fn, **kwargs)


default_cfgs = generate_default_cfgs(upcycled_cfgs({
    'eva02_s14_moe_upcycled': 'eva02_small_patch14_224.mim_in22k',
    'eva02_b14_moe_upcycled': 'eva02_base_patch14_224.mim_in22k',
}))


@register_model
def eva02_s14_moe_upcycled(pretrained: bool = False, **kwargs) -> EvaMoE:
    """EVA02-S/14 (rope, packed SwiGLU) with MoE in the last 6 blocks, from eva02_small_patch14_224."""
    model_args = dict(img_size=224, patch_size=14, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4 * 2 / 3,
                      swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16))
    return _create_eva_moe('eva02_s14_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def eva02_b14_moe_upcycled(pretrained: bool = False, **kwargs) -> EvaMoE:
    """EVA02-B/14 (rope, SwiGLU with hidden norm) with MoE in the last 6 blocks, from eva02_base_patch14_224."""
    model_args = dict(img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12, qkv_fused=False,
                      mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
                      ref_feat_shape=(16, 16))
    return _create_eva_moe('eva02_b14_moe_upcycled', pretrained=pretrained, **dict(model_args, **kwargs))
