"""ONNX export: static capacity, every expert in the graph, ORT parity at several batch sizes, external data,
accuracy in ONNX Runtime equal to PyTorch's, clear errors."""
import copy
import subprocess
import sys

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import numpy_helper

import vit_moe

from vit_moe.onnx import (
    OnnxClassifier, OnnxExportError, check_onnx_parity, default_providers, evaluate_onnx, export_onnx, read_metadata,
)
from vit_moe.onnx.export import ROUTING_KINDS
from vit_moe.onnx.metadata import ROUTING_OUTPUTS_KEY
from vit_moe.training import validate

from conftest import ROOT, TINY_MOE, TRAIN_MOE, make_image_folder, tiny_config


@pytest.mark.parametrize('router', ['expert_choice', 'token_choice'])
def test_export_is_exact_at_several_batch_sizes_with_every_expert_and_no_nonzero(tmp_path, router):
    torch.manual_seed(0)
    model = timm.create_model('vit_ti16_moe_upcycled', router=router, **TINY_MOE).eval()
    path = export_onnx(model, tmp_path / 'moe.onnx')
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    assert not ops & {'NonZero', 'Loop', 'If', 'Unique', 'Compress', 'ScatterND'}
    assert 'TopK' in ops
    # every expert's weights are in the graph, bit for bit
    initializers = [numpy_helper.to_array(t) for t in graph.initializer]
    for block in model.blocks[2:]:
        fc1 = block.mlp.experts.fc1.weight.detach().numpy()
        assert fc1.shape[0] == 4
        assert any(t.shape == fc1.shape and np.array_equal(t, fc1) for t in initializers)
    results = check_onnx_parity(model, path, batch_sizes=(1, 3, 8))
    for batch, r in results.items():
        assert r['max_abs_diff'] < 1e-4, (batch, r)
        assert r['top1_agreement'] == 1.0


def test_external_data_is_written_beside_the_model_above_the_threshold(tmp_path):
    model = timm.create_model('vit_ti16_moe_upcycled', **TINY_MOE).eval()
    path = export_onnx(model, tmp_path / 'big.onnx', external_data_threshold=1000)
    data = tmp_path / 'big.onnx.data'
    assert data.is_file() and data.stat().st_size > path.stat().st_size
    weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert data.stat().st_size >= 0.9 * weight_bytes
    assert check_onnx_parity(model, path, batch_sizes=(2,))[2]['max_abs_diff'] < 1e-4
    small = export_onnx(model, tmp_path / 'small.onnx')
    assert not (tmp_path / 'small.onnx.data').exists() and small.stat().st_size >= 0.9 * weight_bytes


def test_fp16_export_is_checked_layer_by_layer_and_leaves_the_model_in_float32(tmp_path):
    model = timm.create_model('vit_ti16_moe_upcycled', **TINY_MOE).eval()
    debug = tmp_path / 'half_debug.onnx'
    path = export_onnx(model, tmp_path / 'half.onnx', fp16=True, debug_output=debug)
    assert next(model.parameters()).dtype == torch.float32
    classifier = OnnxClassifier(path)
    assert classifier.dtype == np.float16
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x).numpy()
    got = classifier(x).astype(np.float32)
    # float16 keeps 11 significant bits: relative error ~1e-3 per op; the whole model stays within 1 % of the logits
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-2
    result = check_onnx_parity(copy.deepcopy(model).half(), debug, batch_sizes=(3,))[3]
    assert result['kind'] == 'fp16' and result['ok'] and result['routing_checked'] and result['num_non_ties'] == 0
    assert result['max_expert_error'] < 2e-3  # each expert within float16 rounding on its own inputs
    torch.testing.assert_close(torch.from_numpy(OnnxClassifier(debug)(x).astype(np.float32)),
                               torch.from_numpy(got), rtol=0, atol=1e-6)  # the debug export is the same graph


