"""Recipes and launches as a user copies them from README: every fine-tuning config under the shipped launch configs
(EMA under FSDP2 included), the dry run, command-line overrides that merge, one refusal line per job, the early
warning save signal."""
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vit_moe.training import load_config, parse_train_args

from conftest import ROOT, launch_processes, log_records, make_image_folder, run_front_end, run_script, script_env

RECIPES = sorted(p.name for p in (ROOT / 'configs').glob('finetune_*.yaml'))
LAUNCHES = ('ddp.yaml', 'fsdp2.yaml', 'fsdp2_bf16.yaml')
# README's way to try a recipe on a laptop: a tiny model of the family (the config's other model arguments kept)
TINY_OVERRIDE = '{img_size: 32, patch_size: 4, embed_dim: 64, depth: 4, num_heads: 2, num_experts: 4}'
# CI launches two recipes (one DDP, one FSDP2 + bf16: the launch meaning); the stress tier each recipe once, the
# launch configs in turn; scripts/stress_tests.sh --all-recipes every pair (VIT_MOE_ALL_RECIPES). Every recipe's
# config is also resolved in CI in-process (the dry-run tests below).
_CI_PAIRS = {('finetune_augreg.yaml', 'ddp.yaml'), ('finetune_eva02.yaml', 'fsdp2_bf16.yaml')}
PAIRS = [(r, l) for r in RECIPES for l in LAUNCHES] if os.environ.get('VIT_MOE_ALL_RECIPES') else [
    (r, LAUNCHES[i % len(LAUNCHES)]) for i, r in enumerate(RECIPES)] + sorted(_CI_PAIRS)
PAIRS = [pytest.param(r, l, marks=() if (r, l) in _CI_PAIRS else pytest.mark.stress)
         for r, l in dict.fromkeys(PAIRS)]

pytestmark = pytest.mark.xdist_group('recipes')  # the module's data folder is built once


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('recipes') / 'data')


def _recipe_command(recipe: str, launch: str, data: Path, out: Path, *extra: str):
    """The recipe as shipped on 2 processes, with README's tiny model override (DDP; FSDP2 through
    tests/fsdp_on_cpu.py, which builds Accelerate's plugin from the launch config as `accelerate launch` would)."""
    shim = ['tests/fsdp_on_cpu.py'] if launch.startswith('fsdp') else []
    return [*launch_processes(2), *shim, 'train_scripts/train.py', '--config', f'configs/{recipe}', '--data-dir',
            str(data), '--output-dir', str(out), '--pretrained', 'none', '--model-kwargs', TINY_OVERRIDE,
            '--batch-size', '4', '--steps', '3', '--progress', 'false', *extra]


def _launch_env(launch: str) -> dict:
    env = script_env()
    settings = yaml.safe_load((ROOT / 'configs' / 'accelerate' / launch).read_text())
    env['ACCELERATE_MIXED_PRECISION'] = str(settings['mixed_precision'])  # what accelerate launch sets from it
    if launch.startswith('fsdp'):
        env['FSDP_CONFIG'] = str(ROOT / 'configs' / 'accelerate' / launch)
    return env


