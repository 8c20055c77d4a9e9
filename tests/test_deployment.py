"""Deployment: capacity as an inference-time knob (export, validation, routing report), Triton model repositories
(checked with Triton's own protobuf), and why dynamic batching is exact (an image's logits never depend on its
batch-mates, in ONNX Runtime too)."""
import json

import numpy as np
import onnx
import pytest
import timm
import torch

from vit_moe.layers import capacity_factors, set_capacity_factor
from vit_moe.models import save_trained_model

from conftest import TINY_MOE, make_image_folder, run_front_end

NAME = 'vit_ti16_moe_upcycled'


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """A saved 3-class tiny MoE model (random weights) and image folders."""
    root = tmp_path_factory.mktemp('deploy')
    torch.manual_seed(0)
    model = timm.create_model(NAME, **dict(TINY_MOE, num_classes=3)).eval()
    save_trained_model(model, root / 'model', label_names=['class_0', 'class_1', 'class_2'])
    make_image_folder(root / 'data', size=32)
    return root


def test_set_capacity_factor_changes_the_slots_and_refuses_what_has_none():
    torch.manual_seed(0)
    model = timm.create_model(NAME, **TINY_MOE).eval()  # 17 tokens, 4 experts, C = 2: 9 slots
    assert capacity_factors(model) == {'blocks.2.mlp': 2.0, 'blocks.3.mlp': 2.0}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        assert set_capacity_factor(model, {'blocks.3.mlp': 0.5}) == {'blocks.3.mlp': 0.5}
        assert model.blocks[3].mlp.router.capacity(17) == 3 and model.blocks[2].mlp.router.capacity(17) == 9
        assert not torch.allclose(model(x), before)
        set_capacity_factor(model, 4.0)  # C = E: every expert takes every token
    assert model.blocks[2].mlp.router.capacity(17) == 17
    # full capacity reproduces the dense model: an upcycled copy at C = E computes what its dense source computes
    from vit_moe import upcycle
    dense = timm.create_model('vit_tiny_patch16_224', **{k: v for k, v in TINY_MOE.items() if k != 'num_experts'})
    upcycled = upcycle(dense.eval(), num_experts=4, moe_blocks=2).eval()
    set_capacity_factor(upcycled, 4.0)
    with torch.no_grad():
        torch.testing.assert_close(upcycled(x), dense(x), rtol=1e-5, atol=1e-5)
        set_capacity_factor(upcycled, 1.0)
        assert not torch.allclose(upcycled(x), dense(x), atol=1e-5)  # with fewer slots, tokens are left out
    with pytest.raises(ValueError, match=r"capacity factor for blocks\.9\.mlp: not an MoE layer .* accepted: blocks\.2"):
        set_capacity_factor(model, {'blocks.9.mlp': 1.0})
    soft = timm.create_model(NAME, **dict(TINY_MOE, router='soft'))
    with pytest.raises(ValueError, match=r"blocks\.2\.mlp is a 'soft' layer, whose slots are parameters"):
        set_capacity_factor(soft, 1.0)


def test_export_with_a_capacity_factor_records_it_and_matches_pytorch_at_that_capacity(folder, tmp_path):
    from vit_moe.onnx import OnnxClassifier
    out = tmp_path / 'c1.onnx'
    rc, text, err = run_front_end('export/onnx_export.py', '--model', NAME, '--checkpoint', str(folder / 'model'),
                                  '--output', str(out), '--capacity-factor', '{blocks.3.mlp: 1.0}',
                                  '--batch-sizes', '2')
    assert rc == 0, text + err  # the parity check ran against PyTorch at the same capacity
    metadata = json.loads(dict((p.key, p.value) for p in onnx.load(str(out)).metadata_props)['timm_data_config'])
    assert metadata['capacity_factor'] == {'blocks.2.mlp': 2.0, 'blocks.3.mlp': 1.0}
    from vit_moe.models import create_model_from_checkpoint
    model = create_model_from_checkpoint(NAME, str(folder / 'model')).eval()
    set_capacity_factor(model, {'blocks.3.mlp': 1.0})
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(OnnxClassifier(out)(x), expected, atol=1e-4, rtol=1e-4)
    rc, _, err = run_front_end('export/onnx_export.py', '--model', NAME, '--output', str(tmp_path / 'x.onnx'),
                               '--capacity-factor', 'zero')
    assert rc == 2 and "'zero' is not a capacity factor; expected a number > 0" in err


