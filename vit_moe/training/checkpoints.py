""" Training checkpoints that survive being killed at any moment.

Layout: `output_dir/checkpoints/checkpoint_step_<N>/` holds the training state (`state/`, a torch.distributed.checkpoint
folder keyed by parameter name, and `trainer_state.json`: `vit_moe.training.training_state`), `config.yaml` (the
run's config) and `COMPLETE` (written last).

A checkpoint is written into `checkpoints/.partial_step_<N>`, completed with `COMPLETE`, flushed to disk, and
only then renamed to its final name (`vit_moe._files.install_folder`), so a folder named `checkpoint_step_<N>` is always whole. Old checkpoints
are renamed to `.deleting_*` before they are removed. A process killed at any point therefore leaves every
completed checkpoint intact; the leftovers (`.partial_*`, `.deleting_*`) are removed, with a warning, when
the next run starts in the same folder.
"""
import logging
import os
import re
import shutil
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from .._files import install_folder

__all__ = [
    'TrainState', 'checkpoint_root', 'checkpoint_step', 'complete_checkpoints', 'latest_checkpoint',
    'is_complete', 'remove_leftovers', 'write_checkpoint', 'prune_checkpoints',
]

_logger = logging.getLogger(__name__)

COMPLETE = 'COMPLETE'
_NAME = re.compile(r'^checkpoint_step_(\d+)$')


@dataclass
class TrainState:
    """The counters of a run, saved with every checkpoint (`trainer_state.json`)."""
    step: int = 0  # optimizer steps done: with the seed, also the position in the data order
    elapsed_s: float = 0.0  # wall-clock seconds spent in the training loop, summed over resumes
    log_window: Optional[Dict[str, Any]] = None  # the open logging window (StepMeter.window_state) at the save
    global_batch: int = 0  # images per optimizer step, kept by every resumed leg
    num_processes: int = 1  # the launch of the leg that saved it: processes, accumulation, expert parallelism
    grad_accum_steps: int = 1
    expert_parallel_size: int = 1
    launch: str = ''
    loss_scale: Optional[Dict[str, Any]] = None  # fp16 GradScaler state

    def state_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            if f.name in state:
                setattr(self, f.name, state[f.name])


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / 'checkpoints'


def checkpoint_step(path) -> Optional[int]:
    """The step in a `checkpoint_step_<N>` folder name, or None for any other name."""
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def _checkpoint_folders(output_dir) -> List[Tuple[int, Path]]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted((step, p) for step, p in found if step is not None)


def complete_checkpoints(output_dir) -> List[Tuple[int, Path]]:
    """(step, folder) of every complete checkpoint of a run, oldest first."""
    return [(step, p) for step, p in _checkpoint_folders(output_dir) if is_complete(p)]


def latest_checkpoint(output_dir, warn: bool = False) -> Optional[Path]:
    """Newest complete checkpoint of a run, or None. With `warn`, name the incomplete ones skipped."""
    complete = complete_checkpoints(output_dir)
    if warn:
        newest = complete[-1][0] if complete else -1
        for step, path in _checkpoint_folders(output_dir):
            if step > newest and not is_complete(path):
                _logger.warning(f'skipping incomplete checkpoint {path} (no {COMPLETE} marker: its save was '
                                f'interrupted); using {complete[-1][1] if complete else "none"}')
    return complete[-1][1] if complete else None


def remove_leftovers(output_dir) -> List[Path]:
    """Remove the `.partial_*` / `.deleting_*` folders that a killed process left behind; return them."""
    root = checkpoint_root(output_dir)
    leftovers = sorted(p for p in root.glob('.*') if p.is_dir() and p.name.startswith(('.partial_', '.deleting_')))
    for path in leftovers:
        if path.name.startswith('.partial_'):
            _logger.warning(f'removing {path}: an incomplete checkpoint left by an interrupted save')
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def write_checkpoint(accelerator, output_dir, step: int, config_text: str, save: Callable[[Path], None]) -> Path:
    """Write checkpoint `checkpoint_step_<step>` atomically: `save(folder)` (called on every process) writes the
    training state into it, then the main process adds the config and `COMPLETE` and renames it into place."""
    root = checkpoint_root(output_dir)
    final = root / f'checkpoint_step_{step}'
    partial = root / f'.partial_step_{step}'
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    accelerator.wait_for_everyone()
    save(partial)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (partial / 'config.yaml').write_text(config_text)
        (partial / COMPLETE).write_text(f'step {step}\n')
        # fsync everything, then rename; the same step saved again (a re-run after a resume) replaces the old one
        install_folder(partial, final, aside=root / f'.deleting_step_{step}')
    accelerator.wait_for_everyone()
    return final


def _erase(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def prune_checkpoints(output_dir, keep: int) -> List[Path]:
    """Remove all but the newest `keep` complete checkpoints (by step); return the removed folders."""
    removed = []
    for step, path in complete_checkpoints(output_dir)[:-keep]:
        doomed = path.with_name(f'.deleting_{path.name}')
        os.replace(path, doomed)  # no longer a checkpoint once renamed: a kill mid-delete leaves no half folder
        _erase(doomed)
        removed.append(path)
    return removed
