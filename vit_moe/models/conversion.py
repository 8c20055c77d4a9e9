""" Dense ViT state dict -> upcycled MoE state dict, as declarative rules.

Each rule maps a dense key pattern to an MoE key and says how to transform the tensor. A rule
applies only where its target exists in the MoE model (the MoE blocks); every other dense key
must exist in the model with the same shape. Keys only the MoE model has (routers, and experts
when `expert_init='random'`) are taken from the model's own fresh initialisation.

Expert initialisation (`expert_init`):
* 'copy': every expert is the dense MLP (Sparse Upcycling, Komatsuzaki et al., 2022),
* 'random': the model's own random init (the paper's ablation),
* 'drop': Drop-Upcycling (Nakamura et al., ICLR 2025, arXiv 2502.19261): copy, then in each expert re-initialise
  a random fraction `drop_ratio` of the hidden units: the same hidden indices in fc1's columns (and fc1's bias;
  gate and value columns of a GLU together) and fc2's rows, drawn independently per expert from torch's global RNG,
  new values drawn from a normal with the original matrix's (or bias's) mean and std.

Used by both `vit_moe.upcycle` and the timm pretrained path (`checkpoint_filter_fn`).
"""
import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..layers.moe_config import EXPERT_INITS, MoeBlocks

__all__ = [
    'ConversionRule', 'UPCYCLE_RULES', 'CheckpointMismatchError', 'resolve_moe_blocks', 'is_moe_state_dict',
    'convert_dense_to_moe', 'drop_upcycle', 'EXPERT_INITS', 'check_expert_init',
]



