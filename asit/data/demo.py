"""A small synthetic audio corpus for demos and tests, generated on the spot (no downloads).

Six classes of procedurally generated sounds with random parameters, written as 16-bit WAV
files with a ``manifest.csv`` that :func:`asit.data.load_manifest` reads. Each corpus lives in a folder
named by its parameters (:func:`demo_dataset_dir`: ``<root>/n240-sr16000-3s-seed0/``), so corpora of
different sizes (pretraining's demo and fine-tuning's) sit side by side and never overwrite each other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from asit.atomic_io import atomic_write_text

__all__ = ["DEMO_CLASSES", "default_demo_root", "demo_dataset_dir", "ensure_demo_dataset", "synthesize_clip"]

logger = logging.getLogger(__name__)

DEMO_CLASSES: tuple[str, ...] = ("tone", "chirp", "harmonic", "noise_burst", "clicks", "am_fm")

_FORMAT_VERSION = 1  # bump when the synthesis changes, so cached corpora are regenerated
_MANIFEST = "manifest.csv"
_PARAMS = "params.json"
_CLIP_DIR = "clips"


def _envelope(n: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """Attack/decay envelope with random times, placed at a random onset."""
    env = np.zeros(n, dtype=np.float64)
    length = int(n * rng.uniform(0.3, 1.0))
    start = int(rng.integers(0, n - length + 1))
    attack = max(1, int(rng.uniform(0.005, 0.2) * sample_rate))
    attack = min(attack, length)
    t = np.arange(length)
    shape = np.minimum(1.0, (t + 1) / attack)
    decay_rate = rng.uniform(0.0, 4.0) / max(length, 1)
    env[start : start + length] = shape * np.exp(-decay_rate * np.maximum(t - attack, 0))
    return env


def _tone(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    freq = rng.uniform(200.0, min(4000.0, 0.4 * sr))
    return np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)) * _envelope(t.size, sr, rng)


def _chirp(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    f0, f1 = rng.uniform(100.0, 0.4 * sr, size=2)
    duration = t[-1] + 1.0 / sr
    if rng.random() < 0.5:  # linear sweep
        phase = 2 * np.pi * (f0 * t + 0.5 * (f1 - f0) / duration * t**2)
    else:  # exponential sweep
        k = (f1 / f0) ** (1.0 / duration)
        phase = 2 * np.pi * f0 * (k**t - 1.0) / np.log(k) if abs(k - 1.0) > 1e-9 else 2 * np.pi * f0 * t
    return np.sin(phase) * _envelope(t.size, sr, rng)


def _harmonic(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    f0 = rng.uniform(80.0, 600.0)
    rolloff = rng.uniform(0.5, 2.0)
    n_harm = max(1, min(int(rng.integers(4, 16)), int(0.45 * sr / f0)))
    k = np.arange(1, n_harm + 1)[:, None]
    amps = k ** (-rolloff)
    phases = rng.uniform(0, 2 * np.pi, size=(n_harm, 1))
    stack = (amps * np.sin(2 * np.pi * f0 * k * t[None, :] + phases)).sum(axis=0)
    return stack * _envelope(t.size, sr, rng)


def _noise_burst(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(t.size)
    spectrum = np.fft.rfft(noise)
    freqs = np.fft.rfftfreq(t.size, 1.0 / sr)
    centre = rng.uniform(200.0, 0.35 * sr)
    width = centre * rng.uniform(0.1, 1.0)
    spectrum *= np.exp(-0.5 * ((freqs - centre) / width) ** 2)  # Gaussian band-pass
    band = np.fft.irfft(spectrum, n=t.size)
    out = np.zeros(t.size)
    for _ in range(int(rng.integers(1, 4))):
        out += band * _envelope(t.size, sr, rng)
    return out


def _clicks(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    rate = rng.uniform(2.0, 40.0)  # clicks per second
    period = max(1, int(sr / rate))
    train = np.zeros(t.size)
    jitter = rng.integers(0, max(1, period // 10), size=t.size // period + 1)
    positions = np.arange(int(rng.integers(0, period)), t.size, period)
    positions = np.clip(positions + jitter[: positions.size], 0, t.size - 1)
    train[positions] = rng.uniform(0.5, 1.0, size=positions.size)
    click_len = max(2, int(sr * rng.uniform(0.001, 0.005)))
    kernel = rng.standard_normal(click_len) * np.exp(-np.linspace(0, 6, click_len))
    return np.convolve(train, kernel)[: t.size]


def _am_fm(t: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    carrier = rng.uniform(300.0, min(3000.0, 0.3 * sr))
    fm_rate, fm_depth = rng.uniform(0.5, 8.0), rng.uniform(10.0, 0.3 * carrier)
    am_rate, am_depth = rng.uniform(1.0, 20.0), rng.uniform(0.3, 1.0)
    phase = 2 * np.pi * carrier * t + (fm_depth / fm_rate) * np.sin(2 * np.pi * fm_rate * t)
    am = 1.0 - am_depth * 0.5 * (1.0 + np.sin(2 * np.pi * am_rate * t + rng.uniform(0, 2 * np.pi)))
    return am * np.sin(phase)


_SYNTHS: dict[str, Callable[[np.ndarray, int, np.random.Generator], np.ndarray]] = {
    "tone": _tone,
    "chirp": _chirp,
    "harmonic": _harmonic,
    "noise_burst": _noise_burst,
    "clicks": _clicks,
    "am_fm": _am_fm,
}


def synthesize_clip(kind: str, sample_rate: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Generate one clip of class ``kind`` with random parameters drawn from ``rng``.

    Returns a float32 array of ``round(seconds * sample_rate)`` samples with a little
    background noise, peak-normalised to a random level in [0.5, 0.9].
    """
    if kind not in _SYNTHS:
        raise ValueError(f"unknown demo class {kind!r}; expected one of {DEMO_CLASSES}")
    n = round(seconds * sample_rate)
    if n <= 0 or sample_rate <= 0:
        raise ValueError(f"need a positive length, got seconds={seconds}, sample_rate={sample_rate}")
    t = np.arange(n, dtype=np.float64) / sample_rate
    signal = _SYNTHS[kind](t, sample_rate, rng)
    peak = np.abs(signal).max()
    if peak > 0:
        signal = signal / peak
    signal = signal + rng.uniform(0.003, 0.03) * rng.standard_normal(n)
    signal *= rng.uniform(0.5, 0.9) / max(np.abs(signal).max(), 1e-12)
    return signal.astype(np.float32)


