"""Package layout: a light `import vit_moe`, extras that name themselves, layers that only import downwards."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / 'vit_moe'
# subpackage -> the subpackages it may import (the architecture: layers <- models <- training / onnx)
ALLOWED = {
    'layers': set(),
    'models': {'layers'},
    'data': set(),
    'planning': {'layers', 'models'},
    'training': {'layers', 'models', 'data', 'planning'},
    'onnx': {'layers', 'models', 'data'},
    'analysis': {'layers', 'models', 'data'},
}

# What a clean interpreter imports. One interpreter does what `import vit_moe` alone does (the light import), then
# forks once per case below: each case starts from that state (torch, timm and vit_moe imported, nothing else of
# the package), as a fresh interpreter running `import vit_moe.<subpackage>` would be once it has imported vit_moe
# itself, and no case sees what another imported. One torch import for all of them instead of one per case.
_CLEAN_INTERPRETER = r'''
import json, os, sys, traceback
import torch, timm, safetensors, safetensors.torch
before = {m.split('.')[0] for m in sys.modules}
import vit_moe
import timm
assert 'vit_ti16_moe_upcycled' in timm.list_models('*moe*')
results = {'import vit_moe': [sorted({m.split('.')[0] for m in sys.modules} - before),
                              sorted(m for m in sys.modules if m.startswith('vit_moe.'))]}
for name, (blocked, code) in json.loads(sys.argv[1]).items():
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the case, in a copy of this interpreter: its last line of output, as an uncaught error ends it
        os.close(read)
        try:
            if blocked:
                assert blocked not in sys.modules, f'{blocked} was imported before the case: the case proves nothing'
                sys.modules[blocked] = None  # as if not installed
            exec(code, {})
            result = 'ok'
        except BaseException:
            result = traceback.format_exc().strip().splitlines()[-1]
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, 'rb') as pipe:
        results[name] = pipe.read().decode()
    os.waitpid(pid, 0)
print(json.dumps(results))
'''
# case -> (module made unimportable, code): 'ok', or the last line of the error it ends with
_CASES = {
    **{f'{subpackage} without {module}': (module, f'import vit_moe.{subpackage}')
       for subpackage, module in (('training', 'accelerate'), ('training', 'torchmetrics'), ('onnx', 'onnxruntime'),
                                  ('onnx', 'onnx'))},
    'saving and loading': (None, 'import sys, vit_moe.models.saving, vit_moe.models.loading\n'
                                 'assert "accelerate" not in sys.modules, "accelerate imported"'),
}


@pytest.fixture(scope='module')
def clean_interpreter() -> dict:
    """case -> what a clean interpreter did: 'import vit_moe' -> (new top-level modules, vit_moe submodules)."""
    run = subprocess.run([sys.executable, '-c', _CLEAN_INTERPRETER, json.dumps(_CASES)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.xdist_group('clean_interpreter')
def test_import_vit_moe_pulls_in_only_torch_timm_and_safetensors(clean_interpreter):
    new_top_level, submodules = clean_interpreter['import vit_moe']
    assert new_top_level == ['vit_moe']
    assert 'vit_moe.training' not in submodules and 'vit_moe.onnx' not in submodules


@pytest.mark.xdist_group('clean_interpreter')
@pytest.mark.parametrize('subpackage, module, extra', [
    ('training', 'accelerate', 'train'), ('training', 'torchmetrics', 'train'),
    ('onnx', 'onnxruntime', 'onnx'), ('onnx', 'onnx', 'onnx')])
def test_a_missing_extra_is_named_in_the_import_error(clean_interpreter, subpackage, module, extra):
    last = clean_interpreter[f'{subpackage} without {module}']
    assert last.startswith('ImportError') and f'vit-moe[{extra}]' in last and module in last, last


@pytest.mark.xdist_group('clean_interpreter')
def test_saving_and_loading_do_not_import_accelerate(clean_interpreter):
    """A saved model folder is written and read without the training stack (moved from test_model_metadata.py)."""
    assert clean_interpreter['saving and loading'] == 'ok'


def _internal_imports(path: Path):
    """Subpackages of vit_moe that the module at `path` imports (relative or absolute)."""
    tree = ast.parse(path.read_text())
    parts = path.relative_to(PACKAGE).parts
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = list(parts[:-1])[:len(parts) - node.level]
                target = base + (node.module.split('.') if node.module else [])
                names = [target + [a.name] for a in node.names] if not node.module else [target]
            elif node.module and node.module.startswith('vit_moe'):
                names = [node.module.split('.')[1:]]
            else:
                continue
            for name in names:
                if name:
                    yield name[0]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith('vit_moe.'):
                    yield alias.name.split('.')[1]


@pytest.mark.parametrize('subpackage', sorted(ALLOWED))
def test_subpackages_import_only_the_layers_below_them(subpackage):
    for path in sorted((PACKAGE / subpackage).glob('*.py')):
        imported = {name for name in _internal_imports(path) if name in ALLOWED and name != subpackage}
        assert imported <= ALLOWED[subpackage], f'{path.relative_to(ROOT)} imports {sorted(imported)}'


def test_no_module_of_a_subpackage_imports_the_top_level_package():
    for path in sorted(PACKAGE.glob('*/*.py')):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name != 'vit_moe' for a in node.names), path
            if isinstance(node, ast.ImportFrom) and node.level >= 2 and not node.module:
                assert all(a.name in ALLOWED or a.name.startswith('_') for a in node.names), path
