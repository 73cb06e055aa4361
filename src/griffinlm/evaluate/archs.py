"""Model configurations for the studies: the three architectures at equal parameter count, the
GLU-variant family at equal parameter count, and a training-FLOPs estimate."""
from __future__ import annotations

from ..config import GATED_ACTIVATIONS, ModelConfig
from ..layers.blocks import block_spec
from ..model import LanguageModel

ARCHS = ("transformer", "hawk", "griffin")
ARCH_LABELS = {"transformer": "Transformer (MQA, global)", "hawk": "Hawk", "griffin": "Griffin"}


def param_count(cfg: ModelConfig) -> int:
    """Non-embedding parameters of `cfg`.

    Built on the CPU rather than the meta device: meta tensors pull in torch._dynamo, whose import
    costs seconds, far more than initialising the small models the studies count."""
    return LanguageModel(cfg).param_count()


def arch_config(arch: str, width: int, depth: int, num_heads: int, local_window: int,
                mlp_expansion: float = 3.0, vocab_size: int = 259, **overrides) -> ModelConfig:
    """A small model of architecture `arch` ("transformer", "hawk" or "griffin") from its tiny preset,
    with the RG-LRU width equal to the model width."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHS}")
    return ModelConfig.preset(f"{arch}-tiny", width=width, depth=depth, num_heads=num_heads,
                              local_window=local_window, mlp_expansion=mlp_expansion, vocab_size=vocab_size,
                              **overrides)


def with_param_count(cfg: ModelConfig, target: int) -> ModelConfig:
    """`cfg` with the MLP hidden width that brings its parameter count nearest to `target`.

    The count is affine in the hidden width, so two counts give the slope."""
    c1 = param_count(ModelConfig.from_dict({**cfg.to_dict(), "mlp_hidden": 1}))
    c2 = param_count(ModelConfig.from_dict({**cfg.to_dict(), "mlp_hidden": 2}))
    hidden = max(1, round(1 + (target - c1) / (c2 - c1)))
    return ModelConfig.from_dict({**cfg.to_dict(), "mlp_hidden": hidden})


def matched_archs(archs: tuple[str, ...] | list[str], width: int, depth: int, num_heads: int,
                  local_window: int, reference: str = "griffin", **overrides) -> dict[str, ModelConfig]:
    """One config per architecture, every one's MLP resized to the parameter count of `reference`
    (MQA blocks are lighter than recurrent blocks, so the Transformer gets a wider MLP)."""
    ref = arch_config(reference, width, depth, num_heads, local_window, **overrides)
    target = param_count(ref)
    return {a: with_param_count(arch_config(a, width, depth, num_heads, local_window, **overrides), target)
            for a in archs}


def glu_variant_config(base: ModelConfig, activation: str, ungated_expansion: float = 4.0,
                       learnable_beta: bool = False) -> ModelConfig:
    """`base` with FFN_`activation`: an ungated FFN of hidden `ungated_expansion * width`, or a gated
    one (three matrices instead of two) of 2/3 of that, so both have the same parameters and FLOPs
    (Shazeer 2020: d_ff 3072 vs 2048 at d_model 768)."""
    hidden = ungated_expansion * base.width
    if activation in GATED_ACTIVATIONS:
        hidden = hidden * 2 / 3
    return ModelConfig.from_dict({**base.to_dict(), "mlp_activation": activation, "mlp_hidden": int(round(hidden)),
                                  "learnable_swish_beta": learnable_beta, "mlp_expansion": ungated_expansion})


def mean_visible_keys(seq_len: int, window: int | None) -> float:
    """Average number of keys a causal query sees over a sequence (window None: global)."""
    if window is None or window >= seq_len:
        return (seq_len + 1) / 2
    # positions 0..window-1 see t+1 keys, the rest see `window`
    full = seq_len - window
    return (window * (window + 1) / 2 + full * window) / seq_len


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token: 6 x (non-embedding parameters + the output layer)
    plus 6 x the attention score and value products; elementwise work (norms, gates, scan) ignored."""
    matmul_params = param_count(cfg) + cfg.vocab_size * cfg.width
    attn = 0.0
    heads_dim = cfg.num_heads * cfg.resolved_head_dim
    for kind in cfg.block_types:
        spec = block_spec(kind)
        if spec.is_attention:
            attn += 2 * 2 * heads_dim * mean_visible_keys(seq_len, spec.attention_keys(cfg))
    return 6.0 * matmul_params + 3.0 * attn
