""" MoeConfig: every MoE option, validated once, with what follows from them (capacity, top-k, scale, FLOPs).

Public entry points take flat keyword arguments (`timm.create_model(name, num_experts=8, router='token_choice')`,
`vit_moe.upcycle(model, ...)`); they build one `MoeConfig`, which the model, its MoE layers and their routers read.
An option that has no meaning for the chosen router (or expert init) is refused, naming it, when it is given; an
option that is not given (or given as None) takes its router's default. So a config holds, and `to_dict()` writes,
only options that change what the model computes. Each option's facts (the routers it applies to, its default, what
it accepts) are stated once, in `OPTIONS`; `options_table()` prints them.

With expert granularity G the E experts are 1/G hidden slices of the dense MLP in G groups of E / G (one group per
slice; the router's softmax, top-k and normalisation act within each group), and C and k keep the expert FLOPs per
token of a whole-expert MoE: expert choice gives every expert ceil(C * G * T / E) slots (C * T whole-MLP evaluations
per image), token choice lets each token pick its top k in every group (k * G slices, k whole MLPs) within
ceil(C * k * G * T / E) slots per expert.
"""
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

__all__ = ['MoeConfig', 'MOE_OPTIONS', 'OPTIONS', 'ROUTER_NAMES', 'PREFIX_TOKENS', 'EXPERT_INITS',
           'SOFT_UPCYCLING_SCALE', 'MoeBlocks', 'round_capacity', 'expert_choice_slots', 'token_choice_slots',
           'is_int', 'options_table']

ROUTER_NAMES = ('expert_choice', 'token_choice', 'soft')
SLOT_ROUTERS = ('expert_choice', 'token_choice')
PREFIX_TOKENS = ('compete', 'always')
EXPERT_INITS = ('copy', 'random', 'drop')
MoeBlocks = Union[int, str, Sequence[int]]

# Soft MoE's initial logit scale for upcycled models: sharp dispatch and combine keep each slot close to one token
# (benchmarks/results/digits_upcycled_start.md: the validation loss right after upcycling per scale)
SOFT_UPCYCLING_SCALE = 100.0


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _moe_blocks(value: Any) -> bool:
    return is_int(value) and value >= 0 or isinstance(value, str) and (
        value in ('all', 'every_other') or re.fullmatch(r'every_[1-9]\d*', value) is not None) or \
        isinstance(value, (list, tuple)) and all(is_int(i) for i in value)


class Option(NamedTuple):
    """One option's facts: the routers it applies to ('drop_ratio' also needs expert_init='drop'), its default there,
    and what it accepts: `valid(value, config)` and the words that say so ('expected ...' / 'accepted: ...')."""
    routers: Tuple[str, ...]
    default: Any
    valid: Callable[[Any, 'MoeConfig'], bool]
    accepted: Union[str, Callable[['MoeConfig'], str]]


