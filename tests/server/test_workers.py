"""The supervisor of `serve --workers N`, with workers that only report and wait."""

import itertools
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.eventually import eventually
from tests.support.servers import child_pids, process_state

# A supervisor whose workers write `<index>-<pid>` into the directory, then wait for SIGTERM
# (exit 0), or ignore it with IGNORE_TERM.
SUPERVISOR = textwrap.dedent("""
    import logging, os, signal, sys, time
    from pathlib import Path
    from injector.server.workers import Supervisor

    logging.basicConfig(level=logging.INFO)
    directory = Path(sys.argv[1])

    def work(index):
        if os.environ.get("CRASH"):
            (directory / f"{index}-{os.getpid()}").touch()
            return 3
        if os.environ.get("IGNORE_TERM"):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        (directory / f"{index}-{os.getpid()}").touch()
        while True:
            time.sleep(1)

    sys.exit(Supervisor(int(sys.argv[2]), work, restart_delay_seconds=0.2,
                        stop_timeout_seconds=float(sys.argv[3])).run())
""")


def workers(directory: Path) -> dict[int, list[int]]:
    """Worker index -> the pids that ran it, in start order."""
    started: dict[int, list[tuple[float, int]]] = {}
    for path in directory.iterdir():
        index, pid = path.name.split("-")
        started.setdefault(int(index), []).append((path.stat().st_mtime, int(pid)))
    return {index: [pid for _, pid in sorted(runs)] for index, runs in started.items()}


def alive(pid: int) -> bool:
    state = process_state(pid)
    return state is not None and state[0] != "Z"


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def run(count: int, stop_timeout: float = 10, env: dict[str, str] | None = None
            ) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR, str(tmp_path), str(count), str(stop_timeout)],
            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        started.append(process)
        eventually(lambda: len(workers(tmp_path)) == count, 10, what=f"{count} workers started")
        return process

    yield run
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_every_worker_runs_in_its_own_process(
        start: Callable[..., subprocess.Popen[bytes]], tmp_path: Path) -> None:
    supervisor = start(3)
    running = workers(tmp_path)
    assert sorted(running) == [0, 1, 2]
    pids = [runs[0] for runs in running.values()]
    assert sorted(pids) == child_pids(supervisor.pid)  # three, and the supervisor's own


def test_a_dead_worker_is_replaced(
        start: Callable[..., subprocess.Popen[bytes]], tmp_path: Path) -> None:
    supervisor = start(2)
    victim = workers(tmp_path)[1][0]
    os.kill(victim, signal.SIGKILL)
    eventually(lambda: len(workers(tmp_path)[1]) == 2, 10, what="worker 1 restarted")
    assert workers(tmp_path)[1][1] != victim
    assert len(workers(tmp_path)[0]) == 1  # the other one was left alone
    assert supervisor.poll() is None


def test_sigterm_stops_every_worker_and_exits_0(
        start: Callable[..., subprocess.Popen[bytes]], tmp_path: Path) -> None:
    supervisor = start(2)
    pids = [runs[0] for runs in workers(tmp_path).values()]
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=10) == 0
    assert not any(alive(pid) for pid in pids)
    assert b"stopping 2 workers (SIGTERM)" in supervisor.stdout.read()  # type: ignore[union-attr]


def test_a_worker_that_does_not_stop_is_killed_and_the_exit_is_not_clean(
        start: Callable[..., subprocess.Popen[bytes]], tmp_path: Path) -> None:
    supervisor = start(2, stop_timeout=1, env={"IGNORE_TERM": "1"})
    pids = [runs[0] for runs in workers(tmp_path).values()]
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=10) == 1
    assert not any(alive(pid) for pid in pids)


def test_workers_stop_when_the_supervisor_is_killed(
        start: Callable[..., subprocess.Popen[bytes]], tmp_path: Path) -> None:
    supervisor = start(2)
    pids = [runs[0] for runs in workers(tmp_path).values()]
    supervisor.kill()
    supervisor.wait()
    eventually(lambda: not any(alive(pid) for pid in pids), 10, what="workers stopped")


def test_a_worker_that_keeps_dying_at_start_is_restarted_ever_more_slowly(
        start: Callable[..., subprocess.Popen[bytes]], tmp_path: Path) -> None:
    supervisor = start(1, env={"CRASH": "1"})
    eventually(lambda: len(workers(tmp_path)[0]) >= 4, 10, what="four starts of worker 0")
    supervisor.send_signal(signal.SIGTERM)
    supervisor.wait(timeout=10)
    starts = sorted(path.stat().st_mtime for path in tmp_path.iterdir())[:4]
    gaps = [later - earlier for earlier, later in itertools.pairwise(starts)]
    # 0.2 s, then doubling: never sooner (later is possible on a busy machine).
    assert all(round(gap, 1) >= minimum
               for gap, minimum in zip(gaps, (0.2, 0.4, 0.8), strict=True)), gaps
    output = supervisor.stdout.read().decode()  # type: ignore[union-attr]
    assert "exited with status 3; restarting it in 0.4 s" in output
