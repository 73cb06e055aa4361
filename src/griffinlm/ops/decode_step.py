"""One-token decoding steps over a slot-indexed state pool: each residual-block half as one op.

Every op takes the residual stream `x` (n, D) of n sequences, the pre-norm's arguments
(`RMSNorm.op_args()`: weight, eps, unit_offset), the block's parameters, and the block's state
pool (tensors of N >= n slots, dim 0 the slot); row b of the step belongs to pool row
`slots[b]` (distinct, any order), whose token sits at position `pos[b]` of its slot in a
document that starts at `doc_start[b]`. Each returns x + Block(RMSNorm(x)) and updates the
state rows in place.

Two implementations of each: `*_reference` composes the torch ops (any dtype, device, batch,
autograd, torch.compile); on CPU in float32 without autograd, at most `MAX_BATCH` rows and
numba present, the kernels of `decode_step_numba` do the same in one call per op, reading
every weight once on all cores (and write into `x`). `fusable` is the rule; `FUSED_CALLS`
counts the kernel calls so that tests can tell the fast path ran.
"""
from __future__ import annotations

import collections
import ctypes
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from . import scan_numba
from .block_diagonal import block_diagonal_linear
from .causal_conv1d import causal_conv1d_step
from .local_attention import grouped_attention
from .rglru import log_a_from_lambda, rglru_step
from .rms_norm import rms_norm
from .rotary import rotary

# Rows per step up to which the weight-streaming kernels beat PyTorch's GEMMs (measured: at
# batch 16 the torch step's GEMMs run at full width and the two are level).
MAX_BATCH = 8

# Kernel calls per op name; tests read it to check that a fast path really ran.
FUSED_CALLS: collections.Counter[str] = collections.Counter()

Linear = tuple[torch.Tensor, torch.Tensor | None]  # (weight (out, in), bias (out,) or None)
Norm = tuple[torch.Tensor, float, bool]  # RMSNorm (weight, eps, unit_offset)

# Activation names of the MLP ops -> kernel codes (decode_step_numba._act).
ACTIVATIONS = {"identity": 0, "sigmoid": 1, "relu": 2, "gelu_tanh": 3, "gelu": 4, "swish": 5}


def activation_reference(x: torch.Tensor, name: str, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The MLP nonlinearity `name` (a key of ACTIVATIONS) in torch; swish uses `beta`."""
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "relu":
        return F.relu(x)
    if name in ("gelu_tanh", "gelu"):
        return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")
    if name == "swish":
        return x * torch.sigmoid(torch.as_tensor(beta, dtype=x.dtype, device=x.device) * x)
    if name == "identity":
        return x
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")


# --- eligibility and zero-copy views ---------------------------------------------------------
_VIEWS: dict[int, tuple] = {}
_EMPTY = np.empty(0, np.float32)


def _view(t: torch.Tensor | None) -> np.ndarray:
    """A numpy view of a contiguous float32 CPU tensor's memory, kept per tensor while it lives.

    Not `.numpy()`, which would make a parameter's storage non-resizable for good (FSDP frees
    parameters by resizing); a view is re-made when the tensor's storage moves."""
    if t is None:
        return _EMPTY
    key = id(t)
    hit = _VIEWS.get(key)
    ptr = t.data_ptr()
    if hit is not None and hit[0]() is t and hit[1] == ptr and hit[2].shape == t.shape:
        return hit[2]
    array = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=tuple(t.shape))
    _VIEWS[key] = (weakref.ref(t, lambda _, k=key: _VIEWS.pop(k, None)), ptr, array)
    return array


