"""Preemption as users meet it: SIGTERM / SIGKILL at any moment, resume in the same output folder, again and
again; the run ends with exactly the weights of an uninterrupted one and loses no completed checkpoint."""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vit_moe.training import ConfigError, complete_checkpoints, latest_checkpoint, train

from conftest import (
    ROOT, TRAIN_MOE, launch_processes, log_records, make_image_folder, run_script, script_env, tiny_config, train_state_of,
)
from trainer_driver import Launcher

pytestmark = pytest.mark.xdist_group('preemption')  # one pytest-xdist worker: the module fixtures are built once

# dropout and mixup make every RNG (torch, numpy, the data order) matter for an exact resume
RUN = dict(model='vit_ti16_moe_upcycled', model_kwargs=json.dumps(dict(TRAIN_MOE, drop_rate=0.1)), batch_size=6,
           num_workers=0, steps=10, lr=3e-3, warmup_steps=2, log_every=1, checkpoint_every=2, keep_checkpoints=2,
           trackers='none', progress='false', hflip=0.0, mixup=0.4)


def _args(data, output_dir, **overrides):
    values = dict(RUN, data_dir=str(data), output_dir=str(output_dir), **overrides)
    return [f'--{k}={v}' for k, v in values.items()]




def _weights(output_dir):
    return load_file(str(Path(output_dir) / 'model' / 'model.safetensors'))


def _assert_same_weights(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)


def _assert_checkpoints_whole(output_dir):
    """Every folder named like a checkpoint is complete and holds the model and the train state."""
    for path in (Path(output_dir) / 'checkpoints').glob('checkpoint_step_*'):
        assert (path / 'COMPLETE').is_file(), path
        assert (path / 'state' / '.metadata').is_file() and (path / 'trainer_state.json').is_file(), path


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('preemption') / 'data')


@pytest.fixture(scope='module')
def launcher():
    """Launches without an interpreter start-up each (tests/trainer_driver.py's launch server): a fresh process per
    launch, killed or ending as a `python train_scripts/train.py` one would."""
    server = Launcher(ROOT, script_env())
    yield server
    server.close()


