""" The training state keyed by name, saved with torch.distributed.checkpoint: one checkpoint for every launch.

A checkpoint folder's `state/` is a DCP folder with the model (`model.<name>`), the optimizer (`optim.state.<name>.*`
and its parameter groups, by parameter name, from `torch.distributed.checkpoint.state_dict`) and the EMA
(`ema.<name>`). Each tensor is saved as this launch holds it (whole on one process and under DDP, FSDP2's DTensor
shards, expert shards as DTensors of the whole bank): DCP writes every piece once and reads it back resharded to what
the next launch holds, whatever its process count, DDP or FSDP2, or expert-parallel size. `trainer_state.json` holds
the counters (`TrainState`: step, elapsed time, the global batch and the launch that made it, the fp16 loss scale).
Nothing random is saved: the data order and every random draw derive from (seed, epoch, micro-batch)
(`vit_moe.training.data_order`).
"""
import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn

from .._files import atomic_write
from .checkpoints import TrainState
from .config import ConfigError

__all__ = ['STATE_FOLDER', 'TRAINER_STATE', 'save_training_state', 'load_training_state', 'read_train_state',
           'ema_tensors']

STATE_FOLDER = 'state'  # the DCP folder inside a checkpoint
TRAINER_STATE = 'trainer_state.json'


def ema_tensors(ema) -> Dict[str, torch.Tensor]:
    """The EMA's tensors keyed by the model's names (timm's ModelEmaV3: its copy's state dict; a ShardedEma: its
    shards), sharing storage with the EMA: loading into them loads the EMA."""
    module = getattr(ema, 'module', None)
    if isinstance(module, nn.Module):
        return module.state_dict()
    return ema.state_dict()


def _state(unwrapped: nn.Module, optimizer, ema, parallel) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The launch's training state by name, as this launch holds it and as it is saved (expert shards as DTensors of
    their whole banks, sharing storage with this launch's tensors: loading into the second loads the first)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(unwrapped, optimizer)
    own = dict(model=model_state, optim=optim_state)
    if ema is not None:
        own['ema'] = ema_tensors(ema)
    as_global = parallel.as_global
    saved = dict(
        model={n: as_global(n, t) for n, t in model_state.items()},
        optim=dict(optim_state, state={
            n: {k: as_global(n, v) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in slots.items()}
            for n, slots in optim_state['state'].items()}))
    if ema is not None:
        saved['ema'] = {n: as_global(n, t) for n, t in own['ema'].items()}
    return own, saved


@contextmanager
def _quiet():
    """DCP in a single process warns that it is one: that is what it is meant to do here."""
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')
        yield


def save_training_state(folder: Path, train_state: TrainState, unwrapped: nn.Module, optimizer, ema, parallel,
                        is_main: bool) -> None:
    """Write the training state into `folder` (a collective: every process writes its pieces)."""
    import torch.distributed.checkpoint as dcp
    with _quiet():
        dcp.save(_state(unwrapped, optimizer, ema, parallel)[1], checkpoint_id=str(Path(folder) / STATE_FOLDER))
    if is_main:
        atomic_write(Path(folder) / TRAINER_STATE, json.dumps(train_state.state_dict(), indent=1))


def read_train_state(folder: Path) -> TrainState:
    """The counters of checkpoint `folder`; one line for a checkpoint this version cannot resume."""
    folder = Path(folder)
    if not (folder / TRAINER_STATE).is_file():
        if (folder / 'custom_checkpoint_0.pkl').is_file():
            raise ConfigError(
                f'{folder} was written by vit-moe 0.3 or earlier (Accelerate\'s save_state layout), which saved the '
                f'training state by launch, not by name; finish that run with the version that wrote it, or start a '
                f'new run from its weights: pretrained={folder / "model.safetensors"}')
        raise ConfigError(f'{folder} holds no {TRAINER_STATE}: not a checkpoint of this trainer')
    state = TrainState()
    state.load_state_dict(json.loads((folder / TRAINER_STATE).read_text()))
    return state


def load_training_state(folder: Path, unwrapped: nn.Module, optimizer, ema, parallel) -> None:
    """Read `folder`'s training state into this launch's model, optimizer and EMA, resharded (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    own, saved = _state(unwrapped, optimizer, ema, parallel)
    with _quiet():
        dcp.load(saved, checkpoint_id=str(Path(folder) / STATE_FOLDER))  # in place, into this launch's tensors
    set_state_dict(unwrapped, optimizer, model_state_dict=own['model'], optim_state_dict=own['optim'])
    # the EMA was loaded in place: its tensors (shared with the EMA) were in `saved`
