""" Build a timm model from a checkpoint through timm's own pretrained machinery.

Accepted checkpoints: None (random init), 'default' (timm's Hub weights), 'hf-hub:org/name', a trainer output
folder (`model.safetensors` + timm `config.json`), or a `.safetensors` / `.pth` file holding dense or MoE weights.
A trainer folder's `config.json` supplies the model arguments, the data config and the label names.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import timm
import torch

__all__ = ['create_model_from_checkpoint', 'checkpoint_num_classes', 'checkpoint_label_names', 'trainer_config']

DATA_CONFIG_KEYS = ('input_size', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation', 'label_names')


def trainer_config(path: Path) -> Dict[str, Any]:
    """The timm config.json written beside a trainer's model.safetensors ({} when there is none)."""
    path = Path(path)
    config = (path if path.is_dir() else path.parent) / 'config.json'
    return json.loads(config.read_text()) if config.is_file() else {}


def checkpoint_num_classes(path: str, classifier: str = 'head') -> Optional[int]:
    """Output classes of a checkpoint's classifier, read from a trainer-written config.json or the file itself."""
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


def checkpoint_label_names(checkpoint: Optional[str]) -> Optional[List[str]]:
    """Label names saved by the trainer beside a checkpoint, or None."""
    if not checkpoint or checkpoint in ('default', 'none') or checkpoint.startswith('hf-hub:'):
        return None
    return trainer_config(Path(checkpoint)).get('pretrained_cfg', {}).get('label_names')


def _with_classes(kwargs: Dict[str, Any], num_classes: Optional[int]) -> Dict[str, Any]:
    return dict(kwargs, num_classes=num_classes) if num_classes else kwargs


def create_model_from_checkpoint(
        model_name: str, checkpoint: Optional[str] = None, num_classes: Optional[int] = None, **kwargs,
) -> torch.nn.Module:
    """A timm model loaded through timm's pretrained machinery.

    Args:
        model_name: registered name.
        checkpoint: None (random init), 'default' (timm's Hub weights), 'hf-hub:org/name', a trainer output folder
            (holding model.safetensors + config.json), or a .safetensors / .pth file (dense or MoE).
        num_classes: classes of the model to build; default: the checkpoint's.
    """
    if checkpoint in (None, '', 'none'):
        return timm.create_model(model_name, num_classes=num_classes or 1000, **kwargs)
    if checkpoint == 'default':
        return timm.create_model(model_name, pretrained=True, **_with_classes(kwargs, num_classes))
    if checkpoint.startswith('hf-hub:'):
        overlay = dict(hf_hub_id=checkpoint[len('hf-hub:'):])
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay,
                                 **_with_classes(kwargs, num_classes))
    path = Path(checkpoint)
    if path.is_dir():
        path = path / 'model.safetensors'
    if not path.exists():
        raise FileNotFoundError(f'checkpoint {checkpoint!r} does not exist; expected a .safetensors / .pth file, a '
                                f'trainer output folder with model.safetensors, "default" or "hf-hub:org/name"')
    overlay = dict(file=str(path))
    saved = trainer_config(path)  # written with the weights by the trainer: reuse its model arguments and data config
    if saved.get('architecture') == model_name:
        saved_args = {k: v for k, v in saved.get('model_args', {}).items() if k != 'num_classes'}
        kwargs = dict(saved_args, **kwargs)
        saved_cfg = saved.get('pretrained_cfg', {})
        overlay.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved_cfg.items()
                        if k in DATA_CONFIG_KEYS})
    file_classes = checkpoint_num_classes(str(path))
    if file_classes:
        overlay['num_classes'] = file_classes  # lets timm keep the head when the class counts agree
    return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay,
                             num_classes=num_classes or file_classes or 1000, **kwargs)
