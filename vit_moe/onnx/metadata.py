""" What an exported file carries besides the graph: timm's data config, class count, label names and the
capacity factor of each MoE layer (the one the graph's static capacity was computed with). """
import json
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch

from ..data import data_config_for

__all__ = ['METADATA_KEY', 'ROUTING_OUTPUTS_KEY', 'INT8_KEY', 'model_metadata', 'read_metadata']

METADATA_KEY = 'timm_data_config'  # ONNX metadata_props key holding the JSON below
ROUTING_OUTPUTS_KEY = 'vit_moe_routing_outputs'  # a debug export's MoE layer names, in output order
INT8_KEY = 'vit_moe_int8'  # an int8 file's target CPU: {target, reduce_range, chosen, onnxruntime}


def model_metadata(model: torch.nn.Module, size: Tuple[int, int]) -> Dict[str, Any]:
    """timm data config at `size`, plus num_classes, label_names and architecture of `model`."""
    from ..layers import capacity_factors
    config = data_config_for(model, (3, *size))
    cfg = getattr(model, 'pretrained_cfg', {}) or {}
    return dict(config, num_classes=getattr(model, 'num_classes', None), label_names=cfg.get('label_names'),
                architecture=cfg.get('architecture'), capacity_factor=capacity_factors(model) or None)


def read_metadata(path: Union[str, Path]) -> Dict[str, Any]:
    """What an exported file says of itself, without loading its weights: the `model_metadata` it was exported with
    (architecture, capacity_factor per MoE layer, data config, ...) and `int8` (its int8 target, or None)."""
    import onnx
    from google.protobuf.message import DecodeError
    try:
        model = onnx.load(str(path), load_external_data=False)
    except DecodeError as e:
        raise ValueError(f'{str(path)!r} is not an ONNX model; expected an .onnx file written by '
                         f'vit_moe.onnx.export_onnx / export/onnx_export.py (onnx: {e})') from e
    props = {p.key: p.value for p in model.metadata_props}
    return dict(json.loads(props.get(METADATA_KEY, '{}')), int8=json.loads(props[INT8_KEY]) if INT8_KEY in props
                else None)
