"""Training with Accelerate: learning, reload, exact resume, SIGTERM, NaN guard, two processes, bad data."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from PIL import Image

from vit_moe.data import BadImageError
from vit_moe.layers import RoutingCapture
from vit_moe.training import NonFiniteLossError, latest_checkpoint, train, validate

from conftest import ROOT, TRAIN_MOE, launch_processes, log_records, make_image_folder, run_script, script_env, tiny_config


def test_few_steps_lower_the_loss_and_the_saved_model_reloads_through_timm(tmp_path, data):
    cfg = tiny_config(tmp_path, steps=20)
    summary = train(cfg)
    assert yaml.safe_load((tmp_path / 'run' / 'config.yaml').read_text()) == cfg.to_dict()  # the resolved config
    losses = [r['loss'] for r in log_records(summary['output_dir'])]
    assert len(losses) == 20
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    assert summary['eval']['num_samples'] == 15 and summary['eval']['top1'] > 60
    assert sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir()) == [
        'checkpoint_step_12', 'checkpoint_step_16', 'checkpoint_step_20']  # every 4 steps, the newest 3
    model_dir = Path(summary['model_dir'])
    assert (model_dir / 'model.safetensors').is_file() and (model_dir / 'config.json').is_file()
    record = log_records(summary['output_dir'])[-1]
    assert set(record['expert_load']) == {'blocks.1.mlp'} and len(record['importance']['blocks.1.mlp']) == 4

    from_dir = timm.create_model(f'local-dir:{model_dir}', pretrained=True).eval()
    from_file = timm.create_model('vit_ti16_moe_upcycled', pretrained=True, num_classes=3,
                                  pretrained_cfg_overlay=dict(file=str(model_dir / 'model.safetensors'),
                                                              num_classes=3), **TRAIN_MOE).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(from_dir(x), from_file(x), rtol=0, atol=0)
    # the reloaded model scores exactly what the run's final evaluation scored
    result = validate('vit_ti16_moe_upcycled', str(model_dir), str(data), num_workers=0)
    assert result['top1'] == summary['eval']['top1']
    assert abs(result['loss'] - summary['eval']['loss']) < 1e-5


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path, data):
    # 36 images / batch 6 = 6 batches an epoch: the resume at step 4 is mid-epoch and the run crosses an epoch
    augment = dict(mixup=0.4, label_smoothing=0.1, model_kwargs=dict(TRAIN_MOE, drop_rate=0.1))
    full = train(tiny_config(tmp_path, output_dir=str(tmp_path / 'full'), steps=9, **augment))
    first_checkpoint = tmp_path / 'full' / 'checkpoints' / 'checkpoint_step_4'
    resumed = train(tiny_config(tmp_path, output_dir=str(tmp_path / 'resumed'), steps=9,
                                resume=str(first_checkpoint), **augment))
    expected = [r['loss'] for r in log_records(full['output_dir'])][4:]
    got = [r['loss'] for r in log_records(resumed['output_dir'])]
    assert [r['step'] for r in log_records(resumed['output_dir'])] == [5, 6, 7, 8, 9]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert resumed['eval']['loss'] == pytest.approx(full['eval']['loss'], rel=1e-5)


def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path, data, monkeypatch):
    calls = {'n': 0}
    real = RoutingCapture.aux_loss.fget

    def poisoned(capture):
        calls['n'] += 1
        return real(capture) + (float('nan') if calls['n'] == 3 else 0.0)  # step 3

    monkeypatch.setattr(RoutingCapture, 'aux_loss', property(poisoned))
    with pytest.raises(NonFiniteLossError, match=r'non-finite loss \(nan\) at step 3.*checkpoint_step_2'):
        train(tiny_config(tmp_path, checkpoint_every=2))
    checkpoints = sorted(p.name for p in (tmp_path / 'run' / 'checkpoints').iterdir())
    assert checkpoints == ['checkpoint_step_2']  # untouched
    state = torch.load(tmp_path / 'run/checkpoints/checkpoint_step_2/custom_checkpoint_0.pkl', weights_only=True)
    assert state['step'] == 2
    assert not (tmp_path / 'run' / 'model').exists()


def _cli_args(tmp_path, **overrides):
    values = dict(model='vit_ti16_moe_upcycled', model_kwargs=json.dumps(TRAIN_MOE), data_dir=str(tmp_path / 'data'),
                  output_dir=str(tmp_path / 'run'), batch_size=4, num_workers=0, steps=6, log_every=1,
                  checkpoint_every=3, trackers='none', progress='false', hflip=0.0)
    values.update(overrides)
    return [f'--{k}={v}' for k, v in values.items()]


def test_sigterm_saves_a_checkpoint_then_exits(tmp_path, data):
    env = script_env()
    proc = subprocess.Popen([sys.executable, 'train_scripts/train.py', *_cli_args(tmp_path, steps=100000,
                            checkpoint_every=100000)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = tmp_path / 'run' / 'log.jsonl'
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count('\n') >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    checkpoint = latest_checkpoint(str(tmp_path / 'run'))
    assert checkpoint is not None and (checkpoint / 'model.safetensors').is_file()
    state = torch.load(checkpoint / 'custom_checkpoint_0.pkl', weights_only=True)
    assert state['step'] >= 2
    assert 'interrupted at step' in stderr


def test_two_processes_train_and_count_every_validation_sample_once(tmp_path):
    make_image_folder(tmp_path / 'data', per_class=(8, 5))  # 15 val images: not a multiple of 2 x batch 4
    launch = launch_processes(2)
    result = run_script([*launch, 'train_scripts/train.py', *_cli_args(tmp_path)])
    assert result.returncode == 0, result.stderr[-3000:]
    start = log_records(tmp_path / 'run', 'start')[0]
    assert (start['num_processes'], start['distributed_type']) == (2, 'MULTI_CPU')  # not two independent runs
    evals = log_records(tmp_path / 'run', 'eval')
    assert evals[-1]['num_samples'] == 15
    train_records = log_records(tmp_path / 'run')
    assert [r['step'] for r in train_records] == list(range(1, 7))
    assert train_records[-1]['images_per_s'] > 0

    out = tmp_path / 'two.json'
    result = run_script([*launch, 'train_scripts/validate.py', '--model', 'vit_ti16_moe_upcycled', '--checkpoint',
                          str(tmp_path / 'run' / 'model'), '--data-dir', str(tmp_path / 'data'), '--batch-size', '4',
                          '--num-workers', '0', '--json', str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(out.read_text())
    one = validate('vit_ti16_moe_upcycled', str(tmp_path / 'run' / 'model'), str(tmp_path / 'data'), batch_size=4,
                   num_workers=0)
    assert two['num_samples'] == one['num_samples'] == 15
    assert two['top1'] == pytest.approx(one['top1']) and two['loss'] == pytest.approx(one['loss'], rel=1e-5)


def test_missing_data_dir_and_split_are_named(tmp_path, data):
    with pytest.raises(FileNotFoundError, match=f"data_dir '{tmp_path}/nowhere' does not exist"):
        train(tiny_config(tmp_path, data_dir=str(tmp_path / 'nowhere')))
    with pytest.raises(FileNotFoundError, match=r"split folder '.*data/validation' does not exist \(found: train, val\)"):
        train(tiny_config(tmp_path, val_split='validation'))


def test_empty_class_folder_is_named(tmp_path, data):
    (data / 'train' / 'class_9').mkdir()
    with pytest.raises(ValueError, match=r"class folder '.*train/class_9' holds no images"):
        train(tiny_config(tmp_path))


def test_val_class_unknown_to_train_is_named(tmp_path, data):
    (data / 'val' / 'class_7').mkdir()
    Image.new('RGB', (12, 12)).save(data / 'val' / 'class_7' / 'a.png')
    with pytest.raises(ValueError, match=r"class folders \['class_7'\] that the train split does not have"):
        train(tiny_config(tmp_path))


@pytest.fixture
def corrupt(data):
    path = data / 'train' / 'class_1' / 'broken.png'
    path.write_bytes(b'\x89PNG\r\n\x1a\n this is not an image')
    return path


def test_corrupt_image_is_skipped_with_its_path_by_default(tmp_path, corrupt, caplog):
    summary = train(tiny_config(tmp_path, steps=7))  # 37 images / batch 6: every image is read
    assert summary['skipped_images'] == [str(corrupt)]
    assert str(corrupt) in caplog.text
    assert corrupt.read_bytes().startswith(b'\x89PNG')  # nothing deleted or rewritten


def test_corrupt_image_stops_the_run_with_its_path_under_error_policy(tmp_path, corrupt):
    with pytest.raises(BadImageError, match=f"cannot read image '{corrupt}'"):
        train(tiny_config(tmp_path, steps=7, bad_image_policy='error'))


def test_verify_images_reports_corrupt_files_before_training(tmp_path, corrupt):
    with pytest.raises(ValueError, match=f"1 unreadable image\\(s\\): {corrupt}"):
        train(tiny_config(tmp_path, verify_images=True, bad_image_policy='error'))
    assert not (tmp_path / 'run' / 'checkpoints').exists()


def test_gradient_accumulation_bf16_and_tensorboard(tmp_path, data):
    summary = train(tiny_config(tmp_path, steps=3, grad_accum_steps=2, mixed_precision='bf16',
                                trackers='tensorboard', checkpoint_every=100))
    records = log_records(summary['output_dir'])
    assert [r['step'] for r in records] == [1, 2, 3]  # optimizer steps, each over 2 micro-batches
    state = torch.load(latest_checkpoint(summary['output_dir']) / 'custom_checkpoint_0.pkl', weights_only=True)
    assert dict(state, elapsed_s=0) == dict(step=3, batches=6, num_processes=1, elapsed_s=0) and state['elapsed_s'] > 0
    assert all(np.isfinite(r['loss']) for r in records)
    assert list((tmp_path / 'run').rglob('events.out.tfevents*'))


def test_unreadable_images_with_two_workers_are_reported_once_and_left_out_of_evaluation(tmp_path, data):
    bad_train = data / 'train' / 'class_1' / 'broken.png'
    bad_val = data / 'val' / 'class_2' / 'broken.png'
    for path in (bad_train, bad_val):
        path.write_bytes(b'\x89PNG\r\n\x1a\n this is not an image')
    result = run_script([sys.executable, 'train_scripts/train.py', *_cli_args(tmp_path, num_workers=2, steps=14)])
    assert result.returncode == 0, result.stderr[-3000:]
    # 37 train images / batch 4: two epochs, fresh workers each epoch, yet one warning per file
    assert result.stderr.count(f'skipping unreadable image {str(bad_train)!r}') == 1
    assert result.stderr.count(f'skipping unreadable image {str(bad_val)!r}') == 1
    logged = {r['path']: r['split'] for r in log_records(tmp_path / 'run', 'bad_image')}
    assert logged == {str(bad_train): 'train', str(bad_val): 'val'}
    final = log_records(tmp_path / 'run', 'eval')[-1]
    assert (final['num_samples'], final['num_excluded'], final['excluded']) == (15, 1, [str(bad_val)])


def test_evaluation_scores_distinct_images_only(tmp_path, data):
    torch.manual_seed(0)  # the same random model for both evaluations
    clean = validate('vit_ti16_moe_upcycled', None, str(data), batch_size=4, num_workers=0,
                     model_kwargs=TRAIN_MOE)
    (data / 'val' / 'class_0' / 'zz_broken.png').write_bytes(b'not an image')  # sorts last in its class
    torch.manual_seed(0)
    with_bad = validate('vit_ti16_moe_upcycled', None, str(data), batch_size=4, num_workers=2,
                        model_kwargs=TRAIN_MOE)
    assert (with_bad['num_samples'], with_bad['num_excluded']) == (15, 1)
    assert with_bad['excluded'] == [str(data / 'val' / 'class_0' / 'zz_broken.png')]
    assert with_bad['top1'] == clean['top1'] and with_bad['loss'] == pytest.approx(clean['loss'], rel=1e-6)


def test_eval_at_start_scores_the_model_before_the_first_step(tmp_path, data):
    summary = train(tiny_config(tmp_path, steps=2, eval_at_start=True))
    evals = log_records(summary['output_dir'], 'eval')
    assert [r['step'] for r in evals] == [0, 2] and evals[0]['num_samples'] == 15