def check_expert_init(expert_init: str, drop_ratio: float = 0.5) -> None:
    if expert_init not in EXPERT_INITS:
        raise ValueError(f'expert_init={expert_init!r} is not valid; accepted: {", ".join(EXPERT_INITS)}')
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f'drop_ratio={drop_ratio!r} is not valid; expected a fraction in [0, 1]')


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model; `details`: what does not fit (no model name)."""

    def __init__(self, message: str, details: str = ''):
        super().__init__(message)
        self.details = details or message


def _tile_expert(dense: torch.Tensor, target_shape: torch.Size) -> torch.Tensor:
    """A dense linear weight [out, in] -> stacked [E, in, out]; a bias or norm vector [n] -> [E, n]."""
    if len(target_shape) == 3:
        return dense.t().unsqueeze(0).expand(target_shape[0], -1, -1).clone()
    return dense.unsqueeze(0).expand(target_shape[0], -1).clone()


def _dense_shape(target_shape: torch.Size) -> torch.Size:
    """The dense shape that `_tile_expert` turns into `target_shape`."""
    return torch.Size((target_shape[2], target_shape[1])) if len(target_shape) == 3 else torch.Size(target_shape[1:])


@dataclass(frozen=True)
class ConversionRule:
    """Dense key `pattern` -> MoE key `target` (a re.sub template); `transform(tensor, target_shape)`."""
    pattern: str
    target: str
    transform: Callable[[torch.Tensor, torch.Size], torch.Tensor]
    dense_shape: Callable[[torch.Size], torch.Size]  # dense shape this rule expects for a target shape


UPCYCLE_RULES = (
    # every expert bank keeps timm's MLP names (vit_moe.layers.experts): Mlp, GluMlp, SwiGLU, hidden norms
    ConversionRule(r'^(.*\.)?mlp\.(fc1|fc2|fc1_g|fc1_x|norm)\.(weight|bias)$', r'\1mlp.experts.\2.\3', _tile_expert,
                   _dense_shape),
    # shared experts: copies of the dense MLP too (scaled with the routed ones by `scale_for_shared_experts`)
    ConversionRule(r'^(.*\.)?mlp\.(fc1|fc2|fc1_g|fc1_x|norm)\.(weight|bias)$', r'\1mlp.shared_experts.\2.\3',
                   _tile_expert, _dense_shape),
)


def _fine_grained_shape(target_shape: torch.Size, granularity: int,
                        hidden_axis: Optional[Tuple[int, Tuple[int, ...]]]) -> torch.Size:
    """The stacked shape of whole experts for fine-grained `target_shape`: hidden widths times `granularity`."""
    if hidden_axis is None:
        return target_shape
    full = list(target_shape)
    full[hidden_axis[0]] *= granularity
    return torch.Size(full)


def _slice_experts(dense: torch.Tensor, target_shape: torch.Size, granularity: int,
                   hidden_axis: Optional[Tuple[int, Tuple[int, ...]]]) -> torch.Tensor:
    """Fine-grained experts from a dense tensor: expert e of E takes hidden slice e // (E / G) of G (in every half of a
    packed GLU fc1); fc2's bias, not per hidden unit, is divided by G so that the G slices sum to the dense MLP."""
    tiled = _tile_expert(dense, _fine_grained_shape(target_shape, granularity, hidden_axis))  # [E, ...] whole experts
    if hidden_axis is None:
        return tiled / granularity
    dim, offsets = hidden_axis
    E, halves = target_shape[0], len(offsets)
    h = target_shape[dim] // halves  # hidden units of one fine-grained expert
    H = h * granularity
    index = torch.stack([torch.cat([torch.arange(j * H + g * h, j * H + (g + 1) * h) for j in range(halves)])
                         for g in (e // (E // granularity) for e in range(E))])  # [E, halves * h]
    shape = [1] * tiled.dim()
    shape[0], shape[dim] = E, halves * h
    index = index.view(shape).expand(*[target_shape[i] if i != dim else halves * h for i in range(len(target_shape))])
    return tiled.gather(dim, index).contiguous()


def scale_for_shared_experts(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """With S shared experts, scale every copied expert's fc2 (weight and bias) by 1 / (S + 1), routed and shared:
    with every slot filled (C = E) the routed part is then MLP / (S + 1) and each shared expert MLP / (S + 1), which
    sum to the dense MLP exactly."""
    from ..layers import moe_layers
    for name, layer in moe_layers(model).items():
        if layer.shared_experts is None:
            continue
        factor = 1.0 / (layer.shared_experts.fc2.weight.shape[0] + 1)
        for bank in ('experts', 'shared_experts'):
            for tensor in ('weight', 'bias'):
                key = f'{name}.{bank}.fc2.{tensor}'
                if key in state_dict:
                    state_dict[key] = state_dict[key] * factor
    return state_dict


_MOE_KEY = re.compile(r'(^|\.)mlp\.(experts|router)\.')
_NEW_IN_UPCYCLED_KEY = re.compile(r'(^|\.)mlp\.(router\.|output_scale$)')  # new in an upcycled model: the model's init


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


def drop_upcycle(state_dict: Dict[str, torch.Tensor], model: nn.Module, drop_ratio: float = 0.5
                 ) -> Dict[str, torch.Tensor]:
    """Drop-Upcycling, in place on copied experts: re-initialise `drop_ratio` of each expert's hidden units.

    For every MoE layer of `model`, each expert draws its own round(drop_ratio * hidden) hidden indices; at those
    indices every tensor the bank lists in `hidden_units()` gets values from a normal with the mean and std of the
    original (dense) tensor (each half of a packed GLU fc1 on its own): fc1's columns and bias (both halves of a
    packed GLU fc1; fc1_g and fc1_x of a SwiGLU: gate and value of a unit together) and fc2's rows. fc2's bias is per
    output unit and hidden norms are left as copied.
    """
    from ..layers import moe_layers
    for name, layer in moe_layers(model).items():
        units = {f'{name}.experts.{suffix}': axis for suffix, axis in layer.experts.hidden_units().items()}
        units = {key: hidden_axis for key, hidden_axis in units.items() if key in state_dict}
        hidden, num_experts = layer.experts.hidden_features, next(iter(layer.experts.parameters())).shape[0]
        k = round(drop_ratio * hidden)
        stats = {}  # (key, offset) -> mean, std of that part of the dense tensor (expert 0 is the dense copy)
        for key, (dim, offsets) in units.items():
            for offset in offsets:
                part = state_dict[key][0].narrow(dim - 1, offset, hidden).float()  # a GLU's gate and value apart
                stats[key, offset] = part.mean().item(), part.std().item()
        for e in range(num_experts):
            idx = torch.randperm(hidden)[:k]  # [k] hidden units of expert e
            for key, (dim, offsets) in units.items():
                tensor = state_dict[key][e]  # [in, width] (dim 2), [hidden, out] or [width] (dim 1)
                shape = list(tensor.shape)
                shape[dim - 1] = k
                for offset in offsets:
                    at = (slice(None),) * (dim - 1) + (idx + offset,)
                    tensor[at] = torch.normal(*stats[key, offset], tuple(shape)).to(tensor.dtype)
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
    from ..layers import moe_layers
    target = model.state_dict()
    out, unexpected, mismatched = {}, [], []
    fine_grained = {f'{name}.experts.': layer for name, layer in moe_layers(model).items()
                    if getattr(layer, 'expert_granularity', 1) > 1}

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
        elif moe_input or not _apply_rules(key, value, rules, target, fine_grained, expert_init, _check_shape, out):
            unexpected.append(key)

    new_in_moe = [k for k in target if k not in out and _NEW_IN_UPCYCLED_KEY.search(k) and not moe_input]
    out.update({k: target[k] for k in new_in_moe})  # routers start from the model's N(0, 0.02) init
    missing = [k for k in target if k not in out and k not in mismatched_targets
               and not any(k.startswith(p) for p in ignore_shape_of)]
    if mismatched or missing or unexpected:
        _raise_mismatch(model, list(target), moe_input, mismatched, missing, unexpected)
    if expert_init != 'random' and not moe_input:
        scale_for_shared_experts(out, model)
    if expert_init == 'drop' and not moe_input:
        drop_upcycle(out, model, drop_ratio)
    return out


def _apply_rules(key, value, rules, target, fine_grained, expert_init, check_shape, out) -> bool:
    """Fill `out` with every model key the `rules` derive from dense `key` (one dense key may fill several: routed
    and shared experts); False when the model has none of them."""
    converted = False
    for rule in rules:
        new_key = re.sub(rule.pattern, rule.target, key) if re.match(rule.pattern, key) else None
        if new_key not in target:
            continue
        converted = True
        target_shape = target[new_key].shape
        prefix = next((p for p in fine_grained if new_key.startswith(p)), None)
        if prefix is not None:
            hidden_axis = fine_grained[prefix].experts.hidden_units().get(new_key[len(prefix):])  # its hidden units
            G = fine_grained[prefix].expert_granularity
            whole_experts = _fine_grained_shape(target_shape, G, hidden_axis)
            if check_shape(new_key, value.shape, _dense_shape(whole_experts), key):
                out[new_key] = target[new_key] if expert_init == 'random' else _slice_experts(
                    value, target_shape, G, hidden_axis)
        elif check_shape(new_key, value.shape, rule.dense_shape(target_shape), dense_key=key):
            out[new_key] = target[new_key] if expert_init == 'random' else rule.transform(value, target_shape)
    return converted


def _raise_mismatch(model: nn.Module, target_keys: List[str], moe_input: bool, mismatched, missing, unexpected):
    """One CheckpointMismatchError naming the first mismatched shapes, missing and unexpected keys."""
    parts = []
    if mismatched:
        order = {k: i for i, k in enumerate(target_keys)}  # report in the model's order: embeddings first
        mismatched = [text for _, text in sorted(mismatched, key=lambda m: order[m[0]])]
        more = f'; ... ({len(mismatched)} in all)' if len(mismatched) > 3 else ''
        parts.append('shape mismatch: ' + '; '.join(mismatched[:3]) + more)
    if missing:
        parts.append('missing keys: ' + _format_keys(missing, limit=4))
    if unexpected:
        parts.append('unexpected keys: ' + _format_keys(unexpected, limit=4))
    details = f'{"MoE" if moe_input else "dense"} checkpoint: ' + ' | '.join(parts)
    raise CheckpointMismatchError(f'Checkpoint does not fit {type(model).__name__} ({details})', details)
