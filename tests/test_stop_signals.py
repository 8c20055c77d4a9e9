"""Data-loader workers and a stop signal (SIGTERM to the whole job): one that lands while workers start kills no
worker and still reaches the main process; no worker is left with the signals blocked."""
import os
import signal
import threading

import pytest
import torch
from torch.utils.data._utils import signal_handling

from vit_moe.data import ignore_stop_signals, iter_with_shielded_workers
from vit_moe.data.stop_signals import STOP_SIGNALS, stop_signals_blocked


class BlockedSignals(torch.utils.data.Dataset):
    """Item i: (i, whether SIGTERM is blocked in the worker that loads it)."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return i, signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def loader(**kwargs):
    return torch.utils.data.DataLoader(BlockedSignals(), batch_size=2, num_workers=2, **kwargs)


@pytest.fixture
def sigterm_as_workers_start(monkeypatch):
    """Every worker gets SIGTERM (from another process's view: not its parent) right after torch installed its own
    handler and before `worker_init_fn` runs: the window a preemption can hit every epoch."""
    original = signal_handling._set_worker_signal_handlers

    def install_then_receive_sigterm():
        original()
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(signal_handling, '_set_worker_signal_handlers', install_then_receive_sigterm)


@pytest.fixture
def received():
    """The stop signals this process received, in order."""
    got = []
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in STOP_SIGNALS}
    yield got
    for s, handler in previous.items():
        signal.signal(s, handler)


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


@pytest.mark.parametrize('wrapper', ['none', 'accelerate', 'accelerate skip'])
def test_a_sigterm_while_workers_start_kills_no_worker(sigterm_as_workers_start, wrapper, request):
    """As the trainer iterates: a DataLoader, Accelerate's prepared one (workers start at its first `next`), and
    Accelerate's `skip_first_batches` of it (a resumed epoch)."""
    data, skip = loader(worker_init_fn=ignore_stop_signals), 0
    if wrapper != 'none':
        accelerator = request.getfixturevalue('accelerator')
        data = accelerator.prepare(data)
        if wrapper == 'accelerate skip':
            data, skip = accelerator.skip_first_batches(data, 1), 2
    batches = list(iter_with_shielded_workers(data))
    assert torch.cat([index for index, _ in batches]).tolist() == list(range(skip, 8))
    assert not any(blocked.any() for _, blocked in batches)  # the workers unblocked the signals again


def test_unshielded_workers_die_of_it(sigterm_as_workers_start):
    """What the shield prevents (torch's own behaviour: the test above would fail the same way without it)."""
    with pytest.raises(RuntimeError, match='DataLoader worker .* (killed by signal|exited unexpectedly)'):
        list(loader(worker_init_fn=ignore_stop_signals))


def test_a_stop_signal_while_blocked_reaches_the_main_process_afterwards(received):
    """Sent to the blocked (main) thread itself: a signal sent to the process may be taken by another of its threads,
    which also sets the main process's flag, but not deterministically."""
    with stop_signals_blocked():
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)
        assert received == []  # pending
    assert sorted(received) == sorted([signal.SIGTERM, signal.SIGINT])
    assert not set(STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the mask is restored


def test_other_loaders_are_not_shielded():
    """A loader without `ignore_stop_signals` has workers that could never unblock the signals: left as it is."""
    batches = list(iter_with_shielded_workers(loader()))
    assert torch.cat([index for index, _ in batches]).tolist() == list(range(8))
    assert not any(blocked.any() for _, blocked in batches)
