"""Two-process DDP pretraining on CPU (gloo) through ``torchrun``: a run, then a resumed run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_config import TINY_MODEL

from asit.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_MODEL,
    "train.batch_size=8", "train.max_steps_per_epoch=2", "train.log_every=1", "train.progress=false",
    "train.image_every_epochs=0",
]
STEPS_PER_EPOCH = 2  # 48 clips / 2 ranks / 8 = 3, capped at 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, cache: Path, *args: str, wrapper: Path | None = None, nproc: int = 2,
             returncode: int = 0) -> subprocess.CompletedProcess:
    """``nproc`` CPU ranks of ``scripts/pretrain.py`` (each started through ``wrapper``, given one); asserts that
    torchrun ends with ``returncode``."""
    script = [str(wrapper)] if wrapper else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *script, str(ROOT / "scripts" / "pretrain.py"),
           "--config", "demo_cpu", *TINY, f"train.output_dir={out}", *args]
    env = dict(os.environ, ASIT_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == returncode, (f"torchrun ended with {proc.returncode}, not {returncode}:\n"
                                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.mark.slow
def test_ddp_run_then_resume(tmp_path) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    _torchrun(out, cache, "train.epochs=1")
    ckpt_dir = out / "checkpoints"
    first = load_checkpoint(ckpt_dir / f"checkpoint_{STEPS_PER_EPOCH:09d}.pt")
    assert first["step"] == STEPS_PER_EPOCH and first["world_size"] == 2
    rng = [torch.load(ckpt_dir / f"rng_{STEPS_PER_EPOCH:09d}_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(rng[0]["gmml"], rng[1]["gmml"])  # each rank keeps its own stream

    _torchrun(out, cache, "train.epochs=2", "--resume")
    total = 2 * STEPS_PER_EPOCH
    final = load_checkpoint(ckpt_dir / f"checkpoint_{total:09d}.pt")
    assert final["step"] == total and final["epoch"] == 2
    for r in (0, 1):
        assert (ckpt_dir / f"rng_{total:09d}_rank{r}.pt").is_file()
    # the centres continued from the first run's values (all-reduced, so they changed again)
    for key in ("center_global", "center_local"):
        assert first["loss"][key].abs().sum() > 0
        assert not torch.equal(final["loss"][key], first["loss"][key])
    assert not torch.equal(final["student"]["backbone.cls_token"], first["student"]["backbone.cls_token"])
    with open(out / "log.jsonl", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    assert [r["step"] for r in records] == list(range(1, total + 1))  # rank 0 only, contiguous
    assert [r["epoch"] for r in records] == [1, 1, 2, 2]  # counted from 1, like the progress bar
    assert (out / "teacher_encoder.safetensors").is_file()
    from safetensors import safe_open

    with safe_open(str(out / "teacher_encoder.safetensors"), framework="pt") as fh:
        assert fh.metadata()["step"] == str(total)
        assert torch.equal(fh.get_tensor("cls_token"), final["teacher"]["backbone.cls_token"])
    assert json.loads((out / "summary.json").read_text())["steps"] == total


@pytest.mark.slow
def test_resume_with_more_processes_is_refused_and_leaves_the_checkpoint(tmp_path) -> None:
    """A 1-process run resumed by 2 processes: rank 1 has no RNG file of its own. That is a layout
    mismatch, not damage: both ranks stop with a CheckpointError naming both world sizes, nothing is
    renamed to *.corrupt, and the same command with 1 process then resumes (it used to start from scratch)."""
    out, cache = tmp_path / "run", tmp_path / "cache"
    _torchrun(out, cache, "train.epochs=1", nproc=1)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    proc = _torchrun(out, cache, "train.epochs=2", "--resume", returncode=1)
    text = proc.stdout + proc.stderr
    logged = [line for line in text.splitlines() if "ERROR asit:" in line]  # torchrun's summary repeats it
    assert sum("was written by 1 process(es), this run has 2" in line for line in logged) == 2, text[-4000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before
    proc = _torchrun(out, cache, "train.epochs=2", "--resume", nproc=1)
    assert f"at step {STEPS_PER_EPOCH}" in proc.stdout + proc.stderr
    assert load_checkpoint(out / "checkpoints" / f"checkpoint_{2 * STEPS_PER_EPOCH:09d}.pt")["step"] == 4


_NAN_ON_RANK_1 = """
import os, runpy, sys
import torch
from asit.train.losses import ASiTLoss

original, calls = ASiTLoss.forward, [0]