OPTIONS: Dict[str, Option] = {
    'num_experts': Option(ROUTER_NAMES, 32, lambda v, c: is_int(v) and v >= 1, 'expected an integer >= 1'),
    'moe_blocks': Option(ROUTER_NAMES, None, lambda v, c: v is None or _moe_blocks(v),
                         "expected None (the last half), an int N (the last N blocks), 'every_other', 'every_N', "
                         "'all', or a list of block indices"),
    'output_scale': Option(ROUTER_NAMES, False, lambda v, c: isinstance(v, bool), 'expected true or false'),
    'num_shared_experts': Option(ROUTER_NAMES, 0, lambda v, c: is_int(v) and v >= 0, 'expected an integer >= 0'),
    'expert_init': Option(ROUTER_NAMES, 'copy', lambda v, c: v in EXPERT_INITS,
                          f'accepted: {", ".join(EXPERT_INITS)}'),
    'drop_ratio': Option(ROUTER_NAMES, 0.5, lambda v, c: _number(v) and 0.0 <= v <= 1.0,
                         'expected a fraction in [0, 1]'),
    'expert_granularity': Option(SLOT_ROUTERS, 1, lambda v, c: is_int(v) and v >= 1 and c.num_experts % v == 0,
                                 lambda c: f'expected an integer >= 1 that divides num_experts={c.num_experts}'),
    'capacity_factor': Option(SLOT_ROUTERS, 2.0, lambda v, c: _number(v) and v > 0, 'expected a number > 0'),
    'layer_capacity_factors': Option(
        SLOT_ROUTERS, None, lambda v, c: v is None or isinstance(v, dict) and all(
            isinstance(k, str) and _number(x) and x > 0 for k, x in v.items()),
        'expected None or a mapping of MoE layer names to numbers > 0, e.g. {"blocks.11.mlp": 1.0} (these '
        'layers\' own C)'),
    'router_norm': Option(SLOT_ROUTERS, False, lambda v, c: isinstance(v, bool), 'expected true or false'),
    'capacity_multiple_of': Option(SLOT_ROUTERS, None, lambda v, c: v is None or is_int(v) and v >= 1,
                                   'None or an integer >= 1'),
    'prefix_tokens': Option(SLOT_ROUTERS, 'compete', lambda v, c: v in PREFIX_TOKENS,
                            f'accepted: {", ".join(PREFIX_TOKENS)}'),
    'top_k': Option(('token_choice',), 2, lambda v, c: is_int(v) and 1 <= v <= c.num_experts // c.groups,
                    lambda c: f'expected an integer in [1, {c.num_experts // c.groups}] (the experts of '
                              f'{"a group: num_experts / expert_granularity" if c.groups > 1 else "the layer"})'),
    'batch_priority': Option(('token_choice',), True, lambda v, c: isinstance(v, bool), 'expected true or false'),
    'aux_loss_weight': Option(('token_choice',), 0.01, lambda v, c: _number(v) and v >= 0, 'expected a number >= 0'),
    'z_loss_weight': Option(('token_choice',), 0.0, lambda v, c: _number(v) and v >= 0, 'expected a number >= 0'),
    'slots_per_expert': Option(('soft',), 1, lambda v, c: is_int(v) and v >= 1, 'expected an integer >= 1'),
    'soft_scale': Option(('soft',), SOFT_UPCYCLING_SCALE, lambda v, c: _number(v) and v > 0, 'expected a number > 0'),
}
MOE_OPTIONS = ('router',) + tuple(OPTIONS)  # every keyword argument an upcycled model takes besides the backbone's
# options that only set how many slots a router fills: changed on a built model by `set_capacity_factor`, the weights
# stay (every other option shapes the weights or what they were trained to compute)
CAPACITY_OPTIONS = ('capacity_factor', 'layer_capacity_factors', 'capacity_multiple_of')


def _applies(name: str, router: str, expert_init: Optional[str]) -> bool:
    return router in OPTIONS[name].routers and (name != 'drop_ratio' or (expert_init or 'copy') == 'drop')


def options_table() -> str:
    """A markdown table of every option: the routers it applies to, its default there, what it accepts."""
    rows = ['| option | routers | default | accepts |', '|---|---|---|---|']
    for name, option in OPTIONS.items():
        routers = 'all' if option.routers == ROUTER_NAMES else ' / '.join(option.routers)
        routers += ", with expert_init='drop'" if name == 'drop_ratio' else ''
        accepted = option.accepted if isinstance(option.accepted, str) else 'see its message'
        rows.append(f'| {name} | {routers} | {option.default!r} | {accepted} |')
    return '\n'.join(rows)


