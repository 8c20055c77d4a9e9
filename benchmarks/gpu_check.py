"""Run every CUDA code path of vit-moe once on a lent GPU and print one markdown table (item | result | numbers |
seconds).

    bash benchmarks/gpu_check.sh                  # on the GPU machine (its python3, this checkout on PYTHONPATH)
    .venv/bin/python benchmarks/gpu_check.py [--budget 360] [--only resume-default,ort-cuda-fp32] [--allow-cpu]

Every item runs in its own child process under its own time limit (an error or a timeout is that item's FAIL with a
one-line reason, and the next item runs), on tiny models and a synthetic image folder:
  parity-*      forward + backward, GPU vs CPU, same weights and input, fp32 with TF32 off: logits, loss and every
                parameter gradient within 1e-4 of the largest value (expert choice, token choice)
  train-*       bf16 training steps through `accelerate launch --config_file configs/accelerate/<file>` on one
                process (the trainer's `--mixed-precision bf16` where the file does not say bf16): the start record,
                finite losses, the saved model reloaded and validated to the logged top-1
  resume-*      8 steps vs 4 steps + `--resume latest` to 8, final weights compared: equal with deterministic
                algorithms; with the defaults the difference is reported (index_add atomics)
  ort-cuda-*    ONNX Runtime's CUDA provider (fp32, fp16): parity with PyTorch on a routing-exposing export (a failed
                fp32 check is repeated with use_tf32=0), median latency of 20 runs at batch 1 and 32 for numpy input
                vs CUDA tensors bound in place (IO binding), and the two paths' outputs compared
  ort-cuda-graph-*  the CUDA provider with `enable_cuda_graph` (fp32, fp16): the whole graph captured once for a
                fixed batch of 8, replayed on new images bound in place, each run compared with PyTorch;
                latency with and without the graph
  tensorrt      ONNX Runtime's TensorRT provider: the same
--budget (default 360 s: the check stays well within 8 minutes) caps all items together;
items past it are skipped. The table, under a header of versions and the GPU, goes to stdout and to
$OUT/gpu_check.md (else benchmarks/results/gpu_check.md). Exit code 0 when no item failed (skipped ones allowed),
1 when one did, 2 when there is no GPU. --allow-cpu smoke-tests this script without a GPU: the parity items compare
the CPU with itself, training runs on the CPU (`accelerate launch --cpu`), the ONNX Runtime GPU items are skipped.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / 'configs' / 'accelerate'
MODEL = 'vit_ti16_moe_upcycled'
TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2, num_experts=8, moe_blocks=2)
TRAIN = dict(model=MODEL, model_kwargs=TINY, batch_size=8, num_workers=0, lr=3e-3, warmup_steps=2, log_every=1,
             trackers='none', progress=False, hflip=0.0, scale=[0.8, 1.0], color_jitter=0.0)
PARITY_RTOL = 1e-4
DETERMINISTIC = 'import runpy, sys, torch\ntorch.use_deterministic_algorithms(True)\nsys.argv = sys.argv[1:]\n' \
                'runpy.run_path(sys.argv[0], run_name="__main__")\n'


class Skip(Exception):
    """The item cannot run here; the reason is reported and the item does not fail."""


def _first_line(text: str, limit: int = 240) -> str:
    return (str(text).strip().splitlines() or [''])[0][:limit]


def _no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def tiny_moe(**kwargs) -> torch.nn.Module:
    import timm
    import vit_moe  # noqa: F401  registers the models
    torch.manual_seed(0)
    return timm.create_model(MODEL, num_classes=10, **TINY, **kwargs)


# ------------------------------------------------------------------------------------------ 1. GPU vs CPU parity
def _forward_backward(model, images, targets):
    """Logits, loss and parameter gradients (float32, on the CPU) and every MoE layer's filled slots of one step."""
    from vit_moe.layers import capture_routing
    model.zero_grad(set_to_none=True)
    with capture_routing(keep_tensors=True) as routing:
        logits = model(images)
    loss = F.cross_entropy(logits, targets) + routing.aux_loss
    loss.backward()
    tensors = dict(logits=logits, loss=loss)
    tensors.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    slots = [torch.where(r.combine_weights > 0, r.token_index, -1).sort(-1).values.cpu() for _, r in routing.tensors]
    return {k: v.detach().float().cpu() for k, v in tensors.items()}, slots


