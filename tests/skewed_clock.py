"""Runs worker.py under libfaketime with only the wall clock faked: python tests/skewed_clock.py [worker args].

libfaketime 0.9.10 fails `clock_nanosleep` with EINVAL when the monotonic clock is left alone
(FAKETIME_DONT_FAKE_MONOTONIC=1), which Python's `time.sleep` uses; sleeping through `select` keeps
every relative wait exact and leaves the worker's code as it is.
"""

from __future__ import annotations

import runpy
import select
import sys
import time
from pathlib import Path


def _sleep(seconds: float) -> None:
    select.select([], [], [], seconds)


time.sleep = _sleep
sys.argv = ["worker.py", *sys.argv[1:]]
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
runpy.run_path(sys.argv[0], run_name="__main__")
