"""Routers: capacity arithmetic, expert/token choice invariants, aux loss, float32 logits, errors."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from vit_moe import ExpertChoiceRouter, MoeConfig, TokenChoiceRouter, create_router
from vit_moe.layers.moe_config import expert_choice_slots, token_choice_slots


def expert_choice_capacity(tokens, experts, factor, multiple_of=None):
    return expert_choice_slots(tokens, 0, experts, factor, 1, multiple_of)


def token_choice_capacity(tokens, experts, factor, top_k, multiple_of=None):
    return token_choice_slots(tokens, experts, factor, top_k, 1, multiple_of)


def expert_choice(dim, experts, capacity_factor, priority_tokens=0, **options):
    return ExpertChoiceRouter(dim, MoeConfig(num_experts=experts, capacity_factor=capacity_factor, **options),
                              priority_tokens)


def token_choice(dim, experts, capacity_factor, priority_tokens=0, **options):
    config = MoeConfig(router='token_choice', num_experts=experts, capacity_factor=capacity_factor, **options)
    return TokenChoiceRouter(dim, config, priority_tokens)


def test_capacity_vit_b16_at_224_is_13_tokens_per_expert():
    assert expert_choice_capacity(197, 32, 2.0) == 13
    assert expert_choice_capacity(197, 32, 2.0, multiple_of=4) == 16  # V-MoE rounding
    assert token_choice_capacity(197, 32, 2.0, top_k=2) == 25


@given(tokens=st.integers(1, 600), experts=st.integers(1, 128), factor=st.floats(0.01, 64),
       multiple=st.sampled_from([None, 1, 4, 8]))
def test_capacity_is_ceil_of_factor_times_tokens_over_experts_clamped(tokens, experts, factor, multiple):
    cap = expert_choice_capacity(tokens, experts, factor, multiple)
    exact = math.ceil(factor * tokens / experts)
    if multiple:
        exact = math.ceil(exact / multiple) * multiple
    assert cap == max(1, min(exact, tokens))


def test_capacity_factor_equal_experts_takes_every_token():
    assert expert_choice_capacity(197, 32, 32.0) == 197


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2 ** 16), batch=st.integers(1, 4), tokens=st.integers(2, 40),
       experts=st.integers(1, 9), factor=st.sampled_from([0.5, 1.0, 2.0, 3.0]))
def test_expert_choice_each_expert_takes_its_top_capacity_tokens(seed, batch, tokens, experts, factor):
    torch.manual_seed(seed)
    router = expert_choice(16, experts, factor)
    x = torch.randn(batch, tokens, 16)
    routing = router(x)
    cap = expert_choice_capacity(tokens, experts, factor)
    assert routing.token_index.shape == (batch, experts, cap)
    probs = router.logits(x).softmax(-1).transpose(1, 2)  # [B, E, T]
    # gates are the router probabilities of the chosen tokens
    torch.testing.assert_close(routing.combine_weights, probs.gather(-1, routing.token_index))
    for b in range(batch):
        for e in range(experts):
            chosen = routing.token_index[b, e]
            assert len(set(chosen.tolist())) == cap  # no token twice
            rest = torch.ones(tokens, dtype=torch.bool)
            rest[chosen] = False
            if rest.any():
                assert probs[b, e, chosen].min() >= probs[b, e, rest].max()


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2 ** 16), tokens=st.integers(2, 40), experts=st.integers(2, 8),
       k=st.integers(1, 3), factor=st.sampled_from([0.5, 1.0, 1.5]), bpr=st.booleans())
def test_token_choice_slots_hold_top_k_choices_within_capacity(seed, tokens, experts, k, factor, bpr):
    k = min(k, experts)
    torch.manual_seed(seed)
    router = token_choice(16, experts, factor, top_k=k, batch_priority=bpr)
    x = torch.randn(2, tokens, 16)
    routing = router(x)
    probs = router.logits(x).softmax(-1)  # [B, T, E]
    topk = probs.topk(k, dim=-1).indices  # [B, T, k]
    filled = routing.combine_weights > 0  # [B, E, cap]
    kept = 0
    for b in range(2):
        seen = set()
        for e in range(experts):
            for slot in filled[b, e].nonzero().flatten().tolist():
                t = int(routing.token_index[b, e, slot])
                assert e in topk[b, t].tolist()
                assert routing.combine_weights[b, e, slot] == probs[b, t, e]
                assert (t, e) not in seen
                seen.add((t, e))
        kept += len(seen)
    assert math.isclose(1 - kept / (2 * tokens * k), float(routing.metrics['dropped_fraction']), abs_tol=1e-6)


def test_token_choice_position_priority_drops_the_last_tokens():
    router = token_choice(4, 2, capacity_factor=0.5, top_k=1, batch_priority=False)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1., 0, 0, 0], [0, 1., 0, 0]]))
    x = torch.zeros(1, 8, 4)
    x[..., 0] = torch.linspace(1, 2, 8)  # every token prefers expert 0, later tokens more strongly
    routing = router(x)
    cap = token_choice_capacity(8, 2, 0.5, 1)  # 2 slots
    assert routing.token_index[0, 0].tolist() == list(range(cap))  # first tokens win by position


def test_token_choice_batch_priority_keeps_most_confident_tokens():
    router = token_choice(4, 2, capacity_factor=0.5, top_k=1, batch_priority=True)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1., 0, 0, 0], [0, 1., 0, 0]]))
    x = torch.zeros(1, 8, 4)
    x[..., 0] = torch.linspace(1, 2, 8)
    routing = router(x)
    assert sorted(routing.token_index[0, 0].tolist()) == [6, 7]  # largest top-1 probability first


@settings(deadline=None, max_examples=25)
@given(seed=st.integers(0, 2 ** 16), tokens=st.integers(6, 40), experts=st.integers(2, 9), prefix=st.integers(1, 5),
       factor=st.sampled_from([0.5, 1.0, 2.0]))
def test_expert_choice_priority_tokens_fill_extra_slots_of_every_expert(seed, tokens, experts, prefix, factor):
    """Every expert takes the first P tokens in P extra slots (weights: their probabilities, summing to 1 over the
    experts) and chooses among the others exactly what a router without them chooses among those tokens (E >= 2:
    with one expert every token ties at probability 1)."""
    torch.manual_seed(seed)
    router = expert_choice(16, experts, factor, priority_tokens=prefix)
    x = torch.randn(2, tokens, 16)
    routing = router(x)
    rest_capacity = expert_choice_capacity(tokens - prefix, experts, factor)
    assert routing.token_index.shape == (2, experts, prefix + rest_capacity) and router.capacity(tokens) == \
        prefix + rest_capacity
    probs = router.logits(x).softmax(-1).transpose(1, 2)  # [B, E, T]
    torch.testing.assert_close(routing.combine_weights, probs.gather(-1, routing.token_index))
    assert (routing.token_index[..., :prefix].sort(-1).values == torch.arange(prefix)).all()
    plain = expert_choice(16, experts, factor)
    plain.load_state_dict(router.state_dict())
    others = plain.route(router.logits(x)[:, prefix:]).token_index + prefix  # [B, E, rest_capacity]
    assert torch.equal(routing.token_index[..., prefix:].sort(-1).values, others.sort(-1).values)
    per_token = torch.zeros(2, tokens).scatter_add(  # [B, T] each token's combine weights summed over the experts
        1, routing.token_index.flatten(1), routing.combine_weights.flatten(1))
    torch.testing.assert_close(per_token[:, :prefix], torch.ones(2, prefix))


def test_token_choice_priority_tokens_claim_their_experts_first():
    """Batch priority would drop the first two tokens (least confident); as priority tokens they are kept."""
    router = token_choice(4, 2, capacity_factor=0.5, top_k=1, batch_priority=True, priority_tokens=2)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1., 0, 0, 0], [0, 1., 0, 0]]))
    x = torch.zeros(1, 8, 4)
    x[..., 0] = torch.linspace(1, 2, 8)  # every token prefers expert 0, later tokens more strongly
    routing = router(x)
    assert sorted(routing.token_index[0, 0].tolist()) == [0, 1]  # 2 slots: the priority tokens, not tokens 6 and 7


def test_load_balancing_loss_is_its_weight_for_a_uniform_router():
    router = token_choice(8, 4, 2.0, top_k=2, aux_loss_weight=0.01)
    torch.nn.init.zeros_(router.gate.weight)
    routing = router(torch.randn(3, 10, 8))
    assert math.isclose(routing.aux_loss.item(), 0.01, rel_tol=1e-5)


def test_load_balancing_loss_rewards_spreading_the_first_choices():
    """Every token's first choice is expert 0 with probability p: f = (1, 0, 0, 0), so the loss is w * E * p, far
    above its weight (any assignment of a uniform router gives exactly the weight)."""
    router = token_choice(8, 4, 2.0, top_k=2, aux_loss_weight=0.01)
    logits = torch.tensor([3.0, 1.0, 0.0, -1.0]).expand(2, 6, 4)  # [B, T, E]
    p = logits[0, 0].softmax(-1)[0].item()
    assert math.isclose(router.route(logits).aux_loss.item(), 0.01 * 4 * p, rel_tol=1e-5) and p > 0.8


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), tokens=st.integers(1, 9), experts=st.integers(2, 6), k=st.integers(1, 2))
def test_load_balancing_loss_is_experts_times_first_choice_fraction_dot_mean_probability(seed, tokens, experts, k):
    logits = torch.randn(3, tokens, experts, generator=torch.Generator().manual_seed(seed)) * 3  # [B, T, E]
    router = token_choice(8, experts, 1.0, top_k=k, aux_loss_weight=0.5)
    expected = 0.0
    for image in logits:  # Switch / GShard: E * sum_e (fraction of tokens whose first choice is e) * (mean prob of e)
        probs = image.softmax(-1).tolist()
        first = [max(range(experts), key=lambda e: row[e]) for row in probs]
        expected += experts * sum(first.count(e) / tokens * sum(row[e] for row in probs) / tokens
                                  for e in range(experts)) / len(logits)
    assert math.isclose(router.route(logits).aux_loss.item(), 0.5 * expected, rel_tol=1e-5)


def test_z_loss_adds_log_sum_exp_squared():
    router = token_choice(8, 4, 2.0, aux_loss_weight=0.0, z_loss_weight=1e-3)
    torch.nn.init.zeros_(router.gate.weight)
    routing = router(torch.randn(1, 5, 8))
    assert math.isclose(routing.aux_loss.item(), 1e-3 * math.log(4) ** 2, rel_tol=1e-5)


def test_expert_choice_needs_no_aux_loss():
    routing = expert_choice(8, 4, 2.0)(torch.randn(2, 6, 8))
    assert routing.aux_loss.item() == 0.0


@pytest.mark.parametrize('router', ['expert_choice', 'token_choice'])
def test_router_norm_makes_each_routed_tokens_weights_sum_to_one(router):
    torch.manual_seed(0)
    r = create_router(16, MoeConfig(router=router, num_experts=4, router_norm=True))
    routing = r(torch.randn(2, 12, 16))
    sums = torch.zeros(2, 12).scatter_add(1, routing.token_index.flatten(1), routing.combine_weights.flatten(1))
    routed = sums > 0
    assert routed.any()
    torch.testing.assert_close(sums[routed], torch.ones(int(routed.sum())))


def test_router_init_is_normal_std_002_without_bias():
    torch.manual_seed(0)
    r = expert_choice(768, 32, 2.0)
    assert r.gate.bias is None
    assert abs(r.gate.weight.std().item() - 0.02) < 0.001
    assert abs(r.gate.weight.mean().item()) < 0.001


def test_router_logits_are_float32_under_bf16_autocast():
    r = expert_choice(16, 4, 2.0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert r.logits(torch.randn(1, 3, 16, dtype=torch.bfloat16)).dtype == torch.float32


@pytest.mark.parametrize('kwargs, message', [
    (dict(router='expert_choice', num_experts=0), 'num_experts=0 is not valid; expected an integer >= 1'),
    (dict(router='expert_choice', capacity_factor=0.0), 'capacity_factor=0.0 is not valid; expected a number > 0'),
    (dict(router='expert_choice', capacity_factor=-1), 'capacity_factor=-1 is not valid; expected a number > 0'),
    (dict(router='token_choice', top_k=5), 'top_k=5 is not valid; expected an integer in [1, 4]'),
    (dict(router='top_2'), "router='top_2' is not valid; accepted: expert_choice, token_choice, soft"),
    (dict(router='expert_choice', top_k=2), "top_k=2 has no meaning with router='expert_choice'"),
])
def test_impossible_router_options_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError) as err:
        MoeConfig(**dict(dict(num_experts=4), **kwargs))
    assert message in str(err.value)


def test_negative_priority_tokens_are_refused():
    with pytest.raises(ValueError, match='priority_tokens must be an integer >= 0, got -1'):
        expert_choice(8, 4, 2.0, priority_tokens=-1)


def test_soft_moe_has_no_slot_router():
    with pytest.raises(ValueError, match="router='soft' has no slot router"):
        create_router(8, MoeConfig(router='soft', num_experts=4))


@settings(deadline=None, max_examples=60)
@given(seed=st.integers(0, 2 ** 16), router=st.sampled_from(['expert_choice', 'token_choice']),
       groups=st.sampled_from([1, 2]), k=st.sampled_from([1, 2]), factor=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
       batch_priority=st.booleans(), router_norm=st.booleans())
def test_with_prefix_tokens_always_the_class_token_is_routed_as_at_full_capacity(seed, router, groups, k, factor,
                                                                                 batch_priority, router_norm):
    """README: prefix tokens claim their experts before any patch. So the class token's output does not depend on the
    capacity: at any C it is what it is when every slot is filled (every router, granularity, k and order)."""
    from timm.layers import Mlp
    from vit_moe.layers import moe_layer_like
    E, T = 8, 17
    options = dict(router=router, num_experts=E, expert_granularity=groups, prefix_tokens='always',
                   router_norm=router_norm)
    if router == 'token_choice':
        options.update(top_k=k, batch_priority=batch_priority)
    full_factor = E / groups / (k if router == 'token_choice' else 1)  # every slot of every expert filled
    torch.manual_seed(seed)
    dense = Mlp(16, 32)
    layers = [moe_layer_like(dense, num_prefix_tokens=1, capacity_factor=c, **options) for c in (factor, full_factor)]
    layers[0].router.gate.weight.data.normal_(std=1.0)  # a router that prefers some experts strongly
    layers[1].load_state_dict(layers[0].state_dict())
    assert layers[1].router.capacity(T) == T
    x = torch.randn(3, T, 16)
    with torch.no_grad():
        at_capacity, at_full = (layer(x) for layer in layers)
    torch.testing.assert_close(at_capacity[:, 0], at_full[:, 0], rtol=1e-5, atol=1e-6)


@given(tokens=st.integers(2, 300), prefix=st.integers(0, 5), experts=st.sampled_from([2, 8, 32]),
       factor=st.sampled_from([0.25, 0.5, 1.0, 2.0]), multiple=st.sampled_from([2, 4, 8]))
def test_capacity_multiple_of_rounds_every_slot_count_prefix_slots_included(tokens, prefix, experts, factor, multiple):
    config = MoeConfig(num_experts=experts, capacity_factor=factor, capacity_multiple_of=multiple,
                       prefix_tokens='always')
    unrounded = MoeConfig(num_experts=experts, capacity_factor=factor, prefix_tokens='always')
    slots, wanted = config.capacity(tokens, prefix), unrounded.capacity(tokens, prefix)
    assert slots == tokens or slots % multiple == 0
    assert wanted <= slots < wanted + multiple or slots == tokens


def test_the_reviews_case_65_tokens_with_a_class_token_gets_a_multiple_of_4_slots():
    config = MoeConfig(num_experts=8, capacity_factor=2.0, capacity_multiple_of=4, prefix_tokens='always')
    router = create_router(16, config, priority_tokens=1)
    assert router.capacity(65) == 20 and router(torch.randn(1, 65, 16)).token_index.shape == (1, 8, 20)