def item_parity(router, device, workdir, data):
    _no_tf32()
    reference = tiny_moe(router=router).train()
    model = copy.deepcopy(reference).to(device)
    generator = torch.Generator().manual_seed(1)
    images, targets = torch.randn(8, 3, 32, 32, generator=generator), torch.randint(0, 10, (8,), generator=generator)
    expected, expected_slots = _forward_backward(reference, images, targets)
    got, got_slots = _forward_backward(model, images.to(device), targets.to(device))
    if got.keys() != expected.keys():
        return False, f'gradients for different parameters: {sorted(got.keys() ^ expected.keys())[:3]}'
    diff = {k: float((got[k] - v).abs().max()) for k, v in expected.items()}
    rel = {k: d / max(float(expected[k].abs().max()), 1e-12) for k, d in diff.items()}
    grads = [k for k in diff if k not in ('logits', 'loss')]
    worst = max(rel, key=rel.get)
    rerouted = sum(int((a != b).any(-1).sum()) for a, b in zip(got_slots, expected_slots))
    where = 'cuda vs cpu' if device.type == 'cuda' else 'cpu vs cpu (smoke test)'
    return rel[worst] <= PARITY_RTOL, (
        f'{where}: logits {diff["logits"]:.1e} ({rel["logits"]:.1e} rel), loss {diff["loss"]:.1e}, {len(grads)} grads '
        f'max {max(diff[k] for k in grads):.1e}; worst rel {rel[worst]:.1e} ({worst}; limit {PARITY_RTOL:g}); '
        f'{rerouted} (image, expert) slot sets differ')


def item_soft_autocast(device, workdir, data):
    """Soft MoE routing under the device's bf16 autocast: float32 logits and softmaxes, equal to the float32 routing
    of the same bf16-rounded input (on CUDA, autocast would otherwise run the logits matmul in bf16)."""
    from timm.layers import Mlp
    from vit_moe.layers import moe_layer_like
    torch.manual_seed(0)
    layer = moe_layer_like(Mlp(64, 128), router='soft', num_experts=8, slots_per_expert=4).to(device)
    x = torch.randn(4, 65, 64, device=device).bfloat16()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        routing = layer.router(x)
    reference = layer.router(x.float())
    diff = max(float((routing.dispatch_weights - reference.dispatch_weights).abs().max()),
               float((routing.combine_weights - reference.combine_weights).abs().max()))
    dtypes = {str(routing.dispatch_weights.dtype), str(routing.combine_weights.dtype)}
    return dtypes == {'torch.float32'} and diff <= 1e-5, f'{device.type}: weights {dtypes}, max diff {diff:.1e}'


# -------------------------------------------------------------------------------------- training subprocesses
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def _train_config(folder: Path, data: Path, **overrides) -> Path:
    path = folder / 'train.yaml'
    path.write_text(yaml.safe_dump(dict(TRAIN, data_dir=str(data), **overrides)))
    return path


def _reason(log: Path) -> str:
    """The most telling line of a failed command's output: its last error line, else its last line."""
    lines = [line.strip() for line in log.read_text(errors='replace').splitlines() if line.strip().strip('=-')]
    errors = [line for line in lines if ('Error' in line or 'error:' in line) and 'ChildFailedError' not in line]
    return _first_line((errors or lines or ['no output'])[-1])


def _start(cmd, log: Path, env=None) -> subprocess.Popen:
    """`cmd` started from the repository root with its output in `log` (`proc.log`)."""
    print(f'started the {log.stem} run', flush=True)  # the last line of a timed-out item names its run
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), **(env or {}))
    with open(log, 'w') as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def _finish(proc: subprocess.Popen) -> None:
    """Wait for `proc`; a non-zero exit raises naming its error, after its last lines on stderr."""
    if proc.wait():
        print(f'--- {proc.log.name} ---', *proc.log.read_text(errors='replace').splitlines()[-15:], sep='\n',
              file=sys.stderr)
        raise RuntimeError(f'{proc.log.stem} run exited with {proc.returncode}: {_reason(proc.log)}')


