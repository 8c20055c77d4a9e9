"""Training with Accelerate: learning, reload, exact resume, SIGTERM, NaN guard, two processes, bad data."""
import contextlib
import copy
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import timm
import torch
import yaml
from PIL import Image

from vit_moe.data import BadImageError
from vit_moe.layers import RoutingCapture
from vit_moe.training import NonFiniteLossError, Trainer, latest_checkpoint, train, validate

from conftest import (
    ROOT, TRAIN_MOE, launch_processes, log_records, run_front_end, run_script, script_env, tiny_config,
    train_state_of,
)
from trainer_driver import Launcher


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


def test_a_resumed_log_reads_as_one_run_when_the_resume_splits_a_logging_window(tmp_path, data):
    """log_every 3, checkpoint at step 4: the window of steps 4-6 was open at the save; the resumed run's step-6
    record averages the same three steps as the uninterrupted run's (not only steps 5 and 6)."""
    options = dict(steps=9, log_every=3, checkpoint_every=4)
    full = train(tiny_config(tmp_path, output_dir=str(tmp_path / 'full'), **options))
    resumed = train(tiny_config(tmp_path, output_dir=str(tmp_path / 'resumed'), **options,
                                resume=str(tmp_path / 'full' / 'checkpoints' / 'checkpoint_step_4')))
    expected = {r['step']: r for r in log_records(full['output_dir'])}
    got = log_records(resumed['output_dir'])
    assert [r['step'] for r in got] == [6, 9]
    for record in got:
        for key in ('loss', 'task_loss', 'dropped_fraction'):
            assert record[key] == pytest.approx(expected[record['step']][key], rel=1e-5, abs=1e-7), key
        for layer, load in record['expert_load'].items():
            np.testing.assert_allclose(load, expected[record['step']]['expert_load'][layer], rtol=1e-5)


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
    assert train_state_of(tmp_path / 'run/checkpoints/checkpoint_step_2')['step'] == 2
    assert not (tmp_path / 'run' / 'model').exists()


def _cli_args(tmp_path, **overrides):
    values = dict(model='vit_ti16_moe_upcycled', model_kwargs=json.dumps(TRAIN_MOE), data_dir=str(tmp_path / 'data'),
                  output_dir=str(tmp_path / 'run'), batch_size=4, num_workers=0, steps=6, log_every=1,
                  checkpoint_every=3, trackers='none', progress='false', hflip=0.0)
    values.update(overrides)
    return [f'--{k}={v}' for k, v in values.items()]


