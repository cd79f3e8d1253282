"""NVIDIA DALI input pipeline for pretraining: decode, resample, random crops and rolls in DALI, the fbank after it.

Three parts: :mod:`~asit.data.dali.pipeline` builds the DALI graph (readers, decoder, the clip-wide
checks, crops, optional DALI fbank); :mod:`~asit.data.dali.clips` is the clip inventory (header
checks up front, the shards' cached member tables, DALI index files, the verdict on decoded clips);
:mod:`~asit.data.dali.loader` holds :class:`DaliPretrainLoader`, which deals each epoch's clips out
to the ranks and yields batches in :func:`~asit.data.dataset.collate_pretrain`'s layout.
``nvidia.dali`` is imported only when a pipeline is built (:func:`dali_available` tells whether it can be).
"""

from .clips import DALI_UNSUPPORTED_FORMATS, clip_check, write_dali_index
from .loader import DaliPretrainLoader
from .pipeline import build_dali_pipeline, build_dali_webdataset_pipeline, dali_available

__all__ = [
    "DALI_UNSUPPORTED_FORMATS",
    "DaliPretrainLoader",
    "build_dali_pipeline",
    "build_dali_webdataset_pipeline",
    "clip_check",
    "dali_available",
    "write_dali_index",
]