def _records(output_dir: Path, kind: str):
    return [r for r in map(json.loads, open(output_dir / 'log.jsonl')) if r['type'] == kind]


# ------------------------------------------------------------------------------ 2. accelerate launch, bf16 steps
def item_train(config_name, device, workdir, data):
    from vit_moe.training import validate
    config, out = CONFIGS / config_name, workdir / 'run'
    launch_bf16 = yaml.safe_load(config.read_text()).get('mixed_precision') == 'bf16'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--config_file', str(config),
           '--num_processes', '1', '--num_machines', '1', '--main_process_port', str(_free_port()),
           *(['--cpu'] if device.type == 'cpu' else []),
           'train_scripts/train.py', '--config', str(_train_config(workdir, data, steps=6, checkpoint_every=3)),
           '--output-dir', str(out), *([] if launch_bf16 else ['--mixed-precision', 'bf16'])]
    _finish(_start(cmd, workdir / 'train.log'))
    start, final = _records(out, 'start')[0], _records(out, 'eval')[-1]
    losses = [r['loss'] for r in _records(out, 'train')]
    reloaded = validate(MODEL, str(out / 'model'), str(data), batch_size=8, num_workers=0,
                        mixed_precision=start['mixed_precision'])
    finite = all(map(math.isfinite, losses))
    ok = start['mixed_precision'] == 'bf16' and finite and reloaded['top1'] == final['top1']
    return ok, (f'{device.type}, start record: {start["distributed_type"]}, {start["mixed_precision"]}; loss '
                f'{losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps ({"" if finite else "NOT "}finite); '
                f'top-1 logged {final["top1"]:.1f}, reloaded {reloaded["top1"]:.1f} (loss {final["loss"]:.4f} vs '
                f'{reloaded["loss"]:.4f})')


def item_expert_parallel(device, workdir, data):
    """2 GPUs (NCCL): 2-way expert parallelism logs the losses of the same 2-process DDP run (untested until a
    machine with 2 GPUs is lent)."""
    if device.type == 'cuda' and torch.cuda.device_count() < 2:
        raise Skip(f'needs 2 GPUs, this machine has {torch.cuda.device_count()}')
    losses = {}
    for ep in (1, 2):
        out = workdir / f'ep{ep}'
        env = None if device.type == 'cuda' else dict(ACCELERATE_USE_CPU='1')
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
               'train_scripts/train.py', '--config', str(_train_config(workdir, data, steps=6, checkpoint_every=6)),
               '--output-dir', str(out), '--expert-parallel-size', str(ep), '--mixed-precision', 'no']
        _finish(_start(cmd, workdir / f'ep{ep}.log', env))
        losses[ep] = [r['loss'] for r in _records(out, 'train')]
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses[2], losses[1]))
    return worst <= 1e-3, (f'{device.type}: EP 2 vs DDP, {len(losses[1])} logged losses, worst relative difference '
                           f'{worst:.1e} (limit 1e-3)')


