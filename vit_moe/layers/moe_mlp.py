""" MoeMlp: a drop-in replacement for a ViT block's MLP, routed per image.

dispatch (gather the tokens of every expert slot) -> stacked experts (two batched matmuls) ->
combine (weight each slot and add it back to its token). No loop over experts and no
data-dependent shapes: capacity is a constant for a given number of tokens per image.

The layer stays a plain `x -> y` module inside timm's blocks. Its router's aux loss and metrics go to
an open `vit_moe.capture_routing()` (if any) and are never stored on the module. For torch.fx the layer
is a leaf (registered with timm's notrace registry): its capacity is computed from the input shape.
"""
from typing import Dict, Optional

import torch
import torch.nn as nn
from timm.layers import register_notrace_module

from .experts import ExpertMlps, expert_bank_like
from .routers import create_router
from .routing_capture import record_routing, replayed_routing

__all__ = ['MoeMlp', 'moe_layers', 'combine_by_matmul']


def _check_granularity(expert_granularity: int, num_experts: int) -> int:
    G = expert_granularity
    if isinstance(G, bool) or not isinstance(G, int) or G < 1 or num_experts % G:
        raise ValueError(f'expert_granularity must be an integer >= 1 dividing num_experts={num_experts}, got {G!r}')
    return G


