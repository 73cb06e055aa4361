"""The one-token decoding step on CPU through the fused numba kernels of `ops.decode_numba`.

`LanguageModel.decode_step` uses it when it applies (`CPUDecoder.supports`): numba present,
float32 weights and cache on the CPU, no autograd, a batch of at most `MAX_BATCH` rows (past
that the step is bound by arithmetic, where PyTorch's GEMMs are the better tool). It computes
what the eager `LanguageModel._step` computes, one kernel per block half instead of ~100 ops.
"""
from __future__ import annotations

import ctypes

import numpy as np
import torch
import torch.nn as nn

from .layers import MultiQueryAttention, RecurrentBlock, RMSNorm
from .layers.activations import GatedMLP, GeLU, Swish
from .ops import scan_numba

# Rows per step up to which the weight-streaming kernels beat PyTorch's GEMMs (measured:
# at batch 16 the eager step's GEMMs run at full width and the two are level).
MAX_BATCH = 8

_EMPTY = np.empty(0, np.float32)


def _arr(t: torch.Tensor | None) -> np.ndarray:
    """A numpy view of a contiguous float32 CPU tensor's memory. Not `.numpy()`, which would
    make the parameter's storage non-resizable for good (FSDP frees parameters by resizing);
    the decoder keeps the parameters alive and `matches` notices if their storage moves."""
    if t is None:
        return _EMPTY
    t = t.detach()
    if not t.is_contiguous():
        raise ValueError("fused CPU decoding needs contiguous parameters")
    ptr = ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))
    return np.ctypeslib.as_array(ptr, shape=tuple(t.shape))


def _norm(norm: RMSNorm) -> tuple:
    return _arr(norm.weight), norm.unit_offset, np.float32(norm.eps)


def _activation(act: nn.Module) -> tuple[int, float | None]:
    """(code of ops.decode_numba.ACTIVATIONS, fixed swish beta or None when learnable)."""
    from .ops.decode_numba import ACTIVATIONS

    if isinstance(act, nn.Sigmoid):
        return ACTIVATIONS["sigmoid"], 1.0
    if isinstance(act, nn.ReLU):
        return ACTIVATIONS["relu"], 1.0
    if isinstance(act, GeLU):
        return ACTIVATIONS["gelu_tanh" if act.approximate == "tanh" else "gelu"], 1.0
    if isinstance(act, Swish):
        return ACTIVATIONS["swish"], None if act.learnable else float(act.beta)
    if isinstance(act, nn.Identity):
        return ACTIVATIONS["identity"], 1.0
    raise TypeError(f"no fused decode for activation {type(act).__name__}")


