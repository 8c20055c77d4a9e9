""" Training configuration: flat keys with defaults, loaded from YAML, overridable on the command line.

Every key of `TrainConfig` can be set in a YAML file (`--config X.yaml`) and overridden as `--key value`
(values parsed as YAML, so `--model-kwargs '{num_experts: 8}'` and `--mixup 0.2` both work). A mapping-valued key
(`model_kwargs`) given on the command line is merged into the file's mapping key by key, as the sweeps merge it; a
key given as null is removed from it (`--model-kwargs '{capacity_factor: null}'`: the model's default applies).
YAML 1.1 reads `no` / `off` as false and `yes` / `on` as true: a text key given so gets the text back
(`--mixed-precision no`).
"""
import argparse
import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

__all__ = ['TrainConfig', 'load_config', 'parse_train_args', 'ConfigError', 'RESUMABLE_CHANGES', 'resume_conflicts',
           'merge_mapping', 'scaled_lr', 'signal_number']


class ConfigError(ValueError):
    """A config key or value that cannot be used."""


@dataclass
class TrainConfig:
    # model
    model: str = 'vit_b16_moe_upcycled'  # any timm / vit_moe registered name
    pretrained: Optional[str] = None  # None, 'default' (timm's Hub weights), a local file, or 'hf-hub:org/name'
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. {num_experts: 32, capacity_factor: 2.0}
    # data (ImageNet-style folders: data_dir/<train_split>/<class>/*.jpg)
    data_dir: Optional[str] = None
    train_split: str = 'train'
    val_split: str = 'val'
    input_size: Optional[List[int]] = None  # default: the model's pretrained_cfg / patch_embed image size
    batch_size: int = 64  # per process
    eval_batch_size: Optional[int] = None  # default: batch_size
    num_workers: int = 2
    bad_image_policy: str = 'skip'  # 'skip' (warn naming the file, use the next image) or 'error' (stop)
    verify_images: bool = False  # open every image once before training (catches corrupt files up front)
    # augmentation
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop scale
    hflip: float = 0.5
    color_jitter: float = 0.4
    rand_augment: Optional[str] = None  # timm auto_augment string, e.g. 'rand-m9-mstd0.5-inc1'
    mixup: float = 0.0  # mixup alpha (0 = off)
    cutmix: float = 0.0  # cutmix alpha (0 = off)
    label_smoothing: float = 0.0
    # optimisation
    steps: int = 1000  # optimizer steps for this run (after gradient accumulation)
    lr: float = 1e-3  # peak learning rate; with lr_base_size, the lr at that global batch
    lr_base_size: Optional[int] = None  # global batch `lr` is given for (timm's --lr-base-size); None: lr as given
    lr_base_scale: str = 'linear'  # lr * (global batch / lr_base_size), or its square root ('sqrt', for Adam-type)
    weight_decay: float = 0.05
    opt: str = 'adamw'  # any timm optimizer name
    opt_betas: Optional[List[float]] = None  # Adam-type betas, e.g. [0.9, 0.999] (default: the optimizer's)
    opt_eps: Optional[float] = None  # Adam-type eps (default: the optimizer's)
    layer_decay: Optional[float] = None  # layer-wise lr decay (timm), e.g. 0.75; None = off
    router_lr_mult: float = 1.0  # lr multiplier for the MoE routers
    grad_clip: Optional[float] = 1.0  # max global grad norm (None = off)
    grad_accum_steps: int = 1
    mixed_precision: Optional[str] = None  # 'no', 'bf16', 'fp16'; None: as launched (accelerate config), else 'no'
    schedule: str = 'rsqrt'  # 'rsqrt' (the paper's inverse square root), 'cosine', 'constant'
    warmup_steps: int = 0
    step_offset: int = 0  # rsqrt: continue the dense run's schedule from this step count
    cooldown_steps: int = 0  # rsqrt: linear decay to 0 over the last N steps (0 = off)
    min_lr: float = 0.0  # cosine floor
    find_unused_parameters: bool = False  # DDP; stacked experts always take part in the graph
    # expert parallelism: each MoE layer's experts spread over groups of N processes (E / N each), exchanged by
    # all-to-alls of static size; N divides the processes and every MoE layer's num_experts
    expert_parallel_size: int = 1
    grad_checkpointing: bool = False  # timm's set_grad_checkpointing: recompute blocks in the backward
    torch_compile: Optional[str] = None  # torch.compile mode ('default', 'reduce-overhead', 'max-autotune'); None = off
    torch_compile_backend: str = 'inductor'  # torch.compile backend (Accelerate's dynamo plugin)
    seed: int = 0  # model init and data order; dropout / drop-path / mixup draw from seed + process index
    # EMA of the weights (timm ModelEmaV3), evaluated beside the raw weights and saved as model_ema/
    ema_decay: Optional[float] = None  # e.g. 0.9998; None = off
    ema_warmup: bool = False  # timm's EMA warm-up: decay grows from 0 towards ema_decay over the first steps
    # checkpoints and logging
    output_dir: str = 'outputs/run'
    checkpoint_every: int = 500  # save a checkpoint every N steps (and at the end, and on SIGTERM / Ctrl-C)
    # early warning before a kill (SLURM --signal=USR1@120): save at the next step boundary and stop, like SIGTERM,
    # but early enough for a large save; null: not handled
    save_signal: Optional[str] = 'SIGUSR1'
    keep_checkpoints: int = 3  # keep the newest K (by step)
    # 'latest' (newest complete checkpoint in output_dir, which must exist), 'auto' (latest if there is one,
    # else start), or a checkpoint folder. Without it a run refuses an output_dir that holds checkpoints.
    resume: Optional[str] = None
    eval_every: int = 0  # evaluate every N steps (0 = at the end only)
    eval_at_start: bool = False  # also evaluate before the first step (e.g. right after upcycling)
    log_every: int = 10
    trackers: Optional[str] = 'auto'  # Accelerate trackers: 'auto' (tensorboard if installed), 'none', a name
    progress: bool = True  # tqdm progress bar

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if self.torch_compile in ('off', 'none', 'no', False):
            self.torch_compile = None
        compile_modes = ('default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs')
        if self.torch_compile is not None and self.torch_compile not in compile_modes:
            raise ConfigError(f'torch_compile={self.torch_compile!r} is not valid; accepted: '
                              f'{", ".join(compile_modes)} or off')
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f'layer_decay={self.layer_decay!r} is not valid; expected a number in (0, 1] or null')
        if self.opt_betas is not None and (len(self.opt_betas) != 2 or not all(0 <= b < 1 for b in self.opt_betas)):
            raise ConfigError(f'opt_betas={self.opt_betas!r} is not valid; expected two numbers in [0, 1)')
        if not self.router_lr_mult > 0:
            raise ConfigError(f'router_lr_mult={self.router_lr_mult!r} is not valid; expected a number > 0')
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f'ema_decay={self.ema_decay!r} is not valid; expected a number in (0, 1) or null (off)')
        if self.mixed_precision is False:  # YAML 1.1 reads `no` as false
            self.mixed_precision = 'no'
        choices = dict(
            bad_image_policy=('skip', 'error'), mixed_precision=(None, 'no', 'bf16', 'fp16'),
            schedule=('rsqrt', 'cosine', 'constant'), lr_base_scale=('linear', 'sqrt'))
        for key, accepted in choices.items():
            if getattr(self, key) not in accepted:
                raise ConfigError(f'{key}={getattr(self, key)!r} is not valid; accepted: '
                                  f'{", ".join(str(a) for a in accepted if a is not None)}')
        positive = ('steps', 'batch_size', 'grad_accum_steps', 'checkpoint_every', 'keep_checkpoints', 'log_every',
                    'expert_parallel_size')
        for key in positive:
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f'{key}={getattr(self, key)!r} is not valid; expected an integer >= 1')
        for key in ('lr', 'weight_decay', 'mixup', 'cutmix', 'label_smoothing', 'warmup_steps', 'step_offset'):
            if getattr(self, key) < 0:
                raise ConfigError(f'{key}={getattr(self, key)!r} is not valid; expected >= 0')
        if not isinstance(self.model_kwargs, dict):
            raise ConfigError(f'model_kwargs={self.model_kwargs!r} is not valid; expected a mapping')
        if self.lr_base_size is not None and (not isinstance(self.lr_base_size, int) or self.lr_base_size < 1):
            raise ConfigError(f'lr_base_size={self.lr_base_size!r} is not valid; expected an integer >= 1 or null')
        if self.save_signal in (None, False, 'none', 'null', 'off'):
            self.save_signal = None
        else:
            signal_number(self.save_signal)  # a bad name is refused here

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def scaled_lr(cfg: TrainConfig, global_batch: int) -> float:
    """The peak lr of a run whose optimizer step sums `global_batch` images: `cfg.lr` as given, or, with
    `lr_base_size`, scaled linearly (or by the square root) from that batch to this one (timm's --lr-base rule)."""
    if cfg.lr_base_size is None:
        return cfg.lr
    ratio = global_batch / cfg.lr_base_size
    return cfg.lr * (ratio if cfg.lr_base_scale == 'linear' else ratio ** 0.5)


