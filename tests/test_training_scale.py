"""Training at scale, on CPU: timm-style parameter groups and per-group lr, gradient checkpointing, torch.compile,
and no host synchronisation on the training step beyond the one NaN / stop check per optimizer step."""
import sys

import pytest
import timm
import torch

from vit_moe import capture_routing
from vit_moe.training import Trainer, param_groups, train

from conftest import TINY_MOE, TRAIN_MOE, log_records, tiny_config


def _group_of(groups, name):
    return next(g for g in groups if name in g['param_names'])


def test_param_groups_exempt_biases_norms_and_embeddings_from_weight_decay():
    model = timm.create_model('vit_ti16_moe_upcycled', **TINY_MOE)  # MoE in blocks 2, 3
    groups = param_groups(model, weight_decay=0.05)
    for name in ('cls_token', 'pos_embed', 'blocks.0.norm1.weight', 'blocks.0.attn.qkv.bias', 'head.bias',
                 'blocks.3.mlp.experts.fc1.bias', 'blocks.3.mlp.experts.fc2.bias'):  # expert biases are [E, out]
        assert _group_of(groups, name)['weight_decay'] == 0.0, name
    for name in ('blocks.0.attn.qkv.weight', 'blocks.3.mlp.experts.fc1.weight', 'head.weight'):
        assert _group_of(groups, name)['weight_decay'] == 0.05, name
    assert sum(len(g['params']) for g in groups) == len(list(model.parameters()))  # every parameter exactly once


def test_layer_decay_and_router_multiplier_scale_each_groups_lr():
    model = timm.create_model('vit_ti16_moe_upcycled', **TINY_MOE)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5, router_lr_mult=0.1)
    scale = {name: g['lr_scale'] for g in groups for name in g['param_names']}
    # timm's layer ids: embeddings 0, block i -> i + 1, head 5 = depth + 1
    assert scale['head.weight'] == 1.0
    assert scale['blocks.3.attn.qkv.weight'] == pytest.approx(0.5)
    assert scale['blocks.0.attn.qkv.weight'] == pytest.approx(0.5 ** 4)
    assert scale['pos_embed'] == pytest.approx(0.5 ** 5)
    assert scale['blocks.3.mlp.router.gate.weight'] == pytest.approx(0.5 * 0.1)
    assert scale['blocks.3.mlp.experts.fc1.weight'] == pytest.approx(0.5)


def test_the_schedule_keeps_each_groups_lr_scale(tmp_path, data):
    trainer = Trainer(tiny_config(tmp_path, steps=3, layer_decay=0.5, router_lr_mult=0.1, opt_betas=[0.8, 0.9],
                                  opt_eps=1e-6, warmup_steps=0, schedule='constant', lr=1e-3))
    trainer.fit()
    for group in trainer.optimizer.param_groups:
        assert group['lr'] == pytest.approx(1e-3 * group['lr_scale'])
        assert group['betas'] == (0.8, 0.9) and group['eps'] == 1e-6
    assert len({round(g['lr'], 12) for g in trainer.optimizer.param_groups}) > 2  # the scales survived the schedule


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = timm.create_model('vit_ti16_moe_upcycled', router='token_choice', **TINY_MOE).train()
    x = torch.randn(3, 3, 32, 32)
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        with capture_routing() as routing:
            logits = model(x)
        (logits.logsumexp(-1).mean() + routing.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize('overrides', [dict(grad_checkpointing=True),
                                       dict(torch_compile='default', torch_compile_backend='aot_eager')])
def test_checkpointed_or_compiled_training_matches_eager(tmp_path, data, overrides):
    common = dict(steps=4, checkpoint_every=100, model_kwargs=dict(TRAIN_MOE, router='token_choice'))
    eager = train(tiny_config(tmp_path, output_dir=str(tmp_path / 'eager'), **common))
    other = train(tiny_config(tmp_path, output_dir=str(tmp_path / 'other'), **common, **overrides))
    for a, b in zip(log_records(eager['output_dir']), log_records(other['output_dir'])):
        assert b['loss'] == pytest.approx(a['loss'], rel=1e-4, abs=1e-6)
        assert b['aux_loss'] == pytest.approx(a['aux_loss'], rel=1e-4, abs=1e-7)
    assert other['eval']['loss'] == pytest.approx(eager['eval']['loss'], rel=1e-4)


def test_inductor_compiled_moe_layer_matches_eager_forward_and_backward():
    from vit_moe import MoeMlp
    torch.manual_seed(0)
    layer = MoeMlp(32, 64, num_experts=4, router='token_choice')
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 9, 32, requires_grad=True)
    grads = []
    for fn in (layer, compiled):
        x.grad = None
        layer.zero_grad()
        with capture_routing() as routing:
            out = fn(x)
        (out.square().sum() + routing.aux_loss).backward()
        grads.append((out.detach(), x.grad.clone(), layer.router.gate.weight.grad.clone()))
    for eager, comp in zip(*grads):
        torch.testing.assert_close(comp, eager, rtol=1e-4, atol=1e-5)


SYNCS = ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__')


def test_a_training_step_synchronises_with_the_host_at_most_once(tmp_path, data, monkeypatch):
    """Count host-synchronising tensor calls made by vit_moe's own code during steps that do not log."""
    trainer = Trainer(tiny_config(tmp_path, steps=6, log_every=100, checkpoint_every=100, grad_accum_steps=2,
                                  model_kwargs=dict(TRAIN_MOE, router='token_choice')))
    calls, counting = [], [False]

    def counted(name, real):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if counting[0] and '/vit_moe/' in caller:
                calls.append((name, caller.rsplit('/', 1)[-1], sys._getframe(1).f_lineno))
            return real(self, *args, **kwargs)
        return wrapper

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    steps = [0]
    real_step, real_after = trainer.train_step, trainer.after_step

    def train_step(images, targets):
        counting[0] = steps[0] < 5  # the 6th (last) step logs and evaluates: not counted
        real_step(images, targets)

    def after_step(epoch):
        done = real_after(epoch)
        steps[0] += 1
        counting[0] = False
        return done

    trainer.train_step, trainer.after_step = train_step, after_step
    trainer.fit()
    assert steps[0] == 6
    assert len(calls) == 5, calls  # one per counted optimizer step (over 2 micro-batches each): the NaN / stop check
    assert {c[:2] for c in calls} == {('tolist', 'loop.py')}