# --------------------------------------------------------------------------------------- 3. resume exactness
def item_resume(deterministic, device, workdir, data):
    from safetensors.torch import load_file
    script, env = [str(ROOT / 'train_scripts' / 'train.py')], None
    if deterministic:  # the trainer has no flag for it: a wrapper sets it and runs train.py
        (workdir / 'deterministic.py').write_text(DETERMINISTIC)
        script, env = [str(workdir / 'deterministic.py'), *script], dict(CUBLAS_WORKSPACE_CONFIG=':4096:8')
    config = _train_config(workdir, data, steps=8, checkpoint_every=4, mixup=0.4,  # every RNG matters
                           model_kwargs=dict(TINY, drop_rate=0.1))

    def train(out, name, *extra):
        return _start([sys.executable, *script, '--config', str(config), '--output-dir', str(workdir / out), *extra],
                      workdir / f'{name}.log', env)

    uninterrupted = train('full', 'uninterrupted')  # alongside the interrupted one
    _finish(train('part', 'first-4-steps', '--steps', '4'))
    _finish(train('part', 'resumed', '--resume', 'latest'))
    _finish(uninterrupted)
    full, part = (load_file(str(workdir / out / 'model' / 'model.safetensors')) for out in ('full', 'part'))
    if full.keys() != part.keys():
        return False, f'different tensors saved: {sorted(full.keys() ^ part.keys())[:3]}'
    diff = max(float((full[k].float() - part[k].float()).abs().max()) for k in full)
    losses = [{r['step']: r['loss'] for r in _records(workdir / out, 'train')} for out in ('full', 'part')]
    loss_diff = max(abs(losses[0][s] - losses[1][s]) for s in losses[0])
    mode = 'deterministic algorithms' if deterministic else 'default algorithms'
    return diff == 0 or not deterministic, (
        f'{device.type}, {mode}: max |weight diff| {diff:.1e} over {len(full)} tensors; max |loss diff| '
        f'{loss_diff:.1e} over {len(losses[0])} steps')


