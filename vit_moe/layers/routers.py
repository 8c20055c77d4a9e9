""" Routers for per-image Mixture-of-Experts layers.

A router maps the tokens of each image to a fixed number of slots per expert (the capacity) and
returns a `Routing`: which token fills each slot, with what combine weight, and metrics. The MoE
layer (`vit_moe.layers.MoeMlp`) does not know which router it has.

Routing groups are single images (all tokens of one image, class token included): capacity depends
only on the number of tokens per image, so it is a constant for an input size (static shapes in an
exported graph), and an image's output never depends on which other images share its batch.

* Expert Choice: Zhou et al., 2022, https://arxiv.org/abs/2202.09368
* Token Choice top-k with Batch Priority Routing: Riquelme et al., 2021 (V-MoE),
  https://arxiv.org/abs/2106.05974; load-balancing loss as in Switch / GShard; router z-loss as in
  ST-MoE, https://arxiv.org/abs/2202.08906
"""
import math
from typing import Dict, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    'Routing', 'ExpertChoiceRouter', 'TokenChoiceRouter', 'ROUTERS', 'create_router',
    'expert_choice_capacity', 'token_choice_capacity',
]


def _round_capacity(capacity: float, num_tokens: int, multiple_of: Optional[int]) -> int:
    rounded = math.ceil(capacity)
    if multiple_of is not None and multiple_of > 1:
        rounded = math.ceil(rounded / multiple_of) * multiple_of
    return max(1, min(rounded, num_tokens))  # an expert cannot take a token twice


def expert_choice_capacity(
        num_tokens: int, num_experts: int, capacity_factor: float, multiple_of: Optional[int] = None) -> int:
    """Tokens each expert takes per image: ceil(C * tokens / E), optionally rounded up, at most tokens."""
    return _round_capacity(capacity_factor * num_tokens / num_experts, num_tokens, multiple_of)


def token_choice_capacity(
        num_tokens: int, num_experts: int, capacity_factor: float, top_k: int, multiple_of: Optional[int] = None,
) -> int:
    """Slots per expert per image for top-k routing: ceil(C * k * tokens / E), at most tokens."""
    return _round_capacity(capacity_factor * top_k * num_tokens / num_experts, num_tokens, multiple_of)


class Routing(NamedTuple):
    """What a router decided for a batch of images.

    Attributes:
        token_index: [B, E, capacity] index (within its image) of the token in each expert slot.
        combine_weights: [B, E, capacity] weight of each slot's output; 0 for an empty slot.
        aux_loss: scalar to add to the task loss (already weighted; 0 when the router needs none).
        metrics: detached per-layer statistics for logging: `expert_load` [E] (fraction of each
            expert's slots that hold a token), `importance` [E] (mean router probability per
            expert, sums to 1), `dropped_fraction` (tokens routed to no expert for expert choice;
            token-expert assignments dropped over capacity for token choice).
        probs: [B, T, E] router probabilities (float32): what the slots were chosen by.
    """
    token_index: torch.Tensor
    combine_weights: torch.Tensor
    aux_loss: torch.Tensor
    metrics: Dict[str, torch.Tensor]
    probs: torch.Tensor


def _check_router_args(dim: int, num_experts: int, capacity_factor: float, capacity_multiple_of: Optional[int]):
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f'num_experts must be an integer >= 1, got {num_experts!r}')
    if not capacity_factor > 0:
        raise ValueError(f'capacity_factor must be > 0, got {capacity_factor!r}')
    if capacity_multiple_of is not None and capacity_multiple_of < 1:
        raise ValueError(f'capacity_multiple_of must be None or an integer >= 1, got {capacity_multiple_of!r}')
    if dim < 1:
        raise ValueError(f'dim must be >= 1, got {dim!r}')


