"""Chaos soak: users submit a few thousand images while workers are killed -9, the API, Redis (AOF) and
the image store are restarted and the provider fails some calls; then every promise is checked.

    python -m bench.chaos            # 5 users, 2,000 images, 3 workers (a few minutes)
    python -m bench.chaos --short    # the same faults on fewer images, under 2 minutes (run by the tests)

Faults: one worker killed -9 every few seconds (and a fresh one started), the API restarted once, Redis
killed -9 and restarted once (appendonly, appendfsync always), the image store (a private SeaweedFS behind
the S3 API) killed -9 and restarted once, and a provider over HTTP that answers 5% of calls 500 and 2% 429.

Checks at the end: every image terminal and the five counts adding up on every queue; no image reported
succeeded twice (one `succeeded` event per image, the global counter equal to the queues' sum, and each
succeeded image produced by the provider, and its bytes served by the API from the image store once its
queue finished); the global counters (in flight, pending per model, per-user
pending and active queues, leases, schedule rings) back to zero; every imagequeue key with a TTL except the
documented globals; and, once the TTLs have run out, no imagequeue key left but the globals and Redis
memory back to its baseline.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx
import redis

from app.harness import start_api, start_worker
from app.services.queue.store import PROVIDER_HEALTH_TTL_SECONDS, worker_key
from bench.common import LOG_DIR, Process, RedisServer, auth, free_port, service_env, wait_until
from tests.provider_servers import ProviderServer
from tests.seaweedfs import SEAWEEDFS_BUCKET, SeaweedServer

MODEL = "chaos"
PRIORITIES = ("high", "normal", "low")
TERMINAL = {"completed", "failed", "cancelled"}
# Keys that live as long as the service (store.lua documents them); everything else under iq: expires.
GLOBAL_KEYS = ("iq:leases", "iq:inflight", "iq:workers", "iq:stats", "iq:seq", "iq:wh:due", "iq:open",
               "iq:open:n", "iq:gc", "iq:store:readers")
GLOBAL_PREFIXES = ("iq:pend:", "iq:s:")
# Small keys with lifetimes of their own: users' indexes (QUEUE_TTL + safety TTL after their last queue),
# idempotency keys, throughput buckets (2 min), provider health (1 h), back-off, worker presence.
OWN_TTL_PREFIXES = ("iq:u:", "iq:idem:", "iq:tp:", "iq:health:", "iq:backoff:", "iq:w:")
IDEMPOTENCY_TTL_SECONDS = 60
# Memory may differ from the baseline by allocator and hash-table noise (RQ's own records are counted apart).
MEMORY_SLACK_BYTES = 1024 * 1024


@dataclass
class Config:
    users: int = 5
    images: int = 2000
    workers: int = 3
    concurrency: int = 8
    kill_every: float = 6.0
    provider_latency: float = 0.05
    rates: dict[str, float] = field(default_factory=lambda: {"500": 0.05, "429": 0.02})
    ttl: int = 10
    safety_ttl: int = 600  # every queue finishes well within it
    submit_seconds: float = 20.0  # queues are created over this long, so restarts meet creates too
    deadline: float = 600.0
    seed: int = 7
    store: str = "s3"  # or "file": bytes in a directory, nothing to restart

    @classmethod
    def short(cls) -> Config:
        return cls(images=400, kill_every=5.0, ttl=15, safety_ttl=300, submit_seconds=8.0, deadline=150.0)


@dataclass
class Result:
    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class Api:
    """The API on a fixed port, so clients keep their address across restarts."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc: Process | None = None

    def start(self) -> None:
        self.proc, _ = start_api(self.env, port=self.port, timeout=60, log_dir=LOG_DIR)

    def restart(self) -> None:
        assert self.proc is not None
        self.proc.stop()
        self.start()


