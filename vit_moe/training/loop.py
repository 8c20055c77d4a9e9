""" Training loop with Hugging Face Accelerate: the same code on CPU, one GPU and many GPUs.

`Trainer(cfg)` sets everything up (Accelerator, data, model, EMA, optimizer, resume); `fit()` runs the loop:
`train_step` (forward with the MoE aux loss, backward, update) then `after_step` (EMA, log, checkpoint,
evaluate, react to SIGTERM / Ctrl-C); `finish()` evaluates and saves the model (and its EMA).

Parallelism is applied in one place (`vit_moe.training.parallelize`). Checkpoints (`vit_moe.training.checkpoints`)
are written atomically and named by step; they hold the training state by parameter name
(`vit_moe.training.training_state`: model, optimizer, EMA with torch.distributed.checkpoint, and the counters), so
`resume` continues the same run on any launch (process count, DDP / FSDP2, expert-parallel size), however often the
run is killed (SIGKILL included) and resumed. A resumed leg keeps the run's global batch by changing gradient
accumulation. SIGTERM / Ctrl-C save a checkpoint at the next step boundary before exiting. A non-finite loss stops
the run before the update and saves nothing.

Randomness: the model is built from `seed` on every process. The data order is drawn from (seed, epoch) over whole
global batches, and dropout, drop-path and mixup are seeded per micro-batch from (seed, epoch, micro-batch number)
(`vit_moe.training.data_order`); augmentations per (seed, epoch, sample). None of it depends on the launch.
"""
import logging
import os
import signal
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration, DistributedDataParallelKwargs, GradientAccumulationPlugin,
    ProjectConfiguration, TorchDynamoPlugin, broadcast_object_list, set_seed,
)
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from tqdm.auto import tqdm

from .._files import atomic_write
from ..data import (
    STOP_SIGNALS, BadImageLog, ImageFolderDataset, WorkerSignals, build_transforms, data_config_for,
    iter_with_shielded_workers, verify_images,
)
from ..layers import capture_routing
from ..models import create_model_from_checkpoint, save_trained_model, trained_model_config
from .checkpoints import (
    TrainState, checkpoint_step, complete_checkpoints, is_complete, latest_checkpoint, prune_checkpoints,
    remove_leftovers, write_checkpoint,
)
from .data_order import GlobalBatchSampler, reseed_micro_batch
from .config import ConfigError, TrainConfig, resume_conflicts, scaled_lr, signal_number
from .evaluation import evaluate, fresh_accelerator_state
from .meters import StepMeter
from .optim import create_optimizer
from .ema import ShardedEma
from .parallelize import Parallelism
from .run_log import RunLog
from .run_lock import acquire_run_lock
from .schedule import learning_rate
from .training_state import load_training_state, read_train_state, save_training_state

__all__ = ['train', 'Trainer', 'NonFiniteLossError', 'forward_loss']

_logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped without saving."""


class _StopSignal:
    """Remembers SIGTERM / SIGINT (or the early-warning save signal) so the loop can save at the next step boundary."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signum = 0
        self.signals = tuple(signals)

    def __call__(self, signum, frame):
        self.signum = signum

    @contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self) for s in self.signals}
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


def forward_loss(model: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor, loss_fn):
    """One forward: (task loss + MoE aux loss, task loss, aux loss, the routing capture)."""
    with capture_routing() as routing:
        logits = model(images)
    task_loss = loss_fn(logits, targets)
    aux_loss = routing.aux_loss.to(task_loss.device, task_loss.dtype)
    return task_loss + aux_loss, task_loss, aux_loss, routing


CPU_LAUNCH = 'ACCELERATE_USE_CPU=1 python -m torch.distributed.run --nproc_per_node N train_scripts/train.py ...'


