""" Training checkpoints: the counters saved beside Accelerate's state, and finding the newest checkpoint. """
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

__all__ = ['TrainState', 'latest_checkpoint']


@dataclass
class TrainState:
    """Counters saved with every checkpoint (Accelerate `register_for_checkpointing`)."""
    step: int = 0  # optimizer steps done
    batches: int = 0  # micro-batches consumed (positions the data order)

    def state_dict(self) -> Dict[str, int]:
        return dict(step=self.step, batches=self.batches)

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.step, self.batches = int(state['step']), int(state['batches'])


def latest_checkpoint(output_dir: str) -> Optional[Path]:
    """Newest `checkpoints/checkpoint_N` folder of a run, or None."""
    folders = [p for p in (Path(output_dir) / 'checkpoints').glob('checkpoint_*') if p.is_dir()]
    return max(folders, key=lambda p: int(p.name.rsplit('_', 1)[1]), default=None)
