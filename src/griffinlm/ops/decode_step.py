"""One-token decoding steps over a slot-indexed state pool: each residual-block half as one op.

Every op takes the residual stream `x` (n, D) of n sequences, the pre-norm's arguments
(`RMSNorm.op_args()`: weight, eps, unit_offset), the block's parameters, and the block's state
pool (tensors of N >= n slots, dim 0 the slot); row b of the step belongs to pool row
`slots[b]` (distinct, any order), whose token sits at position `pos[b]` of its slot in a
document that starts at `doc_start[b]`. Each returns x + Block(RMSNorm(x)) and updates the
state rows in place.

Three implementations of each: `*_reference` composes the torch ops (any dtype, device, batch,
autograd, torch.compile). On CPU in float32 without autograd and with numba present:
  - at most `MAX_BATCH` rows (`fusable`), the kernels of `decode_step_numba` do the same in one
    call per op, reading every weight once on all cores (a step that streams the weights);
  - above it (`hybrid`, while `HYBRID`), the projections run as GEMMs on `ops.linear` (the
    fastest backend measured here, prepacked weights) and everything between them (norm, conv,
    gates, RG-LRU, RoPE, the cache writes, attention over the cache, activations) as one
    `*_mix` numba kernel per op (`decode_mix_numba`), so a block half is 3-5 calls rather than ~40 torch ops; each op
    binds that sequence once per row class (`linear.step_products` resolves its GEMMs) and
    replays it while the model is unchanged.
A layer keeps its op's weight views and bound calls in a `KernelViews` (`ops/kernel_views.py`).
Both add the block's output into `x` in place (callers use the returned tensor, which is then
`x` itself). `FUSED_CALLS` counts the kernel calls so that tests can tell a fast path ran;
`references_only()` turns both off.
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from . import numba_common
from .activation import ACTIVATIONS, activation_reference
from .attention import grouped_attention
from .attention.rotary import rotary
from .block_diag import block_diagonal_linear
from .conv import causal_conv1d_step
from .gemm_backend import row_class
from .kernel_views import EMPTY_ARRAY, KernelViews, weight_arrays
from .linear import linear, step_products
from .lru import log_a_from_lambda, rglru_step
from .norm import rms_norm

# Rows per step up to which the weight-streaming kernels beat the hybrid path (GEMMs on
# prepacked weights + mix kernels); the crossover measured in BENCHMARKS.md (Inference).
MAX_BATCH = 6
# Steps of more rows take the GEMMs + `*_mix` kernels path.
HYBRID = True

# Kernel calls per op name (the ops' shared counter); tests read it to check that a fast path ran.
FUSED_CALLS = numba_common.FUSED_CALLS
STEP_OPS = ("recurrent_step", "attention_step", "mlp_step", "logits_step",
            "recurrent_mix", "attention_mix", "mlp_mix", "logits_mix")


@contextlib.contextmanager
def references_only() -> Iterator[None]:
    """Within the block, every step op runs its torch reference (MAX_BATCH 0, HYBRID off)."""
    global MAX_BATCH, HYBRID
    saved = MAX_BATCH, HYBRID
    MAX_BATCH, HYBRID = 0, False
    try:
        yield
    finally:
        MAX_BATCH, HYBRID = saved


def step_kernel_calls() -> collections.Counter[str]:
    """The decoding ops' kernel calls so far (the STEP_OPS entries of FUSED_CALLS)."""
    return collections.Counter({k: FUSED_CALLS[k] for k in STEP_OPS if FUSED_CALLS[k]})

Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight (out, in), bias (out,) or None)
Norm = tuple[torch.Tensor, float, bool]  # RMSNorm (weight, eps, unit_offset)


