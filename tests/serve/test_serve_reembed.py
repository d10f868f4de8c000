"""Serving through ``ragops index reembed``: no query fails while the collection alias moves.

The query-embedder and retriever deployment classes run in this process without Ray (their
constructors and methods are plain Python; the embedder's ``@serve.batch`` wrapper, which needs
a replica, is stepped over: it only groups queries for ``_encode``), with a client loop
searching while the re-embed builds the new collection and switches to it.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest

from ragops.ingest.pipeline import run_ingest
from ragops.ingest.reembed import rollback, run_reembed
from tests.conftest import SAMPLE_DOCS
from tests.ingest._models import build_sentence_model


@pytest.fixture(scope="module")
def other_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another tiny embedder, 48-dim: a query encoded for one collection cannot search the other."""
    return build_sentence_model(tmp_path_factory.mktemp("serve-reembed-embedder"), 48)


def test_queries_never_fail_while_the_alias_moves(make_settings, tmp_path: Path, other_embedder: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from ragops.serve.embedder import QueryEmbedder
    from ragops.serve.retriever import RetrieverDeployment

    docs = tmp_path / "docs"
    shutil.copytree(SAMPLE_DOCS, docs)
    settings = make_settings()
    assert run_ingest(settings, [str(docs)]).ok
    data = settings.model_dump(mode="json")
    embedder = QueryEmbedder.func_or_class(data)
    retriever = RetrieverDeployment.func_or_class(data)
    embedder.live.ttl_s = retriever._stores.ttl_s = 0.05  # notice the move at once
    done = threading.Event()
    box: dict[str, object] = {}

    def reembed() -> None:
        try:
            box["report"] = run_reembed(settings, str(other_embedder), batch_size=8)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            box["error"] = exc
        finally:
            done.set()

    errors: list[BaseException] = []

    async def client() -> tuple[int, int, set[str | None]]:
        ok = failed = 0
        seen: set[str | None] = set()
        after = 0
        while after < 20 and failed < 20:  # keep searching until well after the switch
            collection = None
            try:
                (encoded,) = await asyncio.to_thread(embedder._encode, ["How do I request a GPU?"])
                result = await retriever.search("How do I request a GPU?", encoded, {"k": 3, "mode": "hybrid"})
                assert result.hits
                ok += 1
                collection = encoded.collection
                seen.add(collection)
            except Exception as exc:  # noqa: BLE001 - the count is the assertion
                failed += 1
                errors.append(exc)
            if done.is_set() and "report" in box and collection == box["report"].target:  # type: ignore[attr-defined]
                after += 1
            elif done.is_set() and "error" in box:
                break
            await asyncio.sleep(0.01)
        return ok, failed, seen

    thread = threading.Thread(target=reembed)
    thread.start()
    try:
        ok, failed, seen = asyncio.run(asyncio.wait_for(client(), timeout=240))
    finally:
        thread.join()
    assert "error" not in box, box.get("error")
    report = box["report"]
    assert report.snapshot_read  # the retriever held the live shard: reembed read a copy
    assert failed == 0 and ok > 20, errors[:3]
    assert seen == {"ragops", report.target}  # type: ignore[attr-defined]
    health = asyncio.run(retriever.health())
    assert health["ok"] and health["collection"] == report.target  # type: ignore[attr-defined]
    # The old collection is closed once no query asked for it for IDLE_CLOSE_S (its Edge lock goes too).
    monkeypatch.setattr("ragops.serve.live.IDLE_CLOSE_S", 0.0)
    (encoded,) = embedder._encode(["GPU"])
    asyncio.run(retriever.search("GPU", encoded, {"k": 1, "mode": "dense"}))
    assert list(retriever._stores._stores) == [report.target]  # type: ignore[attr-defined]

    # Rolling back moves served queries back the same way.
    back = rollback(settings)
    assert back.target == "ragops"

    async def until_back() -> str | None:
        for _ in range(500):
            (encoded,) = await asyncio.to_thread(embedder._encode, ["GPU"])
            result = await retriever.search("GPU", encoded, {"k": 2, "mode": "dense"})
            assert result.hits
            if encoded.collection == "ragops":
                return encoded.collection
            await asyncio.sleep(0.02)
        return None

    assert asyncio.run(until_back()) == "ragops"
    retriever._stores.close()
    embedder.live.close()


@pytest.mark.e2e
def test_served_app_switches_over_http_without_a_failed_request(served, other_embedder: Path) -> None:
    """The real app (Ray Serve, HTTP): searches throughout a re-embed and a rollback all answer 200."""
    import time

    settings = served.settings
    statuses: list[int] = []
    stop = threading.Event()

    def search_forever() -> None:
        with served.client() as c:
            while not stop.is_set():
                r = c.post("/v1/search", json={"query": "What is MIG?", "k": 3, "mode": "hybrid"})
                statuses.append(r.status_code if r.status_code != 200 or r.json()["hits"] else -1)
                time.sleep(0.02)

    def serving() -> str:
        with served.client() as c:
            return c.get("/healthz").json()["vectorstore"]["collection"]

    def wait_for(collection: str) -> None:
        deadline = time.monotonic() + 90
        while serving() != collection:
            assert time.monotonic() < deadline, f"the app never switched to {collection}"
            time.sleep(0.5)

    client = threading.Thread(target=search_forever)
    client.start()
    try:
        report = run_reembed(settings, str(other_embedder), batch_size=32)  # type: ignore[arg-type]
        wait_for(report.target)
        n_switched = len(statuses)
        time.sleep(2)
        assert rollback(settings).target == "ragops"  # type: ignore[arg-type]
        wait_for("ragops")  # the session's app is as the other tests expect it again
        time.sleep(2)
    finally:
        stop.set()
        client.join()
    assert report.snapshot_read  # the retriever replica held the live shard
    assert n_switched > 0 and len(statuses) > n_switched
    assert [s for s in statuses if s != 200] == []
