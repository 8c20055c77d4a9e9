"""timm's model contract for the registered models, after the checks of timm's own tests/test_models.py
(forward, backward, default cfgs, forward_intermediates, features_only, FX, TorchScript), at small sizes."""
import copy
import math

import pytest
import timm
import torch
from timm.layers import is_exportable, is_scriptable
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

from vit_moe import MoeMlp

# one per backbone class / MLP class / token layout: augreg ViT (class token), DINOv2 with registers (LayerScale),
# DINOv2-g (SwiGLUPacked), SigLIP (no class token, MAP head), EVA02-S (Eva, rope, GluMlp), EVA02-B (SwiGLU + norm)
NAMES = ['vit_ti16_moe_upcycled', 'vit_s16_moe_upcycled', 'vit_s14_reg4_dinov2_moe_upcycled',
         'vit_g14_dinov2_moe_upcycled', 'vit_b16_siglip_moe_upcycled', 'eva02_s14_moe_upcycled',
         'eva02_b14_moe_upcycled']
ROUTERS = ['expert_choice', 'token_choice']
# the registered widths, 4 blocks (MoE in the last 2), 64 px, a 1000-class head (DINOv2 / SigLIP sources have none)
SMALL = dict(img_size=64, depth=4, num_experts=4, num_classes=1000)
NARROW = dict(embed_dim=192, num_heads=3)  # the B and g widths cut to Ti's (CI's two cores)
WIDTHS = {'vit_g14_dinov2_moe_upcycled': NARROW, 'vit_b16_siglip_moe_upcycled': NARROW,
          'eva02_b14_moe_upcycled': NARROW}
FX_TRACER = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                 param_shapes_constant=True)


# name -> {(router, kwargs): (a model as created, the RNG state right after)}: every test gets its own copy of the
# model (and the RNG state) that creating it afresh gives; the tests run grouped by name (module-scoped `name`)
_CREATED = {}


def _create(name, router, **kwargs):
    """timm.create_model(name, ...) right after torch.manual_seed(0), as a deep copy of the first one made (creating
    the models, not the checks, is what costs here)."""
    if is_scriptable() or is_exportable():  # other layers at creation: made afresh
        torch.manual_seed(0)
        return timm.create_model(name, router=router, **dict(SMALL, **WIDTHS.get(name, {}), **kwargs))
    if name not in _CREATED:
        _CREATED.clear()  # one backbone at a time
        _CREATED[name] = {}
    key = (router, tuple(sorted(kwargs.items())))
    if key not in _CREATED[name]:
        torch.manual_seed(0)
        model = timm.create_model(name, router=router, **dict(SMALL, **WIDTHS.get(name, {}), **kwargs))
        _CREATED[name][key] = model, torch.get_rng_state()
    model, rng_state = _CREATED[name][key]
    torch.set_rng_state(rng_state)
    return copy.deepcopy(model)


def _inputs(batch, model):
    return torch.randn(batch, *model.default_cfg['input_size'][:1], *model.patch_embed.img_size,
                       generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize('router', ROUTERS)
@pytest.mark.parametrize('name', NAMES, scope='module')
def test_forward_is_finite_and_unchanged_by_grad_checkpointing(name, router):
    model = _create(name, router).eval()
    x = _inputs(2, model)
    out = model(x)
    assert out.shape == (2, 1000) and not out.isnan().any()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('router', ROUTERS)
@pytest.mark.parametrize('name', NAMES, scope='module')
def test_backward_gives_every_parameter_a_gradient(name, router):
    model = _create(name, router, num_classes=42).train()
    out = model(_inputs(2, model))
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == [] and out.shape == (2, 42)
    assert sum(p.grad.numel() for p in model.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize('name', NAMES, scope='module')
def test_default_cfg_heads_and_classifier_reset(name):
    model = _create(name, 'expert_choice').eval()
    cfg, state_dict = model.default_cfg, model.state_dict()
    assert model.num_classes == 1000 and model.num_features == model.head_hidden_size > 0
    assert f'{cfg["classifier"]}.weight' in state_dict and f'{cfg["first_conv"]}.weight' in state_dict
    x = _inputs(1, model)
    features = model.forward_features(x)
    tokens = 16 + model.num_prefix_tokens  # 16 patches + class token and registers
    assert features.shape == (1, tokens, model.num_features)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert pre_logits.shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    assert model.num_classes == 0
    torch.testing.assert_close(model(x), pre_logits)
    model.reset_classifier(5)
    assert model(x).shape == (1, 5)
    headless = _create(name, 'expert_choice', num_classes=0, global_pool='').eval()
    assert headless(x).shape == (1, tokens, model.num_features)


@pytest.mark.parametrize('name', NAMES, scope='module')
def test_forward_intermediates_match_forward_features_and_features_only(name):
    model = _create(name, 'expert_choice').eval()
    x = _inputs(1, model)
    final, intermediates = model.forward_intermediates(x, output_fmt='NCHW')
    assert len(intermediates) == len(model.feature_info) == 4
    for info, feature in zip(model.feature_info, intermediates):
        assert feature.shape == (1, info['num_chs'], 4, 4)  # 64 px / reduction 16
        assert feature.shape[-1] <= math.ceil(64 / info['reduction']) + 1
    torch.testing.assert_close(final, model.forward_features(x))
    model.set_grad_checkpointing()
    torch.testing.assert_close(model.forward_intermediates(x)[0], final, rtol=1e-4, atol=1e-5)

    torch.manual_seed(0)
    features_only = timm.create_model(name, features_only=True, out_indices=(1, 3), **SMALL, **WIDTHS.get(name, {}))
    features_only.eval()
    assert features_only.feature_info.channels() == [model.num_features] * 2
    outs = features_only(x)
    assert [o.shape for o in outs] == [(1, model.num_features, 4, 4)] * 2
    torch.testing.assert_close(outs[1], intermediates[3])  # same weights (seed), same block output


def _fx_model(model, train=False):
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=FX_TRACER)
    train_return = [train_nodes[-1]]
    if train:  # the output node's inputs, as timm's test picks them
        graph = NodePathTracer(**FX_TRACER).trace(model)
        nodes = list(reversed(graph.nodes))
        outputs = [n.name for n in nodes[0]._input_nodes.keys()]
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n)] for n in outputs]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=FX_TRACER)


@pytest.mark.parametrize('router', ROUTERS)
@pytest.mark.parametrize('name', NAMES, scope='module')
def test_fx_traced_forward_equals_eager(name, router):
    assert MoeMlp in get_notrace_modules()  # a leaf for FX: its capacity is computed from the input shape
    model = _create(name, router).eval()
    x = _inputs(1, model)
    with torch.inference_mode():
        expected = model(x)
        traced = tuple(_fx_model(model)(x).values())[0]
    assert torch.equal(traced, expected)


@pytest.mark.parametrize('router', ROUTERS)
@pytest.mark.parametrize('name', NAMES, scope='module')
def test_fx_traced_backward_gives_every_parameter_a_gradient(name, router):
    model = _fx_model(_create(name, router, num_classes=42).train(), train=True)
    out = torch.cat(tuple(model(torch.randn(2, 3, 64, 64)).values()))
    out.mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert out.shape[-1] == 42


@pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated')
@pytest.mark.parametrize('router', ROUTERS)
@pytest.mark.parametrize('name', NAMES, scope='module')
def test_torchscript_forward_equals_eager(name, router):
    with timm.set_scriptable(True):
        model = _create(name, router).eval()
    x = _inputs(1, model)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)
