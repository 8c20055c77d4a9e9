""" ImageNet-style folder datasets through timm's readers and transforms, with clear errors.

Layout: `root/<split>/<class>/<image>`. The train split defines the classes; the val split must use the
same class names. A missing folder, an empty class folder or a val class unknown to train is an error
that names the path.

Unreadable images: with `bad_image_policy='skip'` (default) the image is replaced by the next one of the
split and a warning names the file, once; with 'error' the first one stops the run with its path.
`verify_images=True` opens every image before training so that corrupt files are reported up front
rather than hours in.
"""
import logging
import random
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset
from timm.data.readers.img_extensions import get_img_extensions

__all__ = ['check_image_folder', 'ImageFolderDataset', 'verify_images', 'BadImageError']

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


class ImageFolderDataset(ImageDataset):
    """timm ImageDataset over `root/split`, naming the file of any image it cannot decode."""

    def __init__(self, root: str, split: str, class_map: Optional[Dict[str, int]] = None, transform=None,
                 bad_image_policy: str = 'skip'):
        split_dir = check_image_folder(root, split, list(class_map) if class_map else None)
        super().__init__(str(split_dir), reader='', class_map=class_map or '', transform=transform)
        self.bad_image_policy = bad_image_policy
        self.skipped: set = set()
        self.seed: Optional[int] = None  # set (with set_epoch) for augmentations that depend on (epoch, index) only
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def class_to_idx(self) -> Dict[str, int]:
        return self.reader.class_to_idx

    def path(self, index: int) -> str:
        return self.reader.samples[index][0]

    def __getitem__(self, index: int):
        for _ in range(len(self)):
            try:
                img = Image.open(self.path(index)).convert('RGB')  # decodes pixels: errors surface here
                break
            except (OSError, ValueError, SyntaxError) as e:
                path = self.path(index)
                if self.bad_image_policy == 'error':
                    raise BadImageError(f'cannot read image {path!r}: {e}') from e
                if path not in self.skipped:
                    self.skipped.add(path)
                    _logger.warning(f'skipping unreadable image {path!r} ({e}); using the next image instead')
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
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
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
