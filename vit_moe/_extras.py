""" Optional dependency stacks: a missing one fails with the extra that installs it. """
import importlib.util
from typing import Sequence

__all__ = ['require_extra']


def require_extra(extra: str, modules: Sequence[str], feature: str) -> None:
    """Raise ImportError naming `pip install vit-moe[extra]` if any of `modules` is not installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f'{feature} needs {", ".join(missing)}, which is not installed; install it with '
            f'`pip install "vit-moe[{extra}]"` (or `pip install -e ".[{extra}]"` in a checkout)')