def forward(self, *args, **kwargs):
    terms, stats = original(self, *args, **kwargs)
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 2:  # rank 1's second step only
        nan = torch.tensor(float("nan"))  # added: the gradients stay finite, on both ranks
        terms = dict(terms, local=terms["local"] + nan, loss=terms["loss"] + nan)
    return terms, stats

ASiTLoss.forward = forward
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_ddp_sync_free_skip_on_one_rank_is_taken_by_all(tmp_path) -> None:
    """train.sync_free=true under DDP: a NaN loss on rank 1 alone (gradients finite everywhere) makes both
    ranks skip that step, decided on the device (all-reduced flags). Were rank 0 to step alone, the
    replicas would differ, which train.verify_replicas (weights hashed at the checkpoint) refuses; rank 0
    reports the skip at the next log."""
    wrapper = tmp_path / "nan_on_rank_1.py"
    wrapper.write_text(_NAN_ON_RANK_1)
    out = tmp_path / "run"
    _torchrun(out, tmp_path / "cache", "train.epochs=1", "train.sync_free=true", "optim.warmup_epochs=0",
              wrapper=wrapper)
    with open(out / "log.jsonl", encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    assert [(r["step"], r.get("event")) for r in records] == [(1, None), (2, "nonfinite_skip")]
    assert records[1]["nonfinite"] == ["local"] and records[1]["skipped_steps"] == 1
    final = load_checkpoint(out / "checkpoints" / f"checkpoint_{STEPS_PER_EPOCH:09d}.pt")
    assert final["nonfinite"] == {"total": 1, "consecutive": 1}


_BAD_CLIPS_ON_RANK_1 = """
import runpy, sys
from asit.train import engine

original = engine.Pretrainer._setup_data


class TwoBadPerBatch:  # rank 1's loader reports 2 unreadable clips in every batch
    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            yield dict(batch, num_skipped=2, skip_reasons=["unreadable", "unreadable"])


def _setup_data(self):
    original(self)
    if self.dist.rank == 1:
        self.loader = TwoBadPerBatch(self.loader)


engine.Pretrainer._setup_data = _setup_data
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_bad_clips_on_one_rank_stop_every_rank_together(tmp_path) -> None:
    """Only rank 1 meets unreadable clips. The counts are summed over the ranks before they are judged, so both
    ranks raise BadDataError at the same step (rank 1 used to raise alone, judged on its own counts, while
    rank 0 went on into the next collective)."""
    wrapper = tmp_path / "bad_on_rank_1.py"
    wrapper.write_text(_BAD_CLIPS_ON_RANK_1)
    proc = _torchrun(tmp_path / "run", tmp_path / "cache", "train.epochs=1", "data.max_bad_fraction=0.05",
                     wrapper=wrapper, returncode=1)
    text = proc.stdout + proc.stderr
    logged = [line for line in text.splitlines() if "ERROR asit:" in line]  # torchrun's summary repeats it
    assert sum("epoch 1: 2 clips (of 18 loaded so far, all processes) could not be used" in line
               for line in logged) == 2, text[-4000:]


@pytest.mark.slow
def test_ddp_with_dali_splits_the_header_check_and_reports_left_out_files(tmp_path) -> None:
    """Two ranks with ``data.backend=dali`` over a manifest with two unreadable files: the ranks split the
    header check (exchanging verdicts through the engine's ``_gather``), agree on what to leave out, and
    train with the kept clips."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed (pip install 'asit[dali]')")
    from asit.data import ensure_demo_dataset

    demo = ensure_demo_dataset(tmp_path / "data", num_clips=48, sample_rate=16000, seconds=2.0, seed=0)
    rows = demo.read_text(encoding="utf-8").rstrip("\n").split("\n")
    for k in range(2):
        junk = tmp_path / f"junk{k}.wav"
        junk.write_bytes(b"not audio at all")
        rows.append(f"{junk},{rows[-1].rsplit(',', 1)[1]}")
    manifest = demo.with_name("with_junk.csv")  # beside the demo's: its paths are relative to it
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    proc = _torchrun(tmp_path / "run", tmp_path / "cache", "train.epochs=1", "data.backend=dali",
                     f"data.train_manifest={manifest}", "data.sample_rate=16000")
    text = proc.stdout + proc.stderr
    # rank 0 read every other header (25 of 50), not all of them
    assert "data: DALI, 50 clips" in text and "(2 left out before training; 25 file headers" in text, text[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == STEPS_PER_EPOCH
