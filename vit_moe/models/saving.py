""" Save a trained timm model as a folder that loads back whole: weights, model arguments, data config, label names.

The folder holds `model.safetensors` and a `config.json` in the layout timm's `save_for_hf` writes (architecture,
num_classes, num_features, global_pool, label_names, model_args, pretrained_cfg), so both
`timm.create_model('local-dir:<folder>', pretrained=True)` and `create_model_from_checkpoint(name, '<folder>')` rebuild
the model. The saved pretrained_cfg describes the trained weights, not the dense source: the source's `tag`,
`hf_hub_id`, `url`, license and test-time recommendations are dropped and `notes` name the source instead.

The folder is replaced atomically (`vit_moe._files.install_folder`): the files are written and fsynced in a sibling
`<folder>.tmp-<pid>`, then a previous `<folder>` is renamed to `<folder>.old-<pid>`, the new one renamed in, and the old one deleted. A process
killed at any moment leaves the previous complete folder or the new complete one at `<folder>`, except in the window
between the two renames (two metadata operations, microseconds), where `<folder>` is absent and the previous complete
copy is `<folder>.old-<pid>`; `create_model_from_checkpoint` then names it in its error. The next successful save
deletes the leftovers of dead processes. Weights are saved with plain keys: the `_orig_mod.` / `module.` prefixes of
a compiled or DDP-wrapped model's state dict are removed (timm's `clean_state_dict`). Call it from the main process only (it does not synchronise processes).
"""
import glob
import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from safetensors.torch import save_file
from timm.data import resolve_data_config
from timm.models import clean_state_dict

from .._files import install_folder
from ..layers import MOE_OPTIONS

__all__ = ['save_trained_model', 'trained_model_config', 'interrupted_save_leftovers', 'WEIGHTS_NAME', 'CONFIG_NAME',
           'DATA_CONFIG_KEYS']

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
DATA_CONFIG_KEYS = ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
# pretrained_cfg keys that describe the source weights, not the trained ones
_SOURCE_KEYS = (
    'url', 'file', 'state_dict', 'hf_hub_id', 'hf_hub_filename', 'source', 'tag', 'license', 'description',
    'origin_url', 'label_offset', 'label_descriptions', 'test_input_size', 'test_crop_pct', 'test_pool_size',
    'min_input_size')
_RUNTIME_ARGS = ('device', 'dtype', 'pretrained_model_args')


