"""Pretraining engine: schedules, losses, checkpoints, logging and the :class:`Pretrainer` recipe."""

from .engine import BadDataError, EpochSampler, Pretrainer, ReplicaMismatchError
from .guard import NonFiniteLossError, StepResult
from .losses import ASiTLoss, CenterStats
from .schedules import cosine_schedule, teacher_temp_schedule

__all__ = [
    "ASiTLoss", "BadDataError", "CenterStats", "EpochSampler", "NonFiniteLossError", "Pretrainer",
    "ReplicaMismatchError",
    "StepResult",
    "cosine_schedule", "teacher_temp_schedule",
]
