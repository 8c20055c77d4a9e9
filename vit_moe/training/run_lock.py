""" One live run per output folder: an OS lock on `output_dir/.run.lock`, held by the run's main process.

A requeued cluster job whose predecessor has not died yet, or a script that lost track of its child, would otherwise
start a second run in the same `output_dir`, and the two delete each other's checkpoint files. The main process takes
the lock before it writes anything into `output_dir` and holds it for the run's whole life:

    with RunLock(output_dir):         # creates output_dir if needed; refuses (ConfigError) while another run lives
        ...train...

    # every process of a distributed launch (rank 0 tries the lock, every process gets its verdict):
    lock = acquire_run_lock(output_dir, is_main, broadcast=lambda v: broadcast_object_list([v])[0])

The lock is a POSIX record lock (`fcntl.lockf`), which the kernel drops when its process ends however it ends: a lock
left by a run killed with SIGKILL (or by a node that died) is not a live run's, and the next launch takes it over
with a warning naming the run that left it. POSIX locks also work on NFSv4 shared folders (flock does not on every
NFS client); there a lock of a *node* that died is released when the server's lease expires (typically 90 s).
After taking the lock, the holder writes its host name, pid and start time into the file (JSON), so a refused launch
can name the live run: one line, `output_dir '...' is in use by a live run (host H, pid P, started T); ...`. A clean
release empties the file (it is not deleted: deleting a lock file lets two launches lock two different files), so
content found when the lock is taken means the previous run ended without releasing it.

POSIX locks belong to a process: within one process, a second RunLock on the same folder shares the first (one OS
lock, released when the last holder releases it; two runs in one process are the caller's business), and a forked
child (a DataLoader worker) neither holds nor releases it. For the same reason the holding process must not open
and close the lock file itself (closing any descriptor of a file drops the process's POSIX locks on it): its record
is `RunLock.owner`; read the file from another process. The lock is released by `release()`, by leaving the `with`
block, at interpreter exit (atexit, also run by `vit_moe._cli.leave`) and by the kernel when the process dies.

Degrades without failing: where `fcntl` does not exist (Windows) or the file system refuses locks (ENOLCK, an NFS
mount without a lock service), the run goes on unlocked, with one warning saying that runs in the same output_dir are
not kept apart there.

This module imports only the standard library and `config` (for ConfigError).
"""
import atexit
import errno
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from .config import ConfigError

try:
    import fcntl
except ImportError:  # Windows: no POSIX record locks
    fcntl = None

__all__ = ['RunLock', 'RunLockedError', 'acquire_run_lock', 'refusal_message', 'LOCK_FILE']

LOCK_FILE = '.run.lock'
_HELD_ERRNOS = (errno.EACCES, errno.EAGAIN)  # lockf's answer when another process holds the lock

_logger = logging.getLogger(__name__)


class RunLockedError(ConfigError):
    """Another live run holds the output folder's lock."""


def _describe(owner: Optional[Dict[str, Any]]) -> str:
    """'host H, pid P, started T' from a lock file's JSON (what is known of it)."""
    if not owner:
        return 'owner not written yet'
    parts = [f'host {owner.get("host", "?")}', f'pid {owner.get("pid", "?")}']
    if owner.get('started'):
        parts.append(f'started {owner["started"]}')
    return ', '.join(parts)


def refusal_message(output_dir, owner: Optional[Dict[str, Any]]) -> str:
    """The one-line refusal: the folder, the live run's host and pid, and what to do."""
    return (f'output_dir {str(output_dir)!r} is in use by a live run ({_describe(owner)}); stop that run (or wait for '
            f'it to end) before launching into this folder, or give another output_dir')


def _parse_owner(raw: bytes) -> Optional[Dict[str, Any]]:
    text = raw.decode('utf-8', 'replace').strip()
    if not text:
        return None
    try:
        owner = json.loads(text)
    except ValueError:
        return {'host': '?', 'pid': '?', 'unreadable': text[:80]}
    return owner if isinstance(owner, dict) else None


def _owner_record() -> Dict[str, Any]:
    return dict(host=socket.gethostname(), pid=os.getpid(),
                started=time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()), started_unix=round(time.time(), 3))


class _Held:
    """This process's OS lock on one lock file (shared by every RunLock of this process on that file)."""

    def __init__(self, key: Tuple[int, int], fd: int, path: Path):
        self.key, self.fds, self.path = key, [fd], path
        self.count = 0
        self.owner: Optional[Dict[str, Any]] = None
        self.pid = os.getpid()  # a forked child inherits the object, not the lock: it must not release it