def _json_value(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _describe_source(model: torch.nn.Module, source: Optional[str]) -> str:
    if source in (None, '', 'none'):
        return 'random initialisation'
    if source == 'default':
        from .upcycled import DENSE_SOURCES
        arch, tag = model.pretrained_cfg.get('architecture'), model.pretrained_cfg.get('tag')
        return DENSE_SOURCES.get(arch) or (f'{arch}.{tag}' if tag else arch)
    return str(source)


def _model_args(model: torch.nn.Module, model_args: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The arguments that rebuild `model`: those timm recorded at creation, plus `model_args`, plus its class count;
    an MoE model's options as its `moe_config` resolved them (every one that applies, defaults included: the file
    does not depend on this version's defaults)."""
    recorded = {k: v for k, v in getattr(model, '_model_args', {}).items() if k not in _RUNTIME_ARGS}
    args = dict(recorded)
    for key, value in (model_args or {}).items():
        if key in recorded and _json_value(recorded[key]) != _json_value(value):
            raise ValueError(f'model_args {key}={value!r} disagrees with the model, built with '
                             f'{key}={recorded[key]!r}; expected the arguments the model was created with')
        args[key] = value
    for key in _RUNTIME_ARGS:
        args.pop(key, None)
    moe_config = getattr(model, 'moe_config', None)
    if moe_config is not None:  # every MoE option as resolved (defaults included), and only those that apply
        args = {k: v for k, v in args.items() if k not in MOE_OPTIONS}
        args.update(moe_config.to_dict())
    img_size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if img_size is not None:
        args['img_size'] = list(img_size)
    args['num_classes'] = model.num_classes
    for key, value in args.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as e:
            raise ValueError(f'model_args {key}={value!r} is not JSON serializable; expected numbers, strings, '
                             f'booleans, None, or lists / dicts of them') from e
    return _json_value(args)


def _data_config(model: torch.nn.Module, data_config: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """`data_config` completed from the model's own, checked against the input size the model accepts."""
    unknown = sorted(set(data_config or {}) - set(DATA_CONFIG_KEYS))
    if unknown:
        raise ValueError(f'data_config has unknown keys {unknown}; accepted keys: {", ".join(DATA_CONFIG_KEYS)}')
    config = {k: v for k, v in resolve_data_config({}, model=model).items() if k in DATA_CONFIG_KEYS}
    img_size = getattr(getattr(model, 'patch_embed', None), 'img_size', None)
    if img_size is not None:  # the size the model was built for (pretrained_cfg keeps the source's)
        config['input_size'] = (config['input_size'][0], *img_size)
    config.update({k: v for k, v in (data_config or {}).items() if v is not None})
    input_size = tuple(config['input_size'])
    if len(input_size) != 3:
        raise ValueError(f'data_config input_size={config["input_size"]!r} is not valid; expected (channels, height, '
                         f'width)')
    if img_size is not None and not getattr(model, 'dynamic_img_size', False) and input_size[1:] != tuple(img_size):
        raise ValueError(f'data_config input_size={input_size} does not match the model, built for images of '
                         f'{tuple(img_size)}; expected (channels, {img_size[0]}, {img_size[1]})')
    return _json_value(config)


def trained_model_config(
        model: torch.nn.Module,
        label_names: Optional[Sequence[str]] = None,
        data_config: Optional[Mapping[str, Any]] = None,
        model_args: Optional[Mapping[str, Any]] = None,
        source: Optional[str] = None,
) -> Dict[str, Any]:
    """The timm-format config.json content describing `model` as trained.

    Args:
        model: a timm classifier (not a features_only wrapper), e.g. the trainer's unwrapped model.
        label_names: one name per class, in class-index order (None: no names).
        data_config: input_size, mean, std, crop_pct, crop_mode and interpolation the model was trained with; missing
            keys come from `timm.data.resolve_data_config({}, model=model)`.
        model_args: arguments given to `timm.create_model` besides num_classes; merged with those timm recorded on the
            model (timm >= 1.0.31 records them itself), which they must not contradict.
        source: the checkpoint the training started from, as given to `create_model_from_checkpoint` (None: random
            init, 'default': the architecture's dense source), written to `notes`.
    """
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    architecture = cfg.pop('architecture', None)
    if not architecture:
        raise ValueError(f'{type(model).__name__} has no pretrained_cfg architecture; expected a model built by '
                         f'timm.create_model (not a features_only wrapper)')
    num_classes = model.num_classes
    if label_names is not None:
        label_names = [str(name) for name in label_names]
        if len(label_names) != num_classes:
            raise ValueError(f'label_names has {len(label_names)} names but the model has {num_classes} classes; '
                             f'expected one name per class, in class-index order')
    for key in _SOURCE_KEYS:
        cfg.pop(key, None)
    cfg = {k: v for k, v in cfg.items() if v is not None or k in ('pool_size', 'first_conv', 'classifier')}
    cfg.update(_data_config(model, data_config), num_classes=num_classes, custom_load=False, notes=[
        f'source: {_describe_source(model, source)}',
        'trained with vit_moe: these are not the source weights'])
    if label_names:
        cfg['label_names'] = label_names
    else:
        cfg.pop('label_names', None)
    config = dict(architecture=architecture, num_classes=num_classes, num_features=model.num_features)
    pool = getattr(model, 'global_pool', None)
    if isinstance(pool, str) and pool:
        config['global_pool'] = pool
    if label_names:
        config['label_names'] = label_names  # timm's place for them; it copies them into pretrained_cfg on load
    config['model_args'] = _model_args(model, model_args)
    config['pretrained_cfg'] = _json_value(cfg)
    return config


def _write_weights(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in clean_state_dict(dict(state_dict)).items()}
    save_file(state, str(path), metadata={'format': 'pt'})


def _write_config(config: Dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(config, indent=2), encoding='utf-8')


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists
        return True
    return True


def _leftovers(final: Path, kinds=('tmp', 'old')) -> List[Path]:
    found = []
    for kind in kinds:
        for path in final.parent.glob(f'{glob.escape(final.name)}.{kind}-*'):
            pid = path.name.rsplit('-', 1)[-1]
            if pid.isdigit() and path.is_dir():
                found.append(path)
    return sorted(found)


def _remove_dead_leftovers(final: Path) -> None:
    """Delete `<final>.tmp-<pid>` / `.old-<pid>` folders of processes that died while saving (POSIX only)."""
    if os.name == 'nt':  # os.kill(pid, 0) would terminate the process there
        return
    for path in _leftovers(final):
        pid = int(path.name.rsplit('-', 1)[-1])
        ours = set(os.listdir(path)) <= {WEIGHTS_NAME, CONFIG_NAME}  # never a user's folder of the same pattern
        if ours and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def interrupted_save_leftovers(folder: Path) -> List[Path]:
    """Complete previous copies of `folder` that a save killed between its two renames left beside it."""
    folder = Path(folder)
    return [p for p in _leftovers(folder, kinds=('old',))
            if (p / WEIGHTS_NAME).is_file() and (p / CONFIG_NAME).is_file()]


def save_trained_model(
        model: torch.nn.Module,
        output_dir: os.PathLike,
        label_names: Optional[Sequence[str]] = None,
        data_config: Optional[Mapping[str, Any]] = None,
        model_args: Optional[Mapping[str, Any]] = None,
        source: Optional[str] = None,
        state_dict: Optional[Mapping[str, torch.Tensor]] = None,
) -> Path:
    """Write `model.safetensors` + timm `config.json` to the folder `output_dir`, replacing it atomically.

    Args:
        model: a timm classifier (e.g. the trainer's unwrapped model).
        output_dir: the model folder; its parent is created if needed.
        label_names, data_config, model_args, source: see `trained_model_config`.
        state_dict: the weights to write, default `model.state_dict()`; give the full state dict of a sharded
            model (`accelerator.get_state_dict(model)` under FSDP).

    Returns:
        The folder written.
    """
    final = Path(output_dir)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f'output_dir {str(final)!r} is a file; expected a folder path (existing or not)')
    config = trained_model_config(model, label_names, data_config, model_args, source)  # validate before writing
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f'{final.name}.tmp-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)  # this process's own failed attempt
    tmp.mkdir()
    try:
        _write_weights(model.state_dict() if state_dict is None else state_dict, tmp / WEIGHTS_NAME)
        _write_config(config, tmp / CONFIG_NAME)
        install_folder(tmp, final)  # fsyncs the files, then two renames
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_dead_leftovers(final)
    return final
