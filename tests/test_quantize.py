"""Deployable variants: exact graph rewrites, int8 experts with float32 routers, optimised files."""
import logging
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from onnx import numpy_helper

from vit_moe import moe_layers
from vit_moe.onnx import OnnxClassifier, export_onnx, float_expert_weights, optimize_onnx, quantize_onnx
from vit_moe.onnx.graph_rewrites import (
    fuse_erf_gelu, merge_expert_branches, op_counts, router_node_names, unroll_expert_matmuls,
)

from conftest import TINY_MOE, run_front_end

pytestmark = pytest.mark.xdist_group('quantize')  # one pytest-xdist worker: the module fixtures are built once


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model('vit_ti16_moe_upcycled', **TINY_MOE).eval()  # 4 experts in blocks 2, 3
    path = export_onnx(model, tmp_path_factory.mktemp('quant') / 'moe.onnx')
    return model, path


def _run(model_or_path, x):
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    session = ort.InferenceSession(source, providers=['CPUExecutionProvider'])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _batched_expert_matmuls(model):
    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == 'MatMul' and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 3]


def test_graph_rewrites_are_exact_and_do_what_they_say(exported):
    _, path = exported
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    original = onnx.load(str(path))
    expected = _run(original, x)
    model = onnx.load(str(path))
    assert fuse_erf_gelu(model)[1] == 4  # the GELU of every MLP: 2 dense blocks + 2 MoE blocks
    assert unroll_expert_matmuls(model)[1] == 4  # fc1 and fc2 of 2 MoE layers
    assert merge_expert_branches(model)[1] == 2  # fc1 -> GELU -> fc2 per expert, no Concat / Split between
    assert 'Erf' not in op_counts(model) and not _batched_expert_matmuls(model)
    assert len(_batched_expert_matmuls(original)) == 4
    np.testing.assert_allclose(_run(model, x), expected, rtol=1e-5, atol=1e-5)


def test_routers_are_found_by_the_exporters_module_paths(exported):
    _, path = exported
    model = onnx.load(str(path))
    names = router_node_names(model)
    assert len(names) == 2
    scopes = [next(p.value for p in n.metadata_props if p.key == 'pkg.torch.onnx.name_scopes')
              for n in model.graph.node if n.name in names]
    assert all('router' in s for s in scopes)


@pytest.fixture(scope='module')
def distinct_experts(tmp_path_factory):
    """The exported model with experts of different scales (x0.5 ... x4): one scale shared by all experts, or another
    expert's, would show."""
    torch.manual_seed(0)
    model = timm.create_model('vit_ti16_moe_upcycled', **TINY_MOE).eval()
    with torch.no_grad():
        for layer in moe_layers(model).values():
            for e, factor in enumerate((0.5, 1.0, 2.0, 4.0)):
                layer.experts.fc1.weight[e] *= factor
                layer.experts.fc2.weight[e] /= factor ** 0.5
    return model, export_onnx(model, tmp_path_factory.mktemp('distinct') / 'moe.onnx')


def _expert_weight(model, initializer: str) -> np.ndarray:
    """The float [K, M] weight of one expert named by an int8 initializer ('blocks.2.mlp.experts.fc1.weight[.e]')."""
    match = re.search(r'(blocks\.\d+\.mlp)\.experts\.(fc1|fc2|fc1_g|fc1_x)\.weight(?:\.(\d+))?_quantized$', initializer)
    weight = getattr(moe_layers(model)[match.group(1)].experts, match.group(2)).weight.detach().numpy()
    return weight[int(match.group(3))] if match.group(3) else weight  # [K, M] unrolled, [E, K, M] batched


