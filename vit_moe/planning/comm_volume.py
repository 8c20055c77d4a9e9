""" Bytes each process sends per training step under DDP, FSDP2 and expert parallelism, from the model's shapes.

What a process sends with the usual algorithms, for a collective over a group of g processes on a tensor of n bytes
(the same counts NCCL's ring and pairwise algorithms give, and `benchmarks/comm_volume.py --measure` checks against
the collectives a real gloo run calls):

    all-reduce 2 n (g - 1) / g     all-gather n_out (g - 1) / g     reduce-scatter n_in (g - 1) / g
    all-to-all n (g - 1) / g

* DDP over W processes: every gradient all-reduced once per optimizer step (fp32: 4 B per parameter).
* FSDP2 over W (full shard, `reshard_after_forward`, one unit per block plus the root): each unit's padded
  parameters all-gathered in the forward and again in the backward (the root once), its gradients reduce-scattered
  once; parameter / gradient bytes from the mixed precision (bf16: 2 + 2, or fp32 4 + 4).
* Expert parallelism over groups of N (W / N data-parallel replicas): the other parameters as DDP or FSDP2 says.
  The expert shards (E / N experts of each layer per process): under DDP, each one's fp32 gradient all-reduced over
  its W / N replicas. Under FSDP2, each expert bank is an FSDP unit of its own over the W / N replicas (the trainer's
  `ExpertShards.shard_over_dp`, where W / N divides every layer's E / N): its E / N experts all-gathered in the
  forward and again in the backward (with gradient checkpointing too), its gradients reduce-scattered once, over the
  W / N replicas, in the mixed precision's bytes like the other units; where W / N does not divide E / N the banks
  stay whole and their fp32 gradients are all-reduced as under DDP. Per MoE layer and micro-batch, four all-to-alls
  of the layer's slots (B images x E x capacity x D: dispatch and return in the forward, their gradients in the
  backward; two more with gradient checkpointing, which runs the forward of a block again), each sending (N - 1) / N
  of them, in the dtype they have (fp32 tokens in, the LayerNorm's output under CUDA's autocast; the experts' output
  dtype back: bf16 under autocast), the same under DDP and FSDP2.

Returns bytes, not GB.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from ..layers import moe_layers
from .memory import expert_shard_numel, experts_sharded_over_dp, fsdp_shard_numel, fsdp_units

__all__ = ['CommVolume', 'comm_volume', 'expert_parameter_numel', 'STRATEGIES']

STRATEGIES = ('ddp', 'fsdp2', 'ep+ddp', 'ep+fsdp2')
_BYTES = {'no': 4, 'fp32': 4, 'bf16': 2, 'fp16': 2}


@dataclass(frozen=True)
class CommVolume:
    """Bytes one process sends in one optimizer step (one micro-batch)."""
    strategy: str
    num_processes: int
    expert_parallel_size: int
    gradients: int  # DDP all-reduce / FSDP2 reduce-scatter of the non-expert (all, without EP) gradients
    parameters: int  # FSDP2 all-gathers of the non-expert (all, without EP) parameters
    expert_gradients: int  # the expert shards' gradients over their data-parallel replicas: all-reduce (DDP) or
    # reduce-scatter (FSDP2, the banks its units over 'dp')
    tokens: int  # the all-to-alls of every MoE layer
    expert_parameters: int = 0  # FSDP2 + EP: the expert banks' all-gathers over their data-parallel replicas

    @property
    def total(self) -> int:
        return self.gradients + self.parameters + self.expert_gradients + self.tokens + self.expert_parameters


def _expert_names(model: nn.Module) -> List[str]:
    return [f'{name}.experts.{key}' for name, layer in moe_layers(model).items()
            for key, _ in layer.experts.named_parameters()]


def expert_parameter_numel(model: nn.Module) -> int:
    """Parameters of the routed experts of every MoE layer (what expert parallelism spreads over processes)."""
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in _expert_names(model))


def _tokens(model: nn.Module, batch_size: int, num_tokens: int, ep: int, in_bytes: int, out_bytes: int,
            grad_checkpointing: bool) -> int:
    """All-to-all bytes of every MoE layer for one micro-batch of `batch_size` images."""
    total = 0
    for layer in moe_layers(model).values():
        E, D = layer.num_experts, layer.experts.in_features
        slots = batch_size * E * layer.router.capacity(num_tokens) * D  # elements in one direction
        rounds = 2 if grad_checkpointing else 1  # forward passes of the block (checkpointing runs it twice)
        total += slots * (rounds * (in_bytes + out_bytes) + (in_bytes + out_bytes))  # + the backward's two
    return total * (ep - 1) // ep


def comm_volume(model: nn.Module, strategy: str, num_processes: int, batch_size: int,
                expert_parallel_size: int = 1, mixed_precision: str = 'no', grad_checkpointing: bool = False,
                num_tokens: Optional[int] = None) -> CommVolume:
    """Bytes one process sends per optimizer step of `model` (meta is fine) under `strategy` (see the module doc)."""
    if strategy not in STRATEGIES:
        raise ValueError(f'strategy must be one of {STRATEGIES}, got {strategy!r}')
    W, N = num_processes, expert_parallel_size if strategy.startswith('ep') else 1
    if W % N:
        raise ValueError(f'expert_parallel_size={N} does not divide num_processes={W}')
    if num_tokens is None:
        num_tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    params = dict(model.named_parameters())
    experts = set(_expert_names(model)) if N > 1 else set()
    others = [p for n, p in params.items() if n not in experts and p.requires_grad]
    gradients = parameters = 0
    if strategy.endswith('ddp'):
        gradients = 2 * 4 * sum(p.numel() for p in others) * (W - 1) // W
    else:  # FSDP2: per unit, padded shards; the root is gathered once, the blocks twice
        pb = _BYTES[mixed_precision]
        units = fsdp_units(model)
        for unit, members in units.items():
            members = [(n, p) for n, p in members if n not in experts]
            padded = sum(W * fsdp_shard_numel(p.shape, W) for _, p in members)
            gathers = 1 if unit == '' else 2
            parameters += gathers * padded * pb * (W - 1) // W
            gradients += sum(W * fsdp_shard_numel(p.shape, W) for _, p in members if p.requires_grad) * pb * (W - 1) // W
    expert_gradients = expert_parameters = tokens = 0
    if N > 1:
        replicas = W // N
        if strategy == 'ep+fsdp2' and experts_sharded_over_dp(model, W, N):  # each bank a unit over 'dp'
            pb = _BYTES[mixed_precision]
            for layer in moe_layers(model).values():
                bank = list(layer.experts.parameters())
                padded = sum(replicas * expert_shard_numel(p.shape, W, N, True) for p in bank)
                expert_parameters += 2 * padded * pb * (replicas - 1) // replicas
                expert_gradients += sum(replicas * expert_shard_numel(p.shape, W, N, True)
                                        for p in bank if p.requires_grad) * pb * (replicas - 1) // replicas
        else:
            shard = sum(params[n].numel() for n in experts) // N
            expert_gradients = 2 * 4 * shard * (replicas - 1) // replicas
        out_bytes = 2 if mixed_precision in ('bf16', 'fp16') else 4
        tokens = _tokens(model, batch_size, num_tokens, N, 4, out_bytes, grad_checkpointing)
    return CommVolume(strategy, W, N, gradients, parameters, expert_gradients, tokens, expert_parameters)


def volumes(model: nn.Module, num_processes: int, batch_size: int, expert_parallel_size: int,
            mixed_precision: str = 'bf16', grad_checkpointing: bool = False) -> Dict[str, CommVolume]:
    """Every strategy's volume for one launch."""
    return {s: comm_volume(model, s, num_processes, batch_size, expert_parallel_size, mixed_precision,
                           grad_checkpointing) for s in STRATEGIES}