@pytest.mark.parametrize('recipe, launch', PAIRS)
def test_each_finetune_recipe_runs_as_shipped_under_the_shipped_launch_configs(data, tmp_path, recipe, launch):
    out = tmp_path / 'run'
    result = subprocess.run(_recipe_command(recipe, launch, data, out), cwd=ROOT, env=_launch_env(launch),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    start, = log_records(out, 'start')
    assert start['num_processes'] == 2 and start['distributed_type'] == ('FSDP' if 'fsdp' in launch else 'MULTI_CPU')
    shipped = yaml.safe_load((ROOT / 'configs' / recipe).read_text())
    # the override merged into the recipe's model arguments (drop_path_rate, capacity_factor kept), as resolved
    assert start['model_kwargs']['num_experts'] == 4 and start['model_kwargs']['embed_dim'] == 64
    for key, value in shipped['model_kwargs'].items():
        if key not in yaml.safe_load(TINY_OVERRIDE):
            assert start['model_kwargs'][key] == value, key
    assert start['global_batch'] == 8 and start['lr'] == pytest.approx(shipped['lr'] * 8 / shipped['lr_base_size'])
    assert (out / 'model' / 'model.safetensors').is_file() and (out / 'model_ema' / 'model.safetensors').is_file()
    # the EMA the run saved scores what the trainer logged for it (bf16: another batching may flip one image)
    from vit_moe.training import validate
    logged = log_records(out, 'eval')[-1]
    ema = validate(shipped['model'], str(out / 'model_ema'), str(data), num_workers=0, batch_size=4,
                   mixed_precision=start['mixed_precision'])
    assert ema['num_samples'] == logged['num_samples'] and abs(ema['top1'] - logged['ema_top1']) <= (
        100 / ema['num_samples'] if start['mixed_precision'] == 'bf16' else 1e-9)


# ---------------------------------------------------------------------------------------------- EMA under FSDP2
def _ema_run(data, out, launch, resume=None, kill_at_step=None):
    """4 steps with an EMA (checkpoints every 2); with `kill_at_step`, every process is SIGKILLed at that step's end
    (tests/trainer_driver.py)."""
    extra = ['--steps', '4', '--checkpoint-every', '2', '--ema-decay', '0.6', '--mixed-precision', 'no',
             '--num-workers', '0', '--lr', '3e-3', '--warmup-steps', '0'] + (['--resume', resume] if resume else [])
    command = _recipe_command('finetune_augreg.yaml', launch, data, out, *extra)
    if kill_at_step:
        at = command.index('train_scripts/train.py')
        command[at:at] = ['tests/trainer_driver.py', 'kill', 'after_step', str(kill_at_step)]
        if 'tests/fsdp_on_cpu.py' in command:  # the shim runs the driver, which runs the trainer
            command.remove('tests/fsdp_on_cpu.py')
            command.insert(command.index('tests/trainer_driver.py'), 'tests/fsdp_on_cpu.py')
    result = subprocess.run(command, cwd=ROOT, env=_launch_env(launch), capture_output=True, text=True, timeout=600)
    if kill_at_step:
        assert result.returncode != 0
        return None, None
    assert result.returncode == 0, result.stderr[-4000:]
    return load_file(str(out / 'model_ema' / 'model.safetensors')), load_file(str(out / 'model' / 'model.safetensors'))


@pytest.mark.stress  # in CI the resume chain checks the sharded EMA across FSDP2 legs against one process's EMA
def test_the_sharded_ema_is_timms_ema_and_resumes_exactly(data, tmp_path):
    """FSDP2 keeps the EMA of each process's shards (timm's ModelEmaV3 arithmetic on DTensors): it ends where DDP's
    full-copy EMA ends on the same run, each process holds half of it, and a resumed run ends with the same EMA."""
    ddp_ema, ddp_model = _ema_run(data, tmp_path / 'ddp', 'ddp.yaml')
    fsdp_ema, fsdp_model = _ema_run(data, tmp_path / 'fsdp', 'fsdp2.yaml')
    assert ddp_ema.keys() == fsdp_ema.keys()
    for key in ddp_ema:
        torch.testing.assert_close(fsdp_ema[key], ddp_ema[key], rtol=1e-4, atol=1e-5, msg=key)
    assert any(not torch.equal(fsdp_ema[k], fsdp_model[k]) for k in fsdp_ema)  # not the raw weights
    checkpoint = tmp_path / 'fsdp' / 'checkpoints' / 'checkpoint_step_4'
    shards = sorted((checkpoint / 'state').glob('*.distcp'))  # model, optimizer and EMA: each process wrote its half
    assert len(shards) == 2 and abs(shards[0].stat().st_size - shards[1].stat().st_size) < 0.2 * shards[0].stat().st_size

    _ema_run(data, tmp_path / 'resumed', 'fsdp2.yaml', kill_at_step=3)  # after the checkpoint of step 2
    resumed_ema, resumed_model = _ema_run(data, tmp_path / 'resumed', 'fsdp2.yaml', resume='latest')
    assert log_records(tmp_path / 'resumed', 'resume')[0]['step'] == 2
    for key in fsdp_ema:
        torch.testing.assert_close(resumed_ema[key], fsdp_ema[key], rtol=0, atol=1e-6, msg=key)
        torch.testing.assert_close(resumed_model[key], fsdp_model[key], rtol=0, atol=1e-6, msg=key)
    logged = log_records(tmp_path / 'resumed', 'eval')[-1]
    assert 0 <= logged['ema_top1'] <= 100 and logged['ema_top1'] == log_records(tmp_path / 'fsdp', 'eval')[-1][
        'ema_top1']  # the resumed run's EMA scores what the uninterrupted one's does (the same weights, above)


# ------------------------------------------------------------------------------------------------------ dry run
def test_dry_run_resolves_the_launch_and_says_the_recipe_fits_a_40_gb_card():
    rc, out, err = run_front_end('train_scripts/train.py', '--config', 'configs/finetune_eva02.yaml', '--dry-run',
                                 '--accelerate-config', 'configs/accelerate/ddp.yaml', '--gpu-memory-gb', '40')
    assert rc == 0, err
    assert 'launch: ddp, 8 process(es), mixed precision bf16, global batch 256 (32 per process x 8 x 1' in out
    assert 'lr 0.0001 (0.0001 at a global batch of 256, linear)' in out and 'fits a 40 GB GPU' in out
    rc, out, err = run_front_end('train_scripts/train.py', '--config', 'configs/finetune_eva02.yaml', '--dry-run',
                                 '--accelerate-config', 'configs/accelerate/ddp.yaml', '--num-processes', '4')
    assert rc == 0 and 'global batch 128' in out and 'lr 5e-05' in out  # the lr follows the global batch


@pytest.mark.parametrize('recipe', RECIPES)
def test_every_recipe_fits_a_40_gb_card_under_ddp_with_its_ema(recipe):
    from vit_moe.training.dry_run import dry_run
    cfg = load_config(str(ROOT / 'configs' / recipe))
    report = dry_run(cfg, str(ROOT / 'configs' / 'accelerate' / 'ddp.yaml'), gpu_memory_gb=40)
    assert report['fits'], report['lines']
    assert report['launch'].global_batch == 256 and report['plan'].ema > 0


def test_dry_run_names_what_does_not_fit_in_one_line_and_exits_2():
    rc, out, err = run_front_end('train_scripts/train.py', '--config', 'configs/finetune_eva02.yaml', '--dry-run',
                                 '--accelerate-config', 'configs/accelerate/ddp.yaml', '--gpu-memory-gb', '40',
                                 '--batch-size', '256')
    assert rc == 2 and len(err.splitlines()) == 1 and 'does NOT fit' in out
    assert 'needs' in err and 'activations' in err and 'grad_checkpointing: true' in err and 'FSDP2' in err


def test_dry_run_memory_is_the_memory_models_for_the_launch():
    """The dry run's numbers are the memory model's (`benchmarks/memory_table.py`), for the launch it resolves."""
    from vit_moe.training.dry_run import plan_memory, resolve_launch
    from vit_moe.planning.memory import parameter_memory
    cfg = load_config(str(ROOT / 'configs' / 'finetune_augreg.yaml'))
    launch = resolve_launch(cfg, str(ROOT / 'configs' / 'accelerate' / 'fsdp2.yaml'))
    assert (launch.strategy, launch.num_processes, launch.mixed_precision) == ('fsdp2', 8, 'bf16')  # the recipe's
    plan = plan_memory(cfg, launch, num_classes=10)
    import timm
    with torch.device('meta'):
        model = timm.create_model(cfg.model, num_classes=10, **cfg.model_kwargs)
    state = parameter_memory(model, 'fsdp2', 8, 'bf16')
    assert (plan.params, plan.grads, plan.optimizer, plan.transient) == (state.params, state.grads, state.optimizer,
                                                                         state.transient)
    assert plan.ema == pytest.approx(state.params, rel=0.01)  # fp32 shards like the master weights


# ------------------------------------------------------------------------------------------ overrides and once
def test_model_kwargs_on_the_command_line_merge_into_the_configs_and_null_removes_one():
    cfg = parse_train_args(['--config', str(ROOT / 'configs' / 'digits_moe.yaml'), '--lr', '1e-3',
                            '--model-kwargs', '{num_experts: 4, router: null}'])  # README's example, plus a removal
    shipped = yaml.safe_load((ROOT / 'configs' / 'digits_moe.yaml').read_text())['model_kwargs']
    assert cfg.model_kwargs == dict({k: v for k, v in shipped.items() if k != 'router'}, num_experts=4)
    assert parse_train_args(['--mixed-precision', 'no']).mixed_precision == 'no'  # YAML reads `no` as false
    assert parse_train_args(['--torch-compile', 'off']).torch_compile is None


def test_the_sweep_merges_model_kwargs_as_the_command_line_does():
    from vit_moe.training.sweep import merge_settings
    merged = merge_settings(dict(model_kwargs=dict(a=1, b=2)), {'model_kwargs.b': None, 'model_kwargs.c': 3})
    assert merged['model_kwargs'] == dict(a=1, c=3)


def test_num_classes_in_model_kwargs_is_taken_once_by_every_front_end(tmp_path, data):
    """An option given twice: as --num-classes (or the data's classes) and inside --model-kwargs. Equal: accepted;
    different: one line naming both."""
    kwargs = "{img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, num_experts: 4, num_classes: %d}"
    common = ['--model', 'vit_ti16_moe_upcycled', '--data-dir', str(data), '--output-dir', str(tmp_path / 'run')]
    train = ['--steps', '1', '--batch-size', '4', '--num-workers', '0', '--progress', 'false', '--trackers', 'none']
    rc, _, err = run_front_end('train_scripts/train.py', *common, *train, '--model-kwargs', kwargs % 5)
    assert rc == 2 and 'model_kwargs num_classes=5: the trainer takes the number of classes from the data (3' in err
    rc, _, err = run_front_end('train_scripts/train.py', *common, *train, '--model-kwargs', kwargs % 3)
    assert rc == 0, err
    folder = str(tmp_path / 'run' / 'model')
    rc, _, err = run_front_end('export/onnx_export.py', '--model', 'vit_ti16_moe_upcycled', '--checkpoint', folder,
                               '--output', str(tmp_path / 'm.onnx'), '--num-classes', '3',
                               '--model-kwargs', kwargs % 5)
    assert rc == 2 and 'num_classes given twice: --num-classes 3 and --model-kwargs num_classes=5' in err
    assert not (tmp_path / 'm.onnx').exists()
    rc, out, err = run_front_end('export/onnx_export.py', '--model', 'vit_ti16_moe_upcycled', '--checkpoint', folder,
                                 '--output', str(tmp_path / 'm.onnx'), '--model-kwargs', kwargs % 3,
                                 '--batch-sizes', '2')
    assert rc == 0, out + err
    rc, _, err = run_front_end('train_scripts/validate.py', '--model', 'vit_ti16_moe_upcycled', '--checkpoint', folder,
                               '--data-dir', str(data), '--num-workers', '0', '--model-kwargs', kwargs % 5)
    assert rc == 2 and 'model_kwargs num_classes=5 disagrees with the 3 classes' in err
    rc, out, err = run_front_end('train_scripts/validate.py', '--model', 'vit_ti16_moe_upcycled', '--checkpoint',
                                 folder, '--data-dir', str(data), '--num-workers', '0', '--model-kwargs', kwargs % 3)
    assert rc == 0 and 'top-1' in out, err


# CI checks "one line, printed once" on a real launch of 2 processes elsewhere: the FSDP2 launch config's refusal under
# accelerate launch (below; and tests/test_expert_parallel.py's refusals through the launch server); the missing data
# folder is refused in one process by tests/test_training.py
@pytest.mark.stress
def test_a_refusal_under_two_processes_is_one_line_printed_once(tmp_path, data):
    run = run_script([*launch_processes(2), 'train_scripts/train.py', '--model', 'vit_ti16_moe_upcycled',
                      '--data-dir', str(tmp_path / 'nowhere'), '--output-dir', str(tmp_path / 'run')])
    assert run.returncode != 0
    lines = [line for line in run.stderr.splitlines() if 'train.py: error:' in line]
    assert len(lines) == 1 and 'does not exist' in lines[0], run.stderr[-3000:]


def test_the_fsdp2_launch_config_on_a_machine_without_gpus_is_refused_once_naming_what_works(tmp_path, data):
    """`accelerate launch --config_file configs/accelerate/fsdp2.yaml` here: Accelerate would run FSDP on GPUs only
    and every process would train alone."""
    env = {k: v for k, v in script_env().items() if k != 'ACCELERATE_USE_CPU'}
    command = [str(Path(sys.executable).parent / 'accelerate'), 'launch', '--config_file',
               'configs/accelerate/fsdp2.yaml', '--num_processes', '2', 'train_scripts/train.py', '--config',
               'configs/digits_moe.yaml', '--pretrained', 'none', '--data-dir', str(data), '--output-dir',
               str(tmp_path / 'run'), '--steps', '1']
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in run.stderr.splitlines() if 'train.py: error:' in line]
    assert run.returncode != 0 and len(lines) == 1, run.stderr[-3000:]
    assert 'Accelerate runs FSDP on GPUs only' in lines[0] and 'tests/fsdp_on_cpu.py' in lines[0]
    assert not (tmp_path / 'run').exists()


