""" scikit-learn's bundled digits as an ImageFolder tree: the embedded demo data (nothing to download). """
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ['write_digits_image_folder']


def write_digits_image_folder(root: str, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write scikit-learn's bundled digits (1797 real 8x8 scans, 10 classes) as root/{train,val}/<digit>/*.png.

    The split is stratified and fixed by `seed`. Existing files are kept (the tree is written once).
    """
    from sklearn.datasets import load_digits

    root_path = Path(root)
    marker = root_path / '.complete'
    if marker.exists():
        return root_path
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        n_val = int(round(len(indices) * val_fraction))
        for split, part in (('val', indices[:n_val]), ('train', indices[n_val:])):
            out = root_path / split / str(label)
            out.mkdir(parents=True, exist_ok=True)
            for i in part:
                pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)  # 0..16 -> 0..255
                Image.fromarray(pixels).save(out / f'{i:04d}.png')
    marker.write_text('sklearn.datasets.load_digits\n')
    return root_path