# --------------------------------------------------------------------------------- 4, 5. ONNX Runtime on the GPU
def _median_ms(fn, runs: int = 20):
    """The last output of `fn()` and its median time in ms over `runs` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, 1e3 * statistics.median(times)


def _parity_summary(parity) -> str:
    from vit_moe.onnx import format_parity
    bad = [format_parity(batch, r) for batch, r in parity.items() if not r['ok']]
    if bad:
        return 'parity FAIL: ' + _first_line(bad[0], 300)
    ties = sum(r['ties'] for r in parity.values())
    return (f'parity ok at batch {"/".join(map(str, parity))}: max |logit diff| '
            f'{max(r["max_abs_diff"] for r in parity.values()):.1e}, {ties} routing ties')


def _onnx_on_gpu(providers, fp16, device, workdir) -> tuple:
    from vit_moe.onnx import OnnxClassifier, check_onnx_parity, export_onnx
    _no_tf32()
    model, name = tiny_moe().eval(), 'moe_fp16' if fp16 else 'moe'
    path = export_onnx(model, workdir / f'{name}.onnx', fp16=fp16)
    debug = export_onnx(model, workdir / f'{name}_debug.onnx', fp16=fp16, expose_routing=True)
    classifier = OnnxClassifier(path, providers=providers, io_binding=True)
    if classifier.providers[0] != providers[0]:
        return False, f'the session runs on {classifier.providers}, not {providers[0]}'
    reference = (copy.deepcopy(model).half() if fp16 else model).to(device)
    parity = check_onnx_parity(reference, debug, providers=providers)
    numbers = [_parity_summary(parity)]
    ok = all(r['ok'] for r in parity.values())
    if not ok and not fp16 and providers[0] == 'CUDAExecutionProvider':  # ONNX Runtime's CUDA default: TF32 on
        no_tf32 = check_onnx_parity(reference, debug, providers=[(providers[0], {'use_tf32': '0'}), *providers[1:]])
        numbers.append(f'with use_tf32=0: {_parity_summary(no_tf32)}')
    for batch in (1, 32):
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        on_gpu = images.to(device)
        host, host_ms = _median_ms(lambda: classifier(images.numpy()))
        bound, bound_ms = _median_ms(lambda: classifier(on_gpu))
        diff = float(np.abs(host.astype(np.float32) - bound.astype(np.float32)).max())
        same = diff <= (1e-3 if fp16 else 1e-5) * float(np.abs(host).max())
        ok = ok and same
        numbers.append(f'batch {batch}: numpy {host_ms:.2f} ms, IO binding {bound_ms:.2f} ms, outputs '
                       f'{"identical" if diff == 0 else f"differ by {diff:.1e}"}{"" if same else " (FAIL)"}')
    return ok, '; '.join(numbers)


def _need_provider(device, provider: str, install: str) -> None:
    import onnxruntime as ort
    if device.type != 'cuda':
        raise Skip('no CUDA device')
    if provider not in ort.get_available_providers():
        raise Skip(f'onnxruntime {ort.__version__} has no {provider} (has {", ".join(ort.get_available_providers())})'
                   f'; {install}')


def item_ort_cuda(fp16, device, workdir, data):
    _need_provider(device, 'CUDAExecutionProvider', 'pip install "vit-moe[onnx-gpu]" (instead of onnxruntime)')
    return _onnx_on_gpu(['CUDAExecutionProvider', 'CPUExecutionProvider'], fp16, device, workdir)


def item_ort_cuda_graph(fp16, device, workdir, data):
    """ONNX Runtime's CUDA provider capturing the whole static-shape graph once (`enable_cuda_graph`) for a fixed
    batch, inputs and outputs bound in place; replayed on new images it must give what PyTorch gives."""
    import onnxruntime as ort
    from vit_moe.onnx import export_onnx
    from vit_moe.onnx.runtime import session_options
    _need_provider(device, 'CUDAExecutionProvider', 'pip install "vit-moe[onnx-gpu]" (instead of onnxruntime)')
    _no_tf32()
    model, batch = tiny_moe().eval(), 8
    path = export_onnx(model, workdir / f'graph_{"fp16" if fp16 else "fp32"}.onnx', fp16=fp16)
    index = device.index or 0
    cuda = {'device_id': str(index), 'use_tf32': '0'}
    plain = ort.InferenceSession(str(path), session_options(), providers=[('CUDAExecutionProvider', cuda)])
    graph = ort.InferenceSession(str(path), session_options(),  # no CPU provider: a captured graph is CUDA only
                                 providers=[('CUDAExecutionProvider', dict(cuda, enable_cuda_graph='1'))])
    dtype = np.float16 if fp16 else np.float32
    inp, out = graph.get_inputs()[0].name, graph.get_outputs()[0].name
    x = ort.OrtValue.ortvalue_from_shape_and_type((batch, 3, 32, 32), dtype, 'cuda', index)
    y = ort.OrtValue.ortvalue_from_shape_and_type((batch, model.num_classes), dtype, 'cuda', index)
    binding = graph.io_binding()
    binding.bind_ortvalue_input(inp, x)
    binding.bind_ortvalue_output(out, y)
    reference = (copy.deepcopy(model).half() if fp16 else model).to(device)
    tolerance = 2e-2 if fp16 else 1e-4
    ok, numbers = True, []
    for seed in (1, 2, 3):  # the first run captures, the next ones replay with new images in the same buffers
        images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        x.update_inplace(images.numpy().astype(dtype))
        graph.run_with_iobinding(binding)
        with torch.no_grad():
            expected = reference(images.to(device, reference.pos_embed.dtype)).float().cpu().numpy()
        diff = float(np.abs(y.numpy().astype(np.float32) - expected).max() / np.abs(expected).max())
        ok = ok and diff <= tolerance
        numbers.append(f'run {seed}: {diff:.1e} of max |logit| vs PyTorch{"" if diff <= tolerance else " (FAIL)"}')
    host = torch.randn(batch, 3, 32, 32).numpy().astype(dtype)
    _, plain_ms = _median_ms(lambda: plain.run(None, {inp: host}))
    _, graph_ms = _median_ms(lambda: (x.update_inplace(host), graph.run_with_iobinding(binding)))
    numbers.append(f'batch {batch}: {plain_ms:.2f} ms without, {graph_ms:.2f} ms with the CUDA graph (numpy in)')
    return ok, '; '.join(numbers)


def item_tensorrt(device, workdir, data):
    from vit_moe.onnx.runtime import _tensorrt_loadable
    _need_provider(device, 'TensorrtExecutionProvider', 'pip install "vit-moe[onnx-gpu]" tensorrt')
    if not _tensorrt_loadable():
        raise Skip('TensorRT libraries not found (no tensorrt_libs module, no libnvinfer); pip install tensorrt')
    return _onnx_on_gpu(['TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider'], False,
                        device, workdir)


ITEMS = {  # name: (table title, time limit in seconds, function(device, workdir, data) -> (ok, numbers))
    'parity-expert-choice': ('1. fwd/bwd parity GPU vs CPU, expert choice', 90, partial(item_parity, 'expert_choice')),
    'parity-token-choice': ('1. fwd/bwd parity GPU vs CPU, token choice', 90, partial(item_parity, 'token_choice')),
    'soft-moe-autocast': ('1. Soft MoE routing float32 under bf16 autocast', 60, item_soft_autocast),
    'expert-parallel': ('2. expert parallelism over 2 GPUs (NCCL) = DDP', 180, item_expert_parallel),
    'train-ddp': ('2. bf16 steps, accelerate launch ddp.yaml', 150, partial(item_train, 'ddp.yaml')),
    'train-fsdp2': ('2. bf16 steps, accelerate launch fsdp2.yaml', 150, partial(item_train, 'fsdp2.yaml')),
    'train-fsdp2-bf16': ('2. bf16 steps, accelerate launch fsdp2_bf16.yaml', 150,
                         partial(item_train, 'fsdp2_bf16.yaml')),
    'resume-default': ('3. resume exactness, default algorithms', 180, partial(item_resume, False)),
    'resume-deterministic': ('3. resume exactness, deterministic algorithms', 180, partial(item_resume, True)),
    'ort-cuda-fp32': ('4. ONNX Runtime CUDA provider, fp32', 180, partial(item_ort_cuda, False)),
    'ort-cuda-fp16': ('4. ONNX Runtime CUDA provider, fp16', 180, partial(item_ort_cuda, True)),
    'ort-cuda-graph-fp32': ('4. ONNX Runtime CUDA graph, fixed batch 8, fp32', 120,
                            partial(item_ort_cuda_graph, False)),
    'ort-cuda-graph-fp16': ('4. ONNX Runtime CUDA graph, fixed batch 8, fp16', 120,
                            partial(item_ort_cuda_graph, True)),
    'tensorrt': ('5. ONNX Runtime TensorRT provider, fp32', 240, item_tensorrt),
}


# ------------------------------------------------------------------------------------------------- the driver
def run_child(name: str, workdir: Path, data: Path) -> None:
    """Run one item in this process and write {result, numbers} to workdir/result.json."""
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        ok, numbers = ITEMS[name][2](device, workdir, data)
        result = 'ok' if ok else 'FAIL'
    except Skip as e:
        result, numbers = 'SKIP', str(e)
    except Exception as e:
        traceback.print_exc()
        result, numbers = 'FAIL', f'{type(e).__name__}: {_first_line(e)}'
    (workdir / 'result.json').write_text(json.dumps(dict(result=result, numbers=numbers)))


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)


def run_item(name: str, workdir: Path, data: Path, deadline: float) -> dict:
    """One item in a child process under its time limit (capped by the budget): a table row."""
    title, limit, _ = ITEMS[name]
    timeout = min(limit, deadline - time.monotonic())
    if timeout < 10:
        return dict(item=title, result='SKIP', numbers='time budget spent (--budget)', seconds=0.0)
    folder = workdir / name
    folder.mkdir()
    log, start = folder / 'item.log', time.monotonic()
    cmd = [sys.executable, __file__, '--item', name, '--workdir', str(folder), '--data', str(data)]
    with open(log, 'w') as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _signal_group(proc, signal.SIGTERM)  # torchrun passes it on to its workers
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
    finally:
        _signal_group(proc, signal.SIGKILL)  # whatever the item left running (also on Ctrl-C)
        proc.wait()
    row = dict(item=title, seconds=time.monotonic() - start)
    if (folder / 'result.json').is_file():
        row.update(json.loads((folder / 'result.json').read_text()))
    elif timed_out:
        row.update(result='FAIL', numbers=f'timed out after {timeout:.0f} s: {_reason(log)}')
    else:
        row.update(result='FAIL', numbers=f'item process exited with {proc.returncode}: {_reason(log)}')
    if row['result'] == 'FAIL':
        tail = log.read_text(errors='replace').splitlines()[-25:]
        print(f'--- {name}: last lines of its output ---', *tail, '---', sep='\n', file=sys.stderr, flush=True)
    return row


def _image_folder(root: Path, per_class=(12, 5), classes: int = 3, size: int = 32) -> Path:
    """Colour-coded classes (class k brightest in channel k) with noise, as tests/conftest.py's make_image_folder."""
    rng = np.random.default_rng(0)
    for split, count in zip(('train', 'val'), per_class):
        for k in range(classes):
            folder = root / split / f'class_{k}'
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (size, size, 3))
                pixels[..., k] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i}.png')
    return root


