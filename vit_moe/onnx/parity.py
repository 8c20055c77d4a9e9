""" Parity of an exported model with PyTorch, with routing told apart from arithmetic, layer by layer.

Expert choice makes a discrete decision per expert slot: which tokens rank in an expert's top `capacity`. When
two tokens' router probabilities for an expert are equal to float precision, PyTorch and ONNX Runtime (other
summation orders, multithreaded reductions) may pick different tokens, and the logits then differ by far more
than float noise although both graphs are right. A max |logit difference| alone therefore fails correct exports.
An int8 graph moves every activation, so its logits differ from PyTorch's everywhere, and a trained model's routing
flips between close tokens: a logit tolerance that passes every correct int8 graph would also pass wrong ones.

A debug export (`export_onnx(..., expose_routing=True)`) exposes every MoE layer's input, slot token indices,
combine weights, expert outputs and output. The check then takes each MoE layer apart *on ONNX Runtime's own
tensors*, so that no error made before the layer is counted against it:
1. router: PyTorch's router on ONNX Runtime's layer input chooses its slots; every slot ONNX Runtime filled
   differently must be a tie (the two tokens' probabilities for that expert equal within `tie_rtol`, relative);
2. combine weights: ONNX Runtime's must be the router probabilities at its slots (to 1e-4 of the largest);
3. experts: PyTorch's float32 experts on the tokens ONNX Runtime dispatched to them; each expert's outputs must
   agree to `expert_rtol` (relative RMS error over its slots): 1e-4 for float32 graphs, 2e-2 for float16, 0.25 for
   int8 (int8 rounding gives 1-5 %, a wrong scale or weight 30 % to 100 %+);
4. combine: the layer output must be ONNX Runtime's expert outputs weighted and summed per token (to 1e-4 of its
   scale; 1e-2 for float16).
The first layer that fails is named with its reason (and expert). For a float32 graph the end-to-end logits are also
checked: PyTorch replays ONNX Runtime's slot decisions (`vit_moe.layers.replay_routing`) and the logits must agree to
`atol`. For int8 and float16 graphs the end-to-end numbers are reported, not judged: max |logit difference|, its
ratio to max |logit|, top-1 agreement, and how many slots PyTorch float32 fills differently (arithmetic noise moves
tokens near a decision boundary). Their accuracy is measured on real images (`evaluate_onnx(reference=model)`,
`export/onnx_export.py --data-dir`).
"""
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from ..layers import capture_routing, moe_layers, replay_routing
from ..layers.moe_mlp import combine_by_matmul
from .export import ROUTING_KINDS
from .metadata import ROUTING_OUTPUTS_KEY
from .runtime import OnnxClassifier

__all__ = ['check_onnx_parity', 'compare_slots', 'format_parity', 'graph_kind', 'DEFAULT_TIE_RTOL', 'EXPERT_RTOL']

DEFAULT_TIE_RTOL = 1e-5  # two probabilities this close (relative) are a tie for a runtime's top-k
EXPERT_RTOL = {'fp32': 1e-4, 'fp16': 2e-2, 'int8': 0.25}  # relative RMS error of one expert on its own inputs
COMBINE_RTOL = {'fp32': 1e-4, 'fp16': 1e-2, 'int8': 1e-4}  # the combine is float arithmetic in every graph
WEIGHTS_RTOL = 1e-4  # combine weights vs router probabilities (float32 routers in every graph)


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


def graph_kind(classifier: OnnxClassifier) -> str:
    """'int8' (quantized by `quantize_onnx`), 'fp16' (float16 input) or 'fp32'."""
    if classifier.int8 is not None:
        return 'int8'
    return 'fp16' if classifier.dtype == np.float16 else 'fp32'


def _routing_names(classifier: OnnxClassifier) -> List[str]:
    meta = classifier.session.get_modelmeta().custom_metadata_map
    return json.loads(meta[ROUTING_OUTPUTS_KEY]) if ROUTING_OUTPUTS_KEY in meta else []


def _run_debug(classifier: OnnxClassifier, x: np.ndarray, layers: List[str]):
    outputs = classifier.session.run(None, {classifier.input.name: np.ascontiguousarray(x, dtype=classifier.dtype)})
    n = len(ROUTING_KINDS)
    routing = {name: dict(zip(ROUTING_KINDS, outputs[1 + n * i: 1 + n * (i + 1)])) for i, name in enumerate(layers)}
    return outputs[0].astype(np.float32), routing