class _LinearRouter(nn.Module):
    """Shared parts: a bias-free linear gate with N(0, 0.02) init, logits and softmax in float32."""

    def __init__(
            self,
            dim: int,
            num_experts: int,
            capacity_factor: float,
            capacity_multiple_of: Optional[int] = None,
            router_norm: bool = False,
            priority_tokens: int = 0,
            groups: int = 1,
    ):
        super().__init__()
        _check_router_args(dim, num_experts, capacity_factor, capacity_multiple_of)
        if isinstance(priority_tokens, bool) or not isinstance(priority_tokens, int) or priority_tokens < 0:
            raise ValueError(f'priority_tokens must be an integer >= 0, got {priority_tokens!r}')
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 or num_experts % groups:
            raise ValueError(f'groups must be an integer >= 1 dividing num_experts={num_experts}, got {groups!r}')
        self.num_experts = num_experts
        self.capacity_factor = float(capacity_factor)
        self.capacity_multiple_of = capacity_multiple_of
        self.router_norm = router_norm
        self.priority_tokens = priority_tokens  # the first N tokens of an image (class token, registers) go first
        self.groups = groups  # softmax within each of `groups` blocks of experts (fine-grained virtual groups)
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.gate.weight, std=0.02)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # float32 router whatever the autocast / parameter dtype (no autocast context in exported graphs)
        if not torch.jit.is_scripting():
            if torch.is_autocast_enabled(x.device.type):
                with torch.autocast(device_type=x.device.type, enabled=False):
                    return F.linear(x.float(), self.gate.weight.float())  # [B, T, E]
        return F.linear(x.float(), self.gate.weight.float())  # [B, T, E]

    def capacity(self, num_tokens: int) -> int:
        raise NotImplementedError

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, T, E] softmax over the experts, or with `groups` G over each block of E / G experts (summing to G)."""
        if self.groups == 1:
            return logits.softmax(dim=-1)  # [B, T, E]
        B, T, E = logits.shape
        return logits.view(B, T, self.groups, E // self.groups).softmax(dim=-1).view(B, T, E)  # [B, T, E]

    def priority_bonus(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` [..., T] (probabilities, <= 1) plus 1 on the first `priority_tokens` tokens: they rank first."""
        if not self.priority_tokens:
            return scores
        first = torch.arange(scores.shape[-1], device=scores.device) < self.priority_tokens  # [T]
        return scores + first.to(scores.dtype)  # [..., T]

    def extra_repr(self) -> str:
        return f'num_experts={self.num_experts}, capacity_factor={self.capacity_factor}, ' \
               f'router_norm={self.router_norm}, priority_tokens={self.priority_tokens}, groups={self.groups}'


