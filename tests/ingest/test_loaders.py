"""Loaders: discovery with globs and URIs, one parser per format, and every bad-input kind."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs
import pytest

from ragops.config import LoaderConfig
from ragops.documents import content_hash
from ragops.errors import InputError
from ragops.ingest import loaders
from ragops.ingest.loaders import LoadError, SourceFile, discover, glob_to_regex, load_file, read_bytes


def _one(root: Path, rel: str, cfg: LoaderConfig | None = None) -> SourceFile:
    """The discovered file at ``rel`` (fails if the globs dropped it)."""
    found = {sf.rel_path: sf for sf in discover([str(root)], cfg or LoaderConfig())}
    return found[rel]


def _load(root: Path, rel: str, cfg: LoaderConfig | None = None, errors: list[LoadError] | None = None):
    cfg = cfg or LoaderConfig()
    return load_file(_one(root, rel, cfg), cfg, errors)


def _single(path: Path) -> SourceFile:
    """A SourceFile for one path (a file root bypasses the globs)."""
    (sf,) = discover([str(path)], LoaderConfig())
    return sf


# ---------------------------------------------------------------------------------------
# Globs and discovery
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("**/*.md", "a.md", True),
        ("**/*.md", "x/y/a.md", True),
        ("**/*.md", "a.mdx", False),
        ("*.md", "a.md", True),
        ("*.md", "x/a.md", False),
        ("docs/**", "docs/a/b.txt", True),
        ("docs/**", "docsx/a.txt", False),
        ("**/.*", ".hidden", True),
        ("**/.*", "a/.hidden", True),
        ("**/.*/**", ".git/objects/ab", True),
        ("**/.*/**", "a/b.md", False),
        ("a?.txt", "ab.txt", True),
        ("a?.txt", "a/.txt", False),
        ("[!a]*.txt", "b.txt", True),
        ("[!a]*.txt", "a.txt", False),
        ("**/*.md", "README.MD", True),
        ("a/**/b.md", "a/b.md", True),
        ("a/**/b.md", "a/x/y/b.md", True),
    ],
)
def test_glob_semantics(pattern: str, path: str, expected: bool) -> None:
    assert bool(glob_to_regex(pattern).fullmatch(path)) is expected


def test_discover_applies_default_globs_sorted(write_files) -> None:
    root = write_files(
        {
            "b.md": "# B",
            "a.txt": "a",
            "docs/sub/c.html": "<p>c</p>",
            "docs/z.pdf": b"%PDF-1.4",
            "docs/.secret.md": "hidden",
            ".git/config.md": "hidden dir",
            "image.png": b"\x89PNG",
            "data.jsonl": '{"id": 1, "text": "x"}',
        }
    )
    found = discover([str(root)], LoaderConfig())
    assert [sf.rel_path for sf in found] == ["a.txt", "b.md", "data.jsonl", "docs/sub/c.html", "docs/z.pdf"]
    sf = found[1]
    assert sf.uri == str(root / "b.md") and sf.path == str(root / "b.md")
    assert sf.size == 3 and sf.mtime and sf.root == str(root) and sf.filesystem_uri == ""


def test_discover_include_exclude(write_files) -> None:
    root = write_files({"a.md": "a", "guide/b.md": "b", "guide/drafts/c.md": "c", "d.txt": "d"})
    cfg = LoaderConfig(include=["**/*.md"], exclude=["guide/drafts/**"])
    assert [sf.rel_path for sf in discover([str(root)], cfg)] == ["a.md", "guide/b.md"]


def test_discover_single_file_root_bypasses_globs(write_files) -> None:
    root = write_files({"sub/notes.txt": "n"})
    cfg = LoaderConfig(include=["**/*.md"])
    (sf,) = discover([str(root / "sub" / "notes.txt")], cfg)
    assert sf.rel_path == "notes.txt" and sf.uri == str(root / "sub" / "notes.txt")


def test_discover_relative_and_file_uri_roots(write_files, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_files({"a.md": "# A"})
    monkeypatch.chdir(root.parent)
    (rel,) = discover(["docs"], LoaderConfig())
    (uri,) = discover([f"file://{root}"], LoaderConfig())
    assert rel.uri == uri.uri == str(root / "a.md")
    assert rel.rel_path == uri.rel_path == "a.md"


def test_discover_dedupes_overlapping_roots(write_files) -> None:
    root = write_files({"a.md": "a", "sub/b.md": "b"})
    found = discover([str(root / "sub"), str(root)], LoaderConfig())
    assert [sf.rel_path for sf in found] == ["b.md", "a.md"]


def test_discover_missing_root_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found.*nope"):
        discover([str(tmp_path / "nope")], LoaderConfig())


def test_discover_and_read_through_uri_filesystem(write_files, monkeypatch: pytest.MonkeyPatch) -> None:
    """An s3:// root goes through the same pyarrow code path (bucket faked by a local subtree)."""
    store = write_files({"bucket/kb/a.md": "# Alpha\n\nfrom the bucket", "bucket/kb/x/b.txt": "bee"})

    def fake_from_uri(uri: str):
        parts = urlsplit(uri)
        bucket = parts.netloc.rsplit("@", 1)[-1]  # pyarrow drops credentials from the path too
        return pafs.SubTreeFileSystem(str(store), pafs.LocalFileSystem()), (bucket + parts.path).rstrip("/")

    monkeypatch.setattr(loaders, "_from_uri", fake_from_uri)
    monkeypatch.setattr(loaders, "_FS_CACHE", {})
    found = discover(["s3://user:secret@bucket/kb?region=eu-west-1"], LoaderConfig())
    assert [(sf.rel_path, sf.uri) for sf in found] == [("a.md", "s3://bucket/kb/a.md"), ("x/b.txt", "s3://bucket/kb/x/b.txt")]
    assert all("secret" not in sf.uri for sf in found)
    # Another process rebuilds the filesystem from the row alone.
    monkeypatch.setattr(loaders, "_FS_CACHE", {})
    sf = SourceFile.from_row(found[0].to_row())
    (doc,) = load_file(sf, LoaderConfig())
    assert doc.source == "s3://bucket/kb/a.md" and doc.doc_id == "a.md" and doc.title == "Alpha"
    assert read_bytes(found[1]) == b"bee"


