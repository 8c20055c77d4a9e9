""" Learning-rate schedules as pure functions of the step (nothing to checkpoint, resume is exact).

* 'rsqrt': the Sparse Upcycling paper's inverse square root, lr * sqrt(warmup / max(step, warmup)) with linear
  warm-up; `step_offset` continues a dense run's schedule (the MoE run starts where the dense one stopped), and
  an optional linear cool-down to 0 over the last steps.
* 'cosine': linear warm-up then cosine decay to `min_lr`.
* 'constant': linear warm-up then constant.
"""
import math
from typing import Optional

__all__ = ['learning_rate']


def learning_rate(step: int, cfg, lr: Optional[float] = None) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `cfg.steps` steps, peaking at `lr` (default
    `cfg.lr`; the trainer passes it scaled to the global batch, `config.scaled_lr`)."""
    base, warmup = (cfg.lr if lr is None else lr), cfg.warmup_steps
    if cfg.schedule == 'rsqrt':
        global_step = step + cfg.step_offset + 1  # 1-based position in the whole (dense + MoE) schedule
        if global_step <= warmup:
            return base * global_step / warmup
        lr = base * math.sqrt(max(warmup, 1) / global_step)
        if cfg.cooldown_steps and step >= cfg.steps - cfg.cooldown_steps:
            lr *= (cfg.steps - step) / (cfg.cooldown_steps + 1)
        return lr
    if step < warmup:
        return base * (step + 1) / warmup
    if cfg.schedule == 'constant':
        return base
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.min_lr + 0.5 * (base - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))