def test_validate_and_the_routing_report_take_and_record_the_capacity_factor(folder, tmp_path):
    common = ['--model', NAME, '--checkpoint', str(folder / 'model'), '--data-dir', str(folder / 'data'),
              '--num-workers', '0', '--batch-size', '4']
    results = {}
    for c in ('2', '0.5'):
        rc, _, err = run_front_end('train_scripts/validate.py', *common, '--capacity-factor', c,
                                   '--json', str(tmp_path / f'{c}.json'))
        assert rc == 0, err
        results[c] = json.loads((tmp_path / f'{c}.json').read_text())
    assert results['0.5']['capacity_factor'] == {'blocks.2.mlp': 0.5, 'blocks.3.mlp': 0.5}
    assert results['0.5']['loss'] != results['2']['loss']  # fewer slots: another computation
    rc, _, err = run_front_end('train_scripts/routing_report.py', '--model', NAME, '--checkpoint',
                               str(folder / 'model'), '--data-dir', str(folder / 'data'), '--output',
                               str(tmp_path / 'report'), '--capacity-factor', '1.0', '--no-progress',
                               '--num-workers', '0')
    assert rc == 0, err
    report = json.loads((tmp_path / 'report' / 'report.json').read_text())
    assert report['capacity_factor'] == {'blocks.2.mlp': 1.0, 'blocks.3.mlp': 1.0}
    assert report['layers']['blocks.3.mlp']['capacity'] == 5  # ceil(1.0 x 17 / 4)
    text = (tmp_path / 'report' / 'report.md').read_text()
    assert 'capacity factor 1' in text and 'input 32x32' in text and '{r[' not in text


@pytest.fixture(scope='module')
def file_at_c1(folder, tmp_path_factory):
    """The saved model exported at capacity factor 1 (the library call, no parity run)."""
    from vit_moe.models import create_model_from_checkpoint
    from vit_moe.onnx import export_onnx
    model = create_model_from_checkpoint(NAME, str(folder / 'model'), capacity_factor=1.0).eval()
    return export_onnx(model, tmp_path_factory.mktemp('c1') / 'model_c1.onnx', check=False)


def test_validate_reads_an_onnx_files_capacity_and_refuses_another_naming_the_export_that_makes_it(
        folder, file_at_c1, tmp_path):
    common = ['--onnx', str(file_at_c1), '--data-dir', str(folder / 'data'), '--num-workers', '0',
              '--batch-size', '4']
    rc, _, err = run_front_end('train_scripts/validate.py', *common, '--capacity-factor', '0.5')
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f'{file_at_c1} was exported at capacity factor 1' in err and 'for 0.5 export one: python ' \
        'export/onnx_export.py --model vit_ti16_moe_upcycled' in err and '--capacity-factor "0.5"' in err
    for flag, value in (('--mixed-precision', 'bf16'), ('--expert-parallel-size', '2')):
        rc, _, err = run_front_end('train_scripts/validate.py', *common, flag, value)
        assert rc == 2 and f'{flag} {value} does not apply to --onnx' in err, err
    rc, _, err = run_front_end('train_scripts/validate.py', *common, '--model', 'vit_tiny_patch16_224')
    assert rc == 2 and 'was exported from a vit_ti16_moe_upcycled; --model vit_tiny_patch16_224 names another' in err
    # no --model: the folder's config.json names it; the PyTorch reference runs at the file's capacity
    for extra in ([], ['--capacity-factor', '1']):
        rc, out, err = run_front_end('train_scripts/validate.py', *common, '--checkpoint', str(folder / 'model'),
                                     *extra, '--json', str(tmp_path / 'onnx.json'))
        assert rc == 0, err
        assert 'capacity factor 1 (the file\'s)' in out
        result = json.loads((tmp_path / 'onnx.json').read_text())
        assert result['capacity_factor'] == {'blocks.2.mlp': 1.0, 'blocks.3.mlp': 1.0}
        assert result['top1_agreement'] == 1.0
    from vit_moe.training import validate
    at_c1 = validate(NAME, str(folder / 'model'), str(folder / 'data'), num_workers=0, batch_size=4,
                     capacity_factor=1.0)
    assert result['reference_top1'] == pytest.approx(at_c1['top1'], abs=1e-4)  # PyTorch at the file's capacity


