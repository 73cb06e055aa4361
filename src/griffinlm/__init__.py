"""griffinlm: Griffin, Hawk and MQA Transformer language models in PyTorch."""
from .cache import ModelCache, load_state, save_state
from .config import ModelConfig
from .loading import load
from .model import LanguageModel

__all__ = ["ModelConfig", "LanguageModel", "ModelCache", "save_state", "load_state", "load"]
__version__ = "0.1.0"
