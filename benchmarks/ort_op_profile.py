"""Where an ONNX file's time goes in ONNX Runtime: time per operator type (ONNX Runtime's profiler), for a MoE file
beside its dense model, so the MoE's extra time can be put on its ops (expert matmuls, the combine, GELU, ...).

    python benchmarks/ort_op_profile.py [--models vit_s16_moe_upcycled vit_small_patch16_224] [--quantize int8]
        [--batch-size 8] [--runs 4] [--threads 2] [--top 12]

Random weights (seed 0); the files are exported as `export/onnx_export.py` writes them. Kernel time only (no session
overhead), averaged over `--runs` calls after one warm-up.
"""
import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import vit_moe  # noqa: E402,F401  registers the models
from vit_moe.onnx import export_onnx  # noqa: E402


def op_times_ms(path: Path, size, batch: int, runs: int, threads: int, folder: Path) -> collections.Counter:
    """Operator type -> kernel milliseconds per call."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    options.enable_profiling, options.profile_file_prefix = True, str(folder / path.stem)
    session = ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])
    x = np.random.default_rng(0).standard_normal((batch, 3, *size)).astype(np.float32)
    for _ in range(runs + 1):
        session.run(None, {'images': x})
    events = json.load(open(session.end_profiling()))
    warmup = min((e for e in events if e.get('name') == 'model_run'), key=lambda e: e['ts'])
    times = collections.Counter()
    for e in events:  # the kernels of every call after the warm-up
        if e.get('cat') == 'Node' and e['name'].endswith('_kernel_time') and e['ts'] > warmup['ts'] + warmup['dur']:
            times[e['args']['op_name']] += e['dur']
    return collections.Counter({op: us / runs / 1e3 for op, us in times.items()})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs=2, default=['vit_s16_moe_upcycled', 'vit_small_patch16_224'],
                        metavar=('MOE', 'DENSE'))
    parser.add_argument('--quantize', default='int8', choices=['int8', 'none'])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--runs', type=int, default=4)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--top', type=int, default=12)
    args = parser.parse_args(argv)
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in args.models:
            torch.manual_seed(0)
            model = timm.create_model(name).eval()
            path = export_onnx(model, tmp / f'{name}.onnx', check=False,
                               quantize=None if args.quantize == 'none' else args.quantize)
            times[name] = op_times_ms(path, tuple(model.patch_embed.img_size), args.batch_size, args.runs,
                                      args.threads, tmp)
    moe, dense = (times[n] for n in args.models)
    total = {n: sum(t.values()) for n, t in times.items()}
    print(f'{args.models[0]} vs {args.models[1]}, {args.quantize}, batch {args.batch_size}, {args.threads} threads, '
          f'kernel ms per call (mean of {args.runs} profiled calls after a warm-up)\n')
    print(f'| operator | {args.models[0]} ms | {args.models[1]} ms | MoE - dense ms | share of the MoE\'s extra |')
    print('|---|---|---|---|---|')
    extra = total[args.models[0]] - total[args.models[1]]
    for op, ms in sorted(moe.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f'| {op} | {ms:.1f} | {dense.get(op, 0):.1f} | {ms - dense.get(op, 0):+.1f} | '
              f'{(ms - dense.get(op, 0)) / extra:.0%} |')
    print(f'| all | {total[args.models[0]]:.1f} | {total[args.models[1]]:.1f} | {extra:+.1f} | 100% |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