# ---------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------


def test_txt(write_files) -> None:
    text = "Line one.  \r\nLine two.\r\n\r\n\r\n\r\nAfter blanks.\n"
    root = write_files({"notes/a.txt": text})
    (doc,) = _load(root, "notes/a.txt")
    assert doc.doc_id == "notes/a.txt"
    assert doc.source == str(root / "notes" / "a.txt")
    assert doc.text == "Line one.\nLine two.\n\nAfter blanks."
    assert doc.content_hash == content_hash(text)
    assert doc.title is None
    assert [(s.heading_path, s.text) for s in doc.sections] == [([], doc.text)]
    assert doc.metadata == {"type": "txt", "size": len(text.encode())}


MARKDOWN = """---
title: The Guide
tags: [setup, ops]
version: 2
---
Intro before any heading.

# Guide

Welcome.

```bash
# not a heading
echo hi
```

## Install

Run pip.

### From source
Clone it.

## Usage *quickly*

Use it.

Setext heading
==============

Last part.
"""


def test_markdown_structure(write_files) -> None:
    root = write_files({"guide.md": MARKDOWN})
    (doc,) = _load(root, "guide.md")
    assert doc.title == "The Guide"
    assert doc.metadata["type"] == "md"
    assert doc.metadata["tags"] == ["setup", "ops"]
    assert doc.metadata["front_matter"] == {"version": 2}
    assert not doc.text.startswith("---") and "title:" not in doc.text
    paths = [s.heading_path for s in doc.sections]
    assert paths == [
        [],
        ["Guide"],
        ["Guide", "Install"],
        ["Guide", "Install", "From source"],
        ["Guide", "Usage quickly"],
        ["Setext heading"],
    ]
    guide = doc.sections[1].text
    assert "# not a heading" in guide and guide.startswith("Welcome.") and guide.endswith("```")
    assert doc.sections[3].text == "Clone it."
    assert all(s.text in doc.text for s in doc.sections)


