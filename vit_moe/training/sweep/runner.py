""" Running a sweep: each run's state from its folder (new, interrupted, finished, diverged, changed), the runs
that are not finished trained in order, in this process or in processes a launcher starts, and a finished run's
numbers read from its log.
"""
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import yaml

from ..._files import atomic_write
from ...data import STOP_SIGNALS
from ..checkpoints import checkpoint_step, latest_checkpoint
from ..config import resume_conflicts
from ..loop import NonFiniteLossError, train
from .spec import RESULT_FILE, Run, Sweep, SweepError

@dataclass
class RunStatus:
    state: str  # 'new', 'interrupted', 'finished', 'diverged', 'changed'
    step: int = 0  # steps done (newest checkpoint, or the finished step)
    detail: str = ''


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _log_records(out: Path) -> List[Dict[str, Any]]:
    records = []
    try:
        lines = (out / 'log.jsonl').read_text().splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(record, dict):
            records.append(record)
    return records


def _finished_by_log(out: Path, steps: int) -> bool:
    latest = latest_checkpoint(out)
    return ((out / 'model' / 'model.safetensors').is_file() and latest is not None
            and checkpoint_step(latest) == steps
            and any(r.get('type') == 'eval' and r.get('step') == steps for r in _log_records(out)))


def _count_params(model_dir: Path) -> Optional[int]:
    from safetensors import safe_open
    try:
        with safe_open(str(model_dir / 'model.safetensors'), 'pt') as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    except OSError:
        return None


def run_status(run: Run) -> RunStatus:
    """Where `run` stands in its folder (see the module doc); 'changed' says which settings differ."""
    out, steps = Path(run.cfg.output_dir), run.cfg.steps
    result = _read_json(out / RESULT_FILE)
    latest = latest_checkpoint(out)
    done = max(checkpoint_step(latest) if latest else 0, (result or {}).get('step', 0) or 0)
    if result is None and latest is None and not (out / 'model').exists():
        return RunStatus('new')
    saved = _read_yaml_mapping((latest or out) / 'config.yaml')  # what the run would resume with
    conflicts = resume_conflicts(saved, run.cfg.to_dict()) if saved is not None else {}
    if conflicts:
        changes = '; '.join(f'{k}: {old!r} -> {new!r}' for k, (old, new) in conflicts.items())
        return RunStatus('changed', done, changes)
    if result and result.get('status') == 'diverged' and result.get('steps') == steps:
        return RunStatus('diverged', result.get('step', 0), result.get('error', ''))
    if done > steps:
        return RunStatus('changed', done, f'it has run {done} steps, more than the configured steps {steps}')
    finished = result and result.get('status') == 'finished' and result.get('step') == steps
    if (out / 'model' / 'model.safetensors').is_file() if finished else _finished_by_log(out, steps):
        return RunStatus('finished', steps)
    return RunStatus('interrupted' if done else 'new', done)


def _read_yaml_mapping(path: Path) -> Optional[Dict[str, Any]]:
    try:
        value = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return value if isinstance(value, dict) else None


def _changed_error(run: Run, status: RunStatus, others: int = 0) -> SweepError:
    more = f' (and {others} other run(s))' if others else ''
    return SweepError(f'{run.label} in {run.cfg.output_dir} was run with other settings than the sweep config now '
                      f'gives ({status.detail}){more}: the config changed since; restore it, give another --output, '
                      f'or remove that folder to rerun it')


def plan(sweep: Sweep, only: Optional[Sequence[str]] = None) -> List[Tuple[Run, RunStatus]]:
    """Every run the sweep (or the cells in `only`) needs, dense stage first, with its status."""
    cells = sweep.select(only)
    runs = ([sweep.dense] if sweep.dense and cells else []) + [r for c in cells for r in c.runs]
    return [(run, run_status(run)) for run in runs]


def _write_result(run: Run, **values) -> None:
    out = Path(run.cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / RESULT_FILE, json.dumps(dict(cell=run.cell, seed=run.seed, steps=run.cfg.steps, **values),
                                               indent=1))


def _prepare_data(sweep: Sweep) -> None:
    if sweep.data == 'digits':
        from ...data import write_digits_image_folder
        write_digits_image_folder(str(sweep.output_dir / 'data'))


def _train_in_process(run: Run) -> Dict[str, Any]:
    """{'status': 'finished' | 'diverged' | 'interrupted', ...} of one run trained by `train()` here."""
    try:
        summary = train(run.cfg)
    except NonFiniteLossError as e:
        if run.seed is None:
            raise  # the dense stage: nothing can go on without it
        return dict(status='diverged', error=str(e).split(';')[0])
    if summary['interrupted']:
        return dict(status='interrupted', signal=summary['interrupted'], step=summary['step'])
    return dict(status='finished', params=summary['params'], top1=summary['eval']['top1'])


RUN_CONFIG = 'sweep_run_config.yaml'  # the resolved TrainConfig a --launcher run is started with


