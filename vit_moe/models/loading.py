""" Build a timm model from a checkpoint through timm's own pretrained machinery.

Accepted checkpoints: None (random init), 'default' (timm's Hub weights), 'hf-hub:org/name', a model folder written by
`save_trained_model` (`model.safetensors` + timm `config.json`, also as 'local-dir:<folder>'), or a `.safetensors` /
`.pth` file holding dense or MoE weights. A folder of the same architecture loads through timm's `local-dir:` source:
its config.json restores the model arguments, the data config and the label names. A folder of another architecture
(e.g. a dense model to upcycle) gives its weights, data config and label names.
"""
import contextlib
import difflib
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torch

from .conversion import CheckpointMismatchError
from .saving import CONFIG_NAME, DATA_CONFIG_KEYS, WEIGHTS_NAME, interrupted_save_leftovers

__all__ = ['create_model_from_checkpoint', 'checkpoint_num_classes', 'checkpoint_label_names', 'trainer_config',
           'saved_architecture', 'take_capacity_factor']

LOCAL_DIR = 'local-dir:'
ACCEPTED = ('expected None, "default", "hf-hub:org/name", a model folder holding model.safetensors + config.json '
            '(written by save_trained_model; also as "local-dir:<folder>"), or a .safetensors / .pth file')


def trainer_config(path: Path) -> Dict[str, Any]:
    """The timm config.json of a model folder, or beside a weights file ({} when there is none)."""
    path = Path(str(path)[len(LOCAL_DIR):] if str(path).startswith(LOCAL_DIR) else path)
    config = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if not config.is_file():
        return {}
    try:
        return json.loads(config.read_text(encoding='utf-8'))
    except ValueError as e:
        raise ValueError(f'{config} is not valid JSON ({e}); expected the config.json written with the weights') from e


def checkpoint_num_classes(path: str, classifier: str = 'head') -> Optional[int]:
    """Output classes of a checkpoint's classifier, read from its config.json or the weights file itself."""
    path = Path(path)
    saved = trainer_config(path)
    if saved.get('num_classes'):
        return saved['num_classes']
    key = f'{classifier}.weight'
    if not path.is_file():
        return None
    if path.suffix == '.safetensors':
        from safetensors import safe_open
        with safe_open(str(path), framework='pt') as f:
            return f.get_slice(key).get_shape()[0] if key in f.keys() else None
    try:  # a torch.save file: memory-mapped, so only the header is read here
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:
        return None  # timm's loader reports an unreadable file with its own error
    for nested in ('state_dict_ema', 'model_ema', 'state_dict', 'model'):
        if isinstance(state, dict) and isinstance(state.get(nested), dict):
            state = state[nested]
            break
    weight = state.get(key) if isinstance(state, dict) else None
    return int(weight.shape[0]) if weight is not None else None


def _saved_label_names(saved: Dict[str, Any]) -> Optional[List[str]]:
    names = saved.get('label_names') or saved.get('pretrained_cfg', {}).get('label_names')
    return list(names) if isinstance(names, (list, tuple)) and names else None


def checkpoint_label_names(checkpoint: Optional[str]) -> Optional[List[str]]:
    """Label names saved in a checkpoint's config.json (timm's top-level `label_names`, or its pretrained_cfg's)."""
    if not checkpoint or checkpoint in ('default', 'none') or checkpoint.startswith('hf-hub:'):
        return None
    return _saved_label_names(trainer_config(Path(checkpoint)))


def _with_classes(kwargs: Dict[str, Any], num_classes: Optional[int]) -> Dict[str, Any]:
    return dict(kwargs, num_classes=num_classes) if num_classes else kwargs


def _leftover_hint(folder: Path) -> str:
    leftovers = interrupted_save_leftovers(folder)
    if not leftovers:
        return ''
    return (f'; a save interrupted between its two renames left the previous complete copy {str(leftovers[-1])!r}: '
            f'rename it to {str(folder)!r} to use it')


