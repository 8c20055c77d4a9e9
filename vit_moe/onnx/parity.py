""" Parity of an exported model with PyTorch, with routing told apart from arithmetic.

Expert choice makes a discrete decision per expert slot: which tokens rank in an expert's top `capacity`. When
two tokens' router probabilities for an expert are equal to float precision, PyTorch and ONNX Runtime (other
summation orders, multithreaded reductions) may pick different tokens, and the logits then differ by far more
than float noise although both graphs are right. A max |logit difference| alone therefore fails correct exports.

With a debug export (`export_onnx(..., expose_routing=True)`: every MoE layer's slot token indices, combine
weights and output are extra outputs), the check
1. replays ONNX Runtime's slot decisions in PyTorch (`vit_moe.layers.replay_routing`) and compares the two on the
   same routing: the arithmetic check. The logits must agree to `atol`, and every MoE layer's output to
   `layer_rtol` of its scale (1e-4; float noise is ~1e-6); the first MoE layer that does not is named;
2. compares, layer by layer, ONNX Runtime's choice of tokens with PyTorch's own choice under the same inputs (the
   replayed run's router probabilities): a token one picked and the other did not is a flipped slot; it is a tie
   when the two tokens' probabilities for that expert differ by at most `tie_rtol` (relative). A flip that is not a
   tie fails the check, naming the layer, image, expert and slot.
So a correct graph passes whatever the router's state, and a wrong one fails. For token choice the gap is measured
on the expert's probability, an approximation of its priority order.

Quantized (int8) and fp16 graphs move probabilities more than float noise: for them flips are reported (with their
gaps) and the logits are judged relative to their scale (`rtol`), not by a max difference that cannot hold.
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..layers import capture_routing, moe_layers, replay_routing
from .metadata import ROUTING_OUTPUTS_KEY
from .runtime import OnnxClassifier

__all__ = ['check_onnx_parity', 'compare_slots', 'format_parity', 'DEFAULT_TIE_RTOL']

DEFAULT_TIE_RTOL = 1e-5  # two probabilities this close (relative) are a tie for a runtime's top-k
DEFAULT_LAYER_RTOL = 1e-4  # a MoE layer's output off by more (relative to its scale) on the same routing is wrong


def compare_slots(probs: torch.Tensor, reference: torch.Tensor, other: torch.Tensor, other_filled: torch.Tensor,
                  reference_filled: torch.Tensor, tie_rtol: float = DEFAULT_TIE_RTOL) -> List[Dict[str, Any]]:
    """Flipped slots between two runtimes' decisions for one layer.

    Args:
        probs: [B, T, E] router probabilities both decisions are judged under.
        reference, other: [B, E, capacity] token index per slot (PyTorch's and ONNX Runtime's).
        reference_filled, other_filled: [B, E, capacity] which slots hold a token.
        tie_rtol: relative probability gap up to which a flip is a tie.

    Returns:
        one dict per flipped slot: image, expert, slot (in `other`), the two tokens, `gap` (absolute probability
        difference) and `tie`.
    """
    flips = []
    B, E, _ = reference.shape
    for b in range(B):
        for e in range(E):
            ref = {int(t) for t, f in zip(reference[b, e], reference_filled[b, e]) if f}
            got = [(c, int(t)) for c, (t, f) in enumerate(zip(other[b, e], other_filled[b, e])) if f]
            only_got = [(c, t) for c, t in got if t not in ref]
            only_ref = sorted(ref - {t for _, t in got}, key=lambda t: -float(probs[b, t, e]))
            only_got.sort(key=lambda ct: -float(probs[b, ct[1], e]))
            for (slot, token), ref_token in zip(only_got, only_ref):
                p_got, p_ref = float(probs[b, token, e]), float(probs[b, ref_token, e])
                gap = abs(p_got - p_ref)
                flips.append(dict(image=b, expert=e, slot=slot, token=token, reference_token=ref_token, gap=gap,
                                  tie=gap <= tie_rtol * max(p_got, p_ref, 1e-30)))
    return flips


def _routing_names(classifier: OnnxClassifier) -> List[str]:
    meta = classifier.session.get_modelmeta().custom_metadata_map
    return json.loads(meta[ROUTING_OUTPUTS_KEY]) if ROUTING_OUTPUTS_KEY in meta else []


def _run_debug(classifier: OnnxClassifier, x: np.ndarray, layers: List[str]):
    outputs = classifier.session.run(None, {classifier.input.name: np.ascontiguousarray(x, dtype=classifier.dtype)})
    routing = {name: outputs[1 + 3 * i: 4 + 3 * i] for i, name in enumerate(layers)}
    return outputs[0].astype(np.float32), routing


def _near_ties(probs: torch.Tensor, capacity: int, tie_rtol: float) -> int:
    """Expert-choice decision boundaries (capacity-th vs next token) closer than the tie tolerance."""
    if capacity >= probs.shape[1]:
        return 0
    top = probs.transpose(1, 2).topk(capacity + 1, dim=-1).values  # [B, E, capacity + 1]
    last, first_out = top[..., -2], top[..., -1]
    return int(((last - first_out).abs() <= tie_rtol * last.clamp_min(1e-30)).sum())


def _check_batch(model, classifier, x, layers, atol, rtol, tie_rtol, device, dtype,
                 layer_rtol: float = DEFAULT_LAYER_RTOL) -> Dict[str, Any]:
    xt = torch.from_numpy(x).to(device, dtype)
    with torch.no_grad(), capture_routing(keep_tensors=True):
        expected = model(xt).float().cpu().numpy()
    if layers:
        got, ort_routing = _run_debug(classifier, x, layers)
    else:
        got, ort_routing = classifier(x).astype(np.float32), {}
    result = dict(max_abs_diff=float(np.abs(got - expected).max()), max_abs_logit=float(np.abs(expected).max()),
                  top1_agreement=float((got.argmax(-1) == expected.argmax(-1)).mean()), routing_checked=bool(layers))
    if not layers:
        tolerance = atol if atol is not None else rtol * result['max_abs_logit']
        result['ok'] = result['max_abs_diff'] <= tolerance
        return result
    decisions = {name: (torch.from_numpy(r[0]).to(device), torch.from_numpy(r[1]).to(device) > 0)
                 for name, r in ort_routing.items()}
    with torch.no_grad(), replay_routing(decisions), capture_routing(keep_tensors=True) as replayed:
        replay = model(xt).float().cpu().numpy()
    routers = {m.layer_name: m.router for m in moe_layers(model).values()}
    flips, slots, near_ties, first_bad_layer = [], 0, 0, None
    for name, layer in replayed.tensors:
        own = routers[name].route(layer.probs.clamp_min(1e-30).log())  # PyTorch's choice under the same inputs
        token_index, combine = decisions[name]
        for flip in compare_slots(layer.probs, own.token_index, token_index, combine, own.combine_weights > 0,
                                  tie_rtol):
            flips.append(dict(flip, layer=name))
        slots += token_index.numel()
        near_ties += _near_ties(layer.probs, token_index.shape[-1], tie_rtol)
        ort_output = torch.from_numpy(ort_routing[name][2].astype(np.float32))
        reference_output = layer.output.float().cpu()
        layer_diff = float((ort_output - reference_output).abs().max())
        scale = float(reference_output.abs().max())
        if first_bad_layer is None and atol is not None and layer_diff > layer_rtol * max(scale, 1e-12):
            first_bad_layer = dict(layer=name, max_abs_diff=layer_diff, max_abs_output=scale)
    replay_diff = float(np.abs(got - replay).max())
    tolerance = atol if atol is not None else rtol * result['max_abs_logit']
    non_ties = [f for f in flips if not f['tie']]
    exact = atol is not None  # float graphs: every flip must be a tie
    result.update(slots=slots, flips=len(flips), ties=len(flips) - len(non_ties), near_ties=near_ties,
                  max_tie_gap=max((f['gap'] for f in flips if f['tie']), default=0.0),
                  non_ties=non_ties[:5], num_non_ties=len(non_ties), replay_max_abs_diff=replay_diff,
                  first_bad_layer=first_bad_layer,
                  ok=replay_diff <= tolerance and (not exact or not non_ties and first_bad_layer is None))
    return result


def check_onnx_parity(
        model: torch.nn.Module,
        onnx_path: Union[str, Path],
        batch_sizes: Sequence[int] = (1, 3, 8),
        seed: int = 1234,
        providers: Optional[Sequence[str]] = None,
        atol: Optional[float] = 1e-3,
        rtol: float = 0.1,
        tie_rtol: float = DEFAULT_TIE_RTOL,
) -> Dict[int, Dict[str, Any]]:
    """PyTorch vs ONNX Runtime on fresh random inputs (another seed and other batch sizes than the export's).

    Args:
        model: the PyTorch model the file was exported from (any device; its mode is restored).
        onnx_path: an exported file; a debug export (`expose_routing=True`) gets the routing-aware check.
        atol: logit tolerance for float graphs; None judges the logits relative to their scale (`rtol`) and
            reports flips without failing on them (quantized graphs).
        rtol: with `atol=None`, the max |logit difference| allowed as a fraction of max |logit|.
        tie_rtol: relative probability gap up to which a flipped slot is a tie.

    Returns:
        batch size -> {max_abs_diff, max_abs_logit, top1_agreement, routing_checked, ok} and, for a debug export,
        slots, flips, ties, near_ties, max_tie_gap, non_ties (up to 5, each naming layer, image, expert, slot,
        tokens and gap), num_non_ties, replay_max_abs_diff, first_bad_layer.
    """
    classifier = OnnxClassifier(onnx_path, providers=providers)
    layers = _routing_names(classifier)
    param = next(model.parameters())
    dtype, device, was_training = param.dtype, param.device, model.training
    model.eval()
    height, width = classifier.data_config['input_size'][1:]
    generator = torch.Generator().manual_seed(seed)
    results = {}
    try:
        for batch in batch_sizes:
            x = torch.randn(batch, 3, height, width, generator=generator).to(dtype).float().numpy()
            results[batch] = _check_batch(model, classifier, x, layers, atol, rtol, tie_rtol, device, dtype)
    finally:
        model.train(was_training)
    return results


def format_parity(batch: int, r: Dict[str, Any]) -> str:
    """One line, e.g. 'batch 8: max |logit diff| 3.5e-02 (2 routing ties of 1664 slots, gap <= 3e-07); with ONNX
    Runtime's routing replayed 2.1e-06: ok'."""
    line = f'batch {batch:3d}: max |logit diff| {r["max_abs_diff"]:.1e}'
    if r['routing_checked']:
        flips = f'{r["ties"]} routing ties' + (f', {r["num_non_ties"]} other flips' if r['num_non_ties'] else '')
        gap = f', gap <= {r["max_tie_gap"]:.0e}' if r['ties'] else ''
        line += (f' ({flips} of {r["slots"]} slots{gap}); with ONNX Runtime\'s routing replayed '
                 f'{r["replay_max_abs_diff"]:.1e}')
    line += f'; top-1 agreement {r["top1_agreement"]:.3f}: {"ok" if r["ok"] else "FAIL"}'
    if not r['ok'] and r.get('first_bad_layer'):  # the root cause: later layers see other inputs
        bad = r['first_bad_layer']
        line += f' - {bad["layer"]} output differs by {bad["max_abs_diff"]:.1e} on the same routing'
    elif not r['ok'] and r.get('non_ties'):
        f = r['non_ties'][0]
        line += (f' - {f["layer"]} image {f["image"]} expert {f["expert"]} slot {f["slot"]}: token {f["token"]} '
                 f'instead of {f["reference_token"]}, probability gap {f["gap"]:.1e} (not a tie)')
    return line
