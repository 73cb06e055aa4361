"""griffinlm: Griffin, Hawk and MQA Transformer language models in PyTorch."""
from .config import ModelConfig
from .model import LanguageModel, ModelCache

__all__ = ["ModelConfig", "LanguageModel", "ModelCache"]
__version__ = "0.1.0"
