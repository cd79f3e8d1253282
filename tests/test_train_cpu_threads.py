"""CPU threads chosen from the cores a process may use, and the warning when samples/s collapse."""

import logging

import pytest
import torch

from asit.train import cpu_threads
from asit.train.cpu_threads import available_cores, choose_cpu_threads, set_cpu_threads
from asit.train.metrics import RateWatch


@pytest.mark.parametrize("cores,local,workers,expected", [
    (2, 1, 1, 1),     # the demo on 2 cores: one core for the loader worker
    (2, 1, 0, 2),
    (16, 1, 4, 12),
    (16, 4, 2, 2),    # 4 processes per node: 4 cores each, 2 of them for workers
    (16, 8, 4, 1),    # never fewer than one thread
    (1, 2, 0, 1),
])
def test_threads_are_the_process_share_less_the_loader_workers(cores, local, workers, expected):
    threads, why = choose_cpu_threads(workers, environ={"LOCAL_WORLD_SIZE": str(local)}, cores=cores)
    assert threads == expected
    assert f"{cores} cores" in why and f"{workers} loader worker" in why


def test_omp_num_threads_set_by_the_user_is_left_alone():
    threads, why = choose_cpu_threads(0, environ={"OMP_NUM_THREADS": "3", "LOCAL_WORLD_SIZE": "1"}, cores=16)
    assert threads is None and why == "OMP_NUM_THREADS=3"
    assert choose_cpu_threads(0, environ={"OMP_NUM_THREADS": " "}, cores=4)[0] == 4  # blank: not set


def test_the_default_cores_are_the_affinity():
    assert 1 <= available_cores()
    assert choose_cpu_threads(0, environ={})[0] == available_cores()


def test_set_cpu_threads_applies_logs_once_and_restores(monkeypatch, caplog):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "available_cores", lambda: before + 2)
    try:
        with caplog.at_level(logging.INFO, logger="asit.train.cpu_threads"):
            handle = set_cpu_threads(torch.device("cpu"), 1)
        assert torch.get_num_threads() == before + 1 == handle.now
        assert [r.getMessage() for r in caplog.records] == [
            f"CPU training with {before + 1} torch threads ({before + 2} cores, 1 process on this node, "
            "1 loader worker per process; set OMP_NUM_THREADS to choose another count)"]
        handle.restore()
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert set_cpu_threads(torch.device("cpu"), 0, announce=False).now == before  # left to the user's value
    assert set_cpu_threads(torch.device("meta"), 0, announce=False).now == before  # not a CPU run: untouched


def test_rate_watch_warns_once_when_the_rate_collapses():
    watch = RateWatch(warmup=2, factor=1 / 3, patience=2)
    rates = [5.0, 90.0,   # warm-up: no standard (the first windows compile, start workers)
             40.0, 42.0,  # best 42
             12.0,        # one slow window (an epoch's start): not yet
             41.0, 12.0, 11.0, 10.0, 9.0]
    warnings = [(i, w) for i, r in enumerate(rates) if (w := watch.observe(r))]
    assert len(warnings) == 1 and warnings[0][0] == 7
    message = warnings[0][1]
    assert message.startswith("samples/s fell to 11.0 from 42.0 — another process may be using the cores")
    assert "OMP_NUM_THREADS" in message
    for rate in (30.0, 10.0, 10.0):  # recovered to half the best: a new collapse is reported again
        last = watch.observe(rate)
    assert last is not None and "fell to 10.0 from 42.0" in last


def test_rate_watch_is_quiet_for_a_steady_or_merely_slower_run():
    watch = RateWatch()
    assert not any(watch.observe(r) for r in [10, 50, 48, 52, 30, 25, 20, 18, float("nan"), 19])
    gpu = RateWatch(cpu=False, warmup=0, patience=1)
    gpu.observe(100.0)
    assert "OMP_NUM_THREADS" not in gpu.observe(10.0)


def test_the_trainer_logs_the_collapse_at_its_log_step(tmp_path, monkeypatch, caplog):
    """The engine feeds each log step's samples/s to its RateWatch and logs the warning (rates faked: no timing)."""
    from tiny_config import TINY_MODEL

    from asit.config import load_config
    from asit.train import Pretrainer, metrics

    rates = iter([50.0, 50.0, 40.0, 40.0, 5.0, 5.0, 5.0, 5.0])
    monkeypatch.setattr(metrics.Throughput, "rate", lambda self: next(rates))
    cfg = load_config("demo_cpu", [*TINY_MODEL, "train.batch_size=8", "train.epochs=2",
                                   "train.log_every=1", "train.image_every_epochs=0", "train.progress=false",
                                   f"train.output_dir={tmp_path}", "data.demo_clips=32"])
    trainer = Pretrainer(cfg)
    try:
        trainer.setup()
        with caplog.at_level(logging.WARNING, logger="asit.train.engine"):
            trainer.train()
    finally:
        trainer.cleanup()
    slow = [r.getMessage() for r in caplog.records if "fell to" in r.getMessage()]
    assert slow == ["step 6: samples/s fell to 5.0 from 40.0 — another process may be using the cores "
                    "(set OMP_NUM_THREADS; the log's start names the threads chosen)"]
