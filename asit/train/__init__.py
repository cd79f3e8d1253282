"""Pretraining: the :class:`Pretrainer` recipe and the components it calls (losses, schedules, the
non-finite guard, checkpoints, resume, loaders)."""

from .bad_data import BadDataError
from .checkpoint import ReplicaMismatchError
from .engine import Pretrainer
from .guard import NonFiniteLossError, StepResult
from .losses import ASiTLoss, CenterStats
from .schedules import cosine_schedule, teacher_temp_schedule

__all__ = [
    "ASiTLoss", "BadDataError", "CenterStats", "NonFiniteLossError", "Pretrainer",
    "ReplicaMismatchError",
    "StepResult",
    "cosine_schedule", "teacher_temp_schedule",
]
