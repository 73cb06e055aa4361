"""One-token decoding on CPU (numba): each residual block's step as one fused kernel.

At a batch of a few rows a decoding step is bound by reading every weight once, and eager
PyTorch loses twice: `addmm` with one row runs on a single thread (19 GB/s here, against
43 GB/s for a read on both cores), and the ~100 small ops of a block cost more in dispatch
than in arithmetic. Here each kernel splits a weight matrix's rows across all cores, dots
every batch row against a weight row while it sits in L1, and does the block's elementwise
work (RMSNorm, activations, the conv and RG-LRU updates, RoPE, attention over the cached
keys) in the same call. Row b of a step reads and writes row `slots[b]` of the state pool and
sits at its own position `pos[b]`, so sequences of a pool advance independently.

All arrays are float32 and C-contiguous; a missing bias is an empty (0,) array; `parts` is
the number of row chunks, one per thread (`numba.get_num_threads()`, passed in because
reading it inside a kernel would stop numba from caching the compiled code). Their torch
references and the dispatch between the two are in `ops/decode_step.py`.

Activation codes (`decode_step.ACTIVATIONS`, which maps names to them): 0 identity, 1 sigmoid, 2 relu, 3 gelu (tanh), 4 gelu (erf),
5 swish with a given beta.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .rms_norm_numba import norm_row

# reassoc lets LLVM split each dot product over several vector accumulators.
FM = {"nnan", "ninf", "nsz", "arcp", "contract", "afn", "reassoc"}
f32 = np.float32


@njit(fastmath=FM, inline="always")
def _act(v, code, beta):
    if code == 1:
        return f32(1.0) / (f32(1.0) + math.exp(-v))
    if code == 2:
        return v if v > 0 else f32(0.0)
    if code == 3:
        return f32(0.5) * v * (f32(1.0) + math.tanh(f32(0.7978845608028654) * (v + f32(0.044715) * v * v * v)))
    if code == 4:
        return f32(0.5) * v * (f32(1.0) + math.erf(v * f32(0.7071067811865476)))
    if code == 5:
        return v / (f32(1.0) + math.exp(-beta * v))
    return v


@njit(fastmath=FM, inline="always")
def _dot(w, n, x, b):
    """w[n, :] . x[b, :]"""
    acc = f32(0.0)
    for k in range(w.shape[1]):
        acc += w[n, k] * x[b, k]
    return acc


@njit(inline="always")
def _chunk(size, parts, c):
    step = (size + parts - 1) // parts
    lo = min(size, c * step)
    return lo, min(size, lo + step)


@njit(fastmath=FM, inline="always")
def _affine(w, bias, n, x, b):
    """w[n, :] . x[b, :] + bias[n] (no bias when it is empty)."""
    v = _dot(w, n, x, b)
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
def _linear_rows(x, w, bias, out, accumulate, lo, hi):
    """Rows lo..hi of out (B, N) = x (B, K) @ w (N, K)^T + bias (or out += that)."""
    for n in range(lo, hi):
        for b in range(x.shape[0]):
            v = _affine(w, bias, n, x, b)
            if accumulate:
                out[b, n] += v
            else:
                out[b, n] = v


@njit(parallel=True, fastmath=FM, cache=True)
def mlp_step(x, norm_w, unit_offset, eps, w_gate, b_gate, w_up, b_up, w_down, b_down, act, beta, parts):
    """x (B, D) += down(act(gate(n)) * up(n)) with n = RMSNorm(x); an empty (0, D) w_gate means
    the ungated down(act(up(n)))."""
    B = x.shape[0]
    M = w_up.shape[0]
    gated = w_gate.shape[0] > 0
    n = rms_norm(x, norm_w, unit_offset, eps)
    hid = np.empty((B, M), f32)
    for c in prange(parts):
        lo, hi = _chunk(M, parts, c)
        for m in range(lo, hi):
            for b in range(B):
                u = _affine(w_up, b_up, m, n, b)
                if gated:
                    hid[b, m] = _act(_affine(w_gate, b_gate, m, n, b), act, beta) * u
                else:
                    hid[b, m] = _act(u, act, beta)
    for c in prange(parts):
        lo, hi = _chunk(w_down.shape[0], parts, c)
        _linear_rows(hid, w_down, b_down, x, True, lo, hi)


@njit(parallel=True, fastmath=FM, cache=True)
def recurrent_step(x, norm_w, unit_offset, eps, w_y, b_y, w_x, b_x, conv_w, conv_b, conv_state,
                   gr_w, gr_b, gi_w, gi_b, lam, c, unscaled_reset, h, w_out, b_out,
                   slots, pos, doc_start, gelu_code, parts):
    """x (B, D) += the recurrent block on RMSNorm(x), updating rows slots[b] of the pool's
    conv_state (N, W-1, R) and RG-LRU state h (N, R) in place. Gate weights are block-diagonal
    (H, bw, bw) (in, out); lam is Lambda (R,); row b is at position pos[b] of its slot, in a
    document that starts at doc_start[b] (reset when they are equal)."""
    B = x.shape[0]
    R = w_y.shape[0]
    W = conv_w.shape[0]
    H, bw = gr_w.shape[0], gr_w.shape[1]
    n = rms_norm(x, norm_w, unit_offset, eps)
    y = np.empty((B, R), f32)
    u = np.empty((B, R), f32)
    for ch in prange(parts):
        lo, hi = _chunk(R, parts, ch)
        for r in range(lo, hi):
            for b in range(B):
                y[b, r] = _act(_affine(w_y, b_y, r, n, b), gelu_code, f32(1.0))
                u[b, r] = _affine(w_x, b_x, r, n, b)
    # Causal depthwise conv over [state, u]: lag W-1-j of row j is visible within the document.
    xc = np.empty((B, R), f32)
    for b in range(B):
        sb = slots[b]
        for r in range(R):
            acc = u[b, r] * conv_w[W - 1, r]
            for j in range(W - 1):
                if pos[b] - (W - 1 - j) >= doc_start[b]:
                    acc += conv_state[sb, j, r] * conv_w[j, r]
            if conv_b.shape[0] > 0:
                acc += conv_b[r]
            xc[b, r] = acc
            for j in range(W - 2):
                conv_state[sb, j, r] = conv_state[sb, j + 1, r]
            if W > 1:
                conv_state[sb, W - 2, r] = u[b, r]
    # Block-diagonal gates, then the RG-LRU update, jobs = (head, output chunk).
    split = max(1, parts // H)
    z = np.empty((B, R), f32)
    for job in prange(H * split):
        hd = job // split
        lo, hi = _chunk(bw, split, job % split)
        if hi <= lo:
            continue
        acc_r = np.empty(hi - lo, f32)
        acc_i = np.empty(hi - lo, f32)
        for b in range(B):
            for j in range(hi - lo):
                acc_r[j] = gr_b[hd, lo + j]
                acc_i[j] = gi_b[hd, lo + j]
            for i in range(bw):
                xi = xc[b, hd * bw + i]
                for j in range(hi - lo):
                    acc_r[j] += xi * gr_w[hd, i, lo + j]
                    acc_i[j] += xi * gi_w[hd, i, lo + j]
            reset = pos[b] == doc_start[b]
            sb = slots[b]
            for j in range(hi - lo):
                r = hd * bw + lo + j
                lv = -lam[r]  # log a = -softplus(-Lambda), torch's softplus threshold 20
                log_a = -(lv if lv > 20.0 else math.log1p(math.exp(lv)))
                gate_r = 1.0 / (1.0 + math.exp(-acc_r[j]))
                gate_i = 1.0 / (1.0 + math.exp(-acc_i[j]))
                log_at = c * gate_r * log_a
                a_t = math.exp(log_at)
                mult = math.sqrt(-math.expm1(2.0 * log_at))
                if reset:
                    a_t = 0.0
                    if unscaled_reset:
                        mult = 1.0
                hn = f32(a_t * h[sb, r] + xc[b, r] * gate_i * mult)
                h[sb, r] = hn
                z[b, r] = hn * y[b, r]
    for c in prange(parts):
        lo, hi = _chunk(w_out.shape[0], parts, c)
        _linear_rows(z, w_out, b_out, x, True, lo, hi)


@njit(parallel=True, fastmath=FM, cache=True)
def attention_step(x, norm_w, unit_offset, eps, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o,
                   num_heads, inv_freq, rotary_dim, interleaved, k_cache, v_cache, ring,
                   slots, pos, doc_start, scale, parts):
    """x (B, D) += multi-query attention of RMSNorm(x) over rows slots[b] of the pool's cache
    (N, Hkv, S, hd), into which this token's key/value are written first (at pos[b] % S for a
    ring, else at pos[b])."""
    B = x.shape[0]
    Hkv, S, hd = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    rep = num_heads // Hkv
    n = rms_norm(x, norm_w, unit_offset, eps)
    q = np.empty((B, num_heads * hd), f32)
    k = np.empty((B, Hkv * hd), f32)
    v = np.empty((B, Hkv * hd), f32)
    for c in prange(parts):
        lo, hi = _chunk(w_q.shape[0], parts, c)
        _linear_rows(n, w_q, b_q, q, False, lo, hi)
    for c in prange(parts):
        lo, hi = _chunk(w_k.shape[0], parts, c)
        _linear_rows(n, w_k, b_k, k, False, lo, hi)
    for c in prange(parts):
        lo, hi = _chunk(w_v.shape[0], parts, c)
        _linear_rows(n, w_v, b_v, v, False, lo, hi)
    half = rotary_dim // 2
    for b in range(B):
        sb = slots[b]
        at = pos[b] % S if ring else pos[b]
        seg = f32(pos[b] - doc_start[b])
        for p in range(half):
            ang = seg * inv_freq[p]
            cs, sn = f32(math.cos(ang)), f32(math.sin(ang))
            i1, i2 = (2 * p, 2 * p + 1) if interleaved else (p, p + half)
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
    out = np.empty((B, num_heads * hd), f32)
    for job in prange(B * num_heads):
        b = job // num_heads
        hh = job % num_heads
        g = hh // rep
        sb = slots[b]
        p_b = pos[b]
        visible = S if ring else min(p_b + 1, S)
        qh = q[b, hh * hd:(hh + 1) * hd]
        scores = np.empty(visible, f32)
        best = f32(-np.inf)
        for s in range(visible):
            key_pos = p_b - (p_b - s) % S if ring else s
            if key_pos < doc_start[b] or key_pos > p_b or key_pos < 0:  # < 0: a ring entry not written yet
                scores[s] = -np.inf
                continue
            ks = k_cache[sb, g, s]
            acc = f32(0.0)
            for d in range(hd):
                acc += qh[d] * ks[d]
            scores[s] = acc * scale
            best = max(best, scores[s])
        total = f32(0.0)
        for s in range(visible):
            e = f32(math.exp(scores[s] - best)) if scores[s] > -np.inf else f32(0.0)
            scores[s] = e
            total += e
        # Accumulate in a local vector: stores into `out` inside the loop would not vectorise
        # (numba cannot rule out that out and v_cache overlap).
        acc_v = np.zeros(hd, f32)
        for s in range(visible):
            p = scores[s] / total
            vs = v_cache[sb, g, s]
            for d in range(hd):
                acc_v[d] += p * vs[d]
        for d in range(hd):
            out[b, hh * hd + d] = acc_v[d]
    for c in prange(parts):
        lo, hi = _chunk(w_o.shape[0], parts, c)
        _linear_rows(out, w_o, b_o, x, True, lo, hi)


@njit(parallel=True, fastmath=FM, cache=True)
def logits_step(x, norm_w, unit_offset, eps, embedding, soft_cap, out, parts):
    """out (B, V) = RMSNorm(x) @ embedding^T, then soft_cap * tanh(. / soft_cap) if soft_cap > 0."""
    n = rms_norm(x, norm_w, unit_offset, eps)
    for c in prange(parts):
        lo, hi = _chunk(embedding.shape[0], parts, c)
        _linear_rows(n, embedding, np.empty(0, f32), out, False, lo, hi)
    if soft_cap > 0:
        B, V = out.shape
        for b in range(B):
            for i in range(V):
                out[b, i] = f32(math.tanh(out[b, i] / soft_cap)) * soft_cap
