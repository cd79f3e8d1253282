"""Checkpoint files under damage, pruning, automatic resume and clear errors for bad input, in process.

Training runs use the tiny CPU setting of tests/test_train_engine.py (2-layer 64-wide ViT, 3 steps per
epoch, one thread) and take about a second each.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from tiny_config import TINY_MODEL

from asit.atomic_io import atomic_path, atomic_write, atomic_write_text
from asit.config import load_config
from asit.data import ManifestError, ensure_demo_dataset
from asit.train import Pretrainer, ReplicaMismatchError
from asit.train.checkpoint import (
    CheckpointError,
    CorruptCheckpointError,
    atomic_save,
    checkpoint_path,
    file_sha256,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    rng_path,
    tensor_digest,
)
from asit.train.faults import fault_step as _fault_step
from asit.train.faults import inject_fault as _inject_fault
from asit.train.metrics import trim_log

TINY = [
    *TINY_MODEL,
    "train.batch_size=8", "train.epochs=2", "train.max_steps_per_epoch=3", "train.log_every=1",
    "train.progress=false", "train.image_every_epochs=0",
]
STEPS_PER_EPOCH = 3
TOTAL = 2 * STEPS_PER_EPOCH


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    """Demo corpus in a temp dir (ASIT_CACHE), one intra-op thread, no torchrun restart in the environment."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASIT_CACHE", str(tmp_path_factory.mktemp("asit_cache")))
        mp.delenv("TORCHELASTIC_RESTART_COUNT", raising=False)
        mp.delenv("ASIT_FAULT_AT_STEP", raising=False)
        yield
    torch.set_num_threads(threads)


def tiny_config(out_dir: Path, *extra: str):
    return load_config("demo_cpu", [*TINY, f"train.output_dir={out_dir}", *extra])


class Interrupted(Exception):
    pass


class StopsAfter5(Pretrainer):
    """Stops the run right after the checkpoint of step 5 is written."""

    def save_checkpoint(self):
        path = super().save_checkpoint()
        if self.step == 5:
            raise Interrupted
        return path


def run(cfg, *, resume: bool = False, trainer_cls: type[Pretrainer] = Pretrainer) -> Pretrainer:
    trainer = trainer_cls(cfg, resume=resume)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer


def assert_same_training_state(a: dict, b: dict) -> None:
    for part in ("student", "teacher", "loss"):
        differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert a[part].keys() == b[part].keys() and not differ, f"{part}: {differ[:5]}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i]), f"optimizer state {i}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Final state of an uninterrupted run with a checkpoint every step."""
    out = tmp_path_factory.mktemp("reference")
    run(tiny_config(out, "train.checkpoint_every_steps=1"))
    return load_checkpoint(checkpoint_path(out, TOTAL))


# --------------------------------------------------------------------------- files


def _fake_state(step: int = 1) -> dict:
    return {"student": {"w": torch.randn(4, 3)}, "teacher": {}, "optimizer": {}, "loss": {}, "step": step,
            "epoch": 0, "config": {"model": {}}}


def test_atomic_save_writes_a_sha256sum_sidecar(tmp_path) -> None:
    path = atomic_save(_fake_state(), tmp_path / "checkpoint_000000001.pt")
    digest, name = (tmp_path / "checkpoint_000000001.pt.sha256").read_text().split()
    assert name == path.name and digest == file_sha256(path)  # `sha256sum -c` can check it too
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, f"{path.name}.sha256"]


def test_a_crash_while_writing_leaves_the_old_file(tmp_path, monkeypatch) -> None:
    path = atomic_save(_fake_state(1), tmp_path / "checkpoint_000000001.pt")
    before = path.read_bytes()

    def dies_half_way(obj, fh):
        fh.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt  # like a signal arriving mid-write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        atomic_save(_fake_state(2), path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _flip_one_byte(path: Path) -> None:
    """A bit flip inside the tensor data: torch.load alone would accept this file."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _random_bytes_no_sidecar(path: Path) -> None:
    _random_bytes(path)
    Path(f"{path}.sha256").unlink()


def _empty(path: Path) -> None:
    path.write_bytes(b"")


