"""Training: AdamW with warmup + cosine, evaluation in bits per byte, exact resume. Imports the model;
the model never imports this package."""
from .config import TrainConfig
from .loop import Trainer, evaluate
from .optim import decay_groups, lr_at, make_optimizer

__all__ = ["TrainConfig", "Trainer", "decay_groups", "evaluate", "lr_at", "make_optimizer"]
