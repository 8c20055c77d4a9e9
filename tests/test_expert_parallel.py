"""Expert parallelism on real processes (gloo): equal to data parallelism, gradient for gradient and loss for loss,
resumable at another expert-parallel size, and refused in one line where it cannot run.

The runs are launched through tests/trainer_driver.py's launch server (real processes, forked from one that imported
torch once, with torch.distributed.run's environment: no interpreter start-up per process); the stress tier's runs,
and one refusal, go through torch.distributed.run itself."""
import json
import shutil
import signal
import subprocess
import sys

import numpy as np
import psutil
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, launch_processes, log_records, make_image_folder, run_script, script_env
from trainer_driver import Launcher

pytestmark = pytest.mark.xdist_group('expert_parallel')  # the module's runs (and launch server) are built once

TINY = '{img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, num_experts: 4, moe_blocks: 1, ' \
       'router: token_choice, capacity_factor: 1.0}'


def _args(data, out, **overrides):
    values = dict(model='vit_ti16_moe_upcycled', model_kwargs=TINY, data_dir=str(data), output_dir=str(out),
                  batch_size=4, num_workers=0, steps=6, lr=3e-3, warmup_steps=1, log_every=1, checkpoint_every=2,
                  keep_checkpoints=5, trackers='none', progress='false', ema_decay=0.7, grad_accum_steps=2,
                  drop_rate=None)
    values.update(overrides)
    return [f'--{k.replace("_", "-")}={v}' for k, v in values.items() if v is not None]


def _train(data, out, processes=2, front=None, launcher=None, **overrides):
    """train.py on `processes` processes (through `launcher`, else torch.distributed.run); its losses, weights, EMA."""
    command = [*([front] if front else []), 'train_scripts/train.py', *_args(data, out, **overrides)]
    if launcher is not None:
        run = launcher.run(*command, processes=processes, timeout=600)
    else:
        run = run_script([*(launch_processes(processes) if processes > 1 else [sys.executable]), *command], timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    ema = out / 'model_ema' / 'model.safetensors'
    return dict(losses=[r['loss'] for r in log_records(out)], weights=load_file(str(out / 'model' / 'model.safetensors')),
                ema=load_file(str(ema)) if ema.is_file() else None, output_dir=out)


def _assert_close_weights(got, expected, atol):
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('ep') / 'data')


@pytest.fixture(scope='module')
def launcher():
    server = Launcher(ROOT, script_env())
    yield server
    server.close()


@pytest.fixture(scope='module')
def runs(data, launcher, tmp_path_factory):
    """The same 2-process run (token choice, EMA, 2 accumulation steps: a global batch of 16) with DDP and with
    2-way expert parallelism."""
    root = tmp_path_factory.mktemp('ep_runs')
    return dict(ddp=_train(data, root / 'ddp', launcher=launcher),
                ep=_train(data, root / 'ep', launcher=launcher, expert_parallel_size=2))


