"""`linear`: y = x W^T + b on the fastest GEMM this machine has, and bf16 GEMMs under CPU autocast.

fp32: each of the three products (forward, grad input, grad weight) runs on the backend that
`gemm_backend` measured fastest for its shape class: PyTorch's default (MKL), oneDNN, or oneDNN
with a prepacked weight. Results equal `linear_reference` (= F.linear) up to summation order
(about 1e-6 relative); gradients are exact products too, nothing is approximated.

bf16 (inside `torch.autocast("cpu", dtype=torch.bfloat16)`): the products take bf16 operands
(x and g rounded to bf16, the weight through a bf16 copy kept per weight version) and fp32 out,
so that everything around the GEMMs (norms, the RG-LRU, the loss) stays fp32 and the fused CPU
kernels still apply; weights, their gradients and the bias add are fp32.

Anything else (CUDA, other dtypes, tensor subclasses such as DTensor, torch.compile tracing)
is F.linear itself.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from . import gemm_backend as gb
from .gemm_backend import GEMM_CALLS
from .quantized import QuantizedWeight, quantized_linear, stacked_bf16_products

linear_reference = F.linear


def _plain(t: torch.Tensor | None) -> bool:
    return t is None or type(t) in (torch.Tensor, torch.nn.Parameter)


def _mode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """"fp32", "bf16" or None (F.linear) for these operands."""
    if (x.device.type != "cpu" or weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]
            or x.numel() == 0 or not (_plain(x) and _plain(weight) and _plain(bias))
            or torch.compiler.is_compiling()):
        return None
    if (weight.dtype == torch.float32 and x.dtype in (torch.float32, torch.bfloat16)
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return "bf16"
    if x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
        return "fp32"
    return None


def _onednn(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, K) @ w (N, K)^T (+ bias) with oneDNN; w plain or prepacked."""
    return torch.ops.mkldnn._linear_pointwise(a.contiguous(), w, bias, "none", [], "")


def _forward_backend(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     packable: bool) -> tuple[str, torch.Tensor]:
    """(backend, weight operand) of the forward product x (M, K) W^T for x's shape class: the
    backend measured fastest, and the weight as that backend takes it (packed for "onednn_packed")."""
    M, K = x.shape
    N = weight.shape[0]
    product = "forward" if packable else "forward_unpacked"

    def candidates():
        out = {"mkl": lambda: F.linear(x, weight, bias), "onednn": lambda: _onednn(x, weight, bias)}
        if packable and (p := gb.packed(weight)) is not None:
            out["onednn_packed"] = lambda: _onednn(x, p, bias)
        return out

    backend = gb.choose(product, x.dtype, M, N, K, candidates)
    if backend == "onednn_packed":
        if packable and (p := gb.packed(weight)) is not None:
            return backend, p
        backend = "onednn"  # over the copies' budget (or forced)
    return backend, weight


def forward_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 packable: bool = True) -> torch.Tensor:
    """x (M, K) -> (M, N) on the backend measured fastest for the shape (fp32, no autograd).
    packable=False for a weight that changes at every call (a LoRA factor in training): its
    oneDNN packing would be redone each time, so only the unpacked backends compete."""
    backend, w = _forward_backend(x, weight, bias, packable)
    GEMM_CALLS[f"forward:{backend}"] += 1
    if backend == "mkl":
        return F.linear(x, weight, bias)
    return _onednn(x, w, bias)


