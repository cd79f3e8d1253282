"""Audio input pipeline: manifests, decoding, fbank features, random views and a demo corpus."""

from .audio import AudioDecodeError, load_audio
from .dataset import PretrainDataset, collate_pretrain, item_generator
from .demo import DEMO_CLASSES, ensure_demo_dataset, synthesize_clip
from .fbank import AUDIOSET_MEAN, AUDIOSET_STD, kaldi_fbank, normalize_fbank
from .manifest import AudioEntry, ManifestError, label_vocabulary, load_manifest
from .transforms import pad_or_crop_random, random_roll

__all__ = [
    "AUDIOSET_MEAN",
    "AUDIOSET_STD",
    "DEMO_CLASSES",
    "AudioDecodeError",
    "AudioEntry",
    "ManifestError",
    "PretrainDataset",
    "collate_pretrain",
    "ensure_demo_dataset",
    "item_generator",
    "kaldi_fbank",
    "label_vocabulary",
    "load_audio",
    "load_manifest",
    "normalize_fbank",
    "pad_or_crop_random",
    "random_roll",
    "synthesize_clip",
]
