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
    with pytest.raises(ManifestError, match=r"m\.json entry 1 \(line 1\): .*wav"):
        load_manifest(manifest)


def test_json_without_data_key(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"items": []}))
    with pytest.raises(ManifestError, match=r"m\.json.*data"):
        load_manifest(manifest)


def test_shard_index_given_as_a_manifest_points_to_shards(tmp_path):
    """make_shards.py's index.json is not a manifest: the error says how to pass the shards."""
    pytest.importorskip("webdataset")
    from asit.data.shards import is_shard_source, write_shards

    _touch_wav(tmp_path / "a.wav")
    index = write_shards([AudioEntry(str(tmp_path / "a.wav"), ("x",))], tmp_path / "shards" / "d-%06d.tar", max_count=1)
    with pytest.raises(ManifestError, match="shard index, not a manifest") as err:
        load_manifest(index)
    assert f"shards:{index.parent}" in str(err.value)
    assert is_shard_source(f"shards:{index.parent}")


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


def test_byte_order_mark_is_accepted_in_csv_json_and_jsonl(tmp_path):
    a = _touch_wav(tmp_path / "a.wav")
    b = _touch_wav(tmp_path / "b.wav")
    (tmp_path / "m.csv").write_text("\ufeffpath,label\na.wav,dog\nb.wav,cat\n", encoding="utf-8")  # Excel's CSV UTF-8
    assert load_manifest(tmp_path / "m.csv") == [AudioEntry(str(a), ("dog",)), AudioEntry(str(b), ("cat",))]
    (tmp_path / "m.json").write_text("\ufeff" + json.dumps({"data": [{"wav": "a.wav"}]}), encoding="utf-8")
    assert load_manifest(tmp_path / "m.json") == [AudioEntry(str(a))]
    (tmp_path / "m.jsonl").write_text('\ufeff{"wav": "b.wav", "labels": ["x"]}\n', encoding="utf-8")
    assert load_manifest(tmp_path / "m.jsonl") == [AudioEntry(str(b), ("x",))]


@pytest.mark.parametrize("content,pattern", [
    ('a.wav,dog\nb.wav,"cat\n', r"line 2: malformed CSV.*quote left open"),  # open at the end: rows swallowed
    ('a.wav,dog\nb.wav,"cat\nc.wav,x"\nd.wav,y\n', r"line 2: label 'cat\\nc.wav,x' contains a line break"),
    ('a.wav,dog\n\nb.wav,"cat"x\n', r"line 3: malformed CSV"),
    ("a.wav,dog\nb.wav,c\x00at\n", r"line 2: label 'c\\x00at' contains a NUL"),
    ('a.wav,dog\n"b\nc.wav",x\n', r"line 2: path 'b\\nc.wav' contains a line break"),
])
def test_malformed_csv_names_the_line(tmp_path, content, pattern):
    _touch_wav(tmp_path / "a.wav")
    _touch_wav(tmp_path / "b.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text(content)
    with pytest.raises(ManifestError, match=rf"m\.csv {pattern}"):
        load_manifest(manifest, check_exists=False)


@pytest.mark.parametrize("layout", ["object", "list"])
def test_json_entry_errors_and_missing_files_give_the_entry_line(tmp_path, layout):
    _touch_wav(tmp_path / "a.wav")
    entries = '[\n  {"wav": "a.wav"},\n  {"wav": "gone.wav",\n   "labels": "x"},\n  {"labels": "y"}\n]'
    text = '{"info": {"n": [1, 2]},\n "data": ' + entries + "}" if layout == "object" else entries
    manifest = tmp_path / "m.json"
    manifest.write_text(text)
    offset = 1 if layout == "object" else 0
    with pytest.raises(ManifestError, match=rf"entry 2 \(line {5 + offset}\): missing or empty \"wav\""):
        load_manifest(manifest)
    manifest.write_text(text.replace('{"labels": "y"}', '{"wav": "a.wav"}'))
    with pytest.raises(ManifestError, match=rf"1 of 3 listed files do not exist: entry 1 \(line {3 + offset}\): "):
        load_manifest(manifest)


def test_json_lines_manifest_and_its_errors(tmp_path):
    a = _touch_wav(tmp_path / "a.wav")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"wav": "a.wav", "labels": "dog,cat"}\n\n{"wav": "a.wav"}\n')
    assert load_manifest(manifest) == [AudioEntry(str(a), ("dog", "cat")), AudioEntry(str(a))]
    manifest.write_text('{"wav": "a.wav"}\n\n{"wav": "gone.wav"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl: 1 of 2 listed files do not exist: line 3: "):
        load_manifest(manifest)
    manifest.write_text('{"wav": "a.wav"}\n{"wav": oops}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl line 2: invalid JSON"):
        load_manifest(manifest)
    manifest.write_text('{"wav": "a.wav"}\n{"labels": "x"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl line 2: missing or empty \"wav\""):
        load_manifest(manifest)


def test_duplicate_paths_warn_once_with_count_and_example(tmp_path, caplog):
    _touch_wav(tmp_path / "a.wav")
    _touch_wav(tmp_path / "b.wav")
    manifest = tmp_path / "m.csv"
    manifest.write_text("a.wav,x\nb.wav,y\na.wav,z\n./b.wav,y\n")
    with caplog.at_level("WARNING", logger="asit.data.manifest"):
        assert len(load_manifest(manifest)) == 4  # kept: each occurrence is a clip
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "2 entries repeat" in warnings[0]
    assert "line 3" in warnings[0] and "a.wav" in warnings[0] and "line 1" in warnings[0]
    caplog.clear()
    manifest.write_text("a.wav,x\nb.wav,y\n")
    with caplog.at_level("WARNING", logger="asit.data.manifest"):
        load_manifest(manifest)
    assert not caplog.records


def test_folder_scan_does_not_follow_a_link_loop(tmp_path, caplog):
    root = tmp_path / "corpus"
    _touch_wav(root / "dog" / "a.wav")
    _touch_wav(root / "top.wav")
    os.symlink(root, root / "dog" / "loop")  # back to the root: followed, it repeats the tree under new labels
    with caplog.at_level("WARNING", logger="asit.data.manifest"):
        entries = load_manifest(root)
    rel = [(os.path.relpath(e.path, root), e.labels) for e in entries]
    assert rel == [("top.wav", ()), ("dog/a.wav", ("dog",))]
    assert any("1 linked folder(s)" in r.getMessage() and "loop" in r.getMessage() for r in caplog.records)


def test_folder_scan_follows_each_folder_once_through_aliases(tmp_path):
    root = tmp_path / "corpus"
    _touch_wav(root / "dog" / "a.wav")
    outside = tmp_path / "outside"
    _touch_wav(outside / "b.wav")
    os.symlink(root / "dog", root / "alias")  # sorts before "dog": its files are still listed once, as dog
    os.symlink(outside, root / "ext")  # a folder outside the tree is followed, once
    os.symlink(outside, outside / "self")  # and its own loop is not
    rel = [(os.path.relpath(e.path, tmp_path), e.labels) for e in load_manifest(root)]
    assert rel == [("corpus/dog/a.wav", ("dog",)), ("corpus/ext/b.wav", ("ext",))]
