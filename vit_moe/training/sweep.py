""" Ablation sweeps: a grid of trainer settings over a common base, several seeds per cell, resumable, reported as
a results table (markdown + CSV) and accuracy curves (against extra training steps and against wall-clock time).

    sweep = load_sweep('configs/sweeps/digits_small.yaml')       # validates every run's config up front
    outcome = run_sweep(sweep)                                   # runs what is not finished, in order
    paths = write_report(sweep)                                  # results.md / .csv, runs.csv, two PNGs

A sweep YAML (paths of trainer configs are relative to the sweep file; other paths to the working directory):

    name: digits_small               # default: the file's stem
    output_dir: outputs/sweeps/x     # default: outputs/sweeps/<name>; --output overrides
    data: digits                     # optional: write scikit-learn's digits to <output_dir>/data, every run's data_dir
    seeds: [0, 1]                    # every cell (and the baseline) runs once per seed; --seeds overrides
    common: {eval_every: 20}         # trainer keys for EVERY run: dense stage, baseline and cells
    dense:                           # optional: the dense model the cells upcycle, either trained here once ...
      config: ../digits_dense.yaml   #   ... into <output_dir>/dense (resumable, shared by all cells)
      set: {steps: 200}              #   ... with these keys over `config` (and `common`)
      # pretrained: path/model       # ... or an existing one (then `step_offset: N` = its step count, optional)
    base: ../digits_moe.yaml         # the cells' trainer config
    set: {steps: 100}                # trainer keys over base + common for every cell
    grid:                            # cartesian product, first axis slowest; one cell per combination
      model_kwargs.num_experts: [4, 8]   # a trainer key or model_kwargs.<kwarg>: a list of values
      model_kwargs: {capacity_factor: [1.0, 2.0]}   # a model_kwargs sub-grid: one axis per kwarg
      routing:                       # any other name: a list of mappings (keys that change together)
        - {model_kwargs.router: expert_choice}
        - {model_kwargs.router: token_choice, model_kwargs.capacity_factor: 1.0}
    baseline:                        # optional: the dense continuation, cell `dense_continued`
      config: ../digits_dense.yaml   # default: dense.config, else base with model = the MoE model's dense source
      set: {}                        # trainer keys over config + common

`model_kwargs` is merged key by key at every level (base <- common <- set <- grid), never replaced; dotted keys
(`model_kwargs.num_experts`) and nested mappings are equivalent. The sweep sets `output_dir`
(`<output_dir>/<cell>/seed_<s>`), `seed`, `resume: auto`, and, with a dense stage, `pretrained` (its model) and
`step_offset` (its step_offset + steps: the rsqrt schedule continues). The baseline gets the cells' `steps` (the
same number of extra steps) and loses the MoE-only model kwargs (num_experts, router, ...).

Cell names are `key=value` pairs joined by commas (`num_experts=8,capacity_factor=2.0`; model_kwargs keys without
their prefix), usable as folder names; `dense_continued` is the baseline.

Runs train one after another in this process (`train()`: CPU, one GPU), or, with `run_sweep(command=...)`
(train_scripts/sweep.py --launcher "accelerate launch ..."), each in its own processes started by
`command + ['--config', <run folder>/sweep_run_config.yaml]`: the way to run a sweep on several GPUs, since
Accelerate's `end_training()` tears the process group down after every run. The sweep itself is one process.

A run is FINISHED when its `sweep_result.json` (written by the sweep when the run ends) names the configured steps
and `model/model.safetensors` is present, or, without that file, when `model/model.safetensors` is present, the
log holds an eval record at the configured step and the newest checkpoint is at that step: it is not run again.
Anything else with a checkpoint is INTERRUPTED and resumes in place from its newest complete checkpoint (a run
that finished with fewer steps than now configured continues to the new count). A run that holds a checkpoint or a
model and was made with other settings than the sweep config now gives (any key but steps, data location,
logging, checkpointing and evaluation ones) is CHANGED: the sweep refuses it, naming the cell and the keys, before
training anything. A run whose loss became non-finite is recorded as diverged and not rerun.
"""
import csv
import difflib
import io
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from .._files import atomic_write
from ..data import STOP_SIGNALS
from ..layers import MOE_OPTIONS
from .checkpoints import checkpoint_step, latest_checkpoint
from .config import (
    _FIELDS, ConfigError, TrainConfig, _coerce, load_config, merge_mapping, read_yaml, resume_conflicts,
)
from .loop import NonFiniteLossError, train

