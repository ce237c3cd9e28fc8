"""Training and evaluation loop shared by every method: the Trainer, its checkpointer (atomic,
exact resume), resumable data loader, fault hooks and the optimizer / schedule builders."""
from .checkpoint import TrainingCheckpointer
from .optimizer import build_lr_scheduler, build_optimizer
from .trainer import Trainer

__all__ = ["Trainer", "TrainingCheckpointer", "build_optimizer", "build_lr_scheduler"]
