""" The run's log: one JSON object per line in `log.jsonl`, numbers also to the Accelerate trackers.

A run that starts at step N (0 for a new run, the checkpoint's step for a resumed one) first moves the records
of steps after N, which a killed process wrote after its last checkpoint, and any line cut short by the kill,
to `log.rolled_back.jsonl`; `log.jsonl` then reads as one uninterrupted run.
"""
import json
from pathlib import Path
from typing import Any, Dict

from .._files import atomic_write

__all__ = ['RunLog']


def _record_step(line: str):
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None  # cut short by a kill
    return record.get('step', 0) if isinstance(record, dict) else None


def roll_back(path: Path, step: int) -> int:
    """Move the lines of `path` that are not records of steps <= `step` to `<stem>.rolled_back.jsonl`."""
    if not path.is_file():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines():
        line_step = _record_step(line)
        (keep if line_step is not None and line_step <= step else moved).append(line)
    if moved:
        with open(path.with_name(path.stem + '.rolled_back.jsonl'), 'a') as f:
            f.write(''.join(line + '\n' for line in moved))
        atomic_write(path, ''.join(line + '\n' for line in keep))
    return len(moved)


class RunLog:
    """Appends records to `path` (main process only) and logs their numbers to `accelerator`'s trackers."""

    def __init__(self, path: Path, accelerator, start_step: int = 0, enabled: bool = True):
        self.accelerator = accelerator
        self.file = None
        if enabled:
            roll_back(Path(path), start_step)
            self.file = open(path, 'a')

    def write(self, record: Dict[str, Any], step: int) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + '\n')
        self.file.flush()
        scalars = {f'{record["type"]}/{k}': v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            self.accelerator.log(scalars, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