__all__ = [
    'SweepError', 'Run', 'Cell', 'Sweep', 'RunStatus', 'load_sweep', 'expand_grid', 'cell_name', 'merge_settings',
    'flatten_settings', 'run_status', 'plan', 'run_sweep', 'read_run', 'collect_results', 'mean_curve', 'aggregate',
    'format_markdown', 'write_report', 'plot_curves', 'BASELINE', 'RESULT_FILE',
]

SWEEP_KEYS = ('name', 'output_dir', 'data', 'seeds', 'common', 'dense', 'base', 'set', 'grid', 'baseline')
BASELINE = 'dense_continued'  # the dense continuation's cell name (never a grid name: those hold '=')
DENSE_STAGE = 'dense'  # the dense stage's folder in the sweep's output_dir
RESULT_FILE = 'sweep_result.json'  # written into a run's folder when it ends (finished or diverged)
SET_BY_SWEEP = ('output_dir', 'seed', 'resume')
_MK = 'model_kwargs.'


def _moe_kwargs() -> frozenset:
    """The MoE-only model kwargs (`vit_moe.layers.MOE_OPTIONS`), dropped for the dense baseline."""
    return frozenset(MOE_OPTIONS)


class SweepError(ConfigError):
    """A sweep config that cannot be used, or a run made with other settings than the config now gives."""


@dataclass
class Run:
    cell: str
    seed: Optional[int]  # None for the dense stage (its config's seed)
    cfg: TrainConfig

    @property
    def label(self) -> str:
        return self.cell if self.seed is None else f'{self.cell} seed {self.seed}'


@dataclass
class Cell:
    name: str
    settings: Dict[str, Any]  # the grid assignment, dotted keys ({} for the baseline)
    runs: List[Run]
    baseline: bool = False


@dataclass
class Sweep:
    name: str
    path: Path
    output_dir: Path
    seeds: List[int]
    data: Optional[str]
    dense: Optional[Run]  # the dense stage trained here (None: none, or an existing model)
    cells: List[Cell]  # the baseline first when there is one
    base: str = ''

    def select(self, only: Optional[Sequence[str]] = None) -> List[Cell]:
        """The cells named in `only` (all when empty), in sweep order; an unknown name is an error."""
        names = [c.name for c in self.cells]
        for name in only or ():
            if name not in names:
                close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
                raise SweepError(f'no cell {name!r} in {self.path}; '
                                 + (f'did you mean {", ".join(close)}?' if close else f'cells: {", ".join(names)}'))
        return [c for c in self.cells if not only or c.name in only]


# ------------------------------------------------------------------------------------------ settings and grid
def flatten_settings(settings: Dict[str, Any], where: str) -> Dict[str, Any]:
    """Trainer keys with `model_kwargs: {k: v}` written as `model_kwargs.k: v`; unknown keys are an error."""
    if not isinstance(settings, dict):
        raise SweepError(f'{where} must be a mapping of trainer keys to values, not {settings!r}')
    flat = {}
    for key, value in settings.items():
        if key == 'model_kwargs':
            if not isinstance(value, dict):
                raise SweepError(f'{where}: model_kwargs must be a mapping, not {value!r}')
            flat.update({_MK + str(k): v for k, v in value.items()})
        else:
            _check_trainer_key(key, where)
            flat[key] = value if key.startswith(_MK) else _coerce(key, value)
    return flat


