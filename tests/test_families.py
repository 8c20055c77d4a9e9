"""Every registered backbone family through the whole pipeline, at a tiny size: the registered name upcycles a dense
model folder of its source architecture in one call (C = E reproduces it), trains a few steps with the Trainer, saves,
reloads through every loader with the trainer's metrics, exports to ONNX in float32 and int8 with layer-by-layer
parity, and gets a routing report.

Each family keeps what makes it itself (class token or not, registers, LayerScale, MAP head, pre-norm, quick_gelu,
rotary embeddings, its MLP class); only the widths are tiny (16 px, patch 4, dim 32, depth 2, MoE in the last block).
"""
import json

import onnx
import pytest
import timm
import torch

from vit_moe import DENSE_SOURCES, MoeMlp, StackedLinear
from vit_moe.analysis import routing_report
from vit_moe.models import create_model_from_checkpoint, save_trained_model
from vit_moe.onnx import check_onnx_parity, export_onnx, float_expert_weights, quantize_onnx
from vit_moe.training import load_config, train, validate

from conftest import make_image_folder

ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
MOE = dict(num_experts=4, moe_blocks=1)
# registered name -> (MLP class of its MoE block, prefix tokens); one per family, each MLP class at least once
FAMILIES = {
    'vit_s14_reg4_dinov2_moe_upcycled': ('Mlp', 5),  # LayerScale, 4 registers, no embed on prefix tokens (and
    # prefix_tokens='always': class token and registers in every expert's extra slots)
    'vit_g14_dinov2_moe_upcycled': ('GluMlp', 1),  # SwiGLUPacked: packed fc1, gate first, SiLU
    'deit3_b16_moe_upcycled': ('Mlp', 1),  # LayerScale, no_embed_class
    'vit_b16_siglip_moe_upcycled': ('Mlp', 0),  # no class token, MAP attention-pool head (with its own dense Mlp)
    'vit_b16_clip_moe_upcycled': ('Mlp', 1),  # pre-norm, quick_gelu
    'eva02_s14_moe_upcycled': ('GluMlp', 1),  # timm Eva: rope, packed SwiGLU
    'eva02_b14_moe_upcycled': ('SwiGLU', 1),  # timm Eva: rope, SwiGLU with hidden norm, separate q/k/v
}


def _arch(name: str) -> dict:
    if name.startswith('eva02'):
        return dict(ARCH, ref_feat_shape=(4, 4))
    return dict(ARCH, prefix_tokens='always') if 'reg4' in name else ARCH


def _family(name: str) -> str:
    return next((f for f in ('dinov2', 'deit3', 'siglip', 'clip', 'eva02') if f in name), 'augreg')


def test_every_registered_family_is_in_the_pipeline_matrix():
    # augreg ViTs (plain Mlp, class token) go through the same pipeline in test_combinations / test_training
    assert {_family(n) for n in DENSE_SOURCES} - {_family(n) for n in FAMILIES} == {'augreg'}


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('families') / 'data', per_class=(6, 3), size=16)


@pytest.mark.parametrize('name', list(FAMILIES))
def test_family_upcycles_trains_saves_reloads_exports_and_reports(name, data, tmp_path):
    mlp_class, num_prefix = FAMILIES[name]
    dense_arch = DENSE_SOURCES[name].split('.')[0]
    torch.manual_seed(0)
    dense_args = {k: v for k, v in _arch(name).items() if k != 'prefix_tokens'}
    dense = timm.create_model(dense_arch, num_classes=3, **dense_args).eval()
    assert type(dense.blocks[-1].mlp).__name__ == mlp_class and dense.num_prefix_tokens == num_prefix
    save_trained_model(dense, tmp_path / 'dense', label_names=['class_0', 'class_1', 'class_2'])

    # one call upcycles the dense folder; with every slot filled (C = E) it computes the dense model
    upcycled = create_model_from_checkpoint(name, str(tmp_path / 'dense'), capacity_factor=4.0,
                                            **dict(_arch(name), **MOE)).eval()
    assert [isinstance(b.mlp, MoeMlp) for b in upcycled.blocks] == [False, True]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(upcycled(x), dense(x), rtol=1e-5, atol=1e-5)

    # trained with the Trainer (C = 2: tokens compete), saved, reloaded through every loader
    cfg = load_config(None, dict(
        model=name, pretrained=str(tmp_path / 'dense'), model_kwargs=dict(_arch(name), **MOE),
        data_dir=str(data), output_dir=str(tmp_path / 'run'), batch_size=6, num_workers=0, steps=3, lr=3e-3,
        warmup_steps=1, log_every=1, checkpoint_every=100, trackers='none', progress=False, hflip=0.0,
        scale=[0.8, 1.0], color_jitter=0.0))
    logged = train(cfg)['eval']
    folder = tmp_path / 'run' / 'model'
    model = create_model_from_checkpoint(name, str(folder)).eval()
    experts = model.blocks[-1].mlp.experts
    assert not torch.equal(*(next(experts.parameters())[:2]))  # trained apart from the copies
    local = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(local(x), model(x), rtol=0, atol=0)
    reloaded = validate(name, str(folder), str(data), num_workers=0, batch_size=6)
    assert reloaded['top1'] == logged['top1'] and reloaded['loss'] == pytest.approx(logged['loss'], rel=1e-5)

    # ONNX float32 and int8, layer by layer
    float_file = export_onnx(model, tmp_path / 'model.onnx', expose_routing=True)
    quantize_onnx(float_file, tmp_path / 'model.int8.onnx', 'int8')  # what export_onnx(quantize='int8') writes
    for quantize, path in ((None, float_file), ('int8', tmp_path / 'model.int8.onnx')):
        results = check_onnx_parity(model, path, batch_sizes=(1, 3))
        assert all(r['ok'] and r['routing_checked'] for r in results.values()), (quantize, results)
        in_float = float_expert_weights(onnx.load(str(path)))
        if quantize:
            assert in_float == []
        else:  # the check sees every linear weight of the bank (fc1_g / fc1_x of a SwiGLU too)
            bank = [f'blocks.1.mlp.experts.{n}.weight' for n, m in experts.named_modules()
                    if isinstance(m, StackedLinear)]
            assert all(any(name.endswith(w) for name in in_float) for w in bank), (bank, in_float)

    # the routing report counts every token, prefix tokens included
    report = routing_report(model, str(data), str(tmp_path / 'report'), num_example_images=2, experts_shown=2,
                            progress=False)
    layer = report['layers']['blocks.1.mlp']
    assert layer['num_tokens'] == 16 + num_prefix and layer['grid'] == [4, 4]
    assert sum(layer['experts_per_token']['all']) == 9 * layer['num_tokens']
    assert json.loads((tmp_path / 'report' / 'report.json').read_text())['layers'].keys() == {'blocks.1.mlp'}
