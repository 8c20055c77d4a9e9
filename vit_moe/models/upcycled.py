""" What every registered upcycled model shares, whatever its timm backbone class (VisionTransformer, Eva).

* `UpcycledMoE`: a mixin that takes the MoE arguments, builds the backbone, then replaces the chosen blocks' MLPs
  with `MoeMlp` layers (`VisionTransformerMoE = UpcycledMoE + VisionTransformer`, `EvaMoE = UpcycledMoE + Eva`).
* `upcycling_filter(dense_filter)`: the pretrained filter: the backbone's own timm filter (foreign formats,
  pos-embed resampling), then dense -> MoE conversion, with errors that name the weights and the model.
* `create_upcycled`: timm's `build_model_with_cfg` with a meta-device pre-check that refuses a local checkpoint
  which does not fit before timm reads it.
* `cfg_from_dense`: a registered model's pretrained cfg is its dense source's (mean/std, input size, Hub id).
* `DENSE_SOURCES`: registered name -> the dense timm weights it is upcycled from (filled by the model modules).
"""
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Type

import torch
import torch.nn as nn
from safetensors import safe_open
from timm.models import build_model_with_cfg, clean_state_dict, get_pretrained_cfg, resolve_pretrained_cfg

from ..layers import MoeConfig
from .conversion import CheckpointMismatchError, convert_dense_to_moe
from .upcycle import replace_mlps_with_moe

__all__ = ['UpcycledMoE', 'upcycling_filter', 'create_upcycled', 'cfg_from_dense', 'DENSE_SOURCES',
           'without_unused_saved_options', 'block_classes']

_logger = logging.getLogger(__name__)

# registered name -> dense timm weights ('<architecture>.<tag>') it is upcycled from
DENSE_SOURCES: Dict[str, str] = {}

ACCEPTED_CHECKPOINTS = ('Accepted: a dense checkpoint of this backbone and size (its MLPs become the experts), or an '
                        'MoE one saved with the same model arguments')


class UpcycledMoE:
    """Mixin for a timm backbone class whose chosen blocks get an MoE MLP; put it first in the bases.

    Takes the MoE options (`vit_moe.layers.MoeConfig`: num_experts, moe_blocks, router, capacity_factor, top_k,
    router_norm, expert_init, drop_ratio, output_scale, prefix_tokens, num_shared_experts, expert_granularity,
    slots_per_expert, soft_scale, capacity_multiple_of, batch_priority, aux_loss_weight, z_loss_weight) as flat
    keyword arguments, validated into one `MoeConfig` (`self.moe_config`); every other keyword argument is the
    backbone's. Shared experts are upcycled with every copy's fc2 scaled by 1 / (S + 1), so that with every slot
    filled the layer is the dense MLP; Soft MoE's `soft_scale` defaults to 100, the upcycling start measured on the
    digits (vmoe trains from 1).
    """

    def __init__(self, **kwargs: Any):
        config, backbone_kwargs = MoeConfig.from_kwargs(kwargs)
        super().__init__(**backbone_kwargs)
        replace_mlps_with_moe(self, config)  # sets self.moe_config
        self._no_split_modules = block_classes(self)  # the FSDP units Accelerate wraps when its config names none


def block_classes(model: nn.Module) -> List[str]:
    """Class names of the model's transformer blocks (`model.blocks`, as timm's ViT and Eva keep them)."""
    return sorted({type(block).__name__ for block in getattr(model, 'blocks', ())})


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


def _model_summary(model: nn.Module) -> str:
    moe = model.moe_config
    return (f'{model.pretrained_cfg.get("architecture", type(model).__name__)} with patch_size='
            f'{model.patch_embed.patch_size[0]}, embed_dim={model.embed_dim}, depth={len(model.blocks)}, '
            f'num_experts={moe.num_experts}, moe_blocks={moe.moe_blocks}')


