"""expert_kernel='qmoe': one ONNX Runtime QMoE node per MoE layer computes what its PyTorch reference computes (the
model with the file's quantized experts and tanh GELU), the file says so, and what QMoE cannot express is refused."""
import numpy as np
import onnx
import pytest
import timm
import torch

from vit_moe.onnx import OnnxClassifier, OnnxExportError, export_onnx, read_metadata
from vit_moe.onnx.export import _export
from vit_moe.onnx.fused_experts import QMOE_EXPERT_BITS, pack_linear, qmoe_reference

from conftest import TINY_MOE, run_front_end

NAME = 'vit_ti16_moe_upcycled'
ROUTERS = {'expert choice': {}, 'token choice, prefix always, shared, G 2': dict(
    router='token_choice', prefix_tokens='always', num_shared_experts=1, expert_granularity=2)}


def _model(**options) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(NAME, **dict(TINY_MOE, **options)).eval()


@pytest.mark.parametrize('router, quantize', [('expert choice', 'int4-experts'),
                                              ('token choice, prefix always, shared, G 2', 'int8')])
def test_one_qmoe_node_per_layer_computes_its_pytorch_reference(tmp_path, router, quantize):
    """The graph with QMoE nodes and everything else float32 (what export_onnx quantizes next) against the PyTorch
    model with the same quantized experts and tanh GELU: float32 rounding apart, for both routers and bit widths."""
    model = _model(**ROUTERS[router])
    bits, block = QMOE_EXPERT_BITS[quantize]
    _export(model, tmp_path / 'm.onnx', (32, 32), 18, False, None, 2 ** 40, True, qmoe=(bits, block))
    recorded = read_metadata(tmp_path / 'm.onnx')
    assert {k: recorded[k] for k in ('expert_kernel', 'expert_bits', 'expert_block_size', 'expert_gelu')} == dict(
        expert_kernel='qmoe', expert_bits=bits, expert_block_size=block or None, expert_gelu='tanh')
    graph = onnx.load(str(tmp_path / 'm.onnx'))
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count('QMoE') == 2  # one per MoE block (blocks 2 and 3)
    weights = {i.name for i in graph.graph.initializer}
    assert not any('.mlp.experts.' in w for w in weights)  # the routed experts only as QMoE's packed codes
    assert sum('.mlp.shared_experts.' in w for w in weights) == (4 if 'shared' in router else 0)  # standard ops
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = qmoe_reference(model, bits, block)(x).numpy()
        float_model = model(x).numpy()
    got = OnnxClassifier(tmp_path / 'm.onnx')(x.numpy())
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= 1e-4 * scale
    assert 0 < np.abs(want - float_model).max() <= 0.1 * scale  # quantized experts, tanh GELU: near, not equal


