""" timm's data config and transforms with the input size a model was built for. """
from typing import Any, Dict

import torch
from timm.data import create_transform, resolve_data_config

__all__ = ['data_config_for', 'build_transforms']


def data_config_for(model: torch.nn.Module, input_size=None) -> Dict[str, Any]:
    """timm's data config (mean, std, crop, interpolation) with the input size the model was built for."""
    data_config = resolve_data_config({}, model=model)
    img_size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if input_size:
        data_config['input_size'] = tuple(input_size)
    elif img_size:
        data_config['input_size'] = (3, *img_size)
    return data_config


def build_transforms(data_config: Dict, cfg, is_training: bool):
    """timm transforms with the model's size, mean, std, crop and interpolation."""
    if not is_training:
        return create_transform(**data_config, is_training=False)
    return create_transform(
        **data_config, is_training=True, scale=tuple(cfg.scale), hflip=cfg.hflip, auto_augment=cfg.rand_augment,
        color_jitter=cfg.color_jitter)