def test_a_failed_hub_download_says_how_to_pass_a_local_file(tmp_path, data, monkeypatch):
    """train.py's main in this process, the Hub offline (HF_HUB_OFFLINE=1, read by huggingface_hub at its import:
    set on its constants) with an empty cache."""
    constants = pytest.importorskip('huggingface_hub.constants')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'hf' / 'hub'))
    rc, _, err = run_front_end('train_scripts/train.py', '--model', 'vit_ti16_moe_upcycled', '--pretrained', 'default',
                               '--data-dir', str(data), '--output-dir', str(tmp_path / 'run'))
    assert rc == 2 and len(err.splitlines()) == 1, err[-3000:]
    assert 'from the Hugging Face Hub' in err and '--pretrained /path/to/vit_tiny_patch16_224' in err
    assert not (tmp_path / 'run').exists()


# ------------------------------------------------------------------------------------------ the early warning
def test_the_early_warning_signal_saves_at_the_next_step_on_every_process_and_logs_the_save(tmp_path, data):
    """SLURM's --signal=USR1@120 reaches every process of the job: each trainer (stopped after step 3 by
    tests/trainer_driver.py, its DataLoader workers running) saves at step 4 and exits 128 + SIGUSR1; the save's
    time and size are in the log; the run resumes from it (on one process)."""
    args = ['--model', 'vit_ti16_moe_upcycled', '--model-kwargs', TINY_OVERRIDE, '--data-dir', str(data),
            '--output-dir', str(tmp_path / 'run'), '--batch-size', '4', '--num-workers', '2', '--progress', 'false',
            '--trackers', 'none', '--checkpoint-every', '1000', '--log-every', '1']
    proc = subprocess.Popen([*launch_processes(2), 'tests/trainer_driver.py', 'stop', 'after_step', '3',
                             'train_scripts/train.py', *args, '--steps', '1000'], cwd=ROOT, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    job = psutil.Process(proc.pid)
    from test_training import _stopped_trainers
    try:
        trainers = _stopped_trainers(job, 2)
        workers = [w for t in trainers for w in t.children()]
        assert len(workers) == 4
        for p in workers + trainers:  # the launcher's agent is left out: SIGUSR1 would end torchrun itself
            p.send_signal(signal.SIGUSR1)
        for trainer in trainers:
            trainer.send_signal(signal.SIGCONT)
        _, stderr = proc.communicate(timeout=300)
    finally:  # nothing left running, whatever failed
        for p in [*workers, *trainers] if 'trainers' in dir() else []:
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert stderr.count(f'stopped by signal {int(signal.SIGUSR1)} at step 4') == 2, stderr[-3000:]
    assert 'is killed by signal' not in stderr  # no DataLoader worker died of it
    saved, = [r for r in log_records(tmp_path / 'run', 'checkpoint')]
    assert saved['step'] == 4 and saved['reason'] == f'signal {int(signal.SIGUSR1)}'
    assert saved['bytes'] > 0 and saved['seconds'] > 0
    # resumed by one process (in this one: the launch was the signal's), 2 accumulation steps keeping the global batch
    rc, _, err = run_front_end('train_scripts/train.py', *args, '--steps', '6', '--resume', 'latest')
    assert rc == 0, err[-3000:]
    assert [r['step'] for r in log_records(tmp_path / 'run', 'resume')] == [4]
    assert [r['step'] for r in log_records(tmp_path / 'run')] == list(range(1, 7))