@dataclass
class StepRows:
    """Where the n rows of one decoding step sit in the state pool, made once per step.

    slots (n,) long: each row's slot (distinct, any order); pos (n,) long: the position of the
    row's token in its slot; doc_start (n,) long: where its document starts in the slot.
    keys: eager hint bounding a global cache to its filled prefix (None: all entries, static).
    whole: the slots are arange(N) (the pool is read in place, no gather). `unchanged`: no
    module, parameter or buffer of the model changed since its last step (`layers.state.
    TreeWatch`), so layers may reuse the arguments they gathered then. `fused` is the kernels'
    step-level rule (`fusable`); `arrays` and `threads` are what the kernels take."""

    slots: torch.Tensor
    pos: torch.Tensor
    doc_start: torch.Tensor
    keys: int | None = None
    whole: bool = False
    unchanged: bool = False
    fused: bool = False
    arrays: tuple = ()
    threads: int = 1
    hybrid: bool = False
    row_class: int = 0  # the hybrid path's `gemm_backend.row_class` of n

    @classmethod
    def make(cls, x: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, doc_start: torch.Tensor,
             keys: int | None = None, whole: bool = False, unchanged: bool = False) -> "StepRows":
        fused = fusable(x)
        mixed = not fused and hybrid(x)
        if not (fused or mixed):
            return cls(slots, pos, doc_start, keys, whole, unchanged)
        arrays = tuple(t.numpy() if t.dtype == torch.int64 and t.is_contiguous() else t.long().contiguous().numpy()
                       for t in (slots, pos, doc_start))
        return cls(slots, pos, doc_start, keys, whole, unchanged, fused, arrays, numba_common.threads(), mixed,
                   row_class(x.shape[0]) if mixed else 0)


def _kernel_rows(x: torch.Tensor) -> bool:
    """A step's rows x the kernels may take: numba present and not tracing (the ops' shared rule,
    `numba_common.cpu_fusable`), no autograd, contiguous float32 CPU (n, D)."""
    return (not torch.is_grad_enabled() and x.dim() == 2 and x.shape[0] > 0 and numba_common.cpu_fusable(x)
            and x.is_contiguous())


def fusable(x: torch.Tensor) -> bool:
    """The streaming kernels' step-level rule (weights are checked by `KernelViews`, states per
    op): `_kernel_rows` with 1..MAX_BATCH rows."""
    return x.dim() == 2 and x.shape[0] <= MAX_BATCH and _kernel_rows(x)


def hybrid(x: torch.Tensor) -> bool:
    """The GEMM + `*_mix` kernel path's step-level rule: `_kernel_rows` above MAX_BATCH rows."""
    return HYBRID and x.dim() == 2 and x.shape[0] > MAX_BATCH and _kernel_rows(x)


def _normer(norm: Norm, weight: np.ndarray):
    """RMSNorm of a step's rows as a call x (n, D) -> (n, D) by the kernel (one pass, no autograd
    wrapper), the kernel and the norm's constants looked up once: the hybrid ops bind it."""
    kernel, unit_offset, eps = _kernels().rms_norm, norm[2], np.float32(norm[1])
    return lambda x: torch.from_numpy(kernel(x.numpy(), weight, unit_offset, eps))


def _kernels():
    from . import decode_step_numba  # numba is optional: imported only once a kernel runs

    return decode_step_numba


def _mix_kernels():
    from . import decode_mix_numba  # the hybrid path's kernels, imported as `_kernels`

    return decode_mix_numba


# --- recurrent block ---------------------------------------------------------------------------
def recurrent_step_reference(x: torch.Tensor, norm: Norm, linear_y: Linear, linear_x: Linear,
                             conv: Linear, lru: tuple, linear_out: Linear, gelu_approximate: str,
                             conv_state: torch.Tensor, h: torch.Tensor, rows: StepRows) -> torch.Tensor:
    """x (n, D) + RecurrentBlock(RMSNorm(x)) in torch ops; conv_state (N, W-1, R) and the RG-LRU
    state h (N, R) float32 updated in place at rows `rows.slots`. `lru`: `RGLRU.op_args()`."""
    slots, pos, doc_start = rows.slots, rows.pos, rows.doc_start
    n = rms_norm(x, *norm)
    y = F.gelu(linear(n, *linear_y), approximate=gelu_approximate)
    u = causal_conv1d_step(linear(n, *linear_x), *conv, conv_state, slots, pos - doc_start)
    gr_w, gr_b, gi_w, gi_b, lambda_, c, unscaled_reset = lru
    gate_r, gate_i = block_diagonal_linear(u, [gr_w, gi_w], [gr_b, gi_b])
    h_new = rglru_step(u, gate_r, gate_i, log_a_from_lambda(lambda_), h.index_select(0, slots), c,
                       pos == doc_start, unscaled_reset)
    h.index_copy_(0, slots, h_new.to(h.dtype))
    return x + linear(h_new.to(x.dtype) * y, *linear_out)