@pytest.fixture(scope='module')
def uninterrupted(data, launcher):
    """The reference: the same run, never stopped (a process of its own, like the interrupted ones)."""
    out = data.parent / 'uninterrupted' / 'run'
    result = launcher.run('train_scripts/train.py', *_args(data, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(weights=_weights(out), losses=[r['loss'] for r in log_records(out)], output_dir=out)


def test_resume_after_resume_after_resume_in_the_same_folder(tmp_path, data):
    common = dict(data_dir=str(data), model_kwargs=dict(TRAIN_MOE, drop_rate=0.1), mixup=0.4, checkpoint_every=2,
                  keep_checkpoints=2)
    full = train(tiny_config(tmp_path, output_dir=str(tmp_path / 'full'), steps=9, **common))
    for steps in (3, 6, 9):  # a first run, then three resumes in place (the last one with nothing left to train)
        summary = train(tiny_config(tmp_path, steps=steps, resume='auto', **common))
        assert summary['step'] == steps
    train(tiny_config(tmp_path, steps=9, resume='latest', **common))
    records = log_records(tmp_path / 'run')
    assert [r['step'] for r in records] == list(range(1, 10))  # each step once: log.jsonl reads as one run
    np.testing.assert_allclose([r['loss'] for r in records], [r['loss'] for r in log_records(full['output_dir'])],
                               rtol=1e-5, atol=1e-6)
    assert [p.name for _, p in complete_checkpoints(tmp_path / 'run')] == ['checkpoint_step_8', 'checkpoint_step_9']
    _assert_same_weights(_weights(tmp_path / 'run'), _weights(full['output_dir']))
    resumes = log_records(tmp_path / 'run', 'resume')
    assert [r['step'] for r in resumes] == [3, 6, 9]  # the first run started fresh


DRIVER = 'tests/trainer_driver.py'  # kills or stops a trainer at an exact point (see its doc)


def _stopped(proc: subprocess.Popen) -> None:
    """Wait until `proc` (a child of this process) has stopped itself (SIGSTOP); fails if it exited instead."""
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f'the run ended (status {status}) before it reached the point to signal it at'


def test_sigterm_then_resume_in_the_same_folder_matches_an_uninterrupted_run(tmp_path, data, uninterrupted, launcher):
    """SIGTERM lands after step 3 (the trainer stops itself there, the test signals it and lets it go on): the run
    saves at the next step boundary, step 4, and the resume reaches the uninterrupted run's losses and weights.
    (The stopped run is a `python train_scripts/train.py` launch; the resume comes from the launch server.)"""
    out = tmp_path / 'run'
    proc = subprocess.Popen([sys.executable, DRIVER, 'stop', 'after_step', '3', 'train_scripts/train.py',
                             *_args(data, out)], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _stopped(proc)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    stopped_at = train_state_of(latest_checkpoint(out))['step']
    assert stopped_at == 4 and 'checkpoint_step_4' in stderr
    stop, = log_records(out, 'stop')  # what a script reads where a launcher hides the exit status
    assert (stop['signal'], stop['step']) == (signal.SIGTERM, 4)
    result = launcher.run('train_scripts/train.py', *_args(data, out, resume='latest'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'at step 4' in result.stderr  # the resume line names the step
    np.testing.assert_allclose([r['loss'] for r in log_records(out)], uninterrupted['losses'], rtol=1e-5, atol=1e-6)
    _assert_same_weights(_weights(out), uninterrupted['weights'])


# CI: test_sigkill_at_each_kind_of_point_in_turn_loses_nothing (each kill point once, on the launch server); the
# stress tier: each kill of a `python train_scripts/train.py` launch, resumed alone, and the random kills
@pytest.mark.stress
@pytest.mark.parametrize('target, n', [('step', 6), ('save', 2), ('prune', 1)])
def test_sigkill_during_a_step_a_save_or_a_deletion_loses_nothing(tmp_path, data, uninterrupted, target, n):
    """Killed inside a step, after a checkpoint's files are written but before it is renamed into place, and while an
    old checkpoint is being deleted."""
    out = tmp_path / 'run'
    killed = run_script([sys.executable, DRIVER, 'kill', target, str(n), 'train_scripts/train.py', *_args(data, out)])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    _assert_checkpoints_whole(out)
    before = latest_checkpoint(out)
    assert before is not None
    leftover = {'save': '.partial_step_*', 'prune': '.deleting_*'}.get(target)
    if leftover:  # what the kill left is not taken for a checkpoint, and is cleared on resume
        assert list((out / 'checkpoints').glob(leftover))
    resumed = run_script([sys.executable, 'train_scripts/train.py', *_args(data, out, resume='latest')])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list((out / 'checkpoints').glob('.*'))  # leftovers cleared
    _assert_same_weights(_weights(out), uninterrupted['weights'])
    np.testing.assert_allclose([r['loss'] for r in log_records(out)], uninterrupted['losses'], rtol=1e-5, atol=1e-6)


# (where, n, the leftover it leaves) on 10 steps with a checkpoint every 2, the newest 2 kept: the save of step 4 (step 2
# complete), the deletion of checkpoint 2 once step 6 is saved, inside step 8, the boundary after step 8, a log write
KILLS = [('save', 2, '.partial_step_*'), ('prune', 1, '.deleting_*'), ('step', 2, None), ('after_step', 2, None),
         ('log', 3, None)]


def test_sigkill_at_each_kind_of_point_in_turn_loses_nothing(tmp_path, data, uninterrupted, launcher):
    """Launches with `--resume auto` into one folder, each SIGKILLed at another kind of point: a checkpoint's files
    written but not renamed into place, an old checkpoint being deleted, inside a step, a step boundary, a log write;
    then a launch that finishes. After each kill every checkpoint folder is whole and what the kill left is not taken
    for a checkpoint; the next launch clears it; the run ends with the uninterrupted run's losses and weights."""
    out = tmp_path / 'run'
    args = ['train_scripts/train.py', *_args(data, out, resume='auto')]
    left = None
    for where, n, leftover in KILLS:
        killed = launcher.run('kill', where, str(n), *args)
        assert killed.returncode == -signal.SIGKILL, (where, n, killed.stderr[-2000:])
        _assert_checkpoints_whole(out)
        assert latest_checkpoint(out) is not None
        if left:  # the previous kill's leftover: cleared by this launch's resume
            assert not list((out / 'checkpoints').glob(left)), (where, left)
        if leftover:
            assert list((out / 'checkpoints').glob(leftover)), (where, leftover)
        left = leftover
    final = launcher.run(*args)
    assert final.returncode == 0, final.stderr[-3000:]
    assert not list((out / 'checkpoints').glob('.*'))  # leftovers cleared
    starts = [r['step'] for r in log_records(out, 'start')]
    assert len(starts) == len(KILLS) + 1 and [r['step'] for r in log_records(out, 'resume')] == starts[1:]
    _assert_same_weights(_weights(out), uninterrupted['weights'])
    np.testing.assert_allclose([r['loss'] for r in log_records(out)], uninterrupted['losses'], rtol=1e-5, atol=1e-6)


def _random_kill_points(rng: random.Random, launches: int):
    """(where, n) per launch: a point every launch reaches (each has at least 6 steps and 2 checkpoints to go)."""
    points = []
    for _ in range(launches):
        where = rng.choice(['step', 'after_step', 'log', 'save', 'prune'])
        points.append((where, rng.randint(1, 2) if where in ('save', 'prune') else rng.randint(1, 6)))
    return points


@pytest.mark.stress
def test_sigkill_at_random_points_again_and_again_ends_like_an_uninterrupted_run(tmp_path, data):
    """Five launches with `--resume auto`, each SIGKILLed at a point drawn at random (seeded: the same points every
    time) among: inside a step, a step boundary, a log write, a checkpoint's save before its rename, the deletion of
    an old checkpoint; then a launch that finishes. It ends with the uninterrupted run's losses and weights."""
    settings = dict(steps=40, checkpoint_every=3)
    reference = run_script([sys.executable, 'train_scripts/train.py', *_args(data, tmp_path / 'full', **settings)])
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / 'run'
    args = ['train_scripts/train.py', *_args(data, out, resume='auto', **settings)]
    for where, n in _random_kill_points(random.Random(0), 5):
        killed = run_script([sys.executable, DRIVER, 'kill', where, str(n), *args])
        assert killed.returncode == -signal.SIGKILL, (where, n, killed.stderr[-2000:])
        _assert_checkpoints_whole(out)
    final = run_script([sys.executable, *args])
    assert final.returncode == 0, final.stderr[-3000:]
    starts = [r['step'] for r in log_records(out, 'start')]
    assert len(starts) >= 2 and [r['step'] for r in log_records(out, 'resume')] == [s for s in starts if s > 0]
    _assert_same_weights(_weights(out), _weights(tmp_path / 'full'))
    np.testing.assert_allclose([r['loss'] for r in log_records(out)], [r['loss'] for r in log_records(tmp_path / 'full')],
                               rtol=1e-5, atol=1e-6)


def test_a_new_run_refuses_a_folder_with_checkpoints_and_resume_refuses_changed_settings(tmp_path, data):
    common = dict(data_dir=str(data), steps=2, checkpoint_every=2)
    train(tiny_config(tmp_path, **common))
    with pytest.raises(ConfigError, match=r"already holds checkpoints \(newest: checkpoint_step_2\).*resume=latest"):
        train(tiny_config(tmp_path, **common))
    with pytest.raises(ConfigError, match=r'different lr.*lr: 0.003 -> 0.01'):
        train(tiny_config(tmp_path, resume='latest', **dict(common, lr=1e-2, steps=4)))
    with pytest.raises(FileNotFoundError, match='resume=latest: no complete checkpoint'):
        train(tiny_config(tmp_path, output_dir=str(tmp_path / 'empty'), resume='latest', **common))


def test_latest_skips_an_incomplete_checkpoint_and_names_it(tmp_path, data, caplog):
    train(tiny_config(tmp_path, data_dir=str(data), steps=2, checkpoint_every=2))
    torn = tmp_path / 'run' / 'checkpoints' / 'checkpoint_step_7'
    torn.mkdir()
    (torn / 'model.safetensors').write_bytes(b'half a file')
    summary = train(tiny_config(tmp_path, data_dir=str(data), steps=3, checkpoint_every=2, resume='latest'))
    assert summary['step'] == 3
    assert f'skipping incomplete checkpoint {torn}' in caplog.text
    assert log_records(tmp_path / 'run', 'resume')[0]['step'] == 2
    assert (torn / 'model.safetensors').read_bytes() == b'half a file'  # left for the user to inspect


MASKS = '''
import json, sys, torch
import vit_moe
from vit_moe.training import Trainer, load_config
trainer = Trainer(load_config(None, json.loads(sys.argv[1])))
draws, step = [], trainer.train_step
def train_step(images, targets):
    state = torch.get_rng_state()
    draws.append(torch.rand(4).tolist())  # what dropout / drop-path would draw for this micro-batch
    torch.set_rng_state(state)  # ... and does draw: the run trains as train.py's would
    step(images, targets)
trainer.train_step = train_step
trainer.fit()
open(f'{trainer.out}/draws_{trainer.accelerator.process_index}.json', 'w').write(json.dumps(draws))
vit_moe.exit_process(0)  # under a launcher: leave without the interpreter's finalization (README, exit codes)
'''


@pytest.mark.stress  # CI: tests/test_resume_chains.py (mixup and drop-path on: one process, DDP, FSDP2 and EP legs
# each equal the one-process run, which they cannot if a process draws another process's or the same numbers)
@pytest.mark.parametrize('launches', ['server', 'torchrun'])
def test_two_processes_draw_different_masks_and_still_resume_exactly(tmp_path, data, launches, request):
    """Every micro-batch draws its own random numbers (dropout, drop-path, mixup) from (seed, epoch, micro-batch number):
    the two processes draw different ones, and one process accumulating two micro-batches draws, for each, what the
    process that ran it drew. A 2-process run stopped at step 4 and resumed on 2 processes ends as the uninterrupted
    one; resumed again on ONE process, it keeps the global batch.

    The uninterrupted 2-process run, which records the draws, is a torch.distributed.run launch; the other launches
    come from the launch server (`server`, CI) or are launches of their own (`torchrun` / python, the stress tier)."""
    launcher = request.getfixturevalue('launcher') if launches == 'server' else None

    def run(*command, processes=1):
        if launcher is not None:
            return launcher.run(*command, processes=processes)
        return run_script([*(launch_processes(2) if processes == 2 else [sys.executable]), *command], timeout=300)

    script = tmp_path / 'draws.py'
    script.write_text(MASKS)
    full, part = tmp_path / 'full', tmp_path / 'part'
    for out, processes, accumulation, steps in ((full, 2, 1, 8), (tmp_path / 'one', 1, 2, 2)):
        cfg = json.dumps(dict(RUN, model_kwargs=json.loads(RUN['model_kwargs']), progress=False, data_dir=str(data),
                              output_dir=str(out), steps=steps, grad_accum_steps=accumulation))
        if processes == 2:
            result = run_script([*launch_processes(2), str(script), cfg], timeout=300)
        else:
            result = run(str(script), cfg)
        assert result.returncode == 0, result.stderr[-3000:]
        assert log_records(out, 'start')[0]['num_processes'] == processes
    two = [json.loads((full / f'draws_{rank}.json').read_text()) for rank in (0, 1)]
    one = json.loads((tmp_path / 'one' / 'draws_0.json').read_text())
    assert len(one) == 4 and len(two[0]) == len(two[1]) == 8
    assert two[0][0] != two[1][0]
    assert one == [two[number % 2][number // 2] for number in range(4)]  # micro-batch i of rank r: number 2 i + r

    for extra in (dict(steps=4), dict(steps=8, resume='latest')):
        result = run('train_scripts/train.py', *_args(data, part, **extra), processes=2)
        assert result.returncode == 0, result.stderr[-3000:]
    assert [r['num_processes'] for r in log_records(part, 'start')] == [2, 2]
    np.testing.assert_allclose([r['loss'] for r in log_records(part)], [r['loss'] for r in log_records(full)],
                               rtol=1e-5, atol=1e-6)
    _assert_same_weights(_weights(part), _weights(full))

    # the same checkpoint resumed by ONE process: it keeps the global batch with 2 accumulation steps, and says so once
    one = run('train_scripts/train.py', *_args(data, part, steps=10, resume='latest'))
    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stderr.count('saved by 2 process(es) x 1 accumulation step(s), resumed by 1 x 2: the global batch '
                            'stays 12 images') == 1
    assert [r['step'] for r in log_records(part)] == list(range(1, 11))
    state = train_state_of(latest_checkpoint(part))
    # the last window was logged before the save: none open
    assert dict(state, elapsed_s=0) == dict(step=10, num_processes=1, grad_accum_steps=2, global_batch=12,
                                            expert_parallel_size=1, launch='one process', elapsed_s=0,
                                            log_window=None, loss_scale=None)


def test_ema_is_evaluated_saved_and_resumed_exactly(tmp_path, data):
    from vit_moe.training import validate
    common = dict(data_dir=str(data), ema_decay=0.8, checkpoint_every=4, model_kwargs=dict(TRAIN_MOE, drop_rate=0.1))
    full = train(tiny_config(tmp_path, output_dir=str(tmp_path / 'full'), steps=8, **common))
    train(tiny_config(tmp_path, steps=4, **common))
    resumed = train(tiny_config(tmp_path, steps=8, resume='latest', **common))
    ema, ema_full = (load_file(str(Path(s['ema_model_dir']) / 'model.safetensors')) for s in (resumed, full))
    _assert_same_weights(ema, ema_full)
    raw = _weights(tmp_path / 'run')
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the EMA is not the raw model
    final = log_records(tmp_path / 'run', 'eval')[-1]
    assert {'ema_top1', 'ema_loss'} <= set(final)
    reloaded = validate('vit_ti16_moe_upcycled', resumed['ema_model_dir'], str(data), batch_size=4, num_workers=0)
    assert reloaded['top1'] == final['ema_top1'] and reloaded['loss'] == pytest.approx(final['ema_loss'], rel=1e-5)
