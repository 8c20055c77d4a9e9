"""Parity that tells a routing tie from a wrong graph: ties pass and are reported, an altered expert fails and is
named, and the tie classification itself is checked on constructed decisions."""
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