def test_expert_parallel_gradients_equal_data_parallel_ones_for_every_router_and_design(launcher, tmp_path):
    out = tmp_path / 'grads.json'
    run = launcher.run('tests/ep_worker.py', str(out), processes=2, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results.pop('compiled') is True  # the layer, all-to-alls included, compiles with fullgraph=True
    assert len(results) == 7
    for design, result in results.items():
        assert result['shards'] == 4, design  # every expert tensor of the MoE layer compared
        limit = 2e-2 if design == 'bf16 autocast' else 1e-5  # bf16: other matmul shapes, other rounding
        assert result['worst_relative_difference'] <= limit, (design, result)


def test_a_two_process_expert_parallel_run_is_the_ddp_run(runs):
    """The same losses at every logged step, the same weights and EMA at the end; the start record says how the
    experts were spread."""
    np.testing.assert_allclose(runs['ep']['losses'], runs['ddp']['losses'], rtol=1e-3)
    _assert_close_weights(runs['ep']['weights'], runs['ddp']['weights'], atol=1e-5)
    _assert_close_weights(runs['ep']['ema'], runs['ddp']['ema'], atol=1e-5)
    start, = log_records(runs['ep']['output_dir'], 'start')
    assert start['expert_parallel_size'] == 2 and start['experts_per_process'] == {'blocks.1.mlp': 2}
    checkpoint = runs['ep']['output_dir'] / 'checkpoints' / 'checkpoint_step_6' / 'state'
    assert len(list(checkpoint.glob('*.distcp'))) == 2  # each process wrote its expert shards


# 4 processes x 4 images without accumulation: the 2-process DDP run's global batch of 16 (the same images, augmented
# alike: the trainer's batches and augmentations depend on the global batch only, not on how it is split)
TWO_BY_TWO = dict(processes=4, grad_accum_steps=1, expert_parallel_size=2)


@pytest.mark.stress  # the FSDP2 + EP 2 x 2 test below runs the same exchanges in CI
def test_four_processes_as_2_x_2_match_the_ddp_run(data, runs, tmp_path):
    ep = _train(data, tmp_path / 'ep4', **TWO_BY_TWO)
    start, = log_records(ep['output_dir'], 'start')
    assert start['global_batch'] == 16 and start['experts_per_process'] == {'blocks.1.mlp': 2}
    np.testing.assert_allclose(ep['losses'], runs['ddp']['losses'], rtol=1e-3)
    _assert_close_weights(ep['weights'], runs['ddp']['weights'], atol=1e-5)
    _assert_close_weights(ep['ema'], runs['ddp']['ema'], atol=1e-5)


def test_fsdp2_with_ep_on_2_x_2_shards_each_bank_over_dp_and_resumes_on_one_process(data, runs, launcher, tmp_path):
    """FSDP2 + EP on a 2 x 2 mesh equals the DDP run on the same global batch; each expert bank is also sharded over
    its 2 data-parallel replicas (every process holds 1 of the 4 experts at rest), and its checkpoint resumes on one
    process."""
    fsdp = _train(data, tmp_path / 'fsdp_ep4', launcher=launcher, front='tests/fsdp_on_cpu.py', **TWO_BY_TWO)
    start, = log_records(fsdp['output_dir'], 'start')
    assert start['global_batch'] == 16 and start['grad_accum_steps'] == 1
    assert start['distributed_type'] == 'FSDP' and start['experts_per_process'] == {'blocks.1.mlp': 1}
    np.testing.assert_allclose(fsdp['losses'], runs['ddp']['losses'], rtol=1e-3)
    _assert_close_weights(fsdp['weights'], runs['ddp']['weights'], atol=1e-5)
    _assert_close_weights(fsdp['ema'], runs['ddp']['ema'], atol=1e-5)
    resumed = tmp_path / 'resumed'  # FSDP2 + EP 2 x 2 -> one process, from the checkpoint of step 2
    shutil.copytree(tmp_path / 'fsdp_ep4', resumed)
    for leftover in ('model', 'model_ema', 'checkpoints/checkpoint_step_4', 'checkpoints/checkpoint_step_6'):
        shutil.rmtree(resumed / leftover, ignore_errors=True)
    one = _train(data, resumed, processes=1, launcher=launcher, grad_accum_steps=1, resume='latest')
    assert [r['step'] for r in log_records(resumed, 'resume')] == [2]
    np.testing.assert_allclose(one['losses'], runs['ddp']['losses'], rtol=1e-3)
    _assert_close_weights(one['weights'], runs['ddp']['weights'], atol=1e-5)
    _assert_close_weights(one['ema'], runs['ddp']['ema'], atol=1e-5)


def _stopped_by_sigterm_at_step_4(data, out):
    """A 2-process expert-parallel run stopped at step 3 (tests/trainer_driver.py), SIGTERM to its trainers: they
    save at step 4 and exit 128 + 15."""
    proc = subprocess.Popen([*launch_processes(2), 'tests/trainer_driver.py', 'stop', 'after_step', '3',
                             'train_scripts/train.py', *_args(data, out, expert_parallel_size=2)], cwd=ROOT,
                            env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    from test_training import _stopped_trainers
    trainers = _stopped_trainers(psutil.Process(proc.pid), 2)
    for trainer in trainers:
        trainer.send_signal(signal.SIGTERM)
        trainer.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=300)
    assert stderr.count('stopped by signal 15 at step 4') == 2, stderr[-3000:]


@pytest.mark.stress  # tests/test_resume_chains.py resumes EP 2 -> DDP and EP 2 -> EP 2 in CI
def test_a_checkpoint_written_with_ep_2_resumes_with_ep_2_and_with_ep_1(data, runs, tmp_path):
    """Stopped by SIGTERM at step 4 under 2-way expert parallelism, then resumed twice from that checkpoint: with 2
    (exactly the uninterrupted run) and with 1 (every expert whole on every process: the same run, up to the order of
    the gradient sums)."""
    stopped = tmp_path / 'stopped'
    _stopped_by_sigterm_at_step_4(data, stopped)
    for size, atol in ((2, 1e-6), (1, 1e-5)):
        out = tmp_path / f'resumed_with_{size}'
        shutil.copytree(stopped, out)
        resumed = _train(data, out, expert_parallel_size=size, resume='latest')
        assert log_records(out, 'resume')[0]['step'] == 4
        np.testing.assert_allclose(resumed['losses'], runs['ep']['losses'], rtol=1e-4 if size == 2 else 1e-3)
        _assert_close_weights(resumed['weights'], runs['ep']['weights'], atol=atol)
        _assert_close_weights(resumed['ema'], runs['ep']['ema'], atol=atol)


def test_validate_with_expert_parallelism_scores_what_one_process_scores(data, runs, launcher, tmp_path):
    folder = str(runs['ep']['output_dir'] / 'model')
    common = ['train_scripts/validate.py', '--model', 'vit_ti16_moe_upcycled', '--checkpoint', folder, '--data-dir',
              str(data), '--num-workers', '0', '--batch-size', '4']
    one = launcher.run(*common, '--json', str(tmp_path / 'one.json'))
    two = launcher.run(*common, '--expert-parallel-size', '2', '--json', str(tmp_path / 'two.json'), processes=2)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f'{n}.json').read_text()) for n in ('one', 'two'))
    assert a['num_samples'] == b['num_samples'] == 15 and a['top1'] == b['top1']
    assert b['loss'] == pytest.approx(a['loss'], rel=1e-5)


