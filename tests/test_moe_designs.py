"""The MoE designs after 2022: Soft MoE (router='soft'), shared experts (num_shared_experts) and fine-grained
upcycled experts (expert_granularity): their defining properties, exact upcycling where one exists, the refusals,
and each through create / train / save / reload / ONNX fp32 + int8."""
import copy
import math
import pickle

import numpy as np
import pytest
import timm
import torch
from hypothesis import given, settings, strategies as st
from timm.layers import GluMlp, Mlp, SwiGLU

from vit_moe import MoeMlp, capture_routing, moe_layer_like, upcycle
from vit_moe.analysis import routing_report
from vit_moe.layers import SoftMoeMlp, SoftRouter
from vit_moe.layers.moe_config import expert_choice_slots
from vit_moe.layers.soft_moe import SoftRouting, slot_similarity
from vit_moe.models import create_model_from_checkpoint, save_trained_model
from vit_moe.onnx import OnnxExportError, check_onnx_parity, export_onnx, quantize_onnx
from vit_moe.training import load_config, train, validate

from conftest import launch_processes, log_records, make_image_folder, run_front_end, run_script, tiny_dense

DENSE_MLPS = {  # one of each bank
    'Mlp': lambda: Mlp(16, 64),
    'GluMlp': lambda: GluMlp(16, 128, act_layer=torch.nn.SiLU, gate_last=False),
    'SwiGLU': lambda: SwiGLU(16, 64),
}