class ImageStore:
    """The soak's image store: a private SeaweedFS (S3) that can be killed -9 and started again with its
    data, or a directory."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.dir = tmp / "images"
        self.seaweed = SeaweedServer(tmp / "seaweedfs") if kind == "s3" else None

    def start(self) -> dict[str, str]:
        """Starts it; returns the settings that point the service at it."""
        if self.seaweed is None:
            return {"IMAGE_STORE": f"file://{self.dir}"}
        self.seaweed.start().create_bucket(SEAWEEDFS_BUCKET)
        return self.seaweed.env("chaos")

    def restart(self) -> str:
        if self.seaweed is None:
            return "image store: a local directory (nothing to restart)"
        self.seaweed.kill()
        time.sleep(1.0)
        self.seaweed.start()
        return "image store: SeaweedFS killed -9 and started again"

    def stop(self) -> None:
        if self.seaweed is not None:
            self.seaweed.kill()


class User(threading.Thread):
    """Creates its queues over `submit_seconds` (retrying through outages with an Idempotency-Key)."""

    def __init__(self, name: str, base: str, redis_url: str, sizes: list[int], config: Config,
                 rng: random.Random) -> None:
        super().__init__(daemon=True, name=name)
        self.user = name
        self.base = base
        self.redis_url = redis_url
        self.sizes = sizes
        self.config = config
        self.rng = rng
        self.queues: dict[str, dict[str, Any]] = {}  # queue id -> {"prompts", "priority"}
        # queue id -> (its status once finished, with images; how often each image was reported succeeded)
        self.final: dict[str, tuple[dict[str, Any], Counter[int]]] = {}
        self.create_retries = 0
        self.bytes_checked = 0
        self.bytes_missing: list[str] = []  # "queue id #index: what the API answered"

    def run(self) -> None:
        headers = auth(self.user)
        gap = self.config.submit_seconds / max(1, len(self.sizes))
        deadline = time.monotonic() + self.config.deadline
        with httpx.Client(base_url=self.base, timeout=10) as client:
            for n, size in enumerate(self.sizes):
                prompts = [f"{self.user} q{n} image {i}" for i in range(size)]
                priority = self.rng.choice(PRIORITIES)
                body = {"prompts": prompts, "width": 64, "height": 64, "priority": priority, "model": MODEL}
                key = uuid.uuid4().hex
                qid = self._create(client, headers, body, key)
                self.queues[qid] = {"prompts": prompts, "priority": priority}
                self._watch(client, headers)
                time.sleep(gap * self.rng.uniform(0.5, 1.5))
            while len(self.final) < len(self.queues) and time.monotonic() < deadline:
                self._watch(client, headers)
                time.sleep(0.3)

    def _watch(self, client: httpx.Client, headers: dict[str, str]) -> None:
        """Takes each finished queue's status and events before its (short) TTL runs out."""
        for qid in [q for q in self.queues if q not in self.final]:
            try:
                r = client.get(f"/queue-status/{qid}", headers=headers)
                if r.status_code != 200 or not r.json().get("finished_at"):
                    continue
                with redis.Redis.from_url(self.redis_url, socket_timeout=5) as conn:
                    events = conn.xrange(f"iq:q:{{{qid}}}:ev")
            except (httpx.HTTPError, redis.RedisError):
                continue
            status = r.json()
            if not self._bytes_served(client, qid, status):
                continue  # the API or the store is away for a moment: looked at again next round
            reported = Counter(d["index"] for d in (json.loads(f[b"d"]) for _, f in events)
                               if d.get("type") == "image" and d.get("status") == "succeeded")
            self.final[qid] = (status, reported)

    def _bytes_served(self, client: httpx.Client, qid: str, status: dict[str, Any]) -> bool:
        """Fetches every succeeded image of a finished queue by its signed URL; False when an answer says
        to come back (a 5xx or no answer), and a 404 or anything not a PNG is noted as missing bytes."""
        checked, missing = 0, []
        for image in status["images"]:
            if image["status"] != "succeeded":
                continue
            try:
                got = client.get(image["url"])
            except httpx.HTTPError:
                return False
            if got.status_code >= 500:
                return False
            if got.status_code != 200 or not got.content.startswith(b"\x89PNG"):
                missing.append(f"{qid} #{image['index']}: {got.status_code} {got.text[:100]!r}")
            checked += 1
        self.bytes_checked += checked
        self.bytes_missing += missing
        return True

    def _create(self, client: httpx.Client, headers: dict[str, str], body: dict[str, Any], key: str) -> str:
        deadline = time.monotonic() + self.config.deadline
        while time.monotonic() < deadline:
            try:
                r = client.post("/create-queue", json=body, headers={**headers, "Idempotency-Key": key})
                if r.status_code == 201:
                    return str(r.json()["queue_id"])
                if r.status_code not in (429, 500, 502, 503):
                    raise RuntimeError(f"create refused: {r.status_code} {r.text[:300]}")
            except httpx.HTTPError:
                pass
            self.create_retries += 1
            time.sleep(0.2)
        raise RuntimeError("could not create a queue before the deadline")


