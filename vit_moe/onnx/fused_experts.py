""" One com.microsoft.QMoE node per MoE layer: `export_onnx(expert_kernel='qmoe')`.

ONNX Runtime's QMoE (onnxruntime >= 1.25: input 14, `router_weights`) computes
`out[t] = sum_e w[t, e] * fc2_e(act(fc1_e(x[t])))` and skips every pair with w <= 1e-8. With k = E and w the
[tokens, E] matrix of a slot router's combine weights (zero outside the picked slots), one node computes a whole
expert-choice or token-choice layer, the experts' weights quantized and packed once:
- 8-bit experts (`quantize='int8'`): symmetric, one scale per expert and output channel;
- 4-bit experts (`quantize='int4-experts'`): symmetric, one scale per block of 32 inputs.
Everything else in the file is int8 as `quantize_onnx` makes it. QMoE's `gelu` is the tanh form: a file made with it
stands for the model with tanh GELU in its experts (`qmoe_reference`), which is what its parity is checked against.

In PyTorch the node is a custom op (`vit_moe::qmoe_experts`, computed from the dequantized weights) whose ONNX
translation emits QMoE; its schema is registered with onnx.defs for onnxscript, which builds nodes from schemas.
Measured on AVX2 (README, benchmarks/ort_expert_kernels.py): 2.7-3.5x the dense int8 model against 1.5-1.6x for the
standard-op graph, so `expert_kernel='matmul'` stays the default.
"""
import contextlib
import copy
import types
from typing import Dict, Iterator, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import moe_layers, soft_moe_layers
from ..layers.experts import ExpertMlps
from ..layers.moe_mlp import combine_matrix

__all__ = ['EXPERT_KERNELS', 'QMOE_EXPERT_BITS', 'qmoe_kernels', 'qmoe_reference', 'qmoe_translations',
           'check_qmoe_layers']

EXPERT_KERNELS = ('matmul', 'qmoe')
QMOE_EXPERT_BITS = {'int8': (8, 0), 'int4-experts': (4, 32)}  # quantize -> (bits, block size; 0: per channel)
_ACTIVATIONS = {nn.GELU: 'gelu', nn.ReLU: 'relu', nn.SiLU: 'silu'}
_QMOE_INPUTS = ('input', 'router_probs', 'fc1_experts_weights', 'fc1_scales', 'fc1_experts_bias',
                'fc2_experts_weights', 'fc2_scales', 'fc2_experts_bias', 'fc3_experts_weights', 'fc3_scales',
                'fc3_experts_bias', 'fc1_zero_points', 'fc2_zero_points', 'fc3_zero_points', 'router_weights')


def check_qmoe_layers(model: nn.Module) -> Dict[str, str]:
    """Layer path -> QMoE activation name; raises ValueError naming a layer QMoE cannot compute."""
    if soft_moe_layers(model):
        raise ValueError(f"{next(iter(soft_moe_layers(model)))} is a Soft MoE layer: its slots mix tokens, QMoE "
                         f"routes tokens; accepted with expert_kernel='qmoe': expert_choice / token_choice layers")
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer: expert_kernel='qmoe' has nothing to fuse")
    acts = {}
    for name, layer in layers.items():
        bank = layer.experts
        act = _ACTIVATIONS.get(type(getattr(bank, 'act', None)))
        if type(bank) is not ExpertMlps or not isinstance(bank.norm, nn.Identity) or act is None:
            raise ValueError(f"{name}: {type(bank).__name__} with {type(getattr(bank, 'act', None)).__name__} and a "
                             f"{type(getattr(bank, 'norm', None)).__name__} hidden norm has no QMoE form; accepted with "
                             f"expert_kernel='qmoe': ExpertMlps (fc1, GELU / ReLU / SiLU, fc2) without a hidden norm")
        acts[name] = act
    return acts