def upcycling_filter(dense_filter: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
    """A timm pretrained filter: `dense_filter` (the backbone's own), then dense -> MoE conversion."""

    def checkpoint_filter_fn(state_dict: Dict[str, Any], model: nn.Module, **kwargs) -> Dict[str, Any]:
        """Raises CheckpointMismatchError naming the weights file (or Hub id), the model, the mismatched keys and
        shapes, and what is accepted."""
        state_dict = dense_filter(clean_state_dict(state_dict), model, **kwargs)  # no _orig_mod. / module.
        cfg = getattr(model, 'pretrained_cfg', None) or {}
        classifiers = cfg.get('classifier') or ()
        classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
        adapting_head = model.num_classes != cfg.get('num_classes', model.num_classes)
        try:
            return convert_dense_to_moe(
                state_dict, model, expert_init=model.moe_config.expert_init,
                drop_ratio=model.moe_config.drop_ratio or 0.5,
                ignore_shape_of=tuple(c + '.' for c in classifiers) if adapting_head else ())
        except CheckpointMismatchError as e:
            raise CheckpointMismatchError(
                f'{_weights_location(cfg)} does not fit {_model_summary(model)}: {e.details}. {ACCEPTED_CHECKPOINTS}',
                e.details) from e

    return checkpoint_filter_fn


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


def _refuse_mismatch_before_loading(model_cls: Type[nn.Module], variant: str, path: str,
                                    checkpoint_filter: Callable[..., Dict[str, Any]], kwargs: Dict[str, Any]) -> None:
    """Run the checkpoint filter on a meta-device model and the file's shapes: a checkpoint that does not fit is
    refused before timm reads it (and logs "Loaded ... from checkpoint"). Costs a model build on the meta device."""
    build_kwargs = {k: v for k, v in kwargs.items() if k not in ('features_only', 'feature_cls')}
    try:
        state_dict = _meta_state_dict(path)
        with torch.device('meta'):
            model = build_model_with_cfg(model_cls, variant, False, **build_kwargs)
        checkpoint_filter(state_dict, model)
    except CheckpointMismatchError:
        raise
    except Exception as e:  # invalid arguments, unusual files: the real build and load report them
        _logger.debug('checkpoint pre-check of %s skipped: %s', path, e)


def without_unused_saved_options(kwargs: Dict[str, Any], saved_args: Dict[str, Any]) -> Dict[str, Any]:
    """`kwargs` without the MoE options that came from a config.json's `saved_args` and that the saved router gives no
    meaning (vit-moe <= 0.2 accepted them and computed nothing with them): the folder loads and computes as before.
    Options the caller gave (or changed) stay, and are refused as usual."""
    unused = [k for k in MoeConfig.unused_options(kwargs) if k in saved_args and saved_args[k] == kwargs[k]]
    if unused:
        _logger.warning(f'ignoring {", ".join(f"{k}={kwargs[k]!r}" for k in unused)} saved in config.json: '
                        f'router={kwargs.get("router", "expert_choice")!r} does not use them (vit-moe <= 0.2 '
                        f'accepted and ignored them)')
    return {k: v for k, v in kwargs.items() if k not in unused}


def _saved_model_args(cfg: Dict[str, Any]) -> Dict[str, Any]:
    config = Path(cfg.get('file') or '') / 'config.json'
    try:
        return dict(json.loads(config.read_text()).get('model_args') or {})
    except (OSError, ValueError, AttributeError):
        return {}


def create_upcycled(model_cls: Type[nn.Module], variant: str, pretrained: bool,
                    checkpoint_filter: Callable[..., Dict[str, Any]], **kwargs) -> nn.Module:
    """timm's build_model_with_cfg for an `UpcycledMoE` class; a local checkpoint is checked on the meta device."""
    out_indices = kwargs.pop('out_indices', 3)
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        if cfg.to_dict().get('source') == 'local-dir':  # timm merged the folder's config.json model_args in
            kwargs = without_unused_saved_options(kwargs, _saved_model_args(cfg.to_dict()))
        path = _local_weights_file(cfg.to_dict())
        _check_pretrained_file(path)
        if path:
            _refuse_mismatch_before_loading(model_cls, variant, path, checkpoint_filter, kwargs)
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def cfg_from_dense(dense: str) -> Dict[str, Any]:
    """The dense source's pretrained cfg (input size, mean/std, crop, classifier, Hub id), naming its source."""
    cfg = get_pretrained_cfg(dense)
    if cfg is None:
        raise ValueError(f'dense source {dense!r} has no pretrained cfg in this timm')
    cfg = cfg.to_dict()
    for key in ('url', 'custom_load', 'architecture', 'tag'):  # load the Hub safetensors, through our filter
        cfg.pop(key, None)
    return dict(
        cfg,
        paper_ids='arXiv:2212.05055',
        paper_name='Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints',
        notes=(f'dense_source={dense}', 'experts copied from the dense MLP at load time'),
    )


def upcycled_cfgs(sources: Dict[str, str]) -> Dict[str, Dict[str, Any]]:
    """timm default_cfgs entries '<name>.<dense tag>' for {registered name: dense source}; records the sources."""
    DENSE_SOURCES.update(sources)
    return {f'{name}.{dense.split(".", 1)[1]}': cfg_from_dense(dense) for name, dense in sources.items()}