@pytest.mark.parametrize('unroll', [True, False])
@pytest.mark.parametrize('target', ['vnni', 'avx2'])
def test_int8_quantizes_every_expert_with_its_own_scales_and_keeps_routers_float32(distinct_experts, tmp_path, unroll,
                                                                                   target):
    model, path = distinct_experts
    report = quantize_onnx(path, tmp_path / 'int8.onnx', unroll_experts=unroll, target=target)
    quantized = onnx.load(str(tmp_path / 'int8.onnx'))
    assert report['float_expert_weights'] == [] == float_expert_weights(quantized)
    assert float_expert_weights(onnx.load(str(path)))  # the check can fail: the float export has them
    inits = {i.name: i for i in quantized.graph.initializer}
    expert_ops = [n for n in quantized.graph.node if n.op_type == 'MatMulInteger' and 'experts' in n.input[1]]
    assert len(expert_ops) == (2 * 2 * 4 if unroll else 2 * 2)  # (fc1, fc2) x 2 layers (x 4 experts unrolled)
    qmax = 64 if target == 'avx2' else 127  # ONNX Runtime's reduce_range keeps 7-bit weights in [-64, 64]
    for node in expert_ops:
        assert inits[node.input[1]].data_type == onnx.TensorProto.INT8
        q = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[node.input[1][:-len('_quantized')] + '_scale'])
        weight = _expert_weight(model, node.input[1])  # this expert's own float weights
        expected = np.abs(weight).max(axis=-2, keepdims=True) / qmax  # per expert and output column
        np.testing.assert_allclose(scale.reshape(expected.shape), expected, rtol=1e-5)
        assert np.abs(q).max() == qmax
        np.testing.assert_allclose(q * scale.reshape(expected.shape), weight, atol=float(expected.max()) / 2 * 1.001)
    routers = [n for n in quantized.graph.node if n.name in report['routers']]
    assert len(routers) == 2 and all(n.op_type == 'MatMul' for n in routers)  # float MatMul, float32 weights
    for node in routers:
        weight = node.input[1]
        assert weight not in inits or inits[weight].data_type == onnx.TensorProto.FLOAT
    assert OnnxClassifier(tmp_path / 'int8.onnx').int8 == dict(report['int8'], onnxruntime=ort.__version__)
    assert report['int8']['target'] == target and report['int8']['reduce_range'] == (target == 'avx2')
    assert report['bytes'] < 0.5 * path.stat().st_size


def test_int8_for_this_cpu_stays_within_the_error_int8_rounding_allows(distinct_experts, tmp_path):
    """The target detected here (full range with VNNI; 7-bit weights on an x86 CPU without VNNI, whose int8 kernel
    saturates 16-bit pair sums on full-range weights) keeps the logits within 3.5 % (relative RMS) of float32.
    Measured here: 2.1 % full range / 2.4 % 7-bit on an AVX-512 VNNI CPU. Under QEMU's Haswell model (AVX2, no VNNI;
    `qemu-x86_64 -cpu Haswell .venv/bin/python -m pytest -n 0 tests/test_quantize.py`) 'auto' chooses 7-bit weights
    and this test passes; forcing full range there gives 12.9 % and fails it."""
    model, path = distinct_experts
    report = quantize_onnx(path, tmp_path / 'int8.onnx')  # target 'auto'
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(x).numpy()
    got = OnnxClassifier(tmp_path / 'int8.onnx')(x)  # the timm metadata travelled with it
    relative = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert relative < 0.035 and (got.argmax(1) == expected.argmax(1)).mean() >= 0.9, (report['int8'], relative)
    assert report['int8']['chosen'].startswith('detected: ')


@pytest.mark.parametrize('flags, target', [
    (dict(avx2=True, avx512_vnni=True), 'vnni'), (dict(avx2=True, avx_vnni=True), 'vnni'),
    (dict(avx2=True), 'avx2'), (dict(avx2=False), 'avx2'), ({}, 'avx2')])