def _near_ties(probs: torch.Tensor, capacity: int, tie_rtol: float) -> int:
    """Expert-choice decision boundaries (capacity-th vs next token) closer than the tie tolerance."""
    if capacity >= probs.shape[1]:
        return 0
    top = probs.transpose(1, 2).topk(capacity + 1, dim=-1).values  # [B, E, capacity + 1]
    last, first_out = top[..., -2], top[..., -1]
    return int(((last - first_out).abs() <= tie_rtol * last.clamp_min(1e-30)).sum())


def _slots_filled_differently(reference: torch.Tensor, other: torch.Tensor) -> int:
    """Slots [B, E, capacity] whose token is not among the reference's tokens for that image and expert."""
    same = (other.unsqueeze(-1) == reference.unsqueeze(-2)).any(dim=-1)  # [B, E, capacity]
    return int((~same).sum())


def _relative(diff: torch.Tensor, reference: torch.Tensor) -> float:
    """||diff|| / ||reference|| (Frobenius), 0 for two zero tensors."""
    scale = float(reference.float().norm())
    error = float(diff.float().norm())
    return error / scale if scale > 0 else (0.0 if error == 0 else math.inf)


@torch.no_grad()
def check_moe_layer(layer, ort: Dict[str, np.ndarray], kind: str = 'fp32', tie_rtol: float = DEFAULT_TIE_RTOL,
                    expert_rtol: Optional[float] = None) -> Dict[str, Any]:
    """One MoE layer of an ONNX Runtime run, taken apart on its own tensors (see the module docstring).

    Args:
        layer: the PyTorch `MoeMlp` the graph was exported from.
        ort: ONNX Runtime's `input`, `token_index`, `combine_weights`, `expert_output` and `output` of the layer.
        kind: 'fp32', 'fp16' or 'int8' (sets the default tolerances).
        expert_rtol: relative RMS error allowed per expert (default `EXPERT_RTOL[kind]`).

    Returns:
        {ok, reason (why not ok, else ''), flips (list of compare_slots dicts), near_ties, weights_error,
         expert_errors ([E] relative RMS errors), worst_expert, combine_error}.
    """
    expert_rtol = EXPERT_RTOL[kind] if expert_rtol is None else expert_rtol
    param = next(layer.parameters())
    device, dtype = param.device, param.dtype
    x = torch.from_numpy(np.asarray(ort['input'], dtype=np.float32)).to(device, dtype)  # [B, T, D]
    token_index = torch.from_numpy(ort['token_index'].astype(np.int64)).to(device)  # [B, E, capacity]
    combine = torch.from_numpy(ort['combine_weights'].astype(np.float32)).to(device)  # [B, E, capacity]
    expert_out = torch.from_numpy(ort['expert_output'].astype(np.float32)).to(device)  # [E, B*capacity, D]
    output = torch.from_numpy(ort['output'].astype(np.float32)).to(device)  # [B, T, D]
    B, T, D = x.shape
    E, capacity = token_index.shape[1:]
    filled = combine > 0  # [B, E, capacity]

    own = layer.router(x)  # PyTorch's decisions on ONNX Runtime's input
    flips = compare_slots(own.probs, own.token_index, token_index, filled, own.combine_weights > 0, tie_rtol)
    expected_weights = layer.router.replay(own.probs, token_index, filled)  # [B, E, capacity]
    weights_error = float((combine - expected_weights).abs().max()) / max(float(own.probs.max()), 1e-30)

    offsets = torch.arange(B, device=device).view(B, 1, 1) * T  # [B, 1, 1]
    slots = (token_index + offsets).transpose(0, 1).reshape(-1)  # [E*B*capacity]
    expert_in = x.reshape(B * T, D).index_select(0, slots).view(E, B * capacity, D)  # [E, B*capacity, D]
    reference = layer.experts(expert_in).float()  # [E, B*capacity, D]
    expert_errors = [_relative(expert_out[e] - reference[e], reference[e]) for e in range(E)]
    worst = int(np.argmax(expert_errors))

    combined = layer.scaled(combine_by_matmul(expert_out, token_index, combine, T))  # [B, T, D]
    shared_error = 0.0
    if layer.shared_experts is not None:  # what is left of the output is the shared experts', checked as an expert
        reference_shared = layer.shared_output(x).float()  # [B, T, D]
        shared_error = _relative(output - combined - reference_shared, reference_shared)
        combined = combined + reference_shared
    combine_error = float((output - combined).abs().max()) / max(float(combined.abs().max()), 1e-12)
    if layer.shared_experts is not None:
        combine_error = 0.0  # the residual above holds both the combine and the shared experts' arithmetic

    reason = ''
    non_ties = [f for f in flips if not f['tie']]
    if non_ties:
        f = non_ties[0]
        reason = (f'router: image {f["image"]} expert {f["expert"]} slot {f["slot"]} took token {f["token"]} instead '
                  f'of {f["reference_token"]} on its own input, probability gap {f["gap"]:.1e} (not a tie)')
    elif weights_error > WEIGHTS_RTOL:
        reason = f'combine weights differ from the router probabilities by {weights_error:.1e} (relative)'
    elif expert_errors[worst] > expert_rtol:
        reason = (f'expert {worst} output differs by {expert_errors[worst]:.1e} (relative RMS) on its own inputs, '
                  f'allowed {expert_rtol:g}')
    elif shared_error > expert_rtol:
        reason = (f'shared experts plus combine differ by {shared_error:.1e} (relative RMS) on the layer input, '
                  f'allowed {expert_rtol:g}')
    elif combine_error > COMBINE_RTOL[kind]:
        reason = f'combine of the expert outputs differs by {combine_error:.1e} (relative)'
    return dict(ok=not reason, reason=reason, flips=flips, near_ties=_near_ties(own.probs, capacity, tie_rtol),
                weights_error=weights_error, expert_errors=expert_errors, worst_expert=worst,
                combine_error=combine_error, shared_error=shared_error)