DAMAGE = {"truncated": _truncate, "random": _random_bytes, "bitflip": _flip_one_byte,
          "random_no_sidecar": _random_bytes_no_sidecar, "empty": _empty}


@pytest.mark.parametrize("damage", DAMAGE)
def test_load_rejects_damaged_files_by_name(tmp_path, damage: str) -> None:
    path = atomic_save({**_fake_state(), "student": {"w": torch.randn(64, 64)}}, tmp_path / "checkpoint_000000007.pt")
    DAMAGE[damage](path)
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        load_checkpoint(path)


def test_load_checks_structure_without_a_sidecar(tmp_path) -> None:
    good = atomic_save(_fake_state(), tmp_path / "a.pt")
    Path(f"{good}.sha256").unlink()
    assert load_checkpoint(good)["step"] == 1  # e.g. a crash between the file and its sidecar
    torch.save({"weights": torch.zeros(2)}, tmp_path / "b.pt")
    with pytest.raises(CorruptCheckpointError, match=r"b\.pt lacks .*'student'"):
        load_checkpoint(tmp_path / "b.pt")
    with pytest.raises(CorruptCheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_load_refuses_pickled_code(tmp_path) -> None:
    """weights_only=True: a checkpoint carrying an arbitrary object is refused, not executed."""
    path = tmp_path / "evil.pt"
    torch.save({**_fake_state(), "payload": Path("/etc/passwd")}, path)
    with pytest.raises(CorruptCheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_prune_keeps_the_last_and_the_permanent_ones(tmp_path) -> None:
    run_dir = tmp_path
    for step in range(1, 9):
        atomic_save(_fake_state(step), checkpoint_path(run_dir, step))
        for rank in (0, 1):
            atomic_save({"torch": torch.zeros(1), "gmml": torch.zeros(1)}, rng_path(run_dir, step, rank))
    folder = run_dir / "checkpoints"
    (folder / ".checkpoint_000000009.pt.abc.tmp").write_bytes(b"left by a killed writer")
    atomic_save({"torch": torch.zeros(1), "gmml": torch.zeros(1)}, rng_path(run_dir, 9, 1))  # its ckpt not yet
    gone = prune_checkpoints(run_dir, keep_last=2, keep=lambda step: step % 3 == 0)
    assert [p.name for p in gone] == [f"checkpoint_{s:09d}.pt" for s in (1, 2, 4, 5)]
    kept = [3, 6, 7, 8]
    assert list_checkpoints(run_dir) == [checkpoint_path(run_dir, s) for s in kept]
    names = {p.name for p in folder.iterdir()}
    expected = {f"checkpoint_{s:09d}.pt" for s in kept} | {f"rng_{s:09d}_rank{r}.pt" for s in kept for r in (0, 1)}
    expected |= {"rng_000000009_rank1.pt"}  # newer than every checkpoint: kept for the one being written
    assert names == expected | {f"{n}.sha256" for n in expected}


def _record_fsyncs(monkeypatch) -> list[str]:
    """Paths that os.fsync is called on, in order (file descriptors resolved through /proc)."""
    synced, real = [], os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


def test_atomic_write_fsyncs_a_unique_temp_file_then_the_folder(tmp_path, monkeypatch) -> None:
    synced = _record_fsyncs(monkeypatch)
    target = tmp_path / "summary.json"
    with atomic_path(target) as first, atomic_path(target) as second:  # two writers of one file at once
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("first")
        second.write_text("second")
    assert target.read_text() == "first"  # the outer block commits last
    # per write: the temp file, then the folder (inner block first)
    assert synced == [str(second), str(tmp_path), str(first), str(tmp_path)]
    assert first.name.startswith(".summary.json.") and first.name.endswith(".tmp")
    atomic_write_text(target, "third")
    assert target.read_text() == "third" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]

    def dies(fh) -> None:
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, dies)
    assert target.read_text() == "third" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_every_file_of_a_run_is_fsynced_before_its_rename(tmp_path, monkeypatch) -> None:
    """config.yaml, checkpoints, summary.json and the exported encoder go through asit.atomic_io (the encoder
    used a fixed teacher_encoder.tmp name without fsync, summary.json was written in place); trim_log too."""
    synced = _record_fsyncs(monkeypatch)
    run(tiny_config(tmp_path, "train.epochs=1"))
    for name in ("config.yaml", "summary.json", "teacher_encoder.safetensors", "log.jsonl"):
        if name == "log.jsonl":
            trim_log(tmp_path / name, 1)  # drops steps 2 and 3: rewrites the file
        assert any(Path(p).name.startswith(f".{name}.") and Path(p).parent == tmp_path for p in synced), name
    assert [r["step"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())] == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_crash_while_exporting_the_encoder_leaves_the_old_file(tmp_path, monkeypatch) -> None:
    import safetensors.torch

    trainer = Pretrainer(tiny_config(tmp_path, "train.epochs=1"))
    trainer.setup()
    try:
        path = trainer.export_teacher_encoder()
        before = path.read_bytes()

        def dies_half_way(tensors, filename, metadata=None) -> None:
            Path(filename).write_bytes(before[:100])
            raise KeyboardInterrupt

        monkeypatch.setattr(safetensors.torch, "save_file", dies_half_way)
        with pytest.raises(KeyboardInterrupt):
            trainer.export_teacher_encoder()
    finally:
        trainer.cleanup()
    assert path.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("damage", ["truncated", "random", "bitflip", "random_no_sidecar"])
