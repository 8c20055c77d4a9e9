""" A bank of E MLP experts stored as stacked weights and run with batched matmuls.

Names follow timm's `Mlp` (fc1, act, drop1, fc2, drop2) so that a dense checkpoint maps onto the
bank key by key: `mlp.fc1.weight` [hidden, dim] -> `mlp.experts.fc1.weight` [E, dim, hidden].
"""
import copy
from typing import Optional, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import Mlp, to_2tuple, trunc_normal_

__all__ = ['StackedLinear', 'ExpertMlps']


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


class ExpertMlps(nn.Module):
    """E copies of timm's `Mlp` (fc1 -> act -> drop -> fc2 -> drop) computed together."""

    def __init__(
            self,
            num_experts: int,
            in_features: int,
            hidden_features: int,
            out_features: Optional[int] = None,
            act_layer: Union[Type[nn.Module], nn.Module] = nn.GELU,
            bias: Union[bool, Tuple[bool, bool]] = True,
            drop: Union[float, Tuple[float, float]] = 0.,
    ):
        super().__init__()
        out_features = out_features or in_features
        bias = to_2tuple(bias)
        drop_probs = to_2tuple(drop)
        self.fc1 = StackedLinear(num_experts, in_features, hidden_features, bias=bias[0])
        self.act = copy.deepcopy(act_layer) if isinstance(act_layer, nn.Module) else act_layer()
        self.drop1 = nn.Dropout(drop_probs[0])
        self.fc2 = StackedLinear(num_experts, hidden_features, out_features, bias=bias[1])
        self.drop2 = nn.Dropout(drop_probs[1])

    @classmethod
    def like(cls, mlp: Mlp, num_experts: int) -> 'ExpertMlps':
        """A randomly initialised bank with the shapes, activation, bias and dropout of a dense timm Mlp."""
        if type(mlp) is not Mlp or not isinstance(mlp.fc1, nn.Linear):
            raise TypeError(
                f'Only timm.layers.Mlp with nn.Linear layers can be upcycled, got {type(mlp).__name__} '
                f'(GLU/SwiGLU and conv MLPs are not supported)')
        if not isinstance(mlp.norm, nn.Identity):
            raise TypeError(f'Only Mlp without a hidden norm can be upcycled, got norm={type(mlp.norm).__name__}')
        return cls(
            num_experts,
            mlp.fc1.in_features,
            mlp.fc1.out_features,
            mlp.fc2.out_features,
            act_layer=mlp.act,  # keeps its arguments, e.g. GELU(approximate='tanh')
            bias=(mlp.fc1.bias is not None, mlp.fc2.bias is not None),
            drop=(mlp.drop1.p, mlp.drop2.p),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.fc1(x))  # [E, N, hidden]
        x = self.fc2(self.drop1(x))  # [E, N, out]
        return self.drop2(x)
