"""upcycle(): exact dense reproduction at full capacity on timm ViT variants, copies, block choice, errors."""
import copy

import pytest
import timm
import torch

import vit_moe
from vit_moe import MoeMlp, capture_routing, resolve_moe_blocks, upcycle

from conftest import tiny_dense

VARIANTS = {
    'class_token': {},
    'no_class_token_avg_pool': dict(class_token=False, global_pool='avg'),
    'register_tokens': dict(reg_tokens=4),
    'layer_scale': dict(init_values=1e-2),
    'qk_norm': dict(qk_norm=True),
    'map_pooling': dict(global_pool='map'),
    'no_embed_class': dict(no_embed_class=True),
}


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_capacity_equal_experts_matches_dense(variant, images):
    dense = tiny_dense(**VARIANTS[variant])
    moe = upcycle(dense, num_experts=4, capacity_factor=4.0, moe_blocks=2).eval()
    torch.testing.assert_close(moe(images), dense(images), rtol=1e-5, atol=1e-5)


def test_top_k_equal_experts_with_norm_matches_dense(dense, images):
    moe = upcycle(dense, num_experts=4, router='token_choice', top_k=4, capacity_factor=1.0, router_norm=True)
    torch.testing.assert_close(moe.eval()(images), dense(images), rtol=1e-5, atol=1e-5)


def test_default_upcycling_drop_is_bounded_but_not_zero(dense, images):
    moe = upcycle(dense, num_experts=8).eval()  # C = 2, last 2 of 4 blocks
    no_mlp = copy.deepcopy(dense)  # the bound: the same blocks with their MLP removed
    for block in no_mlp.blocks[2:]:
        torch.nn.init.zeros_(block.mlp.fc2.weight)
        torch.nn.init.zeros_(block.mlp.fc2.bias)
    with torch.no_grad():
        ref, out, bound = dense(images), moe(images), no_mlp(images)
    rel = ((out - ref).norm() / ref.norm()).item()
    rel_bound = ((bound - ref).norm() / ref.norm()).item()
    print(f'upcycling drop at init: relative logit error {rel:.3f} (MLPs removed: {rel_bound:.3f})')
    assert 1e-3 < rel < rel_bound


def test_experts_are_exact_copies_and_the_rest_is_unchanged(dense):
    moe = upcycle(dense, num_experts=3, moe_blocks=[1, 3])
    for i in (1, 3):
        mlp, experts = dense.blocks[i].mlp, moe.blocks[i].mlp.experts
        for e in range(3):
            assert torch.equal(experts.fc1.weight[e], mlp.fc1.weight.t())
            assert torch.equal(experts.fc2.weight[e], mlp.fc2.weight.t())
            assert torch.equal(experts.fc1.bias[e], mlp.fc1.bias)
            assert torch.equal(experts.fc2.bias[e], mlp.fc2.bias)
    moe_state = moe.state_dict()
    for key, value in dense.state_dict().items():
        if '.mlp.' not in key or key.split('.')[1] not in ('1', '3'):
            assert torch.equal(moe_state[key], value), key
    assert isinstance(dense.blocks[1].mlp, timm.layers.Mlp)  # the dense model is left untouched


def test_random_expert_init_differs_from_dense(dense):
    moe = upcycle(dense, num_experts=2, moe_blocks=1, expert_init='random')
    assert not torch.equal(moe.blocks[3].mlp.experts.fc1.weight[0], dense.blocks[3].mlp.fc1.weight.t())
    assert not torch.equal(moe.blocks[3].mlp.experts.fc1.weight[0], moe.blocks[3].mlp.experts.fc1.weight[1])


@pytest.mark.parametrize('moe_blocks, depth, expected', [
    (None, 12, [6, 7, 8, 9, 10, 11]),
    (None, 4, [2, 3]),
    (5, 12, [7, 8, 9, 10, 11]),
    (1, 12, [11]),
    (0, 12, []),
    ([0, -1], 12, [0, 11]),
    ('every_other', 12, [1, 3, 5, 7, 9, 11]),
    ('every_3', 12, [2, 5, 8, 11]),
    ('all', 3, [0, 1, 2]),
])
def test_moe_blocks_forms(moe_blocks, depth, expected):
    assert resolve_moe_blocks(moe_blocks, depth) == expected