def test_a_model_folder_names_its_architecture_to_validate_and_to_a_mismatched_loader(folder, tmp_path):
    from vit_moe.models import CheckpointMismatchError, create_model_from_checkpoint
    rc, out, err = run_front_end('train_scripts/validate.py', '--checkpoint', str(folder / 'model'), '--data-dir',
                                 str(folder / 'data'), '--num-workers', '0', '--batch-size', '4')
    assert rc == 0 and out.startswith(f'{NAME} on '), err
    arch = {k: v for k, v in TINY_MOE.items() if k != 'num_classes'}
    with pytest.raises(CheckpointMismatchError, match=f"says it holds a {NAME}, not a eva02_s14_moe_upcycled"):
        create_model_from_checkpoint('eva02_s14_moe_upcycled', str(folder / 'model'), **arch)


def test_a_capacity_set_on_a_model_is_the_one_it_saves_and_reloads_with(folder, tmp_path):
    from vit_moe.models import create_model_from_checkpoint
    model = create_model_from_checkpoint(NAME, str(folder / 'model')).eval()
    assert set_capacity_factor(model, 0.5) == {'blocks.2.mlp': 0.5, 'blocks.3.mlp': 0.5}
    assert model.moe_config.capacity_factor == 0.5
    set_capacity_factor(model, {'blocks.3.mlp': 1.0})
    assert model.moe_config.layer_capacity_factors == {'blocks.3.mlp': 1.0}
    save_trained_model(model, tmp_path / 'saved')
    saved = json.loads((tmp_path / 'saved' / 'config.json').read_text())['model_args']
    assert saved['capacity_factor'] == 0.5 and saved['layer_capacity_factors'] == {'blocks.3.mlp': 1.0}
    reloaded = create_model_from_checkpoint(NAME, str(tmp_path / 'saved')).eval()
    assert capacity_factors(reloaded) == {'blocks.2.mlp': 0.5, 'blocks.3.mlp': 1.0}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match='has no MoE layer'):
        create_model_from_checkpoint('vit_tiny_patch16_224', None, capacity_factor=1.0, **{
            k: v for k, v in TINY_MOE.items() if k != 'num_experts'})


def test_the_benchmark_times_the_capacity_it_is_given_and_never_reuses_a_file_made_at_another(tmp_path):
    def file_capacity():
        props = {p.key: p.value for p in onnx.load(str(tmp_path / 'moe.fp32.onnx')).metadata_props}
        return json.loads(props['timm_data_config'])['capacity_factor']

    common = ['--moe', NAME, '--dense', 'vit_tiny_patch16_224', '--model-kwargs',
              json.dumps({k: v for k, v in TINY_MOE.items() if k != 'num_experts'}), '--moe-kwargs',
              '{num_experts: 4}', '--batch-sizes', '1', '--rounds', '1', '--warmup', '0', '--variants', 'fp32',
              '--no-pytorch', '--gap-ms', '0', '--onnx-dir', str(tmp_path)]
    written = []
    for c, reuse in (('0.5', []), ('1.0', ['--reuse']), ('1.0', ['--reuse'])):
        rc, _, err = run_front_end('export/onnx_benchmark.py', *common, *reuse, '--capacity-factor', c,
                                   '--json', str(tmp_path / 'result.json'))
        assert rc == 0, err
        assert json.loads((tmp_path / 'result.json').read_text())['capacity_factor'] == float(c)
        assert file_capacity() == {'blocks.2.mlp': float(c), 'blocks.3.mlp': float(c)}
        written.append((tmp_path / 'moe.fp32.onnx').stat().st_mtime_ns)
    assert written[1] != written[0] and written[2] == written[1]  # made again at 1.0, then reused