_registry: Dict[Tuple[int, int], _Held] = {}
_registry_lock = threading.Lock()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _drop(held: _Held) -> None:
    """Release `held` for good: empty the file (a clean end), unlock, close. Callers hold _registry_lock."""
    _registry.pop(held.key, None)
    if held.pid != os.getpid():
        return  # inherited by fork: not this process's lock
    try:
        os.ftruncate(held.fds[0], 0)
        fcntl.lockf(held.fds[0], fcntl.LOCK_UN)
    except OSError:
        pass  # closing the descriptors below releases it anyway
    for fd in held.fds:
        _close_quietly(fd)


@atexit.register
def _release_all_at_exit() -> None:
    with _registry_lock:
        for held in list(_registry.values()):
            _drop(held)


class RunLock:
    """The lock on `output_dir/.run.lock`; `acquire()` (or `with`) takes it or raises RunLockedError (see the module
    doc). `locked` says whether this object holds the OS lock; `owner` is the record written into the file, and
    `previous_owner` that of a run whose stale lock was taken over (None otherwise)."""

    def __init__(self, output_dir):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self.locked = False
        self.owner: Optional[Dict[str, Any]] = None
        self.previous_owner: Optional[Dict[str, Any]] = None
        self._held: Optional[_Held] = None

    def acquire(self) -> 'RunLock':
        if self._held is not None:
            return self
        if fcntl is None:
            _logger.warning(f'no fcntl on this platform: output_dir {str(self.output_dir)!r} is not locked, a second '
                            f'run launched into it would not be refused')
            return self
        self.output_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            stat = os.fstat(fd)
            key = (stat.st_dev, stat.st_ino)
            with _registry_lock:
                held = _registry.get(key)
                if held is not None and held.pid == os.getpid():  # this process holds it already: share it
                    held.fds.append(fd)  # closing it would drop the process's lock: closed at the last release
                    fd = None
                    held.count += 1
                    self._held, self.locked, self.owner = held, True, held.owner
                    return self
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in _HELD_ERRNOS:
                        raise RunLockedError(refusal_message(self.output_dir, _parse_owner(os.pread(fd, 4096, 0))))
                    _logger.warning(f'cannot lock {str(self.path)!r} ({os.strerror(e.errno)}): runs launched into '
                                    f'output_dir {str(self.output_dir)!r} are not kept apart on this file system')
                    return self
                previous = _parse_owner(os.pread(fd, 4096, 0))
                self.owner = _owner_record()
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(self.owner) + '\n').encode(), 0)
                os.fsync(fd)
                held = _registry[key] = _Held(key, fd, self.path)
                held.owner, held.count = self.owner, 1
                fd = None
                self._held, self.locked = held, True
        finally:
            if fd is not None:
                _close_quietly(fd)
        if previous is not None:
            self.previous_owner = previous
            _logger.warning(f'output_dir {str(self.output_dir)!r}: took over the run lock left by a run that ended '
                            f'without releasing it ({_describe(previous)}; killed?)')
        return self

    def release(self) -> None:
        """Release this holder's share; the OS lock goes with the last one. Idempotent."""
        held, self._held, self.locked = self._held, None, False
        if held is None:
            return
        with _registry_lock:
            held.count -= 1
            if held.count <= 0 and _registry.get(held.key) is held:
                _drop(held)

    def __enter__(self) -> 'RunLock':
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown: the kernel releases it anyway
            pass

    def __repr__(self) -> str:
        return f'RunLock({str(self.output_dir)!r}, locked={self.locked})'


def acquire_run_lock(output_dir, is_main: bool,
                     broadcast: Optional[Callable[[Optional[str]], Optional[str]]] = None) -> RunLock:
    """Call on every process of a launch. The main process takes `output_dir`'s lock; `broadcast` (rank 0's value to
    every process, e.g. `lambda v: accelerate.utils.broadcast_object_list([v])[0]`; None for a single process) shares
    its verdict, so every process raises the same one-line refusal (RunLockedError) and exits alike, or goes on.
    Returns the RunLock: held on the main process, an unheld one elsewhere (`release()` works on both)."""
    lock, verdict, error = RunLock(output_dir), None, None
    if is_main:
        try:
            lock.acquire()
        except Exception as e:  # a refusal, or e.g. no permission to create the folder: every process stops
            error = e
            verdict = ' '.join(str(e).split()) or type(e).__name__
    if broadcast is not None:
        verdict = broadcast(verdict)
    if error is not None:
        raise error
    if verdict is not None:
        raise RunLockedError(verdict)
    return lock
