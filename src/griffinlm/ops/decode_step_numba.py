"""One-token decoding on CPU (numba): each residual block's step as one fused kernel.

At a batch of a few rows a decoding step is bound by reading every weight once, and eager
PyTorch loses twice: `addmm` with one row runs on a single thread (well below what a read on
every core reaches; BENCHMARKS.md), and the ~100 small ops of a block cost more in dispatch
than in arithmetic. Here each kernel splits a weight matrix's rows across all cores, dots
every batch row against a weight row while it sits in L1, and does the block's elementwise
work (RMSNorm, activations, the conv and RG-LRU updates, RoPE, attention over the cached
keys) in the same call. Row b of a step reads and writes row `slots[b]` of the state pool and
sits at its own position `pos[b]`, so sequences of a pool advance independently.

All arrays are float32 and C-contiguous, except that a projection weight may also be stored
quantized (`ops.quantized`): int8 with per-row scales, or bf16 bits as uint16; every weight comes
with its scale array, empty (0,) for float32 and bf16. A missing bias is an empty (0,) array; `parts` is
the number of row chunks, one per thread (`numba.get_num_threads()`, passed in because
reading it inside a kernel would stop numba from caching the compiled code). Their torch
references and the dispatch between the two are in `ops/decode_step.py`.

Activation codes: those of `activation.ACTIVATIONS` (identity, sigmoid, relu, gelu (tanh), gelu
(erf), swish with a given beta).
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .activation import ACTIVATIONS
from .lru.numba import gates
from .norm.numba import norm_row
from .numba_common.jit import DOT_FASTMATH as FM
from .numba_common.jit import exp32, f32, row_chunk

SIGMOID, RELU, GELU_TANH, GELU, SWISH = (ACTIVATIONS[k] for k in ("sigmoid", "relu", "gelu_tanh", "gelu", "swish"))


@njit(fastmath=FM, inline="always")
def _act(v, code, beta):
    """Activation `code` of v, in float32 through `exp32` (a polynomial LLVM vectorises), the
    tanh GeLU as v * sigmoid(2 z) = v (1 + tanh z) / 2."""
    if code == SIGMOID:
        return f32(1.0) / (f32(1.0) + exp32(-v))
    if code == RELU:
        return v if v > 0 else f32(0.0)
    if code == GELU_TANH:
        return v / (f32(1.0) + exp32(f32(-1.5957691216057308) * (v + f32(0.044715) * v * v * v)))
    if code == GELU:
        return f32(0.5) * v * (f32(1.0) + math.erf(v * f32(0.7071067811865476)))
    if code == SWISH:
        return v / (f32(1.0) + exp32(-beta * v))
    return v  # identity


def _wv(w, n, k):
    """w[n, k] as float32, whatever the weight's storage (typed per dtype by the overload)."""
    raise NotImplementedError("only callable from numba kernels")


@overload(_wv, inline="always")
def _wv_typed(w, n, k):
    if w.dtype == types.uint16:  # bf16 bits: the high half of a float32
        return lambda w, n, k: np.int32(np.int32(w[n, k]) << 16).view(np.float32)
    if w.dtype == types.int8:
        return lambda w, n, k: f32(w[n, k])
    return lambda w, n, k: w[n, k]


@njit(fastmath=FM, inline="always")
def _dot(w, n, x, b):
    """w[n, :] . x[b, :] (w float32, bf16 bits or int8 before its row scale)"""
    acc = f32(0.0)
    for k in range(w.shape[1]):
        acc += _wv(w, n, k) * x[b, k]
    return acc


@njit(fastmath=FM, inline="always")
def _affine(w, s, bias, n, x, b):
    """(w[n, :] . x[b, :]) * s[n] + bias[n] (no scale, no bias when they are empty)."""
    v = _dot(w, n, x, b)
    if s.shape[0] > 0:
        v *= s[n]
    if bias.shape[0] > 0:
        v += bias[n]
    return v