def test_markdown_title_from_h1_and_thematic_break(write_files) -> None:
    root = write_files({"a.markdown": "---\n\nNot front matter.\n\n---\n\n## Sub\n\ntext\n\n# Real Title\n\nbody"})
    (doc,) = _load(root, "a.markdown")
    assert doc.title == "Real Title"
    assert doc.text.startswith("---") and "tags" not in doc.metadata
    assert [s.heading_path for s in doc.sections] == [[], ["Sub"], ["Real Title"]]


HTML = """<!DOCTYPE html>
<html><head><title>  Ops   Manual </title><style>body{color:red}</style>
<script>var x = "<h1>no</h1>";</script></head>
<body>
<nav><a href="/">Home</a> <a href="/docs">Docs</a></nav>
<h1>Manual</h1>
<p>Intro   paragraph
spanning lines with <b>bold</b>text.</p>
<!-- a comment -->
<h2>Install</h2>
<p>Step one.</p>
<ul><li>first item</li><li><p>second item</p></li></ul>
<ol><li>alpha</li><li>beta</li></ol>
<h3>Details</h3>
<pre>line 1
    indented line 2</pre>
<h2>Reference</h2>
<table><tr><th>Key</th><th>Value</th></tr><tr><td>k1</td><td>v1</td></tr></table>
<div hidden>secret hidden</div>
<footer>Copyright footer</footer>
</body></html>"""


def test_html_structure(write_files) -> None:
    root = write_files({"manual.html": HTML})
    (doc,) = _load(root, "manual.html")
    assert doc.title == "Ops Manual"
    assert doc.metadata["type"] == "html"
    for dropped in ("Home", "color:red", "var x", "Copyright", "secret hidden", "a comment"):
        assert dropped not in doc.text
    by_path = {tuple(s.heading_path): s.text for s in doc.sections}
    assert list(by_path) == [("Manual",), ("Manual", "Install"), ("Manual", "Install", "Details"), ("Manual", "Reference")]
    assert by_path[("Manual",)] == "Intro paragraph spanning lines with boldtext."
    assert by_path[("Manual", "Install")] == "Step one.\n\n- first item\n- second item\n\n1. alpha\n2. beta"
    assert by_path[("Manual", "Install", "Details")] == "line 1\n    indented line 2"
    assert by_path[("Manual", "Reference")] == "Key | Value\nk1 | v1"
    assert doc.text.startswith("Manual\n\nIntro paragraph")
    assert all(s.text in doc.text for s in doc.sections)


def test_html_title_falls_back_to_h1_and_declared_charset(write_files) -> None:
    page = '<html><head><meta charset="windows-1252"></head><body><h1>Caf\xe9 menu</h1><p>cr\xe8me</p></body></html>'
    root = write_files({"m.htm": page.encode("cp1252")})
    (doc,) = _load(root, "m.htm")
    assert doc.title == "Café menu"
    assert doc.sections[0].text == "crème"


def test_pdf_pages(write_files, pdf_bytes) -> None:
    root = write_files({"paper.pdf": pdf_bytes(["Abstract text here.\nSecond line.", "", "Conclusion (final)."], title="A Paper")})
    (doc,) = _load(root, "paper.pdf")
    assert doc.title == "A Paper"
    assert [(s.heading_path, s.text) for s in doc.sections] == [
        (["Page 1"], "Abstract text here.\nSecond line."),
        (["Page 3"], "Conclusion (final)."),
    ]
    assert doc.metadata["type"] == "pdf"
    assert doc.metadata["pages"] == 3 and doc.metadata["pages_with_text"] == [1, 3]
    assert doc.text == "Abstract text here.\nSecond line.\n\nConclusion (final)."