def grad_input_fp32(g: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g (M, N) @ W (N, K) -> (M, K) on the backend measured fastest for the shape: the input
    gradient of `linear` (fp32, no autograd); fused ops that differentiate a linear map call it.
    A frozen W (requires_grad False: a LoRA base) may use its packed transpose, made once."""
    M, N = g.shape
    frozen = not weight.requires_grad

    def candidates():
        out = {"mkl": lambda: g.mm(weight), "onednn": lambda: _onednn(g, weight.t().contiguous())}
        if frozen and (p := gb.packed_transposed(weight)) is not None:
            out["onednn_packed"] = lambda: _onednn(g, p)
        return out

    backend = gb.choose("grad_input_frozen" if frozen else "grad_input", g.dtype, M, N, weight.shape[1], candidates)
    if backend == "onednn_packed" and (not frozen or (p := gb.packed_transposed(weight)) is None):
        backend = "onednn"  # over the copies' budget
    GEMM_CALLS[f"grad_input:{backend}"] += 1
    if backend == "mkl":
        return g.mm(weight)
    return _onednn(g, p if backend == "onednn_packed" else weight.t().contiguous())


def split_reduction(g: torch.Tensor, x: torch.Tensor, chunks: int) -> torch.Tensor:
    """g (M, N)^T @ x (M, K) -> (N, K) as `chunks` partial products over slices of M (one bmm)
    and their sum; rows past a whole number of chunks are added with one addmm. The partial
    products have the smaller of N and K as their rows (MKL is the faster that way round)."""
    M, N = g.shape
    K = x.shape[1]
    m = M // chunks * chunks
    a, b = (g, x) if N <= K else (x, g)
    a, b = a.contiguous(), b.contiguous()
    out = torch.bmm(a[:m].view(chunks, m // chunks, -1).transpose(1, 2), b[:m].view(chunks, m // chunks, -1)).sum(0)
    if m < M:
        out.addmm_(a[m:].t(), b[m:])
    return out if N <= K else out.t().contiguous()


def grad_weight_fp32(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """g (M, N)^T @ x (M, K) -> (N, K) on the backend measured fastest for the shape: the weight
    gradient of `linear` (fp32, no autograd); fused ops with trainable low-rank factors call it."""
    M, N = g.shape
    chunks = 2 * torch.get_num_threads()

    def candidates():
        out = {"mkl": lambda: g.t().mm(x), "onednn": lambda: _onednn(g.t(), x.t().contiguous())}
        if M >= 2 * chunks:
            out["mkl_split"] = lambda: split_reduction(g, x, chunks)
        return out

    backend = gb.choose("grad_weight", g.dtype, M, N, x.shape[1], candidates)
    GEMM_CALLS[f"grad_weight:{backend}"] += 1
    if backend == "mkl_split" and M >= 2 * chunks:
        return split_reduction(g, x, chunks)
    return _onednn(g.t(), x.t().contiguous()) if backend == "onednn" else g.t().mm(x)


def _forward_bf16(xb: torch.Tensor, wb: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bf16 x (M, K), bf16 W (N, K) -> fp32 (M, N), bias added in fp32."""
    GEMM_CALLS["forward:bf16"] += 1
    y = F.linear(xb, wb).float()
    return y if bias is None else y.add_(bias)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mode):
        if mode == "bf16":
            xb, wb = x.to(torch.bfloat16), gb.bf16_copy(weight)
            ctx.save_for_backward(xb, weight, wb)
            ctx.x_dtype = x.dtype
            y = _forward_bf16(xb, wb, bias)
        else:
            ctx.save_for_backward(x, weight)
            y = forward_fp32(x, weight, bias)
        ctx.mode, ctx.has_bias = mode, bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if ctx.mode == "bf16":
            xb, _, wb = ctx.saved_tensors
            gbf = g.to(torch.bfloat16)
            if need_x:
                GEMM_CALLS["grad_input:bf16"] += 1
                dx = gbf.mm(wb).to(ctx.x_dtype)
            if need_w:
                GEMM_CALLS["grad_weight:bf16"] += 1
                dw = gbf.t().mm(xb).float()
        else:
            x, weight = ctx.saved_tensors
            g = g.contiguous()
            dx = grad_input_fp32(g, weight) if need_x else None
            dw = grad_weight_fp32(g, x) if need_w else None
        if need_b and ctx.has_bias:
            db = g.sum(0, dtype=torch.float32)
        return dx, dw, db, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b, as F.linear.

    Args:
        x: (..., K) input.
        weight: (N, K).
        bias: (N,) or None.

    Returns:
        (..., N): in x's dtype, or fp32 for an fp32 weight under CPU bf16 autocast (and for a
        quantized weight, `ops.quantized.QuantizedWeight`).
    """
    if isinstance(weight, QuantizedWeight):
        return quantized_linear(x, weight, bias)
    mode = _mode(x, weight, bias)
    if mode is None:
        return F.linear(x, weight, bias)
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # (M, K)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        y = _Linear.apply(x2, weight, bias, mode)
    elif mode == "bf16":
        y = _forward_bf16(x2.to(torch.bfloat16), gb.bf16_copy(weight), bias)
    else:
        y = forward_fp32(x2, weight, bias)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])


def _stacked_weight(x: torch.Tensor, layers: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]
                    ) -> torch.Tensor | None:
    """The layers' weights stacked along N in oneDNN's packed layout when one GEMM on them is the
    measured choice for x's shape class (fp32, no autograd, at least two plain weights), else None."""
    weights = tuple(w for w, _ in layers)
    if (torch.is_grad_enabled() or x.dim() != 2 or len(layers) < 2
            or any(isinstance(w, QuantizedWeight) or _mode(x, w, b) != "fp32" for w, b in layers)):
        return None
    M, K = x.shape
    sizes = [w.shape[0] for w in weights]

    def candidates():
        def stacked():
            p = gb.packed_concat(weights)
            return [linear(x, w, b) for w, b in layers] if p is None else _onednn(x, p).split(sizes, dim=1)

        # "mkl" here stands for separate products, each on its own measured backend
        return {"mkl": lambda: [linear(x, w, b) for w, b in layers], "onednn_packed": stacked}

    if gb.choose("forward_stacked", x.dtype, M, sum(sizes), K, candidates) != "onednn_packed":
        return None
    return gb.packed_concat(weights)  # None over the copies' budget


