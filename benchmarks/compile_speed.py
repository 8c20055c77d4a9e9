"""time(torch.compile) / time(eager) on CPU for the MoE layer and an upcycled model's training step, interleaved.

    python benchmarks/compile_speed.py [--batch 8] [--tokens 197] [--dim 768] [--hidden 3072] [--experts 32]
        [--capacity-factor 2] [--model vit_s16_moe_upcycled] [--img-size 224] [--model-kwargs "{depth: 4}"]
        [--fullgraph] [--mode default] [--optimizer] [--threads N] [--parts layer model] [--rounds 10]

Three items, each compiled with inductor (`torch.compile(module)`, default mode) and compared with the same
module run eagerly (eager and compiled share the parameters):

* `layer fwd`: `MoeMlp` forward under inference_mode, ViT-B/16 shapes by default (batch 8, 197 tokens, dim 768,
  hidden 3072, E=32, expert choice C=2); `--dim 384 --hidden 1536` for S/16 shapes;
* `layer fwd+bwd`: the same layer, input requiring grad, output backward with a fixed random gradient;
* `model step`: forward in `vit_moe.capture_routing()`, cross-entropy + routing aux loss, backward (+ an AdamW
  step outside the compiled module with --optimizer); `vit_s16_moe_upcycled` at 224 px by default.

For each item: the first compiled call (compilation + one run) is timed on its own and kept out of the medians;
then eager and compiled alternate round by round (`--repeats` calls each per round) so machine noise hits both
alike; medians (min-max), the median (min-max) of the per-round ratio compiled / eager (lower is better) and
the ratio of the fastest calls (min / min: the least disturbed by other work on the machine) are printed. The compiled
result is checked against eager before timing (max abs diff of output / loss and of the gradients) and the
dynamo counters give graphs compiled, graph breaks, and graphs compiled after the first call (recompilations).
Inductor's compile workers are processes of their own; `--threads` sets only torch's intra-op threads.
With the defaults (B/16 layer shapes, S/16 model) the whole run took 3.7-4.5 minutes on a 2-core CPU (6.5 with
other jobs on the cores), about 1.5 of them compiling; `--parts layer` or `--parts model` runs one half.
TORCH_LOGS=recompiles,graph_breaks prints dynamo's own reasons (the layer's fwd+bwd graph is a second compile of
the same forward, guarded on grad mode: expected).
"""
import argparse
import os
import statistics
import tempfile
import time

import timm
import torch
import torch.nn.functional as F
import yaml

import vit_moe
from vit_moe import MoeMlp


def _dynamo_counts():
    from torch._dynamo.utils import counters
    return counters['stats']['unique_graphs'], sum(counters['graph_break'].values()), dict(counters['graph_break'])


def _max_abs_diff(a, b) -> float:
    return max((x.detach().float() - y.detach().float()).abs().max().item() for x, y in zip(a, b))


def _grads(module, *extra):
    return [p.grad.clone() for p in module.parameters() if p.grad is not None] + [t.grad.clone() for t in extra]


class Item:
    """One eager / compiled pair: `fn(module, check)` runs a call and returns (output tensors, gradient tensors);
    with check=True (the eager reference and the first compiled call) it leaves the weights as they were."""

    def __init__(self, name, module, fn, compiled, zero_grad=None, out_name='output'):
        self.name, self.module, self.fn, self.compiled, self.zero_grad = name, module, fn, compiled, zero_grad
        self.out_name = out_name

    def call(self, module, check=False):
        if self.zero_grad is not None:
            self.zero_grad()
        return self.fn(module, check)

    def run(self, rounds: int, repeats: int, warmup: int):
        graphs0, breaks0, _ = _dynamo_counts()
        eager_out, eager_grads = self.call(self.module, check=True)
        start = time.perf_counter()
        compiled_out, compiled_grads = self.call(self.compiled, check=True)  # first call: compile + run
        self.compile_s = time.perf_counter() - start
        self.graphs, self.breaks, self.break_reasons = _dynamo_counts()
        self.graphs -= graphs0
        self.breaks -= breaks0
        self.out_diff = _max_abs_diff(eager_out, compiled_out)
        self.out_scale = max(t.detach().abs().max().item() for t in eager_out)
        self.grad_diff = _max_abs_diff(eager_grads, compiled_grads) if eager_grads else None
        self.grad_scale = max(t.abs().max().item() for t in eager_grads) if eager_grads else None
        for _ in range(warmup):
            self.call(self.module), self.call(self.compiled)
        self.times = {'eager': [], 'compiled': []}
        for _ in range(rounds):
            for key, module in (('eager', self.module), ('compiled', self.compiled)):
                start = time.perf_counter()
                for _ in range(repeats):
                    self.call(module)
                self.times[key].append((time.perf_counter() - start) / repeats)
        self.recompiles = _dynamo_counts()[0] - graphs0 - self.graphs
        return self