def _local_weights(checkpoint: str) -> Tuple[Optional[Path], Path]:
    """(model folder or None, weights file) of a local checkpoint, or a clear error naming what is missing."""
    path = Path(checkpoint[len(LOCAL_DIR):] if checkpoint.startswith(LOCAL_DIR) else checkpoint)
    if path.is_dir():
        missing = [name for name in (WEIGHTS_NAME, CONFIG_NAME) if not (path / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f'checkpoint folder {checkpoint!r} lacks {" and ".join(missing)}; expected a model folder written by '
                f'save_trained_model (model.safetensors + config.json){_leftover_hint(path)}')
        return path, path / WEIGHTS_NAME
    if path.is_file():
        in_folder = path.name == WEIGHTS_NAME and (path.parent / CONFIG_NAME).is_file()
        return (path.parent if in_folder else None), path
    raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist; {ACCEPTED}{_leftover_hint(path)}')


def _saved_data_config(saved: Dict[str, Any], keep_labels: bool) -> Dict[str, Any]:
    """pretrained_cfg entries for the saved data config (and label names), as timm's registry writes them."""
    cfg = saved.get('pretrained_cfg', {})
    overlay = {k: tuple(cfg[k]) if isinstance(cfg[k], list) else cfg[k] for k in DATA_CONFIG_KEYS if k in cfg}
    labels = _saved_label_names(saved)
    overlay['label_names'] = tuple(labels) if labels and keep_labels else None
    return overlay


class HubDownloadError(FileNotFoundError):
    """The Hugging Face Hub weights could not be downloaded (offline, no cache, no access)."""


@contextlib.contextmanager
def _hub_download_hint(model_name: str, checkpoint: str):
    """A failed Hub download becomes one error that says how to give the weights as a local file instead."""
    try:
        yield
    except Exception as e:
        hub = type(e).__module__.split('.')[0] in ('huggingface_hub', 'requests', 'urllib3', 'httpx') or isinstance(
            e, (ConnectionError, TimeoutError))
        if not hub:
            raise
        from .upcycled import DENSE_SOURCES
        source = DENSE_SOURCES.get(model_name, model_name if checkpoint == 'default' else checkpoint)
        raise HubDownloadError(
            f'could not download the weights of {checkpoint!r} for {model_name} ({source}) from the Hugging Face Hub: '
            f'{" ".join(str(e).split())[:200]}; offline, download them where there is a connection and pass the local '
            f'dense file: --pretrained /path/to/{source.split(":")[-1]}.safetensors (in Python: '
            f'pretrained_cfg_overlay=dict(file=...))') from e


def _record_args(model: torch.nn.Module, kwargs: Dict[str, Any]) -> torch.nn.Module:
    """Keep the creation arguments on the model where timm < 1.0.31 does not, as timm >= 1.0.31 does itself."""
    if not hasattr(model, '_model_args'):
        model._model_args = {k: v for k, v in kwargs.items() if k not in ('device', 'dtype')}
    return model


def _create_from_local(model_name: str, checkpoint: str, num_classes: Optional[int], kwargs: Dict[str, Any]):
    folder, weights = _local_weights(checkpoint)
    saved = trainer_config(weights) if folder else {}
    saved_classes = saved.get('num_classes') or checkpoint_num_classes(str(weights))
    keep_labels = not num_classes or num_classes == saved_classes  # a new head: the saved names do not describe it
    if folder and saved.get('architecture') == model_name:
        kwargs = _with_classes(dict(saved.get('model_args', {}), **kwargs), num_classes)
        overlay = _saved_data_config(saved, keep_labels)
        model = timm.create_model(f'{LOCAL_DIR}{folder}', pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return _record_args(model, kwargs)
    # a bare weights file, or a folder of another architecture (e.g. dense weights to upcycle)
    overlay = dict(file=str(weights), hf_hub_id=None, url=None, tag=None)  # the file's weights, not the registry's
    if folder:
        overlay.update(_saved_data_config(saved, keep_labels))
    if saved_classes:
        overlay['num_classes'] = saved_classes  # lets timm keep the head when the class counts agree
    kwargs = dict(kwargs, num_classes=num_classes or saved_classes or 1000)
    try:
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except CheckpointMismatchError as e:
        if not saved.get('architecture'):
            raise
        raise CheckpointMismatchError(f"{e} (config.json of {str(folder)!r} says it holds a "
                                      f"{saved['architecture']}, not a {model_name})", e.details) from e
    return _record_args(model, kwargs)


def take_capacity_factor(model_kwargs: Optional[Dict[str, Any]], capacity_factor: Any = None) -> Tuple[Any, dict]:
    """(the capacity factor to load with, the model arguments without it): a front end's --capacity-factor, or the
    one in its model arguments; both, differing, is a ValueError naming them."""
    kwargs = dict(model_kwargs or {})
    in_kwargs = kwargs.pop('capacity_factor', None)
    if capacity_factor is not None and in_kwargs is not None and in_kwargs != capacity_factor:
        raise ValueError(f'capacity_factor is given twice, {in_kwargs!r} in the model arguments and {capacity_factor!r}'
                         f' on its own; give it once')
    return (capacity_factor if capacity_factor is not None else in_kwargs), kwargs


def saved_architecture(checkpoint: Optional[str]) -> Optional[str]:
    """The architecture the config.json of a model folder (or beside a weights file) names; None without one."""
    if not checkpoint or checkpoint in ('default', 'none') or checkpoint.startswith('hf-hub:'):
        return None
    return trainer_config(Path(checkpoint)).get('architecture')


def create_model_from_checkpoint(
        model_name: str, checkpoint: Optional[str] = None, num_classes: Optional[int] = None,
        capacity_factor: Optional[Union[float, Mapping[str, float]]] = None, **kwargs,
) -> torch.nn.Module:
    """A timm model loaded through timm's pretrained machinery.

    Args:
        model_name: registered name.
        checkpoint: None (random init), 'default' (timm's Hub weights), 'hf-hub:org/name', a model folder written by
            `save_trained_model` (or 'local-dir:<folder>'), or a .safetensors / .pth file (dense or MoE).
        num_classes: classes of the model to build; default: the checkpoint's. The saved label names are kept
            (in `model.pretrained_cfg['label_names']`) only when the class count is the checkpoint's.
        capacity_factor: the capacity to run at (a number for every MoE layer, or {layer: C}), set on the loaded
            model's `moe_config` (`vit_moe.layers.set_capacity_factor`): what the model then saves is what it runs.
            Default: the checkpoint's (config.json) or the model's default.
        **kwargs: model arguments; for a model folder they override the saved ones.

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without its files.
        CheckpointMismatchError: weights that do not fit the model, naming `checkpoint` and the file.
        ValueError: a model name that neither timm nor vit_moe registers.
    """
    model = _create(model_name, checkpoint, num_classes, kwargs)
    if capacity_factor is not None:
        from ..layers import set_capacity_factor
        set_capacity_factor(model, capacity_factor)
    return model


def _create(model_name: str, checkpoint: Optional[str], num_classes: Optional[int], kwargs: Dict[str, Any]
            ) -> torch.nn.Module:
    if not timm.is_model(model_name):
        close = difflib.get_close_matches(model_name, timm.list_models(), n=3)
        raise ValueError(f'model {model_name!r} is not a registered timm / vit_moe model (see timm.list_models())'
                         + (f'; similar names: {", ".join(close)}' if close else ''))
    if checkpoint in (None, '', 'none'):
        kwargs = dict(kwargs, num_classes=num_classes or 1000)
        return _record_args(timm.create_model(model_name, **kwargs), kwargs)
    if checkpoint == 'default' or checkpoint.startswith('hf-hub:'):
        overlay = dict(hf_hub_id=checkpoint[len('hf-hub:'):]) if checkpoint != 'default' else None
        kwargs = _with_classes(kwargs, num_classes)
        with _hub_download_hint(model_name, checkpoint):
            model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        return _record_args(model, kwargs)
    try:
        return _create_from_local(model_name, checkpoint, num_classes, kwargs)
    except CheckpointMismatchError as e:
        if f"file '{checkpoint}'" in str(e):  # the message names the file as given already
            raise
        raise CheckpointMismatchError(f'checkpoint {checkpoint!r} given for {model_name}: {e}', e.details) from e
