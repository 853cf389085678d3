"""The process harness the tests, ./run.sh and the benchmarks share: readiness, failed starts, graceful
stops that end in a kill, a restartable private Redis."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from app.harness import PORTS_FROM, Process, RedisServer, free_ports, start_server, wait_until
from tests.utils import LOG_DIR


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_server_that_exits_before_it_is_ready_fails_its_start_with_its_output() -> None:
    with pytest.raises(RuntimeError, match=r"(?s)broken exited with 3 before it was ready:.*no config here"):
        start_server(python("import sys; print('no config here', flush=True); sys.exit(3)"), name="broken",
                     ready=lambda: False, log_dir=LOG_DIR)


def test_a_server_never_ready_is_killed_at_the_timeout() -> None:
    before = len(Process.started)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="silent to be ready"):
        start_server(python("import time; time.sleep(60)"), name="silent", ready=lambda: False, timeout=0.5,
                     log_dir=LOG_DIR)
    assert time.monotonic() - t0 < 10
    (silent,) = Process.started[before:]
    assert not silent.alive and silent.returncode == -9


def test_stop_is_sigterm_then_sigkill_after_the_grace() -> None:
    polite = Process(python("import time; time.sleep(60)"), name="polite", log_dir=LOG_DIR)
    stubborn = Process(python("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                              "print('ready', flush=True)\ntime.sleep(60)"), name="stubborn", log_dir=LOG_DIR)
    wait_until(lambda: "ready" in stubborn.output(), what="the stubborn one to ignore SIGTERM")
    assert polite.stop(grace=10) == -15  # SIGTERM was enough
    t0 = time.monotonic()
    assert stubborn.stop(grace=0.5) == -9
    assert 0.4 < time.monotonic() - t0 < 5


def test_redis_restarts_on_its_port_with_its_data_and_hands_out_fresh_databases(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", appendonly=True, databases=3, log_dir=LOG_DIR).start()
    try:
        assert [server.fresh_url(), server.fresh_url()] == [server.url_for(1), server.url_for(2)]
        with pytest.raises(RuntimeError, match="all 3 databases"):
            server.fresh_url()
        with server.client(1) as client:
            client.set("kept", "yes")
        port = server.port
        server.kill()
        server.start()
        with server.client(1) as client:
            assert server.port == port and client.get("kept") == b"yes"
    finally:
        server.stop()
    assert server.process is not None and server.process.returncode == 0


def test_free_ports_are_distinct_and_outside_the_range_clients_take_theirs_from() -> None:
    ports = free_ports(20)
    ephemeral = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    assert len(set(ports)) == 20 and all(PORTS_FROM <= p < int(ephemeral[0]) for p in ports), ports