@register_notrace_module
class MoeMlp(nn.Module):
    """Mixture of `num_experts` MLP experts behind a router (expert choice by default).

    Args:
        dim: token width (input and output).
        hidden_features: hidden width of each expert.
        num_experts: experts in the layer.
        router: 'expert_choice' or 'token_choice'.
        capacity_factor: C; capacity = ceil(C * tokens / E) (expert choice), ceil(C * k * tokens / E) (top-k).
        top_k: experts per token (token choice only).
        router_norm: rescale each token's combine weights to sum to 1.
        capacity_multiple_of: round capacity up to a multiple of this (V-MoE uses 4).
        act_layer, bias, drop: as in timm's Mlp (for the default `ExpertMlps` bank).
        output_scale: a learnable scalar on the layer's output, initialised to E / C (expert choice; E / k for
            top-k, 1 with router_norm): with a near-uniform router a token's combine weights sum to C / E on average,
            so an upcycled layer starts close to the dense MLP's function instead of scaled down by about C / E.
        experts: an expert bank ([E, N, dim] -> [E, N, dim], `vit_moe.layers.experts`); default `ExpertMlps`.
        shared_experts: an expert bank whose experts process every token, added to the routed output.
        expert_granularity: G; experts are 1/G hidden slices of the dense MLP (`experts` is built so), softmax per
            virtual group of E / G experts (one group per slice), and the router's capacity factor and top-k are
            multiplied by G so that FLOPs per token equal those of a whole-expert MoE with the same C (and k).
        router_kwargs: extra router options (batch_priority, aux_loss_weight, z_loss_weight, priority_tokens).
    """

    def __init__(
            self,
            dim: int,
            hidden_features: int,
            num_experts: int = 32,
            router: str = 'expert_choice',
            capacity_factor: float = 2.0,
            top_k: int = 2,
            router_norm: bool = False,
            capacity_multiple_of: Optional[int] = None,
            act_layer=nn.GELU,
            bias=True,
            drop=0.,
            experts: Optional[nn.Module] = None,
            output_scale: bool = False,
            shared_experts: Optional[nn.Module] = None,
            expert_granularity: int = 1,
            **router_kwargs,
    ):
        super().__init__()
        G = _check_granularity(expert_granularity, num_experts)
        # C and top_k keep their whole-expert meaning: a token meets G times more, G times smaller experts
        self.router = create_router(
            router, dim, num_experts, capacity_factor * G, top_k=top_k * G, router_norm=router_norm,
            capacity_multiple_of=capacity_multiple_of, groups=G, **router_kwargs)
        self.experts = experts if experts is not None else ExpertMlps(
            num_experts, dim, hidden_features, act_layer=act_layer, bias=bias, drop=drop)
        self.shared_experts = shared_experts  # always-on experts (their own bank), added to the routed output
        self.num_experts = num_experts
        self.expert_granularity = G
        self.layer_name = 'moe_mlp'  # the key of this layer's metrics; models set their module path
        # a token's combine weights: ~G / E each (softmax per virtual group), from C * G (or k * G) experts
        experts_per_token = top_k if router == 'token_choice' else capacity_factor
        expected_weight = 1.0 if router_norm else experts_per_token * G * G / num_experts
        # shape [1], not a 0-dim scalar: FSDP2's fully_shard refuses scalar parameters
        self.output_scale = nn.Parameter(torch.full((1,), 1.0 / expected_weight)) if output_scale else None

    @classmethod
    def from_mlp(cls, mlp: nn.Module, num_experts: int = 32, router: str = 'expert_choice',
                 num_shared_experts: int = 0, expert_granularity: int = 1, slots_per_expert: int = 1,
                 soft_scale: float = 1.0, **kwargs) -> 'MoeMlp':
        """A MoE layer shaped like a dense timm MLP (`Mlp`, `GluMlp` / `SwiGLUPacked`, `SwiGLU`, `GatedMlp` without a
        gate); experts randomly initialised (see `vit_moe.models.conversion`). `router='soft'` gives a `SoftMoeMlp`;
        `num_shared_experts` adds always-on experts of the dense MLP's full size; `expert_granularity` G makes each
        expert a 1/G hidden slice of the MLP."""
        if isinstance(num_shared_experts, bool) or not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f'num_shared_experts must be an integer >= 0, got {num_shared_experts!r}')
        G = _check_granularity(expert_granularity, num_experts)
        if router == 'soft' and G > 1:
            raise ValueError(f'expert_granularity={G} is for expert_choice / token_choice routers; Soft MoE mixes '
                             f'tokens into slots instead (accepted with router=soft: 1)')
        experts = expert_bank_like(mlp, num_experts, granularity=G)
        if experts.out_features != experts.in_features:
            raise TypeError(f'{type(mlp).__name__} maps {experts.in_features} to {experts.out_features} features; a MoE '
                            f'layer replaces a block MLP whose output width equals its input width')
        shared = expert_bank_like(mlp, num_shared_experts) if num_shared_experts else None
        if router == 'soft':
            from .soft_moe import SoftMoeMlp
            for unused in ('capacity_factor', 'top_k', 'router_norm', 'capacity_multiple_of', 'priority_tokens',
                           'batch_priority', 'aux_loss_weight', 'z_loss_weight'):
                kwargs.pop(unused, None)  # slot-router options: a Soft MoE layer has none
            return SoftMoeMlp(experts.in_features, experts.hidden_features, num_experts, slots_per_expert,
                              soft_scale, experts=experts, shared_experts=shared, **kwargs)
        return cls(experts.in_features, experts.hidden_features, num_experts, router=router, experts=experts,
                   shared_experts=shared, expert_granularity=G, **kwargs)

    def routed(self, x: torch.Tensor):
        """(routed output [B, T, D], Routing, expert outputs [E, B*capacity, D])."""
        B, T, D = x.shape
        routing = self.router(x)
        if not torch.jit.is_scripting():
            replay = replayed_routing(self.layer_name)
            if replay is not None:  # another runtime's slot decisions (parity checks)
                token_index, filled = replay
                routing = routing._replace(token_index=token_index, combine_weights=self.router.replay(
                    routing.probs, token_index, filled).to(routing.combine_weights.dtype))
        E, capacity = routing.token_index.shape[1:]

        # flat token index of every slot, expert-major so each expert's slots are contiguous
        offsets = torch.arange(B, device=x.device).view(B, 1, 1) * T  # [B, 1, 1]
        slots = (routing.token_index + offsets).transpose(0, 1).reshape(-1)  # [E*B*capacity]
        x_flat = x.reshape(B * T, D)  # [B*T, D]
        expert_in = x_flat.index_select(0, slots).view(E, B * capacity, D)  # [E, B*capacity, D]

        expert_out = self.experts(expert_in)  # [E, B*capacity, D]

        # combine in float32 for half inputs: exact sums, and ONNX Runtime's CPU ScatterND-add has no float16
        acc_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        exporting = False
        if not torch.jit.is_scripting():  # TorchScript cannot compile the queries
            # torch.export tracing (what the dynamo ONNX exporter runs) or the TorchScript-based ONNX exporter
            exporting = torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()
        if exporting:
            out = combine_by_matmul(expert_out, routing.token_index, routing.combine_weights, T, acc_dtype)
        else:
            weights = routing.combine_weights.transpose(0, 1).reshape(E, B * capacity, 1)  # [E, B*capacity, 1]
            weighted = (expert_out.to(acc_dtype) * weights.to(acc_dtype)).view(-1, D)  # [E*B*capacity, D]
            out = x_flat.new_zeros(B * T, D, dtype=acc_dtype).index_add(0, slots, weighted)  # [B*T, D]
        return out.view(B, T, D).to(x.dtype), routing, expert_out

    def scaled_with_shared(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The routed output [B, T, D] times `output_scale` (if any), plus every shared expert's output on `x`."""
        if self.output_scale is not None:
            out = out * self.output_scale.to(out.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_output(x).to(out.dtype)
        return out

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] sum of the shared experts' outputs (each processes every token)."""
        B, T, D = x.shape
        num_shared = self.shared_experts.fc2.weight.shape[0]
        shared_in = x.reshape(1, B * T, D).expand(num_shared, B * T, D)  # [S, B*T, D]
        return self.shared_experts(shared_in).sum(dim=0).view(B, T, D)  # [B, T, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, routing, expert_out = self.routed(x)
        out = self.scaled_with_shared(out, x)
        if not torch.jit.is_scripting():
            record_routing(self.layer_name, routing, out, x, expert_out)
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        scale = state_dict.get(prefix + 'output_scale')
        if scale is not None and scale.dim() == 0:  # saved by vit-moe 0.2 as a 0-dim scalar
            state_dict[prefix + 'output_scale'] = scale.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f'num_experts={self.num_experts}'


def combine_by_matmul(
        expert_out: torch.Tensor,
        token_index: torch.Tensor,
        combine_weights: torch.Tensor,
        num_tokens: int,
        dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Add every slot's weighted output back to its token with a per-image [T, E*capacity] combine matrix.

    The same sums as `index_add`, written for exported graphs: `index_add` exports to ScatterND(reduction='add'),
    whose ONNX Runtime CPU kernel races when indices repeat (a token taken by several experts) and more than one
    thread runs it (microsoft/onnxruntime#18048, still in 1.32): updates are lost, silently. A matmul has no race.
    The combine matrix costs 2 * T * (E * capacity) * D FLOPs per image (about 3-6 % of the experts' for ViT-S/B).

    Args:
        expert_out: [E, B*capacity, D] expert outputs, slots expert-major then image-major.
        token_index: [B, E, capacity] token of every slot.
        combine_weights: [B, E, capacity] weight of every slot (0 for an empty slot).
        num_tokens: T, tokens per image.
        dtype: accumulation dtype.

    Returns:
        [B, T, D]
    """
    E, _, D = expert_out.shape
    B, _, capacity = token_index.shape
    slot_out = expert_out.view(E, B, capacity, D).transpose(0, 1).reshape(B, E * capacity, D)  # [B, E*capacity, D]
    tokens = torch.arange(num_tokens, device=token_index.device).view(1, num_tokens, 1)  # [1, T, 1]
    one_hot = token_index.reshape(B, 1, E * capacity) == tokens  # [B, T, E*capacity]
    combine = one_hot.to(dtype) * combine_weights.reshape(B, 1, E * capacity).to(dtype)  # [B, T, E*capacity]
    return torch.bmm(combine, slot_out.to(dtype))  # [B, T, D]


def moe_layers(model: nn.Module) -> Dict[str, MoeMlp]:
    """Module path -> MoeMlp for every MoE layer of a model (empty for a dense model)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoeMlp)}