class Chaos(threading.Thread):
    """Kills a worker every `kill_every` seconds; restarts the API, Redis and the image store once each."""

    def __init__(self, config: Config, env: dict[str, str], workers: list[Process], api: Api, server: RedisServer,
                 store: ImageStore, rng: random.Random) -> None:
        super().__init__(daemon=True, name="chaos")
        self.config, self.env, self.workers, self.api, self.server, self.rng = config, env, workers, api, server, rng
        self.store = store
        self.stop = threading.Event()
        self.log: list[str] = []
        self.kills = 0
        self._t0 = time.monotonic()
        self._serial = len(workers)

    def _note(self, what: str) -> None:
        line = f"{time.monotonic() - self._t0:6.1f}s  {what}"
        self.log.append(line)
        print("  chaos:", line, flush=True)

    def run(self) -> None:
        once = {
            self.config.submit_seconds * 0.4: ("API", self.api.restart),
            self.config.submit_seconds * 0.8: ("Redis", self._restart_redis),
            self.config.submit_seconds * 1.1: ("image store", lambda: self._note(self.store.restart())),
        }
        next_kill = self.config.kill_every
        while not self.stop.wait(0.1):
            elapsed = time.monotonic() - self._t0
            for at, (what, action) in list(once.items()):
                if elapsed >= at:
                    del once[at]
                    self._note(f"restarting {what}")
                    action()
                    self._note(f"{what} back")
            if elapsed >= next_kill and self._replacement_up():
                next_kill = elapsed + self.config.kill_every
                victim = self.rng.randrange(len(self.workers))
                self.workers[victim].kill()
                self.kills += 1
                self._serial += 1
                self.workers[victim] = start_worker(self.env, f"--concurrency={self.config.concurrency}",
                                                    name=f"chaos-{self._serial}", log_dir=LOG_DIR)
                self._note(f"killed -9 a worker, started chaos-{self._serial}")

    def _replacement_up(self) -> bool:
        """The worker started after the last kill has registered: kills never outpace start-ups (a fresh
        worker needs seconds to start on a loaded machine), so there are always workers to do the work."""
        try:
            with redis.Redis(port=self.server.port, socket_timeout=2) as r:
                return bool(r.exists(worker_key(f"chaos-{self._serial}"))) or self.kills == 0
        except redis.RedisError:
            return False

    def _restart_redis(self) -> None:
        self.server.kill()
        time.sleep(1.0)
        self.server.start()


def _scan(r: redis.Redis) -> list[str]:
    return [k.decode() for k in r.scan_iter(count=1000)]


def _is_global(key: str) -> bool:
    return key in GLOBAL_KEYS or key.startswith(GLOBAL_PREFIXES) or key.startswith("rq:")


def _iq_bytes(r: redis.Redis) -> int:
    return sum(int(r.memory_usage(k) or 0) for k in _scan(r) if k.startswith("iq:"))


