"""vit-moe: sparse upcycling of timm Vision Transformers into Mixture-of-Experts.

Importing this package registers the `*_moe_upcycled` models (ViT, DINOv2, DeiT3, SigLIP, CLIP, EVA02) with timm; it needs only torch, timm and
safetensors. Subpackages:

* `vit_moe.layers`: routers, stacked experts, the MoE MLP layer, routing capture,
* `vit_moe.models`: dense -> MoE conversion, `upcycle()`, the registered models, checkpoint loading,
* `vit_moe.data`: ImageNet-style folders with clear errors, timm transforms, the digits demo data,
* `vit_moe.training`: config, schedules, the Accelerate training loop, evaluation (`pip install vit-moe[train]`),
* `vit_moe.onnx`: export, ONNX Runtime inference and benchmarks (`pip install vit-moe[onnx]`).
"""
from .layers import (
    ExpertChoiceRouter, ExpertMlps, MoeConfig, MoeMlp, Routing, RoutingCapture, SoftMoeMlp, StackedLinear,
    TokenChoiceRouter, capture_routing, create_router, moe_layer_like, moe_layers,
)
from .models import (
    DENSE_SOURCES, CheckpointMismatchError, EvaMoE, VisionTransformerMoE, convert_dense_to_moe,
    create_model_from_checkpoint, is_moe_state_dict, replace_mlps_with_moe, resolve_moe_blocks, save_trained_model, upcycle,
)

from ._cli import leave as exit_process  # end a process of a distributed launch without a Gloo abort

__version__ = '0.4.0'
