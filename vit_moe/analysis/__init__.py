"""Routing analysis of MoE models: statistics from captured routing tensors, figures, and the routing report.

`routing_report(model, data_dir, output_dir, ...)` writes report.md, report.json and PNG figures (matplotlib: the
`[report]` extra, imported only when drawing). The statistics (`vit_moe.analysis.routing_stats`) need only torch
and numpy.
"""
from .routing_report import (
    DEFAULT_BACKGROUND_THRESHOLD, format_report, load_report_models, moe_layer_info, routing_report,
)
from .routing_stats import (
    BACKGROUND, CATEGORIES, OBJECT, PREFIX, LayerStats, compute_layer_stats, count_histogram, experts_per_token,
    filled_slots, patch_categories, patch_intensity, token_expert_mask, token_expert_weights, top_expert,
)
