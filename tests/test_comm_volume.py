"""The bytes-moved formula (vit_moe.planning.comm_volume) against the collectives of a real 4-process run."""
import json

from conftest import launch_processes, run_script


def test_the_formula_is_what_a_2_x_2_run_moves_for_every_strategy(tmp_path):
    """DDP, FSDP2, expert parallelism with DDP and with FSDP2 (2 data-parallel replicas x 2 expert-parallel), bf16,
    with and without gradient checkpointing: every component of every strategy, byte for byte."""
    out = tmp_path / 'volume.json'
    run = run_script([*launch_processes(4), 'benchmarks/comm_volume.py', '--measure', '--expert-parallel-size', '2',
                      '--mixed-precision', 'bf16', '--json', str(out)], timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(out.read_text())
    assert len(results) == 8
    for key, result in results.items():
        assert result['measured'] == result['formula'], key
    ep = results['ep+ddp, grad ckpt']['measured']
    assert ep['tokens'] > results['ep+ddp']['measured']['tokens'] > 0  # checkpointing re-runs the forward's
    assert ep['expert_gradients'] > 0  # the shards' all-reduce over their 2 replicas
