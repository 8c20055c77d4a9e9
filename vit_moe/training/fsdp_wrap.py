""" FSDP2 units from the model itself: every transformer block class the model has, whatever the family.

Accelerate's FSDP2 plugin wraps the classes its config names (`fsdp_transformer_layer_cls_to_wrap`), or, when it
names none, the model's `_no_split_modules` (the Hugging Face convention). A fixed name (timm's `Block`) misses Eva's
`EvaBlock` and any other family's block: `wrap_every_block` sets `_no_split_modules` to the classes of the model's
`blocks` and, where the config names a class the model does not have, replaces that list by them (with a warning).
The shipped configs name none.
"""
import logging
from typing import List

import torch.nn as nn

from ..models.upcycled import block_classes

__all__ = ['wrap_every_block']

_logger = logging.getLogger(__name__)


def wrap_every_block(model: nn.Module, fsdp_plugin) -> List[str]:
    """Make every block of `model` an FSDP unit under `fsdp_plugin` (Accelerate's); returns the class names."""
    classes = block_classes(model)
    if not classes:
        return []
    model._no_split_modules = classes  # what Accelerate's transformer-based policy wraps when the config names none
    named = getattr(fsdp_plugin, 'transformer_cls_names_to_wrap', None)
    present = {type(m).__name__ for m in model.modules()}
    if named and not set(named) <= present:
        _logger.warning(f'the FSDP config wraps {", ".join(named)}, which {type(model).__name__} does not have; '
                        f'wrapping its blocks instead: {", ".join(classes)}')
        fsdp_plugin.transformer_cls_names_to_wrap = None
    return classes