def _full_capacity(E, G=1, router='expert_choice'):
    """Options that fill every slot: C = E / G (expert choice) or top_k = E / G (token choice)."""
    if router == 'token_choice':
        return dict(router=router, top_k=E // G, capacity_factor=1.0)
    return dict(capacity_factor=E / G)


@pytest.mark.parametrize('mlp', list(DENSE_MLPS))
@pytest.mark.parametrize('design', ['shared', 'fine_grained', 'both', 'fine_grained_token_choice'])
def test_shared_and_fine_grained_upcycling_computes_the_dense_mlp_with_every_slot_filled(mlp, design):
    torch.manual_seed(0)
    dense = DENSE_MLPS[mlp]().eval()
    E, G, S = 8, {'shared': 1}.get(design, 4), 0 if design.startswith('fine') else 2
    router = 'token_choice' if design.endswith('token_choice') else 'expert_choice'
    layer = moe_layer_like(dense, num_experts=E, num_shared_experts=S, expert_granularity=G,
                            **_full_capacity(E, G, router)).eval()
    model = torch.nn.Sequential()  # conversion works on any module holding MoE layers
    model.add_module('mlp', layer)
    from vit_moe.models.conversion import convert_dense_to_moe
    layer.load_state_dict({k[len('mlp.'):]: v for k, v in convert_dense_to_moe(
        {f'mlp.{k}': v for k, v in dense.state_dict().items()}, model).items()})
    assert layer.experts.hidden_features * G == (dense.fc2.in_features)
    x = torch.randn(3, 11, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
        if G > 1:  # a single slice is not the MLP: the groups split it
            assert not torch.allclose(layer.experts(x.reshape(1, 33, 16).expand(E, -1, -1))[0] * G,
                                      dense(x).reshape(33, 16), atol=1e-3)


@settings(deadline=None, max_examples=30)
@given(tokens=st.integers(4, 300), whole=st.sampled_from([4, 8, 16, 32]), G=st.sampled_from([1, 2, 4, 8]),
       factor=st.sampled_from([0.5, 1.0, 2.0]))
def test_fine_grained_capacity_keeps_the_flops_per_token_of_whole_experts(tokens, whole, G, factor):
    """E = whole * G experts of H / G hidden units with capacity ceil(C * G * T / E) cost what `whole` experts of H
    units with capacity ceil(C * T / whole) cost, up to the rounding of one slot per expert."""
    E, H = whole * G, 64
    layer = moe_layer_like(Mlp(16, H), num_experts=E, capacity_factor=factor, expert_granularity=G)
    fine = E * layer.router.capacity(tokens) * (H // G)
    coarse = whole * expert_choice_slots(tokens, 0, whole, factor) * H
    assert layer.experts.hidden_features == H // G
    assert abs(fine - coarse) <= E * (H // G) or coarse == whole * tokens * H  # capacity clamps at T tokens


def test_fine_grained_virtual_groups_sum_their_probabilities_to_one_each():
    layer = moe_layer_like(Mlp(16, 64), num_experts=8, expert_granularity=4)
    probs = layer.router(torch.randn(2, 5, 16)).probs  # [B, T, E]
    torch.testing.assert_close(probs.view(2, 5, 4, 2).sum(-1), torch.ones(2, 5, 4))


@pytest.mark.parametrize('options, error, message', [
    (dict(expert_granularity=3), ValueError,
     'expert_granularity=3 is not valid; expected an integer >= 1 that divides num_experts=8'),
    (dict(expert_granularity=8, num_experts=8, mlp=Mlp(16, 60)), ValueError,
     'expert_granularity=8 does not divide the 60 hidden units of Mlp'),
    (dict(expert_granularity=2, mlp=SwiGLU(16, 64, norm_layer=torch.nn.LayerNorm)), TypeError,
     'an MLP with a hidden norm cannot be split into fine-grained experts'),
    (dict(expert_granularity=2, router='soft'), ValueError,
     "expert_granularity=2 has no meaning with router='soft' (it applies to router expert_choice / token_choice)"),
    (dict(num_shared_experts=-1), ValueError, 'num_shared_experts=-1 is not valid; expected an integer >= 0'),
    (dict(router='soft', slots_per_expert=0), ValueError, 'slots_per_expert=0 is not valid; expected an integer >= 1'),
    (dict(router='soft', soft_scale=0.0), ValueError, 'soft_scale=0.0 is not valid; expected a number > 0'),
])
def test_impossible_design_options_are_named(options, error, message):
    options = dict(options)
    mlp = options.pop('mlp', Mlp(16, 64))
    with pytest.raises(error) as err:
        moe_layer_like(mlp, num_experts=options.pop('num_experts', 8), **options)
    assert message in str(err.value)


def _soft_reference(x, mu, scale, experts, E, S):
    """Soft MoE as the paper writes it (vmoe's SoftRouter), one image at a time, with einsums."""
    out = []
    for image in x:  # [T, D]
        tokens = image / torch.sqrt(image.square().sum(-1, keepdim=True) + 1e-6)
        slots_mu = mu / torch.sqrt(mu.square().sum(-1, keepdim=True) + 1e-6)  # [E*S, D]
        logits = torch.einsum('td,nd->tn', tokens, slots_mu) * scale  # [T, E*S]
        dispatch, combine = logits.softmax(0), logits.softmax(1)
        slots = torch.einsum('tn,td->nd', dispatch, image).view(E, S, -1)  # [E, S, D]
        slot_out = experts(slots).reshape(E * S, -1)
        out.append(torch.einsum('tn,nd->td', combine, slot_out))
    return torch.stack(out)


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 2 ** 16), E=st.integers(1, 6), S=st.integers(1, 3), tokens=st.integers(1, 12),
       scale=st.sampled_from([1.0, 10.0, 100.0]))
def test_soft_moe_is_the_reference_per_image_and_drops_nothing(seed, E, S, tokens, scale):
    torch.manual_seed(seed)
    layer = moe_layer_like(Mlp(16, 32), num_experts=E, router='soft', slots_per_expert=S, soft_scale=scale).eval()
    assert isinstance(layer, SoftMoeMlp) and isinstance(layer.router, SoftRouter)
    x = torch.randn(3, tokens, 16)
    with torch.no_grad(), capture_routing(keep_tensors=True) as capture:
        out = layer(x)
    routing = capture.tensors[0][1]
    expected = _soft_reference(x, layer.router.mu, scale, layer.experts, E, S)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # an image's output never depends on its batch-mates
        torch.testing.assert_close(layer(x[1:2]), out[1:2], rtol=1e-5, atol=1e-6)
    metrics = capture.layers[layer.layer_name]
    assert float(metrics['dropped_fraction']) == 0 and float(capture.aux_loss) == 0
    assert routing.token_index is None and 'token_index' not in SoftRouting._fields  # no slot holds one token
    assert 0 <= float(metrics['dispatch_entropy']) <= math.log(tokens) + 1e-4
    assert 0 <= float(metrics['combine_entropy']) <= math.log(E * S) + 1e-4


def test_soft_moe_output_scale_starts_at_one_since_its_combine_weights_sum_to_one():
    layer = moe_layer_like(Mlp(16, 32), num_experts=8, router='soft', output_scale=True)
    assert layer.output_scale.tolist() == [1.0]  # not E / C = 4: that would scale the start up four-fold


def test_soft_moe_trains_its_slots_and_scale_and_copies_after_a_forward():
    layer = moe_layer_like(Mlp(16, 32), num_experts=4, router='soft', slots_per_expert=2)
    with capture_routing():
        layer(torch.randn(2, 7, 16)).square().mean().backward()
    assert layer.router.mu.grad.abs().sum() > 0 and layer.router.scale.grad.abs() > 0
    assert layer.router.scale.shape == (1,)  # FSDP2 shards no 0-dim parameter
    clone = pickle.loads(pickle.dumps(copy.deepcopy(layer)))
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(clone(x), layer(x))


def test_upcycled_soft_moe_starts_from_the_measured_scale_and_registered_kwargs_reach_the_layers():
    dense = tiny_dense()
    moe = upcycle(dense, num_experts=4, router='soft', slots_per_expert=3)
    layer = moe.blocks[-1].mlp
    assert isinstance(layer, SoftMoeMlp) and layer.router.scale.item() == 100.0
    assert torch.equal(layer.experts.fc1.weight[2], dense.blocks[-1].mlp.fc1.weight.t())
    model = timm.create_model('vit_ti16_moe_upcycled', img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2,
                              num_experts=8, num_shared_experts=2, expert_granularity=4)
    layer = model.blocks[-1].mlp
    assert layer.shared_experts.fc1.weight.shape == (2, 64, 256) and layer.experts.fc1.weight.shape == (8, 64, 64)
    assert model.moe_config.num_shared_experts == 2 and model.moe_config.expert_granularity == 4


def test_the_debug_export_refuses_a_soft_moe_model_by_layer(tmp_path):
    moe = upcycle(tiny_dense(), num_experts=4, router='soft').eval()
    with pytest.raises(OnnxExportError, match=r'blocks.2.mlp is a Soft MoE layer: its slots mix all tokens'):
        export_onnx(moe, tmp_path / 'debug.onnx', expose_routing=True)


def test_slot_similarity_is_one_for_identical_slots_and_the_pairwise_cosine_mean_otherwise():
    torch.manual_seed(0)
    dispatch = torch.randn(2, 7, 5).softmax(dim=1)  # [B, T, N]
    unit = torch.nn.functional.normalize(dispatch.transpose(1, 2), dim=-1)  # [B, N, T]
    pairs = [(unit[b, i] * unit[b, j]).sum() for b in range(2) for i in range(5) for j in range(5) if i != j]
    torch.testing.assert_close(slot_similarity(dispatch), torch.stack(pairs).mean())
    same = dispatch[..., :1].expand(2, 7, 5)
    torch.testing.assert_close(slot_similarity(same), torch.tensor(1.0))


def test_routing_report_of_a_soft_moe_model_reports_mixes_that_a_direct_capture_confirms(tmp_path):
    data = make_image_folder(tmp_path / 'data', per_class=(2, 3), size=32)
    torch.manual_seed(0)
    model = upcycle(tiny_dense(num_classes=3), num_experts=4, router='soft', slots_per_expert=2,
                    soft_scale=3.0).eval()
    start = upcycle(tiny_dense(num_classes=3), num_experts=4, router='soft', slots_per_expert=2,
                    soft_scale=1.0).eval()
    result = routing_report(model, str(data), str(tmp_path / 'report'), start_model=start, progress=False)
    assert result['kind'] == 'soft' and result['num_images'] == 9 and list(result['layers']) == ['blocks.2.mlp',
                                                                                                   'blocks.3.mlp']
    layer = result['layers']['blocks.3.mlp']
    assert 1 <= layer['tokens_per_slot'] <= 17 and 1 <= layer['slots_per_token'] <= 8
    assert result['start_layers']['blocks.3.mlp']['tokens_per_slot'] > layer['tokens_per_slot']  # scale 1: flatter
    from vit_moe.data import ImageFolderDataset, build_transforms, data_config_for
    dataset = ImageFolderDataset(str(data), 'val', transform=build_transforms(data_config_for(model), None, False))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad(), capture_routing(keep_tensors=True) as capture:
        model(images)
    per_expert = dict(capture.tensors)['blocks.3.mlp'].probs  # [B, T, E]
    np.testing.assert_allclose(layer['expert_importance'], (per_expert.sum((0, 1)) / per_expert.sum()).numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(layer['dispatch_entropy'],
                               float(capture.layers['blocks.3.mlp']['dispatch_entropy']), rtol=1e-5)
    assert layer['tokens_by_category']['prefix'] == 9 and 'tokens per slot' in (tmp_path / 'report' /
                                                                               'report.md').read_text()


DESIGNS = {
    'soft': dict(router='soft', slots_per_expert=5),
    'shared': dict(num_shared_experts=1),
    'fine_grained': dict(num_experts=8, expert_granularity=2),
    'shared_token_choice': dict(num_shared_experts=1, router='token_choice'),
}


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp('designs')
    data = make_image_folder(root / 'data', per_class=(6, 3), size=16)
    torch.manual_seed(0)
    dense = timm.create_model('vit_tiny_patch16_224', num_classes=3, img_size=16, patch_size=4, embed_dim=32,
                              depth=2, num_heads=2)
    save_trained_model(dense, root / 'dense', label_names=['class_0', 'class_1', 'class_2'])
    return data, root / 'dense'


@pytest.mark.parametrize('design', list(DESIGNS))
def test_design_trains_saves_reloads_and_exports(design, sources, tmp_path):
    data, dense = sources
    kwargs = dict(dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_experts=4, moe_blocks=1),
                  **DESIGNS[design])
    cfg = load_config(None, dict(
        model='vit_ti16_moe_upcycled', pretrained=str(dense), model_kwargs=kwargs, data_dir=str(data),
        output_dir=str(tmp_path / 'run'), batch_size=6, num_workers=0, steps=3, lr=3e-3, warmup_steps=1, log_every=1,
        checkpoint_every=100, trackers='none', progress=False, hflip=0.0, scale=[0.8, 1.0], color_jitter=0.0,
        ema_decay=0.9 if design == 'soft' else None))
    logged = train(cfg)['eval']
    if design == 'soft':  # the EMA copy of a Soft MoE model is saved and scores what the trainer logged for it
        ema = validate('vit_ti16_moe_upcycled', str(tmp_path / 'run' / 'model_ema'), str(data), num_workers=0,
                       batch_size=6)
        assert ema['top1'] == logged['ema_top1'] and ema['loss'] == pytest.approx(logged['ema_loss'], rel=1e-5)
    folder = tmp_path / 'run' / 'model'
    model = create_model_from_checkpoint('vit_ti16_moe_upcycled', str(folder)).eval()
    for key, value in DESIGNS[design].items():
        assert getattr(model.moe_config, key) == value
    reloaded = validate('vit_ti16_moe_upcycled', str(folder), str(data), num_workers=0, batch_size=6)
    assert reloaded['top1'] == logged['top1'] and reloaded['loss'] == pytest.approx(logged['loss'], rel=1e-5)
    soft = design == 'soft'
    float_file = export_onnx(model, tmp_path / 'model.onnx', expose_routing=not soft)
    quantize_onnx(float_file, tmp_path / 'model.int8.onnx', 'int8')  # what export_onnx(quantize='int8') writes
    # layer by layer where there is slot routing, end to end for Soft MoE
    for quantize, path in ((None, float_file), ('int8', tmp_path / 'model.int8.onnx')):
        results = check_onnx_parity(model, path, batch_sizes=(1, 3), rtol=0.25 if soft and quantize else None)
        assert all(r['ok'] and r['routing_checked'] == (not soft) for r in results.values()), results
        if not quantize:
            assert max(r['max_abs_diff'] for r in results.values()) < 1e-4
    if soft:  # the export CLI checks a Soft MoE file end to end and measures real images
        rc, out, err = run_front_end('export/onnx_export.py', '--model', 'vit_ti16_moe_upcycled', '--checkpoint',
                                     str(folder), '--output', str(tmp_path / 'cli.onnx'), '--quantize', 'int8',
                                     '--batch-sizes', '3', '--data-dir', str(data))
        assert rc == 0, out + err
        assert 'real images (9 of' in out and 'of max |logit|' in out
        rc, out, err = run_front_end('train_scripts/routing_report.py', '--model', 'vit_ti16_moe_upcycled',
                                     '--checkpoint', str(folder), '--data-dir', str(data), '--output',
                                     str(tmp_path / 'report'), '--no-progress')
        assert rc == 0, out + err
        assert 'Soft MoE, tokens per slot / slots per token' in out and 'blocks.1.mlp: ' in out


@pytest.mark.stress  # CI: the combination matrix's Soft MoE cells (FSDP2; shared experts) and its FSDP2 + shared cells
@pytest.mark.xdist_group('fsdp')
def test_soft_moe_with_shared_experts_trains_under_fsdp2_through_accelerate(sources, tmp_path):
    """Two processes, FSDP2 through Accelerator.prepare (tests/fsdp_on_cpu.py): the slot parameters, the [1] logit
    scale and the shared experts shard, the saved model reloads and scores what the trainer logged."""
    data, dense = sources
    kwargs = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_experts=4, moe_blocks=1,
                  router='soft', slots_per_expert=3, num_shared_experts=1)
    cfg = load_config(None, dict(
        model='vit_ti16_moe_upcycled', pretrained=str(dense), model_kwargs=kwargs, data_dir=str(data),
        output_dir=str(tmp_path / 'run'), batch_size=3, num_workers=0, steps=2, lr=3e-3, warmup_steps=1, log_every=1,
        checkpoint_every=100, trackers='none', progress=False, hflip=0.0, scale=[0.8, 1.0], color_jitter=0.0,
        eval_batch_size=3))
    path = tmp_path / 'run.yaml'
    path.write_text(cfg.to_yaml())
    result = run_script([*launch_processes(2), 'tests/fsdp_on_cpu.py', 'train_scripts/train.py', '--config',
                         str(path)], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    start, = log_records(cfg.output_dir, 'start')
    assert start['num_processes'] == 2 and start['distributed_type'] == 'FSDP'
    logged = log_records(cfg.output_dir, 'eval')[-1]
    model = create_model_from_checkpoint('vit_ti16_moe_upcycled', str(tmp_path / 'run' / 'model'))
    assert model.blocks[-1].mlp.router.scale.shape == (1,) and model.blocks[-1].mlp.shared_experts is not None
    reloaded = validate('vit_ti16_moe_upcycled', str(tmp_path / 'run' / 'model'), str(data), num_workers=0,
                        batch_size=3)
    assert reloaded['top1'] == logged['top1'] and reloaded['loss'] == pytest.approx(logged['loss'], rel=1e-4)
