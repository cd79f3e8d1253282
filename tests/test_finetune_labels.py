"""asit.finetune.labels: class CSVs, labels from metadata CSVs and cross-validation folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from asit.data import AudioEntry
from asit.finetune import assign_folds, labels_from_metadata, read_class_csv

pytestmark = pytest.mark.usefixtures("one_thread")


def test_class_csv_maps_mids_and_names(tmp_path):
    path = tmp_path / "class_labels_indices.csv"
    path.write_text('index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n'
                    "2,/m/02zsn,Female speech\n")
    labels = read_class_csv(path)
    assert labels.names == ("Speech", "Male speech, man speaking", "Female speech")
    assert labels.encode(["/m/02zsn", "Speech"]) == [0, 2]
    with pytest.raises(ValueError, match="/m/nope"):
        labels.encode(["/m/nope"], "clip x")


def test_folds_from_names_folders_csv_and_stratified(tmp_path):
    esc = [AudioEntry(f"/d/audio/{f}-1000{i}-A-{i % 3}.wav", (f"c{i % 3}",)) for f in (1, 2, 3) for i in range(4)]
    folds = assign_folds(esc, 3)
    assert folds.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    us8k = [AudioEntry(f"/d/fold{f}/x{i}.wav", ("a",)) for f in (10, 2) for i in range(2)]
    assert assign_folds(us8k, 2, source="path").tolist() == [1, 1, 0, 0]  # numbers sorted: 2 → 0, 10 → 1
    meta = tmp_path / "meta.csv"
    meta.write_text("filename,fold,target\n" + "".join(
        f"{Path(e.path).name},{5 - int(Path(e.path).name[0])},0\n" for e in esc))
    assert assign_folds(esc, 3, fold_csv=str(meta)).tolist() == [2] * 4 + [1] * 4 + [0] * 4
    plain = [AudioEntry(f"/d/x{i}.wav", (f"c{i % 2}",)) for i in range(10)]
    folds = assign_folds(plain, 5, seed=3)
    assert np.bincount(folds).tolist() == [2] * 5
    with pytest.raises(ValueError, match="fold numbers"):
        assign_folds(esc, 5, source="path")


def test_labels_from_metadata_csv(tmp_path):
    entries = [AudioEntry(f"/d/audio/{i}.wav") for i in range(3)] + [AudioEntry("/d/audio/x.wav", ("kept",))]
    both = tmp_path / "both.csv"
    both.write_text("filename,fold,target,category\n0.wav,1,4,dog\n1.wav,2,7,rain\n2.wav,1,4,dog\n")
    assert [e.labels for e in labels_from_metadata(entries, str(both))] == [("dog",), ("rain",), ("dog",), ("kept",)]
    target_only = tmp_path / "target.csv"
    target_only.write_text("filename,fold,target\n0.wav,1,4\n1.wav,2,7\n2.wav,1,4\n")
    assert [e.labels for e in labels_from_metadata(entries, str(target_only))][:3] == [("4",), ("7",), ("4",)]
    no_labels = tmp_path / "folds.csv"
    no_labels.write_text("filename,fold\n0.wav,1\n")
    assert labels_from_metadata(entries, str(no_labels)) == entries  # nothing to take: unchanged
    partial = tmp_path / "partial.csv"
    partial.write_text("filename,fold,category\n0.wav,1,dog\n2.wav,1,\n")
    with pytest.raises(ValueError, match=r"partial\.csv: no 'category' for 2 unlabelled clip\(s\), e\.g\. /d/audio/1"):
        labels_from_metadata(entries, str(partial))


def test_official_folds_are_never_replaced_silently(tmp_path, caplog):
    """A fold CSV that misses some clips is an error (auto and metadata), not a switch to stratified folds."""
    entries = [AudioEntry(f"/d/clip{i}.wav", (("dog", "rain")[i % 2],)) for i in range(11)]
    meta = tmp_path / "folds.csv"
    meta.write_text("filename,fold\n" + "".join(f"clip{i}.wav,{i // 2 + 1}\n" for i in range(10)))
    for source in ("auto", "metadata"):
        with pytest.raises(ValueError, match=r"folds\.csv: no fold for 1 of 11 clip\(s\), e\.g\. /d/clip10\.wav"):
            assign_folds(entries, 6, source=source, fold_csv=str(meta))
    with caplog.at_level("INFO", logger="asit.finetune"):
        folds = assign_folds(entries[:10], 5, fold_csv=str(meta))
        assert folds.tolist() == [i // 2 for i in range(10)]
        assert "folds from metadata" in caplog.text
        caplog.clear()
        assign_folds(entries, 5, fold_csv=str(meta), source="stratified")
        assert "folds from stratified" in caplog.text
