"""`ModelConfig`: the one dataclass that describes a Transformer, Hawk or Griffin model.

Every way RecurrentGemma departs from the paper is a field here (embedding scale, RMSNorm
offset, partial rotary and its pairing, logit soft-cap, biases, gate blocks, unscaled input at
resets, and the local window's key count of DeepMind's code or of `transformers`), so a converted
checkpoint is just another config; docs/conventions.md lists each choice and its alternative.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any


class BlockKind(str, enum.Enum):
    """The temporal-mixing layer of a residual block. The values are the strings of
    `ModelConfig.block_pattern` (and compare equal to them); what each kind builds and how it
    is costed and sharded is its entry in `griffinlm.layers.blocks.BLOCK_SPECS`."""

    RECURRENT = "recurrent"  # conv + RG-LRU (the recurrent block of Hawk and Griffin)
    ATTENTION = "attention"  # local multi-query attention over a sliding window
    GLOBAL_ATTENTION = "global_attention"  # multi-query attention over the whole prefix

    def __str__(self) -> str:
        return self.value


BLOCK_TYPES = tuple(k.value for k in BlockKind)
MLP_ACTIVATIONS = ("glu", "bilinear", "reglu", "geglu", "swiglu", "relu", "gelu", "swish")
GATED_ACTIVATIONS = ("glu", "bilinear", "reglu", "geglu", "swiglu")
EMBED_SCALES = ("none", "sqrt", "sqrt_bf16")
ROPE_PAIRINGS = ("split_half", "interleaved")
LRU_INITS = ("paper", "recurrentgemma")


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a language model built from residual blocks.

    Sizes are in channels unless stated. `block_pattern` is cycled over `depth`: e.g.
    ("recurrent", "recurrent", "attention") with depth 6 gives R R A R R A.
    """

    vocab_size: int = 256
    width: int = 256
    depth: int = 6
    num_heads: int = 4
    head_dim: int | None = None  # default width // num_heads
    num_kv_heads: int = 1  # 1 = multi-query attention, as in the paper
    block_pattern: tuple[str, ...] = ("recurrent", "recurrent", "attention")
    # MLP block: hidden = mlp_hidden if given, else round(mlp_expansion * width)
    mlp_expansion: float = 3.0
    mlp_hidden: int | None = None
    mlp_activation: str = "geglu"
    mlp_bias: bool = False
    learnable_swish_beta: bool = False
    gelu_approximate: str = "tanh"  # "tanh" (Griffin) or "none" (exact erf GeLU)
    # attention
    local_window: int = 1024
    # True: a query sees local_window keys, itself included (`transformers`' RecurrentGemma, which the
    # converter reproduces); False: itself + local_window previous ones (DeepMind's recurrentgemma code)
    window_includes_current: bool = True
    rope_fraction: float = 1.0  # fraction of head_dim that is rotated (RecurrentGemma: 0.5)
    rope_pairing: str = "split_half"  # pair dim i with i + half ("split_half") or 2i with 2i+1
    rope_base: float = 10000.0
    attention_qkv_bias: bool = False
    attention_out_bias: bool = False
    # recurrent block
    lru_width: int | None = None  # default width
    conv_width: int = 4
    conv_bias: bool = True
    recurrent_bias: bool = True  # biases of the block's input and output projections
    lru_num_blocks: int | None = None  # block-diagonal gate blocks; default num_heads
    lru_c: float = 8.0
    # "recurrentgemma": a^2 ~ U[0.81, 0.998] (DeepMind's code, every preset); "paper": a^c ~ U[0.9, 0.999] (the
    # paper's text). The default is the measured better one (docs/conventions.md).
    lru_init: str = "recurrentgemma"
    lru_min_rad: float = 0.9
    lru_max_rad: float = 0.999
    lru_unscaled_reset: bool = False  # at a document start, skip the sqrt(1 - a^2) input scale
    conv_init_std: float | None = None  # Conv1D weights ~ N(0, std^2); None: 1/sqrt(conv_width) (reference: 0.05)
    # init variance of the output projections (o_proj, linear_out, down_proj) = this / (depth * fan_in):
    # 2.0 as in the DeepMind reference, chosen over 0.5 by measurement (docs/conventions.md)
    output_init_variance: float = 2.0
    # embedding / head / norms
    embed_scale: str = "sqrt"  # multiply embeddings by sqrt(width) ("sqrt_bf16": rounded to bf16)
    logits_soft_cap: float | None = None  # cap * tanh(logits / cap) (RecurrentGemma: 30)
    norm_eps: float = 1e-6
    norm_unit_offset: bool = False  # RMSNorm scale is (1 + weight), weight initialised to 0
    max_position: int | None = None  # global-attention cache length limit (None: grows)

    def __post_init__(self) -> None:
        if isinstance(self.block_pattern, list):
            object.__setattr__(self, "block_pattern", tuple(self.block_pattern))
        for name in ("vocab_size", "width", "depth", "num_heads", "num_kv_heads", "local_window", "conv_width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        for name in ("head_dim", "mlp_hidden", "lru_width", "lru_num_blocks", "max_position"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"ModelConfig.{name} must be a positive int or None, got {value!r}")
        if not self.block_pattern:
            raise ValueError("ModelConfig.block_pattern must name at least one block type")
        for kind in self.block_pattern:
            if kind not in BLOCK_TYPES:
                raise ValueError(f"ModelConfig.block_pattern has unknown block type {kind!r}; expected one of {BLOCK_TYPES}")
        if self.head_dim is None and self.width % self.num_heads:
            raise ValueError(
                f"ModelConfig.width ({self.width}) must be divisible by num_heads ({self.num_heads}) "
                "unless head_dim is given"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig.num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"ModelConfig.mlp_activation {self.mlp_activation!r} unknown; expected one of {MLP_ACTIVATIONS}")
        if self.mlp_expansion <= 0:
            raise ValueError(f"ModelConfig.mlp_expansion must be positive, got {self.mlp_expansion}")
        if self.gelu_approximate not in ("tanh", "none"):
            raise ValueError(f"ModelConfig.gelu_approximate must be 'tanh' or 'none', got {self.gelu_approximate!r}")
        if self.embed_scale not in EMBED_SCALES:
            raise ValueError(f"ModelConfig.embed_scale {self.embed_scale!r} unknown; expected one of {EMBED_SCALES}")
        if self.rope_pairing not in ROPE_PAIRINGS:
            raise ValueError(f"ModelConfig.rope_pairing {self.rope_pairing!r} unknown; expected one of {ROPE_PAIRINGS}")
        if not 0.0 <= self.rope_fraction <= 1.0:
            raise ValueError(f"ModelConfig.rope_fraction must be in [0, 1], got {self.rope_fraction}")
        rotary = int(self.resolved_head_dim * self.rope_fraction)
        if rotary % 2:
            raise ValueError(f"ModelConfig.rope_fraction * head_dim = {rotary} must be even")
        if self.lru_init not in LRU_INITS:
            raise ValueError(f"ModelConfig.lru_init {self.lru_init!r} unknown; expected one of {LRU_INITS}")
        if not 0.0 < self.lru_min_rad < self.lru_max_rad < 1.0:
            raise ValueError(f"ModelConfig.lru_min_rad/lru_max_rad must satisfy 0 < min < max < 1, got {self.lru_min_rad}, {self.lru_max_rad}")
        if self.lru_c <= 0:
            raise ValueError(f"ModelConfig.lru_c must be positive, got {self.lru_c}")
        if self.conv_init_std is not None and self.conv_init_std <= 0:
            raise ValueError(f"ModelConfig.conv_init_std must be positive or None, got {self.conv_init_std}")
        if self.output_init_variance <= 0:
            raise ValueError(f"ModelConfig.output_init_variance must be positive, got {self.output_init_variance}")
        if self.resolved_lru_width % self.resolved_lru_blocks:
            raise ValueError(
                f"ModelConfig.lru_width ({self.resolved_lru_width}) must be divisible by lru_num_blocks "
                f"({self.resolved_lru_blocks})"
            )
        if self.logits_soft_cap is not None and self.logits_soft_cap <= 0:
            raise ValueError(f"ModelConfig.logits_soft_cap must be positive or None, got {self.logits_soft_cap}")

    # --- derived sizes -----------------------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.width // self.num_heads

    @property
    def resolved_lru_width(self) -> int:
        return self.lru_width if self.lru_width is not None else self.width

    @property
    def resolved_lru_blocks(self) -> int:
        return self.lru_num_blocks if self.lru_num_blocks is not None else self.num_heads

    @property
    def resolved_mlp_hidden(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else int(round(self.mlp_expansion * self.width))

    @property
    def attention_keys(self) -> int:
        """Keys a local-attention query sees, itself included."""
        return self.local_window if self.window_includes_current else self.local_window + 1

    @property
    def block_types(self) -> tuple[BlockKind, ...]:
        """The temporal-mixing kind of each of the `depth` blocks."""
        return tuple(BlockKind(self.block_pattern[i % len(self.block_pattern)]) for i in range(self.depth))

    # --- (de)serialisation -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["block_pattern"] = list(self.block_pattern)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {unknown}")
        return cls(**d)

    def diff(self, other: "ModelConfig") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: {name: (self's, other's)}."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    # --- presets -----------------------------------------------------------------------
    @classmethod
    def preset_names(cls) -> list[str]:
        """Every preset name: per architecture, tiny then the paper's sizes in increasing order."""
        return list(_PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named configuration, optionally with fields overridden.

        Names: "{transformer,hawk,griffin}-{tiny,100m,200m,400m,1.3b,3b,7b,14b}"; the sized ones are
        the paper's Table 2 shapes (`PAPER_SHAPES`), the same for all three architectures.
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(cls.preset_names())}")
        d = dict(_PRESETS[name])
        d.update(overrides)
        try:
            return cls(**d)
        except TypeError as e:  # unknown override field
            raise ValueError(f"preset {name!r}: bad override: {e}") from None


PATTERNS = {
    "transformer": ("global_attention",),
    "hawk": ("recurrent",),
    "griffin": ("recurrent", "recurrent", "attention"),
}

# Tiny models for tests and the CPU demo: byte vocabulary (256 bytes + BOS/EOS/PAD).
_TINY = dict(vocab_size=259, width=256, depth=6, num_heads=4, local_window=256, mlp_expansion=3.0)

# The paper's model sizes (De et al. 2024, Table 2): one shape for all three architectures at each
# size (width D, RG-LRU width D_RNN, depth, heads of 128; MLP expansion 3, local window 1024), so at
# equal shape the MQA Transformer has fewer parameters than Hawk and Griffin, as in the paper. The
# paper trained each size on PAPER_TRAINING_TOKENS tokens (sequence length 2048).
PAPER_SHAPES = {
    "100m": dict(width=768, lru_width=1024, depth=12, num_heads=6),
    "200m": dict(width=1024, lru_width=1536, depth=12, num_heads=8),
    "400m": dict(width=1536, lru_width=2048, depth=12, num_heads=12),
    "1.3b": dict(width=2048, lru_width=2560, depth=24, num_heads=16),
    "3b": dict(width=3072, lru_width=4096, depth=24, num_heads=24),
    "7b": dict(width=4096, lru_width=5632, depth=32, num_heads=32),
    "14b": dict(width=5120, lru_width=8192, depth=40, num_heads=40),
}
PAPER_TRAINING_TOKENS = {"100m": 1.9e9, "200m": 3.9e9, "400m": 7.8e9, "1.3b": 25e9, "3b": 60e9, "7b": 132.5e9,
                         "14b": 300e9}


def _build_presets() -> dict[str, dict[str, Any]]:
    presets: dict[str, dict[str, Any]] = {}
    for arch, pattern in PATTERNS.items():
        presets[f"{arch}-tiny"] = dict(_TINY, block_pattern=pattern)
        for scale, dims in PAPER_SHAPES.items():
            d = dict(dims, block_pattern=pattern, vocab_size=256_000, local_window=1024, mlp_expansion=3.0)
            if arch == "transformer":
                d.pop("lru_width")
            else:
                d["lru_num_blocks"] = dims["lru_width"] // 128  # gate blocks of 128 channels
            presets[f"{arch}-{scale}"] = d
    return presets


_PRESETS = _build_presets()
# The transformer-tiny keeps the same width and depth as the others; MQA blocks carry fewer
# parameters than recurrent blocks, so its MLP is widened to match parameter counts (within 5%).
_PRESETS["transformer-tiny"]["mlp_expansion"] = 3.5
