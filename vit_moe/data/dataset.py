""" ImageNet-style folder datasets through timm's readers and transforms, with clear errors.

Layout: `root/<split>/<class>/<image>`. The train split defines the classes; the val split must use the
same class names. A missing folder, an empty class folder or a val class unknown to train is an error
that names the path.

Unreadable images: with `bad_image_policy='skip'` (default) a warning names the file, once across all processes
and data-loader workers (they share a `BadImageLog` file), and
* a training split uses the next readable image instead (a long run neither dies nor fails silently),
* an evaluation split (`substitute_unreadable=False`) yields `(image, target, readable)` triples with
  `readable=False` and a blank image for the bad file, so that metrics leave it out and count every other
  image exactly once, whatever the batching or the number of processes.
With 'error' the first unreadable image stops the run with its path. `verify_images` opens every image of a
split up front so that corrupt files are reported before training rather than hours in.
"""
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset
from timm.data.readers.img_extensions import get_img_extensions

__all__ = ['check_image_folder', 'ImageFolderDataset', 'verify_images', 'BadImageError', 'BadImageLog']

_logger = logging.getLogger(__name__)


class BadImageError(RuntimeError):
    """An image file that cannot be decoded (with bad_image_policy='error')."""


def _class_dirs(split_dir: Path) -> List[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir())


def check_image_folder(root: str, split: str, class_names: Optional[List[str]] = None) -> Path:
    """Check `root/split/<class>/` exists with at least one image per class; return the split path."""
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f'data_dir {str(root_path)!r} does not exist; expected root/<split>/<class>/<image>')
    split_dir = root_path / split
    if not split_dir.is_dir():
        found = ', '.join(sorted(p.name for p in root_path.iterdir() if p.is_dir())) or 'nothing'
        raise FileNotFoundError(f'split folder {str(split_dir)!r} does not exist (found: {found}); '
                                f'expected {root}/{split}/<class>/<image>')
    classes = _class_dirs(split_dir)
    if not classes:
        raise ValueError(f'split folder {str(split_dir)!r} has no class folders; expected {split_dir}/<class>/<image>')
    extensions = set(get_img_extensions(as_set=True))
    for class_dir in classes:
        if not any(f.suffix.lower() in extensions for f in class_dir.rglob('*') if f.is_file()):
            raise ValueError(f'class folder {str(class_dir)!r} holds no images (accepted extensions: '
                             f'{", ".join(sorted(extensions))})')
    if class_names is not None:
        unknown = sorted({c.name for c in classes} - set(class_names))
        if unknown:
            raise ValueError(f'{split_dir} has class folders {unknown} that the train split does not have')
    return split_dir


try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a file may then be reported twice
    fcntl = None


class BadImageLog:
    """Unreadable images reported by any process or data-loader worker, one JSON line each in a shared file.

    Args:
        path: the file (kept); default a new temporary file.
    """

    def __init__(self, path: Optional[str] = None):
        if path is None:
            fd, path = tempfile.mkstemp(prefix='vit_moe_bad_images_', suffix='.jsonl')
            os.close(fd)
        self.path = Path(path)  # created by the first `add`: a run refused at start leaves no empty file
        self._seen: set = set()  # this process's cache: no file access for repeats

    def add(self, split: str, path: str, error: str) -> bool:
        """Record an unreadable image; True if no process had recorded it before."""
        if path in self._seen:
            return False
        self._seen.add(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, 'a+') as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX)  # released on close
            f.seek(0)
            if any(entry.get('path') == path for entry in _read_entries(f.read())):
                return False
            f.write(json.dumps(dict(split=split, path=path, error=error)) + '\n')
            f.flush()
        return True

    def entries(self) -> List[Dict[str, str]]:
        """Every recorded image: {'split', 'path', 'error'}, in the order first seen."""
        return _read_entries(self.path.read_text()) if self.path.is_file() else []


def _read_entries(text: str) -> List[Dict[str, str]]:
    entries = []
    for line in text.splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed process
    return entries


