"""Swish and the GLU family (Ramachandran et al. 2017; Dauphin et al. 2017; Shazeer 2020).

    swish_beta(x)           = x * sigmoid(beta * x)
    GLU(x, W, V, b, c)      = sigmoid(xW + b) * (xV + c)
    FFN_act(x) (gated)      = down(act(gate(x)) * up(x))
    FFN_act(x) (ungated)    = down(act(up(x)))
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import gated_activation
from ..ops.decode_step import KernelViews, StepRows, mlp_step
from ..ops.linear import linear
from .state import StepArgs
from .adapters import linear_parameters
from .linear import Linear

GATED = ("glu", "bilinear", "reglu", "geglu", "swiglu")
UNGATED = ("relu", "gelu", "swish")


def swish(x: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """x * sigmoid(beta * x): SiLU at beta = 1, x / 2 at beta = 0, ReLU as beta -> inf."""
    return x * torch.sigmoid(beta * x)


class Swish(nn.Module):
    """Swish with a fixed beta, or a learnable scalar beta (initialised to `beta`)."""

    def __init__(self, beta: float = 1.0, learnable: bool = False) -> None:
        super().__init__()
        if learnable:
            self.beta = nn.Parameter(torch.tensor(float(beta)))
        else:
            self.register_buffer("beta", torch.tensor(float(beta)), persistent=False)
        self.learnable = learnable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.learnable and float(self.beta) == 1.0:
            return F.silu(x)
        return swish(x, self.beta.to(x.dtype))

    def extra_repr(self) -> str:
        return f"beta={float(self.beta):.4g}, learnable={self.learnable}"


class GeLU(nn.Module):
    """GeLU with the tanh approximation (Griffin, RecurrentGemma) or the exact erf form."""

    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


def make_activation(name: str, gelu_approximate: str = "tanh", learnable_beta: bool = False) -> nn.Module:
    """The nonlinearity of a (gated or plain) FFN named by `name`."""
    if name in ("glu",):
        return nn.Sigmoid()
    if name == "bilinear":
        return nn.Identity()
    if name in ("reglu", "relu"):
        return nn.ReLU()
    if name in ("geglu", "gelu"):
        return GeLU(gelu_approximate)
    if name in ("swiglu", "swish"):
        return Swish(1.0, learnable=learnable_beta)
    raise ValueError(f"unknown activation {name!r}; expected one of {GATED + UNGATED}")


def step_activation(act: nn.Module) -> tuple[str, float | torch.Tensor]:
    """(name in ops.activation.ACTIVATIONS, swish beta) of an FFN's nonlinearity."""
    if isinstance(act, nn.Sigmoid):
        return "sigmoid", 1.0
    if isinstance(act, nn.ReLU):
        return "relu", 1.0
    if isinstance(act, GeLU):
        return ("gelu_tanh" if act.approximate == "tanh" else "gelu"), 1.0
    if isinstance(act, Swish):
        return "swish", act.beta
    if isinstance(act, nn.Identity):
        return "identity", 1.0
    raise TypeError(f"no decoding step for activation {type(act).__name__}")


def ffn_step(ffn: GatedMLP | MLP, x: torch.Tensor, rows: StepRows | None, norm: nn.Module,
             gate: nn.Module | None) -> torch.Tensor:
    """The one-token step of either feed-forward block (gated with `gate`, plain without)."""
    if (out := ffn.step_views.run(x, rows)) is not None:
        return out  # the fused op's bound call: nothing changed since the last token
    args = ffn.step_args.get(lambda: (
        norm.op_args(), None if gate is None else linear_parameters(gate), linear_parameters(ffn.up_proj),
        linear_parameters(ffn.down_proj), *step_activation(ffn.act)), rows is not None and rows.unchanged)
    return mlp_step(x, *args, rows, ffn.step_views)


def plain_parameters(*modules: nn.Module) -> bool:
    """True when every parameter of `modules` is a plain tensor, so their functional form may
    stand in for calling them (not DTensors of a tensor-parallel plan, which acts through
    module hooks)."""
    return all(type(p) in (nn.Parameter, torch.Tensor) for m in modules for p in m.parameters())


def linear_stands_in(*modules: nn.Module) -> bool:
    """True when reading these layers' `weight` and `bias` may stand in for calling them: each is
    our own `Linear` (not a peft LoRA wrapper, whose `.weight` is only its base weight) with plain
    parameters (`plain_parameters`)."""
    return all(isinstance(m, Linear) for m in modules) and plain_parameters(*modules)


