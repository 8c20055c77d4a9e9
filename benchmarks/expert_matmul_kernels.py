"""How fast ONNX Runtime reads expert weights at batch 1: one expert's matmul (capacity rows) in each kernel.

    python benchmarks/expert_matmul_kernels.py [--rows 13] [--dim 384] [--hidden 1536] [--experts 24] [--threads 2]

A graph of `experts` independent [rows, dim] x [dim, hidden] MatMuls on one input (one MoE layer's fc1 at batch 1:
ViT-S/16 defaults) in float32, dynamic int8 (what `--quantize int8` writes) and weight-only int4 MatMulNBits (block
32 / 128, accuracy_level 0 / 4), timed interleaved in one run. Prints microseconds per matmul, the weight bytes read
per second, that as a fraction of what this machine reads (a torch sum over 1 GiB with the same threads), and the
error relative to float32. At batch 1 an expert-choice MoE is a few hundred such matmuls per image, so the fraction
is the speed left on the table.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer


def read_bandwidth(threads: int, gib: float = 1.0) -> float:
    """Bytes per second a sum over a large float32 tensor reads (best of 5)."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2 ** 30) // 4)
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def expert_graph(rows: int, dim: int, hidden: int, experts: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array((rng.standard_normal((dim, hidden)) * 0.02).astype(np.float32), f'w{i}')
               for i in range(experts)]
    nodes = [helper.make_node('MatMul', ['x', f'w{i}'], [f'y{i}']) for i in range(experts)]
    outputs = [helper.make_tensor_value_info(f'y{i}', TensorProto.FLOAT, None) for i in range(experts)]
    graph = helper.make_graph(nodes, 'experts', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [rows, dim])],
                              outputs, weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)])


def build_variants(model: onnx.ModelProto, folder: Path) -> dict:
    """variant name -> (file, weight bytes per matmul)."""
    dim, hidden = model.graph.initializer[0].dims
    onnx.save(model, folder / 'fp32.onnx')
    quantize_dynamic(folder / 'fp32.onnx', folder / 'int8.onnx', per_channel=True, weight_type=QuantType.QInt8)
    variants = {'float32': (folder / 'fp32.onnx', 4 * dim * hidden), 'int8 (dynamic)': (folder / 'int8.onnx', dim * hidden)}
    for block in (32, 128):
        for level in (0, 4):
            quantizer = MatMulNBitsQuantizer(onnx.load(folder / 'fp32.onnx'), block_size=block, is_symmetric=True,
                                             accuracy_level=level)
            quantizer.process()
            path = folder / f'int4_b{block}_l{level}.onnx'
            quantizer.model.save_model_to_file(str(path))
            variants[f'int4 block {block} accuracy_level {level}'] = (path, dim * hidden // 2)
    return variants


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rows', type=int, default=13, help='tokens per expert (capacity)')
    parser.add_argument('--dim', type=int, default=384)
    parser.add_argument('--hidden', type=int, default=1536)
    parser.add_argument('--experts', type=int, default=24, help='matmuls per graph')
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=30)
    args = parser.parse_args(argv)

    bandwidth = read_bandwidth(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    with tempfile.TemporaryDirectory() as tmp:
        variants = build_variants(expert_graph(args.rows, args.dim, args.hidden, args.experts), Path(tmp))
        sessions = {name: ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
                    for name, (path, _) in variants.items()}
    x = np.random.default_rng(1).standard_normal((args.rows, args.dim)).astype(np.float32)
    reference = sessions['float32'].run(None, {'x': x})
    times = {name: [] for name in sessions}
    for _ in range(3):
        for session in sessions.values():
            session.run(None, {'x': x})
    for _ in range(args.rounds):  # interleaved: machine noise hits every kernel alike
        for name, session in sessions.items():
            time.sleep(0.01)  # let ONNX Runtime's spinning threads settle
            times[name].append(_timed(lambda: session.run(None, {'x': x})))
    print(f'{args.experts} matmuls [{args.rows}, {args.dim}] x [{args.dim}, {args.hidden}], {args.threads} threads, '
          f'median of {args.rounds} interleaved rounds; machine read bandwidth {bandwidth / 1e9:.1f} GB/s\n')
    print('| kernel | us per matmul | weight GB/s | of machine bandwidth | max error / max |y| |')
    print('|---|---|---|---|---|')
    for name, session in sessions.items():
        per_matmul = statistics.median(times[name]) / args.experts
        out = session.run(None, {'x': x})
        error = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(out, reference))
        rate = variants[name][1] / per_matmul
        print(f'| {name} | {per_matmul * 1e6:.0f} | {rate / 1e9:.1f} | {rate / bandwidth:.0%} | {error:.1e} |')


if __name__ == '__main__':
    main()