def fusable(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether the numba kernels apply: the ops' shared rule (`scan_numba.cpu_fusable`: numba
    present, not tracing, plain float32 CPU tensors), no autograd, at most MAX_BATCH rows, and
    contiguous tensors (the kernels index raw memory)."""
    if torch.is_grad_enabled() or x.dim() != 2 or not 0 < x.shape[0] <= MAX_BATCH:
        return False
    return scan_numba.cpu_fusable(x, *tensors) and all(t is None or t.is_contiguous() for t in tensors)


def _kernels():
    from . import decode_step_numba  # numba is optional: imported only once a kernel runs

    return decode_step_numba


def _rows(slots: torch.Tensor, pos: torch.Tensor, doc_start: torch.Tensor) -> tuple[np.ndarray, ...]:
    return tuple(t.to(torch.int64).contiguous().numpy() for t in (slots, pos, doc_start))


def _threads() -> int:
    import numba

    return numba.get_num_threads()


def _fresh(x: torch.Tensor) -> np.ndarray:
    """x as a float32 array the kernel may update in place (a copy: the caller's x is kept)."""
    return x.detach().clone().contiguous().numpy()


# --- recurrent block ---------------------------------------------------------------------------
def recurrent_step_reference(x: torch.Tensor, norm: Norm, linear_y: Linear, linear_x: Linear,
                             conv: Linear, lru: tuple, linear_out: Linear, gelu_approximate: str,
                             conv_state: torch.Tensor, h: torch.Tensor, slots: torch.Tensor,
                             pos: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """x (n, D) + RecurrentBlock(RMSNorm(x)) in torch ops; conv_state (N, W-1, R) and the RG-LRU
    state h (N, R) float32 updated in place at rows `slots`. `lru`: `RGLRU.op_args()`."""
    n = rms_norm(x, *norm)
    y = F.gelu(F.linear(n, *linear_y), approximate=gelu_approximate)
    u = causal_conv1d_step(F.linear(n, *linear_x), *conv, conv_state, slots, pos - doc_start)
    gr_w, gr_b, gi_w, gi_b, lambda_, c, unscaled_reset = lru
    gate_r, gate_i = block_diagonal_linear(u, [gr_w, gi_w], [gr_b, gi_b])
    h_new = rglru_step(u, gate_r, gate_i, log_a_from_lambda(lambda_), h.index_select(0, slots), c,
                       pos == doc_start, unscaled_reset)
    h.index_copy_(0, slots, h_new)
    return x + F.linear(h_new.to(x.dtype) * y, *linear_out)


def recurrent_step(x: torch.Tensor, norm: Norm, linear_y: Linear, linear_x: Linear, conv: Linear,
                   lru: tuple, linear_out: Linear, gelu_approximate: str, conv_state: torch.Tensor,
                   h: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor, doc_start: torch.Tensor) -> torch.Tensor:
    """As `recurrent_step_reference`, fused where `fusable`."""
    gr_w, gr_b, gi_w, gi_b, lambda_, c, unscaled_reset = lru
    if not fusable(x, norm[0], *linear_y, *linear_x, *conv, gr_w, gr_b, gi_w, gi_b, lambda_, *linear_out,
                   conv_state, h):
        return recurrent_step_reference(x, norm, linear_y, linear_x, conv, lru, linear_out, gelu_approximate,
                                        conv_state, h, slots, pos, doc_start)
    k = _kernels()
    out = _fresh(x)
    gelu = ACTIVATIONS["gelu_tanh" if gelu_approximate == "tanh" else "gelu"]
    k.recurrent_step(out, _view(norm[0]), norm[2], np.float32(norm[1]), _view(linear_y[0]), _view(linear_y[1]),
                     _view(linear_x[0]), _view(linear_x[1]), _view(conv[0]), _view(conv[1]), conv_state.numpy(),
                     _view(gr_w), _view(gr_b), _view(gi_w), _view(gi_b), _view(lambda_), float(c),
                     bool(unscaled_reset), h.numpy(), _view(linear_out[0]), _view(linear_out[1]),
                     *_rows(slots, pos, doc_start), gelu, _threads())
    FUSED_CALLS["recurrent_step"] += 1
    return torch.from_numpy(out)


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
                             v_cache: torch.Tensor, ring: bool, slots: torch.Tensor, pos: torch.Tensor,
                             doc_start: torch.Tensor, keys: int | None = None, whole: bool = False) -> torch.Tensor:
    """x (n, D) + MultiQueryAttention(RMSNorm(x)) in torch ops over the pool's key/value cache
    (N, Hkv, S, hd) (keys after RoPE), into which this token's key/value are written first (at
    pos % S for a ring, else at pos). `rope`: `RotaryEmbedding.op_args()`. `keys` limits a
    global cache to its first slots (eager: the filled prefix), `whole` says slots == arange(N)
    (the pool is read without gathering its rows)."""
    B = x.shape[0]
    Hkv, S, hd = k_cache.shape[1:]
    n = rms_norm(x, *norm)
    seg = (pos - doc_start)[:, None]  # (n, 1) position within the document
    q = rotary(F.linear(n, *q_proj).view(B, num_heads, 1, hd), seg, *rope)
    k = rotary(F.linear(n, *k_proj).view(B, Hkv, 1, hd), seg, *rope)
    v = F.linear(n, *v_proj).view(B, Hkv, 1, hd)
    at = torch.remainder(pos, S) if ring else pos
    k_cache[slots, :, at] = k[:, :, 0].to(k_cache.dtype)
    v_cache[slots, :, at] = v[:, :, 0].to(v_cache.dtype)
    kc, vc = (k_cache, v_cache) if whole else (k_cache.index_select(0, slots), v_cache.index_select(0, slots))
    if keys is not None and not ring:
        kc, vc = kc[:, :, :keys], vc[:, :, :keys]
    key_pos = key_positions(pos, S, ring)[:, : kc.shape[2]]  # (n, S')
    mask = (key_pos >= doc_start[:, None]) & (key_pos <= pos[:, None])
    out = grouped_attention(q, kc, vc, mask[:, None], hd ** -0.5)  # (n, H, 1, hd)
    return x + F.linear(out.reshape(B, num_heads * hd), *o_proj)


def attention_step(x: torch.Tensor, norm: Norm, q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear,
                   num_heads: int, rope: tuple, k_cache: torch.Tensor, v_cache: torch.Tensor, ring: bool,
                   slots: torch.Tensor, pos: torch.Tensor, doc_start: torch.Tensor, keys: int | None = None,
                   whole: bool = False) -> torch.Tensor:
    """As `attention_step_reference`, fused where `fusable`."""
    inv_freq, rotary_dim, interleaved = rope
    if not fusable(x, norm[0], *q_proj, *k_proj, *v_proj, *o_proj, inv_freq, k_cache, v_cache):
        return attention_step_reference(x, norm, q_proj, k_proj, v_proj, o_proj, num_heads, rope, k_cache,
                                        v_cache, ring, slots, pos, doc_start, keys, whole)
    k = _kernels()
    out = _fresh(x)
    k.attention_step(out, _view(norm[0]), norm[2], np.float32(norm[1]), _view(q_proj[0]), _view(q_proj[1]),
                     _view(k_proj[0]), _view(k_proj[1]), _view(v_proj[0]), _view(v_proj[1]), _view(o_proj[0]),
                     _view(o_proj[1]), num_heads, _view(inv_freq), rotary_dim, bool(interleaved), k_cache.numpy(),
                     v_cache.numpy(), ring, *_rows(slots, pos, doc_start), np.float32(k_cache.shape[3] ** -0.5),
                     _threads())
    FUSED_CALLS["attention_step"] += 1
    return torch.from_numpy(out)


# --- MLP -----------------------------------------------------------------------------------------
def mlp_step_reference(x: torch.Tensor, norm: Norm, gate: Linear | None, up: Linear, down: Linear,
                       activation: str, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """x (n, D) + down(act(gate(m)) * up(m)) with m = RMSNorm(x); without `gate` the plain
    down(act(up(m)))."""
    m = rms_norm(x, *norm)
    u = F.linear(m, *up)
    hidden = activation_reference(u if gate is None else F.linear(m, *gate), activation, beta)
    return x + F.linear(hidden if gate is None else hidden * u, *down)


def mlp_step(x: torch.Tensor, norm: Norm, gate: Linear | None, up: Linear, down: Linear, activation: str,
             beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """As `mlp_step_reference`, fused where `fusable`."""
    beta_t = beta if isinstance(beta, torch.Tensor) else None
    if not fusable(x, norm[0], *(gate or (None, None)), *up, *down):
        return mlp_step_reference(x, norm, gate, up, down, activation, beta)
    k = _kernels()
    out = _fresh(x)
    D = x.shape[1]
    w_gate, b_gate = (np.empty((0, D), np.float32), _EMPTY) if gate is None else (_view(gate[0]), _view(gate[1]))
    k.mlp_step(out, _view(norm[0]), norm[2], np.float32(norm[1]), w_gate, b_gate, _view(up[0]), _view(up[1]),
               _view(down[0]), _view(down[1]), ACTIVATIONS[activation],
               np.float32(float(beta_t) if beta_t is not None else beta), _threads())
    FUSED_CALLS["mlp_step"] += 1
    return torch.from_numpy(out)


# --- output layer --------------------------------------------------------------------------------
def logits_reference(x: torch.Tensor, norm: Norm, embedding: torch.Tensor, soft_cap: float | None) -> torch.Tensor:
    """(..., D) -> (..., V): final RMSNorm, tied output layer, then cap * tanh(logits / cap)."""
    logits = F.linear(rms_norm(x, *norm), embedding)
    if soft_cap is not None:
        logits = torch.tanh(logits.float() / soft_cap) * soft_cap
    return logits


def logits_step(x: torch.Tensor, norm: Norm, embedding: torch.Tensor, soft_cap: float | None) -> torch.Tensor:
    """As `logits_reference` for a step's rows x (n, D) -> (n, V), fused where `fusable`."""
    if not fusable(x, norm[0], embedding):
        return logits_reference(x, norm, embedding, soft_cap)
    out = torch.empty(x.shape[0], embedding.shape[0])
    _kernels().logits_step(x.detach().contiguous().numpy(), _view(norm[0]), norm[2], np.float32(norm[1]),
                           _view(embedding), np.float32(soft_cap or 0.0), out.numpy(), _threads())
    FUSED_CALLS["logits_step"] += 1
    return out