def _header() -> str:
    import accelerate
    import onnxruntime as ort
    import timm
    from vit_moe.onnx.runtime import _tensorrt_loadable
    gpu = 'none (--allow-cpu smoke test on the CPU)'
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = f'{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {torch.cuda.device_count()} visible'
        if shutil.which('nvidia-smi'):
            driver = subprocess.run(['nvidia-smi', '--query-gpu=driver_version', '--format=csv,noheader'],
                                    capture_output=True, text=True).stdout.split()
            gpu += f', driver {driver[0] if driver else "?"}'
    return '\n'.join([
        f'# vit-moe GPU check, {time.strftime("%Y-%m-%d %H:%M")}', '', f'- GPU: {gpu}',
        f'- torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), '
        f'accelerate {accelerate.__version__}, timm {timm.__version__}, Python {platform.python_version()}, '
        f'{os.cpu_count()} CPUs',
        f'- onnxruntime {ort.__version__} ({", ".join(ort.get_available_providers())}); TensorRT libraries '
        f'{"found" if _tensorrt_loadable() else "not found"}', ''])


def _table(rows) -> str:
    def cell(text):
        return str(text).replace('|', '\\|').replace('\n', ' ')
    lines = ['| item | result | numbers | seconds |', '|---|---|---|---:|']
    lines += [f'| {r["item"]} | {r["result"]} | {cell(r["numbers"])} | {r["seconds"]:.1f} |' for r in rows]
    return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--budget', type=float, default=360, help='seconds for all items (default 360)')
    parser.add_argument('--only', help=f'comma-separated items to run (default all: {", ".join(ITEMS)})')
    parser.add_argument('--allow-cpu', action='store_true', help='without a GPU: run what can run on the CPU')
    parser.add_argument('--item', choices=list(ITEMS), help=argparse.SUPPRESS)  # a child process's one item
    parser.add_argument('--workdir', type=Path, help=argparse.SUPPRESS)
    parser.add_argument('--data', type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.item:
        run_child(args.item, args.workdir, args.data)
        return 0
    names = args.only.split(',') if args.only else list(ITEMS)
    unknown = sorted(set(names) - set(ITEMS))
    if unknown:
        parser.error(f'unknown item(s) {unknown}; accepted: {", ".join(ITEMS)}')
    if not torch.cuda.is_available() and not args.allow_cpu:
        print('no GPU (torch.cuda.is_available() is False); --allow-cpu smoke-tests this script on the CPU')
        return 2
    deadline = time.monotonic() + args.budget
    header = _header()
    print(header, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix='gpu_check_'))
    try:
        data = _image_folder(workdir / 'data')
        rows = []
        for name in names:
            rows.append(run_item(name, workdir, data, deadline))
            print(f'{name}: {rows[-1]["result"]} ({rows[-1]["seconds"]:.0f} s)', flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = f'{header}\n{_table(rows)}'
    path = Path(os.environ['OUT']) if os.environ.get('OUT') else ROOT / 'benchmarks' / 'results'
    path.mkdir(parents=True, exist_ok=True)
    (path / 'gpu_check.md').write_text(report)
    print(f'\n{_table(rows)}')
    return 1 if any(r['result'] == 'FAIL' for r in rows) else 0


if __name__ == '__main__':
    sys.exit(main())
