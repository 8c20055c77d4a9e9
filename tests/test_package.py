"""Package layout: a light `import vit_moe`, extras that name themselves, layers that only import downwards."""
import ast
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


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_import_vit_moe_pulls_in_only_torch_timm_and_safetensors():
    code = '''
import sys
import torch, timm, safetensors, safetensors.torch
before = {m.split('.')[0] for m in sys.modules}
import vit_moe
import timm
assert 'vit_ti16_moe_upcycled' in timm.list_models('*moe*')
print(sorted({m.split('.')[0] for m in sys.modules} - before))
print(sorted(m for m in sys.modules if m.startswith('vit_moe.')))
'''
    result = _python(code)
    assert result.returncode == 0, result.stderr
    new_top_level, submodules = result.stdout.strip().splitlines()
    assert new_top_level == "['vit_moe']"
    assert 'vit_moe.training' not in submodules and 'vit_moe.onnx' not in submodules


@pytest.mark.parametrize('subpackage, module, extra', [
    ('training', 'accelerate', 'train'), ('training', 'torchmetrics', 'train'),
    ('onnx', 'onnxruntime', 'onnx'), ('onnx', 'onnx', 'onnx')])
def test_a_missing_extra_is_named_in_the_import_error(subpackage, module, extra):
    result = _python(f'import sys; sys.modules[{module!r}] = None; import vit_moe.{subpackage}')
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('ImportError') and f'vit-moe[{extra}]' in last and module in last, last


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