def _check_batch(model, classifier, x, layers, kind: str = 'fp32', atol: Optional[float] = 1e-3,
                 rtol: Optional[float] = None, tie_rtol: float = DEFAULT_TIE_RTOL,
                 expert_rtol: Optional[float] = None) -> Dict[str, Any]:
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    xt = torch.from_numpy(x).to(device, dtype)
    with torch.no_grad(), capture_routing(keep_tensors=True) as own_run:
        expected = model(xt).float().cpu().numpy()
    if layers:
        got, ort_routing = _run_debug(classifier, x, layers)
    else:
        got, ort_routing = classifier(x).astype(np.float32), {}
    max_abs_logit = float(np.abs(expected).max())
    result = dict(kind=kind, max_abs_diff=float(np.abs(got - expected).max()), max_abs_logit=max_abs_logit,
                  top1_agreement=float((got.argmax(-1) == expected.argmax(-1)).mean()), routing_checked=bool(layers))
    result['relative_diff'] = result['max_abs_diff'] / max(max_abs_logit, 1e-12)
    logits_ok = True
    if rtol is not None:
        logits_ok = result['relative_diff'] <= rtol
    if not layers:
        if atol is not None and kind == 'fp32':
            logits_ok = logits_ok and result['max_abs_diff'] <= atol
        result['ok'] = logits_ok
        return result

    modules = {m.layer_name: m for m in moe_layers(model).values()}
    own_decisions = {name: t.token_index for name, t in own_run.tensors}
    layer_results, flips, slots, near_ties, first_bad_layer, moved = {}, [], 0, 0, None, 0
    for name in layers:
        checked = check_moe_layer(modules[name], ort_routing[name], kind, tie_rtol, expert_rtol)
        layer_results[name] = {k: v for k, v in checked.items() if k != 'flips'}
        flips += [dict(f, layer=name) for f in checked['flips']]
        token_index = torch.from_numpy(ort_routing[name]['token_index'].astype(np.int64))
        slots += token_index.numel()
        near_ties += checked['near_ties']
        moved += _slots_filled_differently(own_decisions[name].cpu(), token_index)
        if first_bad_layer is None and not checked['ok']:
            first_bad_layer = dict(layer=name, reason=checked['reason'], expert=checked['worst_expert'])
    non_ties = [f for f in flips if not f['tie']]
    result.update(slots=slots, flips=len(flips), ties=len(flips) - len(non_ties), near_ties=near_ties,
                  max_tie_gap=max((f['gap'] for f in flips if f['tie']), default=0.0), non_ties=non_ties[:5],
                  num_non_ties=len(non_ties), first_bad_layer=first_bad_layer, layers=layer_results,
                  slots_moved_vs_pytorch=moved, expert_rtol=EXPERT_RTOL[kind] if expert_rtol is None else expert_rtol,
                  max_expert_error=max(max(r['expert_errors']) for r in layer_results.values()))
    if kind == 'fp32':  # the end-to-end logits on ONNX Runtime's own routing
        decisions = {name: (torch.from_numpy(r['token_index'].astype(np.int64)).to(device),
                            torch.from_numpy(r['combine_weights'].astype(np.float32)).to(device) > 0)
                     for name, r in ort_routing.items()}
        with torch.no_grad(), replay_routing(decisions):
            replay = model(xt).float().cpu().numpy()
        result['replay_max_abs_diff'] = float(np.abs(got - replay).max())
        logits_ok = logits_ok and (atol is None or result['replay_max_abs_diff'] <= atol)
    result['ok'] = logits_ok and first_bad_layer is None
    return result


