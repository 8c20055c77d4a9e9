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

from .experts import ExpertMlps
from .moe_config import MoeConfig
from .routers import create_router
from .routing_capture import record_routing, replayed_routing

__all__ = ['MoeMlp', 'moe_layers', 'combine_by_matmul', 'combine_matrix']


@register_notrace_module
class MoeMlp(nn.Module):
    """Mixture of `num_experts` MLP experts behind a slot router (expert choice by default).

    Args:
        dim: token width (input and output).
        hidden_features: hidden width of each expert (with expert granularity G: 1/G of the dense MLP's).
        config: the MoE options (`MoeConfig`); or give them as keyword arguments (`**options`).
        experts: an expert bank ([E, N, dim] -> [E, N, dim], `vit_moe.layers.experts`); default `ExpertMlps` with
            `act_layer`, `bias`, `drop` as in timm's Mlp.
        shared_experts: a bank whose experts process every token, added to the routed output.
        num_prefix_tokens: leading tokens of an image (class token, registers): with prefix_tokens='always' the
            router takes them first.

    With `output_scale` the routed output is multiplied by a learnable scalar that starts at
    `config.output_scale_init()` (E / (C * G) for expert choice, E / (k * G) for token choice, 1 with router_norm):
    with a near-uniform router a token's combine weights in a group sum to about 1 / that, so an upcycled layer starts
    close to its dense MLP instead of scaled down. Expert choice's 'always' prefix tokens, which start as the dense MLP
    exactly, are left unscaled.
    """

    __jit_unused_properties__ = ['config', 'num_experts', 'expert_granularity']

    def __init__(
            self,
            dim: int,
            hidden_features: int,
            config: Optional[MoeConfig] = None,
            experts: Optional[nn.Module] = None,
            shared_experts: Optional[nn.Module] = None,
            act_layer=nn.GELU,
            bias=True,
            drop=0.,
            num_prefix_tokens: int = 0,
            **options,
    ):
        super().__init__()
        if config is not None and options:
            raise TypeError(f'give the MoE options either as config or as keyword arguments, not both: {sorted(options)}')
        config = config if config is not None else MoeConfig(**options)
        self.check_router(config)
        self.router = self.build_router(dim, config, config.priority_tokens(num_prefix_tokens))
        self.experts = experts if experts is not None else ExpertMlps(
            config.num_experts, dim, hidden_features, act_layer=act_layer, bias=bias, drop=drop)
        self.shared_experts = shared_experts  # always-on experts (their own bank), added to the routed output
        self.layer_name = 'moe_mlp'  # the key of this layer's metrics; models set their module path
        self.expert_parallel = None  # the exchange when the experts are spread over processes (shard_experts)
        self.unscaled_prefix = config.unscaled_prefix(num_prefix_tokens) if config.output_scale else 0
        # shape [1], not a 0-dim scalar: FSDP2's fully_shard refuses scalar parameters
        self.output_scale = nn.Parameter(torch.full((1,), config.output_scale_init())) if config.output_scale else None

    @property
    def config(self) -> MoeConfig:
        """The layer's MoE options: its router's config, read when the layer runs (`set_capacity_factor` replaces
        it through the model's `moe_config`)."""
        return self.router.config

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def expert_granularity(self) -> int:
        return self.config.groups

    def check_router(self, config: MoeConfig) -> None:
        if config.router == 'soft':
            raise ValueError("router='soft' is a SoftMoeMlp layer; build it with SoftMoeMlp or "
                             "vit_moe.layers.moe_layer_like")

    def build_router(self, dim: int, config: MoeConfig, priority_tokens: int) -> nn.Module:
        return create_router(dim, config, priority_tokens)

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

        expert_out = self.run_experts(expert_in)  # [E, B*capacity, D]

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

    def run_experts(self, expert_in: torch.Tensor) -> torch.Tensor:
        """[E, S, D] every expert's slots -> [E, S, D]: the bank, or with expert parallelism the processes holding
        the experts (`vit_moe.layers.expert_parallel`)."""
        if not torch.jit.is_scripting():
            if self.expert_parallel is not None:
                return self.expert_parallel(expert_in, self.experts)
        return self.experts(expert_in)

    def scaled(self, out: torch.Tensor) -> torch.Tensor:
        """The routed output [B, T, D] times `output_scale` (if any), but for the first `unscaled_prefix` tokens."""
        if self.output_scale is None:
            return out
        scale = self.output_scale.to(out.dtype)
        P = self.unscaled_prefix
        return torch.cat([out[:, :P], out[:, P:] * scale], dim=1) if P > 0 else out * scale  # [B, T, D]

    def scaled_with_shared(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`scaled(out)` plus every shared expert's output on `x`."""
        out = self.scaled(out)
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
        return ', '.join(f'{k}={v!r}' for k, v in self.config.to_dict().items() if k not in ('moe_blocks',))


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
    combine = combine_matrix(token_index, combine_weights, num_tokens, dtype)  # [B, T, E*capacity]
    return torch.bmm(combine, slot_out.to(dtype))  # [B, T, D]


def combine_matrix(token_index: torch.Tensor, combine_weights: torch.Tensor, num_tokens: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, T, E*capacity]: each slot's combine weight in the row of the token it holds (token_index, combine_weights
    [B, E, capacity]); no scatter, so it exports to standard ops."""
    B, E, capacity = token_index.shape
    tokens = torch.arange(num_tokens, device=token_index.device).view(1, num_tokens, 1)  # [1, T, 1]
    one_hot = token_index.reshape(B, 1, E * capacity) == tokens  # [B, T, E*capacity]
    return one_hot.to(dtype) * combine_weights.reshape(B, 1, E * capacity).to(dtype)  # [B, T, E*capacity]


def moe_layers(model: nn.Module) -> Dict[str, MoeMlp]:
    """Module path -> MoeMlp for every MoE layer of a model (empty for a dense model)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoeMlp)}
