"""Routing leaves no state on the modules: deepcopy, EMA, pickling and torch.compile work after any forward,
and a capture reports only the layers that ran in it."""
import copy
import io
import pickle

import pytest
import timm
import torch
from timm.utils import ModelEmaV3

from vit_moe import MoeMlp, capture_routing

from conftest import TINY_MOE


def _trained_forward(router='token_choice', capture=True):
    torch.manual_seed(0)
    model = timm.create_model('vit_ti16_moe_upcycled', router=router, **TINY_MOE).train()
    x = torch.randn(3, 3, 32, 32)
    if capture:
        with capture_routing() as routing:
            logits = model(x)
        loss = logits.logsumexp(-1).mean() + routing.aux_loss
    else:
        loss = model(x).logsumexp(-1).mean()
    loss.backward()
    return model, x


def _tensors_with_graph(model):
    return [f'{name}.{key}' for name, module in model.named_modules() for key, value in vars(module).items()
            if isinstance(value, torch.Tensor) and value.grad_fn is not None]


@pytest.mark.parametrize('capture', [True, False])
@pytest.mark.parametrize('router', ['expert_choice', 'token_choice'])
def test_deepcopy_pickle_and_ema_work_after_a_training_forward(router, capture):
    model, x = _trained_forward(router, capture)
    assert _tensors_with_graph(model) == []
    model.eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(copy.deepcopy(model)(x), expected, rtol=0, atol=0)
        buffer = io.BytesIO()
        torch.save(model, buffer)  # pickles the module
        buffer.seek(0)
        torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(x), expected, rtol=0, atol=0)
    ema = ModelEmaV3(model, decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    gate = 'blocks.3.mlp.router.gate.weight'
    ema_gate, gate_now = ema.module.state_dict()[gate], model.state_dict()[gate]
    torch.testing.assert_close(ema_gate, gate_now - 0.5)  # halfway between the copy and the moved weights


def test_a_forward_that_skips_moe_layers_reports_none_of_them():
    torch.manual_seed(0)
    model = timm.create_model('vit_ti16_moe_upcycled', router='token_choice', **TINY_MOE)  # MoE in blocks 2, 3
    x = torch.randn(2, 3, 32, 32)
    with capture_routing() as full:
        model(x)
    assert sorted(full.layers) == ['blocks.2.mlp', 'blocks.3.mlp'] and full.aux_loss.item() > 0
    with capture_routing() as early:
        model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    assert early.layers == {} and early.aux_loss.item() == 0.0
    with capture_routing() as partial:
        model.forward_intermediates(x, indices=[2], stop_early=True, intermediates_only=True)
    assert sorted(partial.layers) == ['blocks.2.mlp']


def test_only_the_innermost_capture_records_and_nothing_is_recorded_outside():
    moe = MoeMlp(16, 32, num_experts=4)
    x = torch.randn(2, 6, 16)
    with capture_routing() as outer:
        with capture_routing() as inner:
            moe(x)
        moe(x)
    moe(x)  # no capture open: nothing to record into
    assert len(inner.records) == 1 and len(outer.records) == 1
    with capture_routing() as twice:
        moe(x)
        moe(x)
    assert list(twice.layers) == ['moe_mlp', 'moe_mlp#2']


def _step(model, x, y):
    with capture_routing() as routing:
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits, y) + routing.aux_loss
    loss.backward()
    return loss.detach(), sorted(routing.layers)


@pytest.mark.parametrize('grad_checkpointing', [False, True])
def test_compiled_fullgraph_training_step_matches_eager(grad_checkpointing):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch.manual_seed(0)
    eager = timm.create_model('vit_ti16_moe_upcycled', router='token_choice', **TINY_MOE).train()
    compiled_model = copy.deepcopy(eager)
    for m in (eager, compiled_model):
        m.set_grad_checkpointing(grad_checkpointing)
        m.blocks[3].mlp.experts.drop1.p = 0.0  # no dropout: eager and compiled must see the same function
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(compiled_model, fullgraph=True, backend=counter)
    for seed in range(2):
        generator = torch.Generator().manual_seed(seed)
        x, y = torch.randn(3, 3, 32, 32, generator=generator), torch.randint(0, 10, (3,), generator=generator)
        eager_loss, eager_layers = _step(eager, x, y)
        compiled_loss, compiled_layers = _step(compiled, x, y)
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert compiled_layers == eager_layers == ['blocks.2.mlp', 'blocks.3.mlp']
    assert counter.frame_count == 1  # one graph, no recompilation from step to step
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert _tensors_with_graph(compiled_model) == []
    copy.deepcopy(compiled_model)