def pack_linear(weight: torch.Tensor, bits: int, block_size: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """StackedLinear weight [E, in, out] -> (uint8 codes [E, out, in * bits / 8] as QMoE reads them, scales [E, out]
    (per channel, block_size 0) or [E, out, in / block_size], the dequantized weight [E, in, out]).

    Symmetric: code = round(w / scale) + 2^(bits - 1), QMoE's default zero point; 4-bit codes two per byte, the even
    input in the low nibble."""
    w = weight.detach().float().transpose(1, 2)  # [E, out, in]
    E, N, K = w.shape
    block = block_size or K
    if K % block:
        raise ValueError(f'{K} inputs of an expert matmul are not a multiple of the 4-bit block size {block}')
    blocks = w.reshape(E, N, K // block, block)  # [E, out, blocks, block]
    qmax, zero = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    scale = blocks.abs().amax(-1) / qmax  # [E, out, blocks]
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = (torch.round(blocks / scale[..., None]).clamp(-zero, qmax) + zero).to(torch.uint8)  # [E, out, blocks, block]
    dequantized = ((codes.float() - zero) * scale[..., None]).reshape(E, N, K).transpose(1, 2)  # [E, in, out]
    codes = codes.reshape(E, N, K)  # [E, out, in]
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [E, out, in / 2]
    return codes.contiguous(), (scale if block_size else scale[..., 0]).contiguous(), dequantized.contiguous()


@torch.library.custom_op('vit_moe::qmoe_experts', mutates_args=())
def qmoe_experts(x: torch.Tensor, router_weights: torch.Tensor, fc1: torch.Tensor, fc1_codes: torch.Tensor,
                 fc1_scales: torch.Tensor, fc1_bias: torch.Tensor, fc2: torch.Tensor, fc2_codes: torch.Tensor,
                 fc2_scales: torch.Tensor, fc2_bias: torch.Tensor, activation: str, bits: int, block_size: int,
                 accuracy_level: int) -> torch.Tensor:
    """What the QMoE node computes ([N, D] tokens, [N, E] weights; fc1 / fc2 the dequantized [E, in, out] weights):
    sum over experts of weight * fc2(act(fc1(x))), GELU in its tanh form (accuracy_level > 0, int8 activations in
    ONNX Runtime, is not modelled). Every expert on every token: a reference for parity and tests, not a fast path."""
    hidden = torch.einsum('nd,edh->enh', x, fc1) + fc1_bias[:, None]  # [E, N, H]
    hidden = F.gelu(hidden, approximate='tanh') if activation == 'gelu' else \
        F.relu(hidden) if activation == 'relu' else F.silu(hidden)
    out = torch.einsum('enh,ehd->end', hidden, fc2) + fc2_bias[:, None]  # [E, N, D]
    return torch.einsum('end,ne->nd', out, router_weights)  # [N, D]


@qmoe_experts.register_fake
def _(x, router_weights, fc1, fc1_codes, fc1_scales, fc1_bias, fc2, fc2_codes, fc2_scales, fc2_bias, activation,
      bits, block_size, accuracy_level):
    return torch.empty_like(x)


def _register_qmoe_schema() -> None:
    """com.microsoft.QMoE's inputs and the attributes used here, in onnx.defs (ONNX Runtime checks the node against
    its own schema when it loads the file)."""
    from onnx import defs
    try:
        defs.get_schema('QMoE', 1, 'com.microsoft')
        return
    except defs.SchemaError:
        pass
    formal, option = defs.OpSchema.FormalParameter, defs.OpSchema.FormalParameterOption
    required = _QMOE_INPUTS[:4] + _QMOE_INPUTS[5:7]
    inputs = [formal(n, 'T1' if n.endswith(('experts_weights', 'zero_points')) else 'T', '',
                     param_option=option.Single if n in required else option.Optional) for n in _QMOE_INPUTS]
    attribute, kind = defs.OpSchema.Attribute, defs.OpSchema.AttrType
    attributes = [attribute(n, kind.STRING if n == 'activation_type' else kind.INT, '', required=False) for n in
                  ('k', 'activation_type', 'expert_weight_bits', 'normalize_routing_weights', 'weights_prepacked',
                   'block_size', 'accuracy_level')]
    defs.register_schema(defs.OpSchema(
        'QMoE', 'com.microsoft', 1, inputs=inputs, outputs=[formal('output', 'T', '')], attributes=attributes,
        type_constraints=[('T', ['tensor(float)', 'tensor(float16)'], ''), ('T1', ['tensor(uint8)'], '')]))


def _qmoe_to_onnx(x, router_weights, fc1, fc1_codes, fc1_scales, fc1_bias, fc2, fc2_codes, fc2_scales, fc2_bias,
                  activation: str, bits: int, block_size: int, accuracy_level: int):
    import onnxscript
    microsoft = onnxscript.values.Opset('com.microsoft', 1)
    blocks = dict(block_size=block_size) if block_size else {}
    if accuracy_level:
        blocks['accuracy_level'] = accuracy_level
    return microsoft.QMoE(x, router_weights, fc1_codes, fc1_scales, fc1_bias, fc2_codes, fc2_scales, fc2_bias,
                          None, None, None, None, None, None, router_weights, k=fc1_codes.shape[0],
                          activation_type=activation, expert_weight_bits=bits, normalize_routing_weights=0,
                          weights_prepacked=0, **blocks)


def qmoe_translations() -> dict:
    """torch.onnx.export's custom_translation_table entry for the QMoE op."""
    _register_qmoe_schema()
    return {torch.ops.vit_moe.qmoe_experts.default: _qmoe_to_onnx}


def _qmoe_routed(self, x: torch.Tensor):
    """MoeMlp.routed with the experts and the combine in one QMoE call (no per-slot expert outputs)."""
    B, T, D = x.shape
    routing = self.router(x)
    E, capacity = routing.token_index.shape[1:]
    combine = combine_matrix(routing.token_index, routing.combine_weights, T, x.dtype)  # [B, T, E*capacity]
    weights = combine.view(B * T, E, capacity).sum(-1)  # [B*T, E]: an expert holds a token in one slot at most
    p = self.qmoe_weights
    out = torch.ops.vit_moe.qmoe_experts(
        x.reshape(B * T, D), weights, p['fc1'], p['fc1_codes'], p['fc1_scales'], p['fc1_bias'], p['fc2'],
        p['fc2_codes'], p['fc2_scales'], p['fc2_bias'], p['activation'], p['bits'], p['block_size'],
        p['accuracy_level'])  # [B*T, D]
    return out.view(B, T, D), routing, None


def _attach(model: nn.Module, bits: int, block_size: int, accuracy_level: int = 0) -> Dict[str, nn.Module]:
    """Every MoE layer of `model` made to run its experts and combine as one QMoE op."""
    acts = check_qmoe_layers(model)
    layers = moe_layers(model)
    for name, layer in layers.items():
        bank = layer.experts
        p = dict(activation=acts[name], bits=bits, block_size=block_size, accuracy_level=accuracy_level)
        for fc in ('fc1', 'fc2'):
            linear = getattr(bank, fc)
            codes, scales, dequantized = pack_linear(linear.weight, bits, block_size)
            bias = linear.bias if linear.bias is not None else torch.zeros(linear.weight.shape[::2])
            p.update({fc: dequantized, f'{fc}_codes': codes, f'{fc}_scales': scales,
                      f'{fc}_bias': bias.detach().float().clone()})
        layer.qmoe_weights = p
        layer.routed = types.MethodType(_qmoe_routed, layer)
    return layers


@contextlib.contextmanager
def qmoe_kernels(model: nn.Module, bits: int, block_size: int, accuracy_level: int = 0) -> Iterator[nn.Module]:
    """While open, every MoE layer of `model` runs its experts and combine as one QMoE op (quantized `bits`-bit
    experts; block_size 0: per output channel; accuracy_level: QMoE's, 0 = float32 activations)."""
    layers = _attach(model, bits, block_size, accuracy_level)
    try:
        yield model
    finally:
        for layer in layers.values():
            for attribute in ('routed', 'qmoe_weights'):
                layer.__dict__.pop(attribute, None)


def qmoe_reference(model: nn.Module, bits: int, block_size: int) -> nn.Module:
    """A copy of `model` that computes what its QMoE file computes (quantized experts, tanh GELU): the model a QMoE
    file's parity is checked against."""
    reference = copy.deepcopy(model)
    _attach(reference, bits, block_size)
    return reference