@pytest.mark.parametrize('moe_blocks, message', [
    (13, 'moe_blocks=13 is out of range for depth 12'),
    ([3, 12], 'moe_blocks entry 12 is out of range for depth 12'),
    ([3, 3], 'names a block twice'),
    ('sometimes', "moe_blocks='sometimes' is not valid"),
])
def test_impossible_moe_blocks_raise_clear_errors(moe_blocks, message):
    with pytest.raises(ValueError, match=message):
        resolve_moe_blocks(moe_blocks, 12)


def test_only_the_chosen_blocks_become_moe(dense):
    moe = upcycle(dense, num_experts=2, moe_blocks='every_other')
    assert [isinstance(b.mlp, MoeMlp) for b in moe.blocks] == [False, True, False, True]
    assert moe.moe_config.moe_blocks == [1, 3]


def test_non_vit_model_is_refused():
    with pytest.raises(TypeError, match="Expected a timm VisionTransformer or Eva .* got Sequential"):
        upcycle(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_routing_metrics_are_captured_during_a_forward(dense, images):
    moe = upcycle(dense, num_experts=4, router='token_choice', capacity_factor=0.5)
    with capture_routing() as routing:
        moe(images)
    assert set(routing.layers) == {'blocks.2.mlp', 'blocks.3.mlp'}
    assert routing.aux_loss.requires_grad and routing.aux_loss.item() > 0
    assert 0 < routing.dropped_fraction.item() < 1  # C = 0.5 must drop something
    for layer in routing.layers.values():
        assert layer['expert_load'].shape == (4,)
        torch.testing.assert_close(layer['importance'].sum(), torch.tensor(1.0))
    with capture_routing() as dense_routing:
        dense(images)
    assert dense_routing.aux_loss.item() == 0.0 and dense_routing.layers == {}


def test_upcycled_model_trains_with_grad_checkpointing(dense, images):
    moe = upcycle(dense, num_experts=4, router='token_choice').train()
    moe.set_grad_checkpointing(True)
    with capture_routing() as routing:
        logits = moe(images)
    (logits.logsumexp(-1).mean() + routing.aux_loss).backward()
    assert len(routing.records) == 2  # the recomputation in the backward records nothing
    assert moe.blocks[3].mlp.router.gate.weight.grad.abs().sum() > 0


def test_package_exports_upcycle():
    assert vit_moe.upcycle is upcycle


@pytest.mark.parametrize('ratio', [0.25, 0.5, 1.0])
def test_drop_upcycling_reinitialises_exactly_that_fraction_of_each_experts_hidden_units(dense, ratio):
    torch.manual_seed(1)
    moe = upcycle(dense, num_experts=4, expert_init='drop', drop_ratio=ratio)  # hidden 256, MoE in blocks 2, 3
    for i in (2, 3):
        fc1, fc2 = dense.blocks[i].mlp.fc1, dense.blocks[i].mlp.fc2
        experts = moe.blocks[i].mlp.experts
        hidden = fc1.out_features
        dropped = []
        for e in range(4):
            w1, b1, w2 = experts.fc1.weight[e], experts.fc1.bias[e], experts.fc2.weight[e]  # [D, H], [H], [H, D]
            kept = (w1 == fc1.weight.t()).all(0) & (b1 == fc1.bias) & (w2 == fc2.weight.t()).all(1)  # [H]
            changed = (w1 != fc1.weight.t()).all(0) & (w2 != fc2.weight.t()).all(1)  # whole columns and rows
            assert int((~kept).sum()) == round(ratio * hidden)  # exactly the fraction, nothing partially changed
            assert bool((kept | changed).all())
            torch.testing.assert_close(experts.fc2.bias[e], fc2.bias, rtol=0, atol=0)  # output bias untouched
            dropped.append(~kept)
        if ratio < 1:
            assert not torch.equal(dropped[0], dropped[1])  # drawn independently per expert
        new = experts.fc1.weight[0].detach()[:, dropped[0]]
        assert abs(float(new.std()) - float(fc1.weight.detach().std())) < 0.2 * float(fc1.weight.detach().std())  # the dense statistics


def test_drop_upcycling_through_timm_and_bad_ratio_is_named(dense, tmp_path):
    from safetensors.torch import save_file
    path = str(tmp_path / 'dense.safetensors')
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, path)
    torch.manual_seed(0)
    model = timm.create_model('vit_ti16_moe_upcycled', pretrained=True, expert_init='drop', drop_ratio=0.5,
                              output_scale=True, pretrained_cfg_overlay=dict(file=path, num_classes=10), img_size=32,
                              patch_size=8, embed_dim=64, depth=4, num_heads=2, num_experts=4, num_classes=10)
    assert float(model.blocks[3].mlp.output_scale.detach()) == 2.0  # new in the MoE model: from its own init (E / C)
    w = model.blocks[3].mlp.experts.fc1.weight  # [4, 64, 256]
    same = (w == dense.blocks[3].mlp.fc1.weight.t()).all(1)  # [4, 256]
    assert same.sum(1).tolist() == [128] * 4
    with pytest.raises(ValueError, match=r'drop_ratio=1.5 is not valid; expected a fraction in \[0, 1\]'):
        upcycle(dense, num_experts=4, expert_init='drop', drop_ratio=1.5)


