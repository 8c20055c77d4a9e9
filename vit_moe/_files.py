""" Files and folders that a process killed at any moment leaves whole: the one place this package writes atomically.

* `atomic_write(path, data)`: write `<path>.partial-<pid>`, fsync it, rename it over `path`, fsync the folder. A
  reader sees the old file or the new one, never a part of either, and after a power loss the rename is on disk.
* `install_folder(tmp, final, aside)`: a folder written in full at `tmp` becomes `final`: fsync every file and `tmp`,
  move a previous `final` to `aside` (deleted after), rename `tmp` to `final`, fsync the parent. Between the two
  renames (two metadata operations, microseconds) `final` is absent and the previous copy is `aside`.

Used by training checkpoints, saved model folders, the run log and the sweep's result files. Standard library only.
"""
import os
import shutil
from pathlib import Path
from typing import Optional, Union

__all__ = ['atomic_write', 'fsync_file', 'fsync_dir', 'fsync_tree', 'install_folder']

PathLike = Union[str, os.PathLike]


def fsync_file(path: PathLike) -> None:
    """Flush a written file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: PathLike) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: PathLike) -> None:
    """fsync every file under `folder`, then every folder, deepest first."""
    folder = Path(folder)
    folders = [folder]
    for path in sorted(folder.rglob('*')):
        if path.is_file():
            fsync_file(path)
        elif path.is_dir():
            folders.append(path)
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(path)


def atomic_write(path: PathLike, data: Union[str, bytes], encoding: str = 'utf-8') -> Path:
    """Replace the file `path` by `data` (text or bytes) atomically and durably (see the module docstring)."""
    path = Path(path)
    partial = path.with_name(f'{path.name}.partial-{os.getpid()}')
    mode, kwargs = ('wb', {}) if isinstance(data, bytes) else ('w', dict(encoding=encoding, newline=''))
    try:
        with open(partial, mode, **kwargs) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def install_folder(tmp: PathLike, final: PathLike, aside: Optional[PathLike] = None) -> Path:
    """Make the complete folder `tmp` the folder `final`, durably; a previous `final` goes to `aside` then is deleted.

    `aside` (default `<final>.old-<pid>`) must be a name that a reader does not take for `final`. If the second
    rename fails, the previous folder is put back.
    """
    tmp, final = Path(tmp), Path(final)
    aside = Path(aside) if aside is not None else final.with_name(f'{final.name}.old-{os.getpid()}')
    fsync_tree(tmp)
    moved = False
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        moved = True
    try:
        os.replace(tmp, final)
    except BaseException:
        if moved:
            os.replace(aside, final)
        raise
    fsync_dir(final.parent)
    if moved:
        shutil.rmtree(aside, ignore_errors=True)
    return final
