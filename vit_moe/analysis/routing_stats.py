""" Routing statistics: pure functions from captured routing tensors to numbers (no drawing, no data loading).

Shapes: B images, E experts, `capacity` slots per expert, T tokens per image (prefix tokens first: the class
token and any registers, then the patches row-major), C classes.

* `filled_slots`: which slots hold a token (expert choice: all of them; token choice: those with a nonzero
  combine weight, since an empty slot has weight 0 and token index 0).
* `token_expert_mask` [B, E, T]: expert e took token t (it sits in one of e's filled slots).
* `experts_per_token` [B, T]: how many experts took each token (0 = the token skipped the layer: residual only).
* `patch_categories` [B, T]: PREFIX (class token, registers), BACKGROUND (patch of mean un-normalised intensity
  below a threshold) or OBJECT (the other patches).
* `LayerStats`: accumulates one layer's numbers over batches; `compute_layer_stats` does it for one batch.

Every count is an exact integer; sums of weights and probabilities are accumulated in float64.
"""
import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    'PREFIX', 'BACKGROUND', 'OBJECT', 'CATEGORIES', 'filled_slots', 'token_expert_mask', 'token_expert_weights',
    'experts_per_token', 'count_histogram', 'patch_intensity', 'patch_categories', 'combine_weight_bins',
    'top_expert', 'LayerStats', 'compute_layer_stats',
]

PREFIX, BACKGROUND, OBJECT = 0, 1, 2
CATEGORIES = ('prefix', 'background', 'object')  # indexed by the constants above


def filled_slots(combine_weights: torch.Tensor, expert_choice: bool) -> torch.Tensor:
    """[B, E, capacity] bool: the slots that hold a token.

    Expert choice fills every slot (each expert takes exactly `capacity` tokens). Token choice leaves slots empty
    with combine weight 0 (and token index 0), so a slot is filled when its weight is nonzero.
    """
    if expert_choice:
        return torch.ones_like(combine_weights, dtype=torch.bool)
    return combine_weights != 0


def token_expert_mask(token_index: torch.Tensor, filled: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, E, T] bool: expert e took token t in image b (a filled slot of e holds t)."""
    B, E, _ = token_index.shape
    hits = torch.zeros(B, E, num_tokens, dtype=torch.int32, device=token_index.device)
    hits.scatter_add_(2, token_index.long(), filled.to(torch.int32))  # empty slots (index 0) add 0
    return hits > 0


def token_expert_weights(token_index: torch.Tensor, combine_weights: torch.Tensor, filled: torch.Tensor,
                         num_tokens: int) -> torch.Tensor:
    """[B, E, T] float64: the combine weight expert e gives token t (0 where e did not take t)."""
    B, E, _ = token_index.shape
    out = torch.zeros(B, E, num_tokens, dtype=torch.float64, device=token_index.device)
    return out.scatter_add_(2, token_index.long(), combine_weights.double() * filled)


def experts_per_token(taken: torch.Tensor) -> torch.Tensor:
    """[B, T] int64: number of experts that took each token (0..E), from a [B, E, T] mask."""
    return taken.sum(dim=1)


def count_histogram(counts: torch.Tensor, num_experts: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[E + 1] int64: how many tokens were taken by 0, 1, ..., E experts (only where `mask` is True)."""
    values = counts[mask] if mask is not None else counts.reshape(-1)
    return torch.bincount(values.reshape(-1).long().cpu(), minlength=num_experts + 1)


