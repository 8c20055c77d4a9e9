""" Banks of E MLP experts stored as stacked weights and run with batched matmuls, one bank per timm MLP class.

| timm MLP (timm/layers/mlp.py) | bank | parameters (dense `mlp.X` -> `mlp.experts.X`) |
|---|---|---|
| `Mlp` (hidden `norm` or not), `GatedMlp` without a gate | `ExpertMlps` | fc1, [norm], fc2 |
| `GluMlp`, `SwiGLUPacked` (packed fc1, either gate half) | `ExpertGluMlps` | fc1 (2H wide), [norm], fc2 |
| `SwiGLU` (separate gate and value, hidden norm or not) | `ExpertSwiGLUs` | fc1_g, fc1_x, [norm], fc2 |

Names follow timm's so that a dense checkpoint maps onto a bank key by key: a linear weight [out, in] becomes
[E, in, out] (`StackedLinear`), a bias or norm vector [n] becomes [E, n]. Every bank takes tokens grouped per expert
[E, N, dim] and returns [E, N, dim]; `expert_bank_like(mlp, E)` builds the bank for a dense MLP module. Each bank
names, for Drop-Upcycling, where its hidden units are (`hidden_units`): the same unit index in every tensor listed.
"""
import copy
from typing import Dict, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import GatedMlp, GluMlp, Mlp, SwiGLU, to_2tuple, trunc_normal_

__all__ = ['StackedLinear', 'StackedLayerNorm', 'ExpertMlps', 'ExpertGluMlps', 'ExpertSwiGLUs', 'expert_bank_like',
           'EXPERT_BANKS']

# tensor suffix -> (dim of the hidden units in the [E, ...] tensor, offsets of the unit's copies along it)
HiddenUnits = Dict[str, Tuple[int, Tuple[int, ...]]]


class StackedLinear(nn.Module):
    """E independent linear layers: weight [E, in, out], bias [E, out]; input [E, N, in] -> [E, N, out]."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None
        self.init_weights()

    def init_weights(self) -> None:
        trunc_normal_(self.weight, std=.02)  # same as timm's ViT init of nn.Linear
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # compute in the weights' dtype: casting the activations is cheaper than a copy of E experts' weights
        # (under autocast both are cast to the autocast dtype anyway)
        x = x.to(self.weight.dtype)  # [E, N, in]
        if self.bias is None:
            return torch.bmm(x, self.weight)  # [E, N, out]
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)  # [E, N, out]

    def extra_repr(self) -> str:
        return f'num_experts={self.num_experts}, in_features={self.in_features}, ' \
               f'out_features={self.out_features}, bias={self.bias is not None}'


class StackedLayerNorm(nn.Module):
    """E LayerNorms over the last dim: weight / bias [E, features]; input [E, N, features]."""

    def __init__(self, num_experts: int, features: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_experts, features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_experts, features)) if affine else None

    @classmethod
    def like(cls, norm: nn.Module, num_experts: int) -> 'StackedLayerNorm':
        if not isinstance(norm, nn.LayerNorm) or len(norm.normalized_shape) != 1 or \
                norm.elementwise_affine and norm.bias is None:
            raise TypeError(f'a hidden norm must be an nn.LayerNorm over the hidden units (with bias if affine), got '
                            f'{norm!r}')
        return cls(num_experts, norm.normalized_shape[0], norm.eps, norm.elementwise_affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps)  # [E, N, features]
        if self.weight is None:
            return x
        return x * self.weight.unsqueeze(1).to(x.dtype) + self.bias.unsqueeze(1).to(x.dtype)  # [E, N, features]

    def extra_repr(self) -> str:
        return f'eps={self.eps}, affine={self.weight is not None}'


def _hidden_norm(norm: nn.Module, num_experts: int, granularity: int = 1) -> nn.Module:
    if isinstance(norm, nn.Identity):
        return nn.Identity()
    if granularity > 1:
        raise TypeError('an MLP with a hidden norm cannot be split into fine-grained experts (the norm spans all its '
                        'hidden units); accepted: expert_granularity=1 for it')
    return StackedLayerNorm.like(norm, num_experts)


def _slice(hidden: int, granularity: int, mlp: nn.Module) -> int:
    """Hidden units of one fine-grained expert: 1/granularity of the dense MLP's."""
    if hidden % granularity:
        raise ValueError(f'expert_granularity={granularity} does not divide the {hidden} hidden units of '
                         f'{type(mlp).__name__}; accepted: a divisor of {hidden}')
    return hidden // granularity


def _act(act_layer: Union[Type[nn.Module], nn.Module]) -> nn.Module:
    return copy.deepcopy(act_layer) if isinstance(act_layer, nn.Module) else act_layer()  # keeps its arguments


