"""Saved model folders: metadata round trip (model args, data config, label names), honest source, atomic writes,
and clear errors for checkpoints that do not fit."""
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from timm.data import resolve_data_config

from vit_moe import CheckpointMismatchError
from vit_moe.models import (
    checkpoint_label_names, create_model_from_checkpoint, save_trained_model, trained_model_config,
)
from vit_moe.models import saving

from conftest import ROOT, TINY_VIT, tiny_dense

NAME = 'vit_ti16_moe_upcycled'
ARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2, num_experts=4, moe_blocks=[1, 3],
            capacity_factor=3.0, router='token_choice', top_k=1)
LABELS = ['cat', 'dog', 'eel']
DATA = dict(input_size=(3, 32, 32), mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), crop_pct=0.8, crop_mode='squash',
            interpolation='bilinear')


def _trained(seed: int = 0, **overrides) -> torch.nn.Module:
    """A 3-class MoE whose weights moved away from any init (a stand-in for training)."""
    torch.manual_seed(seed)
    model = timm.create_model(NAME, **dict(ARGS, num_classes=3, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _save(model, folder, **kwargs):
    return save_trained_model(model, folder, **dict(dict(label_names=LABELS, data_config=DATA, source='default'),
                                                    **kwargs))


def _tuples(config):
    return {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}


@pytest.mark.parametrize('form', ['folder', 'local-dir:folder', 'folder/model.safetensors'])
def test_model_folder_round_trip_restores_args_data_config_and_labels(tmp_path, images, form):
    trained = _trained()
    folder = _save(trained, tmp_path / 'run' / 'model')
    checkpoint = {'folder': str(folder), 'local-dir:folder': f'local-dir:{folder}',
                  'folder/model.safetensors': str(folder / 'model.safetensors')}[form]
    reloaded = create_model_from_checkpoint(NAME, checkpoint).eval()  # no model arguments given: all from the folder
    assert reloaded.moe_config == trained.moe_config
    assert reloaded.moe_config.moe_blocks == [1, 3] and reloaded.moe_config.router == 'token_choice'
    assert (reloaded.embed_dim, len(reloaded.blocks), reloaded.patch_embed.img_size) == (64, 4, (32, 32))
    assert reloaded.num_classes == 3 != timm.models.get_pretrained_cfg(NAME).num_classes
    assert torch.equal(reloaded(images), trained(images))
    assert resolve_data_config({}, model=reloaded) == DATA
    assert reloaded.pretrained_cfg['label_names'] == tuple(LABELS)
    assert checkpoint_label_names(checkpoint) == LABELS


def test_timm_local_dir_loads_the_folder_whole(tmp_path, images):
    trained = _trained()
    folder = _save(trained, tmp_path / 'model')
    reloaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    assert reloaded.moe_config == trained.moe_config
    assert torch.equal(reloaded(images), trained(images))
    assert _tuples(resolve_data_config({}, model=reloaded)) == DATA
    assert list(reloaded.pretrained_cfg['label_names']) == LABELS


def test_saved_config_keeps_timms_layout(tmp_path):
    model = _trained()
    ours = trained_model_config(model, LABELS, DATA, source='default')
    timm.models.save_for_hf(model, str(tmp_path / 'timm'), model_config=dict(label_names=LABELS))
    theirs = json.loads((tmp_path / 'timm' / 'config.json').read_text())
    assert list(ours) == list(theirs)
    assert ours['architecture'] == NAME and ours['num_classes'] == 3 and ours['label_names'] == LABELS
    assert {k: v for k, v in ours['model_args'].items() if k != 'num_classes'} == dict(
        ARGS, img_size=[32, 32], **model.moe_config.to_dict())  # every MoE option the router uses, as resolved
    assert ours['model_args']['batch_priority'] is True and ours['model_args']['top_k'] == 1  # a default, as given


def test_saved_config_names_the_source_instead_of_claiming_its_hub_weights(tmp_path):
    model = _trained()
    assert model.pretrained_cfg['tag'] and model.pretrained_cfg['hf_hub_id']  # the dense source's, in memory
    folder = _save(model, tmp_path / 'model')
    cfg = json.loads((folder / 'config.json').read_text())['pretrained_cfg']
    assert not {'tag', 'hf_hub_id', 'url', 'file', 'source', 'license'} & set(cfg)
    assert cfg['notes'][0] == 'source: vit_tiny_patch16_224.augreg_in21k_ft_in1k'
    assert not any('dense_source' in note or 'copied from the dense' in note for note in cfg['notes'])
    reloaded = create_model_from_checkpoint(NAME, str(folder))
    assert 'tag' not in reloaded.pretrained_cfg and 'hf_hub_id' not in reloaded.pretrained_cfg


def test_source_given_as_a_path_is_written_as_given(tmp_path):
    cfg = trained_model_config(_trained(), LABELS, DATA, source='runs/dense/model')['pretrained_cfg']
    assert cfg['notes'][0] == 'source: runs/dense/model'
    notes = trained_model_config(_trained(), source=None)['pretrained_cfg']['notes']
    assert notes[0] == 'source: random initialisation'


def test_another_class_count_gets_a_new_head_and_no_saved_label_names(tmp_path, images):
    trained = _trained()
    folder = _save(trained, tmp_path / 'model')
    reloaded = create_model_from_checkpoint(NAME, str(folder), num_classes=5).eval()
    assert reloaded(images).shape == (5, 5)
    assert 'label_names' not in reloaded.pretrained_cfg
    torch.testing.assert_close(reloaded.forward_head(reloaded.forward_features(images), pre_logits=True),
                               trained.forward_head(trained.forward_features(images), pre_logits=True))


def test_explicit_model_args_rebuild_a_model_timm_recorded_nothing_for(tmp_path, images):
    """timm < 1.0.31 does not record the creation arguments on the model: the caller's model_args then describe it."""
    trained = _trained()
    del trained._model_args
    folder = _save(trained, tmp_path / 'model', model_args=ARGS)
    assert torch.equal(create_model_from_checkpoint(NAME, str(folder)).eval()(images), trained(images))


def test_dense_folder_upcycles_with_its_data_config_and_labels(tmp_path, images):
    dense = tiny_dense(num_classes=3)
    folder = _save(dense, tmp_path / 'dense')
    moe = create_model_from_checkpoint(NAME, str(folder), **{k: v for k, v in ARGS.items() if k != 'img_size'})
    assert moe.patch_embed.img_size == (32, 32)  # from the saved input size
    assert resolve_data_config({}, model=moe) == DATA and moe.pretrained_cfg['label_names'] == tuple(LABELS)
    assert moe.num_classes == 3
    assert torch.equal(moe.head.weight, dense.head.weight)
    assert torch.equal(moe.blocks[1].mlp.experts.fc1.weight[2], dense.blocks[1].mlp.fc1.weight.t())


@pytest.mark.parametrize('kwargs, message', [
    (dict(label_names=['a', 'b']), 'label_names has 2 names but the model has 3 classes'),
    (dict(data_config=dict(DATA, scale=1.0)), r"data_config has unknown keys \['scale'\]; accepted keys: input_size"),
    (dict(data_config=dict(DATA, input_size=(3, 64, 64))), r'input_size=\(3, 64, 64\) does not match the model, built '
                                                           r'for images of \(32, 32\)'),
    (dict(model_args=dict(num_experts=8)), 'model_args num_experts=8 disagrees with the model, built with '
                                           'num_experts=4'),
    (dict(model_args=dict(act_layer=torch.nn.GELU)), 'model_args act_layer=.* is not JSON serializable'),
])
def test_bad_metadata_is_refused_before_anything_is_written(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _save(_trained(), tmp_path / 'model', **kwargs)
    assert not any(tmp_path.iterdir())


def test_a_failed_save_leaves_the_previous_folder_whole(tmp_path, images, monkeypatch):
    first = _trained(seed=0)
    folder = _save(first, tmp_path / 'model')

    def _disk_full(config, path):
        path.write_text('{"architect')  # half written, then the failure
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(saving, '_write_config', _disk_full)
    with pytest.raises(OSError, match='No space left'):
        _save(_trained(seed=1), folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model']  # no partial sibling left behind
    assert torch.equal(create_model_from_checkpoint(NAME, str(folder)).eval()(images), first(images))


def test_a_save_replaces_the_previous_folder(tmp_path, images):
    folder = _save(_trained(seed=0), tmp_path / 'model')
    (folder / 'stale.txt').write_text('from the first save')
    second = _trained(seed=1)
    _save(second, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model']
    assert sorted(p.name for p in folder.iterdir()) == ['config.json', 'model.safetensors']
    assert torch.equal(create_model_from_checkpoint(NAME, str(folder)).eval()(images), second(images))


_KILLED_SAVES = textwrap.dedent('''
    import os, signal, sys
    import torch, timm, vit_moe
    from vit_moe.models import saving
    torch.manual_seed(1)
    model = timm.create_model('vit_ti16_moe_upcycled', **{args}, num_classes=3)
    kill = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    for folder, point in zip(sys.argv[1::2], sys.argv[2::2]):
        pid = os.fork()  # one process per save, killed in it; one interpreter start-up for all of them
        if pid == 0:
            if point == 'config':  # killed while writing config.json
                saving._write_config = kill
            else:  # killed between moving the previous folder aside and renaming the new one in
                replace, calls = os.replace, []
                os.replace = lambda *a: calls.append(a) or (kill() if len(calls) == 2 else replace(*a))
            saving.save_trained_model(model, folder, label_names=['a', 'b', 'c'])
            os._exit(0)
        print(point, os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
''').format(args=repr(ARGS))
KILL_POINTS = ('config', 'rename')


@pytest.fixture(scope='module')
def killed_saves(tmp_path_factory):
    """point -> (folder that held a complete save when a process saving over it was killed there, its exit code)."""
    root = tmp_path_factory.mktemp('killed_saves')
    first, folders = _trained(seed=0), {}
    for point in KILL_POINTS:
        folders[point] = _save(first, root / point / 'model')
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1')
    run = subprocess.run([sys.executable, '-c', _KILLED_SAVES, *[a for p in KILL_POINTS for a in (folders[p], p)]],
                         env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    codes = dict(line.split() for line in run.stdout.splitlines())
    return {point: (folders[point], int(codes[point])) for point in KILL_POINTS}


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='SIGKILL of a forked process')
@pytest.mark.xdist_group('killed_saves')
@pytest.mark.parametrize('point', KILL_POINTS)
def test_a_killed_save_never_leaves_a_half_written_model_folder(killed_saves, images, point):
    first = _trained(seed=0)
    folder, code = killed_saves[point]
    parent = folder.parent
    assert code == -signal.SIGKILL
    leftovers = sorted(p.name for p in parent.iterdir() if p.name.startswith('model.'))
    if point == 'config':
        assert leftovers and all('.tmp-' in name for name in leftovers)
        assert torch.equal(create_model_from_checkpoint(NAME, str(folder)).eval()(images), first(images))
    else:
        assert not folder.exists()  # the documented window: the previous complete copy is the .old- sibling
        old = parent / next(name for name in leftovers if '.old-' in name)
        with pytest.raises(FileNotFoundError, match=f"left the previous complete copy '{old}': rename it to "):
            create_model_from_checkpoint(NAME, str(folder))
        assert torch.equal(create_model_from_checkpoint(NAME, str(old)).eval()(images), first(images))
    _save(first, folder)  # the next save removes what the dead process left
    assert sorted(p.name for p in parent.iterdir() if p.name.startswith('model')) == ['model']


@pytest.mark.parametrize('present', [[], ['config.json'], ['model.safetensors']])
def test_folder_without_its_files_is_refused_naming_it(tmp_path, present):
    folder = tmp_path / 'model'
    folder.mkdir()
    for name in present:
        (folder / name).write_text('{}')
    missing = {'config.json', 'model.safetensors'} - set(present)
    with pytest.raises(FileNotFoundError, match=f"checkpoint folder '{folder}' lacks .*{sorted(missing)[-1]}"):
        create_model_from_checkpoint(NAME, str(folder))


def test_mismatched_file_names_the_file_and_is_refused_before_timm_loads_it(tmp_path, caplog):
    path = tmp_path / 'small.safetensors'
    save_file(tiny_dense(embed_dim=32).state_dict(), str(path))
    caplog.set_level(logging.INFO)
    with pytest.raises(CheckpointMismatchError) as err:
        timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                          **dict(TINY_VIT, num_experts=4))
    message = str(err.value)
    assert f"file '{path}' does not fit {NAME} with patch_size=8, embed_dim=64" in message
    assert 'cls_token: checkpoint (1, 1, 32) vs model (1, 1, 64)' in message and 'Accepted: a dense checkpoint' in message
    # one readable line: the first mismatches and a count, not all 55 (it was 1,047 characters at the command line)
    assert re.search(r'; \.\.\. \(\d+ in all\)\. Accepted', message) and len(message) < 600 and '\n' not in message
    assert isinstance(err.value, ValueError)
    assert not [r for r in caplog.records if 'Loaded' in r.getMessage()]


def test_mismatched_folder_error_names_the_checkpoint_as_given_and_its_file(tmp_path):
    folder = _save(_trained(), tmp_path / 'run' / 'model')
    with pytest.raises(CheckpointMismatchError) as err:
        create_model_from_checkpoint(NAME, str(folder), num_experts=8)
    message = str(err.value)
    assert message.startswith(f"checkpoint '{folder}' given for {NAME}: file '{folder / 'model.safetensors'}' does not")
    assert 'num_experts=8' in message and 'expert' in message and 'Accepted:' in message


def test_a_compiled_models_state_dict_is_saved_with_plain_keys_and_prefixed_files_still_load(tmp_path, images):
    """accelerator.get_state_dict keeps torch.compile's wrapper: its keys start with `_orig_mod.`. Saved, they are
    plain; a file saved with them (vit-moe 0.2's compiled runs) loads through every loader."""
    model = _trained()
    compiled_keys = {f'_orig_mod.{k}': v for k, v in model.state_dict().items()}
    folder = _save(model, tmp_path / 'model', state_dict=compiled_keys)
    assert not any(k.startswith('_orig_mod.') for k in load_file(str(folder / 'model.safetensors')))
    save_file({f'_orig_mod.{k}': v.contiguous() for k, v in model.state_dict().items()},
              str(folder / 'model.safetensors'))  # as the old trainer wrote it
    for checkpoint in (str(folder), f'local-dir:{folder}', str(folder / 'model.safetensors')):
        reloaded = create_model_from_checkpoint(NAME, checkpoint).eval()
        torch.testing.assert_close(reloaded(images), model(images), rtol=0, atol=0, msg=checkpoint)


def test_a_scalar_output_scale_saved_by_older_versions_loads_as_shape_one(tmp_path, images):
    model = _trained(output_scale=True)
    assert model.blocks[3].mlp.output_scale.shape == (1,)  # FSDP2's fully_shard refuses 0-dim parameters
    state = {k: (v.reshape(()) if k.endswith('output_scale') else v).contiguous() for k, v in model.state_dict().items()}
    folder = _save(model, tmp_path / 'model')
    save_file(state, str(folder / 'model.safetensors'))
    reloaded = create_model_from_checkpoint(NAME, str(folder)).eval()
    torch.testing.assert_close(reloaded(images), model(images), rtol=0, atol=0)
    fresh = timm.create_model(NAME, **dict(ARGS, num_classes=3, output_scale=True))
    fresh.load_state_dict(state)  # plain load_state_dict too
    assert torch.equal(fresh.blocks[3].mlp.output_scale, model.blocks[3].mlp.output_scale)
