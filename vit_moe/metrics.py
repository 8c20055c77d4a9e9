""" Collect the routing metrics that MoE layers keep beside their output after a forward. """
from typing import Any, Dict

import torch
import torch.nn as nn

from .moe_mlp import MoeMlp

__all__ = ['collect_moe_metrics', 'moe_layers']


def moe_layers(model: nn.Module) -> Dict[str, MoeMlp]:
    """Name -> MoeMlp for every MoE layer of a model (empty for a dense model)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoeMlp)}


def collect_moe_metrics(model: nn.Module) -> Dict[str, Any]:
    """Metrics of the last forward of `model`.

    Returns:
        dict with
        - `aux_loss`: scalar tensor (with grad) to add to the task loss; 0 for a dense model or expert choice,
        - `dropped_fraction`: mean over layers (float) of tokens routed to no expert (expert choice) or of
          assignments dropped over capacity (token choice),
        - `layers`: {layer name: {'expert_load': [E], 'importance': [E], 'dropped_fraction': scalar}} (detached).
    """
    layers = moe_layers(model)
    routings = {name: m.last_routing for name, m in layers.items() if m.last_routing is not None}
    device = next(model.parameters()).device
    aux_loss = sum((r.aux_loss for r in routings.values()), torch.zeros((), device=device))
    dropped = [float(r.metrics['dropped_fraction']) for r in routings.values()]
    return dict(
        aux_loss=aux_loss,
        dropped_fraction=sum(dropped) / len(dropped) if dropped else 0.0,
        layers={name: r.metrics for name, r in routings.items()},
    )
