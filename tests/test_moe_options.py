"""Every MoE option computes what README says, in every combination (one `MoeConfig` read by every layer):
(a) with every slot filled, copied experts reproduce the dense model; (b) right after upcycling each token gets its
dense MLP (per hidden slice) times the sum of its combine weights, within README's bounds; (c) the experts compute the
FLOPs per token of the formula, every slot counted; (d) every option that applies to a router changes the
computation, and every other is refused by name."""
import math

import pytest
import timm
import torch
from hypothesis import given, settings, strategies as st
from timm.layers import GluMlp, Mlp, SwiGLU
from torch.utils.flop_counter import FlopCounterMode

from vit_moe import MoeConfig, capture_routing, moe_layer_like, upcycle
from vit_moe.layers import MOE_OPTIONS, SoftMoeMlp

ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5, reg_tokens=2)  # T = 19, P = 3
MLPS = {'Mlp': {}, 'GluMlp': dict(mlp_layer=GluMlp), 'SwiGLU': dict(mlp_layer=SwiGLU),
        'SwiGLU + hidden norm': dict(mlp_layer=SwiGLU, scale_mlp_norm=True)}
TOKENS, PREFIX = 19, 3


def _dense(mlp: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', **ARCH, **MLPS[mlp]).eval()


def _images(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))


designs = dict(
    router=st.sampled_from(['expert_choice', 'token_choice']), G=st.sampled_from([1, 2, 4]),
    shared=st.sampled_from([0, 1, 2]), output_scale=st.booleans(), router_norm=st.booleans(),
    prefix_tokens=st.sampled_from(['compete', 'always']), mlp=st.sampled_from(list(MLPS)))


def _options(router, G, shared, output_scale, router_norm, prefix_tokens, E=8, **extra):
    return dict(router=router, num_experts=E, expert_granularity=G, num_shared_experts=shared,
                output_scale=output_scale, router_norm=router_norm, prefix_tokens=prefix_tokens, moe_blocks=1, **extra)


def _full_capacity(router, E, G):
    """Every slot filled: C = E / G (expert choice); top_k = E / G with C = 1 (token choice, no drops)."""
    return dict(capacity_factor=E / G) if router == 'expert_choice' else dict(top_k=E // G, capacity_factor=1.0)


# ------------------------------------------------------------------------------------ (a) full capacity = dense
@settings(deadline=None, max_examples=40)
@given(**designs)
def test_every_slot_filled_reproduces_the_dense_model_in_every_combination(
        router, G, shared, output_scale, router_norm, prefix_tokens, mlp):
    dense = _dense(mlp)
    options = _options(router, G, shared, output_scale, router_norm, prefix_tokens, **_full_capacity(router, 8, G))
    if G > 1 and 'norm' in mlp:  # a hidden norm spans every hidden unit: it cannot be sliced
        with pytest.raises(TypeError, match='cannot be split into fine-grained experts'):
            upcycle(dense, **options)
        return
    moe = upcycle(dense, **options).eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(_images()), dense(_images()), rtol=1e-5, atol=1e-5)
    layer = moe.blocks[1].mlp
    if output_scale:
        assert layer.output_scale.item() == pytest.approx(1.0)  # E / (C G) = E / (k G) = 1 here