def signal_number(name: str) -> int:
    """The signal `name` names ('SIGUSR1', 'USR1', 10); a one-line error naming the accepted ones otherwise."""
    import signal
    text = str(name).upper()
    try:
        return int(signal.Signals(int(text)) if text.isdigit() else signal.Signals[
            text if text.startswith('SIG') else 'SIG' + text])
    except (KeyError, ValueError):
        raise ConfigError(f'save_signal={name!r} is not a signal; accepted: a name such as SIGUSR1, SIGUSR2, SIGHUP '
                          f'(SLURM --signal=USR1@120), or null') from None


def merge_mapping(base: Optional[Dict[str, Any]], override: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """`base` updated key by key with `override`; a key whose override is None is removed."""
    merged = dict(base or {})
    for key, value in (override or {}).items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


# keys that may differ when a run is resumed: they change neither the model nor the data order nor the updates
RESUMABLE_CHANGES = frozenset({
    'steps', 'resume', 'output_dir', 'data_dir', 'num_workers', 'verify_images', 'bad_image_policy',
    'eval_batch_size', 'checkpoint_every', 'keep_checkpoints', 'eval_every', 'log_every', 'trackers', 'progress',
    'cooldown_steps', 'eval_at_start', 'save_signal', 'expert_parallel_size',
})


def resume_conflicts(saved: Dict[str, Any], current: Dict[str, Any]) -> Dict[str, Any]:
    """key -> (checkpoint's value, current value) for the keys that must not change on resume."""
    return {k: (saved.get(k), current.get(k)) for k in sorted(set(saved) | set(current))
            if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k)}


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_MAPPING_KEYS = ('model_kwargs',)


