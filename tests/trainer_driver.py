"""Run a front end with one of the trainer's functions made the moment of a signal: no timing in the tests.

    python tests/trainer_driver.py ACTION WHERE N train_scripts/train.py [ARGS ...]
    python -m torch.distributed.run --nproc_per_node 2 tests/trainer_driver.py ...   (every process does it)

Just before the N-th call of WHERE, this process
  kill   sends itself SIGKILL: killed at exactly that point;
  stop   sends itself SIGSTOP: the test sees it stopped (waitpid with WUNTRACED, or psutil), sends what it wants
         (SIGTERM to the whole job, SIGKILL), then SIGCONT. A stopped trainer starts and ends no DataLoader worker,
         so the job's processes are a fixed set while the test signals them.
WHERE:
  step        Trainer.train_step: inside a step (before its forward)
  after_step  Trainer.after_step: a step boundary (step N done; the epoch's DataLoader workers are running)
  log         RunLog.write: a log record about to be written
  save        vit_moe._files.fsync_tree: a checkpoint's files written, not yet renamed into place
  prune       vit_moe.training.checkpoints._erase: an old checkpoint being deleted

    python tests/trainer_driver.py serve    (started by `Launcher`, below)

A launch server: this process imports torch, timm, Accelerate and vit_moe once, then forks a fresh process for each
launch a test asks for (one JSON line on stdin), which runs `[ACTION WHERE N] script ARGS` as `python tests/trainer_driver.py`
would, with its output in files, and replies with the exit codes. A launch then costs no interpreter start-up and no
imports (~6 s of CPU each). Several processes per launch stand in for torch.distributed.run's: the same environment
(RANK, WORLD_SIZE, MASTER_PORT, ...), their rendezvous store held by the test (as torchrun's agent holds it).
"""
import atexit
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback

import vit_moe._files as files
import vit_moe.training.checkpoints as checkpoints
import vit_moe.training.loop as loop
import vit_moe.training.run_log as run_log

POINTS = {'step': (loop.Trainer, 'train_step'), 'after_step': (loop.Trainer, 'after_step'),
          'log': (run_log.RunLog, 'write'), 'save': (files, 'fsync_tree'), 'prune': (checkpoints, '_erase')}
ACTIONS = {'kill': signal.SIGKILL, 'stop': signal.SIGSTOP}


def signal_at(action: str, where: str, n: int) -> None:
    """Send ACTIONS[action] to this process just before the n-th call of POINTS[where]."""
    owner, name = POINTS[where]
    real, calls = getattr(owner, name), [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), ACTIONS[action])
        return real(*args, **kwargs)
    setattr(owner, name, patched)


def _run_front_end(argv, env, stdout, stderr) -> None:
    """In a forked child of the server: run `argv` ([ACTION WHERE N] script ARGS) as its own process would; never
    returns (exits with the script's exit code)."""
    code = 1
    try:
        for fd, path in ((1, stdout), (2, stderr)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # not the server's request pipe
        sys.stdin = open(0, closefd=False)
        os.environ.update(env)
        if argv[0] in ACTIONS:
            signal_at(argv[0], argv[1], int(argv[2]))
            argv = argv[3:]
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name='__main__')
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # as the interpreter's exit would (logging.shutdown, ...)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code)


def serve() -> None:
    """Answer each request ({"launches": [{"argv", "env", "stdout", "stderr"}, ...]}: one process each, started
    together) with {"returncodes": [...]}, as subprocess reports them (-N: killed by signal N)."""
    import accelerate  # noqa: F401  everything a front end imports, once, before any fork (no thread runs yet)
    import timm  # noqa: F401
    import vit_moe.training  # noqa: F401
    import vit_moe.data  # noqa: F401
    for line in sys.stdin:
        pids = []
        for launch in json.loads(line)['launches']:
            pid = os.fork()
            if pid == 0:
                _run_front_end(launch['argv'], launch['env'], launch['stdout'], launch['stderr'])
            pids.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        sys.stdout.write(json.dumps(dict(returncodes=codes)) + '\n')
        sys.stdout.flush()


class Launcher:
    """Launches through a server (`python tests/trainer_driver.py serve`): `run(*argv)` is `python *argv` (argv:
    [ACTION WHERE N] script ARGS), `run(*argv, processes=2)` is `python -m torch.distributed.run --nproc_per_node 2
    *argv`; both return a subprocess.CompletedProcess (returncode: the first non-zero exit code of the processes, as
    torchrun's; stdout / stderr: the processes' in rank order). `close()` ends the server and anything it started."""

    def __init__(self, cwd, env):
        self.env = env
        self.folder = tempfile.TemporaryDirectory(prefix='launcher_')
        self.count = 0
        self.server = subprocess.Popen([sys.executable, __file__, 'serve'], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, start_new_session=True)

    def run(self, *argv, processes: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
        import select
        from torch.distributed import TCPStore
        store = TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False) if processes > 1 else None
        launches = []
        for rank in range(processes):
            self.count += 1
            env = {} if store is None else dict(
                RANK=str(rank), LOCAL_RANK=str(rank), GROUP_RANK='0', ROLE_RANK=str(rank), WORLD_SIZE=str(processes),
                LOCAL_WORLD_SIZE=str(processes), ROLE_WORLD_SIZE=str(processes), MASTER_ADDR='127.0.0.1',
                MASTER_PORT=str(store.port), TORCHELASTIC_USE_AGENT_STORE='True', TORCHELASTIC_RESTART_COUNT='0',
                TORCHELASTIC_RUN_ID=f'launch_{self.count}')
            launches.append(dict(argv=list(map(str, argv)), env=env, stdout=f'{self.folder.name}/{self.count}.out',
                                 stderr=f'{self.folder.name}/{self.count}.err'))
        self.server.stdin.write(json.dumps(dict(launches=launches)) + '\n')
        self.server.stdin.flush()
        ready, _, _ = select.select([self.server.stdout], [], [], timeout)
        line = self.server.stdout.readline() if ready else ''
        if not line:
            self.close()
            raise (subprocess.TimeoutExpired(argv, timeout) if not ready else RuntimeError('the launch server died'))
        codes = json.loads(line)['returncodes']
        outputs = [[open(launch[stream]).read() for launch in launches] for stream in ('stdout', 'stderr')]
        return subprocess.CompletedProcess(list(argv), next((c for c in codes if c), 0), *map(''.join, outputs))

    def close(self) -> None:
        if self.server.poll() is None:
            os.killpg(self.server.pid, signal.SIGKILL)  # the server's session: it and its launches
        self.server.wait()
        for stream in (self.server.stdin, self.server.stdout):
            stream.close()
        self.folder.cleanup()


if __name__ == '__main__' and sys.argv[1:2] == ['serve']:
    serve()
elif __name__ == '__main__':
    action, where, n, script = sys.argv[1:5]
    signal_at(action, where, int(n))
    sys.argv = sys.argv[4:]
    runpy.run_path(script, run_name='__main__')