@dataclass(frozen=True, repr=False)
class MoeConfig:
    """The MoE options of a model or layer (`OPTIONS` says what each one does where). Build it with
    `MoeConfig(**options)`: options not given take their router's default, options that do not apply stay None, and a
    bad or meaningless one raises a ValueError naming it and what is accepted."""
    router: str = 'expert_choice'
    num_experts: Optional[int] = None
    moe_blocks: Optional[Any] = None
    output_scale: Optional[bool] = None
    num_shared_experts: Optional[int] = None
    expert_init: Optional[str] = None
    drop_ratio: Optional[float] = None
    expert_granularity: Optional[int] = None
    capacity_factor: Optional[float] = None
    layer_capacity_factors: Optional[Dict[str, float]] = None
    router_norm: Optional[bool] = None
    capacity_multiple_of: Optional[int] = None
    prefix_tokens: Optional[str] = None
    top_k: Optional[int] = None
    batch_priority: Optional[bool] = None
    aux_loss_weight: Optional[float] = None
    z_loss_weight: Optional[float] = None
    slots_per_expert: Optional[int] = None
    soft_scale: Optional[float] = None

    def __post_init__(self):
        if self.router not in ROUTER_NAMES:
            raise ValueError(f'router={self.router!r} is not valid; accepted: {", ".join(ROUTER_NAMES)}')
        for name, option in OPTIONS.items():  # in table order: an option's check may read those before it
            value = getattr(self, name)
            applies = _applies(name, self.router, self.expert_init)
            if value is not None and not applies:
                if name == 'drop_ratio' and self.router in option.routers:
                    raise ValueError(f"drop_ratio={value!r} has no meaning with expert_init={self.expert_init!r} (it "
                                     f"applies to expert_init='drop'); remove it")
                raise ValueError(f'{name}={value!r} has no meaning with router={self.router!r} (it applies to router '
                                 f'{" / ".join(option.routers)}); remove it')
            if applies:
                value = option.default if value is None else value
                if not option.valid(value, self):
                    accepted = option.accepted if isinstance(option.accepted, str) else option.accepted(self)
                    raise ValueError(f'{name}={value!r} is not valid; {accepted}')
            object.__setattr__(self, name, value if applies else None)

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def from_kwargs(cls, kwargs: Dict[str, Any]) -> Tuple['MoeConfig', Dict[str, Any]]:
        """(the MoeConfig of the MoE options in `kwargs`, the other kwargs) for an entry point's flat arguments."""
        options = {k: kwargs[k] for k in MOE_OPTIONS if k in kwargs}
        rest = {k: v for k, v in kwargs.items() if k not in MOE_OPTIONS}
        return cls(**options), rest

    @staticmethod
    def unused_options(options: Dict[str, Any]) -> Tuple[str, ...]:
        """The options in `options` (flat MoE keyword arguments) that its router and expert_init give no meaning: what
        vit-moe <= 0.2 accepted and ignored, and saved in config.json."""
        router = options.get('router') or 'expert_choice'
        init = options.get('expert_init') or 'copy'
        return tuple(k for k, v in options.items() if k in OPTIONS and v is not None and not _applies(k, router, init))

    def replace(self, **changes) -> 'MoeConfig':
        """A copy with `changes` (options of another router become None when `router` changes)."""
        given = {k: v for k, v in self.to_dict().items()}
        if 'router' in changes and changes['router'] != self.router:
            given = {k: v for k, v in given.items() if k in OPTIONS and OPTIONS[k].routers == ROUTER_NAMES}
        return MoeConfig(**dict(given, **changes))

    def to_dict(self) -> Dict[str, Any]:
        """The options that apply, with their values (what config.json records)."""
        out = {'router': self.router}
        for name in OPTIONS:
            value = getattr(self, name)
            if value is not None or name in ('moe_blocks', 'capacity_multiple_of', 'layer_capacity_factors') and \
                    _applies(name, self.router, self.expert_init):
                out[name] = list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) \
                    else value
        return out

    def __repr__(self) -> str:
        return f'MoeConfig({", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())})'

    def for_layer(self, name: str) -> 'MoeConfig':
        """What the layer at module path `name` runs: its own capacity factor from `layer_capacity_factors`, if
        named there."""
        if not self.layer_capacity_factors or name not in self.layer_capacity_factors:
            return self
        return dataclasses.replace(self, capacity_factor=float(self.layer_capacity_factors[name]),
                                   layer_capacity_factors=None)

    # --------------------------------------------------------------------------------------------- derived
    @property
    def groups(self) -> int:
        """G: routing groups of experts (one per hidden slice of the dense MLP); 1 for Soft MoE."""
        return self.expert_granularity or 1

    def priority_tokens(self, num_prefix_tokens: int) -> int:
        """Leading tokens of an image (class token, registers) every expert takes first: with prefix_tokens='always'."""
        return int(num_prefix_tokens) if self.prefix_tokens == 'always' else 0

    def capacity(self, num_tokens: int, priority_tokens: int = 0) -> int:
        """Slots per expert per image for `num_tokens` tokens, `priority_tokens` of them prefix tokens taken first.

        expert choice: P + ceil(C * G * (T - P) / E) (at most T); token choice: ceil(C * k * G * T / E) (at most T);
        Soft MoE: slots_per_expert. Rounded up to `capacity_multiple_of` before the bound."""
        if self.router == 'soft':
            return self.slots_per_expert
        if self.router == 'token_choice':
            return token_choice_slots(num_tokens, self.num_experts, self.capacity_factor, self.top_k, self.groups,
                                      self.capacity_multiple_of)
        return expert_choice_slots(num_tokens, priority_tokens, self.num_experts, self.capacity_factor, self.groups,
                                   self.capacity_multiple_of)

    def output_scale_init(self) -> float:
        """The start of `output_scale`: 1 / the expected sum of a token's combine weights in one group at a uniform
        router, E / (C * G) for expert choice and E / (k * G) for token choice (1 with router_norm and Soft MoE, whose
        weights sum to 1): an upcycled layer starts near its dense MLP."""
        if self.router == 'soft' or self.router_norm:
            return 1.0
        per_group = self.top_k if self.router == 'token_choice' else self.capacity_factor
        return self.num_experts / (per_group * self.groups)

    def unscaled_prefix(self, num_prefix_tokens: int) -> int:
        """Leading tokens `output_scale` leaves alone: expert choice's 'always' prefix tokens, whose combine weights
        are their router probabilities over every expert (summing to 1 per group: the dense MLP at the start)."""
        return self.priority_tokens(num_prefix_tokens) if self.router == 'expert_choice' else 0

    def expert_evaluations(self, num_tokens: int, num_prefix_tokens: int = 0) -> float:
        """Whole-MLP evaluations per image computed by the experts, every slot counted, empty or not: E * capacity / G
        (each expert 1/G of the MLP) plus S * T for S shared experts."""
        slots = self.num_experts * self.capacity(num_tokens, self.priority_tokens(num_prefix_tokens))
        return slots / self.groups + self.num_shared_experts * num_tokens

    def expert_flops_per_token(self, num_tokens: int, mlp_flops_per_token: float, num_prefix_tokens: int = 0) -> float:
        """Expert FLOPs per token (every slot computed) for a dense MLP of `mlp_flops_per_token`."""
        return self.expert_evaluations(num_tokens, num_prefix_tokens) * mlp_flops_per_token / num_tokens