@pytest.mark.parametrize('bits, block', [(8, 0), (4, 32)])
def test_packed_codes_dequantize_to_the_reference_weights(bits, block):
    """QMoE's layout: [E, out, in] codes with zero point 2^(bits-1), two 4-bit codes per byte (even input in the low
    nibble), scales per output channel or per block of inputs; within half a step of the float weights."""
    weight = torch.randn(3, 64, 40)  # [E, in, out]
    codes, scales, dequantized = pack_linear(weight, bits, block)
    assert codes.dtype == torch.uint8 and codes.shape == (3, 40, 64 * bits // 8)
    assert scales.shape == ((3, 40) if not block else (3, 40, 64 // block))
    if bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(3, 40, 64)  # low nibble first
    per_input = scales[..., None] if not block else scales.repeat_interleave(block, dim=-1)  # [E, out, in]
    unpacked = ((codes.float() - 2 ** (bits - 1)) * per_input).transpose(1, 2)
    torch.testing.assert_close(unpacked, dequantized)
    assert (dequantized - weight).abs().max() <= per_input.max() / 2 + 1e-6


@pytest.mark.parametrize('model_args, options, expected', [
    (dict(router='soft'), dict(quantize='int8'), 'is a Soft MoE layer'),
    ({}, dict(quantize=None), "expert_kernel='qmoe' computes quantized experts: give quantize='int8'"),
    ({}, dict(quantize='int8', expose_routing=True), r'has no per-slot expert outputs to expose (expose_routing)'),
    ({}, dict(quantize='int8', expert_kernel='fused'), "expert_kernel='fused' is not known; accepted: matmul, qmoe"),
    ({}, dict(quantize='int4-experts', expert_kernel='matmul'), "quantize='int4-experts' needs expert_kernel='qmoe'"),
    ({}, dict(quantize='int2'), "quantize='int2' is not known"),
], ids=['soft', 'float', 'debug', 'kernel', 'int4-matmul', 'int2'])
def test_what_qmoe_cannot_express_is_refused_naming_it(tmp_path, model_args, options, expected):
    options = dict(dict(expert_kernel='qmoe'), **options)
    with pytest.raises(OnnxExportError, match=expected.replace('(', r'\(').replace(')', r'\)')):
        export_onnx(_model(**model_args), tmp_path / 'x.onnx', **options)
    assert not list(tmp_path.iterdir())  # refused before anything is written


@pytest.mark.parametrize('name, bank', [('eva02_s14_moe_upcycled', 'ExpertGluMlps'),
                                        ('vit_b16_clip_moe_upcycled', 'QuickGELU')])
def test_expert_banks_without_a_qmoe_form_are_refused_naming_the_layer(tmp_path, name, bank):
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_experts=4, moe_blocks=1)
    model = timm.create_model(name, **dict(args, ref_feat_shape=(4, 4)) if 'eva' in name else args).eval()
    with pytest.raises(OnnxExportError, match=f'blocks.1.mlp: .*{bank}.* has no QMoE form; accepted with'):
        export_onnx(model, tmp_path / 'x.onnx', quantize='int8', expert_kernel='qmoe')


def test_debug_output_keeps_the_qmoe_graph_before_the_rest_is_quantized(tmp_path):
    """export_onnx(expert_kernel='qmoe', debug_output=...) keeps the float-rest graph the file was quantized from:
    QMoE nodes, no int8 elsewhere, and it computes qmoe_reference (what the export command checks tightly)."""
    model = _model()
    path = export_onnx(model, tmp_path / 'q.onnx', quantize='int4-experts', expert_kernel='qmoe',
                       debug_output=tmp_path / 'rest_float.onnx')
    deployed, kept = (onnx.load(str(p)) for p in (path, tmp_path / 'rest_float.onnx'))
    for graph in (deployed, kept):
        assert [n.op_type for n in graph.graph.node].count('QMoE') == 2
    assert 'MatMulInteger' in {n.op_type for n in deployed.graph.node}
    assert not {'MatMulInteger', 'DynamicQuantizeLinear'} & {n.op_type for n in kept.graph.node}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['q.onnx', 'rest_float.onnx']  # no stale float file
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = qmoe_reference(model, *QMOE_EXPERT_BITS['int4-experts'])(x).numpy()
    got = OnnxClassifier(tmp_path / 'rest_float.onnx')(x.numpy())
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_the_export_command_checks_a_qmoe_file_end_to_end(tmp_path):
    common = ['export/onnx_export.py', '--model', NAME, '--output', str(tmp_path / 'q.onnx'), '--model-kwargs',
              '{img_size: 32, patch_size: 8, embed_dim: 64, depth: 4, num_heads: 2, num_experts: 4}',
              '--num-classes', '10', '--quantize']
    rc, out, err = run_front_end(*common, 'int8', '--expert-kernel', 'qmoe', '--batch-sizes', '3')
    assert rc == 0, err
    assert 'experts in one QMoE node per MoE layer (8-bit experts, per channel, tanh GELU)' in out
    assert out.count(' of max |logit|): ok') == 1  # end to end against the reference
    assert out.count('QMoE nodes, the rest float32: batch   3: ') == 1 and out.count('allowed 0.001): ok') == 1
    assert read_metadata(tmp_path / 'q.onnx')['expert_kernel'] == 'qmoe'
    assert 'QMoE' in {n.op_type for n in onnx.load(str(tmp_path / 'q.onnx')).graph.node}
    rc, out, err = run_front_end(*common, 'int4-experts')
    assert rc == 2 and out == '' and len(err.splitlines()) == 1 and "needs expert_kernel='qmoe'" in err
