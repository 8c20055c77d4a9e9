"""MoeMlp: dense equivalence at full capacity, batch independence, determinism, gradients, static graph."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from timm.layers import Mlp

from vit_moe import MoeMlp, capture_routing, convert_dense_to_moe, moe_layer_like
from vit_moe.layers.moe_mlp import combine_by_matmul


def _upcycled_layer(dense: Mlp, num_experts: int, **kwargs) -> MoeMlp:
    """An MoE layer whose experts are copies of `dense` (the conversion rules on a one-layer 'model')."""
    holder, source = torch.nn.Module(), torch.nn.Module()
    holder.mlp, source.mlp = moe_layer_like(dense, num_experts=num_experts, **kwargs), dense
    holder.load_state_dict(convert_dense_to_moe(source.state_dict(), holder))
    return holder.mlp.eval()


@pytest.fixture
def dense_mlp():
    torch.manual_seed(0)
    mlp = Mlp(32, 96).eval()
    torch.nn.init.normal_(mlp.fc1.bias, std=0.1)
    torch.nn.init.normal_(mlp.fc2.bias, std=0.1)
    return mlp


@pytest.mark.parametrize('num_experts', [1, 3, 8])
def test_capacity_equal_experts_matches_dense(dense_mlp, num_experts):
    moe = _upcycled_layer(dense_mlp, num_experts, capacity_factor=float(num_experts))
    x = torch.randn(4, 11, 32)
    torch.testing.assert_close(moe(x), dense_mlp(x), rtol=1e-5, atol=1e-5)


def test_top_k_equal_experts_with_norm_matches_dense(dense_mlp):
    moe = _upcycled_layer(dense_mlp, 4, router='token_choice', top_k=4, capacity_factor=1.0, router_norm=True)
    x = torch.randn(3, 9, 32)
    torch.testing.assert_close(moe(x), dense_mlp(x), rtol=1e-5, atol=1e-5)


def test_default_capacity_is_close_to_dense_but_not_equal(dense_mlp):
    moe = _upcycled_layer(dense_mlp, 8)  # C = 2: each token gets ~2/8 of its weight on average
    x = torch.randn(4, 20, 32)
    out, ref = moe(x), dense_mlp(x)
    assert not torch.allclose(out, ref, atol=1e-3)
    # the output is a partial (sum of probabilities <= 1) copy of the dense output, token by token
    scale = (out * ref).sum(-1) / ref.square().sum(-1)  # [B, T] least-squares factor
    torch.testing.assert_close(out, scale.unsqueeze(-1) * ref, rtol=1e-4, atol=1e-5)
    assert bool(((scale >= -1e-6) & (scale <= 1 + 1e-5)).all())


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 1000), batch=st.integers(1, 6), router=st.sampled_from(['expert_choice', 'token_choice']))
def test_image_output_is_independent_of_its_batch_mates(seed, batch, router):
    torch.manual_seed(seed)
    moe = MoeMlp(16, 32, num_experts=4, router=router, capacity_factor=1.0).eval()
    x = torch.randn(batch, 7, 16)
    together = moe(x)
    for i in range(batch):
        torch.testing.assert_close(moe(x[i:i + 1]), together[i:i + 1], rtol=1e-5, atol=1e-6)
    routing = moe.router(x)
    alone = moe.router(x[-1:])
    assert torch.equal(routing.token_index[-1:], alone.token_index)


def test_forward_is_deterministic():
    torch.manual_seed(0)
    moe = MoeMlp(16, 32, num_experts=4).eval()
    x = torch.randn(3, 10, 16)
    assert torch.equal(moe(x), moe(x))


@pytest.mark.parametrize('router', ['expert_choice', 'token_choice'])
def test_gradients_reach_router_and_every_expert(router):
    torch.manual_seed(0)
    moe = MoeMlp(16, 32, num_experts=4, router=router, capacity_factor=2.0)
    x = torch.randn(4, 12, 16, requires_grad=True)
    with capture_routing() as routing:
        out = moe(x)
    (out.square().sum() + routing.aux_loss).backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    for grad in (moe.experts.fc1.weight.grad, moe.experts.fc2.weight.grad, moe.experts.fc1.bias.grad):
        per_expert = grad.flatten(1).abs().sum(1)  # [E]
        assert bool((per_expert > 0).all()), per_expert
    assert x.grad.abs().sum() > 0


def test_activation_bias_and_dropout_follow_the_dense_mlp():
    mlp = Mlp(16, 32, act_layer=lambda: torch.nn.GELU(approximate='tanh'), bias=(True, False), drop=(0.1, 0.2))
    moe = moe_layer_like(mlp, num_experts=3)
    assert moe.experts.act.approximate == 'tanh'
    assert moe.experts.fc1.bias is not None and moe.experts.fc2.bias is None
    assert (moe.experts.drop1.p, moe.experts.drop2.p) == (0.1, 0.2)
    assert moe.experts.fc1.weight.shape == (3, 16, 32) and moe.experts.fc2.weight.shape == (3, 32, 16)


@pytest.mark.parametrize('router', ['expert_choice', 'token_choice'])
def test_graph_has_static_shapes_and_no_data_dependent_ops(router):
    torch.manual_seed(0)
    moe = MoeMlp(16, 32, num_experts=4, router=router).eval()
    batch = torch.export.Dim('batch', min=1, max=64)
    program = torch.export.export(moe, (torch.randn(2, 10, 16),), dynamic_shapes=({0: batch},))
    ops = {str(node.target) for node in program.graph.nodes if node.op == 'call_function'}
    data_dependent = ('aten.nonzero', 'aten.item', 'aten._local_scalar_dense', 'aten.masked_select', 'aten.unique')
    assert not [op for op in ops if op.startswith(data_dependent)]
    x = torch.randn(5, 10, 16)
    torch.testing.assert_close(program.module()(x), moe(x))


@settings(deadline=None, max_examples=30)
@given(seed=st.integers(0, 10_000), batch=st.integers(1, 4), tokens=st.integers(2, 12), experts=st.integers(1, 5),
       capacity=st.integers(1, 12), half=st.booleans())
def test_matmul_combine_equals_index_add(seed, batch, tokens, experts, capacity, half):
    """The exported graph's combine (a combine matrix) adds the same slots as eager's index_add, repeats included."""
    g = torch.Generator().manual_seed(seed)
    dim = 8
    dtype = torch.float16 if half else torch.float32
    expert_out = torch.randn(experts, batch * capacity, dim, generator=g).to(dtype)  # [E, B*capacity, D]
    token_index = torch.randint(0, tokens, (batch, experts, capacity), generator=g)  # repeats across experts
    weights = torch.rand(batch, experts, capacity, generator=g) * (torch.rand(batch, experts, capacity,
                                                                                generator=g) > 0.2)  # empty slots
    got = combine_by_matmul(expert_out, token_index, weights, tokens, torch.float32)  # [B, T, D]
    expected = torch.zeros(batch, tokens, dim)
    for b in range(batch):
        for e in range(experts):
            for c in range(capacity):
                expected[b, token_index[b, e, c]] += weights[b, e, c] * expert_out[e, b * capacity + c].float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('router', ['expert_choice', 'token_choice'])
def test_export_mode_combine_equals_eager(router, monkeypatch):
    torch.manual_seed(0)
    moe = MoeMlp(16, 32, num_experts=4, router=router).eval()
    x = torch.randn(3, 10, 16)
    eager = moe(x)
    monkeypatch.setattr(torch.onnx, 'is_in_onnx_export', lambda: True)
    torch.testing.assert_close(moe(x), eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('flag', [(torch.compiler, 'is_exporting'), (torch.onnx, 'is_in_onnx_export')])
def test_either_exporter_flag_selects_the_race_free_combine(flag, monkeypatch):
    """torch.export tracing (the dynamo ONNX exporter) and the TorchScript ONNX exporter each say they are exporting
    their own way; either must swap index_add (ScatterND-add, racy in ONNX Runtime) for the combine matmul."""
    from vit_moe.layers import moe_mlp
    calls = []
    monkeypatch.setattr(moe_mlp, 'combine_by_matmul', lambda *args: calls.append(args) or torch.zeros(2, 10, 16))
    moe = MoeMlp(16, 32, num_experts=4).eval()
    moe(torch.randn(2, 10, 16))
    assert not calls  # eager: index_add
    monkeypatch.setattr(*flag, lambda: True)
    moe(torch.randn(2, 10, 16))
    assert len(calls) == 1