def _weight_per_token(probs: torch.Tensor, token_index: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """[B, T] sum of the combine weights [B, E, capacity] each token received (0: taken by no expert)."""
    return torch.zeros_like(probs[..., 0]).scatter_add(1, token_index.flatten(1), gates.flatten(1))


def _normalise_per_token(gates: torch.Tensor, token_index: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
    """Combine weights [B, E, capacity] rescaled so that each token's sum to 1."""
    return gates / per_token.gather(1, token_index.flatten(1)).view_as(gates).clamp_min(1e-9)


class ExpertChoiceRouter(_LinearRouter):
    """Expert Choice: each expert takes the `capacity` tokens of the image it prefers most.

    A token's output is the sum over the experts that picked it of probability * expert(token); a
    token picked by no expert passes through the residual only. No auxiliary loss is needed. With
    `priority_tokens` P, every expert takes the image's first P tokens (class token, registers) in P
    extra slots, with their router probabilities as combine weights (which sum to 1 over the experts:
    with copied experts a prefix token gets exactly the dense MLP), and chooses the other tokens as
    without them (ceil(C * (T - P) / E) slots).
    """

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert: ceil(C * tokens / E), or with P priority tokens P more than for the other tokens."""
        prefix = min(self.priority_tokens, num_tokens)
        if prefix == num_tokens:
            return num_tokens
        return prefix + expert_choice_capacity(
            num_tokens - prefix, self.num_experts, self.capacity_factor, self.capacity_multiple_of)

    def replay(self, probs: torch.Tensor, token_index: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """Combine weights [B, E, capacity] for given slots (another runtime's decisions) under these `probs`."""
        gates = probs.transpose(1, 2).gather(-1, token_index)  # [B, E, capacity]
        if self.router_norm:
            gates = _normalise_per_token(gates, token_index, _weight_per_token(probs, token_index, gates))
        return gates * filled

    def forward(self, x: torch.Tensor) -> Routing:
        return self.route(self.logits(x))

    def route(self, logits: torch.Tensor) -> Routing:
        """Slots from router logits [B, T, E] (float32)."""
        B, T, _ = logits.shape
        capacity = self.capacity(T)
        probs = self.probabilities(logits)  # [B, T, E]
        if self.priority_tokens:
            token_index = self.priority_bonus(probs.transpose(1, 2)).topk(capacity, dim=-1).indices  # [B, E, capacity]
            gates = probs.transpose(1, 2).gather(-1, token_index)  # [B, E, capacity]
        else:
            gates, token_index = probs.transpose(1, 2).topk(capacity, dim=-1)  # [B, E, capacity] each

        picked = _weight_per_token(probs, token_index, gates)  # [B, T]
        if self.router_norm:
            gates = _normalise_per_token(gates, token_index, picked)

        metrics = dict(
            expert_load=torch.ones(self.num_experts, device=logits.device),  # every slot is filled
            importance=probs.detach().mean(dim=(0, 1)),  # [E]
            dropped_fraction=(picked.detach() == 0).float().mean(),
        )
        return Routing(token_index, gates, probs.new_zeros(()), metrics, probs)


class TokenChoiceRouter(_LinearRouter):
    """Token Choice top-k with a static per-image capacity per expert.

    Each token picks its top-k experts. Slots are claimed choice by choice (every token's first
    choice before any second choice) in token order, or, with Batch Priority Routing, in order of
    the token's top-1 probability; the first `priority_tokens` tokens (class token, registers) claim
    theirs first either way. Assignments past an expert's capacity are dropped.

    Args:
        top_k: experts per token.
        batch_priority: order by top-1 probability (BPR) instead of token position.
        aux_loss_weight: weight of the load-balancing loss E * sum_e(fraction_e * mean_prob_e).
        z_loss_weight: weight of the router z-loss mean(logsumexp(logits) ** 2); 0 disables it.
        router_norm: rescale a token's top-k weights to sum to 1 (before capacity drops).
    """

    def __init__(
            self,
            dim: int,
            num_experts: int,
            capacity_factor: float,
            top_k: int = 2,
            capacity_multiple_of: Optional[int] = None,
            router_norm: bool = False,
            batch_priority: bool = True,
            aux_loss_weight: float = 0.01,
            z_loss_weight: float = 0.0,
            priority_tokens: int = 0,
            groups: int = 1,
    ):
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f'top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}')
        super().__init__(dim, num_experts, capacity_factor, capacity_multiple_of, router_norm, priority_tokens, groups)
        self.top_k = top_k
        self.batch_priority = batch_priority
        self.aux_loss_weight = aux_loss_weight
        self.z_loss_weight = z_loss_weight

    def capacity(self, num_tokens: int) -> int:
        return token_choice_capacity(
            num_tokens, self.num_experts, self.capacity_factor, self.top_k, self.capacity_multiple_of)

    def replay(self, probs: torch.Tensor, token_index: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """Combine weights [B, E, capacity] for given slots (another runtime's decisions) under these `probs`."""
        gates = probs.transpose(1, 2).gather(-1, token_index)  # [B, E, capacity]
        if self.router_norm:
            topk_sum = probs.topk(self.top_k, dim=-1).values.sum(dim=-1)  # [B, T]
            gates = gates / topk_sum.gather(1, token_index.flatten(1)).view_as(gates)
        return gates * filled

    def forward(self, x: torch.Tensor) -> Routing:
        return self.route(self.logits(x))

    def route(self, logits: torch.Tensor) -> Routing:
        """Slots from router logits [B, T, E] (float32)."""
        B, T, _ = logits.shape
        E, k = self.num_experts, self.top_k
        capacity = self.capacity(T)
        probs = self.probabilities(logits)  # [B, T, E]
        gates, experts = probs.topk(k, dim=-1)  # [B, T, k] each
        if self.router_norm:
            gates = gates / gates.sum(dim=-1, keepdim=True)

        # order in which assignments claim slots: choice-major, then token priority
        if self.batch_priority:
            order = self.priority_bonus(gates[..., 0]).topk(T, dim=1).indices  # [B, T] (topk: exportable, ONNX TopK)
        else:
            order = torch.arange(T, device=logits.device).expand(B, T)  # [B, T]
        order_k = order.unsqueeze(-1).expand(B, T, k)  # [B, T, k]
        experts = experts.gather(1, order_k).transpose(1, 2).reshape(B, k * T)  # [B, k*T]
        gates = gates.gather(1, order_k).transpose(1, 2).reshape(B, k * T)  # [B, k*T]
        tokens = order.repeat(1, k)  # [B, k*T]

        one_hot = F.one_hot(experts, E)  # [B, k*T, E]
        position = ((one_hot.cumsum(dim=1) - 1) * one_hot).sum(dim=-1)  # [B, k*T] slot within its expert
        kept = position < capacity  # [B, k*T]
        dump = E * capacity  # one extra slot collects every dropped assignment
        slot = torch.where(kept, experts * capacity + position, torch.full_like(position, dump))  # [B, k*T]

        token_index = tokens.new_zeros(B, dump + 1).scatter(1, slot, tokens)[:, :dump]  # [B, E*capacity]
        combine = gates.new_zeros(B, dump + 1).scatter(1, slot, gates * kept)[:, :dump]  # [B, E*capacity]

        top1 = F.one_hot(experts[:, :T], E).float().mean(dim=1)  # [B, E] fraction whose first choice is e
        aux_loss = self.aux_loss_weight * E * (top1 * probs.mean(dim=1)).sum(dim=-1).mean()
        if self.z_loss_weight:
            aux_loss = aux_loss + self.z_loss_weight * logits.logsumexp(dim=-1).square().mean()

        filled = (kept.unsqueeze(-1) * one_hot).sum(dim=1)  # [B, E] slots used per expert
        metrics = dict(
            expert_load=filled.float().mean(dim=0) / capacity,
            importance=probs.detach().mean(dim=(0, 1)),
            dropped_fraction=1.0 - kept.float().mean(),
        )
        return Routing(token_index.view(B, E, capacity), combine.view(B, E, capacity), aux_loss, metrics, probs)


ROUTERS = {'expert_choice': ExpertChoiceRouter, 'token_choice': TokenChoiceRouter}


def create_router(
        router: str,
        dim: int,
        num_experts: int,
        capacity_factor: float,
        top_k: int = 2,
        **kwargs,
) -> nn.Module:
    """Build a router by name: 'expert_choice' (default for ViT) or 'token_choice' (top-k)."""
    if router not in ROUTERS:
        raise ValueError(f'router must be one of {sorted(ROUTERS)}, got {router!r}')
    if router == 'token_choice':
        kwargs['top_k'] = top_k
    return ROUTERS[router](dim, num_experts, capacity_factor, **kwargs)
