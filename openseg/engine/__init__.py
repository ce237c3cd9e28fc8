"""Training and evaluation loop shared by every method."""
from .optimizer import build_lr_scheduler, build_optimizer
from .trainer import Trainer

__all__ = ["Trainer", "build_optimizer", "build_lr_scheduler"]