def check(users: list[User], provider: ProviderServer, r: redis.Redis, result: Result) -> None:
    problems, figures = result.problems, result.figures
    succeeded_prompts: set[str] = set()
    counts = Counter[str]()
    for user in users:
        for qid, spec in user.queues.items():
            if qid not in user.final:
                problems.append(f"queue {qid} was never seen finished")
                continue
            status, reported = user.final[qid]
            parts = sum(status[k] for k in ("pending", "running", "succeeded", "failed", "cancelled"))
            if status["status"] not in TERMINAL or parts != status["total"] or status["total"] != len(spec["prompts"]):
                problems.append(f"queue {qid}: {status['status']}, counts {parts}/{status['total']}")
            for k in ("succeeded", "failed", "cancelled", "pending", "running"):
                counts[k] += status[k]
            for image in status["images"]:
                if image["status"] == "succeeded":
                    succeeded_prompts.add(image["prompt"])
                elif image["status"] == "failed":
                    counts["failed: " + (image["error"] or "")[:80]] += 1
            # One succeeded event per succeeded image: none reported twice.
            twice = [i for i, n in reported.items() if n > 1]
            if twice:
                problems.append(f"queue {qid}: images reported succeeded twice: {twice}")
            if sum(reported.values()) != status["succeeded"]:
                problems.append(f"queue {qid}: {sum(reported.values())} succeeded events, "
                                f"{status['succeeded']} succeeded")
    total = sum(len(u.queues[q]["prompts"]) for u in users for q in u.queues)
    figures.update(images=total, queues=sum(len(u.queues) for u in users), **{k: v for k, v in counts.items()})
    lost = total - counts["succeeded"] - counts["failed"] - counts["cancelled"]
    figures["lost"] = lost
    if lost:
        problems.append(f"{lost} image(s) not terminal")
    # The provider's call log against the results.
    ok_calls = Counter(c["json"]["prompt"] for c in list(provider.requests) if c.get("step") == "ok")
    figures["provider_calls"] = len(provider.requests)
    figures["provider_faults"] = sum(1 for c in list(provider.requests) if c.get("step") != "ok")
    figures["generated_twice"] = sum(1 for n in ok_calls.values() if n > 1)  # at-least-once execution
    figures["image_bytes_checked"] = sum(u.bytes_checked for u in users)
    missing = [m for u in users for m in u.bytes_missing]
    figures["image_bytes_missing"] = len(missing)
    if missing:
        problems.append(f"succeeded images whose bytes the API could not serve: {missing[:10]}")
    never_generated = succeeded_prompts - set(ok_calls)
    if never_generated:
        problems.append(f"{len(never_generated)} succeeded image(s) the provider never made")
    stats = {k.decode(): int(v) for k, v in r.hgetall("iq:stats").items()}
    figures["stats_succeeded"] = stats.get("succeeded", 0)
    if stats.get("succeeded", 0) != counts["succeeded"]:
        problems.append(f"global succeeded counter {stats.get('succeeded', 0)} != {counts['succeeded']} in queues")
    # Global counters back to zero.
    leaks = {}
    for key in ("iq:inflight", f"iq:pend:{MODEL}"):
        leaks.update({f"{key}[{k.decode()}]": int(v) for k, v in r.hgetall(key).items() if int(v) != 0})
    for key in _scan(r):
        if key.startswith("iq:u:") and key.endswith(":stats"):
            leaks.update({f"{key}[{k.decode()}]": int(v) for k, v in r.hgetall(key).items() if int(v) != 0})
        if key.startswith("iq:u:") and key.endswith(":active") and r.zcard(key):
            leaks[key] = int(r.zcard(key))
        if key.startswith("iq:s:") and r.zcard(key):
            leaks[key] = int(r.zcard(key))
    if r.zcard("iq:leases"):
        leaks["iq:leases"] = int(r.zcard("iq:leases"))
    figures["leaked_counters"] = len(leaks)
    if leaks:
        problems.append(f"counters not back to zero: {leaks}")
    # Every key has a TTL except the documented globals.
    no_ttl = [k for k in _scan(r) if not _is_global(k) and r.ttl(k) == -1]
    figures["keys_without_ttl"] = len(no_ttl)
    if no_ttl:
        problems.append(f"keys without a TTL: {no_ttl[:20]}")


