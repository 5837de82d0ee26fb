"""`serve --workers N`: N forked processes answering on one listening socket.

One Python process uses one core; the webhook and the CA are CPU-bound. The parent binds the
socket and loads everything once, then forks the workers (sharing the loaded code and CA
copy-on-write); each worker runs its own event loop and accepts from the shared socket. The
parent only supervises: a worker that dies is replaced, and SIGTERM or SIGINT is passed on to
every worker, which drains and exits; then the parent exits 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

log = logging.getLogger("injector.workers")

# After SIGTERM a worker drains for up to uvicorn's graceful timeout (20 s); past this it is
# killed.
STOP_TIMEOUT_SECONDS = 30.0
RESTART_DELAY_SECONDS = 1.0
# A worker that dies within this of its start is failing, not unlucky: each such death in a
# row doubles its restart delay, up to the cap (a crash loop must not spin the node's CPU).
QUICK_DEATH_SECONDS = 10.0
MAX_RESTART_DELAY_SECONDS = 30.0
_POLL_SECONDS = 0.05
_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """Fork `count` workers, each running `work(index)` (its exit code); keep them running
    until told to stop."""

    def __init__(self, count: int, work: Callable[[int], int], *,
                 on_exit: Callable[[int], None] = lambda pid: None,
                 restart_delay_seconds: float = RESTART_DELAY_SECONDS,
                 stop_timeout_seconds: float = STOP_TIMEOUT_SECONDS) -> None:
        self._count = count
        self._work = work
        self._on_exit = on_exit
        self._restart_delay = restart_delay_seconds
        self._stop_timeout = stop_timeout_seconds
        self._children: dict[int, int] = {}  # pid -> worker index
        self._started_at: dict[int, float] = {}  # worker index -> monotonic time
        self._quick_deaths: dict[int, int] = {}  # worker index -> in a row
        self._parent = os.getpid()
        self._stop_requested_at: float | None = None

    def _spawn(self, index: int) -> None:
        # Whatever sits in the parent's stdio buffers would otherwise be written twice.
        sys.stdout.flush()
        sys.stderr.flush()
        # Blocked across the fork: a child must not run the parent's handler (and stop its
        # siblings) before it has its own.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid:
            self._children[pid] = index
            self._started_at[index] = time.monotonic()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            return
        code = 1
        try:
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            _stop_with_parent(self._parent)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            code = self._work(index)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            log.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            os._exit(code)

    def _restart_delay_for(self, index: int) -> float:
        lived = time.monotonic() - self._started_at[index]
        deaths = self._quick_deaths.get(index, 0) + 1 if lived < QUICK_DEATH_SECONDS else 0
        self._quick_deaths[index] = deaths
        return min(self._restart_delay * 2.0 ** max(deaths - 1, 0), MAX_RESTART_DELAY_SECONDS)

    def _request_stop(self, signum: int, frame: object) -> None:
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
            log.info("stopping %d workers (%s)", len(self._children),
                     signal.Signals(signum).name)
        for pid in self._children:
            _signal(pid, signal.SIGTERM)

    def run(self) -> int:
        """0 once every worker has stopped after a stop request with status 0, else 1."""
        previous = {signum: signal.signal(signum, self._request_stop)
                    for signum in _STOP_SIGNALS}
        clean = True
        restart_at: dict[int, float] = {}  # worker index -> when
        try:
            for index in range(self._count):
                self._spawn(index)
            log.info("started %d workers: pids %s", self._count,
                     " ".join(str(pid) for pid in self._children))
            while self._children or (restart_at and self._stop_requested_at is None):
                for pid, status in _reap():
                    index = self._children.pop(pid)
                    self._on_exit(pid)
                    if self._stop_requested_at is not None:
                        clean = clean and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
                        continue
                    delay = self._restart_delay_for(index)
                    log.warning("worker %d (pid %d) %s; restarting it in %.1f s", index, pid,
                                _describe(status), delay)
                    restart_at[index] = time.monotonic() + delay
                now = time.monotonic()
                if self._stop_requested_at is None:
                    for index, when in list(restart_at.items()):
                        if when <= now:
                            del restart_at[index]
                            self._spawn(index)
                            log.info("worker %d restarted", index)
                elif now - self._stop_requested_at > self._stop_timeout:
                    for pid in self._children:
                        _signal(pid, signal.SIGKILL)
                    clean = False
                time.sleep(_POLL_SECONDS)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 0 if clean else 1


def _stop_with_parent(parent: int) -> None:
    """SIGTERM this worker when the supervisor dies, however it dies (SIGKILL, the OOM
    killer): an orphaned worker would go on serving with nobody to stop it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:  # it died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _reap() -> list[tuple[int, int]]:
    """(pid, wait status) of every child that has exited, without blocking."""
    exited: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return exited
        if pid == 0:
            return exited
        exited.append((pid, status))


def _signal(pid: int, signum: int) -> None:
    # Not yet reaped, so the pid cannot have been reused; it may have exited already.
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)
