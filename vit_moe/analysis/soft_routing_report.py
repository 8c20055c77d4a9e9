""" The routing report of a Soft MoE model (router='soft'): no slot holds a single token, so instead of per-token
expert choices it reports how the slots mix the tokens and how the tokens read the slots, per layer:

* dispatch entropy: how many tokens a slot mixes (exp of it: the effective number; log T = a uniform mix),
* combine entropy: how many slots a token reads (log(E * S) = all of them alike),
* slot similarity: mean cosine similarity of different slots' dispatch weights (1: every slot is the same mix),
* expert importance: each expert's share of the combine weights, overall and per token category (prefix tokens,
  background and object patches, as the slot report defines them).

`routing_report` calls `soft_routing_report` for a model whose MoE layers are Soft MoE layers.
"""
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .routing_pass import RoutingPass
from .routing_stats import BACKGROUND, OBJECT, PREFIX

__all__ = ['soft_routing_report', 'format_soft_report']

_CATEGORIES = (('prefix', PREFIX), ('background', BACKGROUND), ('object', OBJECT))


class _SoftLayerSums:
    """Running sums of one Soft MoE layer's numbers over the images."""

    def __init__(self, num_experts: int):
        self.E = num_experts
        self.images = 0
        self.sums = dict(dispatch_entropy=0.0, combine_entropy=0.0, slot_similarity=0.0)
        self.mass = {name: torch.zeros(num_experts, dtype=torch.float64) for name, _ in _CATEGORIES}
        self.mass['all'] = torch.zeros(num_experts, dtype=torch.float64)
        self.tokens = {name: 0 for name, _ in _CATEGORIES}

    def update(self, metrics: Dict[str, torch.Tensor], per_expert: torch.Tensor, categories: torch.Tensor) -> None:
        """metrics: the layer's batch means; per_expert: [B, T, E] combine mass; categories: [B, T]."""
        B, T, _ = per_expert.shape
        for key in self.sums:
            self.sums[key] += float(metrics[key]) * B
        self.images += B
        self.num_tokens = T
        per_expert = per_expert.double().cpu()
        self.mass['all'] += per_expert.sum(dim=(0, 1))
        for name, code in _CATEGORIES:
            mask = (categories == code).unsqueeze(-1)  # [B, T, 1]
            self.mass[name] += (per_expert * mask).sum(dim=(0, 1))
            self.tokens[name] += int(mask.sum())

    def result(self, slots_per_expert: int) -> Dict[str, Any]:
        means = {key: value / self.images for key, value in self.sums.items()}
        T, N = self.num_tokens, self.E * slots_per_expert
        importance = {name: (mass / mass.sum()).tolist() if mass.sum() > 0 else None
                      for name, mass in self.mass.items()}
        return dict(
            num_experts=self.E, slots_per_expert=slots_per_expert, num_tokens=T, num_images=self.images,
            dispatch_entropy=means['dispatch_entropy'], dispatch_entropy_max=math.log(T),
            tokens_per_slot=math.exp(means['dispatch_entropy']),
            combine_entropy=means['combine_entropy'], combine_entropy_max=math.log(N),
            slots_per_token=math.exp(means['combine_entropy']), slot_similarity=means['slot_similarity'],
            expert_importance=importance['all'], expert_importance_by_category=importance,
            tokens_by_category=dict(self.tokens))


def soft_routing_report(model: torch.nn.Module, loader, dataset_size: int, output_dir: str, data_config: Dict,
                        layer_names: Dict[str, Any], start_model: Optional[torch.nn.Module] = None,
                        background_threshold: float = 0.1, progress=lambda it, total: it, device=None,
                        header: Optional[Dict[str, Any]] = None, top1_known: bool = True) -> Dict[str, Any]:
    """One pass over `loader` ((images, targets, readable) batches) with `model` (and `start_model`); writes
    report.json and report.md to `output_dir` and returns the numbers. `layer_names`: layer -> its SoftMoeMlp."""
    started = time.perf_counter()
    models = {'model': model} if start_model is None else {'model': model, 'start': start_model}
    run = RoutingPass(models, data_config, background_threshold, device or next(model.parameters()).device)
    sums = {key: {name: _SoftLayerSums(layer.num_experts) for name, layer in layer_names.items()} for key in models}
    for batch in run.batches(loader, progress):
        for key, capture in batch.captures.items():
            metrics = capture.layers
            for name, routing in capture.tensors:
                sums[key][name].update(metrics[name], routing.probs, batch.categories)
    if run.num_images == 0:
        raise ValueError('no readable image in the split')
    slots = {name: layer.router.slots_per_expert for name, layer in layer_names.items()}
    layers = {name: sums['model'][name].result(slots[name]) for name in layer_names}
    start_layers = {name: sums['start'][name].result(slots[name]) for name in layer_names} if start_model else None
    result = dict(header or {}, kind='soft', num_images=run.num_images, num_excluded=run.num_excluded,
                  top1=100.0 * run.correct / run.num_images if top1_known else None,
                  num_prefix_tokens=run.num_prefix, patch_size=list(run.patch_size),
                  background_threshold=background_threshold, layers=layers,
                  start_layers=start_layers, seconds=time.perf_counter() - started)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'report.json').write_text(json.dumps(result, indent=1))
    (out / 'report.md').write_text(format_soft_report(result))
    return result


def format_soft_report(r: Dict[str, Any]) -> str:
    """report.md of a Soft MoE model: one row per layer (start -> end with a start model)."""
    def cell(name: str, key: str, fmt: str) -> str:
        end = format(r['layers'][name][key], fmt)
        return end if not r.get('start_layers') else f"{format(r['start_layers'][name][key], fmt)} -> {end}"

    lines = [f"# Soft MoE routing report: {r.get('model', 'model')}", '',
             f"{r['num_images']} images ({r['num_excluded']} unreadable left out); every slot mixes all tokens of "
             f"its image, so the report shows mixes, not choices.", '',
             '| layer | tokens per slot (exp dispatch entropy) | slots per token (exp combine entropy) | '
             'slot similarity | top expert share (all / prefix / background / object) |', '|---|---|---|---|---|']
    for name, layer in r['layers'].items():
        shares = [layer['expert_importance_by_category'][c] for c in ('all', 'prefix', 'background', 'object')]
        top = ' / '.join('-' if s is None else f'{100 * max(s):.1f} %' for s in shares)
        lines.append(f"| {name} | {cell(name, 'tokens_per_slot', '.1f')} of {layer['num_tokens']} | "
                     f"{cell(name, 'slots_per_token', '.1f')} of {layer['num_experts'] * layer['slots_per_expert']} | "
                     f"{cell(name, 'slot_similarity', '.3f')} | {top} |")
    return '\n'.join(lines) + '\n'
