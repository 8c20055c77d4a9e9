"""FSDP2 on CPU over gloo, through Accelerate's own FSDP2 preparation and the shipped config: the sharded run
computes what one process computes, each rank holds only its shard (the expert axis split), and the gathered
full model equals the single-process one."""
import json
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from conftest import ROOT, script_env
from trainer_driver import Launcher

pytestmark = pytest.mark.xdist_group('fsdp')  # one pytest-xdist worker: the module fixtures are built once

SETTINGS = dict(model_kwargs=dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_experts=4,
                                  num_classes=5, router='token_choice'),  # token choice: the aux loss is trained too
                steps=4, global_batch=8, lr=1e-3)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """tests/fsdp2_worker.py on one process (in this one: no sharding, no process group) and on 2 (FSDP2 over gloo:
    real processes, forked by tests/trainer_driver.py's launch server with torch.distributed.run's environment)."""
    out = tmp_path_factory.mktemp('fsdp')
    settings = dict(SETTINGS, out=str(out))
    launcher = Launcher(ROOT, script_env())  # starts importing while the one-process run trains
    try:
        import fsdp2_worker
        with torch.random.fork_rng(devices=[]):  # the worker seeds torch: this process's random state is kept
            fsdp2_worker.main(settings)
        two = launcher.run('tests/fsdp2_worker.py', json.dumps(settings), processes=2, timeout=300)
    finally:
        launcher.close()
    written = sorted(p.name for p in out.iterdir())  # tells a crash during the run from one at exit
    assert two.returncode == 0, f'outputs written: {written}\n{two.stderr[-3000:]}'
    return out


def test_sharded_losses_match_one_process_on_the_same_global_batch(runs):
    one, two = (json.loads((runs / f'result_{w}.json').read_text()) for w in (1, 2))
    assert two['world'] == 2
    np.testing.assert_allclose(two['losses'], one['losses'], rtol=1e-4, atol=1e-5)
    assert two['routed_layers'] == one['routed_layers'] == ['blocks.2.mlp', 'blocks.3.mlp']


def test_each_rank_holds_only_its_shard_split_along_the_expert_axis(runs):
    for rank in (0, 1):
        held = json.loads((runs / f'held_2_{rank}.json').read_text())
        expert = held['blocks.3.mlp.experts.fc1.weight']
        assert expert['global_shape'] == [4, 64, 256] and expert['local_shape'] == [2, 64, 256]  # 2 of 4 experts
        total = sum(np.prod(h['global_shape']) for h in held.values())
        local = sum(np.prod(h['local_shape']) for h in held.values())
        assert local <= total / 2 + 1000  # half of everything (dim 0 rounding aside), not a full replica


def test_gathered_full_model_equals_the_single_process_one_and_loads_in_one_process(runs):
    one, two = (load_file(str(runs / f'model_{w}.safetensors')) for w in (1, 2))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    model = timm.create_model('vit_ti16_moe_upcycled', **SETTINGS['model_kwargs'])
    model.load_state_dict(two)  # plain keys, full shapes: loads without any process group


def test_shipped_fsdp_configs_wrap_every_transformer_block(runs):
    sys.path.insert(0, str(ROOT / 'tests'))
    from fsdp_on_cpu import plugin_from_config
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    model = timm.create_model('vit_ti16_moe_upcycled', **SETTINGS['model_kwargs'])
    for name in ('fsdp2.yaml', 'fsdp2_bf16.yaml'):
        policy = fsdp2_prepare_auto_wrap_policy(plugin_from_config(ROOT / 'configs' / 'accelerate' / name), model)
        wrapped = [n for n, m in model.named_modules() if n and policy(m)]
        assert wrapped == [f'blocks.{i}' for i in range(4)], name


@pytest.mark.parametrize('model_name', ['eva02_b14_moe_upcycled', 'vit_b16_siglip_moe_upcycled',
                                        'vit_b14_reg4_dinov2_moe_upcycled', 'vit_base_patch16_224', 'eva02_base_patch14_224'])
def test_every_family_and_dense_source_gets_one_fsdp_unit_per_block(model_name):
    """The shipped configs name no class: the trainer (`wrap_every_block`) makes the model's block classes the units,
    for Eva's `EvaBlock` as for timm's `Block`, for the dense sources too; a config naming a class the model does not
    have (timm's `Block` for an Eva) is replaced by them."""
    sys.path.insert(0, str(ROOT / 'tests'))
    from fsdp_on_cpu import plugin_from_config
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from vit_moe.training.fsdp_wrap import wrap_every_block
    with torch.device('meta'):
        model = timm.create_model(model_name)
    plugin = plugin_from_config(ROOT / 'configs' / 'accelerate' / 'fsdp2.yaml')
    plugin.transformer_cls_names_to_wrap = ['Block']  # what the configs named before
    classes = wrap_every_block(model, plugin)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [n for n, m in model.named_modules() if n and policy(m)]
    assert wrapped == [f'blocks.{i}' for i in range(len(model.blocks))] and classes == [type(model.blocks[0]).__name__]
