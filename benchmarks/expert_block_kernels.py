"""One MoE layer's int8 experts in ONNX Runtime, built five ways, timed interleaved (where the batch-1 time goes).

    python benchmarks/expert_block_kernels.py [--experts 32] [--rows 13] [--dim 384] [--hidden 1536] [--threads 2]

The block is fc1 -> GELU -> fc2 of E experts on their gathered slots [E, rows, dim] (rows = images x capacity: ViT-S/16
at batch 1 by default), int8 weights per output channel, activations quantized dynamically:

* per expert: what `--quantize int8` writes today (onnxruntime's quantize_dynamic of the per-expert MatMuls):
  each expert quantizes its own slots, runs its two int8 matmuls and its own GELU (about 12 nodes per expert);
* per expert, one GELU: today's per-expert matmuls, one GELU node over every expert's hidden units;
* per layer, per-expert matmuls: the slots quantized once per layer and per matmul, E 2-D MatMulInteger (ONNX Runtime
  pre-packs 2-D weights), one dequantization, bias and GELU over every expert at once;
* per layer, fused: the same with com.microsoft MatMulIntegerToFloat (dequantization and bias inside the matmul);
* batched: one MatMulInteger over [E, rows, dim] x [E, dim, hidden] per matmul (3-D weights: not pre-packed).

Prints the median time of each (and / the per-expert one) and its largest error relative to float32.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid('', 18), helper.make_opsetid('com.microsoft', 1)]


def _weights(experts, dim, hidden, seed=0):
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((experts, dim, hidden)) * dim ** -0.5).astype(np.float32)
    w2 = (rng.standard_normal((experts, hidden, dim)) * hidden ** -0.5).astype(np.float32)
    b1 = (rng.standard_normal((experts, hidden)) * 0.02).astype(np.float32)
    b2 = (rng.standard_normal((experts, dim)) * 0.02).astype(np.float32)
    return w1, b1, w2, b2


def _quantize_columns(w):
    """int8 per output column (symmetric): (int8 [.., in, out], scale [.., 1, out])."""
    scale = np.abs(w).max(axis=-2, keepdims=True) / 127.0
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def _model(nodes, inits, out_name='y'):
    graph = helper.make_graph(nodes, 'block', [helper.make_tensor_value_info('x', TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=OPSET)


def float_block(w1, b1, w2, b2):
    nodes = [helper.make_node('MatMul', ['x', 'w1'], ['h']), helper.make_node('Add', ['h', 'b1'], ['hb']),
             helper.make_node('Gelu', ['hb'], ['g'], domain='com.microsoft'),
             helper.make_node('MatMul', ['g', 'w2'], ['o']), helper.make_node('Add', ['o', 'b2'], ['y'])]
    return _model(nodes, dict(w1=w1, b1=b1[:, None], w2=w2, b2=b2[:, None]))


def _dynamic_int8_linear(src: str, pre: str, dst: str) -> list:
    """src -> DynamicQuantizeLinear -> MatMulInteger(q{pre}) -> Cast -> Mul(scales) -> Add(b{pre}) -> dst."""
    return [helper.make_node('DynamicQuantizeLinear', [src], [f'a{pre}', f'as{pre}', f'az{pre}']),
            helper.make_node('MatMulInteger', [f'a{pre}', f'q{pre}', f'az{pre}'], [f'i{pre}']),
            helper.make_node('Cast', [f'i{pre}'], [f'f{pre}'], to=TensorProto.FLOAT),
            helper.make_node('Mul', [f'as{pre}', f's{pre}'], [f'sc{pre}']),
            helper.make_node('Mul', [f'f{pre}', f'sc{pre}'], [f'm{pre}']),
            helper.make_node('Add', [f'm{pre}', f'b{pre}'], [dst])]


def per_expert_block(w1, b1, w2, b2, one_gelu: bool = False):
    """Split, then per expert: DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> Add (x2, GELU between);
    `one_gelu`: one GELU node over every expert's hidden units (Concat -> Gelu -> Split) instead of one per expert."""
    E = w1.shape[0]
    q1, s1 = _quantize_columns(w1)
    q2, s2 = _quantize_columns(w2)
    inits, nodes = {}, [helper.make_node('Split', ['x'], [f'x{e}' for e in range(E)], axis=0, num_outputs=E)]
    for e in range(E):
        inits.update({f'q1_{e}': q1[e], f's1_{e}': s1[e, 0], f'b1_{e}': b1[e], f'q2_{e}': q2[e], f's2_{e}': s2[e, 0],
                      f'b2_{e}': b2[e]})
    fc1 = [_dynamic_int8_linear(f'x{e}', f'1_{e}', f'h{e}') for e in range(E)]
    fc2 = [_dynamic_int8_linear(f'g{e}', f'2_{e}', f'y{e}') for e in range(E)]
    if one_gelu:
        nodes += [n for expert in fc1 for n in expert]
        nodes += [helper.make_node('Concat', [f'h{e}' for e in range(E)], ['h'], axis=0),
                  helper.make_node('Gelu', ['h'], ['g'], domain='com.microsoft'),
                  helper.make_node('Split', ['g'], [f'g{e}' for e in range(E)], axis=0, num_outputs=E)]
        nodes += [n for expert in fc2 for n in expert]
    else:
        for e in range(E):
            nodes += fc1[e] + [helper.make_node('Gelu', [f'h{e}'], [f'g{e}'], domain='com.microsoft')] + fc2[e]
    nodes.append(helper.make_node('Concat', [f'y{e}' for e in range(E)], ['y'], axis=0))
    return _model(nodes, inits)


