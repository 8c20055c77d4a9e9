"""One live run per output folder (vit_moe/training/run_lock.py), with real processes: a live holder (running or
SIGSTOPped) makes a second launch refuse in one line naming its host and pid; a SIGKILLed holder's lock is taken over;
a holder that ends normally releases it; every process of a distributed launch refuses alike, rank 0 printing the line.
Also the exit status a scheduler sees from configs/slurm/train.sbatch on SIGTERM (128 + 15 once the trainers saved).

The holders are `python -c` children that import only run_lock.py (and config.py, for ConfigError): the package's
__init__ files, which import torch and timm, are replaced by empty package modules, so a child starts in ~0.1 s.
"""
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from vit_moe.training.config import ConfigError
from vit_moe.training.run_lock import LOCK_FILE, RunLock, RunLockedError, acquire_run_lock, refusal_message

from conftest import ROOT

pytestmark = pytest.mark.skipif(not hasattr(os, 'fork') or sys.platform == 'win32', reason='POSIX locks')

# the package modules without their __init__ (no torch / timm import in a child)
LIGHT_IMPORT = textwrap.dedent(f"""
    import sys, types
    for _name in ('vit_moe', 'vit_moe.training'):
        _module = types.ModuleType(_name)
        _module.__path__ = [{str(ROOT)!r} + '/' + _name.replace('.', '/')]
        sys.modules[_name] = _module
    from vit_moe.training.run_lock import RunLock, RunLockedError, acquire_run_lock
""")


def _python(code: str, *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-c', LIGHT_IMPORT + textwrap.dedent(code), *map(str, args)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _holder(output_dir, how: str = 'with') -> subprocess.Popen:
    """A child that takes the lock, prints its owner record, and holds the lock until its stdin closes; then it ends
    normally: leaving the `with` block ('with'), or with the lock still taken, through `_cli.leave` as a process of a
    launch ends ('leave': atexit handlers, then os._exit: no garbage collection that would release it otherwise)."""
    code = {
        'with': """
            with RunLock(sys.argv[1]) as lock:
                print(json.dumps(lock.owner), flush=True)
                sys.stdin.read()
        """,
        'leave': """
            import os
            from vit_moe import _cli
            lock = RunLock(sys.argv[1]).acquire()
            print(json.dumps(lock.owner), flush=True)
            sys.stdin.read()
            os.environ['WORLD_SIZE'] = '2'
            _cli.leave(0)
        """,
    }[how]
    proc = _python('import json\n' + textwrap.dedent(code), output_dir)
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    proc.owner = json.loads(line)
    return proc


def _try_in_child(output_dir) -> str:
    """'locked' or the refusal, as another process sees the folder."""
    proc = _python("""
        try:
            RunLock(sys.argv[1]).acquire()
            print('locked')
        except RunLockedError as e:
            print(e)
    """, output_dir)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out.strip()


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=60)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        stream.close()


def test_a_live_run_refuses_a_second_launch_in_one_line_naming_its_host_and_pid(tmp_path):
    out = tmp_path / 'run'
    holder = _holder(out)
    try:
        assert holder.owner['pid'] == holder.pid and holder.owner['host'] == socket.gethostname()
        for state in ('running', 'stopped'):  # a SIGSTOPped run (suspended, or a debugger's) is alive too
            if state == 'stopped':
                holder.send_signal(signal.SIGSTOP)
            with pytest.raises(RunLockedError) as refused:
                RunLock(out).acquire()
            message = str(refused.value)
            assert isinstance(refused.value, ConfigError) and '\n' not in message
            assert f'host {socket.gethostname()}, pid {holder.pid}, started ' in message, message
            assert repr(str(out)) in message and 'another output_dir' in message
            assert _try_in_child(out) == message  # the same from a third process
        holder.send_signal(signal.SIGCONT)
        assert json.loads((out / LOCK_FILE).read_text())['pid'] == holder.pid  # the refusals wrote nothing
    finally:
        _end(holder)