JSONL_LINES = [
    '{"id": "faq-1", "text": "First answer.", "metadata": {"lang": "en"}, "topic": "billing", "title": "Billing"}',
    '{"id": 7, "text": "Second answer."}',
    '{"id": "broken", "text": "unterminated',
    "",
    '["not", "an", "object"]',
    '{"text": "no id"}',
    '{"id": "faq-1", "text": "duplicate"}',
    '{"id": "empty", "text": "   "}',
    '{"id": "meta", "text": "x", "metadata": [1]}',
]


def test_jsonl_records_and_per_line_errors(write_files) -> None:
    root = write_files({"kb/faq.jsonl": "\n".join(JSONL_LINES) + "\n"})
    errors: list[LoadError] = []
    docs = _load(root, "kb/faq.jsonl", errors=errors)
    assert [d.doc_id for d in docs] == ["faq-1", "7"]
    first = docs[0]
    assert first.text == "First answer." and first.title == "Billing"
    assert first.source == str(root / "kb" / "faq.jsonl")
    assert first.metadata == {
        "lang": "en", "topic": "billing", "type": "jsonl", "size": len(JSONL_LINES[0].encode()), "file": "kb/faq.jsonl", "line": 1,
    }  # fmt: skip
    assert first.content_hash == content_hash("First answer.")
    assert [(e.line, e.kind) for e in errors] == [(3, "record"), (5, "record"), (6, "record"), (7, "record"), (8, "record"), (9, "record")]
    reasons = {e.line: str(e) for e in errors}
    assert "invalid JSON" in reasons[3] and reasons[3].startswith(f"{root / 'kb' / 'faq.jsonl'}:3: ")
    assert "JSON object" in reasons[5]
    assert "'id'" in reasons[6]
    assert "duplicate id 'faq-1' (first at line 1)" in reasons[7]
    assert "empty" in reasons[8]
    assert "'metadata' must be an object" in reasons[9]


def test_jsonl_errors_are_logged_without_a_collector(write_files, caplog: pytest.LogCaptureFixture) -> None:
    root = write_files({"a.jsonl": '{"id": "a", "text": "ok"}\n{bad json}\n'})
    with caplog.at_level(logging.WARNING, logger="ragops.ingest.loaders"):
        docs = _load(root, "a.jsonl")
    assert [d.doc_id for d in docs] == ["a"]
    assert "a.jsonl:2: invalid JSON" in caplog.text


def test_jsonl_invalid_utf8_line_reports_file_offset(write_files) -> None:
    good = b'{"id": "a", "text": "ok"}\n'
    root = write_files({"a.jsonl": good + b'{"id": "b", "text": "\xff"}\n'})
    errors: list[LoadError] = []
    assert [d.doc_id for d in _load(root, "a.jsonl", errors=errors)] == ["a"]
    (err,) = errors
    assert err.line == 2 and f"byte offset {len(good) + 21}" in err.reason


def test_jsonl_without_valid_lines_fails_as_a_file(write_files) -> None:
    root = write_files({"a.jsonl": '{"text": "no id"}\nnot json\n'})
    with pytest.raises(LoadError, match=r"no valid records: 2 invalid line\(s\), first at line 1") as info:
        _load(root, "a.jsonl")
    assert info.value.line is None


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def _kind(sf: SourceFile, cfg: LoaderConfig | None = None) -> LoadError:
    with pytest.raises(LoadError) as info:
        load_file(sf, cfg or LoaderConfig())
    assert isinstance(info.value, InputError)
    assert str(info.value).startswith(sf.uri + ": ")
    return info.value


def test_binary_file(write_files) -> None:
    root = write_files({"a.txt": b"abc\x00\x01\x02"})
    err = _kind(_one(root, "a.txt"))
    assert err.kind == "binary" and "NUL byte at byte offset 3" in err.reason


