"""Sweeps (vit_moe.training.sweep, train_scripts/sweep.py): grid expansion and cell names, model_kwargs merging,
config validation, aggregation over seeds, and a tiny end-to-end sweep (dense stage, baseline, 2 cells x 2 seeds)
that resumes an interrupted run, reruns nothing the second time and refuses a changed config."""
import ast
import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from vit_moe import _cli
from vit_moe.training import load_config, train
from vit_moe.training import sweep as sweep_mod
from vit_moe.training.sweep import runner as sweep_runner, spec as sweep_spec
from vit_moe.training.loop import NonFiniteLossError
from vit_moe.training.sweep import (
    BASELINE, RESULT_FILE, SweepError, aggregate, cell_name, expand_grid, format_markdown, load_sweep, mean_curve,
    merge_settings, run_status, run_sweep, write_report,
)

from conftest import ROOT, TRAIN_MOE, make_image_folder

DENSE_KWARGS = {k: v for k, v in TRAIN_MOE.items() if k not in ('num_experts', 'moe_blocks')}
COMMON_TRAIN = dict(batch_size=6, num_workers=0, lr=3e-3, warmup_steps=1, log_every=1, checkpoint_every=2,
                    keep_checkpoints=2, trackers='none', progress=False, hflip=0.0, scale=[0.8, 1.0],
                    color_jitter=0.0)


def _write(path: Path, values) -> Path:
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _configs(tmp_path: Path, **sweep_values) -> Path:
    """Tiny dense and MoE trainer configs and a sweep over them in tmp_path/configs; returns the sweep file."""
    folder = tmp_path / 'configs'
    folder.mkdir(exist_ok=True)
    _write(folder / 'dense.yaml', dict(COMMON_TRAIN, model='vit_tiny_patch16_224', model_kwargs=DENSE_KWARGS, steps=4))
    _write(folder / 'moe.yaml', dict(COMMON_TRAIN, model='vit_ti16_moe_upcycled', model_kwargs=TRAIN_MOE, steps=4))
    values = dict(
        name='tiny', output_dir=str(tmp_path / 'sweep'), seeds=[0, 1],
        common=dict(data_dir=str(tmp_path / 'data'), eval_every=2, eval_at_start=True),
        dense=dict(config='dense.yaml', set=dict(steps=4, eval_every=0)), base='moe.yaml', set=dict(steps=4),
        grid={'model_kwargs.num_experts': [2, 4]}, baseline=dict(config='dense.yaml'))
    values.update(sweep_values)
    return _write(folder / 'sweep.yaml', {k: v for k, v in values.items() if v is not None})


# ------------------------------------------------------------------------------------------ grid and names
_VALUES = st.one_of(st.integers(-1000, 10 ** 6), st.floats(allow_nan=False, allow_infinity=False, width=32),
                    st.booleans(), st.text('abcdefghijklmnopqrstuvwxyz0123456789_.-', min_size=1, max_size=12))
_KEYS = ('num_experts', 'capacity_factor', 'moe_blocks', 'router', 'expert_init', 'router_norm')


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_VALUES, min_size=1, max_size=4, unique_by=sweep_spec._format_value),
                min_size=1, max_size=len(_KEYS)))
def test_grid_is_the_cartesian_product_with_unique_folder_safe_names(axes):
    grid = {f'model_kwargs.{key}': values for key, values in zip(_KEYS, axes)}
    cells = expand_grid(grid)
    assert len(cells) == math.prod(len(v) for v in axes)
    assert all(list(c) == list(grid) for c in cells)  # every cell sets every axis, in the grid's order
    names = [cell_name(c) for c in cells]
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r'[A-Za-z0-9._+=,~-]+', n) and n not in ('.', '..') and len(n) <= 150 for n in names)
    assert cells[0] == {k: v[0] for k, v in grid.items()}  # first axis slowest, values in order
    inner = math.prod(len(v) for v in axes[1:])  # the first axis changes slowest
    first = [sweep_spec._format_value(c[next(iter(grid))]) for c in cells[:inner]]
    assert first == [sweep_spec._format_value(axes[0][0])] * inner