def test_a_lock_left_by_a_sigkilled_run_is_stale_and_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / 'run'
    holder = _holder(out)
    holder.send_signal(signal.SIGKILL)
    _end(holder)
    assert holder.returncode == -signal.SIGKILL
    assert json.loads((out / LOCK_FILE).read_text())['pid'] == holder.pid  # left as it was: no one released it
    with caplog.at_level(logging.INFO, logger='vit_moe'):
        with RunLock(out) as lock:
            assert lock.locked and lock.previous_owner['pid'] == holder.pid and lock.owner['pid'] == os.getpid()
            # now ours, and live (read by another process: the holder must not open and close its lock file, which
            # would drop its POSIX lock)
            assert _try_in_child(out) == refusal_message(out, lock.owner)
    taken_over = [r.getMessage() for r in caplog.records if 'took over the run lock' in r.getMessage()]
    assert len(taken_over) == 1 and f'pid {holder.pid}' in taken_over[0], caplog.text
    assert _try_in_child(out) == 'locked'  # released at the end of the `with` block


@pytest.mark.parametrize('how', ['with', 'leave'])
def test_a_run_that_ends_normally_releases_the_lock_and_leaves_no_stale_owner(tmp_path, caplog, how):
    out = tmp_path / 'run'
    holder = _holder(out, how)
    assert _try_in_child(out) != 'locked'
    holder.stdin.close()  # the holder ends normally
    assert holder.wait(timeout=60) == 0, holder.stderr.read()
    assert (out / LOCK_FILE).read_text() == ''  # emptied by the release
    with caplog.at_level(logging.INFO, logger='vit_moe'):
        lock = RunLock(out).acquire()
    assert lock.locked and lock.previous_owner is None and 'took over' not in caplog.text
    lock.release()


def test_a_missing_output_dir_is_created_and_the_owner_written(tmp_path):
    out = tmp_path / 'not' / 'yet'
    with RunLock(out) as lock:
        owner = json.loads((out / LOCK_FILE).read_text())
        assert owner == lock.owner
        assert owner['host'] == socket.gethostname() and owner['pid'] == os.getpid() and owner['started']
    assert (out / LOCK_FILE).is_file()  # kept, empty: deleting it would let two launches lock two files


def test_within_one_process_locks_on_one_folder_share_one_os_lock(tmp_path):
    """POSIX locks belong to a process: a second RunLock in the same process shares the first (closing its own file
    descriptor would drop the process's lock), and the OS lock goes with the last release."""
    out = tmp_path / 'run'
    first = RunLock(out).acquire()
    second = RunLock(str(out) + '/.').acquire()  # another spelling of the same folder
    assert first.locked and second.locked and second.owner == first.owner
    first.release()
    assert _try_in_child(out).startswith(f'output_dir {str(out)!r} is in use by a live run')
    second.release()
    second.release()  # idempotent
    assert _try_in_child(out) == 'locked'


def test_the_refusal_message_is_one_line_with_what_to_do(tmp_path):
    owner = dict(host='node-7', pid=4242, started='2026-01-02T03:04:05Z')
    message = refusal_message(tmp_path / 'run', owner)
    assert message == (f"output_dir '{tmp_path}/run' is in use by a live run (host node-7, pid 4242, started "
                       f"2026-01-02T03:04:05Z); stop that run (or wait for it to end) before launching into this "
                       f"folder, or give another output_dir")
    assert 'owner not written yet' in refusal_message('x', None)  # a holder between its lock and its write
    assert 'host ?, pid ?' in refusal_message('x', {'unreadable': 'garbage'})


def test_acquire_run_lock_gives_every_process_rank_0s_verdict(tmp_path):
    out = tmp_path / 'run'
    shared = []
    lock = acquire_run_lock(out, is_main=True, broadcast=lambda v: shared.append(v) or v)
    assert lock.locked and shared == [None]
    refusal = refusal_message(out, lock.owner)
    # another launch while this one lives: a process other than rank 0 raises what rank 0 found, touching nothing
    other = tmp_path / 'other'
    with pytest.raises(RunLockedError) as refused:
        acquire_run_lock(other, is_main=False, broadcast=lambda v: refusal)
    assert str(refused.value) == refusal and not other.exists()
    worker = acquire_run_lock(other, is_main=False, broadcast=lambda v: None)
    assert not worker.locked and not other.exists()
    worker.release()
    lock.release()


WORKER = """
    import os
    import torch.distributed as dist
    from vit_moe import _cli
    dist.init_process_group('gloo', init_method='file://' + sys.argv[2], rank=int(os.environ['RANK']), world_size=2)

    def broadcast(verdict):
        shared = [verdict]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def main(argv):
        acquire_run_lock(argv[0], os.environ['RANK'] == '0', broadcast)
        print('started', flush=True)

    _cli.leave(_cli.run(main, sys.argv[1:2], prog='train.py'))
"""


