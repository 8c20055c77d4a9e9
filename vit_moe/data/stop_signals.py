"""Data-loader workers and stop signals: a preempted job (SLURM, `kill -TERM -<pgid>`) or Ctrl-C signals every
process of the group, the workers included, and no worker may die of it before the main process has saved.

Each worker ignores SIGTERM and SIGINT (`ignore_stop_signals`, the DataLoader's `worker_init_fn`). That alone
leaves a window: torch's worker loop installs its own SIGTERM handler (die, unless the parent sent it) before
`worker_init_fn` runs, so a signal landing while workers start (every epoch, every evaluation) killed one and the run
ended with "DataLoader worker ... exited unexpectedly" instead of a checkpoint. `iter_with_shielded_workers`
therefore starts the workers with the stop signals blocked; a worker inherits the blocked mask, ignores the signals,
then unblocks them (one that arrived meanwhile is discarded), and the main process receives its own pending signal
when it unblocks. With the 'forkserver' start method the workers' mask is the fork server's (not shielded).
"""
import signal
from contextlib import contextmanager
from typing import Iterable, Iterator, TypeVar

__all__ = ['STOP_SIGNALS', 'ignore_stop_signals', 'iter_with_shielded_workers', 'stop_signals_blocked']

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
T = TypeVar('T')
_END = object()  # an exhausted iterator's first `next`


@contextmanager
def stop_signals_blocked():
    """Block SIGTERM and SIGINT in this thread (and in processes forked from it); restore the mask on exit, which
    delivers any that arrived meanwhile."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the worker ignores SIGTERM and SIGINT (the main process saves, then shuts the
    workers down as usual; they also exit on their own when it dies), then unblocks them."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def iter_with_shielded_workers(loader: Iterable[T]) -> Iterator[T]:
    """Iterate `loader` (a DataLoader, or Accelerate's wrapper of one) with its worker processes started while the stop
    signals are blocked: `iter` forks them (a DataLoader) or the first `next` does (Accelerate's generator wrappers).

    Only a loader whose `worker_init_fn` is `ignore_stop_signals` is shielded (its workers unblock the signals);
    any other is iterated as it is, so that no worker keeps them blocked for good."""
    if getattr(loader, 'worker_init_fn', None) is not ignore_stop_signals:
        yield from loader
        return
    with stop_signals_blocked():
        iterator = iter(loader)
        first = next(iterator, _END)
    if first is _END:
        return
    yield first
    yield from iterator