def _train_in_subprocess(run: Run, command: Sequence[str]) -> Dict[str, Any]:
    """The same as `_train_in_process`, by `command + ['--config', <the run's resolved config>]` (e.g. accelerate
    launch ... train_scripts/train.py): every run gets fresh processes (and process group). SIGTERM / Ctrl-C
    reach the run, which saves a checkpoint; a non-finite loss is its one-line error naming it."""
    out = Path(run.cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / RUN_CONFIG, run.cfg.to_yaml())
    process = subprocess.Popen(list(command) + ['--config', str(out / RUN_CONFIG)], stderr=subprocess.PIPE,
                               text=True, errors='replace', start_new_session=True)
    received = []

    def forward(signum, frame):
        received.append(signum)
        process.send_signal(signum)

    tail: List[str] = []
    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    try:
        for line in process.stderr:  # shown as it comes; the last lines kept for the outcome
            sys.stderr.write(line)
            tail = (tail + [line.rstrip()])[-20:]
        code = process.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received or code in (128 + signal.SIGTERM, 128 + signal.SIGINT):
        latest = latest_checkpoint(out)
        return dict(status='interrupted', signal=received[0] if received else code - 128,
                    step=checkpoint_step(latest) if latest else 0)
    error = next((line for line in reversed(tail) if line.strip()), '')
    if code == 2 and 'non-finite loss' in error and run.seed is not None:
        return dict(status='diverged', error=error.split('error: ', 1)[-1].split(';')[0])
    if code != 0 or run_status(run).state != 'finished':
        raise SweepError(f'{run.label}: `{" ".join(command)}` failed (exit code {code}): {error or "no message"}')
    return dict(status='finished', params=_count_params(out / 'model'), top1=read_run(out, run.cfg.steps)['top1'])


def run_sweep(sweep: Sweep, only: Optional[Sequence[str]] = None,
              say: Callable[[str], None] = lambda text: print(text, flush=True),
              command: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train every run that is not finished, in order (dense stage, baseline, cells; seeds within a cell).

    Every run's status is checked before anything trains: a changed one is an error. Runs train in this process
    (`train()`), or with `command` in their own: `command + ['--config', path]` (multi-GPU: an `accelerate launch
    ... train_scripts/train.py` command; the sweep itself stays one process). A run stopped by SIGTERM / Ctrl-C
    ends the sweep: {'interrupted': signal, 'run': label, 'step': ...}; run the sweep again to resume it.
    """
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise SweepError('the sweep runs as one process: start it with python, not accelerate launch / torchrun, '
                         'and give the launch command for the runs (train_scripts/sweep.py --launcher '
                         '"accelerate launch ...")')
    planned = plan(sweep, only)
    changed = [(run, status) for run, status in planned if status.state == 'changed']
    if changed:
        raise _changed_error(*changed[0], others=len(changed) - 1)
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(sweep.output_dir / 'sweep.yaml', sweep.path.read_text())
    _prepare_data(sweep)
    ran, skipped = [], []
    for index, (run, _) in enumerate(planned, 1):
        status = run_status(run)
        head = f'[{index}/{len(planned)}] {run.label}'
        if status.state in ('finished', 'diverged'):
            say(f'{head}: {status.state}, skipped')
            skipped.append(run.label)
            continue
        if status.state == 'changed':  # checked above; a run changed on disk meanwhile
            raise _changed_error(run, status)
        how = f'resuming from step {status.step}' if status.state == 'interrupted' else 'starting'
        say(f'{head}: {how} -> {run.cfg.output_dir} ({run.cfg.steps} steps)')
        start = time.perf_counter()
        outcome = _train_in_subprocess(run, command) if command else _train_in_process(run)
        if outcome['status'] == 'interrupted':
            return dict(interrupted=outcome['signal'], run=run.label, step=outcome['step'], ran=ran, skipped=skipped)
        ran.append(run.label)
        if outcome['status'] == 'diverged':
            _write_result(run, status='diverged', step=_newest_step(run), error=outcome['error'])
            say(f'{head}: diverged ({outcome["error"]}); recorded, going on')
            continue
        wall = time.perf_counter() - start
        _write_result(run, status='finished', step=run.cfg.steps, params=outcome['params'], top1=outcome['top1'],
                      wall_s=wall)
        say(f'{head}: top-1 {outcome["top1"]:.2f} after {run.cfg.steps} steps ({wall:.0f} s)')
    return dict(interrupted=0, run=None, step=None, ran=ran, skipped=skipped)


def _newest_step(run: Run) -> int:
    steps = [r.get('step', 0) for r in _log_records(Path(run.cfg.output_dir)) if r.get('type') == 'train']
    return max(steps, default=0)


def read_run(out, steps: int) -> Dict[str, Any]:
    """One finished run's numbers from its log: final eval, last train loss, images/s, the eval curve."""
    out = Path(out)
    records = [r for r in _log_records(out) if (r.get('step') or 0) <= steps]
    evals = {r['step']: r for r in records if r.get('type') == 'eval'}  # the last record of a step wins
    final = evals.get(steps)
    if final is None:
        raise SweepError(f'{out}: no eval record at step {steps} in log.jsonl')
    trains = [r for r in records if r.get('type') == 'train']
    rates, after_start = [], False
    for r in records:  # the first window after a (re)start holds the start-up: left out when there are others
        if r.get('type') == 'start':
            after_start = True
        elif r.get('type') == 'train':
            if not after_start:
                rates.append(r['images_per_s'])
            after_start = False
    rates = rates or [r['images_per_s'] for r in trains]
    result = _read_json(out / RESULT_FILE) or {}
    params = result.get('params') or _count_params(out / 'model')
    return dict(
        top1=final['top1'], top5=final.get('top5'), val_loss=final.get('loss'),
        train_loss=trains[-1]['loss'] if trains else None,
        images_per_s=statistics.fmean(rates) if rates else None, train_time_s=final.get('elapsed_s'),
        params=params, steps=steps,
        curve=[(s, evals[s].get('elapsed_s'), evals[s]['top1']) for s in sorted(evals)])