def test_resume_skips_a_damaged_latest_checkpoint(reference, tmp_path, caplog, damage: str) -> None:
    """Checkpoints 4 and 5 exist, 5 is damaged: the warning names it, it is moved aside, training resumes
    from 4 and ends bitwise equal to the uninterrupted run."""
    cfg = tiny_config(tmp_path, "train.checkpoint_every_steps=1")
    latest = checkpoint_path(tmp_path, STEPS_PER_EPOCH + 2)
    with pytest.raises(Interrupted):
        run(cfg, trainer_cls=StopsAfter5)
    DAMAGE[damage](latest)

    with caplog.at_level(logging.WARNING, logger="asit"):
        resumed = Pretrainer(cfg, resume=True)
        resumed.setup()
    try:
        assert resumed.step == STEPS_PER_EPOCH + 1
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(str(latest) in m and "older checkpoint" in m for m in warned), warned
        assert Path(f"{latest}.corrupt").is_file() and not latest.exists()
        resumed.train()
    finally:
        resumed.cleanup()
    assert_same_training_state(load_checkpoint(checkpoint_path(tmp_path, TOTAL)), reference)
    assert [r["step"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines())] == \
        list(range(1, TOTAL + 1))  # the records of the lost step were dropped and written again


def test_all_checkpoints_damaged_is_an_error(tmp_path) -> None:
    cfg = tiny_config(tmp_path, "train.epochs=1", "train.checkpoint_every_steps=2")
    run(cfg)
    for path in list_checkpoints(tmp_path):
        _truncate(path)
    trainer = Pretrainer(cfg, resume=True)
    try:
        with pytest.raises(CorruptCheckpointError, match="no usable checkpoint.*checkpoint_000000002.pt"):
            trainer.setup()
    finally:
        trainer.cleanup()


def test_permanent_checkpoints_survive_pruning(tmp_path) -> None:
    run(tiny_config(tmp_path, "train.checkpoint_every_steps=1", "train.keep_last=1", "train.keep_every_steps=4",
                    "train.keep_every_epochs=1"))
    steps = [int(p.stem.split("_")[1]) for p in list_checkpoints(tmp_path)]
    assert steps == [3, 4, 6]  # epoch ends 3 and 6, step 4, and the last
    for step in steps:
        assert load_checkpoint(checkpoint_path(tmp_path, step))["step"] == step
        assert rng_path(tmp_path, step, 0).is_file()
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("auto_resume, resumes", [(True, True), (False, False)])
def test_torchrun_restart_resumes_automatically(tmp_path, monkeypatch, auto_resume: bool, resumes: bool) -> None:
    run(tiny_config(tmp_path, "train.epochs=1"))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    trainer = Pretrainer(tiny_config(tmp_path, f"train.auto_resume={str(auto_resume).lower()}"))
    try:
        trainer.setup()
        assert trainer.step == (STEPS_PER_EPOCH if resumes else 0)
    finally:
        trainer.cleanup()


