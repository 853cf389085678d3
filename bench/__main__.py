"""Run every benchmark: python -m bench (each prints its figures and ratios to a same-run baseline)."""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ["throughput", "http_throughput", "create_status", "polling", "memory", "fairness", "progress"]


def main() -> int:
    failed = []
    for name in sys.argv[1:] or BENCHMARKS:
        print(f"\n== bench.{name}", flush=True)
        if subprocess.run([sys.executable, "-m", f"bench.{name}"], check=False).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
