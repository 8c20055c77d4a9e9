""" Side-by-side inference timing: models x runtimes (PyTorch eager, ONNX Runtime fp32 / int8) x batch sizes.

Same inputs for every configuration; warm-up calls first; then `rounds` rounds that each time one call of
every (model, runtime) in turn, so machine noise hits all alike. Medians, min-max spread, ratios, file sizes.

A pause (`gap_s`, default 50 ms) precedes every timed call: an ONNX Runtime session's worker threads keep spinning
for a while after a run and, on a machine with few cores, take CPU from whatever is timed next (README, "Inference":
the measurement).
"""
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .export import export_onnx
from .metadata import METADATA_KEY
from .runtime import OnnxClassifier

__all__ = ['benchmark_inference', 'format_benchmark', 'time_interleaved']

GAP_S = 0.05  # default pause before each timed call (module docstring)

_logger = logging.getLogger(__name__)


def _file_mb(path: Path) -> float:
    data = path.with_name(path.name + '.data')
    return (os.path.getsize(path) + (os.path.getsize(data) if data.exists() else 0)) / 1e6


def _runners(models: Dict[str, torch.nn.Module], onnx_dir: Path, variants: Sequence[str], pytorch: bool,
             reuse_onnx: bool, threads: int) -> Tuple[Dict[Tuple[str, str], Callable], Dict[str, Any]]:
    """(model, runtime) -> callable, and the ONNX files' sizes and providers."""
    runners, info = {}, dict(file_mb={}, providers=None)
    for name, model in models.items():
        model.eval()
        if pytorch:
            runners[(name, 'pytorch')] = lambda x, m=model: m(torch.from_numpy(x))
        for variant in variants:
            path = onnx_dir / f'{name}.{variant}.onnx'
            if not (reuse_onnx and path.exists() and _same_capacity(path, model)):
                _logger.info(f'exporting {name} ({type(model).__name__}, {variant}) to {path}')
                export_onnx(model, path, check=False, quantize=None if variant == 'fp32' else variant)
            session = OnnxClassifier(path, threads=threads)
            info['providers'] = session.providers
            info['file_mb'][f'{name} {variant}'] = _file_mb(path)
            runners[(name, f'onnxruntime {variant}')] = session
    return runners, info


def _same_capacity(path: Path, model: torch.nn.Module) -> bool:
    """Whether the file at `path` was exported with the capacity factors `model` has now (a reused file must be)."""
    import onnx
    from ..layers import capacity_factors
    props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    recorded = json.loads(props.get(METADATA_KEY, '{}')).get('capacity_factor') or {}
    return recorded == capacity_factors(model)


def _ratios(ms: Dict[Tuple[str, str, int], float], batch_sizes: Sequence[int]) -> list:
    """MoE / dense per runtime, quantized MoE / dense fp32, and ONNX Runtime / PyTorch per model, per batch."""
    runtimes = sorted({r for _, r, _ in ms})
    out = []
    for b in batch_sizes:
        row = dict(batch=b)
        for runtime in runtimes:
            if ('moe', runtime, b) in ms and ('dense', runtime, b) in ms:
                row[f'moe / dense ({runtime})'] = ms[('moe', runtime, b)] / ms[('dense', runtime, b)]
        if ('moe', 'onnxruntime int8', b) in ms and ('dense', 'onnxruntime fp32', b) in ms:
            row['moe int8 / dense fp32 (onnxruntime)'] = ms[('moe', 'onnxruntime int8', b)] / ms[
                ('dense', 'onnxruntime fp32', b)]
        for model in ('moe', 'dense'):
            if (model, 'onnxruntime fp32', b) in ms and (model, 'pytorch', b) in ms:
                row[f'onnxruntime fp32 / pytorch ({model})'] = ms[(model, 'onnxruntime fp32', b)] / ms[
                    (model, 'pytorch', b)]
        out.append(row)
    return out


