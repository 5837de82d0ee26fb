"""Load, reduced to run in `make test` (`make bench` runs the full 20,000 / 5,000)."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support import load
from tests.support.servers import WEB_TOKEN, start_ca_server


def test_sustained_load_has_no_errors_and_no_leaks(tmp_path: Path) -> None:
    server = start_ca_server(tmp_path)  # the load is one identity on purpose
    try:
        pid = server.process.pid
        files_idle = load.open_files(pid)

        def round_of_load() -> None:
            admitted = load.admissions(server, 300, 64)
            signed = load.certificate_requests(server, WEB_TOKEN, 60, 32)
            assert admitted.errors == [] and signed.errors == []

        for _ in range(2):  # warm-up: imports, caches, allocator pools
            round_of_load()
        rss_warm = load.rss_kib(pid)
        for _ in range(3):
            round_of_load()
        assert load.rss_kib(pid) < rss_warm * 1.10
        # Connections close with their clients, a moment later: a leak would grow with load.
        deadline = time.monotonic() + 10
        while load.open_files(pid) > files_idle + 2:
            assert time.monotonic() < deadline, f"{load.open_files(pid)} > {files_idle} fds"
            time.sleep(0.2)
        assert server.process.poll() is None
    finally:
        server.stop()
