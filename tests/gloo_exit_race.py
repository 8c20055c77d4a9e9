"""A Gloo collective still finishing when a process exits (run by tests/test_cli.py and scripts/stress_tests.sh).

    python -m torch.distributed.run --nproc_per_node 2 tests/gloo_exit_race.py [--plain-exit]

Rank 0 starts an all-reduce and drops its tensor, so Gloo's worker thread holds the last reference; rank 1 joins
the all-reduce only once rank 0 is exiting. The worker then releases the tensor while rank 0's interpreter may be
finalizing: taking the GIL there ends in `std::terminate` (SIGABRT, "terminate called without an active
exception"). Rank 0 leaves through `vit_moe._cli.run_and_exit`, as every front end does, which exits without
finalization (exit 0 every time); `--plain-exit` leaves with `sys.exit`, as Python scripts usually do (SIGABRT in
about a third of the runs on a loaded 2-core machine).
"""
import atexit
import datetime
import os
import sys

import torch
import torch.distributed as dist

from vit_moe import _cli


def main(argv) -> int:
    dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=60))
    store = dist.distributed_c10d._get_default_store()
    x = torch.ones(1 << 20)
    if dist.get_rank() == 0:
        work = dist.all_reduce(x, async_op=True)  # in a Gloo worker thread until rank 1 joins
        del x, work  # the worker now holds the last reference to the tensor

        def let_rank_1_join():
            store.set('exiting', '1')
            store.wait(['joining'])
        atexit.register(let_rank_1_join)  # the all-reduce completes while this process exits
        return 0
    store.wait(['exiting'])
    store.set('joining', '1')
    try:
        dist.all_reduce(x)
    finally:
        os._exit(0)  # rank 0 may be gone before the all-reduce completes here: not what this script checks


if __name__ == '__main__':
    if '--plain-exit' in sys.argv:
        sys.exit(main(sys.argv[1:]))
    _cli.run_and_exit(main)
