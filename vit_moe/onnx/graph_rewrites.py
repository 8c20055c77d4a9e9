""" ONNX graph rewrites for exported (MoE) ViTs, applied before ONNX Runtime quantization or optimisation.

* `router_node_names`: the MatMul / Gemm nodes computing router logits (kept float32 by quantization),
* `fuse_erf_gelu`: the opset-18 exporter writes GELU as Div / Erf / Add / Mul / Mul, which ONNX Runtime's own
  optimiser leaves alone; replace it by com.microsoft Gelu (the same exact erf GELU, one kernel),
* `unroll_expert_matmuls` + `merge_expert_branches`: each batched expert MatMul [E, N, K] x [E, K, M] becomes
  Split -> E x (MatMul [1, N, K] x [K, M] + bias) -> Concat, and fc1 -> GELU -> fc2 then runs per expert without a
  Concat / Split in between. ONNX Runtime pre-packs only 2-D weights, so this is what lets it pre-pack the
  experts (README, "int8 experts": the measurement). Only the deployed graph is unrolled: the PyTorch
  model keeps its batched matmuls.
Every rewrite is exact (tests compare the rewritten graph with the original in ONNX Runtime).
"""
import collections
from typing import List, Optional, Tuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ['router_node_names', 'fuse_erf_gelu', 'unroll_expert_matmuls', 'merge_expert_branches', 'op_counts']


def op_counts(model: onnx.ModelProto) -> dict:
    return dict(sorted(collections.Counter(n.op_type for n in model.graph.node).items()))


def _meta(node: onnx.NodeProto, key: str) -> str:
    return next((p.value for p in node.metadata_props if p.key == key), '')


def _producers(graph):
    return {o: n for n in graph.node for o in n.output}


def _consumers(graph):
    c = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            c[i].append(n)
    return c


def _scalar(inits, name) -> Optional[float]:
    if name in inits and int(np.prod(inits[name].dims)) == 1:
        return float(numpy_helper.to_array(inits[name]).reshape(()))
    return None


def _const_value(name, inits, prod):
    """Value of an initializer, or of Unsqueeze(initializer, constant axes) (big biases are not constant-folded)."""
    if name in inits:
        return numpy_helper.to_array(inits[name])
    p = prod.get(name)
    if p is not None and p.op_type == 'Unsqueeze' and p.input[0] in inits and len(p.input) > 1 and p.input[1] in inits:
        v = numpy_helper.to_array(inits[p.input[0]])
        for ax in sorted(int(a) % (v.ndim + 1) for a in numpy_helper.to_array(inits[p.input[1]]).ravel()):
            v = np.expand_dims(v, ax)
        return v
    return None


def _remove_dead_nodes(graph):
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [k for k, n in enumerate(graph.node) if not any(o in used for o in n.output)]
        if not dead:
            return
        for k in reversed(dead):
            del graph.node[k]


def _declare_float_outputs(graph, names):
    """value_info (float, unknown shape) for new tensors, so that quantize_dynamic's type lookup (onnx shape
    inference, blind to com.microsoft ops) finds them."""
    known = {v.name for v in graph.value_info} | {o.name for o in graph.output} | {i.name for i in graph.input}
    for name in names:
        if name and name not in known:
            graph.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
            known.add(name)


def _ensure_ms_opset(model):
    if not any(o.domain == 'com.microsoft' for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid('com.microsoft', 1))


def router_node_names(model: onnx.ModelProto) -> List[str]:
    """MatMul / Gemm nodes that compute router logits (to keep in float32).

    1) the torch exporter's node metadata: a module path ending in '.router' or a class named '...Router'
       (vit_moe routers are `blocks.N.mlp.router`; their gate weight is constant-folded into an anonymous
       transposed initializer, so the initializer name cannot be used);
    2) structural fallback (metadata stripped by another tool): a MatMul / Gemm with a constant B (possibly
       through Transpose / Cast) whose output feeds a Softmax (attention's Q.K^T MatMul has no constant B).
    """
    g = model.graph
    inits = {i.name for i in g.initializer}
    prod, cons = _producers(g), _consumers(g)
    names = []
    for n in g.node:
        if n.op_type not in ('MatMul', 'Gemm'):
            continue
        scopes = _meta(n, 'pkg.torch.onnx.name_scopes')
        by_meta = "router'" in scopes or '.router' in scopes or 'Router' in _meta(n, 'pkg.torch.onnx.class_hierarchy')
        b = n.input[1]
        while b not in inits and b in prod and prod[b].op_type in ('Transpose', 'Cast', 'Identity'):
            b = prod[b].input[0]
        feeds_softmax = any(c.op_type == 'Softmax' for c in cons[n.output[0]])
        if by_meta or (b in inits and feeds_softmax):
            names.append(n.name)
    return names


