""" Training loop with Hugging Face Accelerate: the same code on CPU, one GPU and many GPUs.

`Trainer(cfg)` sets everything up (Accelerator, data, model, optimizer, resume); `fit()` runs the loop:
`train_step` (forward with the MoE aux loss, backward, update) then `after_step` (log, checkpoint, evaluate,
react to SIGTERM / Ctrl-C); `finish()` evaluates and saves the model. Checkpoints are Accelerate `save_state`
folders (model, optimizer, RNG states, the train state), so `resume` continues exactly, data order included.
A non-finite loss stops the run before the update and saves nothing.
"""
import logging
import signal
import time
from contextlib import contextmanager
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

from ..data import ImageFolderDataset, build_transforms, data_config_for, verify_images
from ..layers import capture_routing
from ..models import create_model_from_checkpoint
from .checkpoints import TrainState, latest_checkpoint
from .config import TrainConfig
from .evaluation import evaluate, fresh_accelerator_state
from .run_log import RunLog
from .schedule import learning_rate

__all__ = ['train', 'Trainer', 'NonFiniteLossError']

_logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped without saving."""


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


def _trackers(cfg: TrainConfig) -> Optional[str]:
    if cfg.trackers in (None, 'none'):
        return None
    if cfg.trackers == 'auto':
        try:
            import tensorboard  # noqa: F401
            return 'tensorboard'
        except ImportError:
            return None
    return cfg.trackers


def _loss_fn(cfg: TrainConfig) -> torch.nn.Module:
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


class Trainer:
    """One training run as `cfg` says. `Trainer(cfg).fit()` returns a summary (final eval, paths, interruption)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.accelerator = self._make_accelerator()
        set_seed(cfg.seed)
        self.main = self.accelerator.is_main_process
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / 'config.yaml').write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self._build_data_and_model()
        self.state = TrainState()
        self.accelerator.register_for_checkpointing(self.state)
        self._resume()
        if _trackers(cfg):
            self.accelerator.init_trackers('vit_moe', config={k: v for k, v in cfg.to_dict().items()
                                                              if isinstance(v, (int, float, str, bool))})
        self.log = RunLog(self.out / 'log.jsonl', self.accelerator, enabled=self.main)
        self.last_saved = -1
        self.interrupted = 0

    # ----------------------------------------------------------------------------------------------- set-up
    def _make_accelerator(self) -> Accelerator:
        cfg, out = self.cfg, self.out
        fresh_accelerator_state()
        return Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum_steps,
            log_with=_trackers(cfg),
            project_config=ProjectConfiguration(
                project_dir=str(out), logging_dir=str(out / 'tensorboard'), automatic_checkpoint_naming=True,
                total_limit=cfg.keep_checkpoints),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
        )

    def _build_data_and_model(self) -> None:
        cfg = self.cfg
        if cfg.data_dir is None:
            raise ValueError('data_dir is not set; expected a folder with train/ and val/ class folders')
        self.train_set = ImageFolderDataset(cfg.data_dir, cfg.train_split, bad_image_policy=cfg.bad_image_policy)
        self.val_set = ImageFolderDataset(cfg.data_dir, cfg.val_split, class_map=self.train_set.class_to_idx,
                                          bad_image_policy=cfg.bad_image_policy)
        self.num_classes = len(self.train_set.class_to_idx)
        model = create_model_from_checkpoint(cfg.model, cfg.pretrained, num_classes=self.num_classes,
                                             **cfg.model_kwargs)
        data_config = data_config_for(model, cfg.input_size)
        self.train_set.transform = build_transforms(data_config, cfg, is_training=True)
        self.train_set.seed = cfg.seed
        self.val_set.transform = build_transforms(data_config, cfg, is_training=False)
        if cfg.verify_images:
            self._verify_images()

        train_loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.num_workers,
            persistent_workers=False,  # fresh workers each epoch see train_set.epoch
            generator=torch.Generator().manual_seed(cfg.seed))  # iterator seeds must not draw from the global RNG
        val_loader = torch.utils.data.DataLoader(
            self.val_set, batch_size=cfg.eval_batch_size or cfg.batch_size, shuffle=False,
            num_workers=cfg.num_workers)
        if len(train_loader) == 0:
            raise ValueError(f'train split has {len(self.train_set)} images, fewer than batch_size={cfg.batch_size}')
        optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                           num_classes=self.num_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None
        self.loss_fn = _loss_fn(cfg)
        self.model, self.optimizer, self.train_loader, self.val_loader = self.accelerator.prepare(
            model, optimizer, train_loader, val_loader)
        self.unwrapped = self.accelerator.unwrap_model(self.model)

    def _verify_images(self) -> None:
        bad = verify_images(self.train_set) + verify_images(self.val_set)
        if bad and self.cfg.bad_image_policy == 'error':
            raise ValueError(f'{len(bad)} unreadable image(s): ' + '; '.join(f'{p} ({e})' for p, e in bad[:10]))
        for path, error in bad:
            _logger.warning(f'unreadable image {path!r} ({error}); it will be skipped')

    def _resume(self) -> None:
        cfg = self.cfg
        if not cfg.resume:
            return
        resume = latest_checkpoint(cfg.output_dir) if cfg.resume == 'latest' else Path(cfg.resume)
        if resume is None or not resume.is_dir():
            raise FileNotFoundError(f'resume={cfg.resume!r}: no checkpoint folder found; expected a '
                                    f'checkpoints/checkpoint_N folder or "latest" with checkpoints in {self.out}')
        self.accelerator.load_state(str(resume))
        _logger.info(f'resumed from {resume} at step {self.state.step}')

    # ------------------------------------------------------------------------------------------- the loop
    def fit(self) -> Dict[str, Any]:
        cfg, state = self.cfg, self.state
        self.progress = tqdm(total=cfg.steps, initial=state.step, disable=not (self.main and cfg.progress),
                             desc='train')
        self.window_start, self.window_images = time.perf_counter(), 0
        self.model.train()
        with _StopSignal().installed() as stop:
            while state.step < cfg.steps and not self.interrupted:
                epoch, skip = divmod(state.batches, len(self.train_loader))
                self.train_loader.set_epoch(epoch)
                self.train_set.set_epoch(epoch)
                loader = self.accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
                for images, targets in loader:
                    step_output = self.train_step(images, targets)
                    if not self.accelerator.sync_gradients:
                        continue  # accumulating: not an optimizer step yet
                    if self.after_step(step_output, epoch, stop) or state.step >= cfg.steps:
                        break
        self.progress.close()
        return self.finish()

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, Any]:
        """One micro-batch: forward (task + MoE aux loss), NaN guard, backward, clip, update."""
        cfg, accelerator = self.cfg, self.accelerator
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        for group in self.optimizer.param_groups:
            group['lr'] = learning_rate(self.state.step, cfg)
        with accelerator.accumulate(self.model):
            with capture_routing() as routing:
                logits = self.model(images)
            task_loss = self.loss_fn(logits, targets)
            aux_loss = routing.aux_loss.to(task_loss.device, task_loss.dtype)
            loss = task_loss + aux_loss
            if _any(accelerator, not bool(torch.isfinite(loss.detach()))):
                raise NonFiniteLossError(
                    f'non-finite loss ({loss.item():.4g}) at step {self.state.step + 1}; stopped before the update '
                    f'and saved nothing. Last good checkpoint: {latest_checkpoint(cfg.output_dir) or "none"}. '
                    f'Try a lower lr (was {cfg.lr}), grad_clip, or mixed_precision=no.')
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.grad_clip:
                accelerator.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.state.batches += 1
        self.window_images += cfg.batch_size * accelerator.num_processes
        return dict(loss=loss.detach(), task_loss=task_loss.detach(), aux_loss=aux_loss.detach(), routing=routing)

    def after_step(self, step_output: Dict[str, Any], epoch: int, stop: _StopSignal) -> bool:
        """Count the optimizer step, then log / checkpoint / evaluate when due. True when the run must stop."""
        cfg, state = self.cfg, self.state
        state.step += 1
        self.progress.update(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.steps:
            self._log_train(step_output, epoch)
        if state.step % cfg.checkpoint_every == 0:
            self.save_checkpoint()
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
            self.log.write(dict(type='eval', step=state.step, **self.evaluate()), step=state.step)
            self.window_start, self.window_images = time.perf_counter(), 0
        if _any(self.accelerator, bool(stop.signum)):
            self.interrupted = stop.signum or signal.SIGTERM
            self.save_checkpoint()
            _logger.warning(f'stopped by signal {self.interrupted} at step {state.step}; checkpoint saved')
            return True
        return False

    def _log_train(self, step_output: Dict[str, Any], epoch: int) -> None:
        elapsed = time.perf_counter() - self.window_start
        loss = float(self.accelerator.reduce(step_output['loss'], 'mean'))
        layers = step_output['routing'].layers
        self.log.write(dict(
            type='train', step=self.state.step, epoch=epoch, loss=loss,
            task_loss=float(step_output['task_loss']), aux_loss=float(step_output['aux_loss']),
            lr=self.optimizer.param_groups[0]['lr'], images_per_s=self.window_images / elapsed,
            dropped_fraction=float(step_output['routing'].dropped_fraction),
            expert_load={n: m['expert_load'].tolist() for n, m in layers.items()},
            importance={n: m['importance'].tolist() for n, m in layers.items()}), step=self.state.step)
        self.progress.set_postfix(loss=f'{loss:.3f}')
        self.window_start, self.window_images = time.perf_counter(), 0

    def save_checkpoint(self) -> None:
        if self.last_saved != self.state.step:
            self.accelerator.save_state()
            self.last_saved = self.state.step

    def evaluate(self) -> Dict[str, Any]:
        return evaluate(self.model, self.val_loader, self.accelerator, self.num_classes)

    # ------------------------------------------------------------------------------------------ the end
    def finish(self) -> Dict[str, Any]:
        """Save and evaluate the final model (unless interrupted); close logs; return the run summary."""
        final_eval = None
        if not self.interrupted:
            self.save_checkpoint()
            final_eval = self.evaluate()
            self.log.write(dict(type='eval', step=self.state.step, **final_eval), step=self.state.step)
            self.accelerator.wait_for_everyone()
            if self.main:
                save_for_hf(self.unwrapped, str(self.out / 'model'), safe_serialization=True,
                            model_config=dict(pretrained_cfg=dict(label_names=list(self.train_set.class_to_idx))))
        self.accelerator.end_training()
        self.log.close()
        return dict(
            step=self.state.step, interrupted=int(self.interrupted), eval=final_eval, output_dir=str(self.out),
            model_dir=str(self.out / 'model'), checkpoint=str(latest_checkpoint(self.cfg.output_dir)),
            num_classes=self.num_classes, skipped_images=sorted(self.train_set.skipped | self.val_set.skipped),
            params=sum(p.numel() for p in self.unwrapped.parameters()),
        )


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run training as `cfg` says; returns a summary (final eval, paths, whether it was interrupted)."""
    return Trainer(cfg).fit()