def test_cell_names_sub_grids_and_named_axes():
    cells = expand_grid({'model_kwargs': {'num_experts': [8], 'capacity_factor': [2.0]}, 'lr': ['1e-3']})
    assert [cell_name(c) for c in cells] == ['num_experts=8,capacity_factor=2.0,lr=0.001']  # '1e-3' coerced
    cells = expand_grid({'routing': [{'model_kwargs.router': 'expert_choice'},
                                     {'model_kwargs': {'router': 'token_choice', 'capacity_factor': 1.0}}],
                         'model_kwargs.moe_blocks': [[10, 11], 'every_other'], 'model_kwargs.router_norm': [True]})
    assert [cell_name(c) for c in cells] == [
        'router=expert_choice,moe_blocks=10-11,router_norm=true', 'router=expert_choice,moe_blocks=every_other,'
        'router_norm=true', 'router=token_choice,capacity_factor=1.0,moe_blocks=10-11,router_norm=true',
        'router=token_choice,capacity_factor=1.0,moe_blocks=every_other,router_norm=true']


def test_model_kwargs_are_merged_never_replaced():
    base = dict(lr=1.0, model_kwargs=dict(img_size=16, num_experts=4, moe_blocks=1))
    merged = merge_settings(base, {'model_kwargs.num_experts': 8, 'lr': 2.0, 'model_kwargs': {'router_norm': True}})
    assert merged == dict(lr=2.0, model_kwargs=dict(img_size=16, num_experts=8, moe_blocks=1, router_norm=True))
    assert base['model_kwargs']['num_experts'] == 4  # not modified


def test_loaded_cells_baseline_and_dense_stage(tmp_path):
    sweep = load_sweep(_configs(tmp_path, common=dict(eval_every=2, data_dir=str(tmp_path / 'data'),
                                                      model_kwargs=dict(drop_path_rate=0.1))))
    assert [c.name for c in sweep.cells] == [BASELINE, 'num_experts=2', 'num_experts=4']
    cell = sweep.cells[2].runs[1].cfg
    assert cell.model_kwargs == dict(TRAIN_MOE, num_experts=4, drop_path_rate=0.1)  # base + common + grid
    assert (cell.seed, cell.resume, cell.output_dir) == (1, 'auto', str(tmp_path / 'sweep/num_experts=4/seed_1'))
    assert cell.pretrained == str(tmp_path / 'sweep/dense/model') and cell.step_offset == 4  # continues the dense run
    assert (sweep.dense.cfg.steps, sweep.dense.cfg.eval_every) == (4, 0)
    baseline = sweep.cells[0].runs[0].cfg
    assert baseline.model == 'vit_tiny_patch16_224' and 'num_experts' not in baseline.model_kwargs
    assert (baseline.steps, baseline.step_offset, baseline.pretrained) == (4, 4, cell.pretrained)


def test_baseline_from_the_base_drops_moe_kwargs(tmp_path):
    sweep = load_sweep(_configs(tmp_path, dense=None, baseline=dict(set=dict(model='vit_tiny_patch16_224'))))
    baseline = sweep.cells[0].runs[0].cfg
    assert baseline.model_kwargs == DENSE_KWARGS and baseline.pretrained is None
    default = load_sweep(ROOT / 'configs/sweeps/experts.yaml').cells[0].runs[0].cfg
    assert default.model == 'vit_base_patch16_224.augreg2_in21k_ft_in1k' and default.model_kwargs == dict(
        drop_path_rate=0.1)


@pytest.mark.parametrize('change, message', [
    (dict(grid={}), 'grid is empty'),
    (dict(grid={'model_kwargs.num_experts': []}), "grid key 'model_kwargs.num_experts' needs a non-empty list"),
    (dict(grid={'num_expert': [2, 4]}), "unknown trainer key 'num_expert'"),
    (dict(grid={'steps': [2, 2.0]}), "grid key 'steps' repeats steps=2"),
    (dict(grid={'model_kwargs.router': ['a b', 'a_b']}), "repeats model_kwargs.router=a_b"),
    (dict(grid={'model_kwargs.router': ['A', 'a']}), "get the same folder name 'router=a'"),
    (dict(set={'lrr': 1}), "unknown trainer key 'lrr' in set in"),
    (dict(set={'lr': -1}), "cell 'num_experts=2' seed 0: lr=-1"),
    (dict(set={'seed': 3}), 'sets seed, which the sweep sets itself'),
    (dict(seeds=[]), 'seeds=[] in'),
    (dict(seeds=[0, 0]), 'repeats a seed'),
    (dict(seeds=['a']), "seeds=['a']"),
    (dict(seeds=[-1]), 'expected a non-empty list of integers >= 0'),
    (dict(epochs=3), "unknown sweep key(s) ['epochs']"),
    (dict(base='missing.yaml'), "base='missing.yaml'"),
    (dict(dense=dict(config='dense.yaml', pretrained='x')), 'needs either config'),
])
def test_bad_sweep_configs_are_one_clear_error(tmp_path, change, message):
    with pytest.raises(SweepError) as error:
        load_sweep(_configs(tmp_path, **change))
    assert message in str(error.value) and '\n' not in str(error.value)