REFUSALS = [
    (2, dict(expert_parallel_size=3), 'expert_parallel_size=3 does not divide the 2 processes of the launch'),
    (1, dict(expert_parallel_size=2), 'expert_parallel_size=2 does not divide the 1 processes of the launch'),
    (2, dict(expert_parallel_size=2, model_kwargs=TINY.replace('num_experts: 4', 'num_experts: 3')),
     'num_experts=3 is not divisible by expert_parallel_size=2'),
    (2, dict(expert_parallel_size=2, model='vit_tiny_patch16_224',
             model_kwargs='{img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2}'),
     'expert_parallel_size=2: the model has no MoE layer'),
]


@pytest.mark.parametrize('processes, overrides, expected', REFUSALS)
def test_a_launch_that_cannot_be_expert_parallel_is_refused_in_one_line(data, launcher, tmp_path, processes, overrides,
                                                                         expected):
    """One line, printed once, exit code not 0, nothing written: the processes as torch.distributed.run starts them,
    forked by the launch server (the stress tier launches the first through torch.distributed.run itself, below)."""
    run = launcher.run('train_scripts/train.py', *_args(data, tmp_path / 'run', **overrides), processes=processes)
    lines = [line for line in run.stderr.splitlines() if 'train.py: error:' in line]
    assert run.returncode != 0 and len(lines) == 1 and expected in lines[0], run.stderr[-3000:]
    assert not (tmp_path / 'run').exists()


@pytest.mark.stress  # CI: the same refusal through the launch server (above), and test_recipes.py's FSDP2 config
def test_a_refusal_through_torch_distributed_run_is_one_line_printed_once(data, tmp_path):  # refused under accelerate
    processes, overrides, expected = REFUSALS[0]
    run = run_script([*launch_processes(processes), 'train_scripts/train.py',
                      *_args(data, tmp_path / 'run', **overrides)])
    lines = [line for line in run.stderr.splitlines() if 'train.py: error:' in line]
    assert run.returncode != 0 and len(lines) == 1 and expected in lines[0], run.stderr[-3000:]
    assert not (tmp_path / 'run').exists()


@pytest.mark.stress  # the 2 x 2 test (FSDP2 + EP = DDP, resumed on one process) and the chain cover it in CI
def test_fsdp2_with_expert_parallelism_is_the_ddp_run_and_resumes_with_ep_1(data, runs, tmp_path):
    """FSDP2 (through Accelerator.prepare, tests/fsdp_on_cpu.py) shards everything but the expert banks, which stay
    2-way expert-parallel; the run equals the DDP one (its EMA too) and its checkpoint resumes without expert
    parallelism (the whole banks then sharded by FSDP2)."""
    def fsdp(out, **overrides):
        run = run_script([*launch_processes(2), 'tests/fsdp_on_cpu.py', 'train_scripts/train.py',
                          *_args(data, out, **overrides)], timeout=600)
        assert run.returncode == 0, run.stderr[-4000:]
        return load_file(str(out / 'model' / 'model.safetensors')), load_file(str(out / 'model_ema' / 'model.safetensors'))

    weights, ema = fsdp(tmp_path / 'fsdp_ep', expert_parallel_size=2)
    _assert_close_weights(weights, runs['ddp']['weights'], atol=1e-5)
    _assert_close_weights(ema, runs['ddp']['ema'], atol=1e-5)
    start, = log_records(tmp_path / 'fsdp_ep', 'start')
    assert start['distributed_type'] == 'FSDP' and start['experts_per_process'] == {'blocks.1.mlp': 2}
    resumed = tmp_path / 'resumed'
    shutil.copytree(tmp_path / 'fsdp_ep', resumed)
    for leftover in ('model', 'model_ema', 'checkpoints/checkpoint_step_6'):
        shutil.rmtree(resumed / leftover)
    weights, ema = fsdp(resumed, expert_parallel_size=1, resume='latest')
    _assert_close_weights(weights, runs['ddp']['weights'], atol=1e-5)
    _assert_close_weights(ema, runs['ddp']['ema'], atol=1e-5)


def test_the_slurm_script_is_valid_bash_and_launches_what_readme_says():
    script = ROOT / 'configs' / 'slurm' / 'train.sbatch'
    check = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    text = script.read_text()
    for needed in ('#SBATCH --signal=B:USR1@', '--resume auto', '--expert-parallel-size', '--rdzv_backend c10d',
                   'trap forward_save_signal USR1', 'trap forward_stop_signal TERM', 'scontrol requeue',
                   '--save-signal SIGUSR1'):
        assert needed in text, needed