def run(config: Config) -> Result:
    result = Result()
    rng = random.Random(config.seed)
    started = time.monotonic()
    with TemporaryDirectory() as tmp, ProviderServer("openai", latency=config.provider_latency,
                                                     fault_rates=config.rates, seed=config.seed) as provider:
        server = RedisServer(Path(tmp) / "redis", appendonly=True, log_dir=LOG_DIR).start()
        store = ImageStore(config.store, Path(tmp))
        env = service_env(server.url, IMAGE_PROVIDER="openai", IMAGE_PROVIDER_URL=provider.url, IMAGE_MODEL=MODEL,
                          QUEUE_TTL_SECONDS=config.ttl, QUEUE_SAFETY_TTL_SECONDS=config.safety_ttl,
                          MAX_IMAGE_ATTEMPTS=20, LOG_LEVEL="WARNING", PROVIDER_MAX_RETRIES=8,
                          IDEMPOTENCY_TTL_SECONDS=IDEMPOTENCY_TTL_SECONDS, **store.start())
        api = Api(env)
        workers: list[Process] = []
        chaos: Chaos | None = None
        try:
            api.start()
            workers = [start_worker(env, f"--concurrency={config.concurrency}", name=f"chaos-{i}", log_dir=LOG_DIR)
                       for i in range(config.workers)]
            r = server.client()
            wait_until(lambda: httpx.get(api.base + "/health").json().get("workers") == config.workers, 60,
                       what="workers")
            baseline_info = r.info("memory")
            baseline_memory = int(baseline_info["used_memory"])
            baseline_dataset = int(baseline_info["used_memory_dataset"])
            baseline_rq = sum(int(r.memory_usage(k) or 0) for k in _scan(r) if k.startswith("rq:"))
            baseline_iq = _iq_bytes(r)
            sizes_per_user = _split(config.images, config.users, rng)
            users = [User(f"chaos-user-{u}", api.base, server.url, sizes, config, rng)
                     for u, sizes in enumerate(sizes_per_user)]
            load_started = time.monotonic()
            for user in users:
                user.start()
            chaos = Chaos(config, env, workers, api, server, store, rng)
            chaos.start()
            for user in users:
                user.join(config.deadline + 30)
            chaos.stop.set()
            chaos.join(60)
            load_seconds = time.monotonic() - load_started
            r = server.client()  # Redis was restarted: a fresh connection
            check(users, provider, r, result)
            result.figures.update(
                load_seconds=round(load_seconds, 1),
                images_per_second=round(result.figures["images"] / load_seconds, 1),
                worker_kills=chaos.kills,
                create_retries=sum(u.create_retries for u in users),
                restarts=[line for line in chaos.log if "restarting" in line],
            )
            # After the queue TTL nothing of the queues is left and memory is back to its baseline, but for
            # small keys with lifetimes of their own (OWN_TTL_PREFIXES).
            for w in workers:
                w.stop()
            try:
                wait_until(lambda: not [k for k in _scan(r) if k.startswith("iq:q:")], config.ttl + 30, 0.5,
                           what="queue keys to expire")
            except (AssertionError, TimeoutError) as exc:
                result.problems.append(str(exc))
            _settle_expiry(r)
            left = [k for k in _scan(r) if k.startswith("iq:") and not _is_global(k)]
            user_keys = [k for k in left if k.startswith(OWN_TTL_PREFIXES)]
            user_bytes = sum(int(r.memory_usage(k) or 0) for k in user_keys)
            longest = max((int(r.ttl(k)) for k in user_keys), default=0)
            info = r.info("memory")
            memory = int(info["used_memory"])
            rq_bytes = sum(int(r.memory_usage(k) or 0) for k in _scan(r) if k.startswith("rq:"))
            result.figures.update(baseline_memory=baseline_memory, memory_after_ttl=memory,
                                  dataset_before=baseline_dataset, dataset_after_ttl=int(info["used_memory_dataset"]),
                                  rq_bytes_before=baseline_rq, rq_bytes_after_ttl=rq_bytes,
                                  own_ttl_key_bytes=user_bytes, own_ttl_keys_longest_ttl=longest,
                                  iq_bytes_before=baseline_iq, iq_bytes_after_ttl=_iq_bytes(r))
            others = [k for k in left if k not in user_keys]
            if others:
                result.problems.append(f"keys left after the TTL: {others[:20]}")
            if longest > max(config.ttl + config.safety_ttl, IDEMPOTENCY_TTL_SECONDS, PROVIDER_HEALTH_TTL_SECONDS):
                result.problems.append(f"a key lives {longest} s more, past its documented lifetime")
            allowed = baseline_memory + user_bytes + max(0, rq_bytes - baseline_rq) + MEMORY_SLACK_BYTES
            if memory > allowed:
                result.problems.append(f"memory {memory} B after the TTL, baseline {baseline_memory} B "
                                       f"+ {user_bytes} B of keys with their own TTL + RQ's")
        finally:
            if chaos is not None:
                chaos.stop.set()
            for w in workers:
                w.kill()
            if api.proc is not None:
                api.proc.kill()
            server.kill()
            store.stop()
    result.figures["total_seconds"] = round(time.monotonic() - started, 1)
    return result


def _settle_expiry(r: redis.Redis) -> None:
    """Expired keys go at once (a scan touches each), and the allocator's figures settle."""
    _scan(r)
    time.sleep(0.5)


def _split(images: int, users: int, rng: random.Random) -> list[list[int]]:
    """Queue sizes per user: mixed sizes (1-60 images) adding up to `images` in all."""
    out: list[list[int]] = [[] for _ in range(users)]
    left = images
    turn = 0
    while left > 0:
        size = min(left, rng.choice((1, 2, 5, 10, 20, 40, 60)))
        out[turn % users].append(size)
        left -= size
        turn += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--short", action="store_true", help="fewer images, under 2 minutes")
    parser.add_argument("--store", choices=("s3", "file"), default="s3",
                        help="s3: a private SeaweedFS, restarted mid-soak (default); file: a directory")
    args = parser.parse_args(argv)
    config = Config.short() if args.short else Config()
    config.store = args.store
    print(f"chaos soak: {config.users} users, {config.images} images, {config.workers} workers x "
          f"{config.concurrency}, a worker killed -9 every {config.kill_every} s, provider faults {config.rates}, "
          f"image store {config.store}",
          flush=True)
    result = run(config)
    for name, value in result.figures.items():
        print(f"  {name:<24} {value}")
    for problem in result.problems:
        print(f"  PROBLEM: {problem}")
    print("chaos soak:", "OK" if result.ok else "FAILED", flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
