""" Dense ViT state dict -> upcycled MoE state dict, as declarative rules.

Each rule maps a dense key pattern to an MoE key and says how to transform the tensor. A rule
applies only where its target exists in the MoE model (the MoE blocks); every other dense key
must exist in the model with the same shape. Keys only the MoE model has (routers, and experts
when `expert_init='random'`) are taken from the model's own fresh initialisation.

Expert initialisation (`expert_init`):
* 'copy': every expert is the dense MLP (Sparse Upcycling, Komatsuzaki et al., 2022),
* 'random': the model's own random init (the paper's ablation),
* 'drop': Drop-Upcycling (Nakamura et al., ICLR 2025, arXiv 2502.19261): copy, then in each expert re-initialise
  a random fraction `drop_ratio` of the hidden units: the same hidden indices in fc1's columns (and fc1's bias)
  and fc2's rows, drawn independently per expert from torch's global RNG, new values drawn from a normal with
  the original matrix's (or bias's) mean and std.

Used by both `vit_moe.upcycle` and the timm pretrained path (`checkpoint_filter_fn`).
"""
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = [
    'ConversionRule', 'UPCYCLE_RULES', 'CheckpointMismatchError', 'resolve_moe_blocks', 'is_moe_state_dict',
    'convert_dense_to_moe', 'drop_upcycle', 'EXPERT_INITS', 'check_expert_init',
]

EXPERT_INITS = ('copy', 'random', 'drop')


def check_expert_init(expert_init: str, drop_ratio: float = 0.5) -> None:
    if expert_init not in EXPERT_INITS:
        raise ValueError(f'expert_init={expert_init!r} is not valid; accepted: {", ".join(EXPERT_INITS)}')
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f'drop_ratio={drop_ratio!r} is not valid; expected a fraction in [0, 1]')

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
_ROUTER_KEY = re.compile(r'(^|\.)mlp\.(router\.|output_scale$)')  # new in an upcycled model: the model's init


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


def drop_upcycle(state_dict: Dict[str, torch.Tensor], drop_ratio: float = 0.5) -> Dict[str, torch.Tensor]:
    """Drop-Upcycling, in place on copied experts: re-initialise `drop_ratio` of each expert's hidden units.

    For every MoE layer (`...experts.fc1.weight` [E, dim, hidden], `...fc1.bias` [E, hidden],
    `...fc2.weight` [E, hidden, dim]) each expert draws its own round(drop_ratio * hidden) hidden indices; those
    columns of fc1 (and entries of its bias) and rows of fc2 get values from a normal with the mean and std of
    the original (dense) matrix. fc2's bias is per output unit and is left as copied.
    """
    for key in [k for k in state_dict if k.endswith('experts.fc1.weight')]:
        prefix = key[:-len('fc1.weight')]
        fc1, fc2, bias = state_dict[key], state_dict[prefix + 'fc2.weight'], state_dict.get(prefix + 'fc1.bias')
        num_experts, hidden = fc1.shape[0], fc1.shape[2]
        k = round(drop_ratio * hidden)
        originals = (fc1, fc2) + ((bias,) if bias is not None else ())
        stats = [(t[0].float().mean(), t[0].float().std()) for t in originals]  # expert 0 = the dense tensor
        for e in range(num_experts):
            idx = torch.randperm(hidden)[:k]  # [k] hidden units of expert e
            fc1[e][:, idx] = torch.normal(stats[0][0].item(), stats[0][1].item(), (fc1.shape[1], k)).to(fc1.dtype)
            fc2[e][idx, :] = torch.normal(stats[1][0].item(), stats[1][1].item(), (k, fc2.shape[2])).to(fc2.dtype)
            if bias is not None:
                bias[e][idx] = torch.normal(stats[2][0].item(), stats[2][1].item(), (k,)).to(bias.dtype)
    return state_dict


def convert_dense_to_moe(
        state_dict: Dict[str, torch.Tensor],
        model: nn.Module,
        expert_init: str = 'copy',
        rules: Sequence[ConversionRule] = UPCYCLE_RULES,
        ignore_shape_of: Sequence[str] = (),
        drop_ratio: float = 0.5,
) -> Dict[str, torch.Tensor]:
    """Convert a dense ViT state dict to the state dict of `model` (an MoE ViT).

    Args:
        state_dict: dense (or already MoE) state dict.
        model: target MoE model; its own tensors fill the keys the dense model lacks.
        expert_init: 'copy' (each expert = the dense MLP), 'random' (keep the model's init; ablation) or 'drop'
            (Drop-Upcycling: copy, then re-initialise `drop_ratio` of each expert's hidden units).
        rules: conversion rules applied to the dense keys whose target exists in the model.
        ignore_shape_of: key prefixes whose shapes are not checked (a classifier timm will adapt).
        drop_ratio: fraction of hidden units re-initialised per expert with expert_init='drop'.

    Raises:
        CheckpointMismatchError: naming missing/unexpected keys or both shapes of a mismatched tensor.
    """
    check_expert_init(expert_init, drop_ratio)
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
        if key.endswith('mlp.output_scale') and value.dim() == 0:
            value = value.reshape(1)  # saved by vit-moe 0.2 as a 0-dim scalar (FSDP2 cannot shard those)
        if key in target:
            if _check_shape(key, value.shape, target[key].shape):
                out[key] = value
            continue
        for rule in () if moe_input else rules:
            new_key = re.sub(rule.pattern, rule.target, key) if re.match(rule.pattern, key) else None
            if new_key in target:
                want = target[new_key].shape
                if _check_shape(new_key, value.shape, rule.dense_shape(want), dense_key=key):
                    out[new_key] = target[new_key] if expert_init == 'random' else rule.transform(value, want)
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
    if expert_init == 'drop' and not moe_input:
        drop_upcycle(out, drop_ratio)
    return out
