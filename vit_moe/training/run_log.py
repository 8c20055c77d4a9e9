""" The run's log: one JSON object per line in `log.jsonl`, scalars also to the Accelerate trackers. """
import json
from pathlib import Path
from typing import Any, Dict

__all__ = ['RunLog']


class RunLog:
    """Appends records to `path` (main process only) and logs their numbers to `accelerator`'s trackers."""

    def __init__(self, path: Path, accelerator, enabled: bool = True):
        self.accelerator = accelerator
        self.file = open(path, 'a') if enabled else None

    def write(self, record: Dict[str, Any], step: int) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + '\n')
        self.file.flush()
        scalars = {f'{record["type"]}/{k}': v for k, v in record.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.accelerator.log(scalars, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
