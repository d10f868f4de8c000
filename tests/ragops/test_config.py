"""Settings: precedence, strictness, shipped presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragops.config import PRESETS_DIR, Settings, load_settings, read_yaml
from ragops.errors import ConfigError

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_defaults_are_embedded() -> None:
    s = load_settings(environ={})
    assert s.vectorstore.backend == "edge"
    assert s.embedder.model == "minilm-l6"
    assert s.data_dir == Path(".ragops")


def test_precedence_file_env_set_data_dir(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("embedder:\n  batch_size: 8\nretrieval:\n  k: 3\ningest:\n  embed_actors: 2\n")
    env = {"RAGOPS_EMBEDDER__BATCH_SIZE": "16", "RAGOPS_RETRIEVAL__K": "4", "RAGOPS_HOME": str(tmp_path / "h")}
    s = load_settings([f], ["retrieval.k=5"], environ=env)
    assert s.embedder.batch_size == 16  # env beats file
    assert s.retrieval.k == 5  # --set beats env
    assert s.ingest.embed_actors == 2  # file beats default
    assert s.data_dir == tmp_path / "h"  # RAGOPS_HOME
    s2 = load_settings([f], [], data_dir=tmp_path / "d", environ=env)
    assert s2.data_dir == tmp_path / "d"  # --data-dir beats RAGOPS_HOME


def test_unrelated_env_vars_are_ignored() -> None:
    s = load_settings(environ={"RAGOPS_API_KEYS": "secret", "RAGOPS_SOMETHING": "x"})
    assert s == Settings()


def test_unknown_key_names_key_and_allowed() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings([], ["embedder.batch_sise=3"], environ={})
    msg = str(exc.value)
    assert "embedder.batch_sise" in msg and "batch_size" in msg and "--set" in msg


def test_unknown_key_in_env_names_origin() -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(environ={"RAGOPS_RETRIEVAL__KK": "3"})
    assert "RAGOPS_RETRIEVAL__KK" in str(exc.value)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("retrieval.mode=fancy", "retrieval.mode"),
        ("ingest.chunker.chunk_tokens=abc", "chunk_tokens"),
        ("ingest.chunker.overlap_tokens=500", "overlap_tokens"),
        ("vectorstore.backend=qdrant", "vectorstore.url"),
        ("nonsense", "dotted.key=value"),
    ],
)
def test_bad_values_are_one_clear_error(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings([], [override], environ={})
    assert needle in str(exc.value)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("embedder: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings([bad], environ={})
    with pytest.raises(ConfigError, match="not found"):
        load_settings([tmp_path / "missing.yaml"], environ={})


def test_multi_node_with_embedded_store_is_refused() -> None:
    with pytest.raises(ConfigError, match="Qdrant server"):
        load_settings([], ["ray.nodes=3"], environ={})


def test_preset_by_name() -> None:
    s = load_settings(["bge"], environ={})
    assert s.embedder.model == "bge-small-en-v1.5"
    assert s.embedder.query_instruction.startswith("Represent this sentence")


@pytest.mark.parametrize("path", sorted(REPO_CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_yaml_validates(path: Path) -> None:
    data = read_yaml(path)
    if data.get("kind") or data.get("apiVersion"):
        pytest.skip("Kubernetes manifest, validated against the KubeRay CRDs elsewhere")
    Settings.model_validate(data)


def test_presets_dir_is_the_repo_configs() -> None:
    assert PRESETS_DIR.resolve() == REPO_CONFIGS.resolve()


def test_fingerprint_changes_with_settings() -> None:
    a = load_settings(environ={})
    b = load_settings([], ["ingest.chunker.chunk_tokens=300"], environ={})
    assert a.fingerprint("ingest") != b.fingerprint("ingest")
    assert a.fingerprint("embedder") == b.fingerprint("embedder")


def test_default_yaml_spells_out_every_default() -> None:
    """configs/default.yaml is the defaults, complete and current (regenerate: see message)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("write_default_config", REPO_CONFIGS.parent / "scripts" / "write_default_config.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shipped = (REPO_CONFIGS / "default.yaml").read_text()
    assert shipped == module.render(), "configs/default.yaml is stale: run `python scripts/write_default_config.py`"
    assert read_yaml(REPO_CONFIGS / "default.yaml") == Settings().model_dump(mode="json")
