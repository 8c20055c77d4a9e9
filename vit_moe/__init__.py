"""vit-moe: sparse upcycling of timm Vision Transformers into Mixture-of-Experts.

Importing this package registers the `*_moe_upcycled` models with timm.
"""
from .conversion import CheckpointMismatchError, convert_dense_to_moe, is_moe_state_dict, resolve_moe_blocks
from .experts import ExpertMlps, StackedLinear
from .metrics import collect_moe_metrics, moe_layers
from .moe_mlp import MoeMlp
from .onnx_export import OnnxExportError, check_onnx_parity, export_onnx
from .onnx_runtime import OnnxClassifier, evaluate_onnx
from .routers import (
    ExpertChoiceRouter, Routing, TokenChoiceRouter, create_router, expert_choice_capacity, token_choice_capacity,
)
from .upcycle import replace_mlps_with_moe, upcycle
from .vision_transformer_moe import DENSE_SOURCES, VisionTransformerMoE

__version__ = '0.1.0'