def _check_trainer_key(key: Any, where: str, also: str = '') -> None:
    if isinstance(key, str) and (key in _FIELDS or (key.startswith(_MK) and len(key) > len(_MK))):
        return
    close = difflib.get_close_matches(str(key), list(_FIELDS), n=2, cutoff=0.6)
    hint = f'did you mean {", ".join(close)}? ' if close else ''
    raise SweepError(f'unknown trainer key {key!r} in {where}; {hint}expected a key of vit_moe/training/config.py '
                     f'or model_kwargs.<kwarg>{also}')


def merge_settings(values: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """`values` (trainer keys) updated by `overrides` (flat, dotted model_kwargs keys), model_kwargs merged as the
    command line merges them (`merge_mapping`: a null removes the kwarg)."""
    merged = dict(values, model_kwargs=dict(values.get('model_kwargs') or {}))
    for key, value in overrides.items():
        if key.startswith(_MK):
            merged['model_kwargs'] = merge_mapping(merged['model_kwargs'], {key[len(_MK):]: value})
        elif key == 'model_kwargs':
            merged['model_kwargs'] = merge_mapping(merged['model_kwargs'], value)
        else:
            merged[key] = value
    return merged


def _grid_axes(grid: Any, where: str) -> List[Tuple[str, List[Dict[str, Any]]]]:
    """[(axis name, [flat assignment per value])] from a grid mapping; every mistake is a SweepError."""
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f'{where}: grid is empty; expected a mapping of trainer keys to lists of values, '
                         f'e.g. {{model_kwargs.num_experts: [4, 8]}}')
    axes = []
    for key, values in grid.items():
        if key == 'model_kwargs' and isinstance(values, dict):  # a sub-grid: one axis per model kwarg
            axes += _grid_axes({_MK + str(k): v for k, v in values.items()}, where)
            continue
        if not isinstance(values, list) or not values:
            raise SweepError(f'{where}: grid key {key!r} needs a non-empty list of values, not {values!r}')
        if all(isinstance(v, dict) for v in values):  # a named axis: keys that change together
            assignments = [flatten_settings({'model_kwargs': v} if key == 'model_kwargs' else v,
                                            f'{where}, grid axis {key!r}') for v in values]
        elif key == 'model_kwargs':
            raise SweepError(f'{where}: grid key model_kwargs needs a mapping of kwargs to lists (a sub-grid) or a '
                             f'list of mappings, not {values!r}')
        else:
            _check_trainer_key(key, f'{where}, grid', ' (a named grid axis needs a list of mappings)')
            assignments = [flatten_settings({key: v}, f'{where}, grid') for v in values]
        labels = [_assignment_label(a) for a in assignments]
        repeated = sorted({label for label in labels if labels.count(label) > 1})
        if repeated:
            raise SweepError(f'{where}: grid key {key!r} repeats {", ".join(repeated)}')
        axes.append((key, assignments))
    return axes


def expand_grid(grid: Dict[str, Any], where: str = 'grid') -> List[Dict[str, Any]]:
    """The cartesian product of the grid's axes (first axis slowest): one flat assignment (dotted keys) per cell."""
    axes = _grid_axes(grid, where)
    cells = []
    for combination in itertools.product(*(assignments for _, assignments in axes)):
        assignment = {}
        for part in combination:
            clash = set(assignment) & set(part)
            if clash:
                raise SweepError(f'{where}: {", ".join(sorted(clash))} set by two grid axes')
            assignment.update(part)
        cells.append(assignment)
    return cells


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return yaml.safe_dump(value).split('\n')[0]  # true / false / null
    if isinstance(value, (list, tuple)):
        return '-'.join(_format_value(v) for v in value)
    if isinstance(value, dict):
        return '-'.join(f'{k}_{_format_value(v)}' for k, v in value.items())
    return re.sub(r'[^A-Za-z0-9._+-]', '_', str(value))


def _assignment_label(assignment: Dict[str, Any]) -> str:
    return ','.join(f'{k}={_format_value(v)}' for k, v in assignment.items())


MAX_NAME = 150