def test_every_process_of_a_distributed_launch_refuses_alike_and_rank_0_prints_the_line(tmp_path):
    """Two gloo processes (as under torchrun) launched into a folder whose run lives: both exit 2, one line in all.
    (The verdict None, every process going on, is the unit test above: a second launch would double this test's
    ~9 s of torch imports.)"""
    out = tmp_path / 'run'
    holder = _holder(out)
    try:
        ranks = [_python(WORKER, out, tmp_path / 'store', env=dict(os.environ, RANK=str(r), WORLD_SIZE='2'))
                 for r in range(2)]
        results = [p.communicate(timeout=120) for p in ranks]
        assert [p.returncode for p in ranks] == [2, 2], results
        assert results[0][1] == f'train.py: error: {refusal_message(out, holder.owner)}\n'
        assert results[1] == ('', '')
    finally:
        _end(holder)


# ---------------------------------------------------------------------------------------------------------------------
# The exit status a scheduler sees: configs/slurm/train.sbatch under one-node stand-ins for srun and scontrol

SRUN = """#!/bin/bash
# one-node srun: drop srun's options, run the command in its place
while [ $# -gt 0 ]; do case "$1" in
    --nodes|--ntasks-per-node) shift 2;;
    --*) shift;;
    *) break;;
esac; done
exec "$@"
"""
SCONTROL = """#!/bin/bash
case "$1" in show) echo localhost;; *) echo "scontrol $*" >&2;; esac
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_the_slurm_script_exits_128_plus_sigterm_once_the_trainers_saved(tmp_path):
    """SIGTERM to the batch script alone: its trap forwards it to this job's two trainers (not to torchrun's agent),
    they save at their next step, torchrun exits 1, and the script exits 143, as README promises (before, the script
    died of the signal at once, leaving the trainers unsignalled). srun runs the command in its place here, one node."""
    psutil = pytest.importorskip('psutil')
    from conftest import make_image_folder, script_env, tiny_config
    from vit_moe.training.checkpoints import latest_checkpoint
    make_image_folder(tmp_path / 'data')
    config = tmp_path / 'tiny.yaml'
    config.write_text(tiny_config(tmp_path, steps=100000, checkpoint_every=100000, batch_size=4).to_yaml())
    shims = tmp_path / 'bin'
    shims.mkdir()
    for name, text in (('srun', SRUN), ('scontrol', SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    out = tmp_path / 'run'
    env = dict(script_env(), PATH=f'{shims}:{os.environ["PATH"]}', SLURM_JOB_NAME='t',
               SLURM_JOB_ID=f'test{os.getpid()}{tmp_path.name}',  # the script signals this job's trainers only
               SLURM_JOB_NODELIST='localhost', SLURM_NNODES='1', CONFIG=str(config), OUTPUT_DIR=str(out), EP='1',
               GPUS_PER_NODE='2', PYTHON=sys.executable, RDZV_PORT=str(_free_port()))
    stderr = open(tmp_path / 'stderr', 'w+')
    proc = subprocess.Popen(['bash', 'configs/slurm/train.sbatch'], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=stderr, start_new_session=True)
    job, seen = psutil.Process(proc.pid), []
    try:
        deadline = time.monotonic() + 180
        while not ((out / 'log.jsonl').is_file() and '"type": "train"' in (out / 'log.jsonl').read_text()):
            assert proc.poll() is None, open(tmp_path / 'stderr').read()[-3000:]
            assert time.monotonic() < deadline, 'no training step in 180 s'
            time.sleep(0.2)
        seen += job.children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 128 + signal.SIGTERM, open(tmp_path / 'stderr').read()[-3000:]
    finally:  # nothing left running, whatever failed (torchrun's trainers run in sessions of their own)
        for leftover in seen + [job]:
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        stderr.close()
    log = (tmp_path / 'stderr').read_text()
    stops = re.findall(r'stopped by signal 15 at step (\d+); checkpoint saved', log)
    assert len(stops) == 2 and stops[0] == stops[1], log[-3000:]
    assert 'the trainers stopped on signal 15 and saved their checkpoint (torchrun exited 1): exit 143' in log
    assert latest_checkpoint(out).name == f'checkpoint_step_{stops[0]}'  # the one checkpoint: the stop's
    assert '"reason": "signal 15"' in (out / 'log.jsonl').read_text()