def test_the_deployed_file_is_its_debug_export_with_only_the_logits(tmp_path):
    """One trace gives both files: the debug export, and the deployed graph that keeps only what feeds the logits,
    with the weight names and logits of a plain export (int8: both quantized from the one float graph)."""
    torch.manual_seed(0)
    quantize = 'int8'
    model = timm.create_model('vit_ti16_moe_upcycled', router='token_choice', num_shared_experts=1,
                              **dict(TRAIN_MOE, moe_blocks=2)).eval()
    path = export_onnx(model, tmp_path / 'moe.onnx', quantize=quantize, debug_output=tmp_path / 'debug.onnx')
    plain = export_onnx(model, tmp_path / 'plain.onnx', quantize=quantize)
    deployed, debug, reference = (onnx.load(str(p)) for p in (path, tmp_path / 'debug.onnx', plain))
    assert [o.name for o in deployed.graph.output] == ['logits']
    assert len(debug.graph.output) == 1 + len(ROUTING_KINDS) * 2  # two MoE layers
    assert ROUTING_OUTPUTS_KEY in {p.key for p in debug.metadata_props}
    assert ROUTING_OUTPUTS_KEY not in {p.key for p in deployed.metadata_props}
    assert read_metadata(path)['expert_kernel'] == 'matmul'  # the default (tests/test_fused_experts.py: 'qmoe')
    weights = set(model.state_dict())  # the model's own names (folded constants are named by the exporter)
    named = [{i.name for i in m.graph.initializer} & weights for m in (deployed, reference)]
    assert named[0] == named[1] and 'cls_token' in named[0]
    needed = {'logits'}
    for node in reversed(deployed.graph.node):  # topological order: walk back from the logits
        if needed & set(node.output):
            needed |= set(node.input)
    assert all(needed & set(n.output) for n in deployed.graph.node), 'a node that feeds no logit is left'
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    logits = OnnxClassifier(path)(x)
    np.testing.assert_array_equal(logits, OnnxClassifier(plain)(x))
    np.testing.assert_array_equal(logits, OnnxClassifier(tmp_path / 'debug.onnx')(x))
    with pytest.raises(OnnxExportError, match='expose_routing and debug_output exclude each other'):
        export_onnx(model, tmp_path / 'x.onnx', expose_routing=True, debug_output=tmp_path / 'y.onnx')


def test_unsupported_input_size_is_refused_naming_both_sizes(tmp_path):
    model = timm.create_model('vit_ti16_moe_upcycled', **TINY_MOE)
    with pytest.raises(OnnxExportError, match=r'input size \(48, 48\) is not supported.*built for \(32, 32\)'):
        export_onnx(model, tmp_path / 'x.onnx', img_size=48)


def test_classifier_uses_the_cpu_provider_without_a_gpu_and_timm_preprocessing():
    assert default_providers()[-1] == 'CPUExecutionProvider'
    if not torch.cuda.is_available():
        assert default_providers() == ['CPUExecutionProvider']


def test_onnx_accuracy_equals_pytorch_on_an_image_folder(tmp_path):
    make_image_folder(tmp_path / 'data')
    summary = train(tmp_path)
    model_dir = summary['model_dir']
    from vit_moe.models import create_model_from_checkpoint
    model = create_model_from_checkpoint('vit_ti16_moe_upcycled', model_dir)
    path = export_onnx(model, tmp_path / 'trained.onnx')
    bad = tmp_path / 'data' / 'val' / 'class_1' / 'broken.png'
    bad.write_bytes(b'not an image')  # left out by both, never replaced by its neighbour
    onnx_result = evaluate_onnx(path, str(tmp_path / 'data'), num_workers=0, batch_size=4)
    torch_result = validate('vit_ti16_moe_upcycled', model_dir, str(tmp_path / 'data'), num_workers=0, batch_size=4)
    assert onnx_result['num_samples'] == torch_result['num_samples'] == 15
    assert onnx_result['excluded'] == torch_result['excluded'] == [str(bad)]
    assert onnx_result['top1'] == torch_result['top1']
    assert onnx_result['loss'] == pytest.approx(torch_result['loss'], abs=1e-4)
    # the classifier's own preprocessing of PIL images matches timm's eval transform
    from PIL import Image
    image = Image.open(next((tmp_path / 'data' / 'val' / 'class_0').glob('*.png')))
    classifier = OnnxClassifier(path)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        expected = model(transform(image.convert('RGB')).unsqueeze(0)).numpy()
    np.testing.assert_allclose(classifier.predict([image]), expected, atol=1e-4)


def train(tmp_path):
    from vit_moe.training import train as run
    return run(tiny_config(tmp_path, steps=6, model_kwargs=TRAIN_MOE))


def test_export_command_line_names_a_missing_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, 'export/onnx_export.py', '--model', 'vit_ti16_moe_upcycled', '--output',
         str(tmp_path / 'x.onnx'), '--checkpoint', str(tmp_path / 'missing.safetensors')],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert f"checkpoint '{tmp_path}/missing.safetensors' does not exist" in result.stderr


def test_export_and_parity_leave_the_callers_model_in_its_mode(tmp_path):
    model = timm.create_model('vit_ti16_moe_upcycled', **TINY_MOE).train()
    path = export_onnx(model, tmp_path / 'm.onnx')
    assert model.training  # put back in train mode after an eval-mode export
    results = check_onnx_parity(model, path, batch_sizes=(2,))
    assert model.training and results[2]['max_abs_diff'] < 1e-4