def default_demo_root() -> Path:
    """``$ASIT_CACHE/demo`` when ``ASIT_CACHE`` is set, else ``~/.cache/asit/demo``."""
    cache = os.environ.get("ASIT_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "asit"
    return base / "demo"


def demo_dataset_dir(
    root: str | os.PathLike | None = None,
    *,
    num_clips: int = 240,
    sample_rate: int = 16000,
    seconds: float = 3.0,
    seed: int = 0,
) -> Path:
    """The folder of the corpus with these parameters: ``root/n{num_clips}-sr{sample_rate}-{seconds}s-seed{seed}``
    (``root`` defaults to :func:`default_demo_root`), e.g. ``~/.cache/asit/demo/n240-sr16000-3s-seed0``."""
    base = Path(root).expanduser() if root is not None else default_demo_root()
    return base / f"n{num_clips}-sr{sample_rate}-{seconds:g}s-seed{seed}"


@contextlib.contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    """Hold a lock on ``root`` so that several processes (e.g. DDP ranks) generate it once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        yield
        return
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_demo_dataset(
    root: str | os.PathLike | None = None,
    *,
    num_clips: int = 240,
    sample_rate: int = 16000,
    seconds: float = 3.0,
    seed: int = 0,
) -> Path:
    """Make sure the synthetic demo corpus exists; return its ``manifest.csv``.

    ``root`` is the folder that holds the demo corpora (default :func:`default_demo_root`); this one is
    written into its own subfolder :func:`demo_dataset_dir` named by the parameters, so asking for
    another size, rate, length or seed never touches a corpus made before.

    Clip ``i`` has class ``DEMO_CLASSES[i % len(DEMO_CLASSES)]`` (balanced classes) and is drawn
    from a generator seeded with ``(seed, i)``, so the corpus is reproducible. If the manifest
    exists and ``params.json`` matches the arguments (including the synthesis version), nothing is
    written. Otherwise the manifest is removed first and written last, so an interrupted run is redone
    next time.
    """
    if num_clips <= 0:
        raise ValueError(f"num_clips must be positive, got {num_clips}")
    root = demo_dataset_dir(root, num_clips=num_clips, sample_rate=sample_rate, seconds=seconds, seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / _MANIFEST
    params_file = root / _PARAMS
    params = {
        "version": _FORMAT_VERSION,
        "num_clips": num_clips,
        "sample_rate": sample_rate,
        "seconds": seconds,
        "seed": seed,
    }

    with _exclusive(root):
        if manifest.is_file() and _read_params(params_file) == params:
            logger.info("demo corpus (%d clips): %s", num_clips, manifest)
            return manifest

        logger.info("generating %d demo clips in %s", num_clips, root)
        manifest.unlink(missing_ok=True)
        params_file.unlink(missing_ok=True)
        _remove_old_clips(root)
        rows = []
        for i in range(num_clips):
            kind = DEMO_CLASSES[i % len(DEMO_CLASSES)]
            clip = synthesize_clip(kind, sample_rate, seconds, np.random.default_rng([seed, i]))
            rel = Path(_CLIP_DIR) / kind / f"{kind}_{i:05d}.wav"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            sf.write(root / rel, clip, sample_rate, subtype="PCM_16")
            rows.append(f"{rel.as_posix()},{kind}\n")

        params_file.write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
        atomic_write_text(manifest, "path,label\n" + "".join(rows))
    logger.info("demo corpus (%d clips): %s", num_clips, manifest)
    return manifest


def _read_params(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remove_old_clips(root: Path) -> None:
    """Delete clips an earlier generation wrote (only files this module names)."""
    clip_dir = root / _CLIP_DIR
    for kind in DEMO_CLASSES:
        for old in (clip_dir / kind).glob(f"{kind}_*.wav"):
            old.unlink()
