""" Training loop with Hugging Face Accelerate: the same code on CPU, one GPU and many GPUs.

args -> Accelerator -> data -> model -> prepare -> loop (MoE aux loss added, lr from the schedule) ->
evaluate -> save. Checkpoints are Accelerate `save_state` folders (model, optimizer, RNG states, the
train state), so `resume` continues exactly, data order included. SIGTERM / Ctrl-C save a checkpoint
before the run exits. A non-finite loss stops the run before the update and saves nothing.
"""
import json
import logging
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models._hub import save_for_hf
from timm.optim import create_optimizer_v2
from tqdm.auto import tqdm

from .data import ImageFolderDataset, build_transforms, data_config_for, verify_images
from .evaluation import create_model_from_checkpoint, evaluate, fresh_accelerator_state
from .metrics import collect_moe_metrics
from .schedule import learning_rate
from .train_config import TrainConfig

__all__ = ['train', 'NonFiniteLossError', 'latest_checkpoint']

_logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped without saving."""


@dataclass
class TrainState:
    """Counters saved with every checkpoint (Accelerate `register_for_checkpointing`)."""
    step: int = 0  # optimizer steps done
    batches: int = 0  # micro-batches consumed (positions the data order)

    def state_dict(self) -> Dict[str, int]:
        return dict(step=self.step, batches=self.batches)

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.step, self.batches = int(state['step']), int(state['batches'])


def latest_checkpoint(output_dir: str) -> Optional[Path]:
    """Newest `checkpoints/checkpoint_N` folder of a run, or None."""
    folders = [p for p in (Path(output_dir) / 'checkpoints').glob('checkpoint_*') if p.is_dir()]
    return max(folders, key=lambda p: int(p.name.rsplit('_', 1)[1]), default=None)


class _StopSignal:
    """Remembers SIGTERM / SIGINT so the loop can save at the next step boundary."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame):
        self.signum = signum

    @contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _trackers(cfg: TrainConfig):
    if cfg.trackers in (None, 'none'):
        return None
    if cfg.trackers == 'auto':
        try:
            import tensorboard  # noqa: F401
            return 'tensorboard'
        except ImportError:
            return None
    return cfg.trackers


def _loss_fn(cfg: TrainConfig):
    if cfg.mixup > 0 or cfg.cutmix > 0:
        return SoftTargetCrossEntropy()  # mixup targets are soft and carry the label smoothing
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(cfg.label_smoothing)
    return torch.nn.CrossEntropyLoss()


