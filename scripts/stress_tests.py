"""Run what can fail intermittently many times under load, and print how often each passed (scripts/stress_tests.sh).

    .venv/bin/python scripts/stress_tests.py [--rounds 20] [--output outputs/stress] [--competitors 1] [--all-recipes]
                                             [--stress-tier-only]

Every round runs, while `--competitors` CPU-bound processes compete for the cores:
- every multi-process, signal, kill and resume test (STRESSED), as CI runs them (two pytest-xdist workers);
- a 2-process DDP and a 2-process FSDP2 training run of train_scripts/train.py (`torch.distributed.run`; FSDP2 through
  tests/fsdp_on_cpu.py), each of which must exit 0 with every process, and print no abort.
`--stress-tier-only` runs only the `stress` tier (`-m stress`: the checks CI leaves to this script) and no training
runs. Prints one line per test (passes / rounds) and writes `<output>/stress.md` and the failures' outputs. Aim: all of
them.
"""
import argparse
import multiprocessing
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STRESSED = [
    'tests/test_cli.py::test_a_gloo_collective_finishing_at_exit_does_not_abort_the_process',
    'tests/test_cli.py::test_a_process_of_a_distributed_launch_leaves_after_atexit_without_finalization',
    'tests/test_preemption.py',
    'tests/test_training.py::test_sigterm_to_every_process_of_the_job_saves_a_checkpoint_then_resumes',
    'tests/test_training.py::test_resume_continues_exactly_like_an_uninterrupted_run',
    'tests/test_training.py::test_a_resumed_log_reads_as_one_run_when_the_resume_splits_a_logging_window',
    'tests/test_training.py::test_a_launch_that_would_start_lone_processes_is_refused_before_anything_is_written',
    'tests/test_training.py::test_unreadable_images_with_two_workers_are_reported_once_and_left_out_of_evaluation',
    'tests/test_stop_signals.py',
    'tests/test_fsdp.py',
    'tests/test_moe_designs.py::test_soft_moe_with_shared_experts_trains_under_fsdp2_through_accelerate',
    'tests/test_model_metadata.py::test_a_killed_save_never_leaves_a_half_written_model_folder',
    'tests/test_sweep.py::test_tiny_sweep_end_to_end_resumes_and_reruns_nothing',
    'tests/test_sweep.py::test_a_launcher_trains_each_run_in_its_own_processes',
    'tests/test_sweep.py::test_launched_run_outcomes',
    'tests/test_recipes.py',  # every recipe under a launch config (all 18 pairs with --all-recipes), EMA, signals
    'tests/test_expert_parallel.py',
    'tests/test_comm_volume.py',
    'tests/test_resume_chains.py',  # a chain of resumes over one process, DDP, FSDP2 and EP
    'tests/test_live_run.py',
    'tests/test_run_lock.py',
    'tests/test_parallelize.py',
]
COMBINATION_CELLS = 'ddp or fsdp or inductor'  # tests/test_combinations.py: the multi-process cells, inductor
TINY = '{img_size: 16, patch_size: 4, embed_dim: 32, depth: 2, num_heads: 2, num_experts: 4, moe_blocks: 1}'


def _compete() -> None:
    while True:
        pass


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1')


ALL_RECIPES = {}  # VIT_MOE_ALL_RECIPES=1 with --all-recipes: tests/test_recipes.py runs every recipe x launch pair
SELECTION = {'tests': [*STRESSED, 'tests/test_combinations.py', '-k',
                       f'not test_each_option_combination or {COMBINATION_CELLS}']}
STRESS_TIER = ['-m', 'stress', 'tests/']  # --stress-tier-only: what CI leaves to this script


