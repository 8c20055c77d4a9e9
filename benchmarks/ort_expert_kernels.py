"""Issue 35, first measurement: one com.microsoft.QMoE node per MoE layer (8-bit or 4-bit block-wise experts) against
today's portable int8 graph, whole models, side by side with the dense int8 model, and the floor this machine allows.

    python benchmarks/ort_expert_kernels.py [--moe vit_s16_moe_upcycled --dense vit_small_patch16_224]
        [--batch-sizes 1 8] [--rounds 15] [--threads 2] [--output benchmarks/results/ort_expert_kernels.md]

Files (random weights, seed 0; latency does not depend on them), every one timed in the same interleaved rounds:
- dense int8 and MoE int8: `export_onnx(quantize='int8')`, what the project ships (per-expert 2-D int8 MatMuls);
- MoE QMoE 8-bit / 4-bit: each MoE layer's experts and combine in one QMoE node (k = E; `router_weights`, input 14,
  is the [tokens, E] matrix of expert choice's combine weights, zero outside the picked slots, so the kernel computes
  exactly the picked slots); experts quantized symmetric per output channel (8-bit) or per block of 32 inputs
  (4-bit); everything else int8 as in the shipped file. QMoE's GELU is the tanh form (timm's is erf): the parity
  column compares each file with the PyTorch model it stands for (dequantized experts and tanh GELU for QMoE).

The floor: at batch B a file's weights are read from memory once per call, so it cannot run faster than weight bytes /
this machine's read bandwidth (measured here: a 1 GiB sum with the same threads); `measured / floor` says how far
each file is from it. The FLOP ratio is the MoE's expert FLOPs over the dense MLP's plus the rest (per image).
The QMoE export here is a prototype (this script's `qmoe_export`), not yet an option of export/onnx_export.py.
"""
import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vit_moe  # noqa: E402,F401  registers the models
from vit_moe.layers.moe_mlp import MoeMlp  # noqa: E402
from vit_moe.onnx import export_onnx, quantize_onnx  # noqa: E402

QMOE_INPUTS = ['input', 'router_probs', 'fc1_experts_weights', 'fc1_scales', 'fc1_experts_bias', 'fc2_experts_weights',
               'fc2_scales', 'fc2_experts_bias', 'fc3_experts_weights', 'fc3_scales', 'fc3_experts_bias',
               'fc1_zero_points', 'fc2_zero_points', 'fc3_zero_points', 'router_weights']


def register_qmoe_schema() -> None:
    """ONNX Runtime's com.microsoft.QMoE (the inputs and attributes used here) in onnx.defs, so that onnxscript, which
    builds nodes from schemas, can emit it. ONNX Runtime checks the node against its own schema when it loads."""
    from onnx import defs
    try:
        defs.get_schema('QMoE', 1, 'com.microsoft')
        return
    except defs.SchemaError:
        pass
    FP, option = defs.OpSchema.FormalParameter, defs.OpSchema.FormalParameterOption
    types = dict(fc1_experts_weights='T1', fc2_experts_weights='T1', fc3_experts_weights='T1', fc1_zero_points='T1',
                 fc2_zero_points='T1', fc3_zero_points='T1')
    required = ('input', 'router_probs', 'fc1_experts_weights', 'fc1_scales', 'fc2_experts_weights', 'fc2_scales')
    inputs = [FP(n, types.get(n, 'T'), '', param_option=option.Single if n in required else option.Optional)
              for n in QMOE_INPUTS]
    A, kind = defs.OpSchema.Attribute, defs.OpSchema.AttrType
    attributes = [A(n, kind.STRING if n == 'activation_type' else kind.INT, '', required=False) for n in
                  ('k', 'activation_type', 'expert_weight_bits', 'normalize_routing_weights', 'weights_prepacked',
                   'block_size', 'accuracy_level')]
    defs.register_schema(defs.OpSchema(
        'QMoE', 'com.microsoft', 1, inputs=inputs, outputs=[FP('output', 'T', '')], attributes=attributes,
        type_constraints=[('T', ['tensor(float)', 'tensor(float16)'], ''), ('T1', ['tensor(uint8)'], '')]))


