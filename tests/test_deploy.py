"""Deployment files: linted and validated offline, entry commands identical to the README's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from app.harness import ROOT, api_command, worker_command
from tests.utils import require_tool

API_COMMAND = "uvicorn app.main:app --host 0.0.0.0 --port 8000"
WORKER_COMMAND = "python worker.py --concurrency="


def cmd(dockerfile: str) -> str:
    text = (ROOT / dockerfile).read_text()
    (line,) = [ln for ln in text.splitlines() if ln.startswith("CMD ")]
    return " ".join(json.loads(line[4:]))


def test_dockerfiles_lint_and_compose_validates() -> None:
    require_tool(shutil.which("docker-compose") is not None, "docker-compose is not installed "
                 "(scripts/install-test-tools.sh installs it as root): COMPOSE FILE NOT VALIDATED")
    result = subprocess.run(["bash", "scripts/check-deploy.sh"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "docker-compose.yml: valid" in result.stdout


def test_images_run_the_commands_the_readme_documents() -> None:
    readme = (ROOT / "README.md").read_text()
    api = cmd("Dockerfile")
    assert api.startswith(API_COMMAND), api
    assert API_COMMAND in readme
    worker = cmd("Dockerfile.worker")
    assert "exec python worker.py --concurrency=" in worker, worker
    assert WORKER_COMMAND in readme
    # ./run.sh, the tests and the benchmarks start the same commands (app.harness).
    assert " ".join(api_command(8000, "0.0.0.0")[2:]) == api
    local_worker = worker_command("--concurrency=8")
    assert Path(local_worker[1]) == ROOT / "worker.py" and local_worker[2:] == ["--concurrency=8"]


def test_env_example_covers_compose_and_no_secret_is_baked_in() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    example = (ROOT / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z_]+)=", example, re.MULTILINE))
    referenced = set(re.findall(r"\$\{([A-Z_]+)", compose))
    assert referenced <= documented, referenced - documented
    assert re.search(r"^JWT_SECRET=$", example, re.MULTILINE), "the example must not ship a usable secret"
    for dockerfile in ("Dockerfile", "Dockerfile.worker"):
        for line in (ROOT / dockerfile).read_text().splitlines():
            if line.startswith(("ENV", "ARG")):
                assert not re.search(r"SECRET|PASSWORD|API_KEY|TOKEN", line), line
        assert "USER 10001" in (ROOT / dockerfile).read_text()
