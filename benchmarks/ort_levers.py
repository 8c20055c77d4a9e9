"""Levers for the int8 MoE's batch-1 latency in ONNX Runtime, each timed side by side with what the export does today.

    python benchmarks/ort_levers.py session --dense D.int8.onnx --moe M.int8.onnx [--batch 1] [--rounds 9]
    python benchmarks/ort_levers.py qmoe [--rows 13]      # ONNX Runtime's QMoE operator vs today's per-expert block
    python benchmarks/ort_levers.py combine [--batch 8]   # ScatterElements-add vs today's combine-matrix matmul
    python benchmarks/ort_levers.py operands [--rows 13]  # expert matmuls with the weights as the left operand

`session`: the whole exported files (e.g. from `export/onnx_benchmark.py --onnx-dir DIR --variants int8`) under
session options: ORT_PARALLEL execution (2 inter-op threads, 1 or 2 intra-op), no spinning, dynamic_block_base 4,
ORT_ENABLE_EXTENDED instead of ALL; MoE / dense for each, and / the default dense. The others: one MoE layer's
pieces at ViT-S/16 shapes (32 experts, 13 slots each at batch 1, 384 -> 1536 -> 384), 2 threads, interleaved rounds.
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
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from expert_block_kernels import _model, _weights, float_block, per_expert_block  # noqa: E402

SESSION_VARIANTS = ('default', 'parallel, 1 intra-op thread', 'parallel, 2 intra-op threads', 'no spinning',
                    'dynamic_block_base 4', 'ORT_ENABLE_EXTENDED')


def _options(variant: str, threads: int = 2) -> ort.SessionOptions:
    o = ort.SessionOptions()
    o.log_severity_level, o.intra_op_num_threads = 3, threads
    if variant.startswith('parallel'):
        o.execution_mode, o.inter_op_num_threads = ort.ExecutionMode.ORT_PARALLEL, 2
        o.intra_op_num_threads = 1 if '1 intra' in variant else threads
    elif variant == 'no spinning':
        o.add_session_config_entry('session.intra_op.allow_spinning', '0')
    elif variant == 'dynamic_block_base 4':
        o.add_session_config_entry('session.dynamic_block_base', '4')
    elif variant == 'ORT_ENABLE_EXTENDED':
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return o


def _time(sessions: dict, feeds: dict, rounds: int, gap_s: float = 0.05) -> dict:
    """Median seconds per session over interleaved rounds (a pause before each call lets spinning threads settle)."""
    for name, s in sessions.items():
        for _ in range(2):
            s.run(None, feeds[name])
    times = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            time.sleep(gap_s)
            start = time.perf_counter()
            s.run(None, feeds[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _sessions(models: dict, threads: int = 2) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            path = Path(tmp) / f'{len(out)}.onnx'
            onnx.save(model, str(path))
            out[name] = ort.InferenceSession(str(path), _options('default', threads),
                                             providers=['CPUExecutionProvider'])
    return out


def session_levers(args) -> None:
    x = np.random.default_rng(0).standard_normal((args.batch, 3, 224, 224)).astype(np.float32)
    sessions, feeds = {}, {}
    for variant in SESSION_VARIANTS:
        for model, path in (('dense', args.dense), ('moe', args.moe)):
            s = ort.InferenceSession(path, _options(variant), providers=['CPUExecutionProvider'])
            sessions[model, variant], feeds[model, variant] = s, {s.get_inputs()[0].name: x}
    ms = {k: v * 1e3 for k, v in _time(sessions, feeds, args.rounds).items()}
    print(f'batch {args.batch}, median of {args.rounds} interleaved rounds\n')
    print('| session options | dense ms | MoE ms | MoE / dense | MoE / default dense |\n|---|---:|---:|---:|---:|')
    for v in SESSION_VARIANTS:
        print(f'| {v} | {ms["dense", v]:.1f} | {ms["moe", v]:.1f} | {ms["moe", v] / ms["dense", v]:.2f} | '
              f'{ms["moe", v] / ms["dense", "default"]:.2f} |')


def _one_hot_router(E: int, R: int) -> np.ndarray:
    probs = np.zeros((E * R, E), np.float32)
    probs[np.arange(E * R), np.arange(E * R) // R] = 1  # slot row -> its expert: top-1 reproduces expert choice
    return probs


def qmoe_block(w1, b1, w2, b2, rows: int, accuracy_level: int):
    """The slots as rows of com.microsoft QMoE (8-bit weights per column, k = 1 on a one-hot router)."""
    E, D, _ = w1.shape

    def quantize(w):  # [E, K, N] -> uint8 [E, N, K] (zero point 128), scale [E, N]
        scale = np.abs(w).max(axis=1) / 127.0
        q = np.clip(np.round(w / scale[:, None, :]), -127, 127).astype(np.int32) + 128
        return np.ascontiguousarray(q.transpose(0, 2, 1)).astype(np.uint8), scale.astype(np.float32)

    (q1, s1), (q2, s2) = quantize(w1), quantize(w2)
    inits = dict(shape=np.array([E * rows, D], np.int64), out_shape=np.array([E, rows, D], np.int64),
                 probs=_one_hot_router(E, rows), q1=q1, s1=s1, b1=b1, q2=q2, s2=s2, b2=b2)
    nodes = [helper.make_node('Reshape', ['x', 'shape'], ['rows']),
             helper.make_node('QMoE', ['rows', 'probs', 'q1', 's1', 'b1', 'q2', 's2', 'b2'], ['out'],
                              domain='com.microsoft', k=1, activation_type='gelu', expert_weight_bits=8,
                              normalize_routing_weights=0, accuracy_level=accuracy_level),
             helper.make_node('Reshape', ['out', 'out_shape'], ['y'])]
    return _model(nodes, inits)


def qmoe_lever(args) -> None:
    weights = _weights(32, 384, 1536)
    models = {'float32': float_block(*weights), 'int8, per expert (today)': per_expert_block(*weights),
              'QMoE 8-bit, accuracy_level 0': qmoe_block(*weights, args.rows, 0),
              'QMoE 8-bit, accuracy_level 4': qmoe_block(*weights, args.rows, 4)}
    sessions = _sessions(models)
    x = np.random.default_rng(1).standard_normal((32, args.rows, 384)).astype(np.float32)
    feeds = {name: {'x': x} for name in sessions}
    ms = _time(sessions, feeds, args.rounds, gap_s=0.01)
    reference = sessions['float32'].run(None, {'x': x})[0]
    print('| build | ms | / today | max error / max |y| |\n|---|---:|---:|---:|')
    for name, s in sessions.items():
        error = np.abs(s.run(None, {'x': x})[0] - reference).max() / np.abs(reference).max()
        print(f'| {name} | {ms[name] * 1e3:.2f} | {ms[name] / ms["int8, per expert (today)"]:.2f} | {error:.1e} |')


def combine_lever(args) -> None:
    B, T, E, C, D = args.batch, 197, 32, 13, 384
    rng = np.random.default_rng(0)
    index = np.stack([np.stack([rng.choice(T, C, replace=False) for _ in range(E)]) for _ in range(B)])
    feeds = dict(index=index.astype(np.int64), w=rng.random((B, E, C)).astype(np.float32),
                 o=rng.standard_normal((B, E * C, D)).astype(np.float32))
    reference = np.zeros((B, T, D))
    for b in range(B):
        np.add.at(reference[b], feeds['index'][b].reshape(-1), feeds['o'][b] * feeds['w'][b].reshape(-1, 1))
    consts = [numpy_helper.from_array(v, k) for k, v in dict(
        tokens=np.arange(T, dtype=np.int64).reshape(1, T, 1), row=np.array([B, 1, E * C], np.int64),
        column=np.array([B, E * C, 1], np.int64), full=np.array([B, E * C, D], np.int64),
        zeros=np.zeros((B, T, D), np.float32)).items()]
    inputs = [helper.make_tensor_value_info('index', TensorProto.INT64, None),
              helper.make_tensor_value_info('w', TensorProto.FLOAT, None),
              helper.make_tensor_value_info('o', TensorProto.FLOAT, None)]

    def graph(nodes):
        return helper.make_model(helper.make_graph(nodes, 'combine', inputs, [helper.make_tensor_value_info(
            'y', TensorProto.FLOAT, None)], consts), opset_imports=[helper.make_opsetid('', 18)])

    models = {
        'combine matrix, MatMul (today)': graph([
            helper.make_node('Reshape', ['index', 'row'], ['i']), helper.make_node('Equal', ['i', 'tokens'], ['eq']),
            helper.make_node('Cast', ['eq'], ['c'], to=TensorProto.FLOAT),
            helper.make_node('Reshape', ['w', 'row'], ['wr']), helper.make_node('Mul', ['c', 'wr'], ['m']),
            helper.make_node('MatMul', ['m', 'o'], ['y'])]),
        'ScatterElements, reduction add': graph([
            helper.make_node('Reshape', ['index', 'column'], ['i']), helper.make_node('Expand', ['i', 'full'], ['ie']),
            helper.make_node('Reshape', ['w', 'column'], ['wc']), helper.make_node('Mul', ['o', 'wc'], ['u']),
            helper.make_node('ScatterElements', ['zeros', 'ie', 'u'], ['y'], axis=1, reduction='add')])}
    sessions = _sessions(models)
    ms = _time(sessions, {name: feeds for name in sessions}, args.rounds, gap_s=0.01)
    print(f'combine of {E} experts x {C} slots into {T} tokens, batch {B}\n')
    print('| combine | ms | / today | max error |\n|---|---:|---:|---:|')
    for name, s in sessions.items():
        error = np.abs(s.run(None, feeds)[0] - reference).max()
        print(f'| {name} | {ms[name] * 1e3:.2f} | {ms[name] / ms["combine matrix, MatMul (today)"]:.2f} | '
              f'{error:.1e} |')


def operand_lever(args) -> None:
    E, R, D, H = 32, args.rows, 384, 1536
    weight = np.random.default_rng(0).integers(-127, 128, (E, D, H)).astype(np.int8)

    def graph(swapped: bool):
        nodes = [helper.make_node('Split', ['x'], [f'x{e}' for e in range(E)], axis=0, num_outputs=E)]
        inits = {'axis0': np.array([0], np.int64)}
        for e in range(E):
            nodes.append(helper.make_node('Squeeze', [f'x{e}', 'axis0'], [f's{e}']))
            if swapped:  # [H, D] uint8 weights x [D, R] activations, transposed in and out
                inits[f'w{e}'] = (weight[e].T.astype(np.int32) + 128).astype(np.uint8)
                inits[f'wz{e}'] = np.array(128, np.uint8)
                nodes += [helper.make_node('Transpose', [f's{e}'], [f't{e}'], perm=[1, 0]),
                          helper.make_node('DynamicQuantizeLinear', [f't{e}'], [f'q{e}', f'qs{e}', f'qz{e}']),
                          helper.make_node('MatMulInteger', [f'w{e}', f'q{e}', f'wz{e}', f'qz{e}'], [f'it{e}']),
                          helper.make_node('Transpose', [f'it{e}'], [f'i{e}'], perm=[1, 0])]
            else:  # what quantize_dynamic writes (ONNX Runtime fuses it into DynamicQuantizeMatMul)
                inits[f'w{e}'] = weight[e]
                nodes += [helper.make_node('DynamicQuantizeLinear', [f's{e}'], [f'q{e}', f'qs{e}', f'qz{e}']),
                          helper.make_node('MatMulInteger', [f'q{e}', f'w{e}', f'qz{e}'], [f'i{e}'])]
            nodes += [helper.make_node('Cast', [f'i{e}'], [f'f{e}'], to=TensorProto.FLOAT),
                      helper.make_node('Mul', [f'f{e}', f'qs{e}'], [f'o{e}'])]
        nodes.append(helper.make_node('Concat', [f'o{e}' for e in range(E)], ['y'], axis=0))
        return _model(nodes, inits)

    sessions = _sessions({'activations x weights (today)': graph(False), 'weights x activations': graph(True)})
    x = np.random.default_rng(1).standard_normal((E, R, D)).astype(np.float32)
    ms = _time(sessions, {name: {'x': x} for name in sessions}, args.rounds, gap_s=0.01)
    outs = [s.run(None, {'x': x})[0] for s in sessions.values()]
    print(f'{E} int8 matmuls {R} x {D} x {H}\n\n| operands | ms | / today |\n|---|---:|---:|')
    for name in sessions:
        print(f'| {name} | {ms[name] * 1e3:.2f} | {ms[name] / ms["activations x weights (today)"]:.2f} |')
    print(f'\nlargest difference between the two: {np.abs(outs[0] - outs[1]).max():.1e}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('lever', choices=['session', 'qmoe', 'combine', 'operands'])
    parser.add_argument('--dense', help='session: the dense int8 file')
    parser.add_argument('--moe', help='session: the MoE int8 file')
    parser.add_argument('--batch', type=int, default=None, help='session: 1, combine: 8 (default)')
    parser.add_argument('--rows', type=int, default=13, help='slots per expert (ViT-S/16 at batch 1: 13)')
    parser.add_argument('--rounds', type=int, default=30)
    args = parser.parse_args(argv)
    if args.lever == 'session':
        if not (args.dense and args.moe):
            parser.error('session needs --dense and --moe (int8 files, e.g. from export/onnx_benchmark.py --onnx-dir)')
        args.batch = args.batch or 1
        session_levers(args)
    elif args.lever == 'combine':
        args.batch = args.batch or 8
        combine_lever(args)
    else:
        {'qmoe': qmoe_lever, 'operands': operand_lever}[args.lever](args)


if __name__ == '__main__':
    main()
