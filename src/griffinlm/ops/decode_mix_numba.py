"""The hybrid decoding step's kernels (numba): everything between a block's GEMMs, for many rows.

Above `decode_step.MAX_BATCH` rows a step's projections run as GEMMs (`ops.linear.step_products`)
and each block half's other work as one kernel here: the recurrent block's conv, then (after the
gates' batched GEMMs) the RG-LRU with the gate branch's activation; attention's RoPE, cache writes
and attention over the cache; the MLP's activation and gate. A product may be a block of columns
of one stacked GEMM output: the kernels take it as a (B, k, width) view and an index, or (for
attention's unequal widths) an array and a column offset, and read it in place (biases are
added by the GEMMs: a column offset or a bias add inside the activation loops kept LLVM from
vectorising them). Shared row helpers come from `decode_step_numba`; arrays are float32 and
C-contiguous, as there. Their torch references and the dispatch are in `ops/decode_step.py`.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .decode_step_numba import GELU_TANH, _act, _attend_job, _conv_row, _head_split, _rope_and_write_row
from .numba_common.jit import DOT_FASTMATH as FM
from .numba_common.jit import f32, row_chunk
from .lru.numba import gates


@njit(fastmath=FM, inline="always")
def _columns(a, col, width, b, out):
    """out[b, :] = a[b, col:col + width]: one product's columns of a stacked GEMM output
    (`ops.linear.step_products`)."""
    for r in range(width):
        out[b, r] = a[b, col + r]


@njit(parallel=True, fastmath=FM, cache=True)
def conv_mix(u3, ui, conv_w, conv_b, conv_state, slots, pos, doc_start):
    """The recurrent block's conv step for many rows: its input projection u = u3[:, ui] (B, R)
    (bias included; u3 (B, k, R) holds k products of width R side by side) -> (B, R), updating rows
    slots[b] of conv_state (N, W-1, R) in place."""
    B, R = u3.shape[0], u3.shape[2]
    u = np.empty((B, R), f32)
    xc = np.empty((B, R), f32)
    for b in prange(B):
        for r in range(R):
            u[b, r] = u3[b, ui, r]
        _conv_row(u, b, conv_w, conv_b, conv_state, slots[b], pos[b], doc_start[b], xc)
    return xc


@njit(parallel=True, fastmath=FM, cache=True)
def rglru_mix(xc, gate_r, gate_i, y3, yi, lam, c, unscaled_reset, h, slots, pos, doc_start, gelu_code, parts):
    """The RG-LRU step for many rows from its gates' pre-activations gate_r, gate_i (H, B, bw)
    (computed by batched GEMMs): xc (B, R) and the gate branch y = y3[:, yi] (B, R) (y3 as in
    `conv_mix`) -> z (B, R) = act(y) * h_new, updating rows slots[b] of h (N, R) in place (as
    `recurrent_step`)."""
    H, B, bw = gate_r.shape
    R = H * bw
    log_a = np.empty(R, f32)
    for r in range(R):  # log a = -softplus(-Lambda), torch's softplus threshold 20
        lv = -lam[r]
        log_a[r] = -(lv if lv > 20.0 else math.log1p(math.exp(lv)))
    cf = f32(c)
    z = np.empty((B, R), f32)
    for ch in prange(parts):
        lo, hi = row_chunk(B, parts, ch)
        for b in range(lo, hi):
            if gelu_code == GELU_TANH:  # a constant activation code inside: the channel loop vectorises
                _rglru_row(b, xc, gate_r, gate_i, y3, yi, log_a, cf, unscaled_reset, h, slots, pos, doc_start,
                           GELU_TANH, z)
            else:
                _rglru_row(b, xc, gate_r, gate_i, y3, yi, log_a, cf, unscaled_reset, h, slots, pos, doc_start,
                           gelu_code, z)
    return z


@njit(fastmath=FM, inline="always")
def _rglru_row(b, xc, gate_r, gate_i, y3, yi, log_a, cf, unscaled_reset, h, slots, pos, doc_start, act, z):
    """Row b of `rglru_mix`."""
    H, bw = gate_r.shape[0], gate_r.shape[2]
    # a reset multiplies a by 0 and (unscaled) replaces sqrt(1 - a^2) by 1: no branch in the
    # channel loop
    keep = f32(0.0) if pos[b] == doc_start[b] else f32(1.0)
    force = f32(1.0) if keep == f32(0.0) and unscaled_reset else f32(0.0)
    sb = slots[b]
    for hd in range(H):
        for j in range(bw):
            r = hd * bw + j
            _, g_i, a_t, mult = gates(gate_r[hd, b, j], gate_i[hd, b, j], log_a[r], cf)
            mult += force * (f32(1.0) - mult)
            hn = keep * a_t * h[sb, r] + xc[b, r] * g_i * mult
            h[sb, r] = hn
            z[b, r] = hn * _act(y3[b, yi, r], act, f32(1.0))


@njit(parallel=True, fastmath=FM, cache=True)
def attention_mix(q_out, q_col, k_out, k_col, v_out, v_col, num_heads, inv_freq, rotary_dim, interleaved,
                  k_cache, v_cache, ring, slots, pos, doc_start, scale, parts):
    """The attention block's step between its projections, for many rows: q is the column block
    q_out[:, q_col:q_col + H*hd], k and v likewise (Hkv*hd wide; the three may be blocks of one
    stacked output; biases included) -> out (B, H*hd), as `attention_step` (RoPE on q and k, this
    token's key/value written to rows slots[b] of the cache, then attention over them)."""
    B = q_out.shape[0]
    Hkv, hd = k_cache.shape[1], k_cache.shape[3]
    q = np.empty((B, num_heads * hd), f32)
    k = np.empty((B, Hkv * hd), f32)
    v = np.empty((B, Hkv * hd), f32)
    for b in prange(B):
        _columns(q_out, q_col, num_heads * hd, b, q)
        _columns(k_out, k_col, Hkv * hd, b, k)
        _columns(v_out, v_col, Hkv * hd, b, v)
        _rope_and_write_row(b, q, k, v, num_heads, inv_freq, rotary_dim, interleaved, k_cache, v_cache, ring,
                            slots[b], pos[b], doc_start[b])
    out = np.empty((B, q.shape[1]), f32)
    split = _head_split(B * Hkv, num_heads // Hkv, parts)
    for job in prange(B * Hkv * split):
        _attend_job(job, split, q, num_heads, k_cache, v_cache, ring, slots, pos, doc_start, scale, out)
    return out


@njit(parallel=True, fastmath=FM, cache=True)
def gated_hidden(g3, gi, u3, ui, act, beta, parts):
    """The MLP's hidden layer between its projections, for many rows: act(g3[:, gi]) * u3[:, ui],
    or act(u3[:, ui]) for gi < 0 (no gate); g3, u3 (B, k, M) hold k products of width M side by
    side (they may be one stacked output; biases included) -> (B, M)."""
    B, M = u3.shape[0], u3.shape[2]
    hid = np.empty((B, M), f32)
    gated = gi >= 0
    for c in prange(parts):
        lo, hi = row_chunk(B, parts, c)
        for b in range(lo, hi):
            if gated:
                for m in range(M):
                    hid[b, m] = _act(g3[b, gi, m], act, beta) * u3[b, ui, m]
            else:
                for m in range(M):
                    hid[b, m] = _act(u3[b, ui, m], act, beta)
    return hid
