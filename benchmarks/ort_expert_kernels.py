"""Issue 35, first measurement: one com.microsoft.QMoE node per MoE layer (8-bit or 4-bit block-wise experts) against
today's portable int8 graph, whole models, side by side with the dense int8 model, and the floor this machine allows.

    python benchmarks/ort_expert_kernels.py [--moe vit_s16_moe_upcycled --dense vit_small_patch16_224]
        [--batch-sizes 1 8] [--rounds 15] [--threads 2] [--output benchmarks/results/ort_expert_kernels.md]

Files (random weights, seed 0; latency does not depend on them), every one timed in the same interleaved rounds:
- dense int8 and MoE int8: `export_onnx(quantize='int8')`, what the project ships (per-expert 2-D int8 MatMuls);
- MoE QMoE: `export_onnx(expert_kernel='qmoe')`'s graph (`vit_moe.onnx.fused_experts`: each MoE layer's experts and
  combine in one QMoE node, k = E, `router_weights` the [tokens, E] combine weights, zero outside the picked slots),
  8-bit experts per output channel (`--quantize int8`) or 4-bit per block of 32 (`--quantize int4-experts`), and two
  variants that are not export options (8-bit blocks; accuracy_level 4, int8 activations); everything else int8. QMoE's GELU is the tanh form (timm's is erf): the parity
  column compares each file with the PyTorch model it stands for (dequantized experts and tanh GELU for QMoE).

The floor: at batch B a file's weights are read from memory once per call, so it cannot run faster than weight bytes /
this machine's read bandwidth (measured here: a 1 GiB sum with the same threads); `measured / floor` says how far
each file is from it. The FLOP ratio is the MoE's expert FLOPs over the dense MLP's plus the rest (per image).
"""
import argparse
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
              '| file | weights (MB) | max abs logit diff / max abs logit: QMoE node (rest float) vs its PyTorch '
              'reference, file vs the float MoE | '
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
