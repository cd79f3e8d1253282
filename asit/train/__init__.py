"""Pretraining engine: schedules, losses, checkpoints, logging and the :class:`Pretrainer` recipe."""

from .engine import EpochSampler, Pretrainer
from .losses import ASiTLoss
from .schedules import cosine_schedule, teacher_temp_schedule

__all__ = ["ASiTLoss", "EpochSampler", "Pretrainer", "cosine_schedule", "teacher_temp_schedule"]