def cell_name(assignment: Dict[str, Any]) -> str:
    """`key=value,...` (model_kwargs keys without the prefix), folder-safe; long names end in a hash."""
    short = [k[len(_MK):] if k.startswith(_MK) else k for k in assignment]
    keys = [s if short.count(s) == 1 else k for s, k in zip(short, assignment)]
    name = ','.join(f'{re.sub(r"[^A-Za-z0-9._+-]", "_", k)}={_format_value(v)}'
                    for k, v in zip(keys, assignment.values()))
    if len(name) > MAX_NAME:
        import hashlib
        name = name[:MAX_NAME - 10] + '~' + hashlib.sha1(name.encode()).hexdigest()[:9]
    return name


# ------------------------------------------------------------------------------------------------ loading
def _read_yaml(path: Path) -> Dict[str, Any]:
    loaded = read_yaml(path, 'sweep config', SweepError)
    if not isinstance(loaded, dict):
        raise SweepError(f'sweep config {str(path)!r} must hold a mapping (keys: {", ".join(SWEEP_KEYS)})')
    unknown = [k for k in loaded if k not in SWEEP_KEYS]
    if unknown:
        raise SweepError(f'unknown sweep key(s) {unknown} in {path}; accepted: {", ".join(SWEEP_KEYS)} (trainer keys '
                         f'go under common, set, grid, dense.set or baseline.set)')
    return loaded


def _check_seeds(seeds: Any, where: str) -> List[int]:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise SweepError(f'seeds={seeds!r} in {where} is not valid; expected a non-empty list of integers >= 0')
    if len(set(seeds)) != len(seeds):
        raise SweepError(f'seeds={seeds!r} in {where} repeats a seed')
    return list(seeds)


