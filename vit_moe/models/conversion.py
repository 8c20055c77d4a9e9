""" Dense ViT state dict -> upcycled MoE state dict, as declarative rules.

Each rule maps a dense key pattern to an MoE key and says how to transform the tensor. A rule
applies only where its target exists in the MoE model (the MoE blocks); every other dense key
must exist in the model with the same shape. Keys only the MoE model has (routers, and experts
when `expert_init='random'`) are taken from the model's own fresh initialisation.

Used by both `vit_moe.upcycle` and the timm pretrained path (`checkpoint_filter_fn`).
"""
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = [
    'ConversionRule', 'UPCYCLE_RULES', 'CheckpointMismatchError', 'resolve_moe_blocks', 'is_moe_state_dict',
    'convert_dense_to_moe',
]

MoeBlocks = Union[int, str, Sequence[int]]


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model."""


def _tile_transposed(dense: torch.Tensor, target_shape: torch.Size) -> torch.Tensor:
    # nn.Linear weight [out, in] -> stacked [E, in, out]
    return dense.t().unsqueeze(0).expand(target_shape[0], -1, -1).clone()


def _tile(dense: torch.Tensor, target_shape: torch.Size) -> torch.Tensor:
    # bias [out] -> [E, out]
    return dense.unsqueeze(0).expand(target_shape[0], -1).clone()


@dataclass(frozen=True)
class ConversionRule:
    """Dense key `pattern` -> MoE key `target` (a re.sub template); `transform(tensor, target_shape)`."""
    pattern: str
    target: str
    transform: Callable[[torch.Tensor, torch.Size], torch.Tensor]
    dense_shape: Callable[[torch.Size], torch.Size]  # dense shape this rule expects for a target shape


UPCYCLE_RULES = (
    ConversionRule(r'^(.*\.)?mlp\.(fc[12])\.weight$', r'\1mlp.experts.\2.weight', _tile_transposed,
                   lambda s: torch.Size((s[2], s[1]))),
    ConversionRule(r'^(.*\.)?mlp\.(fc[12])\.bias$', r'\1mlp.experts.\2.bias', _tile,
                   lambda s: torch.Size(s[1:])),
)


_MOE_KEY = re.compile(r'(^|\.)mlp\.(experts|router)\.')
_ROUTER_KEY = re.compile(r'(^|\.)mlp\.router\.')


def resolve_moe_blocks(moe_blocks: Optional[MoeBlocks], depth: int) -> List[int]:
    """Which block indices become MoE.

    Args:
        moe_blocks: None (the last half, 6 of 12), an int N (the last N blocks), 'every_2' / 'every_other'
            (blocks 1, 3, 5, ...: every other block ending at the last), 'all', or a list of indices
            (negative indices count from the end).
        depth: number of blocks in the model.
    """
    accepted = "None, an int in [0, depth], 'every_other', 'every_N', 'all', or a list of block indices"
    if moe_blocks is None:
        return list(range(depth - depth // 2, depth))
    if isinstance(moe_blocks, bool):
        raise ValueError(f'moe_blocks={moe_blocks!r} is not valid; expected {accepted}')
    if isinstance(moe_blocks, int):
        if not 0 <= moe_blocks <= depth:
            raise ValueError(f'moe_blocks={moe_blocks} is out of range for depth {depth}; expected {accepted}')
        return list(range(depth - moe_blocks, depth))
    if isinstance(moe_blocks, str):
        if moe_blocks == 'all':
            return list(range(depth))
        every = {'every_other': 2}.get(moe_blocks)
        match = re.fullmatch(r'every_(\d+)', moe_blocks)
        if match:
            every = int(match.group(1))
        if not every or every < 1:
            raise ValueError(f'moe_blocks={moe_blocks!r} is not valid; expected {accepted}')
        return list(range(depth - 1, -1, -every))[::-1]
    indices = []
    for i in moe_blocks:
        if isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth:
            raise ValueError(f'moe_blocks entry {i!r} is out of range for depth {depth}; expected {accepted}')
        indices.append(i % depth)
    if len(set(indices)) != len(indices):
        raise ValueError(f'moe_blocks={list(moe_blocks)} names a block twice')
    return sorted(indices)


def is_moe_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """True for a state dict that already holds MoE layers (saved by this package)."""
    return any(_MOE_KEY.search(k) for k in state_dict)


def _format_keys(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys)} in all)' if len(keys) > limit else '')


def convert_dense_to_moe(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        expert_init: str = 'copy',
        rules: Sequence[ConversionRule] = UPCYCLE_RULES,
        ignore_shape_of: Sequence[str] = (),
) -> Dict[str, torch.Tensor]:
    """Convert a dense ViT state dict to the state dict of `model` (an MoE ViT).

    Args:
        state_dict: dense (or already MoE) state dict.
        model: target MoE model; its own tensors fill the keys the dense model lacks.
        expert_init: 'copy' (each expert = the dense MLP) or 'random' (keep the model's init; ablation).
        rules: conversion rules applied to the dense keys whose target exists in the model.
        ignore_shape_of: key prefixes whose shapes are not checked (a classifier timm will adapt).

    Raises:
        CheckpointMismatchError: naming missing/unexpected keys or both shapes of a mismatched tensor.
    """
    if expert_init not in ('copy', 'random'):
        raise ValueError(f"expert_init must be 'copy' or 'random', got {expert_init!r}")
    target = model.state_dict()
    out, unexpected, mismatched = {}, [], []

    mismatched_targets = set()

    def _check_shape(key, src_shape, want_shape, dense_key=None):
        if any(key.startswith(p) for p in ignore_shape_of) or src_shape == want_shape:
            return True
        mismatched.append((key, f'{dense_key or key}: checkpoint {tuple(src_shape)} vs model {tuple(want_shape)}'))
        mismatched_targets.add(key)
        return False

    moe_input = is_moe_state_dict(state_dict)
    for key, value in state_dict.items():
        if key not in target and any(key.startswith(p) for p in ignore_shape_of):
            out[key] = value  # e.g. a 1000-class head that timm drops for another num_classes
            continue
        if key in target:
            if _check_shape(key, value.shape, target[key].shape):
                out[key] = value
            continue
        for rule in () if moe_input else rules:
            new_key = re.sub(rule.pattern, rule.target, key) if re.match(rule.pattern, key) else None
            if new_key in target:
                want = target[new_key].shape
                if _check_shape(new_key, value.shape, rule.dense_shape(want), dense_key=key):
                    out[new_key] = rule.transform(value, want) if expert_init == 'copy' else target[new_key]
                break
        else:
            unexpected.append(key)

    new_in_moe = [k for k in target if k not in out and _ROUTER_KEY.search(k) and not moe_input]
    out.update({k: target[k] for k in new_in_moe})  # routers start from the model's N(0, 0.02) init
    missing = [k for k in target if k not in out and k not in mismatched_targets
               and not any(k.startswith(p) for p in ignore_shape_of)]
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            order = {k: i for i, k in enumerate(target)}  # report in the model's order: embeddings first
            mismatched = [text for _, text in sorted(mismatched, key=lambda m: order[m[0]])]
            more = f'; ... ({len(mismatched)} in all)' if len(mismatched) > 8 else ''
            parts.append('shape mismatch: ' + '; '.join(mismatched[:8]) + more)
        if missing:
            parts.append('missing keys: ' + _format_keys(missing))
        if unexpected:
            parts.append('unexpected keys: ' + _format_keys(unexpected))
        raise CheckpointMismatchError(
            f'Checkpoint does not fit {type(model).__name__} '
            f'({"MoE" if moe_input else "dense"} checkpoint): ' + ' | '.join(parts))
    return out