@pytest.mark.parametrize('path', sorted((ROOT / 'configs/sweeps').glob('*.yaml')), ids=lambda p: p.name)
def test_shipped_sweep_configs_load(path):
    sweep = load_sweep(path)
    assert sweep.cells[0].name == BASELINE and len(sweep.cells) >= 3 and len(sweep.seeds) >= 2
    assert path.read_text().startswith('#')  # a header saying what it tests and what the paper found
    if path.name == 'expert_init.yaml':
        assert [c.settings['model_kwargs.expert_init'] for c in sweep.cells[1:]] == ['copy', 'random', 'drop']
        assert sweep.cells[-1].runs[0].cfg.model_kwargs['drop_ratio'] == 0.5
    from vit_moe import MoeConfig
    for cell in sweep.cells:  # every MoE run's options are valid for its router (none that it would refuse)
        for run in cell.runs:
            if 'moe' in run.cfg.model:
                MoeConfig.from_kwargs(run.cfg.model_kwargs)


# ------------------------------------------------------------------------------------------- aggregation
def _result(cell, seed, top1, curve, status='finished', baseline=False):
    return dict(cell=cell, seed=seed, status=status, baseline=baseline, top1=top1, top5=99.0, val_loss=0.5,
                train_loss=1.0 + seed, images_per_s=100.0 * (seed + 1), train_time_s=10.0, params=2_000_000, steps=4,
                curve=curve)


def test_aggregate_mean_spread_and_baseline_difference():
    results = [
        _result(BASELINE, 0, 78.0, [(2, 5.0, 70.0), (4, 10.0, 78.0)], baseline=True),
        _result(BASELINE, 1, 80.0, [(2, 7.0, 72.0), (4, 12.0, 80.0)], baseline=True),
        _result('num_experts=8', 0, 80.0, [(2, 6.0, 75.0), (4, 12.0, 80.0)]),
        _result('num_experts=8', 1, 82.0, [(4, 13.0, 82.0)]),
        _result('num_experts=8', 2, 84.0, [(2, 6.0, 77.0), (4, 14.0, 84.0)]),
        dict(cell='num_experts=8', seed=3, status='diverged', baseline=False),
        dict(cell='num_experts=8', seed=4, status='new', baseline=False),
    ]
    base, moe = aggregate(results)
    assert (base['cell'], base['baseline'], base['n'], base['top1_mean']) == (BASELINE, True, 2, 79.0)
    assert (moe['n'], moe['planned'], moe['top1_mean'], moe['top1_std']) == (3, 5, 82.0, 2.0)
    assert (moe['top1_min'], moe['top1_max'], moe['vs_baseline'], moe['diverged'], moe['missing']) == (
        80.0, 84.0, 3.0, [3], [4])
    assert moe['train_loss_mean'] == 2.0 and moe['images_per_s'] == 200.0 and moe['params'] == 2_000_000
    assert moe['curve'] == [dict(step=4, elapsed_s=13.0, top1=82.0, top1_min=80.0, top1_max=84.0)]  # steps in all
    assert base['curve'][0] == dict(step=2, elapsed_s=6.0, top1=71.0, top1_min=70.0, top1_max=72.0)
    table = format_markdown([base, moe])
    assert f'| {BASELINE} (baseline) | 2/2 | 79.00 | 1.41 | 78.00-80.00 | - |' in table
    assert '| num_experts=8 | 3/5 | 82.00 | 2.00 | 80.00-84.00 | +3.00 | 2.0000 | 200 | 10 | 2.00 |' in table
    assert 'diverged: seed 3; not run yet: seed 4' in table
    single = aggregate([_result('a', 0, 50.0, [])])[0]
    assert single['top1_std'] is None and single['vs_baseline'] is None and mean_curve([]) == []


# ------------------------------------------------------------------------------------------- end to end
def _logs(sweep):
    return {p: p.read_bytes() for p in sorted(sweep.output_dir.rglob('log.jsonl'))}


