"""One run per folder, clean interrupts and timed checkpoints, in process and as a script.

* A fresh run refuses a folder that holds a run; ``--overwrite`` moves the old one aside intact; a failed
  start writes nothing.
* SIGINT/SIGTERM (the ``ASIT_SIGNAL_AT_STEP`` test hook sends it at a known step) ends the run with a
  checkpoint of that step; ``--resume`` then ends bitwise equal to an uninterrupted run, log included.
* ``train.checkpoint_every_minutes`` and the paper recipes' cadence.

The 2-process (torchrun) interrupts are in tests/test_reliability_distributed.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_reliability_checkpoint import (  # noqa: F401 - _env: the module's autouse environment fixture
    STEPS_PER_EPOCH,
    TINY,
    TOTAL,
    _env,
    assert_same_training_state,
    run,
    tiny_config,
)

from asit.config import ConfigError, load_config
from asit.train import Pretrainer
from asit.train.checkpoint import checkpoint_path, file_sha256, list_checkpoints, load_checkpoint
from asit.train.interrupts import SIGNAL_AT_STEP_ENV, Interrupted
from asit.train.run_dir import RunDirError

ROOT = Path(__file__).resolve().parents[1]


def _pretrain_main():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import pretrain
    finally:
        sys.path.pop(0)
    return pretrain.main


def read_log(run_dir: Path) -> list[dict]:
    """log.jsonl without the wall-clock fields (time, samples/s), which differ between runs."""
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "samples_per_s")} for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run (checkpoint every step: the interrupted runs compare against its last one)."""
    out = tmp_path_factory.mktemp("reference")
    run(tiny_config(out, "train.checkpoint_every_steps=1"))
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    run(tiny_config(out, "train.epochs=1"))
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- run folders


def test_a_fresh_run_refuses_a_finished_runs_folder_and_changes_nothing(finished) -> None:
    before = _snapshot(finished)
    trainer = Pretrainer(tiny_config(finished, "train.epochs=1"))
    with pytest.raises(RunDirError) as err:
        try:
            trainer.setup()
        finally:
            trainer.cleanup()
    message = str(err.value)
    assert "--resume" in message and "--overwrite" in message and "train.output_dir" in message
    assert "teacher_encoder.safetensors" in message and "checkpoint_000000003.pt" in message
    assert _snapshot(finished) == before  # config.yaml, log, encoder, checkpoints untouched


def test_the_script_refuses_with_one_line_and_status_1(finished, caplog) -> None:
    rc = _pretrain_main()(["--config", "demo_cpu", *TINY, f"train.output_dir={finished}", "train.epochs=1"])
    assert rc == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "--resume" in errors[0] and "--overwrite" in errors[0]