def _config_path(sweep_path: Path, value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise SweepError(f'{key} in {sweep_path} must be the path of a trainer config (relative to the sweep file)')
    path = (sweep_path.parent / value) if not os.path.isabs(value) else Path(value)
    if not path.is_file():
        raise SweepError(f'{key}={value!r} in {sweep_path}: {str(path)!r} does not exist (paths of trainer configs '
                         f'are relative to the sweep file)')
    return Path(os.path.normpath(path))


def _build_config(config: Path, layers: Sequence[Dict[str, Any]], fixed: Dict[str, Any], where: str,
                  drop_kwargs: Iterable[str] = ()) -> TrainConfig:
    values = load_config(str(config)).to_dict()
    for layer in layers:
        values = merge_settings(values, layer)
    values['model_kwargs'] = {k: v for k, v in values['model_kwargs'].items() if k not in set(drop_kwargs)}
    values.update(fixed)
    try:
        return load_config(None, values)
    except ConfigError as e:
        raise SweepError(f'{where}: {e}') from None


def _section(raw: Dict[str, Any], key: str, allowed: Sequence[str], path: Path) -> Dict[str, Any]:
    section = raw.get(key) or {}
    if section is True:
        section = {}
    if not isinstance(section, dict):
        raise SweepError(f'{key} in {path} must be a mapping (keys: {", ".join(allowed)})')
    unknown = [k for k in section if k not in allowed]
    if unknown:
        raise SweepError(f'unknown key(s) {unknown} under {key} in {path}; accepted: {", ".join(allowed)}')
    return section


def _refuse_sweep_keys(settings: Dict[str, Any], where: str, also: Sequence[str] = ()) -> None:
    taken = [k for k in settings if k in SET_BY_SWEEP or k in also]
    if taken:
        raise SweepError(f'{where} sets {", ".join(taken)}, which the sweep sets itself (output_dir: --output / '
                         f'output_dir; seed: seeds; resume: auto; pretrained and step_offset: the dense stage)')


def load_sweep(path, output_dir: Optional[str] = None, seeds: Optional[Sequence[int]] = None,
               progress: Optional[bool] = None) -> Sweep:
    """Read and validate a sweep config: every run's TrainConfig is built (and so checked) here."""
    path = Path(path)
    raw = _read_yaml(path)
    name = str(raw.get('name') or path.stem)
    out = Path(os.path.normpath(output_dir or raw.get('output_dir') or f'outputs/sweeps/{name}'))
    seeds = _check_seeds(list(seeds) if seeds is not None else raw.get('seeds', [0]),
                         '--seeds' if seeds is not None else str(path))
    if raw.get('data') not in (None, 'digits'):
        raise SweepError(f'data={raw["data"]!r} in {path} is not valid; accepted: digits (or leave it out and set '
                         f'data_dir in common)')
    fixed: Dict[str, Any] = dict(resume='auto')
    if raw.get('data') == 'digits':
        fixed['data_dir'] = str(out / 'data')
    if progress is not None:
        fixed['progress'] = progress
    common = flatten_settings(raw.get('common') or {}, f'common in {path}')
    _refuse_sweep_keys(common, f'common in {path}', also=('pretrained', 'step_offset') if raw.get('dense') else ())
    dense_run, upcycle_from = _dense_stage(raw, path, out, common, fixed)
    base = _config_path(path, raw.get('base'), 'base')
    cell_set = flatten_settings(raw.get('set') or {}, f'set in {path}')
    _refuse_sweep_keys(cell_set, f'set in {path}', also=tuple(upcycle_from))
    cells = []
    for assignment in expand_grid(raw.get('grid'), f'grid in {path}'):
        _refuse_sweep_keys(assignment, f'grid in {path}', also=tuple(upcycle_from))
        cname = cell_name(assignment)
        runs = [Run(cname, s, _build_config(base, [common, cell_set, assignment], dict(
            fixed, **upcycle_from, seed=s, output_dir=str(out / cname / f'seed_{s}')), f'cell {cname!r} seed {s}'))
            for s in seeds]
        cells.append(Cell(cname, assignment, runs))
    _check_unique(cells, path)
    baseline = _baseline(raw, path, out, base, common, cell_set, dense_run, upcycle_from, fixed, seeds)
    return Sweep(name, path, out, seeds, raw.get('data'), dense_run, ([baseline] if baseline else []) + cells,
                 base=str(base))


def _check_unique(cells: List[Cell], path: Path) -> None:
    seen: Dict[str, Cell] = {}
    for cell in cells:
        if cell.name.lower() in seen:
            raise SweepError(f'grid in {path}: cells {seen[cell.name.lower()].settings} and {cell.settings} get the '
                             f'same folder name {cell.name!r}; make the values differ in letters, digits or . _ + -')
        seen[cell.name.lower()] = cell


def _dense_stage(raw, path, out, common, fixed) -> Tuple[Optional[Run], Dict[str, Any]]:
    """(the dense run trained here or None, the keys every upcycled run takes from the dense model)."""
    if not raw.get('dense'):
        return None, {}
    dense = _section(raw, 'dense', ('config', 'set', 'pretrained', 'step_offset'), path)
    if ('config' in dense) == ('pretrained' in dense):
        raise SweepError(f'dense in {path} needs either config (a dense model trained here once) or pretrained '
                         f'(an existing dense model), not {"both" if dense else "neither"}')
    if 'pretrained' in dense:
        if 'set' in dense:
            raise SweepError(f'dense in {path}: set applies to a dense stage trained here (config), not to pretrained')
        taken = dict(pretrained=str(dense['pretrained']))
        if dense.get('step_offset') is not None:
            taken['step_offset'] = _coerce('step_offset', dense['step_offset'])
        return None, taken
    if 'step_offset' in dense:
        raise SweepError(f'dense in {path}: step_offset is computed from the dense stage trained here (config)')
    dense_set = flatten_settings(dense.get('set') or {}, f'dense.set in {path}')
    _refuse_sweep_keys(dense_set, f'dense.set in {path}')
    cfg = _build_config(_config_path(path, dense['config'], 'dense.config'), [common, dense_set],
                        dict(fixed, output_dir=str(out / DENSE_STAGE)), 'dense stage')
    model_dir = str(out / DENSE_STAGE / 'model')
    return Run(DENSE_STAGE, None, cfg), dict(pretrained=model_dir, step_offset=cfg.step_offset + cfg.steps)


def _baseline(raw, path, out, base, common, cell_set, dense_run, upcycle_from, fixed, seeds) -> Optional[Cell]:
    if not raw.get('baseline'):
        return None
    section = _section(raw, 'baseline', ('config', 'set'), path)
    own = flatten_settings(section.get('set') or {}, f'baseline.set in {path}')
    _refuse_sweep_keys(own, f'baseline.set in {path}', also=tuple(upcycle_from))
    if 'config' in section:
        config = _config_path(path, section['config'], 'baseline.config')
    elif dense_run is not None:
        config = _config_path(path, raw['dense']['config'], 'dense.config')
    else:
        config = base
        if 'model' not in own:
            from ..models.vision_transformer_moe import DENSE_SOURCES
            model = load_config(str(base)).model
            if model not in DENSE_SOURCES:
                raise SweepError(f'baseline in {path}: {model!r} has no known dense source; give baseline.config or '
                                 f'baseline.set.model')
            own = dict(own, model=DENSE_SOURCES[model])
    steps = merge_settings(load_config(str(base)).to_dict(), dict(common, **cell_set))['steps']
    layers = [common, dict(own)] if 'steps' in own else [common, dict(own, steps=steps)]
    runs = [Run(BASELINE, s, _build_config(config, layers, dict(
        fixed, **upcycle_from, seed=s, output_dir=str(out / BASELINE / f'seed_{s}')), f'baseline seed {s}',
        drop_kwargs=_moe_kwargs())) for s in seeds]
    return Cell(BASELINE, {}, runs, baseline=True)


# ------------------------------------------------------------------------------------------- run states
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
        from ..data import write_digits_image_folder
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


# ------------------------------------------------------------------------------------------------ results
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


def collect_results(sweep: Sweep) -> List[Dict[str, Any]]:
    """One entry per planned run of every cell: its status, and its numbers when it finished."""
    results = []
    for cell in sweep.cells:
        for run in cell.runs:
            status = run_status(run)
            entry = dict(cell=cell.name, seed=run.seed, baseline=cell.baseline, status=status.state,
                         detail=status.detail)
            if status.state == 'finished':
                entry.update(read_run(run.cfg.output_dir, run.cfg.steps))
            results.append(entry)
    return results


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def mean_curve(curves: Sequence[Sequence[Tuple[int, Optional[float], float]]]) -> List[Dict[str, float]]:
    """Per step evaluated in EVERY curve ((step, elapsed_s, top1) lists): mean elapsed_s, mean / min / max top1."""
    if not curves:
        return []
    common = set.intersection(*({step for step, _, _ in c} for c in curves))
    by_step = [{step: (elapsed, top1) for step, elapsed, top1 in c} for c in curves]
    return [dict(step=s, elapsed_s=_mean([c[s][0] for c in by_step]), top1=statistics.fmean(c[s][1] for c in by_step),
                 top1_min=min(c[s][1] for c in by_step), top1_max=max(c[s][1] for c in by_step))
            for s in sorted(common)]


def aggregate(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Rows per cell (in order of first appearance) from per-run results: top-1 mean, sample std, min, max over
    the finished seeds, means of the other numbers, the mean curve, and top-1 relative to the baseline's mean."""
    cells: Dict[str, List[Dict[str, Any]]] = {}
    for r in results:
        cells.setdefault(r['cell'], []).append(r)
    rows = []
    for name, runs in cells.items():
        done = [r for r in runs if r['status'] == 'finished']
        top1 = [r['top1'] for r in done]
        rows.append(dict(
            cell=name, baseline=any(r.get('baseline') for r in runs), planned=len(runs), n=len(done),
            seeds=[r['seed'] for r in done], diverged=[r['seed'] for r in runs if r['status'] == 'diverged'],
            missing=[r['seed'] for r in runs if r['status'] not in ('finished', 'diverged')],
            top1_mean=_mean(top1), top1_std=statistics.stdev(top1) if len(top1) > 1 else None,
            top1_min=min(top1, default=None), top1_max=max(top1, default=None),
            top5_mean=_mean([r.get('top5') for r in done]), val_loss_mean=_mean([r.get('val_loss') for r in done]),
            train_loss_mean=_mean([r.get('train_loss') for r in done]),
            images_per_s=_mean([r.get('images_per_s') for r in done]),
            train_time_s=_mean([r.get('train_time_s') for r in done]),
            params=done[0].get('params') if done else None, steps=done[0].get('steps') if done else None,
            curve=mean_curve([r['curve'] for r in done])))
    reference = next((r['top1_mean'] for r in rows if r['baseline']), None)
    for row in rows:
        row['vs_baseline'] = (row['top1_mean'] - reference
                              if reference is not None and row['top1_mean'] is not None else None)
    return rows


def _fmt(value: Optional[float], digits: int = 2, signed: bool = False) -> str:
    if value is None:
        return '-'
    return f'{value:+.{digits}f}' if signed else f'{value:.{digits}f}'


def _note(row: Dict[str, Any]) -> str:
    notes = []
    if row['diverged']:
        notes.append(f'diverged: seed {", ".join(map(str, row["diverged"]))}')
    if row['missing']:
        notes.append(f'not run yet: seed {", ".join(map(str, row["missing"]))}')
    return '; '.join(notes)


COLUMNS = ('cell', 'seeds', 'val top-1 (%)', 'std', 'min-max', 'vs dense', 'train loss', 'train img/s',
           'train time (s)', 'params (M)', 'notes')


def format_markdown(rows: Sequence[Dict[str, Any]], title: str = '') -> str:
    """The results table: one row per cell, the baseline first and marked."""
    lines = ([title, ''] if title else []) + ['| ' + ' | '.join(COLUMNS) + ' |', '|' + '---|' * len(COLUMNS)]
    for r in rows:
        span = f'{r["top1_min"]:.2f}-{r["top1_max"]:.2f}' if r['n'] else '-'
        cells = [f'{r["cell"]} (baseline)' if r['baseline'] else r['cell'], f'{r["n"]}/{r["planned"]}',
                 _fmt(r['top1_mean']), _fmt(r['top1_std']), span,
                 '-' if r['baseline'] else _fmt(r['vs_baseline'], signed=True), _fmt(r['train_loss_mean'], 4),
                 _fmt(r['images_per_s'], 0), _fmt(r['train_time_s'], 0),
                 _fmt(r['params'] / 1e6 if r['params'] else None), _note(r)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


CSV_COLUMNS = ('cell', 'baseline', 'settings', 'n_seeds', 'planned_seeds', 'steps', 'top1_mean', 'top1_std',
               'top1_min', 'top1_max', 'top1_vs_baseline', 'top5_mean', 'val_loss_mean', 'train_loss_mean',
               'train_images_per_s', 'train_time_s', 'params_m', 'diverged_seeds')


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    return text.getvalue()


def _write_csv(path: Path, rows: Sequence[Dict[str, Any]], settings: Dict[str, Dict[str, Any]]) -> None:
    atomic_write(path, _csv_text(CSV_COLUMNS, ([
        r['cell'], int(r['baseline']), json.dumps(settings.get(r['cell'], {})), r['n'], r['planned'],
        r['steps'], r['top1_mean'], r['top1_std'], r['top1_min'], r['top1_max'], r['vs_baseline'],
        r['top5_mean'], r['val_loss_mean'], r['train_loss_mean'], r['images_per_s'], r['train_time_s'],
        r['params'] / 1e6 if r['params'] else None, ' '.join(map(str, r['diverged']))] for r in rows)))


def _write_runs_csv(path: Path, results: Sequence[Dict[str, Any]]) -> None:
    keys = ('cell', 'seed', 'status', 'top1', 'top5', 'val_loss', 'train_loss', 'images_per_s', 'train_time_s',
            'params', 'steps')
    atomic_write(path, _csv_text(keys, ([r.get(k) for k in keys] for r in results)))


def plot_curves(rows: Sequence[Dict[str, Any]], path, x: str = 'step', title: str = '') -> Path:
    """Validation top-1 (mean over seeds, min-max band) against extra steps (`x='step'`) or training wall clock
    (`x='elapsed_s'`), one line per cell, the baseline dashed black. Needs matplotlib (the `report` extra)."""
    from .._extras import require_extra
    require_extra('report', ('matplotlib',), 'sweep plots')
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = [r for r in rows if r['curve']]
    longest = max((c[x] or 0 for r in curves for c in r['curve']), default=0)
    scale, unit = ((1, 'steps') if x == 'step' else (3600, 'h') if longest > 3 * 3600
                   else (60, 'min') if longest > 300 else (1, 's'))
    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for r in sorted(curves, key=lambda r: not r['baseline']):  # baseline first: the same colour cycle for cells
        xs = [(c[x] or 0) / scale for c in r['curve']]
        style = dict(color='black', linestyle='--', linewidth=1.8) if r['baseline'] else dict(linewidth=1.5)
        label = f'{r["cell"]} (baseline)' if r['baseline'] else r['cell']
        line, = ax.plot(xs, [c['top1'] for c in r['curve']], marker='o', markersize=3, label=label, **style)
        if r['n'] > 1:
            ax.fill_between(xs, [c['top1_min'] for c in r['curve']], [c['top1_max'] for c in r['curve']],
                            color=line.get_color(), alpha=0.12, linewidth=0)
    ax.set_xlabel('extra training steps' if x == 'step' else f'training wall-clock ({unit}, mean over seeds)')
    ax.set_ylabel('validation top-1 (%)')
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=8, loc='lower right')
    figure.tight_layout()
    figure.savefig(str(path), dpi=110)
    return Path(path)


def write_report(sweep: Sweep, plots: bool = True) -> Dict[str, Any]:
    """results.md, results.csv (per cell), runs.csv (per run) and the two plots in the sweep's output_dir, from
    every finished run (a changed one is left out and noted). Returns the paths, the markdown and the rows."""
    out = sweep.output_dir
    out.mkdir(parents=True, exist_ok=True)
    results = collect_results(sweep)
    rows = aggregate(results)
    steps = sorted({r['steps'] for r in rows if r['steps']})
    seeds = ', '.join(map(str, sweep.seeds))
    title = (f'Sweep `{sweep.name}` ({sweep.path}): {len(sweep.cells)} cells x seeds [{seeds}], '
             f'{"/".join(map(str, steps)) or "?"} extra steps each; validation top-1 at the final step, mean over '
             f'seeds (std: sample standard deviation; vs dense: difference of means).')
    changed = [f'{r["cell"]} seed {r["seed"]}' for r in results if r['status'] == 'changed']
    markdown = format_markdown(rows, title)
    if changed:
        markdown += f'\n\nLeft out (made with other settings than the config now gives): {", ".join(changed)}'
    paths = dict(markdown=out / 'results.md', csv=out / 'results.csv', runs=out / 'runs.csv')
    atomic_write(paths['markdown'], markdown + '\n')
    _write_csv(paths['csv'], rows, {c.name: c.settings for c in sweep.cells})
    _write_runs_csv(paths['runs'], [dict(r, curve=None) for r in results])
    if plots:
        paths['steps_plot'] = plot_curves(rows, out / 'accuracy_vs_steps.png', 'step',
                                          f'{sweep.name}: validation top-1 vs extra training steps')
        paths['time_plot'] = plot_curves(rows, out / 'accuracy_vs_time.png', 'elapsed_s',
                                         f'{sweep.name}: validation top-1 vs training wall-clock')
    return dict(paths=paths, markdown=markdown, rows=rows)