def linear_many(x: torch.Tensor, layers: tuple[tuple[torch.Tensor, torch.Tensor | None], ...]) -> list[torch.Tensor]:
    """[linear(x, w, b) for (w, b) in layers], as one GEMM on their stacked weights where oneDNN's
    prepacked kernel is the measured choice for the stacked shape (no autograd, x (M, K)); the
    outputs are then column views of one (M, sum N) result.

    Used by the decoding step, whose projections of one normed input (q/k/v, gate/up, the
    recurrent block's two branches) are each too narrow at a few rows to reach the GEMM rate."""
    p = _stacked_weight(x, layers)
    if p is None:
        return [linear(x, w, b) for w, b in layers]
    GEMM_CALLS["forward_stacked:onednn_packed"] += 1
    outs = _onednn(x, p).split([w.shape[0] for w, _ in layers], dim=1)  # column views of one (M, sum N) result
    return [o if b is None else o.add_(b) for o, (_, b) in zip(outs, layers)]


ColumnBlock = tuple[torch.Tensor, int]  # (out (M, *), col): a product is out[:, col:col + N]


def step_products(x: torch.Tensor, weights: tuple[torch.Tensor, ...],
                  biases: tuple[torch.Tensor | None, ...] | None = None) -> Callable[[torch.Tensor], list[ColumnBlock]]:
    """`linear_many(x, zip(weights, biases))` with every choice made once for x's shape class, for a
    decoding step that repeats the same products each token.

    Returns a call a (M', K) -> [(out_i, col_i)], a of x's row class (`gemm_backend.row_class`):
    product i (its bias included) is out_i[:, col_i:col_i + N_i], all of them column blocks of
    one contiguous (M', sum N) output where the stacked GEMM is the choice (the biases then
    stacked too, as a copy; for quantized weights a bf16 GEMM, `quantized.stacked_bf16_products`),
    else one contiguous output each at col 0; kernels index them in
    place, no copies of column views. The measured backends, packed copies and dtype checks are
    resolved here, once per GEMM override (`gemm_backend.force`); the call only compares the
    weights' and biases' version counters (and whether copies are enabled) with those it was
    resolved under, and resolves again when one changed (an in-place update would leave a copy
    stale)."""
    biases = (None,) * len(weights) if biases is None else tuple(biases)
    if len(biases) != len(weights):
        raise ValueError(f"step_products: {len(weights)} weights but {len(biases)} biases")
    layers = tuple(zip(weights, biases))
    watched = tuple(t for w in (*weights, *biases) if w is not None
                    for t in ((w.data, w.scale) if isinstance(w, QuantizedWeight) else (w,)) if t is not None)

    def versions() -> tuple:
        return (*(t._version for t in watched), gb.COPIES.enabled)

    cols = [sum(w.shape[0] for w in weights[:i]) for i in range(len(weights))]  # of a stacked output

    def resolve() -> Callable[[torch.Tensor], list[ColumnBlock]]:
        if all(isinstance(w, QuantizedWeight) for w in weights) and (
                run := stacked_bf16_products(x, weights, biases)) is not None:
            def stacked_bf16(a: torch.Tensor) -> list[ColumnBlock]:
                out = run(a)
                return [(out, c) for c in cols]
            return stacked_bf16
        if (torch.is_grad_enabled() or x.dim() != 2
                or any(isinstance(w, QuantizedWeight) or _mode(x, w, b) != "fp32" for w, b in layers)):
            # quantized (elsewhere), bf16 autocast, other dtypes: the general ops
            return lambda a: [(t.contiguous(), 0) for t in linear_many(a, layers)]
        uniform = all(b is None for b in biases) or all(b is not None for b in biases)
        if uniform and (p := _stacked_weight(x, layers)) is not None:
            bias = None if biases[0] is None else gb.COPIES.get("concat_bias", biases, torch.cat)
            if biases[0] is None or bias is not None:
                def stacked(a: torch.Tensor) -> list[ColumnBlock]:
                    GEMM_CALLS["forward_stacked:onednn_packed"] += 1
                    out = _onednn(a, p, bias)
                    return [(out, c) for c in cols]
                return stacked
        calls = []
        for w, b in layers:
            backend, operand = _forward_backend(x, w, b, True)
            calls.append((f"forward:{backend}", (lambda a, w=w, b=b: F.linear(a, w, b)) if backend == "mkl"
                          else (lambda a, w=operand, b=b: _onednn(a, w, b))))

        def separate(a: torch.Tensor) -> list[ColumnBlock]:
            out = []
            for key, fn in calls:
                GEMM_CALLS[key] += 1
                out.append((fn(a), 0))
            return out
        return separate

    resolved = {gb.override(): (versions(), resolve())}  # per override: a benchmark may alternate them

    def call(a: torch.Tensor) -> list[ColumnBlock]:
        key, now = gb.override(), versions()
        got = resolved.get(key)
        if got is None or got[0] != now:
            got = resolved[key] = (now, resolve())
        return got[1](a)
    return call
