"""Expert banks for every MLP timm's ViT-family blocks use: with every slot filled (C = E) the upcycled layer is the
dense MLP; Drop-Upcycling re-initialises the same hidden units in gate and value; what cannot be upcycled is refused
naming it."""
from functools import partial

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.layers import ConvMlp, GatedMlp, GluMlp, Mlp, QuickGELU, SwiGLU, SwiGLUPacked
from timm.models.mlp_mixer import SpatialGatingUnit

from vit_moe import MoeMlp, moe_layer_like
from vit_moe.models import convert_dense_to_moe

HIDDEN_NORM = dict(norm_layer=partial(nn.LayerNorm, eps=1e-6))
DENSE_MLPS = {  # name -> (dense MLP, bank class name)
    'Mlp': (lambda d, h: Mlp(d, h), 'ExpertMlps'),
    'Mlp hidden norm': (lambda d, h: Mlp(d, h, **HIDDEN_NORM), 'ExpertMlps'),
    'Mlp quick_gelu, no fc2 bias': (lambda d, h: Mlp(d, h, act_layer=QuickGELU, bias=(True, False)), 'ExpertMlps'),
    'GatedMlp without gate': (lambda d, h: GatedMlp(d, h), 'ExpertMlps'),
    'GluMlp (gate last)': (lambda d, h: GluMlp(d, 2 * h), 'ExpertGluMlps'),
    'SwiGLUPacked (gate first)': (lambda d, h: SwiGLUPacked(d, 2 * h), 'ExpertGluMlps'),
    'GluMlp hidden norm': (lambda d, h: GluMlp(d, 2 * h, act_layer=nn.SiLU, gate_last=False, **HIDDEN_NORM),
                           'ExpertGluMlps'),
    'SwiGLU': (lambda d, h: SwiGLU(d, h), 'ExpertSwiGLUs'),
    'SwiGLU hidden norm (EVA02-B)': (lambda d, h: SwiGLU(d, h, **HIDDEN_NORM), 'ExpertSwiGLUs'),
}


class _Block(nn.Module):
    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp


def _upcycled(dense: nn.Module, num_experts: int, expert_init: str = 'copy', drop_ratio: float = 0.5,
              **kwargs) -> MoeMlp:
    """The MoE layer for `dense` with weights converted from it as a checkpoint would be."""
    target = _Block(moe_layer_like(dense, num_experts=num_experts, **kwargs))
    target.mlp.layer_name = 'mlp'
    state = convert_dense_to_moe(_Block(dense).state_dict(), target, expert_init=expert_init, drop_ratio=drop_ratio)
    target.load_state_dict(state)
    return target.mlp


def _randomised(mlp: nn.Module) -> nn.Module:
    """Trained-looking weights: biases and norm affine parameters away from their init."""
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return mlp.eval()


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000), tokens=st.integers(2, 9), experts=st.integers(2, 5))
@pytest.mark.parametrize('name', list(DENSE_MLPS))
def test_every_slot_filled_the_upcycled_layer_is_the_dense_mlp(name, seed, tokens, experts):
    torch.manual_seed(seed)
    make, bank = DENSE_MLPS[name]
    dense = _randomised(make(16, 24))
    moe = _upcycled(dense, experts, capacity_factor=float(experts)).eval()  # C = E: every expert takes every token
    assert type(moe.experts).__name__ == bank
    x = torch.randn(3, tokens, 16)
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', list(DENSE_MLPS))
def test_dense_parameter_names_map_key_by_key_inside_experts(name):
    dense = DENSE_MLPS[name][0](16, 24)
    moe = moe_layer_like(dense, num_experts=3)
    dense_keys = set(dense.state_dict())
    bank_keys = {k[len('experts.'):] for k in moe.state_dict() if k.startswith('experts.')}
    assert bank_keys == dense_keys


@pytest.mark.parametrize('name, gate_and_value', [
    ('GluMlp (gate last)', [('fc1.weight', 2, 0), ('fc1.weight', 2, 24), ('fc1.bias', 1, 0), ('fc1.bias', 1, 24)]),
    ('SwiGLUPacked (gate first)', [('fc1.weight', 2, 0), ('fc1.weight', 2, 24)]),
    ('SwiGLU', [('fc1_g.weight', 2, 0), ('fc1_x.weight', 2, 0), ('fc1_g.bias', 1, 0), ('fc1_x.bias', 1, 0)]),
    ('Mlp', [('fc1.weight', 2, 0), ('fc1.bias', 1, 0)]),
])
def test_drop_upcycling_reinitialises_the_same_hidden_units_in_gate_value_and_fc2(name, gate_and_value):
    torch.manual_seed(0)
    dense = _randomised(DENSE_MLPS[name][0](16, 24))
    copied, dropped = _upcycled(dense, 4), _upcycled(dense, 4, expert_init='drop', drop_ratio=0.25)
    changed = {}
    for suffix, dim, offset in gate_and_value + [('fc2.weight', 1, 0)]:
        a = getattr(dropped.experts, suffix.split('.')[0]).get_parameter(suffix.split('.')[1]).detach()
        b = getattr(copied.experts, suffix.split('.')[0]).get_parameter(suffix.split('.')[1]).detach()
        for e in range(4):
            part_a, part_b = a[e].narrow(dim - 1, offset, 24), b[e].narrow(dim - 1, offset, 24)
            other = tuple(d for d in range(part_a.dim()) if d != dim - 1)
            units = (part_a != part_b).any(dim=other) if other else part_a != part_b  # [24] hidden units changed
            changed.setdefault(e, []).append(frozenset(units.nonzero().flatten().tolist()))
    for e, sets in changed.items():
        assert len(set(sets)) == 1 and len(sets[0]) == 6, (e, sets)  # 25 % of 24, the same units everywhere
    assert len({sets[0] for sets in changed.values()}) > 1  # drawn per expert


class _MyMlp(Mlp):
    """A subclass may compute something else: only timm's own classes are trusted."""


@pytest.mark.parametrize('make, message', [
    (lambda: GatedMlp(16, 32, gate_layer=partial(SpatialGatingUnit, seq_len=9)),
     'GatedMlp with a SpatialGatingUnit gate cannot be upcycled: the gate mixes tokens'),
    (lambda: ConvMlp(16, 32), 'ConvMlp cannot be upcycled; accepted MLPs: Mlp, GatedMlp, GluMlp, SwiGLU'),
    (lambda: _MyMlp(16, 32), '_MyMlp cannot be upcycled; accepted MLPs: Mlp, GatedMlp, GluMlp, SwiGLU'),
    (lambda: Mlp(16, 32, out_features=8), 'Mlp maps 16 to 8 features'),
    (lambda: Mlp(16, 32, norm_layer=nn.BatchNorm1d), 'a hidden norm must be an nn.LayerNorm'),
])
def test_what_cannot_be_upcycled_is_refused_naming_it(make, message):
    with pytest.raises(TypeError, match=message):
        moe_layer_like(make(), num_experts=4)