def test_checkpoints_record_matching_replica_digests(reference) -> None:
    tensors = {f"{part}.{k}": v for part in ("student", "teacher", "loss") for k, v in reference[part].items()}
    assert reference["replica_digests"] == [tensor_digest(tensors)]


def test_diverged_replicas_stop_the_run(tmp_path, monkeypatch) -> None:
    trainer = Pretrainer(tiny_config(tmp_path, "train.epochs=1"))
    trainer.setup()
    try:
        # rank 1's digest differs (the other gather, of bad-clip counts, stays single-rank)
        monkeypatch.setattr(trainer, "_gather",
                            lambda obj, group=None: [obj, "0" * 64] if isinstance(obj, str) else [obj])
        with pytest.raises(ReplicaMismatchError, match=r"rank\(s\) \[1\] differ"):
            trainer.save_checkpoint()
    finally:
        trainer.cleanup()
    assert not list_checkpoints(tmp_path)


def test_trim_log_drops_later_and_cut_records(tmp_path) -> None:
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)]
    log.write_text("\n".join(lines) + '\n{"step": 5, "lo')  # the last line cut by a kill
    trim_log(log, 2)
    assert log.read_text() == "".join(line + "\n" for line in lines[:2])


def test_fault_hook_fires_once_per_run_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ASIT_FAULT_AT_STEP", "5")
    assert _fault_step(rank=1, world_size=2) == 5 and _fault_step(rank=0, world_size=2) is None
    monkeypatch.setenv("ASIT_FAULT_RANK", "0")
    assert _fault_step(rank=0, world_size=2) == 5
    monkeypatch.delenv("ASIT_FAULT_AT_STEP")
    assert _fault_step(rank=0, world_size=1) is None
    (tmp_path / ".fault_injected_step5").touch()
    _inject_fault(tmp_path, 5)  # already fired: returns instead of exiting


# --------------------------------------------------------------------------- bad input, clear errors


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    run(tiny_config(out, "train.epochs=1"))
    return out


def _setup_error(cfg, resume: bool = True) -> Exception:
    trainer = Pretrainer(cfg, resume=resume)
    try:
        with pytest.raises(Exception) as info:
            trainer.setup()
    finally:
        trainer.cleanup()
    return info.value


def test_checkpoint_of_another_architecture_is_named_before_training(finished_run, tmp_path) -> None:
    import shutil

    shutil.copytree(finished_run / "checkpoints", tmp_path / "checkpoints")
    err = _setup_error(tiny_config(tmp_path, "model.depth=3", "model.embed_dim=128"))
    assert isinstance(err, CheckpointError) and not isinstance(err, CorruptCheckpointError)
    msg = str(err)
    assert str(checkpoint_path(tmp_path, STEPS_PER_EPOCH)) in msg and "different model" in msg
    assert "model.depth: 2 there, 3 here" in msg and "model.embed_dim: 64 there, 128 here" in msg
    assert checkpoint_path(tmp_path, STEPS_PER_EPOCH).exists()  # a sound file is not moved aside


def test_checkpoint_of_another_world_size_is_refused(finished_run, tmp_path) -> None:
    path = checkpoint_path(tmp_path, STEPS_PER_EPOCH)
    state = load_checkpoint(checkpoint_path(finished_run, STEPS_PER_EPOCH))
    atomic_save({**state, "world_size": 4}, path)
    err = _setup_error(tiny_config(tmp_path))
    assert isinstance(err, CheckpointError)
    assert str(path) in str(err) and "4 process(es)" in str(err) and "same world size" in str(err)


def test_optimizer_state_of_other_parameter_groups_is_named(finished_run, tmp_path) -> None:
    """A checkpoint whose AdamW groups split the parameters differently (asit before the DINO weight-decay
    rule kept the [CLS] token and positional embedding out of decay) is refused by name, not a bare ValueError."""
    path = checkpoint_path(tmp_path, STEPS_PER_EPOCH)
    state = load_checkpoint(checkpoint_path(finished_run, STEPS_PER_EPOCH))
    decay, no_decay = state["optimizer"]["param_groups"]
    moved = decay["params"][:2]
    state["optimizer"]["param_groups"] = [dict(decay, params=decay["params"][2:]),
                                          dict(no_decay, params=moved + no_decay["params"])]
    atomic_save(state, path)
    err = _setup_error(tiny_config(tmp_path))
    assert isinstance(err, CheckpointError) and str(path) in str(err) and "parameter groups" in str(err)