def _check_keys(values: Dict[str, Any], source: str) -> None:
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        close = {key: difflib.get_close_matches(key, _FIELDS, n=1, cutoff=0.6) for key in unknown}
        hints = [f'{key} -> {match[0]}' for key, match in close.items() if match]
        hint = f'; did you mean {", ".join(hints)}?' if hints else ''
        raise ConfigError(f'unknown config key(s) {unknown} in {source}{hint} (accepted keys: {", ".join(_FIELDS)})')


def _coerce(name: str, value: Any) -> Any:
    """Numbers given as YAML strings ('3e-4' is a string in YAML 1.1) become the field's number type; a text key
    that YAML read as a boolean (`no`, `off`, `yes`, `on`) becomes 'no' / 'yes'."""
    kind = typing.get_type_hints(TrainConfig)[name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    base = args[0] if typing.get_origin(kind) is typing.Union and len(args) == 1 else kind
    if base is str and isinstance(value, bool):
        return 'yes' if value else 'no'
    if value is None or base not in (int, float) or isinstance(value, bool):
        return value
    try:
        number = float(value)
        if base is int and not number.is_integer():
            raise ValueError
        return base(number)
    except (TypeError, ValueError):
        raise ConfigError(f'{name}={value!r} is not valid; expected {"an integer" if base is int else "a number"}')


def read_yaml(path, what: str, error: type) -> Any:
    """The YAML document at `path`; a missing file or bad YAML raises `error` naming `what` and the path."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise error(f'{what} {str(path)!r} does not exist') from None
    except yaml.YAMLError as e:
        raise error(f'{what} {str(path)!r} is not valid YAML: {e}') from None


def load_config(path: Optional[str] = None, overrides: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """TrainConfig from defaults, then the YAML file at `path`, then `overrides`."""
    values: Dict[str, Any] = {}
    if path:
        loaded = read_yaml(path, 'config file', ConfigError) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f'config file {path!r} must hold a mapping of keys to values')
        _check_keys(loaded, path)
        values.update(loaded)
    overrides = dict(overrides or {})
    _check_keys(overrides, 'command-line overrides')
    for key in _MAPPING_KEYS:  # merged key by key, as the sweeps merge them; null removes a key
        if key in overrides and isinstance(overrides[key], dict) and isinstance(values.get(key), dict):
            overrides[key] = merge_mapping(values[key], overrides[key])
    values.update(overrides)
    values = {k: _coerce(k, v) for k, v in values.items()}
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise ConfigError(str(e)) from None


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_train_args(argv: Optional[Sequence[str]] = None, description: str = '') -> TrainConfig:
    """`--config X.yaml` plus `--any-key value` overrides for every TrainConfig key."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--config', help='YAML file of TrainConfig keys')
    for name, f in _FIELDS.items():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = sorted({f'--{name.replace("_", "-")}', f'--{name}'})
        parser.add_argument(
            *flags, dest=name, type=_yaml_value, default=argparse.SUPPRESS,
            metavar='V', help=f'(default {default!r})')
    args = vars(parser.parse_args(argv))
    config_path = args.pop('config', None)
    return load_config(config_path, args)