# --------------------------------------------------------------------------- (b) the start, and README's bounds
def _slices(layer, x: torch.Tensor) -> torch.Tensor:
    """[G, B, T, D] each hidden slice of the dense MLP on every token: expert g * E / G is a copy of slice g."""
    E, G = layer.num_experts, layer.expert_granularity
    B, T, D = x.shape
    out = layer.experts(x.reshape(1, B * T, D).expand(E, B * T, D))  # [E, B*T, D]
    return out[::E // G].view(G, B, T, D)


def _weights_per_group(routing, G: int, T: int) -> torch.Tensor:
    """[B, T, G] the sum of each token's combine weights in each group of experts."""
    B, E, capacity = routing.token_index.shape
    group = (torch.arange(E) // (E // G)).view(1, E, 1).expand(B, E, capacity)
    flat = (routing.token_index * G + group).flatten(1)
    return torch.zeros(B, T * G).scatter_add(1, flat, routing.combine_weights.flatten(1)).view(B, T, G)


@settings(deadline=None, max_examples=40)
@given(**designs)
def test_right_after_upcycling_each_token_gets_its_dense_mlp_times_its_weights_within_readmes_bounds(
        router, G, shared, output_scale, router_norm, prefix_tokens, mlp):
    """README, "Where an upcycled model starts": token t's MLP output is sum_g s_t w_tg slice_g(x_t) / (S + 1) plus
    S / (S + 1) of the dense MLP (shared experts), w_tg its combine weights in group g, s_t the output scale (1 for
    expert choice's 'always' prefix tokens). Expert choice: w_tg in [0, 1], mean over an image's tokens >=
    min(1, C G / E); token choice: w_tg >= k G / E for a token that kept its k picks in group g; router_norm: 0 or 1;
    'always' prefix tokens: 1 (expert choice), every pick kept (token choice)."""
    if G > 1 and 'norm' in mlp:
        return  # refused (above)
    dense = _dense(mlp)
    E, C, k = 8, 2.0, 2
    moe = upcycle(dense, **_options(router, G, shared, output_scale, router_norm, prefix_tokens)).eval()
    layer, dense_mlp = moe.blocks[1].mlp, dense.blocks[1].mlp
    with torch.no_grad(), capture_routing(keep_tensors=True) as capture:
        moe(_images())
    _, routing = capture.tensors[0]
    x = routing.input
    w = _weights_per_group(routing, G, TOKENS)  # [B, T, G]
    always = prefix_tokens == 'always'
    scale = torch.ones(TOKENS)
    if output_scale:  # expert choice's 'always' prefix tokens start as the dense MLP: left unscaled
        scale[PREFIX if always and router == 'expert_choice' else 0:] = layer.output_scale.item()
    with torch.no_grad():
        expected = torch.einsum('t,btg,gbtd->btd', scale, w, _slices(layer, x))
        if shared:
            expected = expected + dense_mlp(x) * shared / (shared + 1)
    torch.testing.assert_close(routing.output, expected, rtol=1e-5, atol=1e-5)

    tol = 1e-6
    assert (w >= -tol).all() and (w <= 1 + 1e-5).all()
    if router == 'expert_choice':
        if router_norm:
            assert ((w - 0).abs() < tol).logical_or((w - 1).abs() < 1e-5).all()
        assert (w >= -tol).all() and (w <= 1 + tol).all()
        patches = w[:, PREFIX:] if always else w  # [B, T', G] the tokens that compete for slots
        capacity = layer.router.capacity(TOKENS) - (PREFIX if always else 0)  # their slots per expert
        assert (patches.mean(dim=1) >= capacity / patches.shape[1] - tol).all()  # >= capacity / T' ...
        assert capacity / patches.shape[1] >= min(1.0, C * G / E) - tol  # ... >= min(1, C G / E)
        if always:
            torch.testing.assert_close(w[:, :PREFIX], torch.ones(3, PREFIX, G))
        if output_scale and not router_norm:
            assert layer.output_scale.item() == pytest.approx(E / (C * G))
            assert ((patches * layer.output_scale.item()).mean(dim=1) >= 1 - tol).all()
    else:
        kept = _picks_kept(routing, G, TOKENS)  # [B, T, G] the token kept all k picks of group g
        assert (w[kept] >= (1.0 if router_norm else k * G / E) - 1e-5).all()
        if always:
            assert kept[:, :PREFIX].all()
        if output_scale and not router_norm:
            assert layer.output_scale.item() == pytest.approx(E / (k * G))


def _picks_kept(routing, G: int, T: int) -> torch.Tensor:
    """[B, T, G] True where a token holds k slots of group g (token choice: its k picks there)."""
    B, E, capacity = routing.token_index.shape
    k = 2
    filled = (routing.combine_weights > 0).float()
    group = (torch.arange(E) // (E // G)).view(1, E, 1).expand(B, E, capacity)
    flat = (routing.token_index * G + group).flatten(1)
    held = torch.zeros(B, T * G).scatter_add(1, flat, filled.flatten(1)).view(B, T, G)
    return held == k


# ------------------------------------------------------------------------------------------- (c) FLOPs per token
def _mlp_flops_per_token(mlp: torch.nn.Module) -> float:
    with FlopCounterMode(display=False) as counter:
        mlp(torch.randn(1, 1, 16))
    return counter.get_total_flops()


@settings(deadline=None, max_examples=40)
@given(router=st.sampled_from(['expert_choice', 'token_choice', 'soft']), G=st.sampled_from([1, 2, 4]),
       shared=st.sampled_from([0, 1]), prefix_tokens=st.sampled_from(['compete', 'always']),
       C=st.sampled_from([0.5, 1.0, 2.0]), k=st.sampled_from([1, 2]), tokens=st.integers(4, 40),
       mlp=st.sampled_from(['Mlp', 'GluMlp', 'SwiGLU']))
def test_expert_flops_per_token_follow_the_formula_for_every_design(router, G, shared, prefix_tokens, C, k, tokens,
                                                                     mlp):
    """(E * capacity / G + S * T) whole-MLP evaluations per image, every slot computed whether filled or not:
    expert choice C * T (+ the 'always' prefix tokens' E * P / G), token choice C * k * T, Soft MoE E * slots."""
    dense = {'Mlp': lambda: Mlp(16, 64), 'GluMlp': lambda: GluMlp(16, 128), 'SwiGLU': lambda: SwiGLU(16, 64)}[mlp]()
    E = 8
    if router == 'soft':
        options = dict(router='soft', num_experts=E, num_shared_experts=shared, slots_per_expert=k + 1)
    else:
        options = dict(router=router, num_experts=E, expert_granularity=G, num_shared_experts=shared,
                       prefix_tokens=prefix_tokens, capacity_factor=C,
                       **(dict(top_k=k) if router == 'token_choice' else {}))
    layer = moe_layer_like(dense, num_prefix_tokens=2, **options)
    config = layer.config
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(3, tokens, 16))
    counts = counter.get_flop_counts()
    expert_flops = sum(sum(counts.get(f'{type(layer).__name__}.{bank}', {}).values())
                       for bank in ('experts', 'shared_experts'))
    F = _mlp_flops_per_token(dense)
    per_token = expert_flops / (3 * tokens)
    assert per_token == pytest.approx(config.expert_flops_per_token(tokens, F, num_prefix_tokens=2), rel=1e-9)
    capacity = config.capacity(tokens, config.priority_tokens(2))
    if router == 'expert_choice':
        P = min(2, tokens) if prefix_tokens == 'always' else 0
        assert capacity == P + min(tokens - P, math.ceil(C * G * (tokens - P) / E)) or capacity == tokens
    elif router == 'token_choice':
        assert capacity == max(1, min(tokens, math.ceil(C * k * G * tokens / E)))  # C k T whole MLPs per image
    else:
        assert capacity == k + 1
    assert per_token == pytest.approx((E * capacity / config.groups + shared * tokens) * F / tokens, rel=1e-9)


def test_fine_grained_token_choice_costs_what_whole_experts_cost():
    """The issue's measurement: one MoE layer at T = 197, E = 16 G, top-2, C = 1 costs the same expert FLOPs for G =
    1, 2, 4 (it was 1.00 / 2.00 / 3.96: C and k were both multiplied by G)."""
    flops = []
    for G in (1, 2, 4):
        layer = moe_layer_like(Mlp(16, 64), router='token_choice', num_experts=16 * G, expert_granularity=G, top_k=2,
                               capacity_factor=1.0)
        flops.append(layer.config.expert_flops_per_token(197, 1.0))
    assert flops[1] / flops[0] == pytest.approx(1.0, abs=0.02) and flops[2] / flops[0] == pytest.approx(1.0, abs=0.02)


def test_fine_grained_token_choice_picks_its_top_k_in_every_group():
    """Each token meets every slice of the dense MLP: k picks per group (top-(k G) over all groups missed slices)."""
    torch.manual_seed(0)
    layer = moe_layer_like(Mlp(16, 64), router='token_choice', num_experts=32, expert_granularity=4, top_k=2,
                           capacity_factor=100.0)  # no drops
    with capture_routing(keep_tensors=True) as capture:
        layer(torch.randn(4, 50, 16) * 3)
    assert _picks_kept(capture.tensors[0][1], 4, 50).all()


# --------------------------------------------------------------- (d) every option changes something, or is refused
# option -> two values that differ (with `setup` options making the difference observable)
OPTION_VALUES = {
    'num_experts': (4, 2, {}),
    'moe_blocks': (1, 2, {}),
    'capacity_factor': (0.25, 2.0, {}),
    'layer_capacity_factors': (None, {'blocks.1.mlp': 0.25}, {}),  # the last block's layer: its own C
    'top_k': (1, 2, {}),
    'router_norm': (False, True, {}),
    'capacity_multiple_of': (None, 4, dict(capacity_factor=0.25)),  # token choice: a difference only with drops
    'batch_priority': (True, False, dict(capacity_factor=0.5)),
    'aux_loss_weight': (0.01, 0.1, {}),
    'z_loss_weight': (0.0, 1e-3, {}),
    'output_scale': (False, True, {}),
    'prefix_tokens': ('compete', 'always', dict(capacity_factor=0.25)),
    'num_shared_experts': (0, 1, {}),
    'expert_granularity': (1, 2, {}),
    'slots_per_expert': (1, 2, {}),
    'soft_scale': (1.0, 100.0, {}),
    'expert_init': ('copy', 'random', {}),
    'drop_ratio': (0.25, 0.75, dict(expert_init='drop')),
}


def _computation(options):
    """(logits, aux loss, parameters) of a model upcycled with `options` from the same dense model and seed."""
    dense = _dense('Mlp')
    torch.manual_seed(1)
    moe = upcycle(dense, **options).eval()
    with torch.no_grad(), capture_routing() as capture:
        logits = moe(_images(2))
    return logits, capture.aux_loss, {k: v.detach().clone() for k, v in moe.state_dict().items()}


def _differ(a, b) -> bool:
    (logits_a, aux_a, params_a), (logits_b, aux_b, params_b) = a, b
    if logits_a.shape != logits_b.shape or not torch.allclose(logits_a, logits_b, atol=1e-6):
        return True
    if not torch.allclose(aux_a, aux_b):
        return True
    return params_a.keys() != params_b.keys() or any(
        params_a[k].shape != params_b[k].shape or not torch.equal(params_a[k], params_b[k]) for k in params_a)


def test_option_table_covers_every_option():
    assert set(OPTION_VALUES) | {'router'} == set(MOE_OPTIONS)


@pytest.mark.parametrize('router', ['expert_choice', 'token_choice', 'soft'])
@pytest.mark.parametrize('option', list(OPTION_VALUES))
def test_every_option_changes_the_computation_or_is_refused_by_name(router, option):
    first, second, setup = OPTION_VALUES[option]
    base = dict(router=router, num_experts=4, moe_blocks=1)
    applies = option in MoeConfig(**dict(base, **(setup if option == 'drop_ratio' else {}))).to_dict()
    setup = {k: v for k, v in setup.items() if k != 'capacity_factor' or router != 'soft'}
    if not applies:
        with pytest.raises(ValueError, match=f'{option}={second!r} has no meaning with'):
            upcycle(_dense('Mlp'), **dict(base, **{option: second}))
        return
    base.update(setup)
    a = _computation(dict(base, **{option: first}))
    b = _computation(dict(base, **{option: second}))
    assert _differ(a, b), f'{option}: {first!r} and {second!r} compute the same with router={router}'


def test_the_options_a_saved_model_records_all_apply_to_its_router(tmp_path):
    """config.json's model arguments hold only options that change the computation: a meaningless one is refused at
    creation, so it never reaches a file."""
    import json
    from vit_moe.models import save_trained_model
    designs = dict(soft=dict(router='soft', slots_per_expert=2), token_choice=dict(router='token_choice', top_k=1),
                   drop=dict(expert_init='drop', drop_ratio=0.3))
    for name, options in designs.items():
        model = timm.create_model('vit_ti16_moe_upcycled', **ARCH, num_experts=4, **options)
        save_trained_model(model, tmp_path / name)
        args = json.loads((tmp_path / name / 'config.json').read_text())['model_args']
        assert {k: args[k] for k in options} == options
        assert MoeConfig.unused_options(args) == ()
        MoeConfig(**{k: v for k, v in args.items() if k in MOE_OPTIONS})  # valid as saved


@pytest.mark.parametrize('options, message', [
    (dict(router='soft', prefix_tokens='always'), "prefix_tokens='always' has no meaning with router='soft'"),
    (dict(router='soft', capacity_factor=2.0), "capacity_factor=2.0 has no meaning with router='soft'"),
    (dict(router='soft', top_k=4), "top_k=4 has no meaning with router='soft'"),
    (dict(router='expert_choice', top_k=4), "top_k=4 has no meaning with router='expert_choice'"),
    (dict(router='expert_choice', batch_priority=False), "batch_priority=False has no meaning with router='expert_ch"),
    (dict(expert_init='copy', drop_ratio=0.3), "drop_ratio=0.3 has no meaning with expert_init='copy'"),
])
def test_what_the_issue_found_silently_dropped_is_refused_in_one_line(options, message):
    """Through every entry point: the registered model, upcycle(), and train.py's --model-kwargs."""
    with pytest.raises(ValueError, match=message.replace('(', r'\(')):
        timm.create_model('vit_ti16_moe_upcycled', **ARCH, num_experts=4, **options)
    with pytest.raises(ValueError, match=message.replace('(', r'\(')):
        upcycle(_dense('Mlp'), num_experts=4, **options)


def test_a_folder_saved_with_an_option_its_router_ignored_still_loads_and_computes_the_same(tmp_path, caplog):
    """vit-moe 0.2 accepted router='soft' with top_k=4 and prefix_tokens='always' (and computed plain Soft MoE):
    such a config.json loads, the ignored options dropped with a warning."""
    import json
    from vit_moe.models import create_model_from_checkpoint, save_trained_model
    model = timm.create_model('vit_ti16_moe_upcycled', **ARCH, num_experts=4, router='soft').eval()
    folder = tmp_path / 'model'
    save_trained_model(model, folder)
    config = json.loads((folder / 'config.json').read_text())
    config['model_args'].update(top_k=4, prefix_tokens='always')  # what 0.2 wrote for such a run
    (folder / 'config.json').write_text(json.dumps(config))
    for load in (lambda: create_model_from_checkpoint('vit_ti16_moe_upcycled', str(folder)),
                 lambda: timm.create_model(f'local-dir:{folder}', pretrained=True)):
        reloaded = load().eval()
        with torch.no_grad():
            torch.testing.assert_close(reloaded(_images()), model(_images()))
    assert "ignoring top_k=4, prefix_tokens='always' saved in config.json" in caplog.text


# ------------------------------------------------------------------------------------ Soft MoE under autocast
def test_soft_moe_routing_is_float32_under_bf16_autocast():
    """Logits and both softmaxes in float32: under CPU bf16 autocast the dispatch and combine weights equal the
    float32 ones (autocast ran the logits matmul in bf16 before: weights moved by up to 17 %)."""
    torch.manual_seed(0)
    layer = moe_layer_like(Mlp(32, 64), router='soft', num_experts=4, slots_per_expert=2)
    assert isinstance(layer, SoftMoeMlp)
    x = torch.randn(2, 30, 32)
    reference = layer.router(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        routing = layer.router(x.bfloat16())
    assert routing.dispatch_weights.dtype == torch.float32 and routing.combine_weights.dtype == torch.float32
    torch.testing.assert_close(routing.dispatch_weights, layer.router(x.bfloat16().float()).dispatch_weights)
    torch.testing.assert_close(routing.combine_weights, layer.router(x.bfloat16().float()).combine_weights)
    assert (routing.dispatch_weights - reference.dispatch_weights).abs().max() < 0.05  # only the input's rounding
