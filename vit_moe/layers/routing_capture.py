""" Routing statistics handed out of a forward without being stored on the modules.

    with capture_routing() as routing:
        logits = model(images)
    loss = task_loss + routing.aux_loss          # load-balancing (+ z) loss of token choice; 0 for expert choice
    routing.layers['blocks.11.mlp']['expert_load']

Every MoE layer that runs inside the `with` block records its aux loss (with its autograd graph) and its
detached metrics in the innermost open capture; `capture_routing(keep_tensors=True)` also keeps each layer's
Routing (slot token indices, combine weights, router probabilities), input, expert outputs and output, for routing
reports and for exports that expose the routing. Outside a capture a MoE layer records nothing (inference,
ONNX export, tracing). Nothing is kept on the modules, so a model deep-copies (EMA), pickles and compiles
after any forward, and a capture holds exactly the layers that ran inside it: a forward that stops early
reports no stale values for the layers it skipped.

Run the backward after the `with` block: with gradient checkpointing the recomputation in the backward
re-runs the MoE layers, and inside an open capture they would be recorded twice. Under `torch.compile`
recording is a side effect that dynamo will not replay inside a checkpointed region unless told so; an
open capture tells it (the `skip_fwd_side_effects_in_bwd_under_checkpoint` setting, for its duration).
"""
import contextlib
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

__all__ = ['RoutingCapture', 'LayerRouting', 'capture_routing', 'record_routing', 'replay_routing', 'replayed_routing']

_OPEN: List['RoutingCapture'] = []  # innermost last


class LayerRouting(NamedTuple):
    """What one MoE layer decided and produced (kept with `keep_tensors=True`)."""
    token_index: Optional[torch.Tensor]  # [B, E, capacity]; None for Soft MoE, whose slots hold no single token
    combine_weights: torch.Tensor  # [B, E, capacity]
    probs: torch.Tensor  # [B, T, E]
    output: torch.Tensor  # [B, T, D]
    input: Optional[torch.Tensor] = None  # [B, T, D] the layer's input
    expert_output: Optional[torch.Tensor] = None  # [E, B*capacity, D] every slot's expert output, before weighting


class RoutingCapture:
    """Aux losses and metrics (and, with `keep_tensors`, routing tensors) of the MoE layers run while open."""

    def __init__(self, keep_tensors: bool = False):
        self.keep_tensors = keep_tensors
        self.records: List[Tuple[str, torch.Tensor, Dict[str, torch.Tensor]]] = []
        self.tensors: List[Tuple[str, LayerRouting]] = []  # with keep_tensors, in call order
        self._stack = contextlib.ExitStack()

    def record(self, name: str, routing, output: Optional[torch.Tensor] = None, inputs: Optional[torch.Tensor] = None,
               expert_output: Optional[torch.Tensor] = None) -> None:
        self.records.append((name, routing.aux_loss, routing.metrics))
        if self.keep_tensors:
            token_index = routing.token_index if 'token_index' in routing._fields else None  # SoftRouting has none
            self.tensors.append((name, LayerRouting(token_index, routing.combine_weights, routing.probs,
                                                    output, inputs, expert_output)))

    @property
    def aux_loss(self) -> torch.Tensor:
        """Sum of the recorded layers' (already weighted) aux losses; a 0-dim zero when there are none."""
        if not self.records:
            return torch.zeros(())
        return torch.stack([aux.float() for _, aux, _ in self.records]).sum()

    @property
    def layers(self) -> Dict[str, Dict[str, torch.Tensor]]:
        """Layer name -> detached metrics (`expert_load` [E], `importance` [E], `dropped_fraction` scalar).

        A layer run twice in one capture (a model called twice) appears as 'name', 'name#2', ...
        """
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for name, _, metrics in self.records:
            key, n = name, 1
            while key in out:
                n += 1
                key = f'{name}#{n}'
            out[key] = metrics
        return out

    @property
    def dropped_fraction(self) -> torch.Tensor:
        """Mean over the recorded layers of their dropped fraction (a device tensor: no host sync)."""
        if not self.records:
            return torch.zeros(())
        return torch.stack([m['dropped_fraction'].float() for _, _, m in self.records]).mean()

    def __enter__(self) -> 'RoutingCapture':
        _OPEN.append(self)
        import torch._dynamo  # lazily: only training opens captures
        if hasattr(torch._dynamo.config, 'skip_fwd_side_effects_in_bwd_under_checkpoint'):
            self._stack.enter_context(torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=True))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        _OPEN.remove(self)


def capture_routing(keep_tensors: bool = False) -> RoutingCapture:
    """A context manager collecting the routing of every MoE layer run inside it (see the module docstring)."""
    return RoutingCapture(keep_tensors)


_REPLAYS: List[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = []  # innermost last


@contextlib.contextmanager
def replay_routing(decisions: Dict[str, Tuple[torch.Tensor, torch.Tensor]]):
    """Make the named MoE layers use given slot decisions instead of their own top-k choices.

    `decisions`: layer name -> (token_index [B, E, capacity], filled [B, E, capacity] bool). The routers still
    compute their probabilities; the combine weights are those probabilities at the given slots. Used to check
    another runtime's arithmetic on exactly its own routing (e.g. ONNX Runtime's choices among tied tokens).
    """
    _REPLAYS.append(decisions)
    try:
        yield
    finally:
        _REPLAYS.remove(decisions)


def replayed_routing(name: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The decisions an open `replay_routing` gives layer `name`, or None."""
    return _REPLAYS[-1].get(name) if _REPLAYS else None


def record_routing(name: str, routing, output: Optional[torch.Tensor] = None, inputs: Optional[torch.Tensor] = None,
                   expert_output: Optional[torch.Tensor] = None) -> None:
    """Called by MoE layers at the end of their forward: record into the innermost open capture, if any."""
    if _OPEN:
        _OPEN[-1].record(name, routing, output, inputs, expert_output)
