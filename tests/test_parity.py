"""Parity that tells a routing tie from a wrong graph: ties pass and are reported, an altered expert fails and is
named, and the tie classification itself is checked on constructed decisions."""
import copy

import numpy as np
import onnx
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from vit_moe.onnx import check_onnx_parity, compare_slots, export_onnx, format_parity

from conftest import TINY_MOE

pytestmark = pytest.mark.xdist_group('parity')  # one pytest-xdist worker: the module fixtures are built once


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model('vit_ti16_moe_upcycled', **dict(TINY_MOE, num_experts=8)).eval()  # MoE: blocks 2, 3


@pytest.fixture(scope='module')
def debug_export(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp('parity') / 'debug.onnx', expose_routing=True)


def test_a_correct_graph_passes_with_routing_checked(model, debug_export):
    results = check_onnx_parity(model, debug_export, batch_sizes=(1, 5))
    for batch, r in results.items():
        assert r['routing_checked'] and r['ok'] and r['num_non_ties'] == 0, format_parity(batch, r)
        assert r['slots'] == batch * 2 * 8 * 5  # 2 layers x 8 experts x capacity ceil(2 * 17 / 8) = 5
        assert r['replay_max_abs_diff'] < 1e-4
    assert '0 routing ties of 400 slots' in format_parity(5, results[5])


def test_exact_ties_pass_and_are_reported(model, tmp_path):
    tied = timm.create_model('vit_ti16_moe_upcycled', **dict(TINY_MOE, num_experts=8)).eval()
    tied.load_state_dict(model.state_dict())
    with torch.no_grad():
        tied.pos_embed.zero_()  # identical patches -> identical tokens -> equal router probabilities
    path = export_onnx(tied, tmp_path / 'tied.onnx', expose_routing=True)
    classifier_input = torch.zeros(2, 3, 32, 32)  # a constant image: 16 identical patch tokens
    from vit_moe.onnx import parity
    r = parity._check_batch(tied, parity.OnnxClassifier(path), classifier_input.numpy(),
                            ['blocks.2.mlp', 'blocks.3.mlp'], 'fp32', atol=1e-3)
    assert r['ok'], format_parity(2, r)
    assert r['near_ties'] > 0  # tied decision boundaries are counted, flipped or not
    assert r['num_non_ties'] == 0 and r['ties'] == r['flips']  # any flip among identical tokens is a tie


def _alter_expert(path, out, layer):
    graph = onnx.load(str(path))
    weight = next(i for i in graph.graph.initializer if i.name.endswith(f'{layer}.experts.fc1.weight'))
    array = numpy_helper.to_array(weight).copy()
    array[0] *= 3.0  # expert 0 of that layer computes something else
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(graph, str(out))
    return out


@pytest.mark.parametrize('layer', ['blocks.2.mlp', 'blocks.3.mlp'])
def test_an_altered_expert_fails_and_names_its_layer(model, debug_export, tmp_path, layer):
    broken = _alter_expert(debug_export, tmp_path / 'broken.onnx', layer)
    results = check_onnx_parity(model, broken, batch_sizes=(5,))
    r = results[5]
    assert not r['ok']
    assert r['first_bad_layer']['layer'] == layer  # checked on its own inputs: the root cause, not a consequence
    assert f'FAIL - {layer}: expert 0 output differs by' in format_parity(5, r)


def test_a_plain_export_is_checked_on_its_logits(model, tmp_path):
    path = export_onnx(model, tmp_path / 'plain.onnx')
    r = check_onnx_parity(model, path, batch_sizes=(3,))[3]
    assert not r['routing_checked'] and r['ok'] and r['max_abs_diff'] < 1e-4


def _decisions(probs, capacity):
    token_index = probs.transpose(1, 2).topk(capacity, dim=-1).indices  # [B, E, capacity]
    return token_index, torch.ones_like(token_index, dtype=torch.bool)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), capacity=st.integers(1, 5))