def top_expert(weights: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """[B, T] int64: the expert with the largest combine weight among those that took the token; -1 for none."""
    best = weights.masked_fill(~taken, -1.0).argmax(dim=1)
    return torch.where(taken.any(dim=1), best, torch.full_like(best, -1))


def patch_intensity(images: torch.Tensor, patch_size: Tuple[int, int]) -> torch.Tensor:
    """[B, gh * gw] mean intensity (mean over channels and pixels) of every patch, row-major.

    `images` are un-normalised [B, C, H, W] in [0, 1]; pixels past the last whole patch are ignored, as the
    patch embedding ignores them.
    """
    pooled = F.avg_pool2d(images.float().mean(dim=1, keepdim=True), kernel_size=patch_size, stride=patch_size)
    return pooled.flatten(1)


def patch_categories(images: torch.Tensor, patch_size: Tuple[int, int], num_prefix_tokens: int,
                     background_threshold: float) -> torch.Tensor:
    """[B, T] int64 token categories: PREFIX for the first `num_prefix_tokens`, then per patch BACKGROUND when its
    mean un-normalised intensity is below `background_threshold`, else OBJECT."""
    intensity = patch_intensity(images, patch_size)
    patches = torch.where(intensity < background_threshold, BACKGROUND, OBJECT)
    prefix = torch.full((patches.shape[0], num_prefix_tokens), PREFIX, dtype=patches.dtype, device=patches.device)
    return torch.cat([prefix, patches], dim=1).long()


def combine_weight_bins(num_bins: int = 100) -> np.ndarray:
    """Bin edges of the combine-weight histogram: `num_bins` equal bins over [0, 1] (weights are probabilities,
    also with router_norm)."""
    return np.linspace(0.0, 1.0, num_bins + 1)


def _share(matrix: np.ndarray) -> np.ndarray:
    """Columns scaled to sum to 1; NaN for an all-zero column (a class without images)."""
    total = matrix.sum(axis=0, keepdims=True)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(total > 0, matrix / np.where(total > 0, total, 1.0), np.nan)


def _nan_to_none(value):
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


class LayerStats:
    """One MoE layer's routing numbers, accumulated over batches.

    Args:
        num_experts, num_tokens: E and T of the layer.
        num_prefix_tokens: class token and registers before the patches.
        grid: (gh, gw) patches; gh * gw + num_prefix_tokens must equal num_tokens.
        num_classes: C (targets are 0..C-1).
        expert_choice: expert choice (every slot filled) or token choice (empty slots have weight 0).
        num_bins: bins of the combine-weight histogram over [0, 1].
    """

    def __init__(self, num_experts: int, num_tokens: int, num_prefix_tokens: int, grid: Tuple[int, int],
                 num_classes: int, expert_choice: bool, num_bins: int = 100):
        if grid[0] * grid[1] + num_prefix_tokens != num_tokens:
            raise ValueError(f'{num_tokens} tokens per image do not match {num_prefix_tokens} prefix token(s) + a '
                             f'{grid[0]}x{grid[1]} patch grid')
        self.E, self.T, self.P, self.grid, self.C = num_experts, num_tokens, num_prefix_tokens, tuple(grid), num_classes
        self.expert_choice = expert_choice
        self.capacity: Optional[int] = None
        self.bin_edges = combine_weight_bins(num_bins)
        self.num_images = 0
        self.hist = np.zeros((len(CATEGORIES) + 1, num_experts + 1), dtype=np.int64)  # rows: all, prefix, bg, object
        self.unprocessed_map = np.zeros(grid[0] * grid[1], dtype=np.int64)  # images where the patch got no expert
        self.experts_map = np.zeros(grid[0] * grid[1], dtype=np.int64)  # sum over images of experts per patch
        self.assignments = np.zeros((num_experts, num_classes), dtype=np.int64)  # token -> expert assignments
        self.prob_sum = np.zeros((num_experts, num_classes), dtype=np.float64)  # router probabilities
        self.weight_sum = np.zeros((num_experts, num_classes), dtype=np.float64)  # combine weights
        self.class_tokens = np.zeros(num_classes, dtype=np.int64)  # tokens of each class's images
        self.weight_counts = np.zeros(num_bins, dtype=np.int64)
        self.weight_total = 0.0
        self.weight_min, self.weight_max = math.inf, -math.inf
        self.filled_slots = 0
        self.total_slots = 0

    def update(self, token_index: torch.Tensor, combine_weights: torch.Tensor, probs: torch.Tensor,
               targets: torch.Tensor, categories: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Add a batch: routing tensors of B images (as in `LayerRouting`), their targets [B] and token categories
        [B, T]. Returns the per-image tensors the numbers were computed from (`taken` [B, E, T], `weights`
        [B, E, T], `counts` [B, T], `top_expert` [B, T]), on the CPU, for drawing examples."""
        B, E, capacity = token_index.shape
        if E != self.E or probs.shape[1] != self.T:
            raise ValueError(f'routing of {E} experts and {probs.shape[1]} tokens given to a layer of {self.E} '
                             f'experts and {self.T} tokens')
        self.capacity = capacity
        token_index, combine_weights = token_index.detach().cpu(), combine_weights.detach().cpu()
        probs, targets, categories = probs.detach().cpu().double(), targets.cpu().long(), categories.cpu().long()
        filled = filled_slots(combine_weights, self.expert_choice)
        taken = token_expert_mask(token_index, filled, self.T)  # [B, E, T]
        weights = token_expert_weights(token_index, combine_weights, filled, self.T)  # [B, E, T]
        counts = experts_per_token(taken)  # [B, T]

        self.num_images += B
        self.hist[0] += count_histogram(counts, E).numpy()
        for c in range(len(CATEGORIES)):
            self.hist[c + 1] += count_histogram(counts, E, categories == c).numpy()
        patch_counts = counts[:, self.P:]
        self.unprocessed_map += (patch_counts == 0).sum(dim=0).numpy()
        self.experts_map += patch_counts.sum(dim=0).numpy()

        onehot = F.one_hot(targets, self.C).double()  # [B, C]
        self.assignments += (taken.sum(dim=2).T.double() @ onehot).round().long().numpy()  # [E, C]
        self.prob_sum += (probs.sum(dim=1).T @ onehot).numpy()
        self.weight_sum += (weights.sum(dim=2).T @ onehot).numpy()
        self.class_tokens += (onehot.sum(dim=0) * self.T).round().long().numpy()

        w = combine_weights[filled].double().numpy()
        self.weight_counts += np.histogram(np.clip(w, 0.0, 1.0), bins=self.bin_edges)[0]
        self.weight_total += float(w.sum())
        if w.size:
            self.weight_min = min(self.weight_min, float(w.min()))
            self.weight_max = max(self.weight_max, float(w.max()))
        self.filled_slots += int(filled.sum())
        self.total_slots += filled.numel()
        return dict(taken=taken, weights=weights, counts=counts, top_expert=top_expert(weights, taken))

    def result(self) -> Dict:
        """The layer's numbers as plain Python values (JSON-ready; None where a class has no image)."""
        tokens = self.hist.sum(axis=1)  # per row
        keys = ('all',) + CATEGORIES

        def fraction(row: int, k: int) -> Optional[float]:
            return float(self.hist[row, k] / tokens[row]) if tokens[row] else None

        def mean_experts(row: int) -> Optional[float]:
            return float((self.hist[row] * np.arange(self.E + 1)).sum() / tokens[row]) if tokens[row] else None

        n = max(self.num_images, 1)
        with np.errstate(invalid='ignore', divide='ignore'):
            importance = np.where(self.class_tokens > 0, self.prob_sum / np.maximum(self.class_tokens, 1), np.nan)
        expert_importance = self.prob_sum.sum(axis=1) / max(int(self.class_tokens.sum()), 1)
        return dict(
            num_experts=self.E, capacity=self.capacity, num_tokens=self.T, num_prefix_tokens=self.P,
            grid=list(self.grid), router='expert_choice' if self.expert_choice else 'token_choice',
            num_images=self.num_images,
            experts_per_token={key: self.hist[i].tolist() for i, key in enumerate(keys)},
            num_tokens_by_category={key: int(tokens[i]) for i, key in enumerate(keys)},
            unprocessed_fraction={key: fraction(i, 0) for i, key in enumerate(keys)},
            mean_experts_per_token={key: mean_experts(i) for i, key in enumerate(keys)},
            unprocessed_map=(self.unprocessed_map / n).reshape(self.grid).tolist(),
            mean_experts_map=(self.experts_map / n).reshape(self.grid).tolist(),
            expert_importance=expert_importance.tolist(),
            per_class=dict(
                assignments=self.assignments.tolist(),
                load=_nan_to_none(_share(self.assignments.astype(np.float64)).tolist()),
                importance=_nan_to_none(importance.tolist()),
                combine_weight=_nan_to_none(_share(self.weight_sum).tolist()),
                num_images=(self.class_tokens // self.T).tolist(),
            ),
            combine_weights=dict(
                bin_edges=self.bin_edges.tolist(), counts=self.weight_counts.tolist(),
                num_slots=self.total_slots, num_filled=self.filled_slots,
                mean=self.weight_total / self.filled_slots if self.filled_slots else None,
                min=self.weight_min if self.filled_slots else None, max=self.weight_max if self.filled_slots else None,
            ),
        )


def compute_layer_stats(token_index: torch.Tensor, combine_weights: torch.Tensor, probs: torch.Tensor,
                        targets: torch.Tensor, categories: torch.Tensor, num_prefix_tokens: int,
                        grid: Tuple[int, int], num_classes: int, expert_choice: bool, num_bins: int = 100) -> Dict:
    """`LayerStats(...).result()` of a single batch (see LayerStats)."""
    stats = LayerStats(token_index.shape[1], probs.shape[1], num_prefix_tokens, grid, num_classes, expert_choice,
                       num_bins)
    stats.update(token_index, combine_weights, probs, targets, categories)
    return stats.result()