def test_a_larger_world_size_is_refused_before_the_rng_files(finished_run, tmp_path, monkeypatch) -> None:
    """Rank 1 of 2 resuming a 1-process checkpoint (simulated in process: no collectives) has no RNG file of
    its own; that is a layout mismatch, not damage: a plain CheckpointError names both world sizes and
    what to do, and the checkpoint stays a resume candidate (it used to be renamed to *.corrupt)."""
    import dataclasses
    import shutil

    import asit.train.engine as engine
    from asit.train.distributed import DistInfo

    @dataclasses.dataclass(frozen=True)
    class LoneRank(DistInfo):  # rank 1 of a 2-process world, without a process group
        @property
        def distributed(self) -> bool:
            return False

    shutil.copytree(finished_run / "checkpoints", tmp_path / "checkpoints")
    d = tiny_config(tmp_path).data  # only rank 0 makes the demo corpus: name its manifest
    manifest = ensure_demo_dataset(None, num_clips=d.demo_clips, sample_rate=d.sample_rate, seconds=d.demo_seconds)
    monkeypatch.setattr(engine, "init_distributed", lambda device: LoneRank(1, 1, 2, torch.device("cpu")))
    err = _setup_error(tiny_config(tmp_path, f"data.train_manifest={manifest}"))
    assert isinstance(err, CheckpointError) and not isinstance(err, CorruptCheckpointError), err
    assert "written by 1 process(es), this run has 2" in str(err) and "Relaunch with 1 process(es)" in str(err)
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint_{STEPS_PER_EPOCH:09d}.pt"]


def _pretrain_script_main():
    """``main`` of scripts/pretrain.py (a script, not a module of the package)."""
    import importlib.util

    script = Path(__file__).parents[1] / "scripts" / "pretrain.py"
    spec = importlib.util.spec_from_file_location("pretrain_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_pretrain_script_reports_a_checkpoint_error_and_exits_1(finished_run, tmp_path, caplog) -> None:
    import shutil

    shutil.copytree(finished_run / "checkpoints", tmp_path / "checkpoints")
    with caplog.at_level(logging.ERROR, logger="asit"):
        rc = _pretrain_script_main()(["--config", "demo_cpu", *TINY, f"train.output_dir={tmp_path}", "model.depth=3",
                                      "--resume"])
    assert rc == 1
    assert any("different model" in r.getMessage() for r in caplog.records)


def test_batch_larger_than_the_dataset(tmp_path, caplog) -> None:
    err = _setup_error(tiny_config(tmp_path, "data.demo_clips=4"), resume=False)
    assert isinstance(err, ValueError) and "larger than the dataset (4 clips" in str(err)
    # the script logs the message and exits 1 (it used to end in a traceback)
    with caplog.at_level(logging.ERROR, logger="asit"):
        rc = _pretrain_script_main()(["--config", "demo_cpu", *TINY, f"train.output_dir={tmp_path / 'run'}",
                                      "data.demo_clips=4"])
    assert rc == 1
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "larger than the dataset" in
            r.getMessage()]


@pytest.mark.parametrize("kind", ["missing", "empty_csv", "empty_folder", "missing_clips"])
def test_bad_manifest_is_named(tmp_path, kind: str) -> None:
    if kind == "missing":
        source = tmp_path / "nowhere" / "train.csv"
        expected = "does not exist"
    elif kind == "empty_csv":
        source = tmp_path / "train.csv"
        source.write_text("path,label\n")
        expected = "no audio files"
    elif kind == "empty_folder":
        source = tmp_path / "audio"
        source.mkdir()
        expected = "no audio files"
    else:
        source = tmp_path / "train.csv"
        source.write_text("a.wav,dog\nb.wav,cat\n")
        expected = "a.wav"
    err = _setup_error(tiny_config(tmp_path / "run", f"data.train_manifest={source}"), resume=False)
    assert isinstance(err, ManifestError)
    assert str(source) in str(err) and expected in str(err)
