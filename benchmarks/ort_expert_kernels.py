"""Issue 35: one com.microsoft.QMoE node per MoE layer (8-bit or 4-bit block-wise experts) against today's portable
int8 graph, whole models, side by side with the dense int8 model, and the floors this machine allows.

    python benchmarks/ort_expert_kernels.py [--moe vit_s16_moe_upcycled --router expert_choice|token_choice
        --dense vit_small_patch16_224] [--batch-sizes 1 8] [--rounds 15] [--threads 2]
        [--gap-s 0.05] [--output benchmarks/results/ort_expert_kernels.md]

Files (random weights, seed 0; latency does not depend on them), every one timed in the same interleaved rounds
(`vit_moe.onnx.benchmark.time_interleaved`: a 50 ms pause before each call, since ONNX Runtime's worker threads
spin after a run and, back to back on 2 cores, take CPU from the file timed next, compressing every ratio):
- dense int8 and MoE int8: `export_onnx(quantize='int8')`, what the project ships (per-expert 2-D int8 MatMuls);
- MoE QMoE: `export_onnx(expert_kernel='qmoe')`'s graph (`vit_moe.onnx.fused_experts`: each MoE layer's experts and
  combine in one QMoE node, k = E, `router_weights` the [tokens, E] combine weights, zero outside the picked slots),
  8-bit experts per output channel (`--quantize int8`) or 4-bit per block of 32 (`--quantize int4-experts`), and two
  variants that are not export options (8-bit blocks; accuracy_level 4, int8 activations); everything else int8.
  QMoE's GELU is the tanh form (timm's is erf): the parity column compares each file with the PyTorch model it stands
  for (dequantized experts and tanh GELU for QMoE).

The floors, per call of batch B: bandwidth = the file's weight bytes / this machine's read bandwidth (a 1 GiB sum with
the same threads; weights are read at least once per call); compute = the model's multiply-adds (PyTorch's FLOP
counter, the slots the router fills) x B / this machine's int8 GEMM rate in ONNX Runtime (one large MatMul quantized as
the files are: a lower bound, since attention and softmax run in float32). `/ dense` is the median of the per-round
ratios; `/ floor` is the median time over the larger floor.
The rates at a dense fc1 and at one expert's fc1 show what small matmuls cost on this CPU.
"""
import argparse
import logging
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vit_moe  # noqa: E402,F401  registers the models
from vit_moe.layers.moe_mlp import MoeMlp  # noqa: E402
from vit_moe.onnx import DEFAULT_EXTERNAL_DATA_THRESHOLD, export_onnx, quantize_onnx  # noqa: E402
from vit_moe.onnx.export import _export  # noqa: E402
from vit_moe.onnx.benchmark import GAP_S, time_interleaved  # noqa: E402
from vit_moe.onnx.fused_experts import qmoe_reference  # noqa: E402

def qmoe_files(model: torch.nn.Module, folder: Path, bits: int, block_size: int, accuracy_level: int):
    """(the QMoE file as export_onnx(expert_kernel='qmoe') writes it: everything but the QMoE nodes int8, the same
    graph with the rest float32, its PyTorch reference); accuracy_level > 0 and 8-bit blocks are not export options,
    tried here only."""
    stem = f'qmoe{bits}_{block_size}_{accuracy_level}'
    float_file, path = folder / f'{stem}.float.onnx', folder / f'{stem}.onnx'
    size = tuple(model.patch_embed.img_size)
    _export(model, float_file, size, 18, False, None, DEFAULT_EXTERNAL_DATA_THRESHOLD, False,
            qmoe=(bits, block_size, accuracy_level))
    quantize_onnx(float_file, path, 'int8')
    return path, float_file, qmoe_reference(model, bits, block_size)


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


