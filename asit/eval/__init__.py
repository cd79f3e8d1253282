"""Downstream evaluation: load a frozen encoder, extract embeddings, linear probes, checkpoint interop."""

from .encoder import (
    AudioEncoder,
    EncoderError,
    EncoderOutput,
    backbone_spec,
    export_encoder,
    load_encoder,
    read_encoder_metadata,
)

__all__ = [
    "AudioEncoder",
    "EncoderError",
    "EncoderOutput",
    "backbone_spec",
    "export_encoder",
    "load_encoder",
    "read_encoder_metadata",
]
