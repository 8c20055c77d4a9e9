""" Side-by-side inference timing: models x runtimes (PyTorch eager, ONNX Runtime) x batch sizes.

Same inputs for every configuration; warm-up calls first; then `rounds` rounds that each time one call of
every (model, runtime) in turn, so machine noise hits all alike. Medians, min-max spread and ratios.
"""
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from .export import export_onnx
from .runtime import OnnxClassifier

__all__ = ['benchmark_inference', 'format_benchmark']

_logger = logging.getLogger(__name__)


def benchmark_inference(
        models: Dict[str, torch.nn.Module],
        batch_sizes: Sequence[int] = (1, 8, 32),
        rounds: int = 5,
        warmup: int = 2,
        onnx_dir: Optional[str] = None,
        reuse_onnx: bool = False,
) -> Dict[str, Any]:
    """Time `models` (name -> model; 'moe' and 'dense' get ratio columns) in PyTorch and ONNX Runtime."""
    onnx_dir = Path(onnx_dir or tempfile.mkdtemp(prefix='vit_moe_bench_'))
    threads = torch.get_num_threads()
    runners, providers = {}, None
    for name, model in models.items():
        model.eval()
        path = onnx_dir / f'{name}.onnx'
        if not (reuse_onnx and path.exists()):
            _logger.info(f'exporting {name} ({type(model).__name__}) to {path}')
            export_onnx(model, path, check=False)
        session = OnnxClassifier(path, threads=threads)
        providers = session.providers
        runners[(name, 'pytorch')] = lambda x, m=model: m(x)
        runners[(name, 'onnxruntime')] = lambda x, s=session: s(x)
    height, width = next(iter(models.values())).patch_embed.img_size
    rows = []
    with torch.inference_mode():
        for batch in batch_sizes:
            x = torch.randn(batch, 3, height, width)
            inputs = {'pytorch': x, 'onnxruntime': x.numpy()}
            for (name, runtime), fn in runners.items():
                for _ in range(warmup):
                    fn(inputs[runtime])
            times = {key: [] for key in runners}
            for _ in range(rounds):
                for (name, runtime), fn in runners.items():
                    start = time.perf_counter()
                    fn(inputs[runtime])
                    times[(name, runtime)].append(time.perf_counter() - start)
            for (name, runtime), t in times.items():
                median = statistics.median(t)
                rows.append(dict(model=name, runtime=runtime, batch=batch, median_ms=median * 1e3,
                                 min_ms=min(t) * 1e3, max_ms=max(t) * 1e3, images_per_s=batch / median))
    ms = {(r['model'], r['runtime'], r['batch']): r['median_ms'] for r in rows}
    ratios = []
    if {'moe', 'dense'} <= set(models):
        for b in batch_sizes:
            ratios.append(dict(
                batch=b,
                moe_over_dense_onnxruntime=ms[('moe', 'onnxruntime', b)] / ms[('dense', 'onnxruntime', b)],
                moe_over_dense_pytorch=ms[('moe', 'pytorch', b)] / ms[('dense', 'pytorch', b)],
                onnxruntime_over_pytorch_moe=ms[('moe', 'onnxruntime', b)] / ms[('moe', 'pytorch', b)],
                onnxruntime_over_pytorch_dense=ms[('dense', 'onnxruntime', b)] / ms[('dense', 'pytorch', b)]))
    return dict(threads=threads, rounds=rounds, providers=providers, rows=rows, ratios=ratios,
                params={name: sum(p.numel() for p in m.parameters()) for name, m in models.items()})


def format_benchmark(result: Dict[str, Any], title: str = '') -> str:
    """Markdown tables of a `benchmark_inference` result."""
    lines = [f'{title}{result["threads"]} threads, median of {result["rounds"]} interleaved rounds (min-max), '
             f'ONNX Runtime providers {result["providers"]}', '',
             '| batch | model | runtime | latency ms (min-max) | images/s |', '|---|---|---|---|---|']
    for r in result['rows']:
        lines.append(f'| {r["batch"]} | {r["model"]} | {r["runtime"]} | {r["median_ms"]:.1f} '
                     f'({r["min_ms"]:.1f}-{r["max_ms"]:.1f}) | {r["images_per_s"]:.1f} |')
    if result['ratios']:
        lines += ['', '| batch | MoE / dense (ORT) | MoE / dense (PyTorch) | ORT / PyTorch (MoE) | '
                  'ORT / PyTorch (dense) |', '|---|---|---|---|---|']
        for r in result['ratios']:
            lines.append(f'| {r["batch"]} | {r["moe_over_dense_onnxruntime"]:.2f} | {r["moe_over_dense_pytorch"]:.2f}'
                         f' | {r["onnxruntime_over_pytorch_moe"]:.2f} | {r["onnxruntime_over_pytorch_dense"]:.2f} |')
    return '\n'.join(lines)
