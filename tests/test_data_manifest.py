"""Manifest parsing (JSON, CSV, folders) and its error messages."""

import json
import os

import numpy as np
import pytest
import soundfile as sf

from asit.data import AudioEntry, ManifestError, label_vocabulary, load_manifest


def _touch_wav(path, seconds=0.05, sr=8000):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(int(seconds * sr), dtype=np.float32), sr)
    return path


def test_json_ast_layout_relative_and_absolute_paths(tmp_path):
    a = _touch_wav(tmp_path / "audio" / "a.wav")
    b = _touch_wav(tmp_path / "elsewhere" / "b.wav")
    c = _touch_wav(tmp_path / "audio" / "c.wav")
    doc = {
        "data": [
            {"wav": "audio/a.wav", "labels": "dog, cat"},
            {"wav": str(b), "labels": ["bird"]},
            {"wav": "./audio/c.wav"},
        ]
    }
    manifest = tmp_path / "train.json"
    manifest.write_text(json.dumps(doc))
    entries = load_manifest(manifest)
    assert entries == [
        AudioEntry(str(a), ("dog", "cat")),
        AudioEntry(str(b), ("bird",)),
        AudioEntry(str(c), ()),
    ]
    assert label_vocabulary(entries) == ["bird", "cat", "dog"]


def test_json_paths_resolve_against_manifest_folder_not_cwd(tmp_path, monkeypatch):
    a = _touch_wav(tmp_path / "sub" / "x.wav")
    manifest = tmp_path / "sub" / "m.json"
    manifest.write_text(json.dumps({"data": [{"wav": "x.wav", "labels": "k"}]}))
    monkeypatch.chdir(tmp_path)
    assert load_manifest(manifest)[0].path == str(a)


def test_csv_with_header_and_multilabel(tmp_path):
    a = _touch_wav(tmp_path / "a.wav")
    b = _touch_wav(tmp_path / "d" / "b.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.wav,speech;music\n\nd/b.wav,\n")
    entries = load_manifest(manifest)
    assert entries == [AudioEntry(str(a), ("speech", "music")), AudioEntry(str(b), ())]


def test_csv_without_header_keeps_first_row(tmp_path):
    a = _touch_wav(tmp_path / "a.wav")
    b = _touch_wav(tmp_path / "b.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"{a},x\nb.wav\n")
    entries = load_manifest(manifest)
    assert [e.path for e in entries] == [str(a), str(b)]
    assert [e.labels for e in entries] == [("x",), ()]


def test_folder_scan_sorted_recursive_with_folder_labels(tmp_path):
    root = tmp_path / "corpus"
    _touch_wav(root / "top.wav")
    _touch_wav(root / "dog" / "b.WAV")
    _touch_wav(root / "dog" / "a.wav")
    _touch_wav(root / "cat" / "kitten" / "c.wav")
    (root / "dog" / "notes.txt").write_text("not audio")
    sf.write(root / "cat" / "d.flac", np.zeros(100, dtype=np.float32), 8000)
    entries = load_manifest(root)
    rel = [(os.path.relpath(e.path, root), e.labels) for e in entries]
    assert rel == [
        ("top.wav", ()),
        ("cat/d.flac", ("cat",)),
        ("cat/kitten/c.wav", ("cat/kitten",)),
        ("dog/a.wav", ("dog",)),
        ("dog/b.WAV", ("dog",)),
    ]


def test_malformed_json_names_file_and_line(tmp_path):
    manifest = tmp_path / "bad.json"
    manifest.write_text('{"data": [\n  {"wav": "a.wav"},\n  {"wav": }\n]}')
    with pytest.raises(ManifestError, match=r"bad\.json line 3"):
        load_manifest(manifest)


def test_json_entry_without_wav_names_entry_index(tmp_path):
    _touch_wav(tmp_path / "a.wav")
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"data": [{"wav": "a.wav"}, {"labels": "x"}]}))
    with pytest.raises(ManifestError, match=r"m\.json entry 1: .*wav"):
        load_manifest(manifest)


def test_json_without_data_key(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"items": []}))
    with pytest.raises(ManifestError, match=r"m\.json.*data"):
        load_manifest(manifest)


def test_bad_csv_row_names_line(tmp_path):
    _touch_wav(tmp_path / "a.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.wav,x\na.wav,x,y\n")
    with pytest.raises(ManifestError, match=r"m\.csv line 3: .*3 fields"):
        load_manifest(manifest)


def test_missing_files_are_all_listed(tmp_path):
    _touch_wav(tmp_path / "ok.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\nok.wav,a\ngone1.wav,a\nok.wav,b\ngone2.wav,b\n")
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    msg = str(info.value)
    assert str(manifest) in msg
    assert "2 of 4" in msg
    assert "line 3" in msg and "gone1.wav" in msg
    assert "line 5" in msg and "gone2.wav" in msg
    # check_exists=False accepts the same manifest.
    assert len(load_manifest(manifest, check_exists=False)) == 4


def test_many_missing_files_are_summarised(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("".join(f"missing_{i:02d}.wav\n" for i in range(25)))
    with pytest.raises(ManifestError) as info:
        load_manifest(manifest)
    msg = str(info.value)
    assert "missing_09.wav" in msg and "missing_10.wav" not in msg
    assert "15 more" in msg


@pytest.mark.parametrize("name,content", [("e.csv", "path,label\n\n"), ("e.json", '{"data": []}')])
def test_empty_manifest_is_an_error(tmp_path, name, content):
    manifest = tmp_path / name
    manifest.write_text(content)
    with pytest.raises(ManifestError, match=rf"{name}: manifest lists no audio files"):
        load_manifest(manifest)


def test_empty_folder_and_missing_source(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="no audio files"):
        load_manifest(tmp_path / "empty")
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nope.csv")
    (tmp_path / "m.txt").write_text("a.wav\n")
    with pytest.raises(ManifestError, match=r"m\.txt: unknown manifest type"):
        load_manifest(tmp_path / "m.txt")
