"""Data-loader workers and stop signals: a preempted job (SLURM, `kill -TERM -<pgid>`) or Ctrl-C signals every
process of the group, the workers included, and no worker may die of it before the main process has saved. The same
holds for the trainer's early-warning save signal (SIGUSR1 by default: SLURM's `--signal=USR1@120`), whose default
action would kill a worker too.

Each worker ignores the signals (`WorkerSignals`, the DataLoader's `worker_init_fn`; `ignore_stop_signals` for
SIGTERM and SIGINT). That alone leaves a window: torch's worker loop installs its own SIGTERM handler (die, unless the
parent sent it) before `worker_init_fn` runs, so a signal landing while workers start (every epoch, every evaluation)
killed one and the run ended with "DataLoader worker ... exited unexpectedly" instead of a checkpoint.
`iter_with_shielded_workers` therefore starts the workers with the signals blocked; a worker inherits the blocked
mask, ignores the signals, then unblocks them (one that arrived meanwhile is discarded), and the main process
receives its own pending signal when it unblocks. With the 'forkserver' start method the workers' mask is the fork
server's (not shielded).
"""
import signal
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence, TypeVar

__all__ = ['STOP_SIGNALS', 'WorkerSignals', 'ignore_stop_signals', 'iter_with_shielded_workers',
           'stop_signals_blocked']

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
T = TypeVar('T')
_END = object()  # an exhausted iterator's first `next`


@contextmanager
def stop_signals_blocked(signals: Sequence[int] = STOP_SIGNALS):
    """Block `signals` in this thread (and in processes forked from it); restore the mask on exit, which delivers any
    that arrived meanwhile."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class WorkerSignals:
    """DataLoader `worker_init_fn`: the worker ignores `signals` (the main process saves, then shuts the workers down
    as usual; they also exit on their own when it dies), then unblocks them. Picklable (spawn start method)."""

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS):
        self.signals = tuple(dict.fromkeys(int(s) for s in signals))

    def __call__(self, worker_id: int = 0) -> None:
        for signum in self.signals:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)

    def __eq__(self, other) -> bool:
        return isinstance(other, WorkerSignals) and other.signals == self.signals

    def __hash__(self) -> int:
        return hash(self.signals)


ignore_stop_signals = WorkerSignals(STOP_SIGNALS)


def iter_with_shielded_workers(loader: Iterable[T]) -> Iterator[T]:
    """Iterate `loader` (a DataLoader, or Accelerate's wrapper of one) with its worker processes started while the
    signals its `worker_init_fn` ignores are blocked: `iter` forks them (a DataLoader) or the first `next` does
    (Accelerate's generator wrappers).

    Only a loader whose `worker_init_fn` is a `WorkerSignals` is shielded (its workers unblock the signals); any
    other is iterated as it is, so that no worker keeps them blocked for good."""
    shield = getattr(loader, 'worker_init_fn', None)
    if not isinstance(shield, WorkerSignals):
        yield from loader
        return
    with stop_signals_blocked(shield.signals):
        iterator = iter(loader)
        first = next(iterator, _END)
    if first is _END:
        return
    yield first
    yield from iterator