def run_tests(out: Path, round_index: int) -> Counter:
    """One pytest run of the selection (STRESSED and the combination matrix's multi-process cells, or the stress
    tier): {test id: 1 if it passed}."""
    report = out / f'round_{round_index}.xml'
    command = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-n', '2', '--dist', 'loadgroup',
               f'--junitxml={report}', *SELECTION['tests']]
    run = subprocess.run(command, cwd=ROOT, env=dict(_env(), **ALL_RECIPES), capture_output=True, text=True)
    passed = Counter()
    for case in ElementTree.parse(report).getroot().iter('testcase'):
        test = f'{case.get("classname").replace(".", "/")}.py::{case.get("name")}'
        failed = any(child.tag in ('failure', 'error') for child in case)
        skipped = any(child.tag == 'skipped' for child in case)
        if not skipped:
            passed[test] += 0 if failed else 1
        if failed:
            (out / f'failed_round_{round_index}.txt').write_text(run.stdout[-20000:] + run.stderr[-20000:])
    return passed


def run_training(out: Path, round_index: int, data: Path, mode: str) -> bool:
    """A 2-process train.py run (DDP, or FSDP2 through tests/fsdp_on_cpu.py): every process exits 0, no abort."""
    shim = ['tests/fsdp_on_cpu.py'] if mode == 'fsdp2' else []
    run_dir = out / f'{mode}_{round_index}'
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', *shim,
               'train_scripts/train.py', '--config', 'configs/digits_moe.yaml', '--pretrained', 'none',
               '--data-dir', str(data), '--output-dir', str(run_dir), '--model-kwargs', TINY, '--batch-size', '16',
               '--steps', '6', '--checkpoint-every', '3', '--log-every', '1', '--trackers', 'none',
               '--progress', 'false', '--step-offset', '0', '--warmup-steps', '2']
    run = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True)
    ok = run.returncode == 0 and 'terminate called' not in run.stderr and (run_dir / 'model').is_dir()
    if not ok:
        (out / f'failed_{mode}_{round_index}.txt').write_text(f'exit {run.returncode}\n{run.stderr[-20000:]}')
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--rounds', type=int, default=20)
    parser.add_argument('--output', default='outputs/stress')
    parser.add_argument('--competitors', type=int, default=1, help='CPU-bound processes running meanwhile')
    parser.add_argument('--all-recipes', action='store_true', help='every fine-tuning recipe with every launch config')
    parser.add_argument('--stress-tier-only', action='store_true',
                        help='only the tests marked stress (what CI leaves to this script), no training runs')
    args = parser.parse_args()
    if args.stress_tier_only:
        SELECTION['tests'] = STRESS_TIER
    if args.all_recipes:
        ALL_RECIPES['VIT_MOE_ALL_RECIPES'] = '1'
    out = (ROOT / args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from vit_moe.data import write_digits_image_folder
    data = write_digits_image_folder(str(out / 'data'))
    competitors = [multiprocessing.Process(target=_compete, daemon=True) for _ in range(args.competitors)]
    for process in competitors:
        process.start()
    passed, rounds, start = Counter(), Counter(), time.monotonic()
    try:
        for i in range(args.rounds):
            for test, ok in run_tests(out, i).items():
                passed[test] += ok
                rounds[test] += 1
            for mode in () if args.stress_tier_only else ('ddp', 'fsdp2'):
                name = f'train.py, 2 processes, {mode}'
                passed[name] += run_training(out, i, data, mode)
                rounds[name] += 1
            print(f'round {i + 1}/{args.rounds}: {sum(rounds[t] - passed[t] for t in rounds)} failure(s) so far '
                  f'({(time.monotonic() - start) / 60:.0f} min)', flush=True)
    finally:
        for process in competitors:
            process.terminate()
    lines = [f'| {test} | {passed[test]} / {rounds[test]} |' for test in sorted(rounds)]
    table = '\n'.join([f'{args.rounds} rounds, {args.competitors} CPU-bound competitor(s), {os.cpu_count()} cores, '
                       f'{(time.monotonic() - start) / 60:.0f} min', '', '| test | passed |', '|---|---|', *lines])
    (out / 'stress.md').write_text(table + '\n')
    print(table)
    return 0 if all(passed[t] == rounds[t] for t in rounds) else 1


if __name__ == '__main__':
    sys.exit(main())