def _like(mlp: nn.Module, fc1: nn.Linear, num_experts: int, granularity: int) -> dict:
    """A bank's keyword arguments taken from a dense timm MLP whose input projection is `fc1`."""
    return dict(act_layer=mlp.act, bias=(fc1.bias is not None, mlp.fc2.bias is not None),
                drop=(mlp.drop1.p, mlp.drop2.p), norm=_hidden_norm(mlp.norm, num_experts, granularity))


class _ExpertBank(nn.Module):
    """Shared parts: in / hidden / out widths and the Drop-Upcycling map of hidden units."""
    in_features: int
    hidden_features: int  # hidden units of one expert (the width of its activation)
    out_features: int

    def hidden_units(self) -> HiddenUnits:
        raise NotImplementedError

    def _set_widths(self, in_features: int, hidden_features: int, out_features: Optional[int], bias, drop
                    ) -> Tuple[Tuple[bool, bool], Tuple[float, float]]:
        """The widths (out_features defaults to in_features); returns bias and dropout as (fc1, fc2) pairs."""
        self.in_features, self.hidden_features = in_features, hidden_features
        self.out_features = out_features or in_features
        return to_2tuple(bias), to_2tuple(drop)

    def _hidden_to_output(self, num_experts: int, act_layer, drop_probs: Tuple[float, float], norm: Optional[nn.Module],
                          bias: bool) -> None:
        """What every bank has after its input projection(s): act, drop, [norm], fc2 [E, hidden, out], drop."""
        self.act = _act(act_layer)
        self.drop1 = nn.Dropout(drop_probs[0])
        self.norm = norm if norm is not None else nn.Identity()
        self.fc2 = StackedLinear(num_experts, self.hidden_features, self.out_features, bias=bias)
        self.drop2 = nn.Dropout(drop_probs[1])

    def extra_repr(self) -> str:
        return f'in_features={self.in_features}, hidden_features={self.hidden_features}'


class ExpertMlps(_ExpertBank):
    """E copies of timm's `Mlp` (fc1 -> act -> drop -> [norm] -> fc2 -> drop) computed together."""

    def __init__(
            self,
            num_experts: int,
            in_features: int,
            hidden_features: int,
            out_features: Optional[int] = None,
            act_layer: Union[Type[nn.Module], nn.Module] = nn.GELU,
            bias: Union[bool, Tuple[bool, bool]] = True,
            drop: Union[float, Tuple[float, float]] = 0.,
            norm: Optional[nn.Module] = None,
    ):
        super().__init__()
        bias, drop_probs = self._set_widths(in_features, hidden_features, out_features, bias, drop)
        self.fc1 = StackedLinear(num_experts, in_features, hidden_features, bias=bias[0])
        self._hidden_to_output(num_experts, act_layer, drop_probs, norm, bias[1])

    @classmethod
    def like(cls, mlp: nn.Module, num_experts: int, granularity: int = 1) -> 'ExpertMlps':
        """A randomly initialised bank shaped like a dense timm `Mlp` (or a `GatedMlp` without a gate); with
        `granularity` G each expert has 1/G of its hidden units."""
        if isinstance(mlp, GatedMlp) and not isinstance(mlp.gate, nn.Identity):
            raise TypeError(f'GatedMlp with a {type(mlp.gate).__name__} gate cannot be upcycled: the gate mixes tokens '
                            f'(gMLP), an expert sees only some of them; accepted: GatedMlp without gate_layer')
        if not isinstance(mlp.fc1, nn.Linear):
            raise TypeError(f'{type(mlp).__name__} with {type(mlp.fc1).__name__} layers cannot be upcycled (conv MLP); '
                            f'accepted: nn.Linear fc1 / fc2')
        return cls(num_experts, mlp.fc1.in_features, _slice(mlp.fc1.out_features, granularity, mlp),
                   mlp.fc2.out_features, **_like(mlp, mlp.fc1, num_experts, granularity))

    def hidden_units(self) -> HiddenUnits:
        return {'fc1.weight': (2, (0,)), 'fc1.bias': (1, (0,)), 'fc2.weight': (1, (0,))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act(self.fc1(x)))  # [E, N, hidden]
        x = self.fc2(self.norm(x))  # [E, N, out]
        return self.drop2(x)