def test_a_swap_between_tied_tokens_is_a_tie_and_any_other_swap_is_not(seed, capacity):
    generator = torch.Generator().manual_seed(seed)
    probs = torch.rand(2, 8, 3, generator=generator).softmax(-1)  # [B, T, E], distinct values
    probs[0, :, 1] = probs[0, 0, 1]  # image 0, expert 1: all tokens tied
    reference, filled = _decisions(probs, capacity)
    other = reference.clone()
    unchosen = [t for t in range(8) if t not in reference[0, 1].tolist()]
    other[0, 1, 0] = unchosen[0]  # tied swap
    not_chosen = [t for t in range(8) if t not in reference[1, 2].tolist()]
    other[1, 2, 0] = not_chosen[0]  # a swap with distinct probabilities
    flips = compare_slots(probs, reference, other, filled, filled)
    assert len(flips) == 2
    by_image = {f['image']: f for f in flips}
    assert by_image[0]['tie'] and by_image[0]['gap'] == 0.0 and by_image[0]['expert'] == 1
    assert not by_image[1]['tie'] and by_image[1]['expert'] == 2 and by_image[1]['slot'] == 0
    assert compare_slots(probs, reference, reference, filled, filled) == []


@pytest.fixture(scope='module')
def int8_debug_export(model, tmp_path_factory):
    return export_onnx(model, tmp_path_factory.mktemp('parity_int8') / 'debug_int8.onnx', quantize='int8',
                       expose_routing=True)


def test_a_correct_int8_graph_passes_layer_by_layer_and_reports_its_error(model, int8_debug_export):
    for batch, r in check_onnx_parity(model, int8_debug_export, batch_sizes=(1, 5)).items():
        assert r['kind'] == 'int8' and r['ok'] and r['num_non_ties'] == 0, format_parity(batch, r)
        assert 0 < r['max_expert_error'] < 0.1  # int8 rounding, measured on each expert's own inputs
        assert 'layer by layer on ONNX Runtime\'s own inputs' in format_parity(batch, r)
        assert 'top-1 agreement' not in format_parity(batch, r)  # meaningless on random inputs: not printed


@pytest.mark.parametrize('layer, expert, factor', [('blocks.2.mlp', 5, 1.5), ('blocks.3.mlp', 0, 0.5)])
def test_one_experts_wrong_int8_scale_fails_naming_its_layer_and_expert(model, int8_debug_export, tmp_path, layer,
                                                                         expert, factor):
    graph = onnx.load(str(int8_debug_export))
    scale = next(i for i in graph.graph.initializer if i.name.endswith(f'{layer}.experts.fc2.weight.{expert}_scale'))
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * factor, scale.name))
    onnx.save(graph, str(tmp_path / 'wrong_scale.onnx'))
    r = check_onnx_parity(model, tmp_path / 'wrong_scale.onnx', batch_sizes=(5,))[5]
    assert not r['ok'] and r['first_bad_layer']['layer'] == layer and r['first_bad_layer']['expert'] == expert
    assert f'FAIL - {layer}: expert {expert} output differs by' in format_parity(5, r)
    assert r['relative_diff'] < 0.1  # the logits alone would not have told: the scale is off by 50 % in 1 of 8


def test_the_real_image_check_fails_below_the_required_agreement(model, tmp_path):
    import argparse
    import runpy
    from conftest import ROOT, make_image_folder
    data = make_image_folder(tmp_path / 'data', per_class=(1, 12), classes=3, size=32)
    other = copy.deepcopy(model)  # its classes rolled by one: every prediction differs from the model's
    with torch.no_grad():
        other.head.weight.copy_(model.head.weight.roll(1, 0))
        other.head.bias.copy_(model.head.bias.roll(1, 0))
    path = export_onnx(other, tmp_path / 'other.onnx')
    check = runpy.run_path(str(ROOT / 'export' / 'onnx_export.py'), run_name='front_end')['_check_real_images']
    args = argparse.Namespace(data_dir=str(data), split='val', max_images=1000, min_data_agreement=None)
    assert check(path, other, args, 'fp32') == 0  # the model it came from: 100 % agreement
    assert check(path, model, args, 'int8') == 1  # another model: far below the 97 % int8 threshold
