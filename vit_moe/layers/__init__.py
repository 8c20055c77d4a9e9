"""MoE building blocks: routers, stacked experts, the MoE MLP layer, routing capture."""
from .experts import (
    EXPERT_BANKS, ExpertGluMlps, ExpertMlps, ExpertSwiGLUs, StackedLayerNorm, StackedLinear, expert_bank_like,
)
from .moe_config import MOE_OPTIONS, SOFT_UPCYCLING_SCALE, MoeConfig
from .moe_mlp import MoeMlp, moe_layers
from .routers import ROUTERS, ExpertChoiceRouter, Routing, TokenChoiceRouter, create_router
from .routing_capture import LayerRouting, RoutingCapture, capture_routing, replay_routing
from .soft_moe import SoftMoeMlp, SoftRouter, soft_moe_layers
from .moe_layer_like import moe_layer_like
from .capacity import capacity_factors, set_capacity_factor, set_moe_config
from .expert_parallel import ExpertParallel, expert_parameter_names, shard_experts, unsharded_state_dict
