"""Check every file of a manifest before training: which clips training would refuse, and why.

:func:`check_entries` applies the rules training applies, not a copy of them: by default each file's
header passes :func:`~asit.data.audio.check_header` (missing, ``empty`` (0 bytes or no frames),
``unreadable``, ``bad-sample-rate``, ``too-long``, ``truncated``: a few kB read per file); with
``decode=True`` each file is decoded with :func:`~asit.data.audio.load_audio` as the torch loader does,
which also finds ``non-finite`` and ``out-of-range`` samples and damage inside compressed streams. The
result (:class:`DataReport`) names every bad file with its :class:`~asit.data.audio.AudioDecodeError`
reason and counts them per reason; :func:`~asit.data.manifest.write_manifest` writes the good ones as
a clean manifest. ``scripts/check_data.py`` is the command-line face of this module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .audio import MAX_SECONDS, AudioDecodeError, check_header, load_audio
from .manifest import AudioEntry

__all__ = ["BadFile", "DataReport", "check_entries", "check_file"]


@dataclass(frozen=True)
class BadFile:
    """A clip training would refuse: its manifest index, path, reason (``AudioDecodeError.reason``) and detail."""

    index: int
    path: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return str(AudioDecodeError(self.path, self.reason, self.detail))


@dataclass
class DataReport:
    """The verdict on a list of clips: how many were checked and the bad ones, in manifest order."""

    total: int
    bad: list[BadFile] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Bad files per reason, sorted by reason."""
        return dict(sorted(Counter(b.reason for b in self.bad).items()))

    def good_indices(self) -> list[int]:
        """Manifest indices of the clips that passed."""
        bad = {b.index for b in self.bad}
        return [i for i in range(self.total) if i not in bad]

    def summary(self) -> str:
        """One line: ``checked N files: G good, B bad (reason: n, ...)``."""
        good = self.total - len(self.bad)
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.counts.items())
        return f"checked {self.total} files: {good} good, {len(self.bad)} bad" + (f" ({reasons})" if reasons else "")


def check_file(path: str, *, sample_rate: int = 32000, decode: bool = False,
               max_seconds: float | None = MAX_SECONDS) -> None:
    """Raise what training would raise for this file: :func:`~asit.data.audio.check_header` (``decode``
    False) or :func:`~asit.data.audio.load_audio` at ``sample_rate`` (``decode`` True).

    Raises:
        AudioDecodeError: the file would be refused; ``reason`` says why.
    """
    if decode:
        load_audio(path, sample_rate, max_seconds=max_seconds)
    else:
        check_header(path, max_seconds=max_seconds)


def _verdict(job: tuple[str, int, bool, float | None]) -> tuple[str, str] | None:
    """``(reason, detail)`` of a refused file, None for a good one (picklable, for worker processes)."""
    path, sample_rate, decode, max_seconds = job
    try:
        check_file(path, sample_rate=sample_rate, decode=decode, max_seconds=max_seconds)
    except AudioDecodeError as err:
        return err.reason, err.detail
    return None


def check_entries(entries: Sequence[AudioEntry], *, sample_rate: int = 32000, decode: bool = False,
                  max_seconds: float | None = MAX_SECONDS, workers: int = 0, progress: bool = False) -> DataReport:
    """Check every clip of ``entries`` with :func:`check_file`; ``workers`` > 0 checks in that many
    processes (the result does not depend on it), ``progress`` shows a tqdm bar on stderr.

    Raises:
        ValueError: ``sample_rate`` not positive or ``workers`` negative.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    jobs = [(entry.path, sample_rate, decode, max_seconds) for entry in entries]
    report = DataReport(total=len(jobs))
    bar = tqdm(total=len(jobs), unit="file", desc="decoding" if decode else "reading headers", disable=not progress)
    with bar:
        for i, verdict in enumerate(_verdicts(jobs, workers)):
            bar.update()
            if verdict is not None:
                report.bad.append(BadFile(i, jobs[i][0], *verdict))
                bar.set_postfix(bad=len(report.bad))
    return report


def _verdicts(jobs: list[tuple[str, int, bool, float | None]], workers: int) -> Iterator[tuple[str, str] | None]:
    if workers == 0 or len(jobs) < 2:
        yield from map(_verdict, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_verdict, jobs, chunksize=max(1, min(64, len(jobs) // (4 * workers))))