class ImageFolderDataset(ImageDataset):
    """timm ImageDataset over `root/split`, naming the file of any image it cannot decode.

    Args:
        root, split: the folder `root/split/<class>/<image>`.
        class_map: class name -> index (default: sorted folder names).
        transform: applied to every PIL image.
        bad_image_policy: 'skip' or 'error' (see the module docstring).
        substitute_unreadable: True (training) uses the next readable image; False (evaluation) yields
            `(image, target, readable)` triples.
        bad_image_log: where unreadable images are recorded (default: a temporary file).
    """

    def __init__(self, root: str, split: str, class_map: Optional[Dict[str, int]] = None, transform=None,
                 bad_image_policy: str = 'skip', substitute_unreadable: bool = True,
                 bad_image_log: Optional[BadImageLog] = None):
        split_dir = check_image_folder(root, split, list(class_map) if class_map else None)
        super().__init__(str(split_dir), reader='', class_map=class_map or '', transform=transform)
        self.split = split
        self.bad_image_policy = bad_image_policy
        self.substitute_unreadable = substitute_unreadable
        self.bad_image_log = bad_image_log or BadImageLog()
        self.seed: Optional[int] = None  # set (with set_epoch) for augmentations that depend on (epoch, index) only
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def class_to_idx(self) -> Dict[str, int]:
        return self.reader.class_to_idx

    def path(self, index: int) -> str:
        return self.reader.samples[index][0]

    @property
    def skipped(self) -> List[str]:
        """Paths of this split's unreadable images seen so far (by any process or worker)."""
        return [e['path'] for e in self.bad_image_log.entries() if e.get('split') == self.split]

    def _load(self, index: int) -> Optional[Image.Image]:
        """The decoded image, or None (after recording it) if it is unreadable under the 'skip' policy."""
        path = self.path(index)
        try:
            return Image.open(path).convert('RGB')  # decodes pixels: errors surface here
        except (OSError, ValueError, SyntaxError) as e:
            if self.bad_image_policy == 'error':
                raise BadImageError(f'cannot read image {path!r}: {e}') from e
            if self.bad_image_log.add(self.split, path, str(e)):
                instead = 'using the next image instead' if self.substitute_unreadable else 'left out of the metrics'
                _logger.warning(f'skipping unreadable image {path!r} ({e}); {instead}')
            return None

    def __getitem__(self, index: int):
        if not self.substitute_unreadable:
            img = self._load(index)
            target = self.reader.samples[index][1]
            if img is None:
                return self._apply_transform(Image.new('RGB', (32, 32)), index), target, False
            return self._apply_transform(img, index), target, True
        for _ in range(len(self)):
            img = self._load(index)
            if img is not None:
                break
            index = (index + 1) % len(self)
        else:
            raise BadImageError(f'no readable image in {self.reader.root!r}')
        target = self.reader.samples[index][1]
        return self._apply_transform(img, index), target

    def _apply_transform(self, img, index: int):
        if self.transform is None or self.seed is None:
            return self.transform(img) if self.transform is not None else img
        # Random augmentations seeded by (seed, epoch, index) without touching the global RNGs: a sample gets
        # the same augmentation whatever the loader's prefetching or worker count, so a resumed run (and
        # dropout after it) continues exactly as an uninterrupted one.
        # Only the CPU generator is reseeded: torch.manual_seed would also reseed the CUDA generators, which
        # fork_rng(devices=[]) does not restore (dropout on the GPU would then repeat across processes).
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2 ** 32)
            try:
                return self.transform(img)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def verify_images(dataset: ImageFolderDataset) -> List[Tuple[str, str]]:
    """(path, error) of every image that PIL cannot fully decode."""
    bad = []
    for path, _ in dataset.reader.samples:
        try:
            with Image.open(path) as img:
                img.load()
        except Exception as e:  # PIL raises many types for a corrupt file
            bad.append((path, str(e)))
    return bad