def time_interleaved(runners: Dict[Any, Callable], x, rounds: int, warmup: int = 2, gap_s: float = GAP_S
                     ) -> Dict[Any, List[float]]:
    """key -> seconds per call of `runners[key](x)`: `warmup` untimed calls each, then `rounds` rounds that time one
    call of every runner in turn, each after a `gap_s` pause (see the module docstring)."""
    for fn in runners.values():
        for _ in range(warmup):
            fn(x)
    times = {key: [] for key in runners}
    for _ in range(rounds):
        for key, fn in runners.items():
            time.sleep(gap_s)
            start = time.perf_counter()
            fn(x)
            times[key].append(time.perf_counter() - start)
    return times


def benchmark_inference(
        models: Dict[str, torch.nn.Module],
        batch_sizes: Sequence[int] = (1, 8, 32),
        rounds: int = 5,
        warmup: int = 2,
        onnx_dir: Optional[str] = None,
        reuse_onnx: bool = False,
        variants: Sequence[str] = ('fp32', 'int8'),
        pytorch: bool = True,
        gap_s: float = GAP_S,
) -> Dict[str, Any]:
    """Time `models` (name -> model; 'moe' and 'dense' get ratio columns) in PyTorch and ONNX Runtime.

    Args:
        variants: ONNX variants to export and time: 'fp32' and / or 'int8' (`export_onnx(quantize='int8')`).
        pytorch: also time the PyTorch eager models.
        gap_s: pause before each timed call (see the module docstring).
    """
    onnx_dir = Path(onnx_dir or tempfile.mkdtemp(prefix='vit_moe_bench_'))
    threads = torch.get_num_threads()
    runners, info = _runners(models, onnx_dir, variants, pytorch, reuse_onnx, threads)
    height, width = next(iter(models.values())).patch_embed.img_size
    rows = []
    with torch.inference_mode():
        for batch in batch_sizes:
            x = torch.randn(batch, 3, height, width).numpy()
            times = time_interleaved(runners, x, rounds, warmup, gap_s)
            for (name, runtime), t in times.items():
                median = statistics.median(t)
                rows.append(dict(model=name, runtime=runtime, batch=batch, median_ms=median * 1e3,
                                 min_ms=min(t) * 1e3, max_ms=max(t) * 1e3, images_per_s=batch / median))
    ms = {(r['model'], r['runtime'], r['batch']): r['median_ms'] for r in rows}
    return dict(threads=threads, rounds=rounds, gap_s=gap_s, providers=info['providers'], rows=rows,
                ratios=_ratios(ms, batch_sizes), file_mb=info['file_mb'],
                params={name: sum(p.numel() for p in m.parameters()) for name, m in models.items()})


def format_benchmark(result: Dict[str, Any], title: str = '') -> str:
    """Markdown tables of a `benchmark_inference` result: latencies, ratios, file sizes."""
    lines = [f'{title}{result["threads"]} threads, median of {result["rounds"]} interleaved rounds (min-max), '
             f'{result["gap_s"] * 1e3:.0f} ms pause before each call, ONNX Runtime providers {result["providers"]}',
             '', '| batch | model | runtime | latency ms (min-max) | images/s |', '|---|---|---|---|---|']
    for r in result['rows']:
        lines.append(f'| {r["batch"]} | {r["model"]} | {r["runtime"]} | {r["median_ms"]:.1f} '
                     f'({r["min_ms"]:.1f}-{r["max_ms"]:.1f}) | {r["images_per_s"]:.1f} |')
    if result['ratios'] and len(result['ratios'][0]) > 1:
        keys = [k for k in result['ratios'][0] if k != 'batch']
        lines += ['', '| batch | ' + ' | '.join(keys) + ' |', '|---' * (len(keys) + 1) + '|']
        for r in result['ratios']:
            lines.append(f'| {r["batch"]} | ' + ' | '.join(f'{r[k]:.2f}' for k in keys) + ' |')
    if result['file_mb']:
        lines += ['', '| ONNX file | MB |', '|---|---|']
        lines += [f'| {name} | {mb:.1f} |' for name, mb in result['file_mb'].items()]
    return '\n'.join(lines)