# The capacity formulas, as plain functions of numbers: the routers call them in their (scripted, exported) forward.
def round_capacity(capacity: float, num_tokens: int, multiple_of: Optional[int] = None) -> int:
    """ceil(capacity), rounded up to a multiple of `multiple_of`, within [1, num_tokens]."""
    rounded = math.ceil(capacity)
    if multiple_of is not None and multiple_of > 1:
        rounded = int(math.ceil(rounded / multiple_of)) * multiple_of
    return max(1, min(rounded, num_tokens))  # an expert cannot take a token twice


def expert_choice_slots(num_tokens: int, priority_tokens: int, num_experts: int, capacity_factor: float,
                        groups: int = 1, multiple_of: Optional[int] = None) -> int:
    """P + ceil(C * G * (T - P) / E) slots per expert: the P priority tokens, and C * T whole-MLP evaluations per
    image over the other tokens; the whole count rounded up to `multiple_of`, at most T."""
    prefix = min(priority_tokens, num_tokens)
    if prefix == num_tokens:
        return num_tokens
    rest = num_tokens - prefix
    return round_capacity(float(prefix + max(1, math.ceil(capacity_factor * groups * rest / num_experts))), num_tokens,
                          multiple_of)


def token_choice_slots(num_tokens: int, num_experts: int, capacity_factor: float, top_k: int, groups: int = 1,
                       multiple_of: Optional[int] = None) -> int:
    """ceil(C * k * G * T / E) slots per expert: room for C times the k * G picks of every token."""
    return round_capacity(capacity_factor * top_k * groups * num_tokens / num_experts, num_tokens, multiple_of)