@njit(fastmath=FM, cache=True)
def rms_norm(x, weight, unit_offset, eps):
    """(B, D) -> (B, D): x * rsqrt(mean(x^2) + eps) * (weight or 1 + weight), row by row (a
    decoding step has a few rows: no threads)."""
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        norm_row(x, b, weight, eps, unit_offset, out)
    return out


@njit(fastmath=FM, inline="always")
def _linear_rows(x, w, s, bias, out, accumulate, lo, hi):
    """Columns lo..hi of out (B, N) = x (B, K) @ (w (N, K) * s)^T + bias (or out += that)."""
    for n in range(lo, hi):
        for b in range(x.shape[0]):
            v = _affine(w, s, bias, n, x, b)
            if accumulate:
                out[b, n] += v
            else:
                out[b, n] = v


@njit(parallel=True, fastmath=FM, cache=True)
def linear_rows(x, w, s, bias, out, parts):
    """out (B, N) = x (B, K) @ (w * s)^T + bias for a few rows, streaming the (possibly quantized)
    weight once, its rows split across `parts` threads."""
    for c in prange(parts):
        lo, hi = row_chunk(w.shape[0], parts, c)
        _linear_rows(x, w, s, bias, out, False, lo, hi)


@njit(parallel=True, fastmath=FM, cache=True)
def mlp_step(x, norm_w, unit_offset, eps, w_gate, s_gate, b_gate, w_up, s_up, b_up, w_down, s_down, b_down, act,
             beta, parts):
    """x (B, D) += down(act(gate(n)) * up(n)) with n = RMSNorm(x); an empty (0, D) w_gate means
    the ungated down(act(up(n)))."""
    B = x.shape[0]
    M = w_up.shape[0]
    gated = w_gate.shape[0] > 0
    n = rms_norm(x, norm_w, unit_offset, eps)
    hid = np.empty((B, M), f32)
    pre = np.empty((B, M), f32)  # the gate's (ungated: up's) pre-activation
    for c in prange(parts):
        lo, hi = row_chunk(M, parts, c)
        for m in range(lo, hi):
            for b in range(B):
                if gated:
                    hid[b, m] = _affine(w_up, s_up, b_up, m, n, b)
                    pre[b, m] = _affine(w_gate, s_gate, b_gate, m, n, b)
                else:
                    pre[b, m] = _affine(w_up, s_up, b_up, m, n, b)
        # the activations in a pass of their own: inside the loop above they did not vectorise
        for b in range(B):
            if gated:
                for m in range(lo, hi):
                    hid[b, m] *= _act(pre[b, m], act, beta)
            else:
                for m in range(lo, hi):
                    hid[b, m] = _act(pre[b, m], act, beta)
    for c in prange(parts):
        lo, hi = row_chunk(w_down.shape[0], parts, c)
        _linear_rows(hid, w_down, s_down, b_down, x, True, lo, hi)


@njit(fastmath=FM, inline="always")
def _conv_row(u, b, conv_w, conv_b, conv_state, sb, p, d0, xc):
    """xc[b] = the causal depthwise conv over [slot sb's last W-1 inputs, u[b]] (lag W-1-j of
    state row j visible within the document: p - (W-1-j) >= d0); then u[b] joins the state.
    Loops over channels innermost, so that each vectorises."""
    W, R = conv_w.shape[0], u.shape[1]
    for r in range(R):
        xc[b, r] = u[b, r] * conv_w[W - 1, r]
    if conv_b.shape[0] > 0:
        for r in range(R):
            xc[b, r] += conv_b[r]
    for j in range(W - 1):
        if p - (W - 1 - j) >= d0:
            for r in range(R):
                xc[b, r] += conv_state[sb, j, r] * conv_w[j, r]
    for j in range(W - 2):
        for r in range(R):
            conv_state[sb, j, r] = conv_state[sb, j + 1, r]
    if W > 1:
        for r in range(R):
            conv_state[sb, W - 2, r] = u[b, r]


