"""The chaos soak's short form: workers killed -9, API, Redis (AOF) and image store (SeaweedFS over S3)
restarted, a provider failing 7% of calls, and afterwards nothing lost, nothing counted twice, no counter
leaked, every succeeded image's bytes served (bench/chaos.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app.harness import ROOT


@pytest.mark.timeout(300)
def test_chaos_soak_short_form_loses_nothing() -> None:
    run = subprocess.run([sys.executable, "-m", "bench.chaos", "--short"], cwd=ROOT, capture_output=True,
                         text=True, timeout=280)
    output = run.stdout + run.stderr[-5000:]
    figures = dict(line.split(None, 1) for line in run.stdout.splitlines() if line.startswith("  ") and
                   not line.strip().startswith(("chaos:", "PROBLEM")) and len(line.split(None, 1)) == 2)
    assert run.returncode == 0, output
    assert figures["lost"] == "0" and figures["leaked_counters"] == "0" and figures["keys_without_ttl"] == "0", output
    assert int(figures["worker_kills"]) >= 1 and int(figures["provider_faults"]) >= 1, output
    assert figures["succeeded"] == figures["stats_succeeded"], output  # none counted twice
    assert figures["image_bytes_missing"] == "0" and figures["image_bytes_checked"] == figures["succeeded"], output
    assert "SeaweedFS killed -9 and started again" in output, output
