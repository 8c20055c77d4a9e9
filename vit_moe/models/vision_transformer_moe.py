""" Upcycled Vision Transformer Mixture-of-Experts models for timm.

Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints (Komatsuzaki et al., 2022)
    https://arxiv.org/abs/2212.05055
Mixture-of-Experts with Expert Choice Routing (Zhou et al., 2022) https://arxiv.org/abs/2202.09368

A `VisionTransformerMoE` is timm's `VisionTransformer` with the MLP of some blocks replaced by
`MoeMlp`; every other part of the timm model contract is inherited. `pretrained=True` loads the
*dense* timm weights (Hub, or `pretrained_cfg_overlay=dict(file=...)`) and upcycles them in the
checkpoint filter; a file that already holds MoE weights loads as-is.
"""
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors import safe_open
from timm.models import (
    build_model_with_cfg, clean_state_dict, generate_default_cfgs, get_pretrained_cfg, register_model,
    resolve_pretrained_cfg,
)
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from .conversion import CheckpointMismatchError, MoeBlocks, convert_dense_to_moe
from .upcycle import replace_mlps_with_moe

__all__ = ['VisionTransformerMoE', 'DENSE_SOURCES']

_logger = logging.getLogger(__name__)


class VisionTransformerMoE(VisionTransformer):
    """timm VisionTransformer whose chosen blocks have an MoE MLP.

    Args:
        num_experts: experts per MoE layer.
        moe_blocks: None = last half of the blocks, int N = last N, 'every_other', or a list of indices.
        router: 'expert_choice' or 'token_choice'.
        capacity_factor: C; expert choice capacity = ceil(C * tokens / E).
        top_k: experts per token (token choice).
        router_norm: rescale each token's combine weights to sum to 1.
        expert_init: 'copy' (experts = dense MLP when loading a dense checkpoint), 'random' or 'drop'
            (Drop-Upcycling).
        drop_ratio: fraction of each expert's hidden units re-initialised with expert_init='drop'.
        output_scale: a learnable output scale per MoE layer initialised to E / C (see `vit_moe.layers.MoeMlp`).
        capacity_multiple_of: round capacity up to a multiple of this.
        batch_priority, aux_loss_weight, z_loss_weight: token choice options.
        **kwargs: timm VisionTransformer arguments.
    """

    def __init__(
            self,
            num_experts: int = 32,
            moe_blocks: Optional[MoeBlocks] = None,
            router: str = 'expert_choice',
            capacity_factor: float = 2.0,
            top_k: int = 2,
            router_norm: bool = False,
            expert_init: str = 'copy',
            capacity_multiple_of: Optional[int] = None,
            batch_priority: bool = True,
            aux_loss_weight: float = 0.01,
            z_loss_weight: float = 0.0,
            drop_ratio: float = 0.5,
            output_scale: bool = False,
            **kwargs: Any,
    ):
        super().__init__(**kwargs)
        router_kwargs = dict(batch_priority=batch_priority, aux_loss_weight=aux_loss_weight,
                             z_loss_weight=z_loss_weight) if router == 'token_choice' else {}
        replace_mlps_with_moe(  # sets self.moe_config
            self, moe_blocks, num_experts, expert_init, drop_ratio, router=router, capacity_factor=capacity_factor,
            top_k=top_k, router_norm=router_norm, capacity_multiple_of=capacity_multiple_of, output_scale=output_scale,
            **router_kwargs)


ACCEPTED_CHECKPOINTS = (
    'Accepted: a dense ViT checkpoint with the model\'s patch size, embed_dim, depth and MLP size (its MLPs become the '
    'experts), or an MoE checkpoint saved from a model built with the same arguments (num_experts, moe_blocks)')


def _weights_location(cfg: Dict[str, Any]) -> str:
    """The weights timm loads for pretrained_cfg `cfg` (in timm's order of precedence), as the user named them."""
    if cfg.get('source') == 'hf-hub':
        return f"Hugging Face Hub weights '{cfg.get('hf_hub_id')}'"
    if cfg.get('source') == 'local-dir':
        weights = Path(cfg.get('file') or '') / 'model.safetensors'
        return f"file '{weights}'" if weights.is_file() else f"local-dir folder '{cfg.get('file')}'"
    if cfg.get('state_dict') is not None:
        return 'the state_dict in pretrained_cfg'
    if cfg.get('file'):
        return f"file '{cfg['file']}'"
    if cfg.get('hf_hub_id'):
        return f"Hugging Face Hub weights '{cfg['hf_hub_id']}'"
    return f"url '{cfg.get('url')}'"


def _model_summary(model: VisionTransformerMoE) -> str:
    moe = model.moe_config
    return (f'{model.pretrained_cfg.get("architecture", type(model).__name__)} with patch_size='
            f'{model.patch_embed.patch_size[0]}, embed_dim={model.embed_dim}, depth={len(model.blocks)}, '
            f'num_experts={moe["num_experts"]}, moe_blocks={moe["moe_blocks"]}')


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: VisionTransformerMoE, **kwargs) -> Dict[str, Any]:
    """timm's ViT filter (foreign formats, pos-embed / patch resampling), then dense -> MoE conversion.

    Raises:
        CheckpointMismatchError: naming the weights file (or Hub id), the model, the mismatched keys and shapes, and
            what is accepted.
    """
    state_dict = vit_checkpoint_filter_fn(clean_state_dict(state_dict), model, **kwargs)  # no _orig_mod. / module.
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    classifiers = cfg.get('classifier') or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    adapting_head = model.num_classes != cfg.get('num_classes', model.num_classes)
    try:
        return convert_dense_to_moe(
            state_dict, model, expert_init=model.moe_config['expert_init'],
            drop_ratio=model.moe_config.get('drop_ratio', 0.5),
            ignore_shape_of=tuple(c + '.' for c in classifiers) if adapting_head else ())
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(
            f'{_weights_location(cfg)} does not fit {_model_summary(model)}. {e}. {ACCEPTED_CHECKPOINTS}') from e