def _ms(ts):
    return f'{statistics.median(ts) * 1e3:9.1f} ({min(ts) * 1e3:.1f}-{max(ts) * 1e3:.1f})'


def _report(items, rounds, repeats):
    print(f'\n{rounds} interleaved rounds x {repeats} call(s); times in ms: median (min-max)')
    print(f'{"item":14s} {"compile s":>9s} {"eager ms":>26s} {"compiled ms":>26s}  {"compiled / eager":>18s} '
          f'{"min / min":>9s}')
    for it in items:
        ratios = [c / e for c, e in zip(it.times['compiled'], it.times['eager'])]
        best = min(it.times['compiled']) / min(it.times['eager'])
        print(f'{it.name:14s} {it.compile_s:9.1f} {_ms(it.times["eager"]):>26s} {_ms(it.times["compiled"]):>26s}  '
              f'{statistics.median(ratios):5.2f} ({min(ratios):.2f}-{max(ratios):.2f}) {best:9.2f}')
    print('\ncompiled vs eager (same weights, same inputs), dynamo counters:')
    for it in items:
        grads = '' if it.grad_diff is None else f', grads max|diff| {it.grad_diff:.2e} (max|grad| {it.grad_scale:.2e})'
        print(f'{it.name:14s} {it.out_name} max|diff| {it.out_diff:.2e} (max|{it.out_name}| {it.out_scale:.2e}){grads}')
        print(f'{"":14s} graphs compiled by the first call {it.graphs}, graph breaks {it.breaks}, '
              f'graphs compiled after the first call {it.recompiles}')
        if it.breaks:
            for reason, n in it.break_reasons.items():
                print(f'{"":14s}   break x{n}: {reason}')


def _compile(module, args):
    kwargs = dict(fullgraph=args.fullgraph)
    if args.mode != 'default':
        kwargs['mode'] = args.mode
    return torch.compile(module, **kwargs)


def layer_items(args):
    torch.manual_seed(0)
    hidden = args.hidden or int(args.dim * 4)
    moe = MoeMlp(args.dim, hidden, num_experts=args.experts, router=args.router, capacity_factor=args.capacity_factor)
    compiled = _compile(moe, args)
    x = torch.randn(args.batch, args.tokens, args.dim)
    x_grad = x.clone().requires_grad_(True)
    grad_out = torch.randn(args.batch, args.tokens, args.dim)
    print(f'layer: batch {args.batch}, tokens {args.tokens}, dim {args.dim}, hidden {hidden}, experts {args.experts}, '
          f'{args.router} C {args.capacity_factor}, capacity {moe.router.capacity(args.tokens)}')

    def fwd(module, check):
        with torch.inference_mode():
            return [module(x)], []

    def fwd_bwd(module, check):
        with vit_moe.capture_routing() as routing:
            y = module(x_grad)
        (y * grad_out).sum().add(routing.aux_loss).backward()
        return [y], _grads(moe, x_grad)

    def zero_grad():
        moe.zero_grad(set_to_none=True)
        x_grad.grad = None

    return [Item('layer fwd', moe, fwd, compiled),  # the layer has no train / eval difference (no dropout here)
            Item('layer fwd+bwd', moe, fwd_bwd, compiled, zero_grad)]