def test_provider_preference_and_session_options(monkeypatch):
    from vit_moe.onnx import runtime
    all_three = ['TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider']
    monkeypatch.setattr(runtime.ort, 'get_available_providers', lambda: all_three)
    monkeypatch.setattr(runtime, '_gpu_present', lambda: True)
    monkeypatch.setattr(runtime, '_tensorrt_loadable', lambda: False)  # onnxruntime-gpu lists it regardless
    assert runtime.default_providers() == all_three[1:] == runtime.default_providers(tensorrt=True)
    monkeypatch.setattr(runtime, '_tensorrt_loadable', lambda: True)
    assert runtime.default_providers() == all_three[1:]  # TensorRT only when asked for
    assert runtime.default_providers(tensorrt=True) == all_three
    monkeypatch.setattr(runtime, '_gpu_present', lambda: False)  # onnxruntime-gpu installed, no GPU
    assert runtime.default_providers() == ['CPUExecutionProvider']
    options = runtime.session_options(threads=3, optimization='extended')
    assert options.intra_op_num_threads == 3
    assert options.graph_optimization_level == runtime.ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with pytest.raises(ValueError, match="optimization='fast' is not valid; accepted: disable, basic, extended, all"):
        runtime.session_options(optimization='fast')


def test_multithreaded_onnx_runtime_gives_every_token_all_its_experts(tmp_path):
    """ONNX Runtime's CPU ScatterND(reduction='add') races on repeated indices with more than one thread
    (microsoft/onnxruntime#18048): a graph combining experts with it loses updates at random. The exported combine
    is a matmul: repeated multi-threaded runs equal each other and PyTorch."""
    torch.manual_seed(0)
    model = timm.create_model('vit_ti16_moe_upcycled', img_size=224, patch_size=16, embed_dim=64, depth=2,
                              num_heads=2, num_classes=10, num_experts=8, moe_blocks=1,
                              expert_init='random').eval()
    path = export_onnx(model, tmp_path / 'moe.onnx', expose_routing=True)
    assert 'ScatterND' not in {node.op_type for node in onnx.load(str(path)).graph.node}
    classifier = OnnxClassifier(path, threads=2)
    x = torch.randn(16, 3, 224, 224)
    runs = [classifier.session.run(None, {classifier.input.name: x.numpy()}) for _ in range(8)]
    names = [o.name for o in classifier.session.get_outputs()]
    layer_outputs = [torch.from_numpy(r[names.index('blocks.1.mlp/output')]) for r in runs]  # [16, 197, 64]
    for out in layer_outputs:
        torch.testing.assert_close(out, layer_outputs[0], rtol=0, atol=1e-6)
    with torch.no_grad(), vit_moe.capture_routing(keep_tensors=True) as routing:
        model(x)
    (_, layer), = routing.tensors
    torch.testing.assert_close(layer_outputs[0], layer.output, rtol=1e-4, atol=1e-5)


def test_io_binding_waits_for_torchs_stream_and_runs_on_the_sessions_gpu(tmp_path, monkeypatch):
    """The CUDA IO-binding path without a GPU: ONNX Runtime must read the input only after torch's stream finished
    writing it, and bind input and output on the GPU the session runs on (not cuda:0 whatever the tensor's device)."""
    from vit_moe.onnx import runtime
    path = export_onnx(timm.create_model('vit_ti16_moe_upcycled', **TINY_MOE).eval(), tmp_path / 'm.onnx')
    classifier = OnnxClassifier(path)
    classifier.device_id, events, outputs = 1, [], classifier.session.get_outputs()

    class Binding:
        def bind_input(self, name, device, device_id, dtype, shape, pointer):
            events.append(('bind_input', device, device_id, shape))

        def bind_output(self, name, device, device_id):
            events.append(('bind_output', device, device_id))

        def copy_outputs_to_cpu(self):
            return [np.zeros((2, 10), np.float32)]

    class Stream:
        def synchronize(self):
            events.append(('synchronize',))

    class Session:  # stands in for a CUDA session
        def io_binding(self):
            return Binding()

        def run_with_iobinding(self, binding):
            events.append(('run',))

        def get_outputs(self):
            return outputs

    images = torch.randn(2, 3, 32, 32)
    monkeypatch.setattr(classifier, 'session', Session())
    monkeypatch.setattr(torch.Tensor, 'to', lambda self, *args, **kwargs: events.append(('to', args)) or self)
    monkeypatch.setattr(runtime.torch.cuda, 'current_stream', lambda device=None: events.append(('stream', device))
                        or Stream())
    classifier._run_bound(images)
    kinds = [e[0] for e in events]
    assert kinds.index('synchronize') < kinds.index('run') and kinds.index('to') < kinds.index('synchronize')
    assert ('to', (torch.device('cuda', 1), torch.float32)) in events and ('stream', torch.device('cuda', 1)) in events
    assert ('bind_input', 'cuda', 1, (2, 3, 32, 32)) in events and ('bind_output', 'cuda', 1) in events
