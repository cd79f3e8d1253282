"""Crashes and restarts of 2-process CPU (gloo) training under ``torchrun``, against an uninterrupted run.

* SIGKILL of the whole launch (torchrun and its workers) at a random moment after a checkpoint, then
  ``--resume``: the final checkpoint equals the uninterrupted run's bit for bit.
* ``--max-restarts=1`` and a worker that dies mid-run (the ``ASIT_FAULT_AT_STEP`` test hook): torchrun
  restarts the workers, they resume by themselves and end equal to the uninterrupted run.
* Two torchrun "nodes" on loopback (c10d rendezvous): the replicas agree, and equal the one-node run.

Each launch costs about 5-10 s (three Python processes importing torch on a 2-core machine), so the
uninterrupted reference run is shared by all tests of this module.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_config import TINY_MODEL

from asit.train.checkpoint import checkpoint_path, load_checkpoint, rng_path, tensor_digest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 3  # 48 clips / 2 ranks / batch 8
EPOCHS = 2
TOTAL = STEPS_PER_EPOCH * EPOCHS
TINY = [
    *TINY_MODEL,
    "train.batch_size=8", f"train.epochs={EPOCHS}", "train.log_every=1", "train.progress=false",
    "train.image_every_epochs=0", "train.keep_last=2",
]
FAULT_STEP = 5  # mid-epoch 1: the restart resumes from checkpoint 4 with one batch of the epoch consumed


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, cache: Path, *args: str, launcher: list[str] | None = None,
            env: dict[str, str] | None = None, log_name: str = "launch") -> tuple[subprocess.Popen, Path]:
    """Start torchrun in its own session; its output goes to a file next to the run directory."""
    if launcher is None:
        launcher = ["--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(ROOT / "scripts" / "pretrain.py"),
           "--config", "demo_cpu", *TINY, f"train.output_dir={out}", *args]
    full_env = dict(os.environ, ASIT_CACHE=str(cache), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    full_env.pop("ASIT_FAULT_AT_STEP", None)  # only the test that asks for a fault gets one
    full_env.update(env or {})
    log_path = out.parent / f"{out.name}.{log_name}.log"
    with open(log_path, "ab") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return proc, log_path


def _finish(proc: subprocess.Popen, log_path: Path, timeout: float = 120) -> str:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        proc.wait()
        rc = "timeout"
    text = log_path.read_text(errors="replace")
    assert rc == 0, f"torchrun failed ({rc}):\n{text[-8000:]}"
    return text


def _torchrun(out: Path, cache: Path, *args: str, **kwargs) -> str:
    return _finish(*_launch(out, cache, *args, **kwargs))


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (from /proc; torchrun starts each worker in a session of its own, so
    the launcher's process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(root: int) -> None:
    """SIGKILL torchrun and all its workers at once, like a node that loses power."""
    for pid in [*_descendants(root), root]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _assert_same_final_state(run: Path, ref: Path) -> None:
    """The final checkpoints agree bitwise: weights, centres, optimiser, scaler, step and both ranks' RNGs."""
    got = load_checkpoint(checkpoint_path(run, TOTAL))
    want = load_checkpoint(checkpoint_path(ref, TOTAL))
    assert got["step"] == want["step"] == TOTAL
    for part in ("student", "teacher", "loss", "rng"):
        assert got[part].keys() == want[part].keys()
        differ = [k for k in want[part] if not torch.equal(got[part][k], want[part][k])]
        assert not differ, f"{part}: {differ[:5]} differ"
    got_opt, want_opt = got["optimizer"], want["optimizer"]
    assert got_opt["param_groups"] == want_opt["param_groups"]
    assert got_opt["state"].keys() == want_opt["state"].keys()
    for i, slots in want_opt["state"].items():
        assert all(torch.equal(got_opt["state"][i][k], v) for k, v in slots.items()), f"optimizer state {i}"
    assert got["scaler"] == want["scaler"]
    other = [load_checkpoint(rng_path(d, TOTAL, 1), required=("torch", "gmml")) for d in (run, ref)]
    assert all(torch.equal(other[0][k], other[1][k]) for k in ("torch", "gmml"))
    assert got["replica_digests"] == want["replica_digests"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("asit_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    """The uninterrupted run (checkpoint every step, as the runs it is compared with)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _torchrun(out, cache, "train.checkpoint_every_steps=1")
    return out


@pytest.mark.parametrize("every, kill_after", [(1, 1), (2, 4)], ids=["every1-after1", "every2-after4"])
def test_sigkill_then_resume_is_exact(reference, cache, tmp_path, every: int, kill_after: int) -> None:
    out = tmp_path / "run"
    overrides = [f"train.checkpoint_every_steps={every}"]
    proc, log_path = _launch(out, cache, *overrides)
    # wait for the checkpoint's checksum file (written last), then kill at whatever point the run is in
    committed = Path(f"{checkpoint_path(out, kill_after)}.sha256")
    deadline = time.monotonic() + 90
    while not committed.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    _kill_tree(proc.pid)
    proc.wait()
    assert committed.exists(), log_path.read_text(errors="replace")[-4000:]
    assert not checkpoint_path(out, TOTAL).exists(), "the run finished before it was killed"

    _torchrun(out, cache, *overrides, "--resume", log_name="resume")
    _assert_same_final_state(out, reference)


def test_elastic_restart_resumes_automatically(reference, cache, tmp_path) -> None:
    """A worker exits with status 1 after step 5 (its checkpoint not yet written): torchrun restarts both
    workers once and, without ``--resume``, they continue from checkpoint 4 (train.auto_resume)."""
    out = tmp_path / "run"
    launcher = ["--nnodes=1", "--nproc_per_node=2", "--max-restarts=1", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{_free_port()}", "--local_addr=127.0.0.1"]
    text = _torchrun(out, cache, "train.checkpoint_every_steps=1", launcher=launcher,
                     env={"ASIT_FAULT_AT_STEP": str(FAULT_STEP)})
    assert (out / f".fault_injected_step{FAULT_STEP}").exists()  # the fault did fire
    assert "simulating a crash" in text and "restart 1" in text
    assert f"resumed from {checkpoint_path(out, FAULT_STEP - 1)} at step {FAULT_STEP - 1}" in text
    _assert_same_final_state(out, reference)


def test_two_nodes_on_loopback_agree(reference, cache, tmp_path) -> None:
    """Two torchrun agents with one worker each meet through a c10d rendezvous on 127.0.0.1."""
    out = tmp_path / "run"
    port = _free_port()
    procs = []
    for node in (0, 1):
        launcher = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                    "--rdzv_id=asit-test", "--local_addr=127.0.0.1",  # c10d assigns the ranks (no --node_rank)
                    f"--rdzv_conf=is_host={node == 0},join_timeout=60"]
        procs.append(_launch(out, cache, "train.checkpoint_every_steps=2", launcher=launcher,
                             log_name=f"node{node}"))
    try:
        for proc, log_path in procs:
            _finish(proc, log_path)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                _kill_tree(proc.pid)
    final = load_checkpoint(checkpoint_path(out, TOTAL))
    assert final["world_size"] == 2
    digests = final["replica_digests"]  # each rank hashed its own student, teacher and centres
    tensors = {f"{part}.{k}": v for part in ("student", "teacher", "loss") for k, v in final[part].items()}
    assert digests == [tensor_digest(tensors)] * 2
    _assert_same_final_state(out, reference)  # and the two-node run is the one-node run


@pytest.mark.parametrize("to, sig, at", [("self", "TERM", 4), ("launcher", "INT", 2)],
                         ids=["sigterm-to-rank1", "sigint-to-torchrun"])
def test_interrupt_then_resume_is_exact(reference, cache, tmp_path, to: str, sig: str, at: int) -> None:
    """A signal at a known step (the ``ASIT_SIGNAL_AT_STEP`` hook): SIGTERM to rank 1 alone (rank 0 learns
    it at the step boundary), or SIGINT to torchrun, which forwards it to both workers (Ctrl-C). Both ranks
    stop after that step with its checkpoint, rank 0 prints the one line, no worker prints a traceback; then
    ``--resume`` ends bitwise equal to the uninterrupted run."""
    out = tmp_path / "run"
    env = {"ASIT_SIGNAL_AT_STEP": str(at), "ASIT_SIGNAL": sig, "ASIT_SIGNAL_TO": to,
           "ASIT_SIGNAL_RANK": "1" if to == "self" else "0"}
    proc, log_path = _launch(out, cache, env=env)
    rc = proc.wait(timeout=120)
    text = log_path.read_text(errors="replace")
    assert rc != 0, text[-4000:]  # torchrun reports the interrupted workers (or its own signal) as a failure
    assert text.count(f"interrupted at step {at}; checkpoint written; continue with the same command plus "
                      f"--resume") == 1, text[-4000:]
    assert "KeyboardInterrupt" not in text and "asit/train" not in text.split("Traceback")[-1]
    if to == "launcher":
        assert "SignalException" in text  # torchrun's own report of the signal it got (its traceback)
    else:
        assert "exitcode  : 143" in text  # torchrun names rank 1's status: SIGTERM
    ckpts = sorted((out / "checkpoints").glob("checkpoint_*.pt"))
    assert ckpts[-1] == checkpoint_path(out, at)

    _torchrun(out, cache, "--resume", log_name="resume")
    _assert_same_final_state(out, reference)