def _refuse_lone_processes(num_processes: int, output_dir: str) -> None:
    """A launcher asked for several processes but Accelerate runs this one alone: each would train its own model into
    the same output_dir. Refused before anything is written, naming the launch that works on CPUs."""
    if num_processes != 1:
        return
    world = os.environ.get('WORLD_SIZE', '')
    if world.isdigit() and int(world) > 1 and os.environ.get('ACCELERATE_USE_FSDP', '').lower() == 'true':
        raise ConfigError(
            f'the launch asks for FSDP over {world} processes, but this machine has no GPU and Accelerate runs FSDP on '
            f'GPUs only (each process would train alone into output_dir {output_dir!r}); on CPUs train with DDP: '
            f'{CPU_LAUNCH.replace("N", world)}, or test the FSDP2 path with ACCELERATE_USE_CPU=1 python -m '
            f'torch.distributed.run --nproc_per_node {world} tests/fsdp_on_cpu.py train_scripts/train.py ...')
    if world.isdigit() and int(world) > 1:
        raise ConfigError(
            f'WORLD_SIZE={world}: the launcher started {world} processes but Accelerate sees 1 (no GPU, and '
            f'ACCELERATE_USE_CPU is not set), so each would train alone into output_dir {output_dir!r}; on CPUs run '
            f'{CPU_LAUNCH.replace("N", world)}')
    simple_launcher = 'ACCELERATE_USE_CPU' in os.environ and 'MASTER_PORT' in os.environ and not world
    if simple_launcher:  # `accelerate launch --cpu --num_processes N` (N > 1 sets MASTER_PORT) runs one process
        raise ConfigError(
            f'accelerate launch --cpu with --num_processes > 1 starts a single process (Accelerate\'s simple '
            f'launcher), not the processes asked for; on CPUs run {CPU_LAUNCH}')


