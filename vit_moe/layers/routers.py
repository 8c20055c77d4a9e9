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
from typing import Dict, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .moe_config import MoeConfig, expert_choice_slots, is_int, token_choice_slots

__all__ = ['Routing', 'ExpertChoiceRouter', 'TokenChoiceRouter', 'ROUTERS', 'create_router']


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


class _LinearRouter(nn.Module):
    """Shared parts: a bias-free linear gate with N(0, 0.02) init, logits and softmax in float32. Every option (E, C,
    G, k, router_norm, capacity rounding) comes from `self.config` (a `MoeConfig`); assigning a config (what
    `vit_moe.layers.set_capacity_factor` does through the model's `moe_config`) is the one way to change them, and
    refreshes the plain copies the forward reads (TorchScript cannot read a MoeConfig). The first `priority_tokens`
    tokens of an image (class token, registers; 0 unless prefix_tokens='always') are routed first."""

    __jit_unused_properties__ = ['config']

    def __init__(self, dim: int, config: MoeConfig, priority_tokens: int = 0):
        super().__init__()
        if not is_int(dim) or dim < 1:
            raise ValueError(f'dim must be an integer >= 1, got {dim!r}')
        if not is_int(priority_tokens) or priority_tokens < 0:
            raise ValueError(f'priority_tokens must be an integer >= 0, got {priority_tokens!r}')
        self.priority_tokens = priority_tokens  # a property of the backbone (its prefix tokens), not an option
        self.config = config
        self.gate = nn.Linear(dim, config.num_experts, bias=False)
        self.init_weights()

    @property
    def config(self) -> MoeConfig:
        return self._config

    @config.setter
    def config(self, config: MoeConfig) -> None:
        self._config = config
        self.num_experts: int = config.num_experts
        self.groups: int = config.groups  # softmax (and top-k, normalisation) within each of G blocks of E / G experts
        self.router_norm: bool = bool(config.router_norm)
        self.capacity_factor: float = float(config.capacity_factor)
        self.capacity_multiple_of: Optional[int] = config.capacity_multiple_of
        self._set_options(config)

    def _set_options(self, config: MoeConfig) -> None:
        """A router's own options, copied from `config` when it is assigned."""

    def init_weights(self) -> None:
        nn.init.normal_(self.gate.weight, std=0.02)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # float32 router whatever the autocast / parameter dtype (no autocast context in exported graphs)
        if not torch.jit.is_scripting():
            if torch.is_autocast_enabled(x.device.type):
                with torch.autocast(device_type=x.device.type, enabled=False):
                    return F.linear(x.float(), self.gate.weight.float())  # [B, T, E]
        return F.linear(x.float(), self.gate.weight.float())  # [B, T, E]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, T, E] softmax over the experts, or with `groups` G over each block of E / G experts (summing to G)."""
        if self.groups == 1:
            return logits.softmax(dim=-1)  # [B, T, E]
        B, T, E = logits.shape
        return logits.view(B, T, self.groups, E // self.groups).softmax(dim=-1).view(B, T, E)  # [B, T, E]

    def priority_first(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """[..., k] indices of the k largest of `scores` [..., T] with the first `priority_tokens` tokens first
        whatever their scores (exactly: no bonus that a score could reach), the rest by descending score."""
        P = self.priority_tokens
        if not P:
            return scores.topk(k, dim=-1).indices
        size = list(scores.shape[:-1]) + [P]
        first = torch.arange(P, device=scores.device).expand(size)  # [..., P]
        rest = scores[..., P:].topk(k - P, dim=-1).indices + P  # [..., k - P]
        return torch.cat([first, rest], dim=-1)  # [..., k]

    def forward(self, x: torch.Tensor) -> Routing:
        return self.route(self.logits(x))

    def route(self, logits: torch.Tensor) -> Routing:
        raise NotImplementedError

    def norm_per_token(self, probs: torch.Tensor, token_index: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def replay(self, probs: torch.Tensor, token_index: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """Combine weights [B, E, capacity] for given slots (another runtime's decisions) under these `probs`."""
        gates = probs.transpose(1, 2).gather(-1, token_index)  # [B, E, capacity]
        if self.router_norm:
            gates = _normalise_per_token(gates, token_index, self.norm_per_token(probs, token_index, gates))
        return gates * filled

    def extra_repr(self) -> str:
        return f'num_experts={self.num_experts}, router_norm={self.router_norm}, ' \
               f'priority_tokens={self.priority_tokens}, groups={self.groups}'


def _group_of_slots(token_index: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, E, capacity] the group (0..G-1) of each slot's expert."""
    E = token_index.shape[1]
    group = torch.arange(E, device=token_index.device) // (E // groups)  # [E]
    return group.view(1, E, 1).expand_as(token_index)  # [B, E, capacity]


def _weight_per_token(probs: torch.Tensor, token_index: torch.Tensor, gates: torch.Tensor, groups: int = 1
                      ) -> torch.Tensor:
    """[B, T, G] sum of the combine weights [B, E, capacity] each token received in each group (0: no expert)."""
    B, T, _ = probs.shape
    flat = (token_index * groups + _group_of_slots(token_index, groups)).flatten(1)  # [B, E*capacity] token-group
    return probs.new_zeros(B, T * groups).scatter_add(1, flat, gates.flatten(1)).view(B, T, groups)  # [B, T, G]


def _normalise_per_token(gates: torch.Tensor, token_index: torch.Tensor, per_token: torch.Tensor) -> torch.Tensor:
    """Combine weights [B, E, capacity] rescaled so that each token's sum to 1 in each group (`per_token` [B, T, G])."""
    B, T, G = per_token.shape
    flat = (token_index * G + _group_of_slots(token_index, G)).flatten(1)  # [B, E*capacity]
    return gates / per_token.reshape(B, T * G).gather(1, flat).view_as(gates).clamp_min(1e-9)


class ExpertChoiceRouter(_LinearRouter):
    """Expert Choice: each expert takes the `capacity` tokens of the image it prefers most.

    A token's output is the sum over the experts that picked it of probability * expert(token); a
    token picked by no expert passes through the residual only. No auxiliary loss is needed. With
    `priority_tokens` P, every expert takes the image's first P tokens (class token, registers) in P
    extra slots, with their router probabilities as combine weights (which sum to 1 over the experts
    of a group: with copied experts a prefix token gets exactly the dense MLP), and chooses the other
    tokens as without them (ceil(C * G * (T - P) / E) slots). With `router_norm` a token's weights sum
    to 1 within each group of experts that took it.
    """

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert: P + ceil(C * G * (T - P) / E), rounded up to capacity_multiple_of, at most T
        (`MoeConfig.capacity`, the same function)."""
        return expert_choice_slots(num_tokens, self.priority_tokens, self.num_experts, self.capacity_factor,
                                   self.groups, self.capacity_multiple_of)

    def norm_per_token(self, probs: torch.Tensor, token_index: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """[B, T, G] what `router_norm` divides a token's weights by: their sum over the experts that took it."""
        return _weight_per_token(probs, token_index, gates, self.groups)

    def route(self, logits: torch.Tensor) -> Routing:
        """Slots from router logits [B, T, E] (float32)."""
        B, T, _ = logits.shape
        capacity = self.capacity(T)
        probs = self.probabilities(logits)  # [B, T, E]
        if self.priority_tokens:
            token_index = self.priority_first(probs.transpose(1, 2), capacity)  # [B, E, capacity]
            gates = probs.transpose(1, 2).gather(-1, token_index)  # [B, E, capacity]
        else:
            gates, token_index = probs.transpose(1, 2).topk(capacity, dim=-1)  # [B, E, capacity] each

        weight_sum = _weight_per_token(probs, token_index, gates, self.groups)  # [B, T, G]
        if self.router_norm:
            gates = _normalise_per_token(gates, token_index, weight_sum)

        metrics = dict(
            expert_load=torch.ones(self.num_experts, device=logits.device),  # every slot is filled
            importance=probs.detach().mean(dim=(0, 1)) / self.groups,  # [E], sums to 1
            dropped_fraction=(weight_sum.detach() == 0).float().mean(),  # (token, group) pairs no expert took
        )
        return Routing(token_index, gates, probs.new_zeros(()), metrics, probs)


class TokenChoiceRouter(_LinearRouter):
    """Token Choice top-k with a static per-image capacity per expert.

    Each token picks its top-k experts (with G groups: its top k in every group, k * G in all). Slots
    are claimed choice by choice (every token's first choice before any second choice) in token
    order, or, with Batch Priority Routing, in order of the token's top-1 probability (summed over the
    groups); the first `priority_tokens` tokens (class token, registers) claim all their k * G picks before any
    other token claims one, so the class token keeps every pick whatever the capacity.
    Assignments past an expert's capacity, ceil(C * k * G * T / E), are dropped.

    Config options: top_k, batch_priority (order by top-1 probability instead of token position),
    aux_loss_weight (weight of the load-balancing loss E * sum_e(fraction_e * mean_prob_e) / G over
    the groups), z_loss_weight (router z-loss mean(logsumexp(logits) ** 2); 0 disables it),
    router_norm (rescale a token's top-k weights in each group to sum to 1, before capacity drops).
    """

    def _set_options(self, config: MoeConfig) -> None:
        self.top_k: int = config.top_k
        self.batch_priority: bool = bool(config.batch_priority)
        self.aux_loss_weight: float = float(config.aux_loss_weight)
        self.z_loss_weight: float = float(config.z_loss_weight)

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert: ceil(C * k * G * T / E), rounded up to capacity_multiple_of, at most T
        (`MoeConfig.capacity`, the same function)."""
        return token_choice_slots(num_tokens, self.num_experts, self.capacity_factor, self.top_k, self.groups,
                                  self.capacity_multiple_of)

    def _top_k(self, probs: torch.Tensor):
        """(gates, experts) [B, T, G, k]: each token's top k experts within every group (expert indices global)."""
        B, T, E = probs.shape
        G = self.groups
        gates, experts = probs.view(B, T, G, E // G).topk(self.top_k, dim=-1)  # [B, T, G, k] each
        offsets = torch.arange(G, device=probs.device).view(1, 1, G, 1) * (E // G)  # [1, 1, G, 1]
        return gates, experts + offsets

    def norm_per_token(self, probs: torch.Tensor, token_index: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """[B, T, G] what `router_norm` divides a token's weights by: the sum of its top-k probabilities per group
        (before capacity drops)."""
        return self._top_k(probs)[0].sum(dim=-1)

    def route(self, logits: torch.Tensor) -> Routing:
        """Slots from router logits [B, T, E] (float32)."""
        B, T, _ = logits.shape
        E, k, G, P = self.num_experts, self.top_k, self.groups, self.priority_tokens
        capacity = self.capacity(T)
        probs = self.probabilities(logits)  # [B, T, E]
        gates, experts = self._top_k(probs)  # [B, T, G, k] each
        if self.router_norm:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        picks = G * k  # per token, choice-major within the token: choice c of group g at c * G + g
        gates = gates.transpose(2, 3).reshape(B, T, picks)  # [B, T, k*G]
        experts = experts.transpose(2, 3).reshape(B, T, picks)  # [B, T, k*G]
        first = F.one_hot(experts[..., :G], E).float().sum(dim=(1, 2)) / T  # [B, E] share of first choices

        # the order in which assignments claim slots: every pick of the P prefix tokens, then choice by choice
        # (every token's first choice before any second one) in token order or by top-1 probability
        if self.batch_priority:
            order = self.priority_first(gates[..., :G].sum(dim=-1), T)  # [B, T] (topk: exportable, ONNX TopK)
        else:
            order = torch.arange(T, device=logits.device).expand(B, T)  # [B, T]
        order_k = order.unsqueeze(-1).expand(B, T, picks)  # [B, T, k*G]
        experts, gates = experts.gather(1, order_k), gates.gather(1, order_k)  # [B, T, k*G] each, claim order
        experts = torch.cat([experts[:, :P].reshape(B, P * picks),
                             experts[:, P:].transpose(1, 2).reshape(B, picks * (T - P))], dim=1)  # [B, k*G*T]
        gates = torch.cat([gates[:, :P].reshape(B, P * picks),
                           gates[:, P:].transpose(1, 2).reshape(B, picks * (T - P))], dim=1)  # [B, k*G*T]
        tokens = torch.cat([order[:, :P].repeat_interleave(picks, dim=1), order[:, P:].repeat(1, picks)],
                           dim=1)  # [B, k*G*T]

        one_hot = F.one_hot(experts, E)  # [B, k*G*T, E]
        position = ((one_hot.cumsum(dim=1) - 1) * one_hot).sum(dim=-1)  # [B, k*G*T] slot within its expert
        kept = position < capacity  # [B, k*G*T]
        dump = E * capacity  # one extra slot collects every dropped assignment
        slot = torch.where(kept, experts * capacity + position, torch.full_like(position, dump))  # [B, k*G*T]

        token_index = tokens.new_zeros(B, dump + 1).scatter(1, slot, tokens)[:, :dump]  # [B, E*capacity]
        combine = gates.new_zeros(B, dump + 1).scatter(1, slot, gates * kept)[:, :dump]  # [B, E*capacity]

        aux_loss = self.aux_loss_weight * E / G * (first * probs.mean(dim=1)).sum(dim=-1).mean()
        if self.z_loss_weight:
            aux_loss = aux_loss + self.z_loss_weight * logits.logsumexp(dim=-1).square().mean()

        filled = (kept.unsqueeze(-1) * one_hot).sum(dim=1)  # [B, E] slots used per expert
        metrics = dict(
            expert_load=filled.float().mean(dim=0) / capacity,
            importance=probs.detach().mean(dim=(0, 1)) / G,  # [E], sums to 1
            dropped_fraction=1.0 - kept.float().mean(),
        )
        return Routing(token_index.view(B, E, capacity), combine.view(B, E, capacity), aux_loss, metrics, probs)


ROUTERS = {'expert_choice': ExpertChoiceRouter, 'token_choice': TokenChoiceRouter}


def create_router(dim: int, config: MoeConfig, priority_tokens: int = 0) -> nn.Module:
    """The slot router `config.router` names ('expert_choice' or 'token_choice') for tokens of width `dim`."""
    if config.router not in ROUTERS:
        raise ValueError(f'router={config.router!r} has no slot router; accepted: {", ".join(ROUTERS)} (Soft MoE '
                         f'layers build their own: vit_moe.layers.SoftMoeMlp)')
    return ROUTERS[config.router](dim, config, priority_tokens)
