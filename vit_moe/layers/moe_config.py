""" MoeConfig: every MoE option, validated once, with what follows from them (capacity, top-k, scale, FLOPs).

Public entry points take flat keyword arguments (`timm.create_model(name, num_experts=8, router='token_choice')`,
`vit_moe.upcycle(model, ...)`); they build one `MoeConfig`, which the model, its MoE layers and their routers read.
An option that has no meaning for the chosen router (or expert init) is refused, naming it, when it is given; an
option that is not given (or given as None) takes its router's default. So a config holds, and `to_dict()` writes,
only options that change what the model computes.

| option | routers | default |
|---|---|---|
| num_experts, moe_blocks, router, output_scale, num_shared_experts, expert_init | all | 32, last half, expert_choice, False, 0, copy |
| capacity_factor, router_norm, capacity_multiple_of, prefix_tokens, expert_granularity | expert / token choice | 2.0, False, None, compete, 1 |
| layer_capacity_factors (layer name -> C, for the layers it names) | expert / token choice | None |
| top_k, batch_priority, aux_loss_weight, z_loss_weight | token choice | 2, True, 0.01, 0.0 |
| slots_per_expert, soft_scale | soft | 1, 100.0 |
| drop_ratio | expert_init='drop' | 0.5 |

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
from typing import Any, Dict, Optional, Sequence, Tuple, Union

__all__ = ['MoeConfig', 'MOE_OPTIONS', 'ROUTER_NAMES', 'PREFIX_TOKENS', 'EXPERT_INITS', 'SOFT_UPCYCLING_SCALE',
           'MoeBlocks', 'round_capacity', 'expert_choice_slots', 'token_choice_slots']

ROUTER_NAMES = ('expert_choice', 'token_choice', 'soft')
SLOT_ROUTERS = ('expert_choice', 'token_choice')
PREFIX_TOKENS = ('compete', 'always')
EXPERT_INITS = ('copy', 'random', 'drop')
MoeBlocks = Union[int, str, Sequence[int]]

# Soft MoE's initial logit scale for upcycled models: sharp dispatch and combine keep each slot close to one token
# (benchmarks/results/digits_upcycled_start.md: the validation loss right after upcycling per scale)
SOFT_UPCYCLING_SCALE = 100.0

# option -> (routers it applies to, its default there); drop_ratio applies to expert_init='drop' instead
_ALL = ROUTER_NAMES
_APPLIES: Dict[str, Tuple[Tuple[str, ...], Any]] = {
    'num_experts': (_ALL, 32),
    'moe_blocks': (_ALL, None),
    'output_scale': (_ALL, False),
    'num_shared_experts': (_ALL, 0),
    'expert_init': (_ALL, 'copy'),
    'drop_ratio': (_ALL, 0.5),
    'capacity_factor': (SLOT_ROUTERS, 2.0),
    'router_norm': (SLOT_ROUTERS, False),
    'capacity_multiple_of': (SLOT_ROUTERS, None),
    'layer_capacity_factors': (SLOT_ROUTERS, None),
    'prefix_tokens': (SLOT_ROUTERS, 'compete'),
    'expert_granularity': (SLOT_ROUTERS, 1),
    'top_k': (('token_choice',), 2),
    'batch_priority': (('token_choice',), True),
    'aux_loss_weight': (('token_choice',), 0.01),
    'z_loss_weight': (('token_choice',), 0.0),
    'slots_per_expert': (('soft',), 1),
    'soft_scale': (('soft',), SOFT_UPCYCLING_SCALE),
}
MOE_OPTIONS = ('router',) + tuple(_APPLIES)  # every keyword argument an upcycled model takes besides the backbone's
# options that only set how many slots a router fills: changed on a built model by `set_capacity_factor`, the weights
# stay (every other option shapes the weights or what they were trained to compute)
CAPACITY_OPTIONS = ('capacity_factor', 'layer_capacity_factors', 'capacity_multiple_of')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True, repr=False)
class MoeConfig:
    """The MoE options of a model or layer (see the module doc). Build it with `MoeConfig(**options)`: options not
    given take their router's default, options that do not apply stay None, and a bad or meaningless one raises a
    ValueError naming it and what is accepted."""
    router: str = 'expert_choice'
    num_experts: Optional[int] = None
    moe_blocks: Optional[Any] = None  # None (last half), int N (last N), 'every_other', 'every_N', 'all', or indices
    capacity_factor: Optional[float] = None
    top_k: Optional[int] = None
    router_norm: Optional[bool] = None
    capacity_multiple_of: Optional[int] = None
    layer_capacity_factors: Optional[Dict[str, float]] = None  # {'blocks.11.mlp': C}: these layers' own C
    batch_priority: Optional[bool] = None
    aux_loss_weight: Optional[float] = None
    z_loss_weight: Optional[float] = None
    output_scale: Optional[bool] = None
    prefix_tokens: Optional[str] = None
    num_shared_experts: Optional[int] = None
    expert_granularity: Optional[int] = None
    slots_per_expert: Optional[int] = None
    soft_scale: Optional[float] = None
    expert_init: Optional[str] = None
    drop_ratio: Optional[float] = None

    def __post_init__(self):
        if self.router not in ROUTER_NAMES:
            raise ValueError(f'router={self.router!r} is not valid; accepted: {", ".join(ROUTER_NAMES)}')
        init = self.expert_init if self.expert_init is not None else 'copy'
        for name, (routers, default) in _APPLIES.items():
            value = getattr(self, name)
            applies = self.router in routers and (name != 'drop_ratio' or init == 'drop')
            if value is not None and not applies:
                if name == 'drop_ratio' and self.router in routers:
                    raise ValueError(f"drop_ratio={value!r} has no meaning with expert_init={init!r} (it applies to "
                                     f"expert_init='drop'); remove it")
                raise ValueError(f'{name}={value!r} has no meaning with router={self.router!r} (it applies to router '
                                 f'{" / ".join(routers)}); remove it')
            object.__setattr__(self, name, (default if value is None else value) if applies else None)
        self._validate()

    def _validate(self) -> None:
        E = self.num_experts
        if not _is_int(E) or E < 1:
            raise ValueError(f'num_experts={E!r} is not valid; expected an integer >= 1')
        if self.expert_init not in EXPERT_INITS:
            raise ValueError(f'expert_init={self.expert_init!r} is not valid; accepted: {", ".join(EXPERT_INITS)}')
        if self.drop_ratio is not None and not 0.0 <= self.drop_ratio <= 1.0:
            raise ValueError(f'drop_ratio={self.drop_ratio!r} is not valid; expected a fraction in [0, 1]')
        if not _is_int(self.num_shared_experts) or self.num_shared_experts < 0:
            raise ValueError(f'num_shared_experts={self.num_shared_experts!r} is not valid; expected an integer >= 0')
        for flag in ('output_scale', 'router_norm', 'batch_priority'):
            value = getattr(self, flag)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f'{flag}={value!r} is not valid; expected true or false')
        self._validate_moe_blocks()
        if self.router == 'soft':
            S = self.slots_per_expert
            if not _is_int(S) or S < 1:
                raise ValueError(f'slots_per_expert={S!r} is not valid; expected an integer >= 1')
            if isinstance(self.soft_scale, bool) or not isinstance(self.soft_scale, (int, float)) or \
                    not self.soft_scale > 0:
                raise ValueError(f'soft_scale={self.soft_scale!r} is not valid; expected a number > 0')
            return
        G = self.expert_granularity
        if not _is_int(G) or G < 1 or E % G:
            raise ValueError(f'expert_granularity={G!r} is not valid for num_experts={E}; expected an integer >= 1 '
                             f'that divides num_experts')
        if isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, (int, float)) or \
                not self.capacity_factor > 0:
            raise ValueError(f'capacity_factor={self.capacity_factor!r} is not valid; expected a number > 0')
        per_layer = self.layer_capacity_factors
        if per_layer is not None and not (isinstance(per_layer, dict) and all(
                isinstance(k, str) and _is_positive_number(v) for k, v in per_layer.items())):
            raise ValueError(f'layer_capacity_factors={per_layer!r} is not valid; expected None or a mapping of MoE '
                             f'layer names to numbers > 0, e.g. {{"blocks.11.mlp": 1.0}}')
        multiple = self.capacity_multiple_of
        if multiple is not None and (not _is_int(multiple) or multiple < 1):
            raise ValueError(f'capacity_multiple_of={multiple!r} is not valid; expected None or an integer >= 1')
        if self.prefix_tokens not in PREFIX_TOKENS:
            raise ValueError(f'prefix_tokens={self.prefix_tokens!r} is not valid; accepted: {", ".join(PREFIX_TOKENS)}')
        if self.router == 'token_choice':
            k = self.top_k
            if not _is_int(k) or not 1 <= k <= E // G:
                raise ValueError(f'top_k={k!r} is not valid; expected an integer in [1, {E // G}] (the experts of '
                                 f'{"a group: num_experts / expert_granularity" if G > 1 else "the layer"})')
            for name in ('aux_loss_weight', 'z_loss_weight'):
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    raise ValueError(f'{name}={value!r} is not valid; expected a number >= 0')

    def _validate_moe_blocks(self) -> None:
        blocks = self.moe_blocks
        ok = blocks is None or _is_int(blocks) and blocks >= 0 or isinstance(blocks, str) and (
            blocks in ('all', 'every_other') or re.fullmatch(r'every_[1-9]\d*', blocks)) or \
            isinstance(blocks, (list, tuple)) and all(_is_int(i) for i in blocks)
        if not ok:
            raise ValueError(f"moe_blocks={blocks!r} is not valid; expected None (the last half), an int N (the last "
                             f"N blocks), 'every_other', 'every_N', 'all', or a list of block indices")

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
        return tuple(k for k, v in options.items() if k in _APPLIES and v is not None and not (
            router in _APPLIES[k][0] and (k != 'drop_ratio' or init == 'drop')))

    def replace(self, **changes) -> 'MoeConfig':
        """A copy with `changes` (options of another router become None when `router` changes)."""
        given = {k: v for k, v in self.to_dict().items()}
        if 'router' in changes and changes['router'] != self.router:
            given = {k: v for k, v in given.items() if k in ('num_experts', 'moe_blocks', 'output_scale',
                                                             'num_shared_experts', 'expert_init', 'drop_ratio')}
        return MoeConfig(**dict(given, **changes))

    def to_dict(self) -> Dict[str, Any]:
        """The options that apply, with their values (what config.json records)."""
        out = {'router': self.router}
        for name in _APPLIES:
            value = getattr(self, name)
            if value is not None or name in ('moe_blocks', 'capacity_multiple_of') and self._applies(name):
                out[name] = list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) \
                    else value
        return out

    def __repr__(self) -> str:
        return f'MoeConfig({", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())})'

    def _applies(self, name: str) -> bool:
        routers, _ = _APPLIES[name]
        return self.router in routers and (name != 'drop_ratio' or self.expert_init == 'drop')

    def __getitem__(self, name: str) -> Any:
        """`config['capacity_factor']`, as the dict `moe_config` of earlier versions read."""
        if name not in MOE_OPTIONS:
            raise KeyError(name)
        return getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        value = getattr(self, name, None) if name in MOE_OPTIONS else None
        return default if value is None else value

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
    return round_capacity(prefix + max(1, math.ceil(capacity_factor * groups * rest / num_experts)), num_tokens,
                          multiple_of)


def token_choice_slots(num_tokens: int, num_experts: int, capacity_factor: float, top_k: int, groups: int = 1,
                       multiple_of: Optional[int] = None) -> int:
    """ceil(C * k * G * T / E) slots per expert: room for C times the k * G picks of every token."""
    return round_capacity(capacity_factor * top_k * groups * num_tokens / num_experts, num_tokens, multiple_of)
