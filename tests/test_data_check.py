"""The data check before training (asit.data.check, scripts/check_data.py) and the files make_shards skips."""

import importlib.util
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asit.data import AudioEntry, load_manifest
from asit.data.check import check_entries
from asit.data.manifest import ManifestError, write_manifest

SR = 16000
SCRIPTS = Path(__file__).parents[1] / "scripts"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tone(seconds: float = 0.25) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(SR * seconds)) / SR)).astype(np.float32)


def _corpus(root: Path) -> tuple[list[Path], dict[Path, str]]:
    """Class folders with 3 good files and one of each kind of bad file; the expected reason of each bad one."""
    (root / "dog").mkdir(parents=True)
    (root / "cat").mkdir()
    good = [root / "dog" / "a.wav", root / "cat" / "b.flac", root / "cat" / "c.wav"]
    for path in good:
        sf.write(path, _tone(), SR)
    bad = {root / "dog" / "empty.wav": "empty", root / "dog" / "junk.wav": "unreadable",
           root / "cat" / "truncated.wav": "truncated", root / "cat" / "nan.wav": "non-finite"}
    (root / "dog" / "empty.wav").write_bytes(b"")
    (root / "dog" / "junk.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    whole = root / "whole.tmp"
    sf.write(whole, _tone(), SR, format="WAV", subtype="PCM_16")
    (root / "cat" / "truncated.wav").write_bytes(whole.read_bytes()[:44 + 16])  # 8 of 4000 samples
    whole.unlink()
    nan = _tone()
    nan[10] = np.nan
    sf.write(root / "cat" / "nan.wav", nan, SR, subtype="FLOAT")
    return good, bad


def test_check_data_names_every_bad_file_and_writes_a_clean_manifest(tmp_path, capsys):
    good, bad = _corpus(tmp_path / "audio")
    clean = tmp_path / "clean.json"
    code = _script("check_data").main([str(tmp_path / "audio"), "--decode", "--sample-rate", str(SR),
                                       "--write-clean", str(clean), "--no-progress"])
    assert code == 1  # bad files found
    lines = capsys.readouterr().out.splitlines()
    for path, reason in bad.items():
        assert any(line.startswith(f"{path}: {reason}") for line in lines), (path, reason, lines)
    assert "checked 7 files: 3 good, 4 bad (empty: 1, non-finite: 1, truncated: 1, unreadable: 1)" in lines
    entries = load_manifest(clean)
    assert sorted(e.path for e in entries) == sorted(map(str, good))
    assert {Path(e.path).name: e.labels for e in entries} == {"a.wav": ("dog",), "b.flac": ("cat",),
                                                               "c.wav": ("cat",)}


def test_header_check_needs_no_decoding_and_a_good_corpus_exits_0(tmp_path, capsys):
    good, bad = _corpus(tmp_path / "audio")
    report = check_entries(load_manifest(tmp_path / "audio"))
    # NaN samples are seen only by decoding; the header finds the rest
    assert report.counts == {"empty": 1, "truncated": 1, "unreadable": 1}
    assert report.total == 7 and len(report.good_indices()) == 4
    parallel = check_entries(load_manifest(tmp_path / "audio"), workers=2)
    assert parallel.bad == report.bad
    manifest = tmp_path / "good.csv"
    write_manifest([AudioEntry(str(p)) for p in good], manifest)
    assert _script("check_data").main([str(manifest), "--no-progress"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "checked 3 files: 3 good, 0 bad"


def test_missing_files_are_reported_not_fatal(tmp_path, capsys):
    sf.write(tmp_path / "a.wav", _tone(), SR)
    manifest = tmp_path / "m.csv"
    manifest.write_text("a.wav\ngone.wav\n")
    assert _script("check_data").main([str(manifest), "--no-progress"]) == 1
    assert f"{tmp_path / 'gone.wav'}: missing (no such file)" in capsys.readouterr().out


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv"])
def test_write_manifest_reads_back_the_same_entries(tmp_path, suffix, monkeypatch):
    monkeypatch.chdir(tmp_path)
    entries = [AudioEntry("rel/a.wav", ("x", "y z")), AudioEntry(str(tmp_path / "b.wav")),
               AudioEntry(str(tmp_path / "c.wav"), ("with, comma" if suffix != ".csv" else "w",))]
    path = write_manifest(entries, tmp_path / "out" / f"m{suffix}")
    back = load_manifest(path, check_exists=False)
    assert back == [AudioEntry(str(tmp_path / "rel" / "a.wav"), ("x", "y z")), *entries[1:]]


def test_write_manifest_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(ManifestError, match="unknown manifest type"):
        write_manifest([AudioEntry("/a.wav")], tmp_path / "m.txt")
    with pytest.raises(ManifestError, match="';'"):
        write_manifest([AudioEntry("/a.wav", ("a;b",))], tmp_path / "m.csv")


def test_make_shards_names_and_leaves_out_the_files_training_would_refuse(tmp_path, capsys):
    good, bad = _corpus(tmp_path / "audio")
    code = _script("make_shards").main([str(tmp_path / "audio"), "--out", str(tmp_path / "s" / "s-%06d.tar")])
    assert code == 0
    err = capsys.readouterr().err
    header_bad = {p: r for p, r in bad.items() if r != "non-finite"}  # NaN samples need decoding
    for path, reason in header_bad.items():
        assert f"skipped {path}: {reason}" in err
    assert "skipped 3 of 7 files (empty: 1, truncated: 1, unreadable: 1)" in err
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert index["total"] == 4
    with tarfile.open(tmp_path / "s" / "s-000000.tar") as tar:
        packed = [json.loads(tar.extractfile(m).read())["path"] for m in tar.getmembers() if m.name.endswith("json")]
    assert sorted(packed) == sorted([*map(str, good), str(tmp_path / "audio" / "cat" / "nan.wav")])


def test_a_shard_index_given_as_a_manifest_gets_the_shards_hint(tmp_path):
    sf.write(tmp_path / "a.wav", _tone(), SR)
    from asit.data.shards import write_shards

    index = write_shards([AudioEntry(str(tmp_path / "a.wav"))], tmp_path / "s" / "s-%06d.tar")
    with pytest.raises(ManifestError, match=f"index of WebDataset shards.*data.train_manifest=shards:{tmp_path / 's'}"):
        load_manifest(index)


def test_dali_inventory_uses_the_same_header_rules(tmp_path):
    pytest.importorskip("nvidia.dali")
    import io

    from asit.data.dali import clips

    good, bad = _corpus(tmp_path / "audio")
    entries = load_manifest(tmp_path / "audio")
    kept, reasons = clips._check_files(entries, SR)
    assert sorted(reasons.values()) == ["empty", "truncated", "unreadable"]  # the header check's verdicts
    assert [entries[i].path for i in sorted(reasons)] == [e.path for e in entries if Path(e.path) in bad
                                                          and bad[Path(e.path)] != "non-finite"]
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        tar.addfile(tarfile.TarInfo("0.wav"), io.BytesIO(b""))  # a 0-byte member
    with tarfile.open(tmp_path / "t.tar") as tar:
        assert clips._member_header(tar, tar.getmember("0.wav")) == "empty"
    assert clips._header_reason((0, SR, 1, "WAV")) == "empty"
    assert clips._header_reason((SR, SR, 1, "MP3")) == "unsupported-by-dali"
    assert clips._header_reason((SR, 500, 1, "WAV")) == "bad-sample-rate"