# the stress tier (CI: tests/test_run_lock.py's SLURM script test, SIGTERM forwarded to a 2-process torchrun job's
# trainers, which save; tests/test_preemption.py's one-process SIGTERM + resume; tests/test_recipes.py's early-warning
# signal saved on every process)
@pytest.mark.stress
@pytest.mark.parametrize('processes', [1, 2])
def test_sigterm_to_every_process_of_the_job_saves_a_checkpoint_then_resumes(tmp_path, data, processes):
    """As a preempted job meets it (SLURM's scancel, `kill -TERM -<pgid>`): SIGTERM reaches every process at once,
    the launcher and the DataLoader workers included. Each trainer stops itself after step 3 (tests/trainer_driver.py),
    mid-epoch with its two workers running; the test then signals every process of the job, the workers first (the
    worst order for the trainers), and lets the trainers go on: all of them save at step 4."""
    launch = [sys.executable] if processes == 1 else launch_processes(2)
    proc = subprocess.Popen([*launch, 'tests/trainer_driver.py', 'stop', 'after_step', '3', 'train_scripts/train.py',
                             *_cli_args(tmp_path, steps=100000, checkpoint_every=100000, num_workers=2)], cwd=ROOT,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    job, seen = psutil.Process(proc.pid), []
    try:
        _sigterm_everyone_then_resume(proc, job, tmp_path, processes, launch, seen)
    finally:  # nothing left running, whatever failed (torchrun's trainers run in sessions of their own)
        with contextlib.suppress(psutil.Error):
            seen += job.children(recursive=True)
        for leftover in seen + [job]:
            with contextlib.suppress(psutil.Error):
                leftover.kill()


def _stopped_trainers(job: psutil.Process, processes: int):
    """The job's trainers, once every one has stopped itself (a state it reaches, not a moment to catch)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        trainers = [job] if processes == 1 else job.children()
        with contextlib.suppress(psutil.NoSuchProcess):
            if len(trainers) == processes and all(t.status() == psutil.STATUS_STOPPED for t in trainers):
                return trainers
        assert job.is_running() and job.status() != psutil.STATUS_ZOMBIE, 'the job ended before step 3'
        time.sleep(0.05)
    pytest.fail('the trainers did not reach step 3 in 300 s')


def _sigterm_everyone_then_resume(proc, job, tmp_path, processes, launch, seen):
    trainers = _stopped_trainers(job, processes)
    workers = [worker for trainer in trainers for worker in trainer.children()]
    seen += workers + trainers
    assert len(workers) == 2 * processes  # a stopped trainer starts and ends no worker: the set is fixed
    for p in workers + trainers + ([job] if processes == 2 else []):
        p.send_signal(signal.SIGTERM)
    for trainer in trainers:
        trainer.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=180)
    assert stderr.count('stopped by signal 15 at step 4') == processes, stderr[-3000:]
    assert 'is killed by signal' not in stderr  # no DataLoader worker died of it
    # the trainers exit quietly; torchrun's own agent reports the signal it got with one traceback of its own
    assert stderr.count('Traceback (most recent call last)') == (processes == 2) and ('SignalException' in stderr) == (
        processes == 2)
    if processes == 1:
        assert proc.returncode == 128 + signal.SIGTERM
    checkpoint = latest_checkpoint(str(tmp_path / 'run'))
    assert checkpoint is not None and (checkpoint / 'state' / '.metadata').is_file()
    step = train_state_of(checkpoint)['step']
    assert step == 4
    resumed = run_script([*launch, 'train_scripts/train.py', *_cli_args(tmp_path, steps=step + 2, num_workers=2,
                                                                         resume='latest')])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r['step'] for r in log_records(tmp_path / 'run')] == list(range(1, step + 3))


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


def test_every_accumulated_step_is_the_mean_gradient_of_exactly_grad_accum_steps_batches(tmp_path, data):
    """36 images / batch 4 = 9 micro-batches per epoch, accumulated in pairs under bf16: the 5th optimizer step spans
    the end of the first epoch. Each step's gradient must be that of the mean loss over its two micro-batches (not a
    short step over one micro-batch at the epoch end, whose loss Accelerate still divides by 2)."""
    trainer = Trainer(tiny_config(tmp_path, steps=6, grad_accum_steps=2, mixed_precision='bf16', grad_clip=None,
                                  batch_size=4, trackers='tensorboard', checkpoint_every=100))
    model, windows, window = trainer.unwrapped, [], []
    reference = copy.deepcopy(model)  # before the recording hook
    model.register_forward_pre_hook(lambda module, args: window[-1].update(images=args[0].detach().clone())
                                    if module.training else None)
    real_step, real_optimizer_step = trainer.train_step, trainer.optimizer.optimizer.step

    def train_step(images, targets):
        if not window:
            window.append(dict(params={k: v.detach().clone() for k, v in model.state_dict().items()}))
        else:
            window.append({})
        window[-1]['targets'] = targets.clone()
        real_step(images, targets)

    def optimizer_step(*args, **kwargs):
        windows.append((list(window), {n: p.grad.detach().clone() for n, p in model.named_parameters()}))
        window.clear()
        return real_optimizer_step(*args, **kwargs)

    trainer.train_step, trainer.optimizer.optimizer.step = train_step, optimizer_step
    summary = trainer.fit()
    assert [len(w) for w, _ in windows] == [2] * 6 and summary['step'] == 6
    for micro_batches, grads in windows:
        reference.load_state_dict(micro_batches[0]['params'])
        reference.zero_grad()
        for m in micro_batches:
            with torch.autocast('cpu', dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(reference(m['images']), m['targets'])
            (loss / 2).backward()
        for name, param in reference.named_parameters():
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-3, atol=1e-6, msg=name)
    state = train_state_of(latest_checkpoint(summary['output_dir']))
    assert dict(state, elapsed_s=0) == dict(step=6, num_processes=1, grad_accum_steps=2, global_batch=8,
                                            expert_parallel_size=1, launch='one process', elapsed_s=0,
                                            log_window=None, loss_scale=None)
    assert state['elapsed_s'] > 0
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


def test_per_sample_augmentations_are_seeded_without_touching_the_cuda_generators(data, monkeypatch):
    """The augmentation of a sample depends on (seed, epoch, index) only, and drawing it neither moves the global CPU
    generator nor reseeds the CUDA ones (torch.manual_seed would, and fork_rng(devices=[]) would not restore them:
    GPU dropout would then repeat the same masks on every process)."""
    from vit_moe.data import ImageFolderDataset, build_transforms
    from vit_moe.training import load_config
    reseeded = []
    monkeypatch.setattr(torch.cuda, 'manual_seed_all', lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, 'manual_seed', lambda seed: reseeded.append(seed))
    cfg = load_config(None, dict(scale=[0.2, 1.0], hflip=0.5, color_jitter=0.4))
    dataset = ImageFolderDataset(str(data), 'train')
    dataset.transform = build_transforms(dict(input_size=(3, 16, 16), interpolation='bilinear', mean=(0.5,) * 3,
                                              std=(0.5,) * 3, crop_pct=1.0), cfg, is_training=True)
    dataset.seed = 7
    cpu_state = torch.get_rng_state()
    first, again = dataset[3][0], dataset[3][0]
    dataset.set_epoch(1)
    other_epoch = dataset[3][0]
    assert torch.equal(first, again) and not torch.equal(first, other_epoch)
    assert torch.equal(torch.get_rng_state(), cpu_state) and reseeded == []


LONE_REFUSALS = {
    'torch.distributed.run': 'WORLD_SIZE=2: the launcher started 2 processes but Accelerate sees 1',
    'accelerate launch --cpu': 'accelerate launch --cpu with --num_processes > 1 starts a single process',
}
LONE_REFUSALS['server'] = LONE_REFUSALS['torch.distributed.run']


# CI: torch.distributed.run's processes as tests/trainer_driver.py's launch server forks them (the same environment),
# and the simple launcher's environment in this process (below); the stress tier: both real launches
@pytest.mark.parametrize('launcher', ['server', pytest.param('torch.distributed.run', marks=pytest.mark.stress),
                                      pytest.param('accelerate launch --cpu', marks=pytest.mark.stress)])
def test_a_launch_that_would_start_lone_processes_is_refused_before_anything_is_written(tmp_path, data, launcher):
    """torch.distributed.run without ACCELERATE_USE_CPU on a machine without GPUs, or `accelerate launch --cpu
    --num_processes 2` (Accelerate's simple launcher: one process), would have trained alone into one output folder."""
    env = script_env()
    expected = LONE_REFUSALS[launcher]
    if launcher == 'server':
        env.pop('ACCELERATE_USE_CPU')
        server = Launcher(ROOT, env)
        try:
            run = server.run('train_scripts/train.py', *_cli_args(tmp_path), processes=2)
        finally:
            server.close()
    else:
        if launcher == 'torch.distributed.run':
            env.pop('ACCELERATE_USE_CPU')
            command = launch_processes(2)
        else:
            command = [str(Path(sys.executable).parent / 'accelerate'), 'launch', '--cpu', '--num_processes', '2',
                       '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no']
        run = subprocess.run([*command, 'train_scripts/train.py', *_cli_args(tmp_path)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if 'train.py: error:' in line]
    assert lines and expected in lines[0] and 'ACCELERATE_USE_CPU=1 python -m torch.distributed.run' in lines[0], \
        run.stderr[-3000:]
    assert not (tmp_path / 'run').exists()


def test_the_simple_launchers_lone_process_is_refused_before_anything_is_written(tmp_path, data, monkeypatch):
    """What `accelerate launch --cpu --num_processes 2` starts (the launch itself: the stress tier, above): one process
    with ACCELERATE_USE_CPU and MASTER_PORT set and no WORLD_SIZE. train.py's main, run in this process, refuses it."""
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('ACCELERATE_USE_CPU', 'True')  # as accelerate/utils/launch.py sets them
    monkeypatch.setenv('MASTER_PORT', '29500')
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    rc, _, err = run_front_end('train_scripts/train.py', *_cli_args(tmp_path))
    assert rc == 2
    lines = [line for line in err.splitlines() if 'train.py: error:' in line]
    assert lines and LONE_REFUSALS['accelerate launch --cpu'] in lines[0], err[-3000:]
    assert 'ACCELERATE_USE_CPU=1 python -m torch.distributed.run' in lines[0]
    assert not (tmp_path / 'run').exists()


def test_a_run_refused_at_start_leaves_nothing_in_its_output_folder(tmp_path, data):
    with pytest.raises(ValueError, match='num_experts=0 is not valid; expected an integer >= 1'):
        train(tiny_config(tmp_path, model_kwargs=dict(TRAIN_MOE, num_experts=0)))
    assert not (tmp_path / 'run').exists()  # no config.yaml, no empty bad_images.jsonl