def test_tiny_sweep_end_to_end_resumes_and_reruns_nothing(tmp_path, monkeypatch):
    make_image_folder(tmp_path / 'data')
    sweep = load_sweep(_configs(tmp_path))
    said = []
    run_sweep(sweep, only=['num_experts=2'], say=said.append)  # the dense stage, then one cell
    assert [s.split(':')[0] for s in said[::2]] == ['[1/3] dense', '[2/3] num_experts=2 seed 0',
                                                    '[3/3] num_experts=2 seed 1']

    # interrupted: a run of num_experts=4 seed 0 that stopped after its step-2 checkpoint, before the final model
    interrupted = sweep.cells[2].runs[0].cfg
    train(load_config(None, dict(interrupted.to_dict(), steps=2)))  # its eval at step 2 is one of the curve's
    out = Path(interrupted.output_dir)
    shutil.rmtree(out / 'model')
    assert run_status(sweep.cells[2].runs[0]).state == 'interrupted'

    said.clear()
    outcome = run_sweep(sweep, say=said.append)
    assert outcome['interrupted'] == 0
    assert outcome['skipped'] == ['dense', 'num_experts=2 seed 0', 'num_experts=2 seed 1']
    assert 'num_experts=4 seed 0: resuming from step 2' in '\n'.join(said)
    records = [r for r in map(json.loads, open(out / 'log.jsonl'))]
    assert [r['step'] for r in records if r['type'] == 'resume'] == [2]
    assert [r['step'] for r in records if r['type'] == 'train'] == [1, 2, 3, 4]
    assert all(run_status(r).state == 'finished' for c in sweep.cells for r in c.runs)

    report = write_report(sweep)
    rows = {r['cell']: r for r in report['rows']}
    assert list(rows) == [BASELINE, 'num_experts=2', 'num_experts=4'] and all(r['n'] == 2 for r in rows.values())
    assert [c['step'] for c in rows['num_experts=4']['curve']] == [0, 2, 4]  # from the start, right after upcycling
    assert rows['num_experts=4']['params'] > rows['num_experts=2']['params'] > rows[BASELINE]['params']
    markdown = (sweep.output_dir / 'results.md').read_text()
    assert markdown.count('\n| ') == 4 and f'| {BASELINE} (baseline) | 2/2 |' in markdown
    lines = (sweep.output_dir / 'results.csv').read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith('cell,baseline,settings,n_seeds')
    assert len((sweep.output_dir / 'runs.csv').read_text().splitlines()) == 7
    for name in ('accuracy_vs_steps.png', 'accuracy_vs_time.png'):
        assert (sweep.output_dir / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    # again: nothing is trained, no log changes; without its sweep_result.json a run still reads as finished
    logs = _logs(sweep)
    monkeypatch.setattr(sweep_runner, 'train', lambda cfg: pytest.fail(f'{cfg.output_dir} was trained again'))
    assert len(run_sweep(sweep, say=said.append)['skipped']) == 7 and _logs(sweep) == logs
    params = rows['num_experts=4']['params']
    (out / RESULT_FILE).unlink()
    assert run_status(sweep.cells[2].runs[0]).state == 'finished'
    assert write_report(sweep, plots=False)['rows'][2]['params'] == params  # counted from model.safetensors

    # a changed config: refused before anything trains, naming the run and the key
    changed = load_sweep(_configs(tmp_path, set=dict(steps=4, lr=0.01)))
    with pytest.raises(SweepError, match=r"num_experts=2 seed 0 in .* \(lr: 0\.003 -> 0\.01\) \(and 3 other run"):
        run_sweep(changed)
    fewer = load_sweep(_configs(tmp_path, set=dict(steps=2)))
    assert run_status(fewer.cells[1].runs[0]).detail == 'it has run 4 steps, more than the configured steps 2'


def _fake_train(outcomes):
    def train(cfg):
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        return dict(interrupted=outcome, step=cfg.steps // 2 if outcome else cfg.steps, params=10, eval=dict(top1=50.0))
    return train


def test_a_diverged_run_is_recorded_and_an_interrupted_one_stops_the_sweep(tmp_path, monkeypatch):
    sweep = load_sweep(_configs(tmp_path, dense=None, baseline=None))
    monkeypatch.setattr(sweep_runner, 'train', _fake_train([NonFiniteLossError('non-finite loss (nan) at step 3; x'),
                                                         0, 15]))
    outcome = run_sweep(sweep, say=lambda text: None)
    assert (outcome['interrupted'], outcome['run'], outcome['ran']) == (
        15, 'num_experts=4 seed 0', ['num_experts=2 seed 0', 'num_experts=2 seed 1'])
    diverged = json.loads((Path(sweep.cells[0].runs[0].cfg.output_dir) / RESULT_FILE).read_text())
    assert diverged['status'] == 'diverged' and diverged['error'] == 'non-finite loss (nan) at step 3'
    assert run_status(sweep.cells[0].runs[0]).state == 'diverged'
    assert not (Path(sweep.cells[1].runs[0].cfg.output_dir) / RESULT_FILE).exists()  # interrupted: no result


def _one_run_sweep(tmp_path):
    return load_sweep(_configs(tmp_path, dense=None, baseline=None, seeds=[0], grid={'model_kwargs.num_experts': [2]}))


def test_a_launcher_trains_each_run_in_its_own_processes(tmp_path, monkeypatch):
    make_image_folder(tmp_path / 'data')
    monkeypatch.setenv('PYTHONPATH', str(ROOT))
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    sweep = _one_run_sweep(tmp_path)
    monkeypatch.setattr(sweep_runner, 'train', lambda cfg: pytest.fail('trained in the sweep\'s process'))
    outcome = run_sweep(sweep, say=lambda text: None, command=[sys.executable, str(ROOT / 'train_scripts/train.py')])
    run = sweep.cells[0].runs[0]
    result = json.loads((Path(run.cfg.output_dir) / RESULT_FILE).read_text())
    assert outcome['ran'] == ['num_experts=2 seed 0'] and run_status(run).state == 'finished'
    assert result['status'] == 'finished' and result['params'] == sweep_runner._count_params(
        Path(run.cfg.output_dir) / 'model') > 0
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(SweepError, match='the sweep runs as one process'):
        run_sweep(sweep)


@pytest.mark.parametrize('script, expected', [
    ("sys.stderr.write('train.py: error: non-finite loss (nan) at step 3; stopped before the update\\n'); sys.exit(2)",
     'diverged'),
    ('sys.exit(143)', 'interrupted'),
    ("sys.stderr.write('train.py: error: bad data\\n'); sys.exit(2)", 'failed'),
])
def test_launched_run_outcomes(tmp_path, script, expected):
    sweep = _one_run_sweep(tmp_path)
    command = [sys.executable, '-c', 'import sys; ' + script]
    if expected == 'failed':
        with pytest.raises(SweepError, match=r'seed 0: .* failed \(exit code 2\): train.py: error: bad data'):
            run_sweep(sweep, say=lambda text: None, command=command)
        return
    outcome = run_sweep(sweep, say=lambda text: None, command=command)
    state = run_status(sweep.cells[0].runs[0])
    if expected == 'diverged':
        assert outcome['interrupted'] == 0
        assert (state.state, state.detail) == ('diverged', 'non-finite loss (nan) at step 3')
    else:
        assert (outcome['interrupted'], outcome['run'], state.state) == (15, 'num_experts=2 seed 0', 'new')


# ------------------------------------------------------------------------------------------- command line
def _cli_main():
    spec = importlib.util.spec_from_file_location('sweep_cli', ROOT / 'train_scripts/sweep.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_dry_run_and_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(_cli.DEBUG_ENV, raising=False)
    main = _cli_main()
    path = _configs(tmp_path)
    assert _cli.run(main, ['--config', str(path), '--dry-run', '--seeds', '3', '--only', 'num_experts=4']) == 0
    out = capsys.readouterr().out
    assert 'dense stage: vit_tiny_patch16_224, 4 steps' in out and 'num_experts=4  (model_kwargs.num_experts: 4' in out
    assert 'seed 3: new' in out and 'num_experts=2' not in out and not (tmp_path / 'sweep').exists()
    for argv, expected in [(['--config', str(path), '--only', 'num_experts=3'], "no cell 'num_experts=3'"),
                           (['--config', str(tmp_path / 'none.yaml')], 'does not exist'),
                           (['--config', str(path), '--seeds', 'x'], "invalid int value: 'x'")]:
        assert _cli.run(main, argv, prog='sweep.py') == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith('sweep.py: error: ') and expected in err[0], err


def test_plots_need_the_report_extra_and_matplotlib_is_imported_lazily(tmp_path, monkeypatch):
    for module in Path(sweep_mod.__file__).parent.glob('*.py'):
        tree = ast.parse(module.read_text())
        top_level = [a.name for node in tree.body if isinstance(node, ast.Import) for a in node.names]
        top_level += [node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.module]
        assert not [name for name in top_level if name.startswith('matplotlib')], module
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'matplotlib' else find_spec(
        name, *a))
    with pytest.raises(ImportError, match=r'sweep plots needs matplotlib.*vit-moe\[report\]'):
        sweep_mod.plot_curves([], tmp_path / 'x.png')
