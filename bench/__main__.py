"""`make bench`: run every bench/bench_*.py module's `main()` and collect their results.

`python -m bench bench_http bench_cluster` runs only the modules named; their results replace
those modules' entries in bench/results.json and the others' stay, so one benchmark can be
rerun on a quiet machine without rerunning all. Each entry records when and at which commit it
was measured.
"""

from __future__ import annotations

import datetime
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import bench

RESULTS = Path(__file__).with_name("results.json")


def _commit() -> str:
    done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                          text=True, cwd=RESULTS.parent, check=False)
    return done.stdout.strip() or "unknown"


def main(names: list[str]) -> int:
    available = sorted(m.name for m in pkgutil.iter_modules(bench.__path__)
                       if m.name.startswith("bench_"))
    unknown = [name for name in names if name not in available]
    if unknown:
        print(f"bench: no benchmark {', '.join(unknown)}; there are: {', '.join(available)}",
              file=sys.stderr)
        return 2
    results: dict[str, object] = {}
    if names and RESULTS.exists():
        results = json.loads(RESULTS.read_text())
    measured = {"commit": _commit(),
                "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    for name in names or available:
        print(f"\n== {name}")
        result = importlib.import_module(f"bench.{name}").main()
        results[name] = {"measured": measured, **result} if isinstance(result, dict) else result
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
