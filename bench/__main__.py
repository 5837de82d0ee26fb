"""`make bench`: run every bench/bench_*.py module's `main()` and collect their results."""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

import bench


def main() -> None:
    results: dict[str, object] = {}
    for module in sorted(pkgutil.iter_modules(bench.__path__), key=lambda m: m.name):
        if module.name.startswith("bench_"):
            print(f"\n== {module.name}")
            results[module.name] = importlib.import_module(f"bench.{module.name}").main()
    out = Path(__file__).with_name("results.json")
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
