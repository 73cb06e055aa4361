"""Sliding-window (and document) attention through `torch.nn.attention.flex_attention`.

The CUDA path of local attention. flex_attention's fused kernel takes the mask as a
`mask_mod` (a predicate on (batch, head, query, key) indices, evaluated inside the kernel)
plus a `BlockMask`: for each (BLOCK x BLOCK) tile of the score matrix, whether it is skipped,
computed with the predicate ("partial") or computed unmasked ("full"). So nothing like the
blocked path's K/V unfold (window / block copies of every key) or its float masks exists,
and the backward writes dK/dV once, not per unfolded copy. Query heads sharing a key/value
head go in through `enable_gqa`.

The BlockMask is built here from the window and the document starts in O(B * T * window /
BLOCK) work, never by evaluating the predicate on all T x T pairs as `create_block_mask`
would. Reference: `attention/reference.py` (the dense masked softmax).

On CPU, torch 2.13 runs flex_attention's forward (unfused under eager, a C++ template under
torch.compile) but refuses its backward; the tests check this path on CPU in float64 with
that check lifted (the unfused math path, whose forward and backward apply the predicate
to every score) and the BlockMask's tiles against the dense mask. `causal_attention`
dispatches here on CUDA only.
"""
from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

BLOCK = 128  # flex_attention's default tile: the BlockMask's granularity


def local_mask_mod(window: int, q_doc_start: torch.Tensor | None):
    """The visibility predicate: key k is visible from query q when k <= q, q - k < window,
    and k is not before q's document start (`q_doc_start` (B, T), None: one document)."""
    if q_doc_start is None:
        def mask_mod(b, h, q, k):
            return (k <= q) & (q - k < window)
    else:
        def mask_mod(b, h, q, k):
            return (k <= q) & (q - k < window) & (k >= q_doc_start[b, q])
    return mask_mod


def _pack(keep: torch.Tensor, cols: torch.Tensor, n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, nq, K) kept candidates with kv block ids `cols` (nq, K) -> (num_blocks (B, 1, nq)
    int32, indices (B, 1, nq, n_kv) int32 with the kept ids first), BlockMask's layout."""
    B, nq, K = keep.shape
    ids = torch.where(keep, cols[None].expand(B, nq, K), n_kv)  # dropped ones sort last
    ids = ids.sort(dim=-1).values.clamp_(max=n_kv - 1)
    indices = torch.zeros(B, 1, nq, n_kv, dtype=torch.int32, device=keep.device)
    width = min(K, n_kv)
    indices[:, 0, :, :width] = ids[..., :width].to(torch.int32)
    return keep.sum(-1, dtype=torch.int32)[:, None], indices


def local_block_mask(T: int, window: int, q_doc_start: torch.Tensor | None, batch: int,
                     device: torch.device, block: int = BLOCK) -> BlockMask:
    """The BlockMask of causal sliding-window attention over T positions (with documents).

    For query block i only the key blocks i - K + 1 .. i, K = ceil((window - 1) / block) + 1,
    can hold a visible key; each candidate is classified from every query's visible key
    interval [max(q - window + 1, doc_start(q)), q]: skipped when no interval meets the key
    block, full when every query's interval covers it (complete blocks only), else partial.
    """
    n = -(-T // block)  # query blocks = key blocks
    K = min(-(-(window - 1) // block) + 1, n)
    q = torch.arange(n * block, device=device)  # padded query positions
    lo = (q - window + 1).clamp(min=0).expand(batch, -1)  # (B, n * block) first visible key
    if q_doc_start is not None:
        lo = torch.maximum(lo, torch.nn.functional.pad(q_doc_start.to(device), (0, n * block - T)))
    lo = lo.view(batch, n, block, 1)
    hi = q.view(1, n, block, 1)  # last visible key: the query itself
    real = (q < T).view(1, n, block, 1)  # padded rows see nothing
    cols = torch.arange(n, device=device)[:, None] - K + 1 + torch.arange(K, device=device)  # (n, K)
    k0 = (cols * block).view(1, n, 1, K)
    k1 = (k0 + block - 1).clamp(max=T - 1)
    meets = (lo <= k1) & (hi >= k0) & real  # (B, n, block, K)
    covers = (lo <= k0) & (hi >= k1) | ~real
    exists = (cols >= 0)[None]  # (1, n, K)
    complete = (k0 + block - 1 < T).view(1, n, K) & torch.arange(n, device=device).add(1).mul(block).le(T).view(1, n, 1)
    full = covers.all(dim=2) & exists & complete
    partial = meets.any(dim=2) & exists & ~full
    cols = cols.clamp(min=0)
    kv_num, kv_idx = _pack(partial, cols, n)
    full_num, full_idx = _pack(full, cols, n)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=local_mask_mod(window, q_doc_start), seq_lengths=(T, T))


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process: eager flex_attention is the unfused math path.
    Default (automatic) dynamic shapes: a second sequence length recompiles once as dynamic,
    rather than once per length up to the recompile limit (prefills vary in length)."""
    return torch.compile(flex_attention)


def flex_local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                         q_doc_start: torch.Tensor | None = None, scale: float | None = None, *,
                         compiled: bool = True, block: int = BLOCK) -> torch.Tensor:
    """Causal sliding-window attention with flex_attention.

    Args:
        q: (B, H, T, hd); k, v: (B, Hkv, T, hd) with Hkv dividing H (1 for MQA).
        window: keys visible per query, itself included.
        q_doc_start: optional (B, T) absolute start of each query's document.
        scale: softmax scale (default hd ** -0.5).
        compiled: through `torch.compile` (the fused kernel; what CUDA wants); False: eager
            flex_attention (its unfused reference implementation).

    Returns:
        (B, H, T, hd) in q's dtype.
    """
    B, H, T, hd = q.shape
    if k.shape[0] != B or k.shape[2] != T or H % k.shape[1] or v.shape != k.shape:
        raise ValueError(f"flex_local_attention: q (B, H, T, hd) and k, v (B, Hkv, T, hd) with Hkv dividing H "
                         f"expected, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if window < 1:
        raise ValueError(f"flex_local_attention: window must be at least 1, got {window}")
    mask = local_block_mask(T, window, q_doc_start, B, q.device, block)
    fn = _compiled_flex() if compiled else flex_attention
    return fn(q, k.to(q.dtype), v.to(q.dtype), block_mask=mask, scale=scale, enable_gqa=k.shape[1] != H)
