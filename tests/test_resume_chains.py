"""A cluster job is many launches: any chain of resumes over one process, DDP, FSDP2 and expert parallelism is the
uninterrupted run.

Chains of one-step legs, each a launch of its own (2 gloo processes; the one-process legs run in this process): in CI
from tests/trainer_driver.py's launch server (fresh processes forked from one that imported torch once, with
torch.distributed.run's environment), in the stress tier through torch.distributed.run. The full chain (the stress
tier) holds the five chains of issue 32 as consecutive legs, so every kind of resume is followed by
a second one:

    EP 2 -> DDP -> DDP -> FSDP2 -> DDP -> one -> DDP -> EP 2 -> EP 2 -> FSDP2 -> EP 2 -> one

(EP 2 -> EP 1 -> EP 1; DDP -> FSDP2 -> DDP; 2 processes -> 1 -> 2; EP 1 -> EP 2 -> EP 2; FSDP2 -> EP 2 -> one.)
CI runs a shorter one in which each launch kind resumes another's checkpoint and the chains' key changes appear:
DDP -> EP 2 -> DDP -> FSDP2 -> EP 2 -> one -> DDP (the stress tier runs it through torch.distributed.run too).
The global batch is 8 images (4 per process on 2 processes, 2 accumulation steps on one), 36 images make 4 steps an
epoch, so the full chain crosses two epoch boundaries, the short one one. The reference is one uninterrupted run of
the chain's length on one process.
"""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vit_moe.training import train

from conftest import ROOT, launch_processes, log_records, make_image_folder, run_script, script_env, tiny_config
from trainer_driver import Launcher

pytestmark = pytest.mark.xdist_group('resume_chains')

CHAIN = ['ep2', 'ddp', 'ddp', 'fsdp2', 'ddp', 'one', 'ddp', 'ep2', 'ep2', 'fsdp2', 'ep2', 'one']
SHORT_CHAIN = ['ddp', 'ep2', 'ddp', 'fsdp2', 'ep2', 'one', 'ddp']
COMMON = dict(batch_size=4, checkpoint_every=1, keep_checkpoints=2, ema_decay=0.7, mixup=0.4,
              model_kwargs=dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_experts=4,
                                moe_blocks=1, drop_path_rate=0.1))


def _leg(kind: str, cfg, config_file, launcher=None) -> None:
    """One leg of the chain on the launch `kind`: through `launcher` (a Launcher), or torch.distributed.run."""
    if kind == 'one':
        train(cfg)
        return
    config_file.write_text(cfg.to_yaml())
    front = ['tests/fsdp_on_cpu.py'] if kind == 'fsdp2' else []
    ep = ['--expert-parallel-size=2'] if kind == 'ep2' else []
    command = [*front, 'train_scripts/train.py', '--config', str(config_file), *ep]
    if launcher is None:
        run = run_script([*launch_processes(2), *command], timeout=300)
    else:
        run = launcher.run(*command, processes=2)
    assert run.returncode == 0, f'{kind} leg: ' + run.stderr[-3000:]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('chains') / 'data')


@pytest.fixture(scope='module')
def launcher():
    server = Launcher(ROOT, script_env())
    yield server
    server.close()


@pytest.fixture(scope='module')
def uninterrupted(data, tmp_path_factory):
    """Steps -> the output folder of one uninterrupted run of that many steps on one process (built on demand)."""
    class Runs(dict):
        def __missing__(self, steps):
            summary = train(tiny_config(data.parent, output_dir=str(tmp_path_factory.mktemp('full') / 'run'),
                                        steps=steps, grad_accum_steps=2, **COMMON))
            self[steps] = summary['output_dir']
            return self[steps]
    return Runs()


def _weights(output_dir, folder='model'):
    return load_file(str(ROOT / output_dir / folder / 'model.safetensors'))


@pytest.mark.parametrize('chain, launches', [
    (SHORT_CHAIN, 'server'), pytest.param(SHORT_CHAIN, 'torchrun', marks=pytest.mark.stress),
    pytest.param(CHAIN, 'torchrun', marks=pytest.mark.stress)], ids=['short', 'short-torchrun', 'full'])
def test_a_chain_of_resumes_over_every_launch_is_the_uninterrupted_run(data, uninterrupted, tmp_path, chain, launches,
                                                                       request):
    out = tmp_path / 'chain'
    launcher = request.getfixturevalue('launcher') if launches == 'server' else None
    for step, kind in enumerate(chain, start=1):
        cfg = tiny_config(data.parent, output_dir=str(out), steps=step, resume='auto', **COMMON)
        _leg(kind, cfg, tmp_path / 'leg.yaml', launcher)
        losses = [r['loss'] for r in log_records(out)]
        reference = [r['loss'] for r in log_records(uninterrupted[len(chain)])][:step]
        np.testing.assert_allclose(losses, reference, rtol=1e-3, err_msg=f'after leg {step} ({kind})')
    starts = log_records(out, 'start')
    assert [s['num_processes'] for s in starts] == [1 if k == 'one' else 2 for k in chain]
    assert [s['grad_accum_steps'] for s in starts] == [2 if k == 'one' else 1 for k in chain]
    assert {s['global_batch'] for s in starts} == {8}
    for folder in ('model', 'model_ema'):
        got, expected = _weights(out, folder), _weights(uninterrupted[len(chain)], folder)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-4, msg=f'{folder}: {key}')


def test_a_checkpoint_of_the_accelerate_layout_is_refused_in_one_line_that_says_what_to_do(data, tmp_path):
    """Checkpoints written before the training state was saved by name (vit-moe 0.3: Accelerate's save_state)."""
    old = tmp_path / 'run' / 'checkpoints' / 'checkpoint_step_4'
    old.mkdir(parents=True)
    for name in ('model.safetensors', 'optimizer.bin', 'custom_checkpoint_0.pkl', 'random_states_0.pkl', 'COMPLETE'):
        (old / name).write_bytes(b'')
    from vit_moe.training import ConfigError
    with pytest.raises(ConfigError, match=r'written by vit-moe 0.3 or earlier .*start a new run from its weights: '
                                          r'pretrained=.*checkpoint_step_4/model.safetensors'):
        train(tiny_config(data.parent, output_dir=str(tmp_path / 'run'), resume='latest', **COMMON))
