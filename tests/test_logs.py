"""Logs: JSON lines with context, one per image and per request, never a token or a prompt at INFO."""

from __future__ import annotations

import json
from typing import Any

from app.harness import Stack
from tests.utils import auth, new_user, token, wait_status, wait_until


def _lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.strip():
            out.append(json.loads(line))  # every line is a JSON object
    return out


def test_logs_are_json_with_context_and_keep_secrets_out(stack: Stack) -> None:
    user = new_user()
    secret_prompt = "a very private prompt " + user
    bearer = token(user)
    headers = {"Authorization": f"Bearer {bearer}"}
    with stack.client() as client:
        qid = client.post("/create-queue", headers=headers, json={
            "prompts": [secret_prompt], "count": 3, "width": 64, "height": 64}).json()["queue_id"]
        wait_status(client, headers, qid, {"completed"})
        stream = client.post("/stream-token", headers=auth(user)).json()["token"]
        client.get(f"/queue-events/{qid}", params={"token": stream})

    def image_lines() -> list[dict[str, Any]] | None:
        found = [e for w in stack.workers for e in _lines(w.output()) if e.get("queue_id") == qid and "image" in e]
        return found if len(found) == 3 else None

    per_image = wait_until(image_lines, 10, what="one worker line per image")
    assert sorted(e["image"] for e in per_image) == [0, 1, 2]
    assert all(e["user"] == user and e["worker"] and e["status"] == "succeeded" for e in per_image), per_image

    api = _lines(stack.api.output())
    created = [e for e in api if e.get("queue_id") == qid and "created" in e["msg"]]
    assert created and created[0]["user"] == user and created[0]["images"] == 3
    access = [e for e in api if e.get("path") == f"/queue-status/{qid}"]
    assert access and all(e["http_status"] == 200 and e["method"] == "GET" for e in access)

    everything = stack.api.output() + "".join(w.output() for w in stack.workers)
    assert secret_prompt not in everything
    assert bearer not in everything and stream not in everything
