""" Running sums of the training step's numbers, kept on the device: no host synchronisation until they are read.

The loop adds every micro-batch's losses and routing metrics (detached device tensors) and reads the means once
per logging window, reduced over processes in one collective.
"""
from typing import Dict, Optional

import torch

__all__ = ['StepMeter']


class StepMeter:
    """Sums of scalars (`loss`, `task_loss`, ...) and of per-layer routing metrics, over the current window."""

    def __init__(self, device=None):
        self.device = device
        self.scalars: Dict[str, torch.Tensor] = {}
        self.layers: Dict[str, Dict[str, torch.Tensor]] = {}
        self.count = 0

    def add(self, scalars: Dict[str, torch.Tensor], layers: Dict[str, Dict[str, torch.Tensor]]) -> None:
        for key, value in scalars.items():
            value = value.detach().float().to(self.device)
            self.scalars[key] = self.scalars[key] + value if key in self.scalars else value
        for name, metrics in layers.items():
            sums = self.layers.setdefault(name, {})
            for key, value in metrics.items():
                value = value.detach().float().to(self.device)
                sums[key] = sums[key] + value if key in sums else value
        self.count += 1

    def means(self, accelerator: Optional[object] = None) -> Dict[str, object]:
        """Window means ({'loss': float, ..., 'layers': {name: {metric: float or list}}}), averaged over processes.

        One flat tensor is reduced and copied to the host: a single synchronisation.
        """
        if not self.count:
            return dict(layers={})
        keys = list(self.scalars)
        layer_keys = [(name, key) for name, metrics in self.layers.items() for key in metrics]
        parts = [self.scalars[k].reshape(1) for k in keys] + [self.layers[n][k].reshape(-1) for n, k in layer_keys]
        flat = torch.cat(parts) / self.count
        if accelerator is not None and accelerator.num_processes > 1:
            flat = accelerator.reduce(flat, 'mean')
        values = flat.tolist()
        out: Dict[str, object] = {k: values[i] for i, k in enumerate(keys)}
        offset, layers = len(keys), {}
        for name, key in layer_keys:
            size = self.layers[name][key].numel()
            chunk = values[offset:offset + size]
            layers.setdefault(name, {})[key] = chunk[0] if self.layers[name][key].dim() == 0 else chunk
            offset += size
        out['layers'] = layers
        return out

    def reset(self) -> None:
        self.__init__(self.device)

    def window_state(self, accelerator: Optional[object] = None) -> Optional[Dict[str, object]]:
        """The open window as plain numbers for a checkpoint: its means over processes and its micro-batch count (None
        for an empty window). Call on every process (one collective)."""
        if not self.count:
            return None
        return dict(count=self.count, means=self.means(accelerator))

    def load_window(self, state: Optional[Dict[str, object]]) -> None:
        """Continue a checkpoint's open window: sums = means x count on every process, so the next window mean over
        processes is the uninterrupted run's (each process's sums enter the mean over processes)."""
        self.reset()
        if not state:
            return
        count, means = int(state['count']), dict(state['means'])
        layers = means.pop('layers', {})
        tensor = lambda value: torch.tensor(value, dtype=torch.float32, device=self.device) * count  # noqa: E731
        self.scalars = {key: tensor(value) for key, value in means.items()}
        self.layers = {name: {key: tensor(value) for key, value in metrics.items()} for name, metrics in layers.items()}
        self.count = count