def check_onnx_parity(
        model: torch.nn.Module,
        onnx_path: Union[str, Path],
        batch_sizes: Sequence[int] = (1, 3, 8),
        seed: int = 1234,
        providers: Optional[Sequence[str]] = None,
        atol: Optional[float] = 1e-3,
        rtol: Optional[float] = None,
        tie_rtol: float = DEFAULT_TIE_RTOL,
        expert_rtol: Optional[float] = None,
) -> Dict[int, Dict[str, Any]]:
    """PyTorch vs ONNX Runtime on fresh random inputs (another seed and other batch sizes than the export's).

    Args:
        model: the PyTorch model the file was exported from (any device; its mode is restored).
        onnx_path: an exported file; a debug export (`expose_routing=True`) gets the layer-by-layer check.
        atol: float32 graphs: the logits on ONNX Runtime's own routing (or, without routing outputs, on PyTorch's)
            must agree to this. Not used for int8 / float16 graphs.
        rtol: if given, also require max |logit difference| <= rtol x max |logit| (any graph); None: reported only.
        tie_rtol: relative probability gap up to which a flipped slot is a tie.
        expert_rtol: relative RMS error allowed per expert on its own inputs (default by graph kind, `EXPERT_RTOL`).

    Returns:
        batch size -> {kind, max_abs_diff, max_abs_logit, relative_diff, top1_agreement, routing_checked, ok} and,
        for a debug export, slots, flips, ties, near_ties, max_tie_gap, non_ties (up to 5, each naming layer, image,
        expert, slot, tokens and gap), num_non_ties, first_bad_layer ({layer, reason, expert} or None), layers (per
        layer: weights_error, expert_errors, worst_expert, combine_error, ...), max_expert_error,
        slots_moved_vs_pytorch (slots PyTorch float32 fills differently on its own forward) and, for float32 graphs,
        replay_max_abs_diff.
    """
    classifier = OnnxClassifier(onnx_path, providers=providers)
    kind = graph_kind(classifier)
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
            results[batch] = _check_batch(model, classifier, x, layers, kind, atol, rtol, tie_rtol, expert_rtol)
    finally:
        model.train(was_training)
    return results


def format_parity(batch: int, r: Dict[str, Any]) -> str:
    """One line, e.g. 'batch 8: max |logit diff| 3.5e-02 (2 routing ties of 1664 slots, gap <= 3e-07); with ONNX
    Runtime's routing replayed 2.1e-06; top-1 agreement 1.000: ok' for a float32 graph, or for int8
    'batch 8: max |logit diff| 8.4e-01 (0.11 of max |logit|; 6 of 432 slots filled differently from PyTorch
    float32); layer by layer on ONNX Runtime's own inputs: 0 routing ties, experts within 3.1e-02 (allowed 0.25): ok'.
    """
    kind = r.get('kind', 'fp32')
    line = f'batch {batch:3d}: max |logit diff| {r["max_abs_diff"]:.1e}'
    if kind != 'fp32':
        line += f' ({r["relative_diff"]:.2f} of max |logit|'
        if r['routing_checked']:
            line += f'; {r["slots_moved_vs_pytorch"]} of {r["slots"]} slots filled differently from PyTorch float32'
        line += ')'
    if r['routing_checked']:
        flips = f'{r["ties"]} routing ties' + (f', {r["num_non_ties"]} other flips' if r['num_non_ties'] else '')
        gap = f', gap <= {r["max_tie_gap"]:.0e}' if r['ties'] else ''
        if kind == 'fp32':
            line += (f' ({flips} of {r["slots"]} slots{gap}); with ONNX Runtime\'s routing replayed '
                     f'{r["replay_max_abs_diff"]:.1e}; top-1 agreement {r["top1_agreement"]:.3f}')
        else:
            line += (f'; layer by layer on ONNX Runtime\'s own inputs: {flips}{gap}, experts within '
                     f'{r["max_expert_error"]:.1e} (allowed {r["expert_rtol"]:g})')
    elif kind == 'fp32':
        line += f'; top-1 agreement {r["top1_agreement"]:.3f}'
    line += f': {"ok" if r["ok"] else "FAIL"}'
    bad = r.get('first_bad_layer')
    if not r['ok'] and bad:  # the root cause: later layers see other inputs
        line += f' - {bad["layer"]}: {bad["reason"]}'
    return line
