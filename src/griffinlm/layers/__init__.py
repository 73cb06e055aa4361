"""Layers: activations and gated FFNs, RMSNorm, RoPE, MQA, Conv1D, RG-LRU, blocks."""
from .activations import MLP, GatedMLP, GeLU, Swish, make_activation, swish
from .attention import AttentionCache, MultiQueryAttention
from .blocks import BLOCK_SPECS, BlockSpec, block_spec
from .conv import Conv1D
from .linear import Linear
from .norm import RMSNorm
from .positions import Positions
from .recurrent import RecurrentBlock, RecurrentCache
from .residual import ResidualBlock
from .rglru import RGLRU, lambda_init
from .rotary import RotaryEmbedding

__all__ = [
    "swish", "Swish", "GeLU", "GatedMLP", "MLP", "make_activation", "RMSNorm", "RotaryEmbedding",
    "MultiQueryAttention", "AttentionCache", "Conv1D", "RGLRU", "lambda_init", "RecurrentBlock",
    "RecurrentCache", "ResidualBlock", "Positions", "Linear", "BLOCK_SPECS", "BlockSpec", "block_spec",
]