class ExpertGluMlps(_ExpertBank):
    """E copies of timm's `GluMlp` / `SwiGLUPacked`: a packed fc1 2H wide whose halves are value and gate
    (`gate_last`: the gate is the second half), act(gate) * value -> drop -> [norm] -> fc2 -> drop."""

    def __init__(
            self,
            num_experts: int,
            in_features: int,
            hidden_features: int,
            out_features: Optional[int] = None,
            act_layer: Union[Type[nn.Module], nn.Module] = nn.Sigmoid,
            bias: Union[bool, Tuple[bool, bool]] = True,
            drop: Union[float, Tuple[float, float]] = 0.,
            norm: Optional[nn.Module] = None,
            gate_last: bool = True,
    ):
        super().__init__()
        bias, drop_probs = self._set_widths(in_features, hidden_features, out_features, bias, drop)
        self.gate_last = gate_last
        self.fc1 = StackedLinear(num_experts, in_features, 2 * hidden_features, bias=bias[0])
        self._hidden_to_output(num_experts, act_layer, drop_probs, norm, bias[1])

    @classmethod
    def like(cls, mlp: GluMlp, num_experts: int, granularity: int = 1) -> 'ExpertGluMlps':
        if not isinstance(mlp.fc1, nn.Linear):
            raise TypeError(f'GluMlp with {type(mlp.fc1).__name__} layers cannot be upcycled (conv MLP); accepted: '
                            f'nn.Linear fc1 / fc2')
        return cls(num_experts, mlp.fc1.in_features, _slice(mlp.fc1.out_features // 2, granularity, mlp),
                   mlp.fc2.out_features, gate_last=mlp.gate_last, **_like(mlp, mlp.fc1, num_experts, granularity))

    def hidden_units(self) -> HiddenUnits:
        halves = (0, self.hidden_features)  # a hidden unit is one column in each half: value and gate
        return {'fc1.weight': (2, halves), 'fc1.bias': (1, halves), 'fc2.weight': (1, (0,))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.fc1(x).chunk(2, dim=-1)  # [E, N, hidden] each
        x = x1 * self.act(x2) if self.gate_last else self.act(x1) * x2  # [E, N, hidden]
        x = self.fc2(self.norm(self.drop1(x)))  # [E, N, out]
        return self.drop2(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f', gate_last={self.gate_last}'


class ExpertSwiGLUs(_ExpertBank):
    """E copies of timm's `SwiGLU`: act(fc1_g(x)) * fc1_x(x) -> drop -> [norm] -> fc2 -> drop."""

    def __init__(
            self,
            num_experts: int,
            in_features: int,
            hidden_features: int,
            out_features: Optional[int] = None,
            act_layer: Union[Type[nn.Module], nn.Module] = nn.SiLU,
            bias: Union[bool, Tuple[bool, bool]] = True,
            drop: Union[float, Tuple[float, float]] = 0.,
            norm: Optional[nn.Module] = None,
    ):
        super().__init__()
        bias, drop_probs = self._set_widths(in_features, hidden_features, out_features, bias, drop)
        self.fc1_g = StackedLinear(num_experts, in_features, hidden_features, bias=bias[0])
        self.fc1_x = StackedLinear(num_experts, in_features, hidden_features, bias=bias[0])
        self._hidden_to_output(num_experts, act_layer, drop_probs, norm, bias[1])

    @classmethod
    def like(cls, mlp: SwiGLU, num_experts: int, granularity: int = 1) -> 'ExpertSwiGLUs':
        return cls(num_experts, mlp.fc1_x.in_features, _slice(mlp.fc1_x.out_features, granularity, mlp),
                   mlp.fc2.out_features, **_like(mlp, mlp.fc1_x, num_experts, granularity))

    def hidden_units(self) -> HiddenUnits:
        one = (0,)
        return {'fc1_g.weight': (2, one), 'fc1_g.bias': (1, one), 'fc1_x.weight': (2, one), 'fc1_x.bias': (1, one),
                'fc2.weight': (1, one)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1_g(x)) * self.fc1_x(x)  # [E, N, hidden]
        x = self.fc2(self.norm(self.drop1(x)))  # [E, N, out]
        return self.drop2(x)


# dense timm MLP class -> bank (exact classes: a subclass may compute something else)
EXPERT_BANKS = {Mlp: ExpertMlps, GatedMlp: ExpertMlps, GluMlp: ExpertGluMlps, SwiGLU: ExpertSwiGLUs}


def expert_bank_like(mlp: nn.Module, num_experts: int, granularity: int = 1) -> _ExpertBank:
    """A randomly initialised bank of `num_experts` experts shaped like the dense timm MLP `mlp` (with `granularity`
    G: each expert a 1/G slice of its hidden units)."""
    bank = EXPERT_BANKS.get(type(mlp))
    if bank is None:
        raise TypeError(f'{type(mlp).__name__} cannot be upcycled; accepted MLPs: '
                        f'{", ".join(c.__name__ for c in EXPERT_BANKS)} (timm.layers; SwiGLUPacked is a GluMlp)')
    return bank.like(mlp, num_experts, granularity)