class GatedMLP(nn.Module):
    """Gated feed-forward block: down_proj(act(gate_proj(x)) * up_proj(x)).

    Args:
        width: model width D; hidden: hidden width per branch M.
        activation: one of "glu", "bilinear", "reglu", "geglu", "swiglu".
        bias: biases on all three projections (with "glu" this is exactly GLU(x, W, V, b, c)).
    Shapes: (..., D) -> (..., D).
    """

    def __init__(self, width: int, hidden: int, activation: str = "geglu", bias: bool = False,
                 gelu_approximate: str = "tanh", learnable_beta: bool = False) -> None:
        super().__init__()
        if activation not in GATED:
            raise ValueError(f"GatedMLP activation must be one of {GATED}, got {activation!r}")
        self.activation = activation
        self.gate_proj = Linear(width, hidden, bias=bias)
        self.up_proj = Linear(width, hidden, bias=bias)
        self.down_proj = Linear(hidden, width, bias=bias)
        self.act = make_activation(activation, gelu_approximate, learnable_beta)
        self.step_args, self.step_views = StepArgs(), KernelViews()  # memos of the step's arguments
        # act(gate) * up as one fused op where one exists (GeGLU with tanh GeLU, SwiGLU with beta 1)
        self.fused_kind = ("gelu_tanh" if activation == "geglu" and gelu_approximate == "tanh" else
                           "silu" if activation == "swiglu" and not learnable_beta else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = chunk_rows(x, self.gate_proj)
        if rows is None:
            return self._forward(x)
        # Inference on many tokens: row chunks keep the (rows, M) hidden tensors in the
        # last-level cache between their matmul, the activation and down_proj (and bound the
        # activation memory); ~5-8 % faster on the MLP at T = 4096, width 512 in ad-hoc A/B timings.
        flat = x.reshape(-1, x.shape[-1])
        out = flat.new_empty(flat.shape[0], self.down_proj.out_features)
        for start in range(0, flat.shape[0], rows):
            out[start:start + rows] = self._forward(flat[start:start + rows])
        return out.view(*x.shape[:-1], -1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_kind is not None:
            if self.gate_proj.bias is not None and linear_stands_in(self.gate_proj, self.up_proj):
                # biases folded into the fused op instead of a broadcast copy inside addmm
                gate, up = linear(x, self.gate_proj.weight), linear(x, self.up_proj.weight)
                return self.down_proj(gated_activation(gate, up, self.fused_kind, self.gate_proj.bias,
                                                       self.up_proj.bias))
            return self.down_proj(gated_activation(self.gate_proj(x), self.up_proj(x), self.fused_kind))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def step(self, x: torch.Tensor, rows: StepRows | None, norm: nn.Module) -> torch.Tensor:
        """One token per sequence: x (n, D) residual stream -> x + self(norm(x)) (n, D), one fused
        op on CPU (`ops.decode_step.mlp_step`); `norm` is the block's RMSNorm. The MLP has no
        state: `rows` only carries the step's fused-path decision."""
        return ffn_step(self, x, rows, norm, self.gate_proj)


# Row-chunked inference MLP: hidden tensors of a chunk (3 of rows x M float32) within this budget.
CHUNK_BYTES = 12 * 2**20


def chunk_rows(x: torch.Tensor, up: nn.Linear) -> int | None:
    """Rows per chunk for a no-grad CPU forward over more than two chunks' worth of tokens, else
    None (training keeps one matmul per weight gradient; compiled and tensor-parallel modules
    are left whole)."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if type(x) is not torch.Tensor or not plain_parameters(up):
        return None
    per_row = 3 * up.out_features * x.element_size()
    rows = max(256, 1 << max(0, (CHUNK_BYTES // per_row).bit_length() - 1))  # a power of two
    return rows if x.numel() // x.shape[-1] > 2 * rows else None


class MLP(nn.Module):
    """Plain two-layer feed-forward block: down_proj(act(up_proj(x))), act in relu/gelu/swish."""

    def __init__(self, width: int, hidden: int, activation: str = "gelu", bias: bool = False,
                 gelu_approximate: str = "tanh", learnable_beta: bool = False) -> None:
        super().__init__()
        if activation not in UNGATED:
            raise ValueError(f"MLP activation must be one of {UNGATED}, got {activation!r}")
        self.activation = activation
        self.up_proj = Linear(width, hidden, bias=bias)
        self.down_proj = Linear(hidden, width, bias=bias)
        self.act = make_activation(activation, gelu_approximate, learnable_beta)
        self.step_args, self.step_views = StepArgs(), KernelViews()  # memos of the step's arguments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))

    def step(self, x: torch.Tensor, rows: StepRows | None, norm: nn.Module) -> torch.Tensor:
        """One token per sequence: x (n, D) -> x + self(norm(x)) (n, D), as `GatedMLP.step`."""
        return ffn_step(self, x, rows, norm, None)