class CPUDecoder:
    """Numpy views of a model's weights in the kernels' layout, made once per model.

    The views share the parameters' storage, so in-place updates (an optimizer step, a
    `load_state_dict`) are seen; `matches` notices when parameters were replaced (`.to()`)."""

    def __init__(self, model: nn.Module) -> None:
        # Parameters and buffers (RoPE frequencies) viewed by the kernels: held here so that
        # their memory lives as long as the views, and checked by `matches`.
        self.tensors = list(model.parameters()) + list(model.buffers())
        self.ptrs = [t.data_ptr() for t in self.tensors]
        # Every (container, key, object) of the module tree, so that `matches` can tell cheaply
        # that no submodule, parameter or buffer was replaced (walking model.parameters() per
        # token cost ~0.15 ms, a twentieth of a step).
        self.slots = [(d, key, obj) for m in model.modules() for d in (m._modules, m._parameters, m._buffers)
                      for key, obj in d.items()]
        self.eligible = scan_numba.available() and all(
            t.dtype == torch.float32 and t.device.type == "cpu" and type(t.data) is torch.Tensor
            and t.is_contiguous() for t in self.tensors)  # not DTensor (sharded) parameters
        if not self.eligible:
            return  # numba is imported only past this point: it is an optional dependency
        import numba

        from .ops import decode_numba

        self.numba = numba
        self.k = decode_numba
        cfg = model.config
        self.embedding = _arr(model.embed.weight)
        self.embed_multiplier = float(model.embed_multiplier)
        self.final = _norm(model.final_norm)
        self.soft_cap = np.float32(cfg.logits_soft_cap or 0.0)
        self.blocks = []
        for block in model.blocks:
            t, m = block.temporal, block.mlp
            code, beta = _activation(m.act)
            gated = isinstance(m, GatedMLP)
            mlp = (*_norm(block.mlp_norm), _arr(m.gate_proj.weight) if gated else np.empty((0, cfg.width), np.float32),
                   _arr(m.gate_proj.bias) if gated else _EMPTY, _arr(m.up_proj.weight), _arr(m.up_proj.bias),
                   _arr(m.down_proj.weight), _arr(m.down_proj.bias), code)
            swish = m.act if beta is None else None
            if isinstance(t, RecurrentBlock):
                lru = t.rg_lru
                gelu = self.k.ACTIVATIONS["gelu_tanh" if t.gelu_approximate == "tanh" else "gelu"]
                temporal = (*_norm(block.temporal_norm), _arr(t.linear_y.weight), _arr(t.linear_y.bias),
                            _arr(t.linear_x.weight), _arr(t.linear_x.bias), _arr(t.conv1d.weight),
                            _arr(t.conv1d.bias), _arr(lru.gate_r_weight), _arr(lru.gate_r_bias),
                            _arr(lru.gate_i_weight), _arr(lru.gate_i_bias), _arr(lru.lambda_),
                            float(lru.c), bool(lru.unscaled_reset), _arr(t.linear_out.weight),
                            _arr(t.linear_out.bias), gelu)
            elif isinstance(t, MultiQueryAttention):
                temporal = (*_norm(block.temporal_norm), _arr(t.q_proj.weight), _arr(t.q_proj.bias),
                            _arr(t.k_proj.weight), _arr(t.k_proj.bias), _arr(t.v_proj.weight),
                            _arr(t.v_proj.bias), _arr(t.o_proj.weight), _arr(t.o_proj.bias), t.num_heads,
                            _arr(t.rope.inv_freq), t.rope.rotary_dim, t.rope.pairing == "interleaved",
                            np.float32(t.head_dim ** -0.5))
            else:
                raise TypeError(f"no fused decode for block {type(t).__name__}")
            self.blocks.append((isinstance(t, RecurrentBlock), temporal, mlp, beta, swish))

    def matches(self, model: nn.Module) -> bool:
        """True while the model's modules, parameters and buffers (objects and storage) are the
        ones these views were made from."""
        return (all(d.get(key) is obj for d, key, obj in self.slots)
                and all(t.data_ptr() == ptr for t, ptr in zip(self.tensors, self.ptrs)))

    @staticmethod
    def usable_with(cache) -> bool:
        """The per-call conditions: no autograd, at most MAX_BATCH rows, a float32 cache."""
        if torch.is_grad_enabled() or cache.batch_size > MAX_BATCH:
            return False
        for c in cache.blocks:
            for t in vars(c).values():
                if isinstance(t, torch.Tensor) and (t.dtype != torch.float32 or not t.is_contiguous()):
                    return False
        return True

    @staticmethod
    def supports(model: nn.Module, cache) -> bool:
        """Whether this path applies to `model` and `cache` (see the module docstring)."""
        return CPUDecoder.usable_with(cache) and cpu_decoder(model) is not None

    def step(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        """tokens (B,) long at position cache.length -> logits (B, V) float32. Updates the cache
        tensors in place (and cache.position); the caller advances cache.length."""
        k = self.k
        parts = self.numba.get_num_threads()
        pos = int(cache.length)
        doc_start = cache.doc_start.numpy()
        x = (torch.from_numpy(self.embedding)[tokens.view(-1)] * self.embed_multiplier).numpy()  # (B, D)
        for (recurrent, temporal, mlp, beta, swish), c in zip(self.blocks, cache.blocks):
            if recurrent:
                (nw, off, eps, wy, by, wx, bx, cw, cb, grw, grb, giw, gib, lam, cc, unscaled, wo, bo,
                 gelu) = temporal
                k.recurrent_step(x, nw, off, eps, wy, by, wx, bx, cw, cb, c.conv.numpy(), grw, grb, giw, gib,
                                 lam, cc, unscaled, c.rnn.numpy(), wo, bo, pos, doc_start, gelu, parts)
            else:
                (nw, off, eps, wq, bq, wk, bk, wv, bv, wo, bo, heads, inv_freq, rot, inter, scale) = temporal
                k.attention_step(x, nw, off, eps, wq, bq, wk, bk, wv, bv, wo, bo, heads, inv_freq, rot, inter,
                                 c.k.numpy(), c.v.numpy(), c.ring, pos, doc_start, scale, parts)
            b = float(swish.beta) if swish is not None else beta
            k.mlp_step(x, *mlp[:3], *mlp[3:9], mlp[9], np.float32(b), parts)
        logits = torch.empty(x.shape[0], self.embedding.shape[0])
        k.logits_step(x, *self.final, self.embedding, self.soft_cap, logits.numpy(), parts)
        cache.position.add_(1)
        return logits


def cpu_decoder(model: nn.Module) -> CPUDecoder | None:
    """The model's `CPUDecoder` (made on first use, remade when its modules or parameters
    change), or None when its parameters do not qualify (not all plain float32 CPU tensors, or
    no numba)."""
    dec = model.__dict__.get("_cpu_decoder")
    if dec is None or not dec.matches(model):
        dec = CPUDecoder(model)
        model.__dict__["_cpu_decoder"] = dec
    return dec if dec.eligible else None


__all__ = ["CPUDecoder", "cpu_decoder", "MAX_BATCH"]
