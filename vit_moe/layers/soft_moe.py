""" Soft MoE (Puigcerver et al., ICLR 2024, https://arxiv.org/abs/2308.00951), per image.

Every slot is a softmax-weighted average of all the image's tokens (dispatch: softmax over tokens), each expert
processes its `slots_per_expert` slots, and every token's output is a softmax-weighted average of all slot outputs
(combine: softmax over slots). Logits are cosine similarities between the L2-normalised tokens and the
L2-normalised slot parameters `mu`, times a learnable scale (as vmoe's `SoftRouter`: mu ~ lecun normal, scale 1).
No token is dropped, there is no auxiliary loss and the shapes are static; an image's output never depends on its
batch-mates.

With copied experts a Soft MoE layer is not the dense MLP (an expert sees averages of tokens, not tokens);
`SoftMoeMlp` starts from `soft_scale` (the logit scale: larger -> sharper dispatch and combine; 100 by default for
upcycling, vmoe trains from 1). Logits and both softmaxes are float32 under any autocast.
"""
from typing import Dict, NamedTuple

import torch
import torch.nn as nn

from .moe_config import MoeConfig
from .moe_mlp import MoeMlp

__all__ = ['SoftRouter', 'SoftRouting', 'SoftMoeMlp', 'l2_normalize', 'slot_similarity', 'soft_moe_layers']


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x ** 2) + eps) along `dim` (vmoe's `normalize`)."""
    return x * torch.rsqrt(x.square().sum(dim=dim, keepdim=True) + eps)


class SoftRouting(NamedTuple):
    """Soft routing of a batch: weights [B, T, E * slots_per_expert] (slot s of expert e at e * slots + s)."""
    dispatch_weights: torch.Tensor  # softmax over tokens (dim 1): each slot's mix of tokens
    combine_weights: torch.Tensor  # softmax over slots (dim 2): each token's mix of slot outputs
    aux_loss: torch.Tensor
    metrics: Dict[str, torch.Tensor]
    probs: torch.Tensor  # [B, T, E] combine mass per expert (for the expert metrics)


def slot_similarity(dispatch: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of the dispatch weights [B, T, N] of every pair of different slots (vmoe's
    dispatch_weights_similarity_mean); 0-dim. One slot: 1."""
    N = dispatch.shape[-1]
    if N == 1:
        return dispatch.new_ones(())
    unit = l2_normalize(dispatch.transpose(1, 2), eps=1e-12)  # [B, N, T]
    similarity = torch.bmm(unit, unit.transpose(1, 2))  # [B, N, N]
    return (similarity.sum(dim=(1, 2)) - similarity.diagonal(dim1=1, dim2=2).sum(-1)).mean() / (N * (N - 1))


class SoftRouter(nn.Module):
    """Slot parameters mu [E * slots_per_expert, dim] and a learnable logit scale [1]; logits in float32."""

    def __init__(self, dim: int, config: MoeConfig):
        super().__init__()
        if config.router != 'soft':
            raise ValueError(f"SoftRouter needs router='soft', got router={config.router!r}")
        self.config = config  # structural options only (the slots are parameters): nothing to change at run time
        self.num_experts, self.slots_per_expert = config.num_experts, config.slots_per_expert
        self.mu = nn.Parameter(torch.empty(config.num_experts * config.slots_per_expert, dim))
        self.scale = nn.Parameter(torch.full((1,), float(config.soft_scale)))  # [1]: FSDP2 refuses 0-dim parameters
        self.initial_scale = float(config.soft_scale)
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.mu, std=self.mu.shape[1] ** -0.5)  # lecun normal over dim
        with torch.no_grad():
            self.scale.fill_(self.initial_scale)

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert (each a mix of all tokens)."""
        return self.slots_per_expert

    def forward(self, x: torch.Tensor) -> SoftRouting:
        # float32 logits and softmaxes whatever the autocast (autocast would run the matmul in bf16 / fp16)
        if not torch.jit.is_scripting():
            if torch.is_autocast_enabled(x.device.type):
                with torch.autocast(device_type=x.device.type, enabled=False):
                    return self.route(x)
        return self.route(x)

    def route(self, x: torch.Tensor) -> SoftRouting:
        B, T, _ = x.shape
        E, S = self.num_experts, self.slots_per_expert
        tokens = l2_normalize(x.float())  # [B, T, D]
        mu = l2_normalize(self.mu.float())  # [E*S, D]
        logits = torch.matmul(tokens, mu.t()) * self.scale.float()  # [B, T, E*S]
        dispatch = logits.softmax(dim=1)  # [B, T, E*S] over tokens
        combine = logits.softmax(dim=2)  # [B, T, E*S] over slots
        per_expert = combine.view(B, T, E, S).sum(dim=-1)  # [B, T, E]
        with torch.no_grad():
            metrics = dict(
                expert_load=torch.ones(E, device=x.device),  # every slot is filled
                importance=per_expert.mean(dim=(0, 1)),  # [E] mean combine mass per expert
                dropped_fraction=torch.zeros((), device=x.device),  # no token is dropped
                dispatch_entropy=-(dispatch * dispatch.clamp_min(1e-30).log()).sum(dim=1).mean(),  # nats, max log T
                combine_entropy=-(combine * combine.clamp_min(1e-30).log()).sum(dim=2).mean(),  # max log(E*S)
                slot_similarity=slot_similarity(dispatch),  # 1: every slot mixes the same tokens
            )
        return SoftRouting(dispatch, combine, logits.new_zeros(()), metrics, per_expert)

    def extra_repr(self) -> str:
        return f'num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}'


class SoftMoeMlp(MoeMlp):
    """`MoeMlp` with a Soft MoE router: experts process `slots_per_expert` soft slots per image each; a token's combine
    weights sum to 1, so `output_scale` starts at 1."""

    def check_router(self, config: MoeConfig) -> None:
        if config.router != 'soft':
            raise ValueError(f"SoftMoeMlp needs router='soft', got router={config.router!r}; MoeMlp routes slots")

    def build_router(self, dim: int, config: MoeConfig, priority_tokens: int) -> nn.Module:
        return SoftRouter(dim, config)

    def routed(self, x: torch.Tensor):
        """(routed output [B, T, D], SoftRouting, expert outputs [E, B*slots, D]); `MoeMlp.forward` does the rest."""
        B, T, D = x.shape
        E, S = self.router.num_experts, self.router.slots_per_expert
        routing = self.router(x)
        slots = torch.matmul(routing.dispatch_weights.transpose(1, 2).to(x.dtype), x)  # [B, E*S, D]
        expert_in = slots.view(B, E, S, D).transpose(0, 1).reshape(E, B * S, D)  # [E, B*S, D]
        expert_out = self.run_experts(expert_in)  # [E, B*S, D]
        slot_out = expert_out.view(E, B, S, D).transpose(0, 1).reshape(B, E * S, D)  # [B, E*S, D]
        out = torch.matmul(routing.combine_weights.to(slot_out.dtype), slot_out)  # [B, T, D]
        return out.to(x.dtype), routing, expert_out


def soft_moe_layers(model: nn.Module) -> Dict[str, 'SoftMoeMlp']:
    """Module path -> SoftMoeMlp for the Soft MoE layers of `model`, like `moe_layers` (tools built on slot routing
    refuse them by name)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SoftMoeMlp)}