def model_items(args):
    torch.manual_seed(0)
    kwargs = dict(args.model_kwargs)
    if args.img_size is not None:
        kwargs['img_size'] = args.img_size
    model = timm.create_model(args.model, **kwargs).train()
    dropouts = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if dropouts:  # eager and compiled draw different masks: the output check would compare different functions
        print(f'note: dropout active in {len(dropouts)} modules (e.g. {dropouts[0]}); output diffs are not meaningful')
    size = tuple(model.patch_embed.img_size) if hasattr(model, 'patch_embed') else \
        model.pretrained_cfg['input_size'][1:]
    images = torch.randn(args.batch, 3, *size)
    targets = torch.randint(0, model.num_classes, (args.batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5) if args.optimizer else None
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f'model: {args.model} {kwargs or ""} {params:.1f} M params, batch {args.batch}, {size[0]}x{size[1]} px, '
          f'{len(vit_moe.moe_layers(model))} MoE layers, '
          f'{"forward+backward+AdamW" if args.optimizer else "forward+backward"}')

    def step(module, check):
        with vit_moe.capture_routing() as routing:
            logits = module(images)
        loss = F.cross_entropy(logits, targets) + routing.aux_loss
        loss.backward()
        grads = _grads(model)
        if optimizer is not None and not check:  # the check compares eager and compiled on the same weights
            optimizer.step()
        return [loss], grads

    return [Item('model step', model, step, _compile(model, args), lambda: model.zero_grad(set_to_none=True), 'loss')]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--parts', nargs='+', default=['layer', 'model'], choices=['layer', 'model'])
    parser.add_argument('--batch', type=int, default=8, help='images per call, for the layer and the model')
    parser.add_argument('--tokens', type=int, default=197, help='layer: tokens per image')
    parser.add_argument('--dim', type=int, default=768, help='layer: token width')
    parser.add_argument('--hidden', type=int, default=None, help='layer: expert hidden width (default 4 * dim)')
    parser.add_argument('--experts', type=int, default=32, help='layer: number of experts')
    parser.add_argument('--capacity-factor', type=float, default=2.0, help='layer: C')
    parser.add_argument('--router', default='expert_choice', choices=['expert_choice', 'token_choice'],
                        help='layer: router')
    parser.add_argument('--model', default='vit_s16_moe_upcycled')
    parser.add_argument('--img-size', type=int, default=None, help="model: image size (default: the model's, 224)")
    parser.add_argument('--model-kwargs', type=yaml.safe_load, default={}, help='model: e.g. "{depth: 4}"')
    parser.add_argument('--optimizer', action='store_true', help='model: add an (eager) AdamW step to each step')
    parser.add_argument('--fullgraph', action='store_true', help='torch.compile(fullgraph=True): fail on a graph break')
    parser.add_argument('--mode', default='default', choices=['default', 'reduce-overhead', 'max-autotune',
                                                               'max-autotune-no-cudagraphs'])
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (default: all cores)')
    parser.add_argument('--rounds', type=int, default=10, help='interleaved measurement rounds')
    parser.add_argument('--repeats', type=int, default=1, help='calls per round')
    parser.add_argument('--warmup', type=int, default=2, help='calls of each after the first, before timing')
    parser.add_argument('--warm-cache', action='store_true',
                        help="use inductor's on-disk cache (default: a fresh empty one, so compile times are cold)")
    args = parser.parse_args(argv)

    cache = None
    if not args.warm_cache:  # read by inductor at compile time; set before the first compile
        cache = tempfile.TemporaryDirectory(prefix='compile_speed_inductor_')
        os.environ['TORCHINDUCTOR_CACHE_DIR'] = cache.name

    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    torch.set_num_threads(args.threads or cores)
    print(f'torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, '
          f'torch.compile(mode={args.mode!r}, fullgraph={args.fullgraph}), backend inductor, '
          f'{"warm (existing) inductor cache" if args.warm_cache else "cold inductor cache"}')
    start = time.perf_counter()
    items = []
    if 'layer' in args.parts:
        items += layer_items(args)
    if 'model' in args.parts:
        items += model_items(args)
    done = []
    for item in items:
        t0 = time.perf_counter()
        try:
            item.run(args.rounds, args.repeats, args.warmup)
        except Exception as e:  # with --fullgraph a graph break is an error: report it, go on with the next item
            if not args.fullgraph:
                raise
            print(f'{item.name}: does NOT compile with fullgraph=True: {type(e).__name__}: {str(e).splitlines()[0]}')
            continue
        done.append(item)
        print(f'{item.name}: first compiled call {item.compile_s:.1f} s, item done in {time.perf_counter() - t0:.0f} s',
              flush=True)
    if done:
        _report(done, args.rounds, args.repeats)
    print(f'\ntotal wall time {time.perf_counter() - start:.0f} s')
    if cache is not None:
        cache.cleanup()


if __name__ == '__main__':
    main()