def test_invalid_utf8_names_the_offset(write_files) -> None:
    root = write_files({"a.md": b"# Title\n\ncaf\xe9 au lait"})
    err = _kind(_one(root, "a.md"))
    assert err.kind == "encoding" and "invalid UTF-8 at byte offset 12" in err.reason


def test_utf8_bom_and_utf16_are_decoded(write_files) -> None:
    root = write_files({"bom.txt": b"\xef\xbb\xbfhello", "u16.txt": "h\xe9llo".encode("utf-16")})
    assert _load(root, "bom.txt")[0].text == "hello"
    assert _load(root, "u16.txt")[0].text == "héllo"


@pytest.mark.parametrize(
    ("name", "content"),
    [("a.txt", " \n\t\n"), ("b.md", "---\ntitle: only front matter\n---\n"), ("c.html", "<html><script>x()</script></html>")],
)
def test_empty_after_normalization(write_files, name: str, content: str) -> None:
    root = write_files({name: content})
    assert _kind(_one(root, name)).kind == "empty"


def test_oversized_is_refused_before_reading(write_files, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_files({"big.txt": "x" * 20_000})
    sf = _one(root, "big.txt")

    def no_read(_sf: SourceFile) -> bytes:
        raise AssertionError("an oversized file must not be read")

    monkeypatch.setattr(loaders, "read_bytes", no_read)
    err = _kind(sf, LoaderConfig(max_file_mb=0.01))
    assert err.kind == "oversized" and "max_file_mb=0.01" in err.reason


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(write_files) -> None:
    root = write_files({"a.txt": "secret"})
    (root / "a.txt").chmod(0)
    try:
        err = _kind(_one(root, "a.txt"))
    finally:
        (root / "a.txt").chmod(0o644)
    assert err.kind == "unreadable" and "permission denied" in err.reason


def test_permission_denied_from_filesystem(write_files, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same path as above for runs as root: the filesystem refuses the open."""
    root = write_files({"a.txt": "secret"})
    sf = _one(root, "a.txt")

    class Refusing:
        def open_input_stream(self, path: str):
            raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(loaders, "_filesystem", lambda _uri: Refusing())
    err = _kind(sf)
    assert err.kind == "unreadable" and err.reason == "unreadable: permission denied"


def test_file_removed_after_discovery(write_files) -> None:
    root = write_files({"a.txt": "gone soon"})
    sf = _one(root, "a.txt")
    (root / "a.txt").unlink()
    err = _kind(sf)
    assert err.kind == "unreadable" and "no longer exists" in err.reason


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"%PDF-1.4\n1 0 obj garbage", "corrupt PDF"), (b"just text", "no %PDF- header")],
)
def test_corrupt_pdf(write_files, content: bytes, needle: str) -> None:
    root = write_files({"bad.pdf": content})
    err = _kind(_one(root, "bad.pdf"))
    assert err.kind == "corrupt" and needle in err.reason


def test_truncated_pdf_is_corrupt(write_files, pdf_bytes) -> None:
    root = write_files({"cut.pdf": pdf_bytes(["some text"])[:60]})
    assert _kind(_one(root, "cut.pdf")).kind == "corrupt"


def test_pdf_without_text_is_empty(write_files, pdf_bytes) -> None:
    root = write_files({"scan.pdf": pdf_bytes([""])})
    err = _kind(_one(root, "scan.pdf"))
    assert err.kind == "empty" and "OCR" in err.reason


def test_unsupported_extension(write_files) -> None:
    root = write_files({"pic.png": b"\x89PNG"})
    err = _kind(_single(root / "pic.png"))
    assert err.kind == "unsupported" and "'.png'" in err.reason and ".md" in err.reason


def test_load_error_pickles_with_its_fields() -> None:
    err = LoadError("s3://b/k.jsonl", "invalid JSON", "record", 4)
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.reason, back.kind, back.line, str(back)) == (err.path, err.reason, "record", 4, str(err))
    assert back.to_dict() == {"path": "s3://b/k.jsonl", "line": 4, "kind": "record", "reason": "invalid JSON"}
