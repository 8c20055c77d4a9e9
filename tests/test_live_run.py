"""One live run per output folder, the way users meet it: a requeued job launched into the folder of a run that has
not died yet is refused in one line naming that run; once the run is killed (SIGKILL), its stale lock is taken over.
The live run and the refused launch are `python train_scripts/train.py` processes; the launch that takes over runs
train.py's main in this process (a process other than the killed one, which is what the lock tells apart)."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, TRAIN_MOE, log_records, run_front_end, run_script, script_env

# the stress tier (CI: tests/test_run_lock.py, the same lock with real processes: a running and a SIGSTOPped holder
# refuse a second one, a SIGKILLed holder's lock is taken over, two gloo processes refuse together)
pytestmark = pytest.mark.stress

RUN = dict(model='vit_ti16_moe_upcycled', batch_size=6, num_workers=0, steps=4, lr=3e-3, warmup_steps=1, log_every=1,
           checkpoint_every=2, trackers='none', progress='false', resume='auto')


def _args(data, out):
    model_kwargs = '{' + ', '.join(f'{k}: {v}' for k, v in TRAIN_MOE.items()) + '}'
    return [f'--{k}={v}' for k, v in dict(RUN, model_kwargs=model_kwargs, data_dir=str(data),
                                          output_dir=str(out)).items()]


def test_a_second_launch_into_a_live_runs_folder_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, data):
    out = tmp_path / 'run'
    first = subprocess.Popen([sys.executable, 'tests/trainer_driver.py', 'stop', 'after_step', '1',
                              'train_scripts/train.py', *_args(data, out)], cwd=ROOT, env=script_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), 'the first run ended before step 1'
        second = run_script([sys.executable, 'train_scripts/train.py', *_args(data, out)])
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-3000:]
        assert f"output_dir '{out}' is in use by a live run (host {socket.gethostname()}, pid {first.pid}" in lines[0]
        assert not list(out.glob('checkpoints/*'))  # the second launch touched nothing of the live run
    finally:
        first.kill()  # SIGKILL: the kernel drops its lock, the file still names it
        first.communicate()
    assert first.returncode == -signal.SIGKILL
    rc, _, err = run_front_end('train_scripts/train.py', *_args(data, out))
    assert rc == 0, err[-3000:]
    assert [r['step'] for r in log_records(out)] == [1, 2, 3, 4]
