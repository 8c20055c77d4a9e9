""" A sweep's YAML spec: trainer settings merged over a common base, the grid expanded into named cells, the dense
stage and the baseline, every run's TrainConfig validated up front (`load_sweep`); the format is in
`vit_moe.training.sweep`'s docstring.
"""
import difflib
import itertools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

from ...layers import MOE_OPTIONS
from ..config import _FIELDS, ConfigError, TrainConfig, _coerce, load_config, merge_mapping, read_yaml

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
            from ...models.vision_transformer_moe import DENSE_SOURCES
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