def test_a_triton_repository_parses_with_tritons_model_config(folder, tmp_path):
    pytest.importorskip('tritonclient')
    from vit_moe.onnx.triton import triton_config_text, triton_model_config
    out = tmp_path / 'model.onnx'
    rc, text, err = run_front_end('export/onnx_export.py', '--model', NAME, '--checkpoint', str(folder / 'model'),
                                  '--output', str(out), '--quantize', 'int8', '--batch-sizes', '2',
                                  '--triton-repo', str(tmp_path / 'repo'), '--triton-max-batch-size', '16')
    assert rc == 0, text + err
    config = triton_model_config((tmp_path / 'repo' / 'model' / 'config.pbtxt').read_text())
    assert config.platform == 'onnxruntime_onnx' and config.max_batch_size == 16
    assert [(i.name, list(i.dims)) for i in config.input] == [('images', [3, 32, 32])]
    assert [(o.name, list(o.dims)) for o in config.output] == [('logits', [3])]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    assert (tmp_path / 'repo' / 'model' / '1' / 'model.onnx').read_bytes() == out.read_bytes()
    gpu = triton_model_config(triton_config_text(out, 'gpu', gpu=True, threads=2))
    assert gpu.instance_group[0].kind == gpu.instance_group[0].KIND_GPU
    assert gpu.optimization.execution_accelerators.gpu_execution_accelerator[0].name == 'tensorrt'
    from google.protobuf.text_format import ParseError
    with pytest.raises(ParseError, match='max_batch_size'):  # Triton's parser catches a malformed config
        triton_model_config('platform: "onnxruntime_onnx" max_batch_size: "many"')


def test_a_repository_for_a_file_with_external_data_carries_its_data(folder, tmp_path):
    from vit_moe.models import create_model_from_checkpoint
    from vit_moe.onnx import OnnxClassifier, export_onnx
    from vit_moe.onnx.triton import write_triton_repository
    model = create_model_from_checkpoint(NAME, str(folder / 'model')).eval()
    path = export_onnx(model, tmp_path / 'big.onnx', external_data=True)
    copied = write_triton_repository(path, tmp_path / 'repo', name='big') / '1'
    assert (copied / 'big.onnx.data').is_file()
    x = np.zeros((1, 3, 32, 32), np.float32)
    np.testing.assert_array_equal(OnnxClassifier(copied / 'model.onnx')(x), OnnxClassifier(path)(x))


@pytest.mark.parametrize('options', [{}, dict(router='token_choice'), dict(router='soft', slots_per_expert=3)],
                         ids=['expert choice', 'token choice', 'soft'])
def test_dynamic_batching_is_exact_in_float_an_images_logits_never_depend_on_its_batch_mates(tmp_path, options):
    """What makes Triton's dynamic batching exact here: in ONNX Runtime, each image alone, and the same images
    batched with others in any order, give the same float32 logits. int8 files are not exact: ONNX Runtime's
    dynamic quantization takes one activation scale per tensor, over every image of the batch (the dense int8 model
    alike): an image's logits move by that rounding, here within 5 % of the largest logit."""
    from vit_moe.onnx import OnnxClassifier, export_onnx, quantize_onnx
    torch.manual_seed(0)
    model = timm.create_model(NAME, **dict(TINY_MOE, **options)).eval()
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    float_file = export_onnx(model, tmp_path / 'm.onnx')
    quantize_onnx(float_file, tmp_path / 'm.int8.onnx', 'int8')  # what export_onnx(quantize='int8') writes
    for path, atol in ((float_file, 1e-5), (tmp_path / 'm.int8.onnx', None)):
        session = OnnxClassifier(path)
        batched = session(x)
        alone = np.concatenate([session(x[i:i + 1]) for i in range(5)])
        shuffled = session(x[[3, 0, 4, 1, 2]])
        if atol is None:  # int8: rounding of a per-batch activation scale
            atol = 0.05 * float(np.abs(batched).max())
        np.testing.assert_allclose(batched, alone, rtol=0, atol=atol)
        np.testing.assert_allclose(shuffled, batched[[3, 0, 4, 1, 2]], rtol=0, atol=atol)