def test_output_scale_starts_the_upcycled_model_close_to_the_dense_function(dense, images):
    torch.manual_seed(0)
    plain = upcycle(dense, num_experts=4, capacity_factor=2.0)  # combine weights sum to about C / E = 0.5
    torch.manual_seed(0)
    scaled = upcycle(dense, num_experts=4, capacity_factor=2.0, output_scale=True)
    assert float(scaled.blocks[3].mlp.output_scale.detach()) == 2.0  # E / C
    with torch.no_grad():
        reference = dense(images)
        gap_plain = (plain(images) - reference).abs().mean()
        gap_scaled = (scaled(images) - reference).abs().mean()
    assert gap_scaled < 0.7 * gap_plain
    scaled.train()
    with capture_routing() as routing:
        loss = scaled(images).logsumexp(-1).mean() + routing.aux_loss
    loss.backward()
    assert scaled.blocks[3].mlp.output_scale.grad is not None  # training can move it
    assert 'blocks.3.mlp.output_scale' in scaled.state_dict()


@pytest.mark.parametrize('variant', ['class_token', 'register_tokens'])
def test_prefix_tokens_always_get_exactly_the_dense_mlp_after_upcycling(variant, images):
    """'always': every expert processes the class token and registers; their combine weights are the router
    probabilities, which sum to 1, so with copied experts each prefix token's MLP output is the dense one at any C.
    With 'compete' and a small capacity some images' prefix tokens go unprocessed."""
    dense = tiny_dense(**VARIANTS[variant])
    block = dense.blocks[-1]
    captured = {}
    block.norm2.register_forward_hook(lambda module, args, out: captured.__setitem__('x', out))
    dense(images)
    x = captured['x']  # [B, T, D], the dense MLP's input in the last block
    P = dense.num_prefix_tokens
    for prefix_tokens, exact in (('always', True), ('compete', False)):
        moe = upcycle(dense, num_experts=4, capacity_factor=0.25, moe_blocks=1, prefix_tokens=prefix_tokens).eval()
        assert moe.moe_config.prefix_tokens == prefix_tokens
        layer = moe.blocks[-1].mlp
        assert layer.router.capacity(x.shape[1]) == (P + 1 if exact else 2)
        with torch.no_grad():
            out, expected = layer(x)[:, :P], block.mlp(x)[:, :P]
        if exact:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        else:
            assert (out - expected).abs().amax(dim=(1, 2)).max() > 1e-3  # at most P of E * 2 slots


def test_impossible_prefix_tokens_option_is_named(dense):
    with pytest.raises(ValueError, match="prefix_tokens='first' is not valid; accepted: compete, always"):
        upcycle(dense, num_experts=4, prefix_tokens='first')
    with pytest.raises(ValueError, match="prefix_tokens='first' is not valid"):
        timm.create_model('vit_ti16_moe_upcycled', img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                          num_experts=4, prefix_tokens='first')


def test_eva_is_upcycled_and_blocks_without_an_mlp_are_refused_naming_the_class(images):
    torch.manual_seed(0)
    eva = timm.create_model('eva02_base_patch14_224', img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                            ref_feat_shape=(4, 4), num_classes=10).eval()
    moe = upcycle(eva, num_experts=4, capacity_factor=4.0).eval()
    assert type(moe.blocks[1].mlp.experts).__name__ == 'ExpertSwiGLUs'
    torch.testing.assert_close(moe(images), eva(images), rtol=1e-5, atol=1e-5)
    parallel = timm.create_model('vit_tiny_patch16_224', img_size=32, patch_size=8, embed_dim=64, depth=2,
                                 num_heads=2, block_fn=timm.models.vision_transformer.ParallelScalingBlock)
    with pytest.raises(TypeError, match=r'^block 1 \(ParallelScalingBlock\) has no separate MLP module'):
        upcycle(parallel, num_experts=4)
