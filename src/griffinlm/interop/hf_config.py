"""Mapping between a `transformers` RecurrentGemma `config.json` and our `ModelConfig`.

Every way RecurrentGemma departs from the paper maps onto a `ModelConfig` field; nothing here
is keyed on a model name. The facts follow `transformers`' RecurrentGemma implementation:

- embedding x bf16(sqrt(hidden_size))                 -> embed_scale="sqrt_bf16"
- RMSNorm scale (1 + weight)                          -> norm_unit_offset=True
- RoPE on `partial_rotary_factor` of the head dim, split-half pairing -> rope_fraction, rope_pairing
- logits cap * tanh(logits / cap)                     -> logits_soft_cap
- a query sees keys with 0 <= q - k < attention_window_size (the window counts the query
  itself, in both the sliding-window mask and the DynamicSlidingWindowLayer cache)
                                                      -> window_includes_current=True
- hidden_activation gelu_pytorch_tanh                 -> gelu_approximate="tanh"
- biases: recurrent block, conv, attention output, MLP always; q/k/v per `attention_bias`
- RG-LRU gate blocks = num_attention_heads             -> lru_num_blocks
- log a_t = -8 r_t softplus(recurrent_param): recurrent_param = -Lambda (sign handled in weights.py)
- reset positions (position 0) skip the sqrt(1 - a^2) scale -> lru_unscaled_reset=True
- MLP: `intermediate_size` counts both GeGLU branches  -> mlp_hidden = intermediate_size // 2
"""
from __future__ import annotations

from typing import Any

from ..config import ModelConfig

MODEL_TYPE = "recurrent_gemma"

# RecurrentGemmaConfig's defaults, applied to keys a config.json leaves out (as transformers does).
HF_DEFAULTS: dict[str, Any] = {
    "num_hidden_layers": 26, "vocab_size": 256000, "hidden_size": 2560, "intermediate_size": 3 * 2560,
    "num_attention_heads": 10, "lru_width": None, "attention_window_size": 2048, "conv1d_width": 4,
    "logits_soft_cap": 30.0, "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh",
    "block_types": ["recurrent", "recurrent", "attention"], "num_key_value_heads": None,
    "attention_bias": False, "tie_word_embeddings": True, "rope_theta": 10000.0,
    "partial_rotary_factor": 0.5, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
}
_GELU = {"gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu": "none"}
_GELU_EXPORT = {"tanh": "gelu_pytorch_tanh", "none": "gelu"}
LRU_C = 8.0  # the constant c of a_t = a^(c r_t), hard-coded in RecurrentGemma


class NotRecurrentGemmaError(ValueError):
    """The directory or config is not a RecurrentGemma checkpoint."""


