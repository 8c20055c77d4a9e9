"""configs/finetune_<family>.yaml: each is a valid trainer config whose model upcycles its family's dense source at
full size (checked on the meta device: the dense checkpoint's keys and shapes through the model's own pretrained
filter, position embedding resampled), with that source's normalisation, 224 px, and layer-wise lr decay groups."""
import importlib
from pathlib import Path

import pytest
import timm
import torch

from vit_moe import DENSE_SOURCES, MoeMlp
from vit_moe.data.transforms import data_config_for
from vit_moe.training import load_config
from vit_moe.training.optim import param_groups

from conftest import ROOT

CONFIGS = sorted((ROOT / 'configs').glob('finetune_*.yaml'))


def test_a_finetune_config_for_every_family():
    assert {p.stem.split('_', 1)[1] for p in CONFIGS} == {'augreg', 'dinov2', 'deit3', 'siglip', 'clip', 'eva02'}


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: Path(p).stem)
def test_finetune_config_upcycles_its_dense_source_with_its_conventions(path):
    cfg = load_config(str(path))
    source = DENSE_SOURCES[cfg.model]
    assert cfg.pretrained == 'default' and cfg.layer_decay is not None and cfg.lr <= 1e-4
    with torch.device('meta'):
        model = timm.create_model(cfg.model, num_classes=7, **cfg.model_kwargs)
        dense = timm.create_model(source.split('.')[0])  # the source at its own size (DINOv2: 518 px)
    moe = [isinstance(b.mlp, MoeMlp) for b in model.blocks]
    assert moe == [False] * (len(moe) - len(moe) // 2) + [True] * (len(moe) // 2)
    assert model.blocks[-1].mlp.num_experts == 32 and model.blocks[-1].mlp.config.capacity_factor == 2.0

    data_config = data_config_for(model, cfg.input_size)
    source_cfg = timm.models.get_pretrained_cfg(source)
    assert data_config['input_size'] == (3, 224, 224)
    assert (data_config['mean'], data_config['std'], data_config['interpolation']) == \
        (source_cfg.mean, source_cfg.std, source_cfg.interpolation)

    # the dense checkpoint (its keys and shapes) through the model's pretrained filter: no mismatch, every expert
    # and every other tensor shaped as the model's (pos-embed resampled), a new head left to the model
    module = importlib.import_module(type(model).__module__)  # vision_transformer_moe or eva_moe
    filtered = module.checkpoint_filter_fn(dense.state_dict(), model)
    own = model.state_dict()
    assert {k for k in own if k not in filtered} <= {k for k in own if k.startswith('head.')} | {
        k for k in own if '.mlp.router.' in k}
    assert all(filtered[k].shape == own[k].shape for k in filtered if not k.startswith('head.'))

    # layer-wise lr decay: each MoE block's experts and router share their block's lr scale, no norm is decayed
    groups = param_groups(model, cfg.weight_decay, cfg.layer_decay)
    scale = {name: (g['lr_scale'], g['weight_decay']) for g in groups for name in g['param_names']}
    assert scale.keys() == dict(model.named_parameters()).keys()
    last = len(model.blocks) - 1
    assert scale[f'blocks.{last}.mlp.router.gate.weight'][0] == scale[f'blocks.{last}.mlp.experts.fc2.weight'][0] < 1
    decayed_norms = [n for n, (_, wd) in scale.items() if wd and ('norm' in n.split('.')[-2] or n.endswith('bias'))]
    assert decayed_norms == []