def test_the_int8_target_follows_the_cpu_and_a_mismatch_is_named(flags, target):
    from vit_moe.onnx import int8_target
    features = dict(flags, cpu_name='Some CPU', architecture='x86_64')
    chosen = int8_target.resolve_int8_target('auto', features)
    assert chosen['target'] == target and chosen['reduce_range'] == (target == 'avx2')
    assert int8_target.resolve_int8_target('auto', dict(cpu_name='Graviton', architecture='aarch64'))['target'] == 'vnni'
    warning = int8_target.int8_target_warning(dict(target='vnni'), features)
    assert (warning is None) == (target == 'vnni' or not flags)  # unknown flags: exported for avx2, no warning
    if warning:
        assert 'Some CPU (x86_64' in warning and '--int8-target avx2' in warning
    assert int8_target.int8_target_warning(dict(target='avx2'), features) is None  # 7-bit weights suit every CPU
    with pytest.raises(ValueError, match="int8 target 'avx512' is not valid; accepted: auto, vnni, avx2"):
        int8_target.resolve_int8_target('avx512')


def test_a_full_range_file_on_a_cpu_without_vnni_warns_when_opened(exported, tmp_path, monkeypatch, caplog):
    from vit_moe.onnx import int8_target
    _, path = exported
    quantize_onnx(path, tmp_path / 'int8.onnx', target='vnni')
    monkeypatch.setattr(int8_target, 'cpu_features', lambda: dict(cpu_name='Old Xeon', architecture='x86_64',
                                                                   avx2=True))
    with caplog.at_level(logging.WARNING, logger='vit_moe'):
        OnnxClassifier(tmp_path / 'int8.onnx')
    assert 'quantized for CPUs with VNNI' in caplog.text and 'Old Xeon (x86_64, AVX2, no VNNI)' in caplog.text


def test_optimised_file_matches_and_keeps_the_metadata(exported, tmp_path):
    model, path = exported
    optimised = optimize_onnx(path, tmp_path / 'opt.onnx')
    ops = op_counts(onnx.load(str(optimised)))
    assert 'Erf' not in ops and ops.get('Gelu', 0) + ops.get('BiasGelu', 0) == 4  # ORT fuses the dense biases in
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(OnnxClassifier(optimised)(x), model(x).numpy(), atol=1e-5, rtol=1e-4)


def test_export_command_line_quantizes_optimises_and_checks_agreement(tmp_path):
    out = tmp_path / 'cli.onnx'
    rc, stdout, stderr = run_front_end(  # in this process (tests/test_cli.py runs the front end as a real process)
        'export/onnx_export.py', '--model', 'vit_ti16_moe_upcycled', '--output', str(out),
        '--model-kwargs', '{img_size: 32, patch_size: 8, embed_dim: 64, depth: 4, num_heads: 2, num_experts: 4}',
        '--num-classes', '10', '--quantize', 'int8', '--optimize')
    assert rc == 0, stderr[-3000:]
    assert 'int8 weights, routers float32, optimised' in stdout and stdout.count(' ok') == 3
    assert float_expert_weights(onnx.load(str(out))) == []
    assert not list(tmp_path.glob('*.float.onnx*'))  # the float intermediate is removed


def test_models_over_the_protobuf_limit_go_through_external_data(exported, tmp_path, monkeypatch):
    from vit_moe.onnx import quantize
    monkeypatch.setattr(quantize, '_EXTERNAL_THRESHOLD', 10_000)  # as if the tiny model were over 2 GB
    model, path = exported
    report = quantize_onnx(path, tmp_path / 'int8.onnx')
    assert (tmp_path / 'int8.onnx.data').is_file() and report['float_expert_weights'] == []
    optimized = optimize_onnx(tmp_path / 'int8.onnx', tmp_path / 'opt.onnx')
    x = torch.randn(2, 3, 32, 32)
    np.testing.assert_allclose(OnnxClassifier(optimized)(x), OnnxClassifier(tmp_path / 'int8.onnx')(x), atol=1e-3)
    assert not list(tmp_path.glob('*.prepared.onnx*')) and not list(tmp_path.glob('*.fused.onnx*'))