def recurrent_step(x: torch.Tensor, norm: Norm, linear_y: Linear, linear_x: Linear, conv: Linear,
                   lru: tuple, linear_out: Linear, gelu_approximate: str, conv_state: torch.Tensor,
                   h: torch.Tensor, rows: StepRows, views: KernelViews | None = None) -> torch.Tensor:
    """As `recurrent_step_reference`, fused where `rows.fused` or `rows.hybrid` and the tensors
    allow (`views`: the caller's memo of its weights' views)."""
    views = views or KernelViews()
    gr_w, gr_b, gi_w, gi_b, lambda_, c, unscaled_reset = lru
    gelu = ACTIVATIONS["gelu_tanh" if gelu_approximate == "tanh" else "gelu"]
    if rows.hybrid:
        hv = views.hybrid()
        w = hv((norm[0], *conv, gr_w, gr_b, gi_w, gi_b, lambda_), rows.unchanged)
        st = w and hv.states(conv_state, h)
        if st:
            k, normed = _mix_kernels(), _normer(norm, w[0])
            H, bw = gr_w.shape[:2]
            gr_b1, gi_b1 = gr_b.unsqueeze(1), gi_b.unsqueeze(1)
            R = H * bw
            n = normed(x)
            branches = step_products(n, (linear_y[0], linear_x[0]), (linear_y[1], linear_x[1]))
            out_proj = step_products(torch.zeros(n.shape[0], R), (linear_out[0],), (linear_out[1],))

            def bound(xt: torch.Tensor, r: StepRows) -> torch.Tensor:
                (y, y_col), (u, u_col) = branches(normed(xt))
                # (n, k, R) views: the kernels index a product of a stacked output as [:, col // R]
                y3, u3 = y.view(y.shape[0], -1, R).numpy(), u.view(u.shape[0], -1, R).numpy()
                xc = k.conv_mix(u3, u_col // R, w[1], w[2], st[0], *r.arrays)  # (n, R)
                xh = torch.from_numpy(xc).view(-1, H, bw).transpose(0, 1)  # (H, n, bw): the gates as batched GEMMs
                g_r = torch.baddbmm(gr_b1, xh, gr_w)
                g_i = torch.baddbmm(gi_b1, xh, gi_w)
                z = k.rglru_mix(xc, g_r.numpy(), g_i.numpy(), y3, y_col // R, w[7], float(c),
                                bool(unscaled_reset), st[1], *r.arrays, gelu, r.threads)
                return xt.add_(out_proj(torch.from_numpy(z))[0][0])

            hv.bind(rows.row_class, "recurrent_mix", (*linear_y, *linear_x, *linear_out), bound)
            FUSED_CALLS["recurrent_mix"] += 1
            return bound(x, rows)
    w = rows.fused and views((norm[0], *linear_y, *linear_x, *conv, gr_w, gr_b, gi_w, gi_b, lambda_, *linear_out),
                             rows.unchanged)
    st = w and views.states(conv_state, h)
    if not st:
        return recurrent_step_reference(x, norm, linear_y, linear_x, conv, lru, linear_out, gelu_approximate,
                                        conv_state, h, rows)
    kernel = _kernels().recurrent_step
    fixed = (w[0], norm[2], np.float32(norm[1]), *weight_arrays(w[1]), w[2], *weight_arrays(w[3]), w[4], w[5], w[6], st[0], *w[7:12],
             float(c), bool(unscaled_reset), st[1], *weight_arrays(w[12]), w[13])
    views.bound, views.name = (lambda xt, r: kernel(xt.numpy(), *fixed, *r.arrays, gelu, r.threads)), "recurrent_step"
    views.bound(x, rows)
    FUSED_CALLS["recurrent_step"] += 1
    return x


# --- attention block ---------------------------------------------------------------------------
def key_positions(pos: torch.Tensor, slots: int, ring: bool) -> torch.Tensor:
    """(n, S) position held by each cache slot once the token at pos (n,) is written: for a ring
    slot s holds the latest position p <= pos with p = s mod S (negative: never written), for a
    global cache slot s holds position s."""
    s = torch.arange(slots, device=pos.device)
    if ring:
        return pos[:, None] - torch.remainder(pos[:, None] - s[None], slots)
    return s[None].expand(pos.shape[0], slots)


def attention_step_reference(x: torch.Tensor, norm: Norm, q_proj: Linear, k_proj: Linear, v_proj: Linear,
                             o_proj: Linear, num_heads: int, rope: tuple, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, ring: bool, rows: StepRows) -> torch.Tensor:
    """x (n, D) + MultiQueryAttention(RMSNorm(x)) in torch ops over the pool's key/value cache
    (N, Hkv, S, hd) (keys after RoPE), into which this token's key/value are written first (at
    pos % S for a ring, else at pos). `rope`: `RotaryEmbedding.op_args()`."""
    slots, pos, doc_start, keys = rows.slots, rows.pos, rows.doc_start, rows.keys
    B = x.shape[0]
    Hkv, S, hd = k_cache.shape[1:]
    n = rms_norm(x, *norm)
    seg = (pos - doc_start)[:, None]  # (n, 1) position within the document
    q = rotary(linear(n, *q_proj).view(B, num_heads, 1, hd), seg, *rope)
    k = rotary(linear(n, *k_proj).view(B, Hkv, 1, hd), seg, *rope)
    v = linear(n, *v_proj).view(B, Hkv, 1, hd)
    at = torch.remainder(pos, S) if ring else pos
    k_cache[slots, :, at] = k[:, :, 0].to(k_cache.dtype)
    v_cache[slots, :, at] = v[:, :, 0].to(v_cache.dtype)
    kc, vc = (k_cache, v_cache) if rows.whole else (k_cache.index_select(0, slots), v_cache.index_select(0, slots))
    if keys is not None and not ring:
        kc, vc = kc[:, :, :keys], vc[:, :, :keys]
    key_pos = key_positions(pos, S, ring)[:, : kc.shape[2]]  # (n, S')
    # key_pos < 0: a ring entry never written (doc_start is negative for a document that began
    # before the stream)
    mask = (key_pos >= doc_start[:, None]) & (key_pos <= pos[:, None]) & (key_pos >= 0)
    out = grouped_attention(q, kc, vc, mask[:, None, None], hd ** -0.5)  # (n, H, 1, hd)
    return x + linear(out.reshape(B, num_heads * hd), *o_proj)


def attention_step(x: torch.Tensor, norm: Norm, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear,
                   num_heads: int, rope: tuple, k_cache: torch.Tensor, v_cache: torch.Tensor, ring: bool,
                   rows: StepRows, views: KernelViews | None = None) -> torch.Tensor:
    """As `attention_step_reference`, fused where `rows.fused` or `rows.hybrid` and the tensors allow."""
    views = views or KernelViews()
    inv_freq, rotary_dim, interleaved = rope
    scale = np.float32(k_cache.shape[3] ** -0.5)
    if rows.hybrid:
        hv = views.hybrid()
        w = hv((norm[0], inv_freq), rows.unchanged)
        st = w and hv.states(k_cache, v_cache)
        if st:
            kernel, normed = _mix_kernels().attention_mix, _normer(norm, w[0])
            n = normed(x)
            qkv = step_products(n, *zip(q_proj, k_proj, v_proj))
            out_proj = step_products(torch.zeros(n.shape[0], q_proj[0].shape[0]), (o_proj[0],), (o_proj[1],))

            def bound(xt: torch.Tensor, r: StepRows) -> torch.Tensor:
                (q, q_col), (k, k_col), (v, v_col) = qkv(normed(xt))
                out = kernel(q.numpy(), q_col, k.numpy(), k_col, v.numpy(), v_col, num_heads, w[1],
                             rotary_dim, bool(interleaved), st[0], st[1], ring, *r.arrays, scale, r.threads)
                return xt.add_(out_proj(torch.from_numpy(out))[0][0])

            hv.bind(rows.row_class, "attention_mix", (*q_proj, *k_proj, *v_proj, *o_proj), bound)
            FUSED_CALLS["attention_mix"] += 1
            return bound(x, rows)
    w = rows.fused and views((norm[0], *q_proj, *k_proj, *v_proj, *o_proj, inv_freq), rows.unchanged)
    st = w and views.states(k_cache, v_cache)
    if not st:
        return attention_step_reference(x, norm, q_proj, k_proj, v_proj, o_proj, num_heads, rope, k_cache,
                                        v_cache, ring, rows)
    kernel = _kernels().attention_step
    fixed = (w[0], norm[2], np.float32(norm[1]), *weight_arrays(w[1]), w[2], *weight_arrays(w[3]), w[4], *weight_arrays(w[5]), w[6], *weight_arrays(w[7]),
             w[8], num_heads, w[9], rotary_dim, bool(interleaved), st[0], st[1], ring)
    views.bound, views.name = (lambda xt, r: kernel(xt.numpy(), *fixed, *r.arrays, scale, r.threads)), "attention_step"
    views.bound(x, rows)
    FUSED_CALLS["attention_step"] += 1
    return x


# --- MLP -----------------------------------------------------------------------------------------
def mlp_step_reference(x: torch.Tensor, norm: Norm, gate: Linear | None, up: Linear, down: Linear,
                       activation: str, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """x (n, D) + down(act(gate(m)) * up(m)) with m = RMSNorm(x); without `gate` the plain
    down(act(up(m)))."""
    m = rms_norm(x, *norm)
    u = linear(m, *up)
    hidden = activation_reference(u if gate is None else linear(m, *gate), activation, beta)
    return x + linear(hidden if gate is None else hidden * u, *down)


def mlp_step(x: torch.Tensor, norm: Norm, gate: Linear | None, up: Linear, down: Linear, activation: str,
             beta: float | torch.Tensor = 1.0, rows: StepRows | None = None,
             views: KernelViews | None = None) -> torch.Tensor:
    """As `mlp_step_reference`, fused where `rows.fused` or `rows.hybrid` (default: `fusable(x)`)
    and the weights allow."""
    views = views or KernelViews()
    if rows is not None and rows.hybrid and (
            w := (hv := views.hybrid())((norm[0],), rows.unchanged)):
        kernel, normed = _mix_kernels().gated_hidden, _normer(norm, w[0])
        M, code, beta_now = up[0].shape[0], ACTIVATIONS[activation], np.float32(float(beta))
        m = normed(x)
        branches = step_products(m, *zip(*((up,) if gate is None else (gate, up))))
        down_proj = step_products(torch.zeros(m.shape[0], M), (down[0],), (down[1],))

        def bound(xt: torch.Tensor, r: StepRows) -> torch.Tensor:
            blocks = branches(normed(xt))
            # (n, k, M) views: the kernel indexes a product of a stacked output as [:, col // M]
            u, u_col = blocks[-1]
            g, g_col = (u, -M) if gate is None else blocks[0]
            hidden = kernel(g.view(g.shape[0], -1, M).numpy(), g_col // M, u.view(u.shape[0], -1, M).numpy(),
                            u_col // M, code, beta_now, r.threads)
            return xt.add_(down_proj(torch.from_numpy(hidden))[0][0])

        # a learnable Swish beta that changes in place is an update TreeWatch does not see (as below)
        if isinstance(beta, torch.Tensor) and beta.requires_grad:
            hv.plans.clear()
        else:
            hv.bind(rows.row_class, "mlp_mix", (*(gate or (None, None)), *up, *down), bound)
        FUSED_CALLS["mlp_mix"] += 1
        return bound(x, rows)
    fused = fusable(x) if rows is None else rows.fused
    w = fused and views((norm[0], *(gate or (None, None)), *up, *down), rows is not None and rows.unchanged)
    if not w:
        return mlp_step_reference(x, norm, gate, up, down, activation, beta)
    kernel = _kernels().mlp_step
    w_gate = (np.empty((0, x.shape[1]), np.float32), EMPTY_ARRAY) if gate is None else weight_arrays(w[1])
    # beta read now: a learnable Swish beta that changes in place is a parameter update the
    # model's TreeWatch does not see, so the bound call is only kept for a fixed beta
    fixed = (w[0], norm[2], np.float32(norm[1]), *w_gate, w[2], *weight_arrays(w[3]), w[4], *weight_arrays(w[5]), w[6],
             ACTIVATIONS[activation], np.float32(float(beta)))
    views.bound = None if isinstance(beta, torch.Tensor) and beta.requires_grad else (
        lambda xt, r: kernel(xt.numpy(), *fixed, r.threads))
    views.name = "mlp_step"
    kernel(x.numpy(), *fixed, numba_common.threads() if rows is None else rows.threads)
    FUSED_CALLS["mlp_step"] += 1
    return x


# --- output layer --------------------------------------------------------------------------------
def logits_reference(x: torch.Tensor, norm: Norm, embedding: torch.Tensor, soft_cap: float | None) -> torch.Tensor:
    """(..., D) -> (..., V): final RMSNorm, tied output layer, then cap * tanh(logits / cap)."""
    logits = linear(rms_norm(x, *norm), embedding)
    if soft_cap is not None:
        logits = torch.tanh(logits.float() / soft_cap) * soft_cap
    return logits


def logits_step(x: torch.Tensor, norm: Norm, embedding: torch.Tensor, soft_cap: float | None,
                rows: StepRows | None = None, views: KernelViews | None = None) -> torch.Tensor:
    """As `logits_reference` for a step's rows x (n, D) -> (n, V), fused where `rows.fused`
    (default: `fusable(x)`) and the weights allow."""
    views = views or KernelViews()
    if rows is not None and rows.hybrid and (w := (hv := views.hybrid())((norm[0],), rows.unchanged)):
        normed = _normer(norm, w[0])
        output_layer = step_products(normed(x), (embedding,))

        def bound_mix(xt: torch.Tensor, r: StepRows) -> torch.Tensor:
            logits = output_layer(normed(xt))[0][0]
            return logits if soft_cap is None else torch.tanh(logits.div_(soft_cap)).mul_(soft_cap)

        hv.bind(rows.row_class, "logits_mix", (embedding,), bound_mix)
        FUSED_CALLS["logits_mix"] += 1
        return bound_mix(x, rows)
    fused = fusable(x) if rows is None else rows.fused
    w = fused and views((norm[0], embedding), rows is not None and rows.unchanged)
    if not w:
        return logits_reference(x, norm, embedding, soft_cap)
    out = torch.empty(x.shape[0], embedding.shape[0])
    kernel = _kernels().logits_step
    fixed = (w[0], norm[2], np.float32(norm[1]), *weight_arrays(w[1]), np.float32(soft_cap or 0.0))
    V = embedding.shape[0]

    def bound(xt: torch.Tensor, r: StepRows) -> torch.Tensor:
        logits = torch.empty(xt.shape[0], V)
        kernel(xt.numpy(), *fixed, logits.numpy(), r.threads)
        return logits

    views.bound, views.name = bound, "logits_step"
    kernel(x.numpy(), *fixed, out.numpy(), numba_common.threads() if rows is None else rows.threads)
    FUSED_CALLS["logits_step"] += 1
    return out
