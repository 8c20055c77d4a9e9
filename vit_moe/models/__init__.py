"""Upcycled ViT-MoE models: dense -> MoE conversion rules, `upcycle()`, the timm-registered architectures."""
from .conversion import (
    UPCYCLE_RULES, CheckpointMismatchError, ConversionRule, convert_dense_to_moe, is_moe_state_dict, resolve_moe_blocks,
)
from .loading import (
    checkpoint_label_names, checkpoint_num_classes, create_model_from_checkpoint, saved_architecture, take_capacity_factor,
)
from .saving import save_trained_model, trained_model_config
from .upcycle import replace_mlps_with_moe, upcycle
from .upcycled import DENSE_SOURCES, UpcycledMoE
from .vision_transformer_moe import VisionTransformerMoE
from .eva_moe import EvaMoE
