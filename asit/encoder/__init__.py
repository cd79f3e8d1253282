"""Exported ASiT encoders: the ``teacher_encoder.safetensors`` format, loading and embedding, checkpoint interop.

:mod:`~asit.encoder.format` defines and writes the file (:func:`export_encoder`), :mod:`~asit.encoder.audio_encoder`
loads it as a frozen :class:`AudioEncoder` that embeds waveforms of any length (:func:`load_encoder`), and
:mod:`~asit.encoder.interop` converts to plain timm models and from the ASiT authors' checkpoints. The package
sits beside :mod:`asit.models`: pretraining, fine-tuning, evaluation and HEAR import it, it imports none of them.
"""

from .audio_encoder import FRAME_LENGTH_S, FRAME_SHIFT_S, AudioEncoder, EncoderOutput, load_encoder
from .format import ENCODER_FORMAT, EncoderError, backbone_spec, export_encoder, read_encoder_metadata
from .interop import (
    AUTHORS_SAMPLE_RATE,
    export_authors_checkpoint,
    import_authors_checkpoint,
    load_authors_checkpoint,
    to_timm,
    transpose_patch_layout,
)

__all__ = [
    "AUTHORS_SAMPLE_RATE",
    "ENCODER_FORMAT",
    "FRAME_LENGTH_S",
    "FRAME_SHIFT_S",
    "AudioEncoder",
    "EncoderError",
    "EncoderOutput",
    "backbone_spec",
    "export_authors_checkpoint",
    "export_encoder",
    "import_authors_checkpoint",
    "load_authors_checkpoint",
    "load_encoder",
    "read_encoder_metadata",
    "to_timm",
    "transpose_patch_layout",
]
