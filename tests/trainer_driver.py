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
"""
import os
import runpy
import signal
import sys

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


if __name__ == '__main__':
    action, where, n, script = sys.argv[1:5]
    signal_at(action, where, int(n))
    sys.argv = sys.argv[4:]
    runpy.run_path(script, run_name='__main__')
