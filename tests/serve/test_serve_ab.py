"""Traffic splits on the running app: sticky variants, the variant everywhere, runtime weight changes."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from tests.serve.conftest import Served, chat_body

ROUTE = "abtest"
SPLIT = {"ragops": 0.5, "tiny-lora": 0.5}


def _set(admin: httpx.Client, weights: dict | None, name: str = ROUTE) -> httpx.Response:
    return admin.post("/v1/admin/routes", json={"name": name, "weights": weights})


@pytest.fixture
def admin(served: Served) -> Iterator[httpx.Client]:
    with served.client(served.admin_key) as c:
        yield c
        _set(c, None)  # leave no split behind for the other tests


def _ask(api: httpx.Client, user: str | None, **extra: object) -> httpx.Response:
    body = chat_body(model=ROUTE, max_tokens=2, **({"user": user} if user else {}), **extra)
    return api.post("/v1/chat/completions", json=body)


def _log(served: Served, name: str) -> list[dict]:
    path = served.feedback_dir / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_split_answers_sticky_and_names_the_variant_everywhere(api: httpx.Client, admin: httpx.Client, served: Served) -> None:
    resp = _set(admin, SPLIT)
    assert resp.status_code == 200, resp.text
    assert resp.json()["weights"] == SPLIT and resp.json()["source"] == "registry"
    assert admin.get("/v1/admin/routes").json()["routes"][ROUTE] == SPLIT

    seen = Counter()
    for i in range(12):
        r = _ask(api, f"user-{i}")
        assert r.status_code == 200, r.text
        variant = r.headers["x-ragops-variant"]
        assert r.json()["variant"] == variant and variant in SPLIT
        seen[variant] += 1
        # Sticky: the same user again gets the same variant.
        again = _ask(api, f"user-{i}")
        assert again.headers["x-ragops-variant"] == variant
    assert set(seen) == set(SPLIT), seen  # 12 users, two 50% variants: both answer (p of not = 2 * 0.5^12)

    # The header form of the user id, and the API key when there is no user.
    by_header = {api.post("/v1/chat/completions", json=chat_body(model=ROUTE, max_tokens=2),
                          headers={"x-ragops-user": "hdr-user"}).headers["x-ragops-variant"] for _ in range(3)}  # fmt: skip
    by_key = {_ask(api, None).headers["x-ragops-variant"] for _ in range(3)}
    assert len(by_header) == 1 and len(by_key) == 1

    # Streamed answers carry it in the header and the final chunk.
    with api.stream("POST", "/v1/chat/completions", json=chat_body(model=ROUTE, max_tokens=2, user="user-1", stream=True)) as s:
        variant = s.headers["x-ragops-variant"]
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert [c["variant"] for c in chunks if "variant" in c] == [variant]

    # The request log and the feedback record carry it; so does the feedback metric.
    rid = r.json()["id"]
    logged = [rec for rec in _log(served, "requests.jsonl") if rec["request_id"] == rid]
    assert logged and logged[-1]["variant"] == r.headers["x-ragops-variant"] and logged[-1]["status"] == "ok"
    assert logged[-1]["requested_model"] == ROUTE and logged[-1]["latency_s"] > 0
    fb = api.post("/v1/feedback", json={"request_id": rid, "rating": "up"})
    assert fb.status_code == 200
    stored = [rec for rec in _log(served, "feedback.jsonl") if rec["request_id"] == rid]
    assert stored[-1]["variant"] == r.headers["x-ragops-variant"] and stored[-1]["requested_model"] == ROUTE
    metrics = api.get("/metrics").text
    assert f'ragops_feedback_total{{rating="up",variant="{stored[-1]["variant"]}"}}' in metrics
    assert 'endpoint="/v1/chat/completions",method="POST",status="200",variant="tiny-lora"' in metrics


def test_bad_splits_are_refused_and_change_nothing(api: httpx.Client, admin: httpx.Client) -> None:
    assert _set(admin, SPLIT).status_code == 200
    for weights, message in (({"ragops": 0.5, "no-such-artifact": 0.5}, "unknown variant"),
                             ({"ragops": 0.5, "tiny-lora": 0.4}, "sum to 0.9"),
                             ({"ragops": -1.0, "tiny-lora": 2.0}, "negative")):  # fmt: skip
        resp = _set(admin, weights)
        assert resp.status_code == 400 and message in resp.json()["error"]["message"], resp.text
    assert admin.get("/v1/admin/routes").json()["routes"][ROUTE] == SPLIT
    # A chat key cannot change a split.
    assert _set(api, {"ragops": 1.0}).status_code == 403
    assert admin.get("/v1/admin/routes").json()["routes"][ROUTE] == SPLIT


def test_weight_changes_drop_no_request(api: httpx.Client, admin: httpx.Client, served: Served) -> None:
    assert _set(admin, {"ragops": 1.0}).status_code == 200
    statuses: list[int] = []
    variants: Counter = Counter()
    stop = threading.Event()

    def client() -> None:
        with served.client() as c:
            i = 0
            while not stop.is_set():
                r = _ask(c, f"load-{i % 7}")
                statuses.append(r.status_code)
                variants[r.headers.get("x-ragops-variant")] += 1
                i += 1

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for weights in ({"ragops": 0.5, "tiny-lora": 0.5}, {"tiny-lora": 1.0}, {"ragops": 0.2, "tiny-lora": 0.8}, {"ragops": 1.0}):
            assert _set(admin, weights).status_code == 200
            n = len(statuses)
            while len(statuses) < n + 4:  # a few requests under each split
                stop.wait(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert statuses and set(statuses) == {200}, Counter(statuses)
    assert variants["tiny-lora"] > 0 and variants["ragops"] > 0


def test_serve_split_cli_goes_through_the_admin_endpoint(admin: httpx.Client, served: Served) -> None:
    from ragops.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["serve", "split", ROUTE, "--weights", "ragops=0.7,tiny-lora=0.3", "--url", served.url,
                              "--api-key", served.admin_key, "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["weights"] == {"ragops": 0.7, "tiny-lora": 0.3}
    bad = runner.invoke(app, ["serve", "split", ROUTE, "--weights", "ragops=0.7,ghost=0.3", "--url", served.url,
                              "--api-key", served.admin_key])  # fmt: skip
    assert bad.exit_code != 0 and "unknown variant" in bad.output
    no_key = runner.invoke(app, ["serve", "split", ROUTE, "--weights", "ragops=1", "--url", served.url, "--api-key", served.chat_key])
    assert no_key.exit_code != 0 and "403" in no_key.output
    assert admin.get("/v1/admin/routes").json()["routes"][ROUTE] == {"ragops": 0.7, "tiny-lora": 0.3}
