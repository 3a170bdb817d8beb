"""What a watched run prints (pipeline/monitor.py): the step line, the smoothed ETA, each warning once and on rank 0
only, start-up phases with their heartbeat, the stop-signal acknowledgement, the config summary. The whole run's
log, on 2 ranks: tests/integration/test_watchable_run.py."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time
import warnings

import pytest
import torch
import torch.distributed as dist

from pipeline.monitor import (
    LogRecordsOnce,
    Monitor,
    Phases,
    StepTimes,
    StopFlag,
    WarningsOnce,
    config_summary,
    duration,
    format_record,
    quiet_libraries,
    seconds_since_launch,
)


def record(**changes) -> dict:
    """A step record as step_record and Monitor.timings make it, on a CPU (no accelerator memory)."""
    base = {"step": 15, "train_steps": 20, "loss": {"understanding": 5.4321, "text": None, "generation": 6.1234},
            "lr": 1e-3, "grad_norm": 0.848, "skipped": False, "step_seconds": 1.0, "tokens_per_s": 6162.0,
            "mfu": None, "packing_efficiency": 1.0, "budget_fill": 0.98, "memory_peak_allocated_bytes": None,
            "memory_reserved_bytes": None, "too_long": {"understanding": 0, "text": 0, "generation": 0},
            "data_wait_seconds": 0.01, "data_wait_share": 0.02, "step_seconds_smoothed": 1.25, "eta_seconds": 6.25,
            "since_checkpoint_seconds": 754.0}
    return {**base, **changes}


def test_the_step_line_shows_a_dash_for_a_task_not_trained_and_no_memory_on_a_cpu():
    line = format_record(record())
    assert line.startswith("step      15 / 20  loss und 5.4321 text - gen 6.1234  ")
    assert "step      15 " in line  # the padded step the Slurm and training tests wait for
    for part in ("6,162 tok/s", "MFU -", "data-wait 0.010s (2%)", "1.25 s/step", "ETA 6.2s", "since ckpt 12m34s"):
        assert part in line, (part, line)
    assert "mem" not in line and "0.0000" not in line


def test_the_step_line_says_the_epoch_of_a_run_given_epochs():
    assert format_record(record(epoch=1.375)).startswith("step      15 / 20  epoch 1.38  loss und 5.4321 ")
    assert "epoch" not in format_record(record(epoch=None))


def test_the_step_line_shows_peak_and_reserved_memory_where_there_is_an_accelerator():
    line = format_record(record(memory_peak_allocated_bytes=12 * 2**30, memory_reserved_bytes=14 * 2**30, mfu=0.412,
                                skipped=True, too_long={"understanding": 0, "text": 2, "generation": 0}))
    assert "MFU 41.2%  mem 12.0 GiB (reserved 14.0)" in line
    assert line.endswith("SKIPPED (non-finite)  too long: text 2")


@pytest.mark.parametrize(("seconds", "shown"), [(4.24, "4.2s"), (42, "42s"), (725, "12m05s"), (11100, "3h05m"),
                                                (187200, "2d04h")])
def test_durations_read_at_a_glance(seconds, shown):
    assert duration(seconds) == shown


def test_the_eta_follows_a_smoothed_step_time_not_the_first_or_last_step():
    times = StepTimes(weight=0.05)
    times.add(100.0)  # the first step: one-off costs
    assert times.seconds == 100.0  # all there is
    times.add(1.0)
    assert times.seconds == pytest.approx(1.0)  # the first step is left out once another is seen
    for _ in range(50):
        times.add(1.0)
    times.add(10.0)  # one slow step (a checkpoint) moves the estimate, not to 10 s
    assert 1.3 < times.seconds < 1.6


def test_the_monitor_times_every_step_and_the_checkpoint_age(tmp_path):
    from pipeline.config import resolve

    config, _ = resolve(2, ["--model", "tiny", "--output", str(tmp_path), "--log-every", "100", "--train-steps", "50"])
    now = [1000.0]
    monitor = Monitor(config, rank=1, start_step=0, clock=lambda: now[0])
    loss = torch.zeros(3)
    for step in (2, 3, 4):  # not log steps: only timings are kept
        now[0] += 2.0
        assert monitor.maybe_log(step, loss, 1e-3, None, [], 2.0, True, {}, data_wait=0.5) is None
    timings = monitor.timings(4)
    assert timings["data_wait_seconds"] == pytest.approx(0.5) and timings["data_wait_share"] == pytest.approx(0.25)
    assert timings["step_seconds_smoothed"] == pytest.approx(2.0) and timings["eta_seconds"] == pytest.approx(92.0)
    assert timings["since_checkpoint_seconds"] == pytest.approx(6.0)
    now[0] += 1.0
    monitor.checkpointed(tmp_path / "step-4")
    assert monitor.timings(4)["since_checkpoint_seconds"] == 0.0
    assert monitor.timings(4)["data_wait_share"] == 0.0  # reset at each log line


def deprecated_collective() -> None:
    """DeepSpeed's ZeRO-3 call of a deprecated torch collective (here without a process group: it warns, then
    raises)."""
    with pytest.raises((ValueError, RuntimeError)):
        dist.reduce_scatter_tensor(torch.zeros(1), torch.zeros(2))


@pytest.fixture
def library_loggers():
    """DeepSpeed's and transformers' log handlers as they were, after the test (quiet_libraries changes them)."""
    import logging

    handlers = [h for name in ("DeepSpeed", "transformers") for h in logging.getLogger(name).handlers]
    saved = [(h, h.level, list(h.filters)) for h in handlers]
    deepspeed_level = logging.getLogger("DeepSpeed").level
    yield logging.getLogger("DeepSpeed")
    logging.getLogger("DeepSpeed").setLevel(deepspeed_level)
    for handler, level, filters in saved:
        handler.setLevel(level)
        handler.filters[:] = filters


def test_deepspeed_logs_from_the_level_asked(library_loggers):
    import logging

    with warnings.catch_warnings():
        quiet_libraries()
        assert not library_loggers.isEnabledFor(logging.INFO)  # its start-up and per-step reports
        quiet_libraries("info")
        assert library_loggers.isEnabledFor(logging.INFO)
        assert all(h.level <= logging.INFO for h in library_loggers.handlers)  # its handler has a level of its own


def test_a_warning_shows_once_per_run_on_rank_0_and_library_noise_not_at_all(library_loggers):
    shown: list[str] = []

    def to(message, *_):
        shown.append(str(message))

    def warn_in_every_micro_batch(times: int) -> None:
        for _ in range(times):
            warnings.warn("a user-facing warning", UserWarning, stacklevel=1)
            torch.overrides.is_tensor_method_or_property(torch.Tensor.add)  # clears Python's once-per-place record

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = to  # Python's own rule: the trap
        warn_in_every_micro_batch(3)
        assert shown == ["a user-facing warning"] * 3
        shown.clear()
        warnings.showwarning = WarningsOnce(show=True, to=to)
        warn_in_every_micro_batch(3)
        assert shown == ["a user-facing warning"]
        warnings.showwarning = WarningsOnce(show=False, to=to)  # another rank
        warn_in_every_micro_batch(3)
        assert shown == ["a user-facing warning"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deprecated_collective()
        assert [str(w.message) for w in caught if "reduce_scatter_tensor" in str(w.message)]  # torch does warn
        caught.clear()
        quiet_libraries()
        deprecated_collective()
        assert not caught, [str(w.message) for w in caught]


def test_a_library_log_warning_shows_once_on_rank_0_and_errors_on_every_rank():
    import logging

    def passed(rule: LogRecordsOnce, level: int, text: str) -> bool:
        return rule.filter(logging.LogRecord("DeepSpeed", level, __file__, 1, text, None, None))

    rank0, other = LogRecordsOnce(show=True), LogRecordsOnce(show=False)
    assert passed(rank0, logging.WARNING, "a module has unknown outputs")
    assert not passed(rank0, logging.WARNING, "a module has unknown outputs")
    assert passed(rank0, logging.WARNING, "another one")
    assert not passed(other, logging.WARNING, "a module has unknown outputs")
    assert passed(other, logging.ERROR, "a rank's own failure") and passed(other, logging.ERROR, "a rank's own failure")


def test_each_start_up_phase_prints_its_time_and_a_long_one_a_heartbeat():
    lines: list[str] = []
    phases = Phases(heartbeat=0.05, say=lines.append)
    with phases.phase("engine build"):
        deadline = time.monotonic() + 10
        while sum("still" in line for line in lines) < 2:
            assert time.monotonic() < deadline, lines
            time.sleep(0.01)
    assert lines[:2] == ["start-up  still engine build after " + lines[0].split("after ")[1],
                         "start-up  still engine build after " + lines[1].split("after ")[1]]
    assert lines[-1].startswith("start-up  engine build ") and "since launch)" in lines[-1]
    quiet = Phases(heartbeat=0, say=lines.append)
    lines.clear()
    with quiet.phase("shard hashing"):
        time.sleep(0.1)
    assert len(lines) == 1 and lines[0].startswith("start-up  shard hashing 0.1s")
    lines.clear()
    with pytest.raises(KeyError), quiet.phase("resume"):
        raise KeyError("the error says why")
    assert lines == []  # no time for a phase that failed


def test_a_process_knows_how_long_ago_it_started():
    started = seconds_since_launch()
    assert started is not None and 0 < started < time.monotonic()


@pytest.fixture
def stop_flag():
    stop = StopFlag()
    yield stop
    stop.close()


def wait_for_text(capfd, text: str, timeout: float) -> tuple[str, float]:
    """What fd 1 got, once it holds `text`; and how long that took."""
    started, seen = time.monotonic(), ""
    while text not in seen:
        assert time.monotonic() - started < timeout, seen
        seen += capfd.readouterr().out
        time.sleep(0.01)
    return seen, time.monotonic() - started


def test_a_stop_signal_is_acknowledged_at_once(stop_flag, capfd):
    os.kill(os.getpid(), signal.SIGUSR1)
    seen, _ = wait_for_text(capfd, "SIGUSR1 received", timeout=1.0)
    assert "rank 0: SIGUSR1 received: every rank saves a checkpoint within 2 steps, then exits" in seen
    assert stop_flag.raised


def test_a_stop_signal_is_acknowledged_while_the_training_thread_waits_in_c(stop_flag, capfd):
    """Python runs a signal's handler only once the main thread is back in the interpreter: a rank waiting in a
    collective (C++, the GIL released) would say nothing until it returned. Here the main thread waits on a
    pthread mutex, which no signal interrupts, until the acknowledgement has been seen or 3 s have passed."""
    libc = ctypes.CDLL(None)
    mutex = ctypes.create_string_buffer(64)  # zeroed: PTHREAD_MUTEX_INITIALIZER
    locked, outcome = threading.Event(), {}
    main = threading.main_thread()

    def hold() -> None:
        libc.pthread_mutex_lock(mutex)
        locked.set()
        deadline = time.monotonic() + 3
        while sys._current_frames()[main.ident].f_code.co_name != "wait_in_c":  # the main thread is in the call
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        seen = ""
        while "SIGTERM received" not in seen and time.monotonic() < deadline:
            seen += capfd.readouterr().out
            time.sleep(0.01)
        outcome["seen"] = seen
        libc.pthread_mutex_unlock(mutex)

    def wait_in_c() -> None:
        libc.pthread_mutex_lock(mutex)

    helper = threading.Thread(target=hold)
    helper.start()
    assert locked.wait(5)
    wait_in_c()
    libc.pthread_mutex_unlock(mutex)
    helper.join(5)
    assert "rank 0: SIGTERM received" in outcome["seen"]
    assert stop_flag.raised


def test_the_log_summarises_the_config_as_what_differs_from_the_stage_defaults(tmp_path):
    from pipeline.config import resolve

    config, args = resolve(2, ["--model", "tiny", "--output", str(tmp_path), "--seq-len", "1400", "--train-steps",
                               "20", "--data", "a", "b"])
    lines = config_summary(config, args.model_config, 2, "1 micro-batch(es) of 1 row(s) per step")
    assert lines[0] == (f"Stage 2, 2 ranks, 1 micro-batch(es) of 1 row(s) per step; the whole config: "
                        f"{tmp_path / 'config.yaml'}")
    text = "\n".join(lines)
    for part in ("--seq-len 1400 [4096]", "--train-steps 20 [270000]", "--model tiny", "--data a b"):
        assert part in text, text
    assert "--adam-eps" not in text and "--learning-rate" not in text and "--attention" not in text
    assert len(lines) <= 3 and all(len(line) <= 120 for line in lines[1:])  # the first names a path


def test_the_loss_plot_skips_tasks_a_step_did_not_train(tmp_path):
    from pipeline.plot import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": {"understanding": 2.0, "text": text, "generation": 3.0}})
                            + "\n" for s, text in ((1, None), (2, 1.5), (3, 0.0))))
    curves, _ = read_metrics([path])
    assert curves["text"] == [(2, 1.5)] and len(curves["understanding"]) == 3
