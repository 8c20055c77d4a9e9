"""Registered *_moe_upcycled models: pretrained cfg, full-size structure, timm pretrained loading, contract."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from vit_moe import DENSE_SOURCES, CheckpointMismatchError, convert_dense_to_moe, MoeMlp, VisionTransformerMoE

from conftest import TINY_MOE, TINY_VIT, tiny_dense


def _save(state_dict, path):
    if str(path).endswith('.safetensors'):
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)
    return str(path)


@pytest.mark.parametrize('name', sorted(DENSE_SOURCES))
def test_registered_with_the_dense_sources_pretrained_cfg(name):
    assert name in timm.list_models('*_moe_upcycled')
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    dense = timm.models.get_pretrained_cfg(DENSE_SOURCES[name]).to_dict()
    for key in ('input_size', 'mean', 'std', 'crop_pct', 'interpolation', 'num_classes', 'classifier', 'first_conv',
                'hf_hub_id'):
        assert cfg[key] == dense[key], key
    assert f'dense_source={DENSE_SOURCES[name]}' in cfg['notes']


@pytest.mark.parametrize('name', sorted(DENSE_SOURCES))
def test_full_size_structure_of_every_registered_model_on_meta_device(name):
    """MoE in the last half of the blocks, 32 experts of the dense MLP's class behind an expert choice router with
    C = 2; the parameters are the dense model's plus 31 more copies of each converted MLP plus the routers."""
    with torch.device('meta'):
        model = timm.create_model(name)
        dense = timm.create_model(DENSE_SOURCES[name].split('.')[0])
    depth = len(dense.blocks)
    assert [isinstance(b.mlp, MoeMlp) for b in model.blocks] == [False] * (depth - depth // 2) + [True] * (depth // 2)
    assert type(model).__mro__[2] is type(dense)  # UpcycledMoE + the dense source's timm class
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    expected = count(dense)
    for block, dense_block in zip(model.blocks[depth - depth // 2:], dense.blocks[depth - depth // 2:]):
        moe = block.mlp
        assert moe.num_experts == 32 and moe.config.capacity_factor == 2.0
        assert type(moe.router).__name__ == 'ExpertChoiceRouter'
        assert count(moe.experts) == 32 * count(dense_block.mlp)
        expected += 31 * count(dense_block.mlp) + count(moe.router)
    assert count(model) == expected
    assert model.pretrained_cfg['input_size'] == dense.pretrained_cfg['input_size']


def test_vit_b16_full_size_structure_on_meta_device():
    with torch.device('meta'):
        model = timm.create_model('vit_b16_moe_upcycled')
    assert len(model.blocks) == 12
    assert [isinstance(b.mlp, MoeMlp) for b in model.blocks] == [False] * 6 + [True] * 6
    assert all(b.mlp.num_experts == 32 for b in model.blocks[6:])
    assert model.blocks[6].mlp.router.capacity(197) == 13
    assert model.blocks[6].mlp.experts.fc1.weight.shape == (32, 768, 3072)
    params = sum(p.numel() for p in model.parameters())
    assert abs(params / 0.965e9 - 1) < 0.005, params
    assert model.default_cfg['input_size'] == (3, 224, 224) and model.num_features == 768


def test_model_kwargs_override_the_defaults():
    with torch.device('meta'):
        model = timm.create_model('vit_b16_moe_upcycled', num_experts=8, capacity_factor=1.0, moe_blocks=5,
                                  num_classes=10, router='token_choice', top_k=1, router_norm=True)
    assert [isinstance(b.mlp, MoeMlp) for b in model.blocks].count(True) == 5
    assert model.blocks[-1].mlp.num_experts == 8 and model.blocks[-1].mlp.router.top_k == 1
    assert model.blocks[-1].mlp.config.router_norm and model.head.out_features == 10
    assert model.moe_config.capacity_factor == 1.0


@pytest.mark.parametrize('kwargs, error, message', [
    (dict(num_experts=0), ValueError, 'num_experts=0 is not valid; expected an integer >= 1'),
    (dict(capacity_factor=0), ValueError, 'capacity_factor=0 is not valid; expected a number > 0'),
    (dict(router='token_choice', top_k=5), ValueError, r'top_k=5 is not valid; expected an integer in \[1, 4\]'),
    (dict(moe_blocks=[7]), ValueError, 'moe_blocks entry 7 is out of range for depth 4'),
    (dict(expert_init='zeros'), ValueError, "expert_init='zeros' is not valid; accepted: copy, random, drop"),
])
def test_impossible_options_raise_clear_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        timm.create_model('vit_ti16_moe_upcycled', **dict(TINY_MOE, **kwargs))


def _create(pretrained_file=None, overlay=None, **kwargs):
    overlay = dict(overlay or {}, file=pretrained_file) if pretrained_file else overlay
    return timm.create_model('vit_ti16_moe_upcycled', pretrained=bool(pretrained_file or overlay),
                             pretrained_cfg_overlay=overlay, **dict(TINY_MOE, **kwargs)).eval()


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_dense_file_through_pretrained_cfg_overlay_is_upcycled(tmp_path, images, suffix):
    dense = tiny_dense()
    path = _save(dense.state_dict(), tmp_path / f'dense{suffix}')
    moe = _create(path, overlay=dict(num_classes=10), capacity_factor=4.0)
    assert isinstance(moe, VisionTransformerMoE)
    torch.testing.assert_close(moe(images), dense(images), rtol=1e-5, atol=1e-5)
    assert torch.equal(moe.blocks[3].mlp.experts.fc1.weight[2], dense.blocks[3].mlp.fc1.weight.t())


def test_head_is_adapted_for_another_num_classes(tmp_path, images):
    dense = tiny_dense(num_classes=1000)
    moe = _create(_save(dense.state_dict(), tmp_path / 'dense.safetensors'), num_classes=7, capacity_factor=4.0)
    assert moe(images).shape == (5, 7)
    features = dense.forward_head(dense.forward_features(images), pre_logits=True)
    torch.testing.assert_close(moe.forward_head(moe.forward_features(images), pre_logits=True), features,
                               rtol=1e-5, atol=1e-5)


def test_saved_moe_file_loads_as_is(tmp_path, images):
    trained = _create(_save(tiny_dense().state_dict(), tmp_path / 'dense.safetensors'), overlay=dict(num_classes=10))
    with torch.no_grad():  # stand-in for training: experts and router move away from their init
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = _save(trained.state_dict(), tmp_path / 'moe.safetensors')
    reloaded = _create(path, overlay=dict(num_classes=10))
    torch.testing.assert_close(reloaded(images), trained(images))
    assert torch.equal(reloaded.blocks[2].mlp.router.gate.weight, trained.blocks[2].mlp.router.gate.weight)


def test_hub_path_loads_the_dense_weights_from_the_hub_cache(tmp_path, images, monkeypatch):
    """The real Hub code path (hf_hub_download), fed a local cache in offline mode: nothing is downloaded."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    repo = timm.models.get_pretrained_cfg('vit_ti16_moe_upcycled').hf_hub_id
    repo_dir = tmp_path / ('models--' + repo.replace('/', '--'))
    snapshot = repo_dir / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    (repo_dir / 'refs').mkdir()
    (repo_dir / 'refs' / 'main').write_text('0' * 40)
    dense = tiny_dense(num_classes=1000)
    _save(dense.state_dict(), snapshot / 'model.safetensors')
    moe = timm.create_model('vit_ti16_moe_upcycled', pretrained=True, cache_dir=str(tmp_path),
                            **dict(TINY_MOE, num_classes=1000, capacity_factor=4.0)).eval()
    torch.testing.assert_close(moe(images), dense(images), rtol=1e-5, atol=1e-5)


def test_missing_file_names_the_path(tmp_path):
    missing = str(tmp_path / 'nope.safetensors')
    with pytest.raises(FileNotFoundError, match='nope.safetensors'):
        _create(missing)


def test_checkpoint_of_another_size_is_refused_naming_both_shapes(tmp_path):
    small = tiny_dense(embed_dim=32)  # a "ViT-S file for a B/16 model"
    path = _save(small.state_dict(), tmp_path / 'small.safetensors')
    with pytest.raises(CheckpointMismatchError) as err:
        _create(path, overlay=dict(num_classes=10))
    assert 'cls_token: checkpoint (1, 1, 32) vs model (1, 1, 64)' in str(err.value)
    assert 'missing keys' not in str(err.value) and 'unexpected keys' not in str(err.value)


def test_mismatched_mlp_names_the_dense_key_and_both_shapes():
    dense_state = tiny_dense(mlp_ratio=2.0).state_dict()
    with pytest.raises(CheckpointMismatchError, match=r'blocks.0.mlp.fc1.weight: checkpoint \(128, 64\) vs model '
                                                      r'\(256, 64\)'):
        convert_dense_to_moe(dense_state, timm.create_model('vit_ti16_moe_upcycled', **TINY_MOE, moe_blocks='all'))


def test_checkpoint_with_missing_and_unexpected_keys_is_refused(tmp_path):
    state = tiny_dense().state_dict()
    state.pop('norm.weight')
    state['extra.weight'] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match=r'missing keys: norm.weight \| unexpected keys: extra.weight'):
        _create(_save(state, tmp_path / 'bad.pth'), overlay=dict(num_classes=10))


@pytest.mark.parametrize('name', ['corrupt.safetensors', 'corrupt.pth'])
def test_corrupt_file_is_refused_naming_the_path(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b'not a checkpoint at all')
    with pytest.raises(ValueError, match=f"file '{path}' is not a readable"):
        _create(str(path))
    assert path.read_bytes() == b'not a checkpoint at all'  # left as it was


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_checkpoint_head_is_kept_when_its_class_count_matches(tmp_path, images, suffix):
    from vit_moe.models import checkpoint_num_classes, create_model_from_checkpoint
    dense = tiny_dense()  # 10 classes
    path = _save({'state_dict': dense.state_dict()} if suffix == '.pth' else dense.state_dict(),
                 tmp_path / f'dense{suffix}')
    assert checkpoint_num_classes(path) == 10
    moe = create_model_from_checkpoint('vit_ti16_moe_upcycled', path, **dict(TINY_MOE, capacity_factor=4.0)).eval()
    torch.testing.assert_close(moe(images), dense(images), rtol=1e-5, atol=1e-5)