def per_layer_block(w1, b1, w2, b2, fused: bool):
    """The slots quantized once per layer and matmul; E 2-D int8 matmuls; one dequantization, bias and GELU."""
    E = w1.shape[0]
    q1, s1 = _quantize_columns(w1)
    q2, s2 = _quantize_columns(w2)
    inits = dict(s1=s1, b1=b1[:, None], s2=s2, b2=b2[:, None])
    nodes = []
    for i, (src, dst) in enumerate((('x', 'h'), ('g', 'y')), start=1):
        q, s, b = (q1, s1, b1) if i == 1 else (q2, s2, b2)
        nodes += [helper.make_node('DynamicQuantizeLinear', [src], [f'a{i}', f'as{i}', f'az{i}']),
                  helper.make_node('Split', [f'a{i}'], [f'a{i}_{e}' for e in range(E)], axis=0, num_outputs=E)]
        for e in range(E):
            inits[f'q{i}_{e}'] = q[e]
            if fused:
                inits[f's{i}_{e}'], inits[f'b{i}_{e}'] = s[e, 0], b[e]
                nodes.append(helper.make_node('MatMulIntegerToFloat', [f'a{i}_{e}', f'q{i}_{e}', f'as{i}', f's{i}_{e}',
                                                                      f'az{i}', '', f'b{i}_{e}'], [f'o{i}_{e}'],
                                              domain='com.microsoft'))
            else:
                nodes.append(helper.make_node('MatMulInteger', [f'a{i}_{e}', f'q{i}_{e}', f'az{i}'], [f'o{i}_{e}']))
        out = dst if i == 2 else 'h'
        if fused:
            nodes.append(helper.make_node('Concat', [f'o{i}_{e}' for e in range(E)], [out], axis=0))
        else:
            nodes += [helper.make_node('Concat', [f'o{i}_{e}' for e in range(E)], [f'c{i}'], axis=0),
                      helper.make_node('Cast', [f'c{i}'], [f'f{i}'], to=TensorProto.FLOAT),
                      helper.make_node('Mul', [f'as{i}', f's{i}'], [f'sc{i}']),
                      helper.make_node('Mul', [f'f{i}', f'sc{i}'], [f'm{i}']),
                      helper.make_node('Add', [f'm{i}', f'b{i}'], [out])]
        if i == 1:
            nodes.append(helper.make_node('Gelu', ['h'], ['g'], domain='com.microsoft'))
    return _model(nodes, inits)


def batched_block(w1, b1, w2, b2):
    q1, s1 = _quantize_columns(w1)
    q2, s2 = _quantize_columns(w2)
    nodes = []
    for i, (src, dst) in enumerate((('x', 'h'), ('g', 'y')), start=1):
        nodes += [helper.make_node('DynamicQuantizeLinear', [src], [f'a{i}', f'as{i}', f'az{i}']),
                  helper.make_node('MatMulInteger', [f'a{i}', f'q{i}', f'az{i}'], [f'o{i}']),
                  helper.make_node('Cast', [f'o{i}'], [f'f{i}'], to=TensorProto.FLOAT),
                  helper.make_node('Mul', [f'as{i}', f's{i}'], [f'sc{i}']),
                  helper.make_node('Mul', [f'f{i}', f'sc{i}'], [f'm{i}']),
                  helper.make_node('Add', [f'm{i}', f'b{i}'], [dst])]
        if i == 1:
            nodes.append(helper.make_node('Gelu', ['h'], ['g'], domain='com.microsoft'))
    return _model(nodes, dict(q1=q1, s1=s1, b1=b1[:, None], q2=q2, s2=s2, b2=b2[:, None]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--experts', type=int, default=32)
    parser.add_argument('--rows', type=int, default=13, help='slots per expert: images x capacity')
    parser.add_argument('--dim', type=int, default=384)
    parser.add_argument('--hidden', type=int, default=1536)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=30)
    args = parser.parse_args(argv)
    weights = _weights(args.experts, args.dim, args.hidden)
    builds = {'float32': float_block(*weights), 'int8, per expert (today)': per_expert_block(*weights),
              'int8, per expert, one GELU per layer': per_expert_block(*weights, one_gelu=True),
              'int8, per layer, per-expert matmuls': per_layer_block(*weights, fused=False),
              'int8, per layer, MatMulIntegerToFloat': per_layer_block(*weights, fused=True),
              'int8, batched 3-D matmul': batched_block(*weights)}
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in builds.items():
            path = Path(tmp) / f'{len(sessions)}.onnx'
            onnx.save(model, path)
            sessions[name] = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    x = np.random.default_rng(1).standard_normal((args.experts, args.rows, args.dim)).astype(np.float32)
    reference = sessions['float32'].run(None, {'x': x})[0]
    for session in sessions.values():
        for _ in range(3):
            session.run(None, {'x': x})
    times = {name: [] for name in sessions}
    for _ in range(args.rounds):
        for name, session in sessions.items():
            time.sleep(0.01)
            start = time.perf_counter()
            session.run(None, {'x': x})
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times['int8, per expert (today)'])
    print(f'{args.experts} experts, [{args.rows}, {args.dim}] -> {args.hidden} -> {args.dim}, {args.threads} threads, '
          f'median of {args.rounds} interleaved rounds\n')
    print('| build | nodes | ms | / per expert | max error / max |y| |')
    print('|---|---:|---:|---:|---:|')
    for name, session in sessions.items():
        y = session.run(None, {'x': x})[0]
        error = float(np.abs(y - reference).max() / np.abs(reference).max())
        median = statistics.median(times[name])
        print(f'| {name} | {len(builds[name].graph.node)} | {median * 1e3:.2f} | {median / base:.2f} | {error:.1e} |')


if __name__ == '__main__':
    main()
