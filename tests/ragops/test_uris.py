"""Reading inputs from local paths and URIs through pyarrow filesystems."""

from __future__ import annotations

from pathlib import Path

import pytest

from ragops.errors import InputError
from ragops.uris import expand_files, is_uri, read_text


def test_paths_and_file_uris_read_the_same(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"q": "é"}\n')
    (tmp_path / "b.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("x")
    uri = f"file://{tmp_path}"
    assert is_uri(uri) and not is_uri(tmp_path)
    assert expand_files(uri, ".jsonl") == [f"{uri}/a.jsonl", f"{uri}/b.jsonl"]
    assert expand_files(f"{uri}/*.jsonl", ".jsonl") == expand_files(uri, ".jsonl")
    assert expand_files(tmp_path, ".jsonl") == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert expand_files(f"{tmp_path}/a.*", ".jsonl") == [str(tmp_path / "a.jsonl")]
    assert read_text(f"{uri}/a.jsonl") == read_text(tmp_path / "a.jsonl") == '{"q": "é"}\n'


def test_bad_locations_are_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="file not found"):
        read_text(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="is a folder"):
        read_text(f"file://{tmp_path}")
    with pytest.raises(InputError, match="not UTF-8"):
        read_text(tmp_path / "bin.dat")
    with pytest.raises(InputError, match="not found"):
        expand_files(f"file://{tmp_path}/nope", ".jsonl")
    with pytest.raises(InputError, match="cannot open"):
        read_text("nosuchscheme://bucket/x.jsonl")
    assert expand_files(f"{tmp_path}/*.none", ".jsonl") == []