def _local_weights_file(cfg: Dict[str, Any]) -> Optional[str]:
    """The local file timm will load for pretrained_cfg `cfg` through the generic path, or None."""
    if cfg.get('custom_load') or cfg.get('source') == 'hf-hub' or cfg.get('state_dict') is not None:
        return None
    if cfg.get('source') == 'local-dir':
        folder = Path(cfg.get('file') or '')
        found = [p for p in folder.iterdir() if p.suffix in ('.safetensors', '.pth', '.bin', '.tar')] \
            if folder.is_dir() else []
        if not found:
            raise FileNotFoundError(f"local-dir folder '{folder}' holds no weights; expected model.safetensors (or a "
                                    f".pth / .bin file) beside its config.json")
        weights = folder / 'model.safetensors'
        return str(weights) if weights.is_file() else None  # timm picks among other files itself
    return cfg.get('file') or None


def _check_pretrained_file(path: Optional[str]) -> None:
    """Name the path of a missing or unreadable local checkpoint (timm raises a bare FileNotFoundError)."""
    if not path:
        return
    accepted = 'expected a .safetensors file or a torch.save (zip) .pth/.bin/.pt file'
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint file {path!r} does not exist; {accepted}')
    if str(path).endswith('.safetensors'):
        try:
            with safe_open(path, framework='pt'):
                pass
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f'checkpoint file {path!r} is not a readable safetensors file ({e})') from e
    elif not zipfile.is_zipfile(path):
        raise ValueError(f'checkpoint file {path!r} is not a readable checkpoint; {accepted}')


def _meta_state_dict(path: str) -> Dict[str, Any]:
    """The keys and shapes of a checkpoint file as meta tensors, selected as timm's load_state_dict selects them."""
    if path.endswith('.safetensors'):
        with safe_open(path, framework='pt') as f:
            return {k: torch.empty(f.get_slice(k).get_shape(), device='meta') for k in f.keys()}
    checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    if isinstance(checkpoint, dict):
        for key in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
            if checkpoint.get(key) is not None:
                checkpoint = checkpoint[key]
                break
    return {k: torch.empty(v.shape, dtype=v.dtype, device='meta') if isinstance(v, torch.Tensor) else v
            for k, v in clean_state_dict(checkpoint).items()}


def _refuse_mismatch_before_loading(variant: str, path: str, kwargs: Dict[str, Any]) -> None:
    """Run the checkpoint filter on a meta-device model and the file's shapes: a checkpoint that does not fit is
    refused before timm reads it (and logs "Loaded ... from checkpoint"). Costs a model build on the meta device."""
    build_kwargs = {k: v for k, v in kwargs.items() if k not in ('features_only', 'feature_cls')}
    try:
        state_dict = _meta_state_dict(path)
        with torch.device('meta'):
            model = build_model_with_cfg(VisionTransformerMoE, variant, False, **build_kwargs)
        checkpoint_filter_fn(state_dict, model)
    except CheckpointMismatchError:
        raise
    except Exception as e:  # invalid arguments, unusual files: the real build and load report them
        _logger.debug('checkpoint pre-check of %s skipped: %s', path, e)


def _create_vit_moe(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformerMoE:
    out_indices = kwargs.pop('out_indices', 3)
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        path = _local_weights_file(cfg.to_dict())
        _check_pretrained_file(path)
        if path:
            _refuse_mismatch_before_loading(variant, path, kwargs)
    return build_model_with_cfg(
        VisionTransformerMoE,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


# registered name -> dense timm weights it is upcycled from
DENSE_SOURCES = {
    'vit_ti16_moe_upcycled': 'vit_tiny_patch16_224.augreg_in21k_ft_in1k',
    'vit_s16_moe_upcycled': 'vit_small_patch16_224.augreg_in21k_ft_in1k',
    'vit_b16_moe_upcycled': 'vit_base_patch16_224.augreg2_in21k_ft_in1k',
    'vit_l16_moe_upcycled': 'vit_large_patch16_224.augreg_in21k_ft_in1k',
}


def _cfg_from_dense(dense: str) -> Dict[str, Any]:
    """The dense source's pretrained cfg (input size, mean/std, crop, classifier, Hub id), naming its source."""
    cfg = get_pretrained_cfg(dense).to_dict()
    for key in ('url', 'custom_load', 'architecture', 'tag'):  # load the Hub safetensors, through our filter
        cfg.pop(key, None)
    return dict(
        cfg,
        paper_ids='arXiv:2212.05055',
        paper_name='Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints',
        notes=(f'dense_source={dense}', 'experts copied from the dense MLP at load time'),
    )


default_cfgs = generate_default_cfgs({
    f'{name}.{dense.split(".", 1)[1]}': _cfg_from_dense(dense) for name, dense in DENSE_SOURCES.items()
})


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
