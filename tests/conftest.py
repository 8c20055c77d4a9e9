"""Shared helpers and fixtures.

Two model sizes: TINY_VIT / TINY_MOE (32 px, patch 8 -> 16 patches + class token, dim 64, depth 4) for model
tests, TRAIN_MOE (16 px, patch 4, dim 32, depth 2) for training runs, which are timed end to end.
"""
import contextlib
import io
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vit_moe  # noqa: F401  registers the models

ROOT = Path(__file__).resolve().parent.parent
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_classes=10)
TINY_MOE = dict(TINY_VIT, num_experts=4)
TRAIN_MOE = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_experts=4, moe_blocks=1)


def tiny_dense(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('vit_tiny_patch16_224', **dict(TINY_VIT, **overrides)).eval()


def make_image_folder(root: Path, per_class=(12, 5), classes=3, size=12, seed=0) -> Path:
    """Colour-coded classes (class k is brightest in channel k) with noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for split, count in zip(('train', 'val'), per_class):
        for k in range(classes):
            folder = root / split / f'class_{k}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 90, (size, size, 3))
                pixels[..., k % 3] += 150
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f'{i}.png')
    return root


def tiny_config(tmp_path: Path, **overrides):
    """A TrainConfig for a seconds-long run of TRAIN_MOE on `tmp_path/data`, writing to `tmp_path/run`."""
    from vit_moe.training import load_config
    values = dict(
        model='vit_ti16_moe_upcycled', model_kwargs=TRAIN_MOE, data_dir=str(tmp_path / 'data'),
        output_dir=str(tmp_path / 'run'), batch_size=6, num_workers=0, steps=8, lr=3e-3, warmup_steps=2,
        log_every=1, checkpoint_every=4, keep_checkpoints=3, trackers='none', progress=False, hflip=0.0,
        scale=[0.8, 1.0], color_jitter=0.0)
    values.update(overrides)
    return load_config(None, values)


def log_records(output_dir, kind='train'):
    """Records of one type from a run's log.jsonl."""
    return [r for r in map(json.loads, open(Path(output_dir) / 'log.jsonl')) if r['type'] == kind]


def train_state_of(checkpoint) -> dict:
    """The counters a checkpoint folder holds (its trainer_state.json)."""
    return json.loads((Path(checkpoint) / 'trainer_state.json').read_text())


def script_env() -> dict:
    """Environment of the front ends run by the tests: this checkout importable, CPU only, one thread each."""
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1')


def run_script(args, timeout=240, **kwargs) -> subprocess.CompletedProcess:
    """Run a command-line front end from the repository root."""
    return subprocess.run(args, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=timeout, **kwargs)


def run_front_end(script: str, *args: str):
    """(exit code, stdout, stderr) of a command-line front end's `main`, run in this process (no interpreter start-up)
    through the same `_cli.run` wrapper as on the command line."""
    namespace = runpy.run_path(str(ROOT / script), run_name='front_end')
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = namespace['_cli'].run(namespace['main'], list(args), prog=Path(script).name)
    return rc, out.getvalue(), err.getvalue()


def launch_processes(num_processes: int = 2):
    """`num_processes` processes on CPU (DDP over gloo) through torch's launcher, which Accelerate picks up.

    `accelerate launch --cpu --num_processes N` starts a single process on a machine without GPUs (its simple
    launcher), so the tests use `torch.distributed.run` and check that the run saw N processes. `--standalone`: the
    launcher's store binds a port the system picks (no port chosen here that another test could take first).
    """
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', str(num_processes)]


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'stress: a slower tier (more launches of what CI checks once); scripts/stress_tests.sh runs it, '
                   'CI does not (`bash scripts/run_tests.sh -m ""` runs everything)')
    _reuse_the_onnx_exporters_registry()


def _reuse_the_onnx_exporters_registry():
    """torch.onnx.export(dynamo=True) rebuilds its table of ATen -> ONNX functions for every export (0.8 s here, the
    same table each time for an opset); the suite's ~100 exports in one process share one per opset. Only reads follow
    (no test passes custom_translation_table, which registers into it)."""
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:  # another torch: every export builds its own
        return
    build, built = _registration.ONNXRegistry.from_torchlib.__func__, {}

    def from_torchlib(cls, opset_version=_registration._constants.TORCHLIB_OPSET):
        if (cls, opset_version) not in built:
            built[cls, opset_version] = build(cls, opset_version)
        return built[cls, opset_version]

    _registration.ONNXRegistry.from_torchlib = classmethod(from_torchlib)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    # pytest >= 9.2 derives item.nodeid from item._id, while pytest-xdist <= 3.8 appends a test's xdist_group to
    # item._nodeid for --dist loadgroup, which then has no effect (pytest-dev/pytest-xdist#1386): a module's shared
    # runs were built once per worker. Put the group where pytest 9.2 reads it (a no-op where xdist already did).
    if not getattr(config.option, 'loadgroup', False):
        return
    for item in items:
        groups = sorted({str(m.args[0] if m.args else m.kwargs.get('name', 'default'))
                         for m in item.iter_markers('xdist_group')})
        if groups and item.nodeid.rfind('@') <= item.nodeid.rfind(']') and hasattr(item, '_id'):
            from _pytest.nodeid import NodeId
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(groups)}")


@pytest.fixture
def dense():
    return tiny_dense()


@pytest.fixture
def images():
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def data(tmp_path):
    return make_image_folder(tmp_path / 'data')


@pytest.fixture(autouse=True)
def _few_threads():
    # one thread per pytest-xdist worker (the workers share the cores), two when run alone
    torch.set_num_threads(1 if os.environ.get('PYTEST_XDIST_WORKER') else 2)
