""" Evaluation with torchmetrics on (possibly distributed) loaders, and model loading for validation.

Predictions are gathered with `accelerator.gather_for_metrics` (which drops the samples a distributed
sampler repeats to even out the last batch) and the metrics are computed on the gathered tensors with
`sync_on_compute=False`, so every sample counts exactly once whatever the number of processes.
"""
import json
import time
from pathlib import Path
from typing import Any, Dict, Optional

import timm
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from torchmetrics.classification import MulticlassAccuracy

from .metrics import collect_moe_metrics

__all__ = ['evaluate', 'validate', 'fresh_accelerator_state', 'create_model_from_checkpoint', 'checkpoint_num_classes']


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, accelerator, num_classes: int) -> Dict[str, Any]:
    """top-1, top-5, loss, images/s, sample count and per-layer routing statistics over `loader`."""
    model.eval()
    device = accelerator.device
    top1 = MulticlassAccuracy(num_classes, top_k=1, average='micro', sync_on_compute=False).to(device)
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average='micro',
                              sync_on_compute=False).to(device)
    loss_sum, count, routing = torch.zeros((), device=device), 0, {}
    start = time.perf_counter()
    for images, targets in loader:
        logits = model(images)
        layers = collect_moe_metrics(accelerator.unwrap_model(model))['layers']
        for name, m in layers.items():  # running sums of per-batch statistics
            acc = routing.setdefault(name, {k: torch.zeros_like(v, dtype=torch.float32) for k, v in m.items()})
            for k, v in m.items():
                acc[k] += v.float()
        logits, targets = accelerator.gather_for_metrics((logits.float(), targets))
        top1.update(logits, targets)
        top5.update(logits, targets)
        loss_sum += F.cross_entropy(logits, targets, reduction='sum')
        count += targets.numel()
    elapsed = time.perf_counter() - start
    batches = max(1, len(loader))
    layers = {name: {k: (v / batches).tolist() for k, v in m.items()} for name, m in routing.items()}
    model.train()
    return dict(
        top1=float(top1.compute()) * 100 if count else float('nan'),
        top5=float(top5.compute()) * 100 if count else float('nan'),
        loss=float(loss_sum) / max(1, count),
        num_samples=count,
        images_per_s=count / elapsed if elapsed > 0 else float('nan'),
        dropped_fraction=(sum(m['dropped_fraction'] for m in layers.values()) / len(layers)) if layers else 0.0,
        layers=layers,
    )


def fresh_accelerator_state() -> None:
    """Let a new Accelerator take its own settings (mixed precision, accumulation) in a process that already
    made one (a notebook, the main job's successive runs); the distributed set-up itself is kept."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def _trainer_config(path: Path) -> Dict[str, Any]:
    """The timm config.json written beside a trainer's model.safetensors ({} when there is none)."""
    config = (path if path.is_dir() else path.parent) / 'config.json'
    return json.loads(config.read_text()) if config.is_file() else {}


def checkpoint_num_classes(path: str, classifier: str = 'head') -> Optional[int]:
    """Output classes of a checkpoint's classifier, read from a trainer-written config.json or the file itself."""
    path = Path(path)
    saved = _trainer_config(path)
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
    saved = _trainer_config(path)  # written with the weights by the trainer: reuse its model arguments and data config
    if saved.get('architecture') == model_name:
        saved_args = {k: v for k, v in saved.get('model_args', {}).items() if k != 'num_classes'}
        kwargs = dict(saved_args, **kwargs)
        saved_cfg = saved.get('pretrained_cfg', {})
        overlay.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved_cfg.items() if k in _DATA_KEYS})
    file_classes = checkpoint_num_classes(str(path))
    if file_classes:
        overlay['num_classes'] = file_classes  # lets timm keep the head when the class counts agree
    return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay,
                             num_classes=num_classes or file_classes or 1000, **kwargs)


_DATA_KEYS = ('input_size', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation', 'label_names')


def _with_classes(kwargs: Dict[str, Any], num_classes: Optional[int]) -> Dict[str, Any]:
    return dict(kwargs, num_classes=num_classes) if num_classes else kwargs


def validate(
        model_name: str,
        checkpoint: Optional[str],
        data_dir: str,
        split: str = 'val',
        batch_size: int = 64,
        num_workers: int = 2,
        model_kwargs: Optional[Dict[str, Any]] = None,
        mixed_precision: str = 'no',
) -> Dict[str, Any]:
    """Evaluate a checkpoint on `data_dir/split` with the model's own preprocessing (works under accelerate launch).

    Class indices follow the checkpoint's label names when its config.json has them (a trainer output), else the
    sorted class folder names, as in training.
    """
    from accelerate import Accelerator

    from .data import ImageFolderDataset, build_transforms, data_config_for
    fresh_accelerator_state()
    accelerator = Accelerator(mixed_precision=mixed_precision)
    label_names = _checkpoint_label_names(checkpoint)
    class_map = {name: i for i, name in enumerate(label_names)} if label_names else None
    dataset = ImageFolderDataset(data_dir, split, class_map=class_map)
    num_classes = len(label_names) if label_names else len(dataset.class_to_idx)
    model = create_model_from_checkpoint(model_name, checkpoint, num_classes=num_classes, **(model_kwargs or {}))
    dataset.transform = build_transforms(data_config_for(model), None, is_training=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model, loader = accelerator.prepare(model, loader)
    result = evaluate(model, loader, accelerator, num_classes)
    result.update(model=model_name, checkpoint=checkpoint, split=str(dataset.reader.root),
                  params=sum(p.numel() for p in accelerator.unwrap_model(model).parameters()))
    return result


def _checkpoint_label_names(checkpoint: Optional[str]) -> Optional[list]:
    if not checkpoint or checkpoint == 'default' or checkpoint.startswith('hf-hub:'):
        return None
    return _trainer_config(Path(checkpoint)).get('pretrained_cfg', {}).get('label_names')