def int8_gemm_gmac_s(threads: int, m: int, k: int, n: int, folder: Path, rounds: int = 9) -> float:
    """This machine's int8 GEMM rate in ONNX Runtime (GMAC/s, median of `rounds`): one float [m, k] x [k, n] MatMul
    quantized as the project's files are (dynamic int8 activations, per-channel int8 weights, this CPU's range)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from vit_moe.onnx.int8_target import resolve_int8_target
    weight = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), 'w')
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node('MatMul', ['x', 'w'], ['y'])], 'gemm',
        [onnx.helper.make_tensor_value_info('x', onnx.TensorProto.FLOAT, [m, k])],
        [onnx.helper.make_tensor_value_info('y', onnx.TensorProto.FLOAT, [m, n])], [weight])
    src, dst = folder / f'gemm_{m}_{k}_{n}.float.onnx', folder / f'gemm_{m}_{k}_{n}.onnx'
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid('', 18)]), str(src))
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's generic pre-processing advice
    quantize_dynamic(str(src), str(dst), per_channel=True, reduce_range=resolve_int8_target()['reduce_range'],
                     weight_type=QuantType.QInt8)
    s, x = session(dst, threads), np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    repeat = max(1, int(2e8 // (m * k * n)))  # small GEMMs: time a run of calls
    s.run(None, {'x': x})
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeat):
            s.run(None, {'x': x})
        times.append((time.perf_counter() - start) / repeat)
    return m * k * n / statistics.median(times) / 1e9


def weight_bytes(path: Path) -> int:
    model = onnx.load(str(path))
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer)


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def medians(times: dict, baseline: str) -> dict:
    """name -> (median ms, median of the per-round ratios to `baseline`: a slow moment of the machine hits both)."""
    return {name: (statistics.median(t) * 1e3, statistics.median(a / b for a, b in zip(t, times[baseline])))
            for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--moe', default='vit_s16_moe_upcycled')
    parser.add_argument('--router', default='expert_choice', choices=('expert_choice', 'token_choice'))
    parser.add_argument('--dense', default='vit_small_patch16_224')
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 8])
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--gap-s', type=float, default=GAP_S, help='pause before each timed call (0: back to back)')
    parser.add_argument('--output', default=None, help='also write the tables (markdown) here')
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    moe, dense = timm.create_model(args.moe, router=args.router).eval(), timm.create_model(args.dense).eval()
    size = tuple(moe.patch_embed.img_size)
    x = torch.randn(4, 3, *size)
    layer = next(m for m in moe.modules() if isinstance(m, MoeMlp))
    tokens = moe.patch_embed.num_patches + moe.num_prefix_tokens
    with torch.no_grad():
        capacity = layer.router(torch.randn(1, tokens, moe.embed_dim)).token_index.shape[-1]  # slots per expert
    hidden = layer.experts.fc1.weight.shape[-1] if hasattr(layer.experts, 'fc1') else 4 * moe.embed_dim
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {'dense int8': export_onnx(dense, tmp / 'dense.onnx', quantize='int8', check=False),
                 'MoE int8 (shipped)': export_onnx(moe, tmp / 'moe.onnx', quantize='int8', check=False)}
        parity = {}
        for bits, block, level in ((8, 0, 0), (4, 32, 0), (8, 32, 0), (4, 32, 4)):
            name = f'MoE QMoE {bits}-bit' + (f' block {block}' if block else '') + f', accuracy_level {level}'
            files[name], float_file, reference = qmoe_files(moe, tmp, bits, block, level)
            with torch.no_grad():
                want, float_logits = reference(x).numpy(), moe(x).numpy()
            exact = session(float_file, args.threads).run(None, {'images': x.numpy()})[0]  # QMoE, the rest float
            got = session(files[name], args.threads).run(None, {'images': x.numpy()})[0]
            scale = np.abs(float_logits).max()
            parity[name] = (np.abs(exact - want).max() / scale, np.abs(got - float_logits).max() / scale)
        with torch.no_grad():
            float_logits = moe(x).numpy()
        shipped = session(files['MoE int8 (shipped)'], args.threads).run(None, {'images': x.numpy()})[0]
        parity['MoE int8 (shipped)'] = (None, np.abs(shipped - float_logits).max() / np.abs(float_logits).max())
        nbytes = {name: weight_bytes(path) for name, path in files.items()}
        sessions = {name: session(path, args.threads) for name, path in files.items()}
        bandwidth = read_bandwidth_gb_s(args.threads)
        big = (2048, 1536, 1536)
        rates = {'large': int8_gemm_gmac_s(args.threads, *big, tmp),
                 'dense fc1': int8_gemm_gmac_s(args.threads, tokens, moe.embed_dim, hidden, tmp),
                 'expert fc1': int8_gemm_gmac_s(args.threads, capacity, moe.embed_dim, hidden, tmp)}
        runners = {name: (lambda x, s=s: s.run(None, {'images': x})) for name, s in sessions.items()}
        inputs = {b: np.random.default_rng(0).standard_normal((b, 3, *size)).astype(np.float32)
                  for b in args.batch_sizes}
        ms = {b: medians(time_interleaved(runners, inputs[b], args.rounds, warmup=1, gap_s=args.gap_s), 'dense int8')
              for b in args.batch_sizes}
    from torch.utils.flop_counter import FlopCounterMode
    macs = {}
    for name, model in (('moe', moe), ('dense', dense)):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x[:1])
        macs[name] = counter.get_total_flops() / 2
    lines += [f'{args.moe} ({args.router}, E = {layer.num_experts}, C = {layer.config.capacity_factor:g}, '
              f'{capacity} slots per expert of {tokens} tokens) vs {args.dense}, {args.threads} threads, median of '
              f'{args.rounds} interleaved rounds, {args.gap_s * 1e3:.0f} ms pause before each call; MACs per image '
              f'MoE / dense {macs["moe"] / 1e9:.2f} G / '
              f'{macs["dense"] / 1e9:.2f} G = {macs["moe"] / macs["dense"]:.2f}.', '',
              f'This machine: read bandwidth {bandwidth:.1f} GB/s; int8 GEMM rate in ONNX Runtime (the files\' '
              f'quantization) {rates["large"]:.0f} GMAC/s at {big[0]} x {big[1]} x {big[2]}, '
              f'{rates["dense fc1"]:.0f} at a dense fc1 ({tokens} x {moe.embed_dim} x {hidden}), '
              f'{rates["expert fc1"]:.0f} at an expert fc1 ({capacity} x {moe.embed_dim} x {hidden}).', '',
              'Floors per call: bandwidth = weight bytes / read bandwidth (weights read once per call); compute = '
              'MACs x batch / the large int8 GEMM rate (all MACs at int8 speed: a lower bound). '
              '`/ dense`: median of the per-round ratios to the dense file; `/ floor`: median time over the larger '
              'floor.', '',
              '| file | weights (MB) | max abs logit diff / max abs logit: QMoE node (rest float) vs its PyTorch '
              'reference, file vs the float MoE | '
              + ' | '.join(f'batch {b}: ms, / dense, bandwidth floor ms, compute floor ms, / floor'
                           for b in args.batch_sizes) + ' |',
              '|---|---|---|' + '---|' * len(args.batch_sizes)]
    for name in files:
        own, drift = parity.get(name, (None, None))
        diffs = ', '.join('-' if v is None else f'{v:.1e}' for v in (own, drift))
        cells = []
        for b in args.batch_sizes:
            bandwidth_ms = nbytes[name] / bandwidth / 1e6
            compute_ms = macs['dense' if name == 'dense int8' else 'moe'] * b / rates['large'] / 1e6
            median_ms, ratio = ms[b][name]
            cells.append(f'{median_ms:.1f}, {ratio:.2f}, {bandwidth_ms:.1f}, {compute_ms:.1f}, '
                         f'{median_ms / max(bandwidth_ms, compute_ms):.2f}')
        lines.append(f'| {name} | {nbytes[name] / 1e6:.0f} | {diffs} | {" | ".join(cells)} |')
    text = '\n'.join(lines)
    print(text)
    if args.output:
        Path(args.output).write_text(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
