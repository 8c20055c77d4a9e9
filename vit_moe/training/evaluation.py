""" Evaluation with torchmetrics on (possibly distributed) loaders.

Predictions are gathered with `accelerator.gather_for_metrics` (which drops the samples a distributed
sampler repeats to even out the last batch) and the metrics are computed on the gathered tensors with
`sync_on_compute=False`, so every sample counts exactly once whatever the number of processes.
"""
import time
from typing import Any, Dict, Optional, Union

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from torchmetrics.classification import MulticlassAccuracy

from ..data import (
    ImageFolderDataset, build_transforms, data_config_for, ignore_stop_signals, iter_with_shielded_workers,
)
from ..layers import capacity_factors, capture_routing
from ..models import checkpoint_label_names, create_model_from_checkpoint, take_capacity_factor

__all__ = ['evaluate', 'validate', 'fresh_accelerator_state']


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, accelerator, num_classes: int) -> Dict[str, Any]:
    """top-1, top-5, loss, images/s, sample count and per-layer routing statistics over `loader`.

    `loader` yields `(images, targets)` or `(images, targets, readable)`; samples with `readable` False (an
    unreadable file, see `vit_moe.data.ImageFolderDataset`) are left out of every metric and counted in
    `num_excluded`. Returns with the model back in its previous mode.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device
    top1 = MulticlassAccuracy(num_classes, top_k=1, average='micro', sync_on_compute=False).to(device)
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average='micro',
                              sync_on_compute=False).to(device)
    loss_sum, count, excluded, routing = torch.zeros((), device=device), 0, 0, {}
    start = time.perf_counter()
    for batch in iter_with_shielded_workers(loader):  # a stop signal mid-run kills no worker
        images, targets = batch[0], batch[1]
        readable = batch[2] if len(batch) > 2 else torch.ones_like(targets, dtype=torch.bool)
        with capture_routing() as captured:
            logits = model(images)
        for name, m in captured.layers.items():  # running sums of per-batch statistics
            acc = routing.setdefault(name, {k: torch.zeros_like(v, dtype=torch.float32) for k, v in m.items()})
            for k, v in m.items():
                acc[k] += v.float()
        logits, targets, readable = accelerator.gather_for_metrics((logits.float(), targets, readable.bool()))
        excluded += int((~readable).sum())
        logits, targets = logits[readable], targets[readable]
        top1.update(logits, targets)
        top5.update(logits, targets)
        loss_sum += F.cross_entropy(logits, targets, reduction='sum')
        count += targets.numel()
    elapsed = time.perf_counter() - start
    batches = max(1, len(loader))
    layers = {name: {k: (v / batches).tolist() for k, v in m.items()} for name, m in routing.items()}
    model.train(was_training)
    return dict(
        top1=float(top1.compute()) * 100 if count else float('nan'),
        top5=float(top5.compute()) * 100 if count else float('nan'),
        loss=float(loss_sum) / max(1, count),
        num_samples=count,
        num_excluded=excluded,
        images_per_s=count / elapsed if elapsed > 0 else float('nan'),
        dropped_fraction=(sum(m['dropped_fraction'] for m in layers.values()) / len(layers)) if layers else 0.0,
        layers=layers,
    )


def fresh_accelerator_state() -> None:
    """Let a new Accelerator take its own settings (mixed precision, accumulation) in a process that already
    made one (a notebook, the main job's successive runs); the distributed set-up itself is kept."""
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def validate(
        model_name: str,
        checkpoint: Optional[str],
        data_dir: str,
        split: str = 'val',
        batch_size: int = 64,
        num_workers: int = 2,
        model_kwargs: Optional[Dict[str, Any]] = None,
        mixed_precision: str = 'no',
        expert_parallel_size: int = 1,
        capacity_factor: Optional[Union[float, Dict[str, float]]] = None,
) -> Dict[str, Any]:
    """Evaluate a checkpoint on `data_dir/split` with the model's own preprocessing (works under accelerate launch).

    Class indices follow the checkpoint's label names when its config.json has them (a trainer output), else the
    sorted class folder names, as in training. With `expert_parallel_size` N each process of the launch holds E / N
    experts of every MoE layer (`vit_moe.training.expert_parallel`). `capacity_factor`: the inference-time capacity
    (`create_model_from_checkpoint`'s), recorded in the result.
    """
    fresh_accelerator_state()
    accelerator = Accelerator(mixed_precision=mixed_precision)
    label_names = checkpoint_label_names(checkpoint)
    class_map = {name: i for i, name in enumerate(label_names)} if label_names else None
    dataset = ImageFolderDataset(data_dir, split, class_map=class_map, substitute_unreadable=False)
    num_classes = len(label_names) if label_names else len(dataset.class_to_idx)
    model_kwargs = dict(model_kwargs or {})
    given = model_kwargs.pop('num_classes', num_classes)
    if given != num_classes:
        source = 'the label names saved with the checkpoint' if label_names else f'{data_dir}/{split}'
        raise ValueError(f'model_kwargs num_classes={given!r} disagrees with the {num_classes} classes of {source}; '
                         f'remove it')
    capacity_factor, model_kwargs = take_capacity_factor(model_kwargs, capacity_factor)
    model = create_model_from_checkpoint(model_name, checkpoint, num_classes=num_classes,
                                         capacity_factor=capacity_factor, **model_kwargs)
    if expert_parallel_size > 1:
        from .expert_parallel import ExpertShards
        ExpertShards(expert_parallel_size, accelerator.num_processes, accelerator.device.type).shard(model)
    dataset.transform = build_transforms(data_config_for(model), None, is_training=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                         worker_init_fn=ignore_stop_signals)
    model, loader = accelerator.prepare(model, loader)
    result = evaluate(model, loader, accelerator, num_classes)
    result.update(model=model_name, checkpoint=checkpoint, split=str(dataset.reader.root), excluded=dataset.skipped,
                  capacity_factor=capacity_factors(accelerator.unwrap_model(model)) or None,
                  params=sum(p.numel() for p in accelerator.unwrap_model(model).parameters()))
    return result
