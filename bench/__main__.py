"""Run every benchmark: python -m bench (each prints its figures and ratios to a same-run baseline).

python -m bench [NAME ...] runs only those; the machine's load average is printed before and after
each, since every figure shares the machine with whatever else runs on it.
"""

from __future__ import annotations

import os
import subprocess
import sys

# (module, arguments): the whole set takes a few minutes.
BENCHMARKS: list[tuple[str, list[str]]] = [
    ("throughput", []),
    ("http_throughput", ["--rounds", "5"]),
    ("http_throughput", ["--photo", "--size", "1024", "--concurrency", "8", "--images", "300", "--rounds", "5"]),
    ("create_status", []),
    ("polling", []),
    ("memory", []),
    ("fairness", []),
    ("progress", []),
]


def load_average() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> int:
    chosen = [(name, []) for name in sys.argv[1:]] or BENCHMARKS
    failed = []
    for name, args in chosen:
        print(f"\n== bench.{name} {' '.join(args)}".rstrip() + f"   ({load_average()})", flush=True)
        if subprocess.run([sys.executable, "-m", f"bench.{name}", *args], check=False).returncode != 0:
            failed.append(name)
        print(f"   ({load_average()} after bench.{name})", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