def test_overwrite_moves_the_old_run_aside_intact(finished, tmp_path) -> None:
    out = tmp_path / "run"
    run(tiny_config(out, "train.epochs=1"))
    old = _snapshot(out)
    rc = _pretrain_main()(["--config", "demo_cpu", *TINY, f"train.output_dir={out}", "train.epochs=1",
                           "train.max_steps_per_epoch=2", "--overwrite"])
    assert rc == 0
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(kept) == 1 and _snapshot(kept[0]) == old  # every file of the old run, byte for byte
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint_000000002.pt"]  # the new run's only
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_resume_and_overwrite_together_are_a_usage_error(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        _pretrain_main()(["--config", "demo_cpu", f"train.output_dir={tmp_path}", "--resume", "--overwrite"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(ValueError, match="contradict"):
        Pretrainer(tiny_config(tmp_path), resume=True, overwrite=True)


@pytest.mark.parametrize("bad", ["data.demo_clips=4", "data.train_manifest=/nonexistent/manifest.json"])
def test_a_failed_start_leaves_no_folder_behind(tmp_path, bad: str) -> None:
    out = tmp_path / "run"
    trainer = Pretrainer(tiny_config(out, bad))
    with pytest.raises(ValueError):
        try:
            trainer.setup()
        finally:
            trainer.cleanup()
    assert not out.exists()


def test_a_restart_without_auto_resume_moves_the_attempt_aside(tmp_path, monkeypatch) -> None:
    out = tmp_path / "run"
    run(tiny_config(out, "train.epochs=1"))
    old = _snapshot(out)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    trainer = Pretrainer(tiny_config(out, "train.auto_resume=false"))
    try:
        trainer.setup()
        assert trainer.step == 0 and not list_checkpoints(out)  # keep_last can never prune the new run's
    finally:
        trainer.cleanup()
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(kept) == 1 and _snapshot(kept[0]) == old


def test_resume_without_a_checkpoint_restarts_the_log(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    with pytest.raises(RunDirError, match="log.jsonl"):
        Pretrainer(tiny_config(out, "train.epochs=1")).setup()
    run(tiny_config(out, "train.epochs=1"), resume=True)
    assert [r["step"] for r in read_log(out)] == [1, 2, 3] and read_log(out)[0]["loss"] != 9.0


# --------------------------------------------------------------------------- interrupts, one process


@pytest.mark.parametrize("sig, at", [("INT", 4), ("TERM", STEPS_PER_EPOCH)],
                         ids=["sigint-mid-epoch", "sigterm-epoch-end"])
def test_interrupt_writes_a_checkpoint_and_resume_is_exact(reference, tmp_path, monkeypatch, sig: str,
                                                           at: int) -> None:
    out = tmp_path / "run"
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, str(at))
    monkeypatch.setenv("ASIT_SIGNAL", sig)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as stop:
        run(tiny_config(out))
    assert signal.getsignal(signal.SIGINT) is previous  # the handlers are gone again
    signum = getattr(signal, f"SIG{sig}")
    assert (stop.value.step, stop.value.signum, stop.value.exit_status) == (at, signum, 128 + signum)
    assert str(stop.value) == (f"interrupted at step {at}; checkpoint written; continue with the same command "
                               f"plus --resume")
    assert list_checkpoints(out)[-1] == checkpoint_path(out, at)
    assert not (out / "teacher_encoder.safetensors").exists()

    monkeypatch.delenv(SIGNAL_AT_STEP_ENV)
    run(tiny_config(out), resume=True)
    assert_same_training_state(load_checkpoint(checkpoint_path(out, TOTAL)),
                               load_checkpoint(checkpoint_path(reference, TOTAL)))
    assert read_log(out) == read_log(reference)  # every step once, the same values bit for bit


def test_the_script_prints_one_line_and_exits_130(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv(SIGNAL_AT_STEP_ENV, "2")
    rc = _pretrain_main()(["--config", "demo_cpu", *TINY, f"train.output_dir={tmp_path / 'run'}"])
    assert rc == 130
    lines = [r.getMessage() for r in caplog.records if "interrupted" in r.getMessage()]
    assert lines == ["interrupted at step 2; checkpoint written; continue with the same command plus --resume"]


def _script(out: Path, *extra: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "pretrain.py"), "--config", "demo_cpu", *TINY,
           f"train.output_dir={out}", *extra]
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env)
    return subprocess.run(cmd, cwd=ROOT, env=full, capture_output=True, text=True, timeout=180,
                          start_new_session=True)  # a process group of its own, as a terminal job has


def test_ctrl_c_to_the_process_group_spares_the_loader_workers(tmp_path) -> None:
    """Like Ctrl-C in a terminal: SIGINT reaches the trainer and its data-loader worker; the worker keeps
    serving batches until the step boundary, no traceback, status 130."""
    out = tmp_path / "run"
    env = {"ASIT_CACHE": os.environ["ASIT_CACHE"], SIGNAL_AT_STEP_ENV: "2", "ASIT_SIGNAL_TO": "group"}
    done = _script(out, "data.num_workers=1", env=env)
    assert done.returncode == 130, done.stderr[-4000:]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    assert done.stderr.count("interrupted at step 2; checkpoint written") == 1
    assert list_checkpoints(out)[-1] == checkpoint_path(out, 2)


def test_a_second_signal_exits_at_once(tmp_path) -> None:
    code = ("import os, signal, time, torch\n"
            "from asit.train.distributed import DistInfo\n"
            "from asit.train.interrupts import StepBoundary\n"
            "b = StepBoundary(DistInfo(0, 0, 1, torch.device('cpu')))\n"
            "b.install()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "assert b.poll(1).stop == signal.SIGTERM\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(5)\n"
            "print('not reached')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 143 and "not reached" not in done.stdout
    assert "SIGTERM again: exiting now, without a checkpoint" in done.stderr


# --------------------------------------------------------------------------- checkpoint cadence


def test_checkpoint_every_minutes_adds_checkpoints_between_epoch_ends(tmp_path, monkeypatch) -> None:
    clock = iter(range(0, 10_000, 50))  # 50 s per step: read once at setup and once per step boundary
    monkeypatch.setattr("asit.train.interrupts._clock", lambda: float(next(clock)))
    out = tmp_path / "run"
    run(tiny_config(out, "train.checkpoint_every_minutes=1.5", "train.keep_last=100"))
    steps = [int(p.stem.split("_")[1]) for p in list_checkpoints(out)]
    assert steps == [2, 3, 5, 6]  # 100 s after a save at steps 2 and 5, plus the epoch ends


def test_paper_recipes_checkpoint_every_30_minutes() -> None:
    for name in ("asit_vit_base", "asit_vit_small", "asit_v2_vit_base"):
        assert load_config(name).train.checkpoint_every_minutes == 30
    assert load_config("demo_cpu").train.checkpoint_every_minutes == 0
    with pytest.raises(ConfigError, match="checkpoint_every_minutes"):
        load_config("demo_cpu", ["train.checkpoint_every_minutes=-1"])

