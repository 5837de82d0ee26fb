"""Issue 8's full-size load: 20,000 AdmissionReviews at concurrency 64 and 5,000 CSRs at
concurrency 32 against one worker, with errors, RSS growth and open files."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.support import load
from tests.support.servers import WEB_TOKEN, start_ca_server


def main() -> dict[str, float | int]:
    with tempfile.TemporaryDirectory() as scratch:
        server = start_ca_server(Path(scratch))
        try:
            pid = server.process.pid
            load.admissions(server, 1000, 64)
            load.certificate_requests(server, WEB_TOKEN, 200, 32)
            rss_before, files_before = load.rss_kib(pid), load.open_files(pid)
            admitted = load.admissions(server, 20_000, 64)
            signed = load.certificate_requests(server, WEB_TOKEN, 5_000, 32)
            result = {
                "admission_errors": len(admitted.errors),
                "admissions_per_second_python_client": round(admitted.per_second),
                "csr_errors": len(signed.errors),
                "csrs_per_second_python_client": round(signed.per_second),
                "rss_growth_ratio": round(load.rss_kib(pid) / rss_before, 3),
                "open_files_before": files_before,
                "open_files_after": load.open_files(pid),
            }
        finally:
            server.stop()
    for key, value in result.items():
        print(f"{key:40} {value}")
    return result


if __name__ == "__main__":
    main()