def fuse_erf_gelu(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, int]:
    """x * (0.5 * (1 + erf(x / sqrt(2)))) as exported (Div, Erf, Add, Mul, Mul, constants in any operand order)
    -> com.microsoft Gelu(x) (exact erf GELU, one vectorised kernel)."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    prod, cons = _producers(g), _consumers(g)
    remove, replace = set(), {}

    def other(node, name):
        rest = [i for i in node.input if i != name]
        return rest[0] if len(rest) == 1 else None

    for erf in g.node:
        if erf.op_type != 'Erf':
            continue
        div = prod.get(erf.input[0])
        if div is None or div.op_type not in ('Div', 'Mul'):
            continue
        c = _scalar(inits, div.input[1])
        if c is None or not (abs(c - 2 ** .5) < 1e-4 if div.op_type == 'Div' else abs(c - 2 ** -.5) < 1e-4):
            continue
        x = div.input[0]
        users = cons[erf.output[0]]
        if len(users) != 1 or users[0].op_type != 'Add' or _scalar(inits, other(users[0], erf.output[0]) or '') != 1.0:
            continue
        add = users[0]
        users = cons[add.output[0]]
        if len(users) != 1 or users[0].op_type != 'Mul':
            continue
        m1 = users[0]
        o1 = other(m1, add.output[0])
        users = cons[m1.output[0]]
        if _scalar(inits, o1 or '') == 0.5 and len(users) == 1 and users[0].op_type == 'Mul' \
                and other(users[0], m1.output[0]) == x:
            last = users[0]  # 0.5 * (1 + erf) then * x
        elif o1 == x and len(users) == 1 and users[0].op_type == 'Mul' \
                and _scalar(inits, other(users[0], m1.output[0]) or '') == 0.5:
            last = users[0]  # x * (1 + erf) then * 0.5
        else:
            continue
        chain = [div, erf, add, m1, last]
        if any(len(cons[n.output[0]]) != 1 for n in chain[:-1]) or not all(n.name for n in chain):
            continue  # (node names identify what to drop; exported nodes are always named)
        remove.update(n.name for n in chain[:-1])
        replace[last.name] = helper.make_node('Gelu', [x], [last.output[0]], last.name + '/gelu',
                                              domain='com.microsoft')
    nodes = [replace.get(n.name, n) for n in g.node if n.name not in remove]
    del g.node[:]
    g.node.extend(nodes)
    if replace:
        _ensure_ms_opset(model)
    return model, len(replace)


def unroll_expert_matmuls(model: onnx.ModelProto, min_experts: int = 2) -> Tuple[onnx.ModelProto, int]:
    """Replace each MatMul with a 3-D constant B [E, K, M] (a batched expert matmul, `torch.baddbmm`) by
    Split(A [E, N, K], axis 0) -> E x MatMul([1, N, K], W_e [K, M]) -> Concat(axis 0). A following Add of a
    constant bias [E, 1, M] (initializer, or Unsqueeze of one) is split into per-expert [M] biases, so each branch
    is a plain linear layer. Weights become 2-D initializers `<weight name>.<e>`. Numerically identical."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    cons, prod = _consumers(g), _producers(g)
    opset = next(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx'))
    index = {n.output[0]: k for k, n in enumerate(g.node)}
    replaced, new_inits, new_names = {}, [], []
    count = 0

    def const(name, arr):
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    for k, n in enumerate(g.node):
        if n.op_type != 'MatMul' or n.input[1] not in inits:
            continue
        w_init = inits[n.input[1]]
        if len(w_init.dims) != 3 or w_init.dims[0] < min_experts:
            continue
        W = numpy_helper.to_array(w_init)  # [E, K, M]
        E = W.shape[0]
        users = cons[n.output[0]]
        bias_add, B = None, None
        if len(users) == 1 and users[0].op_type == 'Add':
            rest = [i for i in users[0].input if i != n.output[0]]
            b = _const_value(rest[0], inits, prod) if len(rest) == 1 else None
            if b is not None and b.ndim == 3 and b.shape[0] == E and b.shape[1] == 1 and b.shape[2] == W.shape[2]:
                bias_add, B = users[0], b
        base = n.name or f'expert_matmul_{count}'
        out = (bias_add or n).output[0]
        split_outs = [f'{base}/x.{e}' for e in range(E)]
        if opset >= 18:
            nodes = [helper.make_node('Split', [n.input[0]], split_outs, f'{base}/split', axis=0, num_outputs=E)]
        else:
            sizes = const(f'{base}/split_sizes', np.ones(E, np.int64))
            nodes = [helper.make_node('Split', [n.input[0], sizes], split_outs, f'{base}/split', axis=0)]
        branch_outs = []
        for e in range(E):
            w_name = const(f'{w_init.name}.{e}', W[e])
            y = f'{base}/y.{e}'
            nodes.append(helper.make_node('MatMul', [split_outs[e], w_name], [y], f'{base}/matmul.{e}'))
            new_names.append(y)
            if bias_add is not None:
                yb = f'{base}/yb.{e}'
                nodes.append(helper.make_node('Add', [y, const(f'{base}/bias.{e}', B[e, 0])], [yb], f'{base}/add.{e}'))
                new_names.append(yb)
                y = yb
            branch_outs.append(y)
        nodes.append(helper.make_node('Concat', branch_outs, [out], f'{base}/concat', axis=0))
        new_names += split_outs
        replaced[k] = nodes
        if bias_add is not None:
            replaced[index[bias_add.output[0]]] = []
        count += 1
    nodes = []
    for k, n in enumerate(g.node):
        nodes.extend(replaced.get(k, [n]))
    del g.node[:]
    g.node.extend(nodes)
    _remove_dead_nodes(g)
    used = {i for nd in g.node for i in nd.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    _declare_float_outputs(g, new_names)
    return model, count


_ELEMENTWISE = {'Add', 'Sub', 'Mul', 'Div', 'Erf', 'Tanh', 'Sigmoid', 'Pow', 'Relu', 'Gelu', 'Sqrt', 'Neg', 'Identity'}


def merge_expert_branches(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, int]:
    """After `unroll_expert_matmuls`: Concat(E branches, axis 0) -> elementwise ops with scalar constants (the
    activation) -> Split(axis 0, E) becomes one copy of the elementwise ops per branch, so fc1 -> act -> fc2
    runs per expert without materialising [E, N, hidden]."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    cons = _consumers(g)
    remove, insert_at, new_names, merged = set(), {}, [], 0
    for cat in g.node:
        if cat.op_type != 'Concat' or not cat.name.endswith('/concat'):
            continue
        E = len(cat.input)
        region, frontier, split, ok, seen = [], [cat.output[0]], None, True, set()
        while frontier and ok:
            for c in cons[frontier.pop()]:
                if c.name in seen:
                    continue
                if c.op_type == 'Split' and len(c.output) == E and \
                        next((helper.get_attribute_value(a) for a in c.attribute if a.name == 'axis'), 0) == 0:
                    ok = split is None or split.name == c.name
                    split = c
                    continue
                if c.op_type not in _ELEMENTWISE or c.domain not in ('', 'ai.onnx', 'com.microsoft') or \
                        any(i in inits and int(np.prod(inits[i].dims)) != 1 for i in c.input):
                    ok = False
                    break
                seen.add(c.name)
                region.append(c)
                frontier.extend(c.output)
        if not ok or split is None or not region:
            continue
        inside = {o for n in region for o in n.output} | {cat.output[0]}
        if any(i not in inits and i not in inside for n in region for i in n.input):
            continue
        if any(c.name != split.name and c.name not in seen for o in inside for c in cons[o]):
            continue
        order = [n for n in g.node if n.name in seen]
        new = []
        for e, x_e in enumerate(cat.input):
            ren = {cat.output[0]: x_e}
            for n in order:
                outs = [f'{o}.e{e}' for o in n.output]
                ren.update(zip(n.output, outs))
                attributes = {a.name: helper.get_attribute_value(a) for a in n.attribute}
                new.append(helper.make_node(n.op_type, [ren.get(i, i) for i in n.input], outs, f'{n.name}.e{e}',
                                            domain=n.domain, **attributes))
                new_names += outs
            new.append(helper.make_node('Identity', [ren[split.input[0]]], [split.output[e]], f'{split.name}.id{e}'))
        remove |= {cat.name, split.name} | seen
        insert_at[split.name] = new
        merged += 1
    nodes = []
    for n in g.node:
        if n.name in insert_at:
            nodes.extend(insert_at[n.name])
        elif n.name not in remove:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    _declare_float_outputs(g, new_names)
    return model, merged