def pack_linear(weight: torch.Tensor, bits: int, block_size: int):
    """StackedLinear weight [E, in, out] -> (uint8 codes [E, out, in * bits / 8] as QMoE reads them, scales [E, out]
    or [E, out, in / block_size], the dequantized weight [E, in, out]). Symmetric: code = round(w / scale) + 2^(bits-1)
    (QMoE's default zero point); 4-bit codes two per byte, the even input in the low nibble."""
    w = weight.detach().float().transpose(1, 2)  # [E, out, in]
    E, N, K = w.shape
    block = block_size or K
    blocks = w.reshape(E, N, K // block, block)  # [E, out, blocks, block]
    qmax, zero = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
    scale = blocks.abs().amax(-1) / qmax  # [E, out, blocks]
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = (torch.round(blocks / scale[..., None]).clamp(-zero, qmax) + zero).to(torch.uint8)  # [E, out, blocks, block]
    dequantized = ((codes.float() - zero) * scale[..., None]).reshape(E, N, K).transpose(1, 2)  # [E, in, out]
    codes = codes.reshape(E, N, K)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [E, out, in / 2]
    return codes.contiguous(), (scale if block_size else scale[..., 0]).contiguous(), dequantized.contiguous()


@torch.library.custom_op('vit_moe_bench::qmoe', mutates_args=())
def qmoe(x: torch.Tensor, router_weights: torch.Tensor, fc1: torch.Tensor, fc1_codes: torch.Tensor,
         fc1_scales: torch.Tensor, fc1_bias: torch.Tensor, fc2: torch.Tensor, fc2_codes: torch.Tensor,
         fc2_scales: torch.Tensor, fc2_bias: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """What the QMoE node computes, in PyTorch ([N, D] tokens, [N, E] weights; fc1 / fc2 the dequantized weights):
    sum over experts of weight * fc2(gelu_tanh(fc1(x)))."""
    hidden = F.gelu(torch.einsum('nd,edh->enh', x, fc1) + fc1_bias[:, None], approximate='tanh')  # [E, N, H]
    out = torch.einsum('enh,ehd->end', hidden, fc2) + fc2_bias[:, None]  # [E, N, D]
    return torch.einsum('end,ne->nd', out, router_weights)  # [N, D]


@qmoe.register_fake
def _(x, router_weights, fc1, fc1_codes, fc1_scales, fc1_bias, fc2, fc2_codes, fc2_scales, fc2_bias, bits, block_size):
    return torch.empty_like(x)


def qmoe_to_onnx(x, router_weights, fc1, fc1_codes, fc1_scales, fc1_bias, fc2, fc2_codes, fc2_scales, fc2_bias,
                 bits: int, block_size: int):
    import onnxscript
    microsoft = onnxscript.values.Opset('com.microsoft', 1)
    extra = dict(block_size=block_size) if block_size else {}
    num_experts = fc1_codes.shape[0]
    return microsoft.QMoE(x, router_weights, fc1_codes, fc1_scales, fc1_bias, fc2_codes, fc2_scales, fc2_bias,
                          None, None, None, None, None, None, router_weights, k=num_experts, activation_type='gelu',
                          expert_weight_bits=bits, normalize_routing_weights=0, weights_prepacked=0, **extra)


def _fused_routed(self, x: torch.Tensor):
    """MoeMlp.routed with the experts and the combine in one QMoE call."""
    B, T, D = x.shape
    routing = self.router(x)
    E = routing.token_index.shape[1]
    tokens = torch.arange(T, device=x.device).view(1, 1, 1, T)
    picked = routing.token_index.unsqueeze(-1) == tokens  # [B, E, capacity, T]
    weights = (picked.to(x.dtype) * routing.combine_weights.unsqueeze(-1).to(x.dtype)).sum(2)  # [B, E, T]
    weights = weights.transpose(1, 2).reshape(B * T, E)  # [B*T, E]
    p = self.qmoe_weights
    out = torch.ops.vit_moe_bench.qmoe(x.reshape(B * T, D), weights, p['fc1'], p['fc1_codes'], p['fc1_scales'],
                                       p['fc1_bias'], p['fc2'], p['fc2_codes'], p['fc2_scales'], p['fc2_bias'],
                                       p['bits'], p['block_size'])  # [B*T, D]
    return out.view(B, T, D), routing, None


def fused(model: torch.nn.Module, bits: int, block_size: int) -> torch.nn.Module:
    """A copy of `model` whose MoE layers run QMoE's computation (the PyTorch reference of the QMoE file)."""
    model = copy.deepcopy(model)
    for layer in model.modules():
        if isinstance(layer, MoeMlp):
            bank = layer.experts
            p = dict(bits=bits, block_size=block_size or 0)
            for fc in ('fc1', 'fc2'):
                codes, scales, dequantized = pack_linear(getattr(bank, fc).weight, bits, block_size)
                p.update({fc: dequantized, f'{fc}_codes': codes, f'{fc}_scales': scales,
                          f'{fc}_bias': getattr(bank, fc).bias.detach().clone()})
            layer.qmoe_weights = p
            layer.routed = _fused_routed.__get__(layer)
    return model


def qmoe_export(model: torch.nn.Module, path: Path, bits: int, block_size: int) -> torch.nn.Module:
    """Export with one QMoE node per MoE layer, then int8 everything else (`quantize_onnx`); returns the PyTorch
    reference of the file."""
    register_qmoe_schema()
    reference = fused(model, bits, block_size).eval()
    example = torch.randn(2, 3, *model.patch_embed.img_size)
    batch = torch.export.Dim('batch', min=1, max=4096)
    program = torch.onnx.export(reference, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                input_names=['images'], output_names=['logits'], opset_version=18, verbose=False,
                                custom_translation_table={torch.ops.vit_moe_bench.qmoe.default: qmoe_to_onnx})
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    RemoveUnusedNodesPass()(program.model)  # the dequantized copies fed only the PyTorch reference
    float_path = path.with_name(path.stem + '.float.onnx')
    program.save(str(float_path))
    quantize_onnx(float_path, path, 'int8')
    return reference


def read_bandwidth_gb_s(threads: int, gib: float = 1.0, rounds: int = 5) -> float:
    """Best of `rounds` sums over a `gib` GiB float32 tensor with `threads` threads: this machine's read bandwidth."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2 ** 30 / 4))
    best = float('inf')
    for _ in range(rounds):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best / 1e9


def weight_bytes(path: Path) -> int:
    model = onnx.load(str(path))
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer)


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def time_interleaved(sessions: dict, batch: int, size, rounds: int) -> dict:
    x = np.random.default_rng(0).standard_normal((batch, 3, *size)).astype(np.float32)
    times = {name: [] for name in sessions}
    for s in sessions.values():
        s.run(None, {'images': x})
    for _ in range(rounds):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {'images': x})
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--moe', default='vit_s16_moe_upcycled')
    parser.add_argument('--dense', default='vit_small_patch16_224')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--output', default=None, help='also write the tables (markdown) here')
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    moe, dense = timm.create_model(args.moe).eval(), timm.create_model(args.dense).eval()
    size = tuple(moe.patch_embed.img_size)
    x = torch.randn(4, 3, *size)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {'dense int8': export_onnx(dense, tmp / 'dense.onnx', quantize='int8', check=False),
                 'MoE int8 (shipped)': export_onnx(moe, tmp / 'moe.onnx', quantize='int8', check=False)}
        parity = {}
        for bits, block in ((8, 0), (4, 32)):
            name = f'MoE QMoE {bits}-bit' + (f' block {block}' if block else '')
            files[name] = tmp / f'qmoe{bits}.onnx'
            reference = qmoe_export(moe, files[name], bits, block)
            with torch.no_grad():
                want, float_logits = reference(x).numpy(), moe(x).numpy()
            got = session(files[name], args.threads).run(None, {'images': x.numpy()})[0]
            scale = np.abs(float_logits).max()
            parity[name] = (np.abs(got - want).max() / scale, np.abs(got - float_logits).max() / scale)
        with torch.no_grad():
            float_logits = moe(x).numpy()
        shipped = session(files['MoE int8 (shipped)'], args.threads).run(None, {'images': x.numpy()})[0]
        parity['MoE int8 (shipped)'] = (None, np.abs(shipped - float_logits).max() / np.abs(float_logits).max())
        nbytes = {name: weight_bytes(path) for name, path in files.items()}
        sessions = {name: session(path, args.threads) for name, path in files.items()}
        bandwidth = read_bandwidth_gb_s(args.threads)
        ms = {b: time_interleaved(sessions, b, size, args.rounds) for b in args.batch_sizes}
    layer = next(m for m in moe.modules() if isinstance(m, MoeMlp))
    from torch.utils.flop_counter import FlopCounterMode
    flops = {}
    for name, model in (('moe', moe), ('dense', dense)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x[:1])
        flops[name] = counter.get_total_flops()
    lines += [f'{args.moe} (E = {layer.num_experts}, C = {layer.config.capacity_factor:g}) vs {args.dense}, '
              f'{args.threads} threads, median of {args.rounds} interleaved rounds; FLOPs per image MoE / dense '
              f'{flops["moe"] / flops["dense"]:.2f}; read bandwidth {bandwidth:.1f} GB/s (floor: weight bytes / it)', '',
              '| file | weights (MB) | max abs logit diff / max abs logit: vs its PyTorch model, vs the float MoE | '
              + ' | '.join(f'batch {b}: ms, / dense, / floor' for b in args.batch_sizes) + ' |',
              '|---|---|---|' + '---|' * len(args.batch_sizes)]
    for name in files:
        floor_ms = nbytes[name] / bandwidth / 1e6
        own, drift = parity.get(name, (None, None))
        diffs = ', '.join('-' if v is None else f'{v:.1e}' for v in (own, drift))
        cells = ' | '.join(f'{ms[b][name]:.1f}, {ms[b][name] / ms[b]["dense int8"]:.2f}, {ms[b][name] / floor_ms:.1f}'
                           for b in args.batch_sizes)
        lines.append(f'| {name} | {nbytes[name] / 1e6:.0f} | {diffs} | {cells} |')
    text = '\n'.join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