@njit(fastmath=FM, inline="always")
def _rglru_job(job, split, xc, y, gr_w, gr_b, gi_w, gi_b, lam, c, unscaled_reset, h, slots, pos, doc_start,
               gelu_code, z):
    """Job (head job // split, output chunk job % split) of the RG-LRU step for every row:
    block-diagonal gates on xc, the state update of h at slots[b], z = h * act(y). The gates
    go through `lru.numba.gates` (float32, vectorised over the chunk)."""
    bw = gr_w.shape[1]
    hd = job // split
    lo, hi = row_chunk(bw, split, job % split)
    if hi <= lo:
        return
    acc_r = np.empty(hi - lo, f32)
    acc_i = np.empty(hi - lo, f32)
    log_a = np.empty(hi - lo, f32)
    for j in range(hi - lo):  # log a = -softplus(-Lambda), torch's softplus threshold 20
        lv = -lam[hd * bw + lo + j]
        log_a[j] = -(lv if lv > 20.0 else math.log1p(math.exp(lv)))
    cf = f32(c)
    for b in range(xc.shape[0]):
        for j in range(hi - lo):
            acc_r[j] = gr_b[hd, lo + j]
            acc_i[j] = gi_b[hd, lo + j]
        for i in range(bw):
            xi = xc[b, hd * bw + i]
            # row slices: indexing gr_w[hd, i, lo + j] kept this loop scalar (4x slower step)
            wr, wi = gr_w[hd, i, lo:hi], gi_w[hd, i, lo:hi]
            for j in range(hi - lo):
                acc_r[j] += xi * wr[j]
                acc_i[j] += xi * wi[j]
        reset = pos[b] == doc_start[b]
        sb = slots[b]
        base = hd * bw + lo
        for j in range(hi - lo):
            _, gate_i, a_t, mult = gates(acc_r[j], acc_i[j], log_a[j], cf)
            if reset:
                a_t = f32(0.0)
                if unscaled_reset:
                    mult = f32(1.0)
            hn = a_t * h[sb, base + j] + xc[b, base + j] * gate_i * mult
            h[sb, base + j] = hn
            z[b, base + j] = hn * _act(y[b, base + j], gelu_code, f32(1.0))