class Trainer:
    """One training run as `cfg` says. `Trainer(cfg).fit()` returns a summary (final eval, paths, interruption)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        # SIGTERM / Ctrl-C and the early-warning save signal: save at the next step boundary, then stop
        self.signals = STOP_SIGNALS + ((signal_number(cfg.save_signal),) if cfg.save_signal else ())
        self.accelerator = self._make_accelerator()
        self.main = self.accelerator.is_main_process
        resume_from = self._checkpoint_to_resume()
        self.state = read_train_state(resume_from) if resume_from is not None else TrainState()
        self._set_global_batch(resume_from)  # kept by a resumed leg: accumulation makes up for the process count
        self.lr = scaled_lr(cfg, self.global_batch)  # the peak lr of the run
        # DDP / FSDP2 as launched; expert parallelism on a (dp, ep) mesh: each process keeps E / N experts
        self.parallel = Parallelism(self.accelerator, cfg.expert_parallel_size)
        set_seed(cfg.seed)  # the same model init on every process
        self._build_data_and_model()  # a bad option, path or checkpoint is refused here: nothing written yet
        # one live run per output folder: a second launch into it is refused in one line naming the live run (before
        # anything is written into it)
        self.run_lock = acquire_run_lock(self.out, self.main, broadcast=(
            lambda verdict: broadcast_object_list([verdict])[0]) if self.accelerator.num_processes > 1 else None)
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_leftovers(self.out)
            atomic_write(self.out / 'config.yaml', cfg.to_yaml())
        self.accelerator.wait_for_everyone()
        self.last_saved = -1
        if resume_from is not None:
            load_training_state(resume_from, self.unwrapped, self.optimizer.optimizer, self.ema, self.parallel)
            if self.state.loss_scale and self.accelerator.scaler is not None:
                self.accelerator.scaler.load_state_dict(self.state.loss_scale)
            self.last_saved = self.state.step
            _logger.info(f'resumed from {resume_from} at step {self.state.step}')
        self.state.num_processes = self.accelerator.num_processes
        self.state.grad_accum_steps = self.accelerator.gradient_accumulation_steps
        self.state.expert_parallel_size = cfg.expert_parallel_size
        self.state.launch = self.parallel.describe()
        if _trackers(cfg):
            self.accelerator.init_trackers('vit_moe', config={k: v for k, v in cfg.to_dict().items()
                                                              if isinstance(v, (int, float, str, bool))})
        self.log = RunLog(self.out / 'log.jsonl', self.accelerator, start_step=self.state.step, enabled=self.main)
        if resume_from is not None:
            self.log.write(dict(type='resume', step=self.state.step, checkpoint=str(resume_from)), self.state.step)
        self.log.write(dict(type='start', step=self.state.step, num_processes=self.accelerator.num_processes,
                            distributed_type=str(self.accelerator.distributed_type.value),
                            mixed_precision=self.accelerator.mixed_precision, global_batch=self.global_batch,
                            grad_accum_steps=self.accelerator.gradient_accumulation_steps, lr=self.lr,
                            model_kwargs=self.model_args, expert_parallel_size=cfg.expert_parallel_size,
                            experts_per_process=self.parallel.experts_per_process(self.unwrapped)), self.state.step)
        self._logged_bad_images = set()
        self.interrupted = 0
        self.stop_requested = False
        self._finite: Optional[torch.Tensor] = None  # AND of the window's micro-batch losses being finite

    # ----------------------------------------------------------------------------------------------- set-up
    def _checkpoint_to_resume(self) -> Optional[Path]:
        """The checkpoint `cfg.resume` names (None for a new run), refusing what would mix or lose runs."""
        cfg, out = self.cfg, self.out
        latest = latest_checkpoint(out, warn=self.main and cfg.resume in ('latest', 'auto'))
        if not cfg.resume:
            if latest is not None:
                raise ConfigError(
                    f'output_dir {str(out)!r} already holds checkpoints (newest: {latest.name}); continue that run '
                    f'with resume=latest (or auto), or give another output_dir')
            return None
        if cfg.resume in ('latest', 'auto'):
            if latest is None and cfg.resume == 'latest':
                raise FileNotFoundError(
                    f'resume=latest: no complete checkpoint in {str(out / "checkpoints")!r}; use resume=auto to start '
                    f'a new run when there is none, or give a checkpoint folder')
            resume_from = latest
        else:
            resume_from = Path(cfg.resume)
            if not resume_from.is_dir():
                raise FileNotFoundError(f'resume={cfg.resume!r} is not a folder; expected a checkpoint folder '
                                        f'(checkpoints/checkpoint_step_N), "latest" or "auto"')
            if not is_complete(resume_from):
                raise ValueError(f'resume={cfg.resume!r} is an incomplete checkpoint (no COMPLETE marker: its save '
                                 f'was interrupted); resume from an earlier one')
            existing = complete_checkpoints(out)
            in_place = resume_from.resolve().parent == (out / 'checkpoints').resolve()
            newer = [p.name for step, p in existing if step > (checkpoint_step(resume_from) or 0)]
            if existing and not in_place or newer:
                raise ConfigError(
                    f'output_dir {str(out)!r} holds checkpoints ({", ".join(p.name for _, p in existing)}) that '
                    f'resuming from {cfg.resume!r} would mix with or overwrite; resume into another output_dir')
        if resume_from is not None:
            self._check_resumable(resume_from)
        return resume_from

    def _set_global_batch(self, checkpoint: Optional[Path]) -> None:
        """The run's global batch: batch_size x processes x grad_accum_steps for a new run, the checkpoint's for a
        resumed one, whose accumulation then makes up for another process count (refused when it cannot)."""
        cfg, processes = self.cfg, self.accelerator.num_processes
        per_step = cfg.batch_size * processes
        self.global_batch = self.state.global_batch or per_step * cfg.grad_accum_steps
        self.state.global_batch = self.global_batch
        if self.global_batch % per_step:
            divisors = [n for n in range(1, self.global_batch // cfg.batch_size + 1)
                        if (self.global_batch // cfg.batch_size) % n == 0]
            raise ConfigError(
                f'{checkpoint} was trained with a global batch of {self.global_batch} images; {processes} processes x '
                f'batch_size {cfg.batch_size} do not divide it, so no accumulation keeps it; launch a number of '
                f'processes in {divisors}')
        accumulation = self.global_batch // per_step
        self.accelerator.gradient_accumulation_steps = accumulation
        if checkpoint is not None and self.main and (processes, accumulation) != (self.state.num_processes,
                                                                                  self.state.grad_accum_steps):
            _logger.warning(f'{checkpoint.name} was saved by {self.state.num_processes} process(es) x '
                            f'{self.state.grad_accum_steps} accumulation step(s), resumed by {processes} x '
                            f'{accumulation}: the global batch stays {self.global_batch} images')

    def _check_resumable(self, checkpoint: Path) -> None:
        saved = checkpoint / 'config.yaml'
        if not saved.is_file():
            return
        conflicts = resume_conflicts(yaml.safe_load(saved.read_text()) or {}, self.cfg.to_dict())
        if conflicts:
            changes = '; '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in conflicts.items())
            raise ConfigError(f'cannot resume {checkpoint} with a different {", ".join(conflicts)} ({changes}); '
                              f'only steps, data_dir, logging, checkpointing and evaluation settings may change')

    def _make_accelerator(self) -> Accelerator:
        """DDP, FSDP2 or a single process as `accelerate launch` configured it; torch.compile via Accelerate."""
        cfg, out = self.cfg, self.out
        fresh_accelerator_state()
        dynamo = TorchDynamoPlugin(backend=cfg.torch_compile_backend.upper(), mode=cfg.torch_compile) \
            if cfg.torch_compile else None
        accelerator = Accelerator(
            mixed_precision=cfg.mixed_precision,
            # every optimizer step sums exactly the accumulation's micro-batches (an epoch holds whole global
            # batches: GlobalBatchSampler); the count is set per launch (_set_global_batch)
            gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=cfg.grad_accum_steps,
                                                                    sync_with_dataloader=False),
            log_with=_trackers(cfg),
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / 'tensorboard')),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.find_unused_parameters)],
            dynamo_plugin=dynamo,
        )
        _refuse_lone_processes(accelerator.num_processes, cfg.output_dir)
        return accelerator

    def _build_data_and_model(self) -> None:
        cfg = self.cfg
        if cfg.data_dir is None:
            raise ValueError('data_dir is not set; expected a folder with train/ and val/ class folders')
        self.bad_images = BadImageLog(self.out / 'bad_images.jsonl')
        self.train_set = ImageFolderDataset(cfg.data_dir, cfg.train_split, bad_image_policy=cfg.bad_image_policy,
                                            bad_image_log=self.bad_images)
        self.val_set = ImageFolderDataset(cfg.data_dir, cfg.val_split, class_map=self.train_set.class_to_idx,
                                          bad_image_policy=cfg.bad_image_policy, substitute_unreadable=False,
                                          bad_image_log=self.bad_images)
        self.num_classes = len(self.train_set.class_to_idx)
        model_kwargs = dict(cfg.model_kwargs)
        given = model_kwargs.pop('num_classes', self.num_classes)
        if given != self.num_classes:
            raise ConfigError(f'model_kwargs num_classes={given!r}: the trainer takes the number of classes from the '
                              f'data ({self.num_classes} class folders in {cfg.data_dir}/{cfg.train_split}); remove it')
        model = create_model_from_checkpoint(cfg.model, cfg.pretrained, num_classes=self.num_classes, **model_kwargs)
        self.data_config = data_config_for(model, cfg.input_size)
        # bad values fail here; the model's arguments as resolved (the MoE options with their defaults)
        self.model_args = trained_model_config(model, data_config=self.data_config, model_args=model_kwargs)[
            'model_args']
        self.train_set.transform = build_transforms(self.data_config, cfg, is_training=True)
        self.train_set.seed = cfg.seed
        self.val_set.transform = build_transforms(self.data_config, cfg, is_training=False)
        if cfg.verify_images:
            self._verify_images()

        # the same order and epoch length on every launch; Accelerate deals the micro-batches out round-robin
        self.sampler = GlobalBatchSampler(len(self.train_set), self.global_batch, cfg.seed)
        train_loader = torch.utils.data.DataLoader(
            self.train_set, batch_size=cfg.batch_size, sampler=self.sampler, drop_last=True,
            num_workers=cfg.num_workers,
            persistent_workers=False,  # fresh workers each epoch see train_set.epoch
            generator=torch.Generator().manual_seed(cfg.seed),  # iterator seeds must not draw from the global RNG
            worker_init_fn=WorkerSignals(self.signals))  # SIGTERM to the process group: the main process saves first
        val_loader = torch.utils.data.DataLoader(
            self.val_set, batch_size=cfg.eval_batch_size or cfg.batch_size, shuffle=False,
            num_workers=cfg.num_workers, worker_init_fn=WorkerSignals(self.signals))
        self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                           num_classes=self.num_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None
        self.loss_fn = _loss_fn(cfg)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)

        def make_optimizer(model):  # the routed experts in groups of their own on every launch
            return create_optimizer(model, cfg.opt, self.lr, cfg.weight_decay, cfg.layer_decay, cfg.router_lr_mult,
                                    cfg.opt_betas, cfg.opt_eps, apart=self.parallel.expert_names(model))

        prepared = self.parallel.apply(model, make_optimizer, (train_loader, val_loader), ema_decay=cfg.ema_decay,
                                       ema_warmup=cfg.ema_warmup)
        self.model, self.unwrapped, self.optimizer, self.ema = (prepared.model, prepared.unwrapped,
                                                                prepared.optimizer, prepared.ema)
        self.train_loader, self.val_loader = prepared.loaders
        self.sharded_ema = isinstance(self.ema, ShardedEma)

    def _verify_images(self) -> None:
        bad = verify_images(self.train_set) + verify_images(self.val_set)
        if bad and self.cfg.bad_image_policy == 'error':
            raise ValueError(f'{len(bad)} unreadable image(s): ' + '; '.join(f'{p} ({e})' for p, e in bad[:10]))
        for path, error in bad:
            _logger.warning(f'unreadable image {path!r} ({error}); it will be skipped')

    # ------------------------------------------------------------------------------------------- the loop
    def fit(self) -> Dict[str, Any]:
        cfg, state = self.cfg, self.state
        self.progress = tqdm(total=cfg.steps, initial=state.step, disable=not (self.main and cfg.progress),
                             desc='train')
        self.meter = StepMeter(self.accelerator.device)
        self.meter.load_window(state.log_window)  # resumed: continue the checkpoint's logging window
        self.window_start, self.window_images = time.perf_counter(), 0
        self._clock = time.perf_counter()  # for state.elapsed_s
        if cfg.eval_at_start and state.step == 0:
            self._log_evaluation()
        self.model.train()
        with _StopSignal(self.signals).installed() as self.stop_signal:
            accumulation, processes = self.accelerator.gradient_accumulation_steps, self.accelerator.num_processes
            while state.step < cfg.steps and not self.interrupted:
                epoch, step_in_epoch = divmod(state.step, self.sampler.steps_per_epoch)  # the data position
                self.train_loader.set_epoch(epoch)
                self.train_set.set_epoch(epoch)
                skip = step_in_epoch * accumulation  # this process's micro-batches of the epoch done
                loader = self.accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
                batches = iter_with_shielded_workers(loader)  # a stop signal kills no worker
                for i, (images, targets) in enumerate(batches, start=skip):
                    # micro-batch i of process r is number i * P + r of the epoch, on any launch
                    reseed_micro_batch(cfg.seed, epoch, i * processes + self.accelerator.process_index)
                    self.train_step(images, targets)
                    if not self.accelerator.sync_gradients:
                        continue  # accumulating: not an optimizer step yet
                    if self.after_step(epoch) or state.step >= cfg.steps:
                        break
        self.progress.close()
        return self.finish()

    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        """One micro-batch: forward (task + MoE aux loss), backward, and at an optimizer step the NaN guard, clip
        and update. Numbers for the log stay on the device (`self.meter`)."""
        cfg, accelerator = self.cfg, self.accelerator
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        lr = learning_rate(self.state.step, cfg, self.lr)
        for group in self.optimizer.param_groups:
            group['lr'] = lr * group.get('lr_scale', 1.0)
        with accelerator.accumulate(self.model):
            loss, task_loss, aux_loss, routing = forward_loss(self.model, images, targets, self.loss_fn)
            finite = torch.isfinite(loss.detach())
            self._finite = finite if self._finite is None else self._finite & finite
            if accelerator.sync_gradients:
                self._check_before_update(loss)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                self.parallel.reduce_gradients(self.unwrapped)  # the expert shards' mean over every process
            if accelerator.sync_gradients and cfg.grad_clip:
                self.parallel.clip_grad_norm_(self.model, self.unwrapped, cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.window_images += cfg.batch_size * accelerator.num_processes
        self.meter.add(dict(loss=loss, task_loss=task_loss, aux_loss=aux_loss,
                            dropped_fraction=routing.dropped_fraction), routing.layers)

    def _check_before_update(self, loss: torch.Tensor) -> None:
        """The optimizer step's one host synchronisation: any process's loss non-finite, or a stop signal."""
        flags = torch.stack([(~self._finite).float(), torch.tensor(float(bool(self.stop_signal.signum)),
                                                                   device=self._finite.device)])
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, 'sum')
        nonfinite, stop = (flags > 0).tolist()
        self._finite = None
        self.stop_requested = stop
        if nonfinite:
            raise NonFiniteLossError(
                f'non-finite loss ({loss.item():.4g}) at step {self.state.step + 1}; stopped before the update and '
                f'saved nothing. Last good checkpoint: {latest_checkpoint(self.out) or "none"}. '
                f'Try a lower lr (was {self.lr:g}), grad_clip, or mixed_precision=no.')

    def after_step(self, epoch: int) -> bool:
        """Count the optimizer step, update the EMA, then log / checkpoint / evaluate when due. True: stop now."""
        cfg, state = self.cfg, self.state
        state.step += 1
        now = time.perf_counter()
        state.elapsed_s += now - self._clock
        self._clock = now
        if self.ema is not None:
            self.ema.update(self.unwrapped, step=state.step)
        self.progress.update(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.steps:
            self._log_train(epoch)
        if state.step % cfg.checkpoint_every == 0:
            self.save_checkpoint()
        if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
            self._log_evaluation()
            self.window_start, self.window_images = time.perf_counter(), 0
        if self.stop_requested:
            self.interrupted = self.stop_signal.signum or signal.SIGTERM
            self.save_checkpoint(reason=f'signal {int(self.interrupted)}')
            self.log.write(dict(type='stop', signal=int(self.interrupted), step=state.step), state.step)
            _logger.warning(f'stopped by signal {self.interrupted} at step {state.step}; checkpoint saved')
            return True
        return False

    def _log_train(self, epoch: int) -> None:
        """Window means of the step numbers (one synchronisation), to log.jsonl and the trackers."""
        elapsed = time.perf_counter() - self.window_start
        means = self.meter.means(self.accelerator)
        layers = means.pop('layers')
        self.meter.reset()
        soft = {n: {k: m[k] for k in ('dispatch_entropy', 'combine_entropy', 'slot_similarity')}  # Soft MoE layers
                for n, m in layers.items() if 'dispatch_entropy' in m}
        self.log.write(dict(
            type='train', step=self.state.step, epoch=epoch, elapsed_s=self.state.elapsed_s, **means,
            lr=learning_rate(self.state.step - 1, self.cfg, self.lr), images_per_s=self.window_images / elapsed,
            expert_load={n: m['expert_load'] for n, m in layers.items()},
            importance={n: m['importance'] for n, m in layers.items()}, **(dict(soft_routing=soft) if soft else {})),
            step=self.state.step)
        self.progress.set_postfix(loss=f'{means["loss"]:.3f}')
        self._log_bad_images()
        self.window_start, self.window_images = time.perf_counter(), 0

    def _log_bad_images(self) -> None:
        """Unreadable images recorded since the last call (by any process or worker) into log.jsonl."""
        for entry in self.bad_images.entries():
            if entry['path'] not in self._logged_bad_images:
                self._logged_bad_images.add(entry['path'])
                self.log.write(dict(type='bad_image', step=self.state.step, **entry), step=self.state.step)

    def save_checkpoint(self, reason: str = 'interval') -> None:
        """Write `checkpoint_step_<step>` atomically, then keep the newest `keep_checkpoints`; log its time and size."""
        if self.last_saved == self.state.step:
            return
        self.state.log_window = self.meter.window_state(self.accelerator)  # a resumed log reads as one run
        if self.accelerator.scaler is not None:
            self.state.loss_scale = self.accelerator.scaler.state_dict()
        start = time.perf_counter()
        folder = write_checkpoint(self.accelerator, self.out, self.state.step, self.cfg.to_yaml(), save=partial(
            save_training_state, train_state=self.state, unwrapped=self.unwrapped,
            optimizer=self.optimizer.optimizer, ema=self.ema, parallel=self.parallel, is_main=self.main))
        seconds = time.perf_counter() - start
        if self.main:
            size = sum(f.stat().st_size for f in folder.rglob('*') if f.is_file())
            self.log.write(dict(type='checkpoint', step=self.state.step, reason=reason, seconds=round(seconds, 3),
                                bytes=size, path=str(folder)), self.state.step)
            prune_checkpoints(self.out, self.cfg.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        self.last_saved = self.state.step

    def evaluate(self) -> Dict[str, Any]:
        """The raw model's evaluation, with `ema_` keys for the EMA weights' when EMA is on."""
        result = evaluate(self.model, self.val_loader, self.accelerator, self.num_classes)
        if self.sharded_ema:
            with self.ema.weights_in(self.unwrapped):  # the prepared (sharded) model holds the EMA weights meanwhile
                ema = evaluate(self.model, self.val_loader, self.accelerator, self.num_classes)
            result.update({f'ema_{k}': v for k, v in ema.items() if k not in ('layers', 'num_excluded')})
        elif self.ema is not None:
            with self.accelerator.autocast():  # the raw model's forward is wrapped in it by `prepare`; the EMA's is not
                ema = evaluate(self.ema.module, self.val_loader, self.accelerator, self.num_classes)
            result.update({f'ema_{k}': v for k, v in ema.items() if k not in ('layers', 'num_excluded')})
        return result

    def _log_evaluation(self) -> Dict[str, Any]:
        result = self.evaluate()
        self._log_bad_images()
        excluded = [e['path'] for e in self.bad_images.entries() if e.get('split') == self.cfg.val_split]
        self.log.write(dict(type='eval', step=self.state.step, elapsed_s=self.state.elapsed_s, excluded=excluded,
                            **result), step=self.state.step)
        return dict(result, excluded=excluded)

    # ------------------------------------------------------------------------------------------ the end
    def finish(self) -> Dict[str, Any]:
        """Save and evaluate the final model (unless interrupted); close logs; return the run summary."""
        final_eval = None
        if not self.interrupted:
            self.save_checkpoint(reason='final')
            final_eval = self._log_evaluation()
            self.accelerator.wait_for_everyone()
            # the whole weights, every expert included: gathered from every process (a collective)
            full_state = self.parallel.full_state_dict(self.model, self.unwrapped)
            ema_state = self.parallel.full_state_dict(self.model, self.unwrapped, self.ema) if self.ema else None
            if self.main:
                self._save_model(self.unwrapped, self.out / 'model', full_state)
                if ema_state is not None:
                    self._save_model(self.unwrapped, self.out / 'model_ema', ema_state)
        self._log_bad_images()
        self.accelerator.end_training()
        self.log.close()
        self.run_lock.release()
        return dict(
            step=self.state.step, interrupted=int(self.interrupted), eval=final_eval, output_dir=str(self.out),
            main_process=self.main,
            model_dir=str(self.out / 'model'), ema_model_dir=str(self.out / 'model_ema') if self.ema else None,
            checkpoint=str(latest_checkpoint(self.out)), num_classes=self.num_classes,
            skipped_images=sorted(e['path'] for e in self.bad_images.entries()),
            params=sum(p.numel() for p in self.unwrapped.parameters()),
        )

    def _save_model(self, model: torch.nn.Module, folder: Path, state_dict=None) -> None:
        """model.safetensors + timm config.json (model args, data config, label names), written atomically."""
        class_to_idx = self.train_set.class_to_idx
        save_trained_model(model, folder, label_names=sorted(class_to_idx, key=class_to_idx.get),
                           data_config=self.data_config, model_args=self.cfg.model_kwargs, source=self.cfg.pretrained,
                           state_dict=state_dict)


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run training as `cfg` says; returns a summary (final eval, paths, whether it was interrupted)."""
    return Trainer(cfg).fit()
