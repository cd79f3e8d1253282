"""A user's mistake reads as one line: scripts/pretrain.py's early checks and asit.cli's launcher error file."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from asit import cli

ROOT = Path(__file__).parents[1]
PRETRAIN = ROOT / "scripts" / "pretrain.py"


def _run(*args: str, tmp_path: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", ASIT_CACHE=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *(launcher or []), str(PRETRAIN), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_config_error_is_one_line_and_exit_1(tmp_path):
    done = _run("bad.key=1", tmp_path=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        "error: unknown config key 'bad' (valid keys here: ['data', 'eval', 'gmml', 'loss', 'model', 'name', "
        "'optim', 'train'])"]
    assert done.stdout == "" and not (tmp_path / "runs").exists()  # nothing written before the check


def _pretrain_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_script", PRETRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("args,message", [
    (["--config", "no_such_recipe"], "error: unknown recipe 'no_such_recipe'"),
    (["optim.lr=-1"], "error: optim.lr"),
    (["data.train_manifest=/no/such/manifest.json"],
     "error: /no/such/manifest.json: manifest does not exist (data.train_manifest)"),
    (["data.train_manifest=shards:/no/such/folder"], "error: shards:/no/such/folder"),
])
def test_early_checks_report_one_line_before_anything_starts(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    assert _pretrain_main()(args) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(message), err
    assert not (tmp_path / "runs").exists()


def test_a_cuda_run_without_cuda_is_a_config_error(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _pretrain_main()(["train.device=cuda"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: train.device=cuda but no CUDA device is available (train.device=auto picks the CPU)"]


def test_user_errors_fill_torchruns_error_file_and_rank_zero_speaks(tmp_path, monkeypatch, capsys):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    @cli.command
    def main(argv):
        with cli.user_errors(ValueError, every_rank=False):
            raise ValueError("data.foo must be positive")
        return 0

    monkeypatch.setenv("RANK", "1")
    assert main([]) == 1
    assert capsys.readouterr().err == ""  # the other ranks stay quiet: rank 0 says it
    monkeypatch.setenv("RANK", "0")
    assert main([]) == 1
    assert capsys.readouterr().err == "error: data.foo must be positive\n"
    record = json.loads(error_file.read_text())["message"]
    assert record["message"] == record["extraInfo"]["py_callstack"] == "error: data.foo must be positive"


def test_an_unexpected_error_keeps_its_traceback_and_records_it(tmp_path, monkeypatch):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))

    @cli.command
    def main(argv):
        raise KeyError("bug")

    with pytest.raises(KeyError):
        main([])
    record = json.loads(error_file.read_text())["message"]
    assert record["message"] == "KeyError: 'bug'" and "Traceback" in record["extraInfo"]["py_callstack"]
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    cli.record_for_launcher("nothing to write to")  # without torchrun: no file, no error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_under_torchrun_the_message_comes_first_and_the_summary_repeats_it(tmp_path):
    """What remains under torchrun: the launcher's traceback and summary after the one line; the summary's
    "traceback" entry is the message, not a link to the docs."""
    done = _run("bad.key=1", tmp_path=tmp_path, launcher=[
        "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}"])
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    ours = [line for line in lines if line.startswith("error: ")]
    assert len(ours) == 1 and lines[0] == ours[0]  # rank 0 only, before the launcher's report
    assert "  traceback : error: unknown config key 'bad'" in done.stderr
    assert "To enable traceback see" not in done.stderr