@njit(parallel=True, fastmath=FM, cache=True)
def recurrent_step(x, norm_w, unit_offset, eps, w_y, s_y, b_y, w_x, s_x, b_x, conv_w, conv_b, conv_state,
                   gr_w, gr_b, gi_w, gi_b, lam, c, unscaled_reset, h, w_out, s_out, b_out,
                   slots, pos, doc_start, gelu_code, parts):
    """x (B, D) += the recurrent block on RMSNorm(x), updating rows slots[b] of the pool's
    conv_state (N, W-1, R) and RG-LRU state h (N, R) in place. Gate weights are block-diagonal
    (H, bw, bw) (in, out); lam is Lambda (R,); row b is at position pos[b] of its slot, in a
    document that starts at doc_start[b] (reset when they are equal)."""
    B = x.shape[0]
    R = w_y.shape[0]
    n = rms_norm(x, norm_w, unit_offset, eps)
    y = np.empty((B, R), f32)
    u = np.empty((B, R), f32)
    for ch in prange(parts):
        lo, hi = row_chunk(R, parts, ch)
        for r in range(lo, hi):
            for b in range(B):
                y[b, r] = _affine(w_y, s_y, b_y, r, n, b)
                u[b, r] = _affine(w_x, s_x, b_x, r, n, b)
    xc = np.empty((B, R), f32)
    for b in range(B):
        _conv_row(u, b, conv_w, conv_b, conv_state, slots[b], pos[b], doc_start[b], xc)
    split = max(1, parts // gr_w.shape[0])
    z = np.empty((B, R), f32)
    for job in prange(gr_w.shape[0] * split):
        if gelu_code == GELU_TANH:  # a constant activation code inside: the channel loop vectorises
            _rglru_job(job, split, xc, y, gr_w, gr_b, gi_w, gi_b, lam, c, unscaled_reset, h, slots, pos,
                       doc_start, GELU_TANH, z)
        else:
            _rglru_job(job, split, xc, y, gr_w, gr_b, gi_w, gi_b, lam, c, unscaled_reset, h, slots, pos,
                       doc_start, gelu_code, z)
    for c in prange(parts):
        lo, hi = row_chunk(w_out.shape[0], parts, c)
        _linear_rows(z, w_out, s_out, b_out, x, True, lo, hi)


@njit(parallel=True, fastmath=FM, cache=True)
def attention_step(x, norm_w, unit_offset, eps, w_q, s_q, b_q, w_k, s_k, b_k, w_v, s_v, b_v, w_o, s_o, b_o,
                   num_heads, inv_freq, rotary_dim, interleaved, k_cache, v_cache, ring,
                   slots, pos, doc_start, scale, parts):
    """x (B, D) += multi-query attention of RMSNorm(x) over rows slots[b] of the pool's cache
    (N, Hkv, S, hd), into which this token's key/value are written first (at pos[b] % S for a
    ring, else at pos[b])."""
    B = x.shape[0]
    Hkv, hd = k_cache.shape[1], k_cache.shape[3]
    n = rms_norm(x, norm_w, unit_offset, eps)
    q = np.empty((B, num_heads * hd), f32)
    k = np.empty((B, Hkv * hd), f32)
    v = np.empty((B, Hkv * hd), f32)
    for c in prange(parts):
        lo, hi = row_chunk(w_q.shape[0], parts, c)
        _linear_rows(n, w_q, s_q, b_q, q, False, lo, hi)
    for c in prange(parts):
        lo, hi = row_chunk(w_k.shape[0], parts, c)
        _linear_rows(n, w_k, s_k, b_k, k, False, lo, hi)
    for c in prange(parts):
        lo, hi = row_chunk(w_v.shape[0], parts, c)
        _linear_rows(n, w_v, s_v, b_v, v, False, lo, hi)
    for b in range(B):
        _rope_and_write_row(b, q, k, v, num_heads, inv_freq, rotary_dim, interleaved, k_cache, v_cache, ring,
                            slots[b], pos[b], doc_start[b])
    out = np.empty((B, num_heads * hd), f32)
    split = _head_split(B * Hkv, num_heads // Hkv, parts)
    for job in prange(B * Hkv * split):
        _attend_job(job, split, q, num_heads, k_cache, v_cache, ring, slots, pos, doc_start, scale, out)
    for c in prange(parts):
        lo, hi = row_chunk(w_o.shape[0], parts, c)
        _linear_rows(out, w_o, s_o, b_o, x, True, lo, hi)


@njit(fastmath=FM, inline="always")
def _rope_and_write_row(b, q, k, v, num_heads, inv_freq, rotary_dim, interleaved, k_cache, v_cache, ring,
                        sb, p, d0):
    """RoPE at position p - d0 on row b of q and k (in place), then row b's key/value into slot
    sb of the cache at p % S for a ring, else at p."""
    Hkv, S, hd = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    half = rotary_dim // 2
    at = p % S if ring else p
    seg = f32(p - d0)
    for i in range(half):
        ang = seg * inv_freq[i]
        cs, sn = f32(math.cos(ang)), f32(math.sin(ang))
        i1, i2 = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        for hh in range(num_heads):
            x1, x2 = q[b, hh * hd + i1], q[b, hh * hd + i2]
            q[b, hh * hd + i1] = x1 * cs - x2 * sn
            q[b, hh * hd + i2] = x2 * cs + x1 * sn
        for hh in range(Hkv):
            x1, x2 = k[b, hh * hd + i1], k[b, hh * hd + i2]
            k[b, hh * hd + i1] = x1 * cs - x2 * sn
            k[b, hh * hd + i2] = x2 * cs + x1 * sn
    for hh in range(Hkv):
        for d in range(hd):
            k_cache[sb, hh, at, d] = k[b, hh * hd + d]
            v_cache[sb, hh, at, d] = v[b, hh * hd + d]


@njit(inline="always")
def _head_split(jobs, rep, parts):
    """Parts to split each kv group's `rep` query heads into when there are fewer (row, group)
    jobs than threads (a batch-1 step with one kv head would attend on one core)."""
    return min(rep, max(1, parts // max(jobs, 1)))


@njit(fastmath=FM, inline="always")
def _attend_job(job, split, q, num_heads, k_cache, v_cache, ring, slots, pos, doc_start, scale, out):
    """For job = (b * Hkv + g) * split + part: out[b, head] = softmax(q k^T * scale) v for the
    query heads of kv head g in chunk `part` of `split`, over the keys of slot slots[b] that row b
    sees (its document's, up to its position); each of those cached keys and values is read once
    for the chunk's heads, no other."""
    Hkv, S, hd = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    rep = num_heads // Hkv
    e_lo, e_hi = row_chunk(rep, split, job % split)
    n_e = e_hi - e_lo
    b = job // split // Hkv
    g = job // split % Hkv
    if n_e <= 0:
        return
    sb = slots[b]
    p_b = pos[b]
    # The keys row b sees, by position: its document's, within the ring's last S positions;
    # a ring's slots outside them (older, or never written) are not read at all.
    lo = max(doc_start[b], 0, p_b - S + 1) if ring else max(doc_start[b], 0)
    n_k = (p_b if ring else min(p_b, S - 1)) - lo + 1
    head0 = g * rep + e_lo
    # The chunk's query heads, scaled, in a local array; the cache is indexed element-wise (no
    # row views in the key loops) and each softmax row normalised once: ~1.2x faster than with them.
    qs = np.empty((n_e, hd), f32)
    for e in range(n_e):
        for d in range(hd):
            qs[e, d] = q[b, (head0 + e) * hd + d] * scale
    scores = np.empty((n_e, n_k), f32)
    for i in range(n_k):
        at = (lo + i) % S if ring else lo + i
        for e in range(n_e):
            acc = f32(0.0)
            for d in range(hd):
                acc += qs[e, d] * k_cache[sb, g, at, d]
            scores[e, i] = acc
    for e in range(n_e):
        best = -np.inf
        for i in range(n_k):
            best = max(best, scores[e, i])
        total = f32(0.0)
        for i in range(n_k):
            v = exp32(scores[e, i] - best)
            scores[e, i] = v
            total += v
        inv = f32(1.0) / total
        for i in range(n_k):
            scores[e, i] *= inv
    # Accumulate in a local array: stores into `out` inside the loop would not vectorise
    # (numba cannot rule out that out and v_cache overlap).
    acc_v = np.zeros((n_e, hd), f32)
    for i in range(n_k):
        at = (lo + i) % S if ring else lo + i
        for e in range(n_e):
            w = scores[e, i]
            for d in range(hd):
                acc_v[e, d] += w * v_cache[sb, g, at, d]
    for e in range(n_e):
        for d in range(hd):
            out[b, (head0 + e) * hd + d] = acc_v[e, d]


@njit(parallel=True, fastmath=FM, cache=True)
def logits_step(x, norm_w, unit_offset, eps, embedding, s_emb, soft_cap, out, parts):
    """out (B, V) = RMSNorm(x) @ embedding^T, then soft_cap * tanh(. / soft_cap) if soft_cap > 0."""
    n = rms_norm(x, norm_w, unit_offset, eps)
    for c in prange(parts):
        lo, hi = row_chunk(embedding.shape[0], parts, c)
        _linear_rows(n, embedding, s_emb, np.empty(0, f32), out, False, lo, hi)
    if soft_cap > 0:
        B, V = out.shape
        for b in range(B):
            for i in range(V):
                out[b, i] = f32(math.tanh(out[b, i] / soft_cap)) * soft_cap