def _rope(hf: dict[str, Any]) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor): transformers >= 5 nests them in `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"RecurrentGemma config: rope_type {rope_type!r} is not supported (only 'default')")
    theta = params.get("rope_theta", hf.get("rope_theta", HF_DEFAULTS["rope_theta"]))
    fraction = params.get("partial_rotary_factor",
                          hf.get("partial_rotary_factor", HF_DEFAULTS["partial_rotary_factor"]))
    return float(theta), float(fraction)


def hf_to_model_config(hf: dict[str, Any]) -> ModelConfig:
    """Our `ModelConfig` for a RecurrentGemma `config.json` dict.

    Raises NotRecurrentGemmaError if `model_type` is not "recurrent_gemma", ValueError for
    settings our model cannot express (untied output layer, unknown activation).
    """
    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE:
        raise NotRecurrentGemmaError(
            f"config.json has model_type {model_type!r}; expected {MODEL_TYPE!r} (a RecurrentGemma checkpoint)"
        )
    g = {k: hf.get(k, v) for k, v in HF_DEFAULTS.items()}
    if g["attention_window_size"] is None and hf.get("sliding_window") is not None:
        g["attention_window_size"] = hf["sliding_window"]
    if not g["tie_word_embeddings"]:
        raise ValueError("RecurrentGemma config has tie_word_embeddings=false; griffinlm ties the output layer "
                         "to the embedding, so an untied checkpoint cannot be loaded")
    act = g["hidden_activation"]
    if act not in _GELU:
        raise ValueError(f"RecurrentGemma config: hidden_activation {act!r} not supported; "
                         f"expected one of {sorted(_GELU)}")
    width, heads = int(g["hidden_size"]), int(g["num_attention_heads"])
    if width % heads:
        raise ValueError(f"RecurrentGemma config: hidden_size {width} not divisible by num_attention_heads {heads}")
    if int(g["intermediate_size"]) % 2:
        raise ValueError(f"RecurrentGemma config: intermediate_size {g['intermediate_size']} must be even "
                         "(it counts both GeGLU branches)")
    theta, fraction = _rope(hf)
    block_types = list(g["block_types"])
    for kind in block_types:
        if kind not in ("recurrent", "attention"):
            raise ValueError(f"RecurrentGemma config: unknown block type {kind!r} in block_types")
    return ModelConfig(
        vocab_size=int(g["vocab_size"]), width=width, depth=int(g["num_hidden_layers"]),
        num_heads=heads, head_dim=width // heads,
        num_kv_heads=int(g["num_key_value_heads"] or heads),
        block_pattern=tuple(block_types),
        mlp_hidden=int(g["intermediate_size"]) // 2, mlp_activation="geglu", mlp_bias=True,
        gelu_approximate=_GELU[act],
        local_window=int(g["attention_window_size"]), window_includes_current=True,
        rope_fraction=fraction, rope_pairing="split_half", rope_base=theta,
        attention_qkv_bias=bool(g["attention_bias"]), attention_out_bias=True,
        lru_width=int(g["lru_width"] or width), conv_width=int(g["conv1d_width"]),
        conv_bias=True, recurrent_bias=True, lru_num_blocks=heads, lru_c=LRU_C,
        lru_init="recurrentgemma", lru_min_rad=0.9, lru_max_rad=0.999, lru_unscaled_reset=True,
        embed_scale="sqrt_bf16", logits_soft_cap=float(g["logits_soft_cap"]),
        norm_eps=float(g["rms_norm_eps"]), norm_unit_offset=True,
    )


def model_config_to_hf(cfg: ModelConfig, special_ids: dict[str, int] | None = None,
                       dtype: str = "float32") -> dict[str, Any]:
    """A RecurrentGemma `config.json` dict for `cfg`.

    Raises ValueError naming every field whose value RecurrentGemma cannot express.
    `special_ids` may carry pad/bos/eos token ids (default 0/1/2, Gemma's).
    """
    need: dict[str, Any] = {
        "embed_scale": "sqrt_bf16", "norm_unit_offset": True, "rope_pairing": "split_half",
        "window_includes_current": True, "mlp_activation": "geglu", "mlp_bias": True,
        "attention_out_bias": True, "recurrent_bias": True, "conv_bias": True, "lru_c": LRU_C,
        "lru_unscaled_reset": True, "head_dim": cfg.width // cfg.num_heads,
        "lru_num_blocks": cfg.num_heads, "learnable_swish_beta": False,
    }
    have = cfg.to_dict()
    have["head_dim"] = cfg.resolved_head_dim
    have["lru_num_blocks"] = cfg.resolved_lru_blocks
    bad = [f"{k}={have[k]!r} (RecurrentGemma needs {v!r})" for k, v in need.items() if have[k] != v]
    if cfg.logits_soft_cap is None:
        bad.append("logits_soft_cap=None (RecurrentGemma always soft-caps)")
    if "global_attention" in cfg.block_pattern:
        bad.append("block_pattern has 'global_attention' (RecurrentGemma attention is always local)")
    if cfg.width % cfg.num_heads:
        bad.append(f"width {cfg.width} not divisible by num_heads {cfg.num_heads}")
    if bad:
        raise ValueError("this model cannot be exported as RecurrentGemma: " + "; ".join(bad))
    ids = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, **(special_ids or {})}
    return {
        "architectures": ["RecurrentGemmaForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.width, "num_hidden_layers": cfg.depth,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim, "intermediate_size": 2 * cfg.resolved_mlp_hidden,
        "lru_width": cfg.resolved_lru_width, "attention_window_size": cfg.local_window,
        "conv1d_width": cfg.conv_width, "logits_soft_cap": cfg.logits_soft_cap,
        "rms_norm_eps": cfg.norm_eps, "hidden_activation": _GELU_EXPORT[cfg.gelu_approximate],
        "block_types": list(cfg.block_pattern), "attention_bias": cfg.attention_qkv_bias,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base,
                            "partial_rotary_factor": cfg.rope_fraction},
        # transformers < 5 reads these two at top level
        "rope_theta": cfg.rope_base, "partial_rotary_factor": cfg.rope_fraction,
        "tie_word_embeddings": True, "attention_dropout": 0.0, "use_cache": True,
        "w_init_variance_scale": 0.01, "final_w_init_variance_scale": 2.0 / cfg.depth,
        "dtype": dtype, "torch_dtype": dtype, **ids,
    }