def _any(accelerator: Accelerator, flag: bool) -> bool:
    """True on every process if it is true on any (keeps collective calls in step)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), 'sum') > 0)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run training as `cfg` says; returns a summary (final eval, paths, whether it was interrupted)."""
    out = Path(cfg.output_dir)
    fresh_accelerator_state()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=_trackers(cfg),
        project_config=ProjectConfiguration(
            project_dir=str(out), logging_dir=str(out / 'tensorboard'), automatic_checkpoint_naming=True,
            total_limit=cfg.keep_checkpoints),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
    )
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / 'config.yaml').write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if cfg.data_dir is None:
        raise ValueError('data_dir is not set; expected a folder with train/ and val/ class folders')

    train_set = ImageFolderDataset(cfg.data_dir, cfg.train_split, bad_image_policy=cfg.bad_image_policy)
    val_set = ImageFolderDataset(cfg.data_dir, cfg.val_split, class_map=train_set.class_to_idx,
                                 bad_image_policy=cfg.bad_image_policy)
    num_classes = len(train_set.class_to_idx)
    model = create_model_from_checkpoint(cfg.model, cfg.pretrained, num_classes=num_classes, **cfg.model_kwargs)
    data_config = data_config_for(model, cfg.input_size)
    train_set.transform = build_transforms(data_config, cfg, is_training=True)
    train_set.seed = cfg.seed
    val_set.transform = build_transforms(data_config, cfg, is_training=False)
    if cfg.verify_images:
        bad = verify_images(train_set) + verify_images(val_set)
        if bad and cfg.bad_image_policy == 'error':
            raise ValueError(f'{len(bad)} unreadable image(s): ' + '; '.join(f'{p} ({e})' for p, e in bad[:10]))
        for path, error in bad:
            _logger.warning(f'unreadable image {path!r} ({error}); it will be skipped')

    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.num_workers,
        persistent_workers=False,  # fresh workers each epoch see train_set.epoch
        generator=torch.Generator().manual_seed(cfg.seed))  # iterator seeds must not draw from the global RNG
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=cfg.eval_batch_size or cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    if len(train_loader) == 0:
        raise ValueError(f'train split has {len(train_set)} images, fewer than batch_size={cfg.batch_size}')
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                  num_classes=num_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None
    loss_fn = _loss_fn(cfg)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    if cfg.resume:
        resume = latest_checkpoint(cfg.output_dir) if cfg.resume == 'latest' else Path(cfg.resume)
        if resume is None or not resume.is_dir():
            raise FileNotFoundError(f'resume={cfg.resume!r}: no checkpoint folder found; expected a '
                                    f'checkpoints/checkpoint_N folder or "latest" with checkpoints in {out}')
        accelerator.load_state(str(resume))
        _logger.info(f'resumed from {resume} at step {state.step}')

    if _trackers(cfg):
        accelerator.init_trackers('vit_moe', config={k: v for k, v in cfg.to_dict().items()
                                                     if isinstance(v, (int, float, str, bool))})
    log_file = open(out / 'log.jsonl', 'a') if main else None

    def log(record: Dict[str, Any]) -> None:
        if main:
            log_file.write(json.dumps(record) + '\n')
            log_file.flush()
            scalars = {f'{record["type"]}/{k}': v for k, v in record.items() if isinstance(v, (int, float))}
            accelerator.log(scalars, step=state.step)

    unwrapped = accelerator.unwrap_model(model)
    global_batch = cfg.batch_size * accelerator.num_processes
    last_saved, interrupted, final_eval = -1, 0, None
    progress = tqdm(total=cfg.steps, initial=state.step, disable=not (main and cfg.progress), desc='train')

    def save():
        nonlocal last_saved
        if last_saved != state.step:
            accelerator.save_state()
            last_saved = state.step

    model.train()
    window_start, window_images = time.perf_counter(), 0
    with _StopSignal().installed() as stop:
        while state.step < cfg.steps and not interrupted:
            epoch, skip = divmod(state.batches, len(train_loader))
            train_loader.set_epoch(epoch)
            train_set.set_epoch(epoch)
            loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            for images, targets in loader:
                if mixup is not None:
                    images, targets = mixup(images, targets)
                for group in optimizer.param_groups:
                    group['lr'] = learning_rate(state.step, cfg)
                with accelerator.accumulate(model):
                    logits = model(images)
                    task_loss = loss_fn(logits, targets)
                    moe = collect_moe_metrics(unwrapped)
                    loss = task_loss + moe['aux_loss'].to(task_loss.dtype)
                    if _any(accelerator, not bool(torch.isfinite(loss.detach()))):
                        latest = latest_checkpoint(cfg.output_dir)
                        raise NonFiniteLossError(
                            f'non-finite loss ({loss.item():.4g}) at step {state.step + 1}; stopped before the '
                            f'update and saved nothing. Last good checkpoint: {latest or "none"}. Try a lower lr '
                            f'(was {cfg.lr}), grad_clip, or mixed_precision=no.')
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.grad_clip:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.batches += 1
                window_images += global_batch
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                progress.update(1)
                if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                    elapsed = time.perf_counter() - window_start
                    loss_value = float(accelerator.reduce(loss.detach(), 'mean'))
                    log(dict(type='train', step=state.step, epoch=epoch, loss=loss_value,
                             task_loss=task_loss.item(), aux_loss=moe['aux_loss'].item(),
                             lr=optimizer.param_groups[0]['lr'], images_per_s=window_images / elapsed,
                             dropped_fraction=moe['dropped_fraction'],
                             expert_load={n: m['expert_load'].tolist() for n, m in moe['layers'].items()},
                             importance={n: m['importance'].tolist() for n, m in moe['layers'].items()}))
                    progress.set_postfix(loss=f'{loss_value:.3f}')
                    window_start, window_images = time.perf_counter(), 0
                if state.step % cfg.checkpoint_every == 0:
                    save()
                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
                    log(dict(type='eval', step=state.step, **evaluate(model, val_loader, accelerator, num_classes)))
                    window_start, window_images = time.perf_counter(), 0
                if _any(accelerator, bool(stop.signum)):
                    interrupted = stop.signum or signal.SIGTERM
                    save()
                    _logger.warning(f'stopped by signal {interrupted} at step {state.step}; checkpoint saved')
                    break
                if state.step >= cfg.steps:
                    break
    progress.close()

    if not interrupted:
        save()
        final_eval = evaluate(model, val_loader, accelerator, num_classes)
        log(dict(type='eval', step=state.step, **final_eval))
        accelerator.wait_for_everyone()
        if main:
            save_for_hf(unwrapped, str(out / 'model'), safe_serialization=True,
                        model_config=dict(pretrained_cfg=dict(label_names=list(train_set.class_to_idx))))
    accelerator.end_training()
    if log_file:
        log_file.close()
    skipped = sorted(train_set.skipped | val_set.skipped)
    return dict(
        step=state.step, interrupted=int(interrupted), eval=final_eval, output_dir=str(out),
        model_dir=str(out / 'model'), checkpoint=str(latest_checkpoint(cfg.output_dir)),
        num_classes=num_classes, skipped_images=skipped,
        params=sum(p.numel() for p in unwrapped.parameters()),
    )
