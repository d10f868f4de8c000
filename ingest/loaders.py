"""Find source files and turn them into :class:`~ragops.documents.Document` records.

Two steps, both usable without Ray:

* :func:`discover` lists the files under one or more roots (local paths or ``s3://``,
  ``gs://``, ``file://`` URIs, all through :mod:`pyarrow.fs`) and filters them with the
  include/exclude globs of :class:`~ragops.config.LoaderConfig`.
* :func:`load_file` reads one :class:`SourceFile` and parses it by extension: plain text,
  Markdown, HTML, PDF and JSONL.

Errors. Anything wrong with a *file* (unreadable, binary, bad UTF-8, empty, too large,
corrupt PDF, unsupported type) raises :class:`LoadError`; the ingest stage catches it per
file, reports it and carries on. A JSONL file is a container of independent records, so a
bad *line* must not cost the good ones: such problems become :class:`LoadError` objects with
a line number that :func:`load_file` appends to the ``errors`` list the caller passes (or
logs as warnings when the caller passes none), while the valid lines load. Only when no
line of a JSONL file is valid does the file as a whole fail.
"""

from __future__ import annotations

import codecs
import io
import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs
import yaml
from bs4 import BeautifulSoup, NavigableString, Tag
from bs4.dammit import EncodingDetector
from bs4.element import PreformattedString
from markdown_it import MarkdownIt
from pypdf import PdfReader

from ragops.config import LoaderConfig
from ragops.documents import Document, Section, content_hash, normalize_text
from ragops.errors import InputError
from ragops.uris import is_uri

log = logging.getLogger(__name__)

LoadErrorKind = Literal[
    "unreadable", "binary", "encoding", "empty", "oversized", "corrupt", "encrypted", "unsupported", "record"
]

#: File extension (lower case, no dot) → document type written to ``metadata["type"]``.
FILE_TYPES: dict[str, str] = {
    "txt": "txt",
    "md": "md",
    "markdown": "md",
    "html": "html",
    "htm": "html",
    "pdf": "pdf",
    "jsonl": "jsonl",
}

_UTF8_BOM = codecs.BOM_UTF8
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


class LoadError(InputError):
    """One file (or one JSONL line) could not be loaded.

    Attributes:
        path: The file's path or URI.
        reason: Readable explanation, complete on its own.
        kind: Machine-readable category (``"binary"``, ``"encoding"``, ``"empty"``, ...).
        line: 1-based line number for a per-record problem in a JSONL file, else None.
    """

    def __init__(self, path: str, reason: str, kind: LoadErrorKind = "unreadable", line: int | None = None):
        self.path = path
        self.reason = reason
        self.kind = kind
        self.line = line
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions pickle their ``args`` only; Ray ships errors between processes.
        return (self.__class__, (self.path, self.reason, self.kind, self.line))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form for ingest reports."""
        return {"path": self.path, "line": self.line, "kind": self.kind, "reason": self.reason}


# ---------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    """A file found by :func:`discover`.

    Attributes:
        uri: Where the file is, as shown to users and stored as a document's ``source``: an
            absolute local path, or ``scheme://bucket/key`` (query options and credentials
            stripped).
        path: The path inside its pyarrow filesystem (what ``fs.open_input_stream`` takes).
        rel_path: Path relative to its root, posix style; the file name for a file root.
        size: Size in bytes as listed.
        mtime: Modification time (seconds since the epoch) when the filesystem reports one.
        root: The root it was found under, as the user gave it.
        filesystem_uri: ``scheme://netloc?query`` that rebuilds the filesystem in another
            process (``""`` for the local filesystem). May carry endpoint options, so it is
            never shown.
    """

    uri: str
    path: str
    rel_path: str
    size: int
    mtime: float | None
    root: str
    filesystem_uri: str = ""

    @property
    def extension(self) -> str:
        """Lower-case extension without the dot (``"md"``), ``""`` when there is none."""
        name = self.rel_path.rsplit("/", 1)[-1]
        return name.rsplit(".", 1)[-1].lower() if "." in name else ""

    def to_row(self) -> dict[str, Any]:
        """Flat row for a Ray Data dataset of files."""
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "SourceFile":
        """Inverse of :meth:`to_row`."""
        mtime = row.get("mtime")
        return cls(
            uri=str(row["uri"]),
            path=str(row["path"]),
            rel_path=str(row["rel_path"]),
            size=int(row["size"]),
            mtime=None if mtime is None else float(mtime),
            root=str(row["root"]),
            filesystem_uri=str(row.get("filesystem_uri") or ""),
        )


_LOCAL_FS = pafs.LocalFileSystem()
_FS_CACHE: dict[str, pafs.FileSystem] = {}


def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's URI resolution; a seam so tests can stand in for s3:// without a network."""
    return pafs.FileSystem.from_uri(uri)


def _filesystem(filesystem_uri: str) -> pafs.FileSystem:
    """The filesystem for a :attr:`SourceFile.filesystem_uri`, built once per process.

    Resolving an s3:// URI can cost a network round trip (bucket region), so reads reuse it.
    """
    if not filesystem_uri:
        return _LOCAL_FS
    fs = _FS_CACHE.get(filesystem_uri)
    if fs is None:
        fs = _from_uri(filesystem_uri)[0]
        _FS_CACHE[filesystem_uri] = fs
    return fs


@dataclass(frozen=True)
class _Root:
    fs: pafs.FileSystem
    path: str
    display: str
    filesystem_uri: str


def _resolve_root(root: str) -> _Root:
    """Split a root into its filesystem, the path inside it and a display URI."""
    if not is_uri(root):
        path = os.path.abspath(os.path.expanduser(root))
        return _Root(_LOCAL_FS, path, path, "")
    parts = urlsplit(root)
    try:
        fs, path = _from_uri(root)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError / ValueError by scheme
        raise InputError(f"cannot open input '{root}': {exc}") from None
    if isinstance(fs, pafs.LocalFileSystem):
        return _Root(fs, path, path, "")
    host = parts.netloc.rsplit("@", 1)[-1]  # never show credentials embedded in a URI
    display = urlunsplit((parts.scheme, host, parts.path, "", "")).rstrip("/")
    filesystem_uri = urlunsplit((parts.scheme, parts.netloc, "", parts.query, ""))
    _FS_CACHE.setdefault(filesystem_uri, fs)
    return _Root(fs, path.rstrip("/"), display, filesystem_uri)


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a path glob to a regex matched against a whole posix relative path.

    ``*`` and ``?`` stay within one path segment, ``[...]`` is a character class (``[!...]``
    negates), ``**/`` matches zero or more directories (so ``**/*.md`` matches ``a.md``),
    a trailing ``/**`` matches everything below a directory and a bare ``**`` anything.
    Matching ignores case, so ``*.md`` also takes ``README.MD``.

    Args:
        pattern: The glob, relative to the ingest root.

    Returns:
        A compiled regex; use ``fullmatch``.
    """
    pat = pattern.strip().removeprefix("./").lstrip("/")
    out: list[str] = []
    i, n = 0, len(pat)
    while i < n:
        if pat.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pat.startswith("/**", i) and i + 3 == n:
            out.append("(?:/.*)?")
            i += 3
        elif pat.startswith("**", i):
            out.append(".*")
            i += 2
        elif pat[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pat[i] == "?":
            out.append("[^/]")
            i += 1
        elif pat[i] == "[":
            close = pat.find("]", i + 2 if pat.startswith(("[!", "[^"), i) else i + 1)
            if close == -1:
                out.append(re.escape("["))
                i += 1
                continue
            body = pat[i + 1 : close]
            negate = body[:1] in ("!", "^")
            body = body[1:] if negate else body
            out.append("[" + ("^/" if negate else "") + body.replace("\\", "\\\\") + "]")
            i = close + 1
        else:
            out.append(re.escape(pat[i]))
            i += 1
    return re.compile("".join(out), re.IGNORECASE | re.DOTALL)


class _PathFilter:
    """Include/exclude globs of a :class:`LoaderConfig`, compiled once."""

    def __init__(self, cfg: LoaderConfig):
        self.include = [glob_to_regex(p) for p in cfg.include]
        self.exclude = [glob_to_regex(p) for p in cfg.exclude]

    def __call__(self, rel_path: str) -> bool:
        if not any(r.fullmatch(rel_path) for r in self.include):
            return False
        return not any(r.fullmatch(rel_path) for r in self.exclude)


def _mtime(info: pafs.FileInfo) -> float | None:
    ns = info.mtime_ns
    return None if ns is None else ns / 1e9


def _list_root(root: str, keep: _PathFilter) -> list[SourceFile]:
    r = _resolve_root(root)
    try:
        info = r.fs.get_file_info(r.path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise InputError(f"cannot read input '{root}': {exc}") from None
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input path not found: '{root}' (no such file or directory)")
    if info.type == pafs.FileType.File:
        # A file named explicitly is taken whatever the globs say: the user asked for it.
        name = r.path.rstrip("/").rsplit("/", 1)[-1]
        return [SourceFile(r.display, r.path, name, int(info.size or 0), _mtime(info), root, r.filesystem_uri)]
    try:
        infos = r.fs.get_file_info(pafs.FileSelector(r.path, recursive=True))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot list input '{root}': {exc}") from None
    prefix = r.path.rstrip("/") + "/"
    found: list[SourceFile] = []
    for item in infos:
        if item.type != pafs.FileType.File or not item.path.startswith(prefix):
            continue
        rel = item.path[len(prefix) :]
        if keep(rel):
            uri = f"{r.display}/{rel}"
            found.append(SourceFile(uri, item.path, rel, int(item.size or 0), _mtime(item), root, r.filesystem_uri))
    found.sort(key=lambda sf: sf.rel_path)
    return found


def discover(roots: Sequence[str], cfg: LoaderConfig) -> list[SourceFile]:
    """List the files to ingest under the given roots.

    Folders are listed recursively and filtered with ``cfg.include`` / ``cfg.exclude``
    (see :func:`glob_to_regex`), matched against the path relative to the root. A root that
    names a file is taken as is. Order is deterministic: roots in the order given, files by
    relative path within a root; a file reachable from two roots is listed once.

    Args:
        roots: Local paths (files or folders) or ``s3://``, ``gs://``, ``file://`` URIs.
        cfg: Loader settings.

    Returns:
        The files found, possibly empty.

    Raises:
        InputError: a root does not exist or cannot be listed.
    """
    keep = _PathFilter(cfg)
    seen: set[str] = set()
    out: list[SourceFile] = []
    for root in roots:
        for sf in _list_root(str(root), keep):
            if sf.uri not in seen:
                seen.add(sf.uri)
                out.append(sf)
    return out


# ---------------------------------------------------------------------------------------
# Reading and decoding
# ---------------------------------------------------------------------------------------


def read_bytes(sf: SourceFile) -> bytes:
    """Read a whole file through its pyarrow filesystem.

    Raises:
        LoadError: kind ``"unreadable"`` (permission denied, vanished, I/O error).
    """
    try:
        with _filesystem(sf.filesystem_uri).open_input_stream(sf.path) as f:
            return f.read()
    except PermissionError:
        raise LoadError(sf.uri, "unreadable: permission denied", "unreadable") from None
    except FileNotFoundError:
        raise LoadError(sf.uri, "unreadable: the file no longer exists (removed after discovery?)", "unreadable") from None
    except IsADirectoryError:
        raise LoadError(sf.uri, "unreadable: it is a directory", "unreadable") from None
    except OSError as exc:
        raise LoadError(sf.uri, f"unreadable: {exc}", "unreadable") from None


def _check_size(sf: SourceFile, size: int, cfg: LoaderConfig) -> None:
    limit = cfg.max_file_mb * 1024 * 1024
    if size > limit:
        raise LoadError(
            sf.uri,
            f"oversized: {size / 1024 / 1024:.1f} MB exceeds loader.max_file_mb={cfg.max_file_mb:g} "
            "(raise it with --set ingest.loader.max_file_mb=...)",
            "oversized",
        )


def _reject_binary(sf: SourceFile, data: bytes) -> None:
    nul = data.find(b"\x00")
    if nul != -1:
        raise LoadError(sf.uri, f"binary content: NUL byte at byte offset {nul}; not a text file", "binary")


def decode_text(sf: SourceFile, data: bytes) -> str:
    """Decode a text file: UTF-8 (BOM optional), or UTF-16 when it starts with a UTF-16 BOM.

    Raises:
        LoadError: ``"binary"`` for NUL bytes, ``"encoding"`` for invalid UTF-8 (with the
            byte offset of the first bad byte).
    """
    if data.startswith(_UTF16_BOMS):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise LoadError(sf.uri, f"invalid UTF-16 at byte offset {exc.start}", "encoding") from None
    _reject_binary(sf, data)
    skip = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoadError(sf.uri, _utf8_reason(data, exc.start + skip), "encoding") from None


def _utf8_reason(data: bytes, offset: int) -> str:
    bad = data[offset : offset + 4].hex(" ")
    return f"invalid UTF-8 at byte offset {offset} (bytes {bad}); re-encode the file as UTF-8"


def _require_text(sf: SourceFile, text: str) -> str:
    if not text:
        raise LoadError(sf.uri, "empty: no text after normalization", "empty")
    return text


def _base_metadata(sf: SourceFile, ftype: str) -> dict[str, Any]:
    return {"type": ftype, "size": sf.size}


def _make_document(
    sf: SourceFile,
    text: str,
    ftype: str,
    *,
    title: str | None = None,
    sections: list[Section] | None = None,
    metadata: dict[str, Any] | None = None,
    doc_id: str | None = None,
) -> Document:
    meta = _base_metadata(sf, ftype)
    meta.update(metadata or {})
    return Document(
        doc_id=doc_id if doc_id is not None else sf.rel_path,
        text=text,
        source=sf.uri,
        content_hash=content_hash(text),
        title=title or None,
        sections=sections if sections is not None else [Section([], text)],
        metadata=meta,
    )


def _json_safe(value: Any) -> Any:
    """Front matter may hold dates and other YAML types: keep what JSON can carry."""
    return json.loads(json.dumps(value, default=str))


# ---------------------------------------------------------------------------------------
# Plain text
# ---------------------------------------------------------------------------------------


def _load_txt(sf: SourceFile, data: bytes, errors: list[LoadError] | None) -> list[Document]:
    text = _require_text(sf, normalize_text(decode_text(sf, data)))
    return [_make_document(sf, text, "txt")]


# ---------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------


def _split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """Separate a leading ``---`` YAML block from the body.

    A leading ``---`` that does not enclose a YAML mapping is a thematic break, not front
    matter, and stays in the body.
    """
    if not text.startswith("---\n"):
        return {}, text
    lines = text.split("\n")
    for end in range(1, len(lines)):
        if lines[end] in ("---", "..."):
            break
    else:
        return {}, text
    try:
        data = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:
        return {}, text
    if not isinstance(data, dict):
        return {}, text
    return data, "\n".join(lines[end + 1 :])


def _inline_text(token: Any) -> str:
    """Plain text of a markdown-it inline token (emphasis, links and code unwrapped)."""
    parts: list[str] = []
    for child in token.children or []:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type in ("softbreak", "hardbreak"):
            parts.append(" ")
        elif child.type == "image":
            parts.append(_inline_text(child))
    return " ".join("".join(parts).split())


@dataclass(frozen=True)
class _Heading:
    start: int  # first line (0-based)
    end: int  # line after the heading
    level: int
    text: str


def _md_headings(body: str) -> list[_Heading]:
    """Top-level ATX and setext headings with their line ranges.

    markdown-it knows that ``#`` inside a fenced code block or an HTML block is not a
    heading; headings nested in lists or quotes (level > 0) are content, not structure.
    """
    tokens = MarkdownIt("commonmark").parse(body)
    out: list[_Heading] = []
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open" and tok.level == 0 and tok.map:
            out.append(_Heading(tok.map[0], tok.map[1], int(tok.tag[1]), _inline_text(tokens[i + 1])))
    return out


def _md_sections(body: str, headings: list[_Heading]) -> list[Section]:
    lines = body.split("\n")
    sections: list[Section] = []
    first = headings[0].start if headings else len(lines)
    intro = "\n".join(lines[:first]).strip()
    if intro:
        sections.append(Section([], intro))
    stack: list[tuple[int, str]] = []
    for i, h in enumerate(headings):
        while stack and stack[-1][0] >= h.level:
            stack.pop()
        stack.append((h.level, h.text))
        stop = headings[i + 1].start if i + 1 < len(headings) else len(lines)
        text = "\n".join(lines[h.end : stop]).strip()
        if text:  # a heading directly followed by a sub-heading has no text of its own
            sections.append(Section([t for _, t in stack if t], text))
    return sections


def _tags(value: Any) -> list[str]:
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, (list, tuple)):
        return [str(t).strip() for t in value if str(t).strip()]
    return []


def _load_markdown(sf: SourceFile, data: bytes, errors: list[LoadError] | None) -> list[Document]:
    front, body = _split_front_matter(normalize_text(decode_text(sf, data)))
    body = _require_text(sf, body.strip())
    headings = _md_headings(body)
    h1 = next((h.text for h in headings if h.level == 1 and h.text), None)
    fm_title = front.pop("title", None)
    title = str(fm_title).strip() if fm_title not in (None, "") else h1
    meta: dict[str, Any] = {}
    tags = _tags(front.pop("tags", None))
    if tags:
        meta["tags"] = tags
    if front:
        meta["front_matter"] = _json_safe(front)
    sections = _md_sections(body, headings)
    return [_make_document(sf, body, "md", title=title, sections=sections, metadata=meta)]


# ---------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------

# Chrome, scripts and invisible content: never part of the document's text.
_HTML_DROP = frozenset({"script", "style", "nav", "footer", "noscript", "template", "head", "svg", "iframe", "canvas"})
_HTML_BLOCK = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "center", "dd", "details", "dialog", "div", "dl",
        "dt", "fieldset", "figcaption", "figure", "form", "header", "hr", "html", "main", "menu", "ol", "p",
        "section", "summary", "ul", "caption",
    }
)  # fmt: skip
_HEADINGS = {f"h{i}": i for i in range(1, 7)}
_WS = re.compile(r"[ \t\n\r\f\v]+")


class _HtmlSink:
    """Collects blocks of text and headings in document order while the tree is walked."""

    def __init__(self) -> None:
        self.inline: list[str] = []
        self.stack: list[tuple[int, str]] = []
        self.doc_parts: list[tuple[str, str]] = []  # (kind, text), headings included
        self.sections: list[tuple[list[str], list[tuple[str, str]]]] = []
        self.marker = ""  # list-item bullet waiting for the item's first text
        self.new_list = False  # the next item opens a top-level list (a paragraph break before it)
        self._new_section = True

    def add_inline(self, text: str) -> None:
        self.inline.append(text)

    def flush(self, kind: str = "p") -> None:
        text = re.sub(r" *\n *", "\n", "".join(self.inline)).strip()
        self.inline.clear()
        if text:
            if self.marker:
                # <li><p>text</p></li> is common: the bullet belongs to the item's first block.
                text, kind, self.marker = self.marker + text, "li", ""
            if kind == "li" and self.new_list:
                kind, self.new_list = "li0", False
            self.block(text, kind)

    def block(self, text: str, kind: str = "p") -> None:
        """Add a finished block (paragraph, list item, table, preformatted text)."""
        if not text.strip():
            return
        self.doc_parts.append((kind, text))
        if self._new_section or not self.sections:
            self.sections.append(([t for _, t in self.stack if t], []))
            self._new_section = False
        self.sections[-1][1].append((kind, text))

    def heading(self, level: int, text: str) -> None:
        self.flush()
        while self.stack and self.stack[-1][0] >= level:
            self.stack.pop()
        self.stack.append((level, text))
        if text:
            self.doc_parts.append(("h", text))
        self._new_section = True


def _join_blocks(blocks: list[tuple[str, str]]) -> str:
    # Consecutive list items read as a list (one per line); other blocks are paragraphs.
    out: list[str] = []
    prev = ""
    for kind, text in blocks:
        if out:
            out.append("\n" if kind == "li" and prev in ("li", "li0") else "\n\n")
        out.append(text)
        prev = kind
    return "".join(out)


def _table_text(table: Any) -> str:
    rows = []
    for tr in table.find_all("tr"):
        cells = [" ".join(c.get_text(" ", strip=True).split()) for c in tr.find_all(["th", "td"], recursive=False)]
        if any(cells):
            rows.append(" | ".join(cells))
    return "\n".join(rows)


def _walk_html(node: Any, sink: _HtmlSink, list_depth: int = 0) -> None:
    for child in node.children:
        _visit(child, sink, list_depth)


def _visit(child: Any, sink: _HtmlSink, list_depth: int) -> None:
    if isinstance(child, NavigableString):
        if not isinstance(child, PreformattedString):  # comments, doctype, CDATA
            sink.add_inline(_WS.sub(" ", str(child)))
        return
    if not isinstance(child, Tag):
        return
    name = child.name.lower()
    if name in _HTML_DROP or child.has_attr("hidden"):
        return
    if name in _HEADINGS:
        sink.heading(_HEADINGS[name], " ".join(child.get_text().split()))
    elif name == "br":
        sink.add_inline("\n")
    elif name == "pre":
        sink.flush()
        sink.block(normalize_text(child.get_text()), "pre")
    elif name == "table":
        sink.flush()
        sink.block(_table_text(child), "table")
    elif name in ("ul", "ol"):
        sink.flush()
        _walk_list(child, sink, list_depth + 1, ordered=name == "ol")
    elif name == "li":  # an item outside any list
        _walk_item(child, sink, list_depth, "- ")
    elif name in _HTML_BLOCK:
        sink.flush()
        _walk_html(child, sink, list_depth)
        sink.flush()
    else:
        _walk_html(child, sink, list_depth)


def _walk_list(node: Any, sink: _HtmlSink, depth: int, ordered: bool) -> None:
    sink.new_list = depth == 1  # a nested list continues its parent item's lines
    number = 0
    for child in node.children:
        if isinstance(child, Tag) and child.name.lower() == "li":
            number += 1
            _walk_item(child, sink, depth, f"{number}. " if ordered else "- ")
        elif isinstance(child, Tag):
            _visit(child, sink, depth)
    sink.flush("li")


def _walk_item(item: Any, sink: _HtmlSink, depth: int, marker: str) -> None:
    sink.flush("li")
    sink.marker = "  " * max(depth - 1, 0) + marker
    _walk_html(item, sink, depth)
    sink.flush("li")
    sink.marker = ""  # an item without text leaves no stray bullet


def _decode_html(sf: SourceFile, data: bytes) -> str:
    """UTF-8 first (as browsers do for valid UTF-8), then the charset the page declares."""
    try:
        return decode_text(sf, data)
    except LoadError as err:
        if err.kind != "encoding":
            raise
        declared = EncodingDetector.find_declared_encoding(data, is_html=True)
        try:
            if not declared or codecs.lookup(declared).name == "utf-8":
                raise err from None
            return data.decode(declared)
        except (UnicodeDecodeError, LookupError):
            raise err from None


def _load_html(sf: SourceFile, data: bytes, errors: list[LoadError] | None) -> list[Document]:
    soup = BeautifulSoup(_decode_html(sf, data), "html.parser")
    title_tag = soup.find("title")
    title = " ".join(title_tag.get_text().split()) if title_tag else ""
    if not title:
        h1 = soup.find("h1")
        title = " ".join(h1.get_text().split()) if h1 else ""
    sink = _HtmlSink()
    try:
        _walk_html(soup, sink)
    except RecursionError:
        raise LoadError(sf.uri, "corrupt HTML: elements nested too deeply to read", "corrupt") from None
    sink.flush()
    text = _require_text(sf, normalize_text(_join_blocks(sink.doc_parts)))
    sections = [Section(path, normalize_text(_join_blocks(blocks))) for path, blocks in sink.sections]
    return [_make_document(sf, text, "html", title=title or None, sections=[s for s in sections if s.text])]


# ---------------------------------------------------------------------------------------
# PDF
# ---------------------------------------------------------------------------------------


def _load_pdf(sf: SourceFile, data: bytes, errors: list[LoadError] | None) -> list[Document]:
    if b"%PDF-" not in data[:1024]:
        raise LoadError(sf.uri, "corrupt PDF: no %PDF- header (not a PDF file?)", "corrupt")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise LoadError(sf.uri, "encrypted PDF: a password is required", "encrypted")
        pages = [normalize_text(page.extract_text() or "") for page in reader.pages]
        info = reader.metadata
        title = str(info.title).strip() if info is not None and info.title else None
    except LoadError:
        raise
    except Exception as exc:  # pypdf raises many types on damaged input; all mean "corrupt"
        raise LoadError(sf.uri, f"corrupt PDF: {type(exc).__name__}: {exc}", "corrupt") from None
    sections = [Section([f"Page {n}"], text) for n, text in enumerate(pages, 1) if text]
    if not sections:
        raise LoadError(sf.uri, "empty: no extractable text (a scanned PDF? OCR is not supported)", "empty")
    text = "\n\n".join(s.text for s in sections)
    meta = {"pages": len(pages), "pages_with_text": [n for n, t in enumerate(pages, 1) if t]}
    return [_make_document(sf, text, "pdf", title=title, sections=sections, metadata=meta)]


# ---------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------

_JSONL_RESERVED = ("id", "text", "metadata", "title")


def _jsonl_record(sf: SourceFile, raw: bytes, lineno: int, offset: int) -> Document:
    """Parse one JSONL line into a document; raises a per-line :class:`LoadError`."""

    def bad(reason: str) -> LoadError:
        return LoadError(sf.uri, reason, "record", lineno)

    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(_utf8_reason(raw, exc.start).replace(f"offset {exc.start}", f"offset {offset + exc.start}")) from None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise bad(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(rec, dict):
        raise bad(f"expected a JSON object, got {type(rec).__name__}")
    doc_id = rec.get("id")
    if doc_id is None:
        raise bad("missing required field 'id'")
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id).strip() == "":
        raise bad(f"'id' must be a non-empty string or an integer, got {json.dumps(doc_id)}")
    if "text" not in rec:
        raise bad("missing required field 'text'")
    if not isinstance(rec["text"], str):
        raise bad(f"'text' must be a string, got {type(rec['text']).__name__}")
    text = normalize_text(rec["text"])
    if not text:
        raise bad("'text' is empty after normalization")
    given = rec.get("metadata", {})
    if not isinstance(given, dict):
        raise bad(f"'metadata' must be an object, got {type(given).__name__}")
    title = rec.get("title")
    meta = {k: v for k, v in rec.items() if k not in _JSONL_RESERVED}
    meta.update(given)
    # The loader's own keys win: downstream code relies on "type" naming the file format.
    meta.update({"size": len(raw), "file": sf.rel_path, "line": lineno})
    return _make_document(
        sf, text, "jsonl", title=title if isinstance(title, str) else None, metadata=meta, doc_id=str(doc_id)
    )


def _load_jsonl(sf: SourceFile, data: bytes, errors: list[LoadError] | None) -> list[Document]:
    if data.startswith(_UTF16_BOMS):
        data = decode_text(sf, data).encode("utf-8")
    _reject_binary(sf, data)
    start = len(_UTF8_BOM) if data.startswith(_UTF8_BOM) else 0
    docs: list[Document] = []
    problems: list[LoadError] = []
    first_line: dict[str, int] = {}
    offset = start
    for lineno, raw in enumerate(data[start:].split(b"\n"), 1):
        line_offset, offset = offset, offset + len(raw) + 1
        if not raw.strip():
            continue
        try:
            doc = _jsonl_record(sf, raw.rstrip(b"\r"), lineno, line_offset)
        except LoadError as err:
            problems.append(err)
            continue
        if doc.doc_id in first_line:
            problems.append(
                LoadError(sf.uri, f"duplicate id '{doc.doc_id}' (first at line {first_line[doc.doc_id]})", "record", lineno)
            )
            continue
        first_line[doc.doc_id] = lineno
        docs.append(doc)
    if not docs:
        if problems:
            first = problems[0]
            raise LoadError(
                sf.uri, f"no valid records: {len(problems)} invalid line(s), first at line {first.line}: {first.reason}", "record"
            )
        raise LoadError(sf.uri, "empty: no records", "empty")
    _report(problems, errors)
    return docs


def _report(problems: list[LoadError], errors: list[LoadError] | None) -> None:
    if errors is not None:
        errors.extend(problems)
        return
    for err in problems:  # never drop a bad record silently
        log.warning("skipped %s", err)


# ---------------------------------------------------------------------------------------
# Dispatch
# ---------------------------------------------------------------------------------------

_Parser = Callable[[SourceFile, bytes, "list[LoadError] | None"], list[Document]]
_PARSERS: dict[str, _Parser] = {
    "txt": _load_txt,
    "md": _load_markdown,
    "html": _load_html,
    "pdf": _load_pdf,
    "jsonl": _load_jsonl,
}


def load_file(sf: SourceFile, cfg: LoaderConfig, errors: list[LoadError] | None = None) -> list[Document]:
    """Read and parse one file into documents.

    Dispatches by extension (:data:`FILE_TYPES`). Every format yields one document except
    JSONL, which yields one per valid line (``doc_id`` = the line's ``id``; its other fields
    and its ``metadata`` object go to ``metadata``).

    Args:
        sf: The file, from :func:`discover`.
        cfg: Loader settings (``max_file_mb``).
        errors: Receives per-record problems (bad JSONL lines) as :class:`LoadError` with a
            line number; the rest of the file still loads. When None they are logged as
            warnings instead.

    Returns:
        The documents; never empty.

    Raises:
        LoadError: the file as a whole cannot be used (unsupported type, oversized,
            unreadable, binary, invalid UTF-8, empty, corrupt or encrypted PDF, or a JSONL
            file without one valid line).
    """
    ftype = FILE_TYPES.get(sf.extension)
    if ftype is None:
        supported = ", ".join(f".{e}" for e in FILE_TYPES)
        what = f"'.{sf.extension}'" if sf.extension else "(no extension)"
        raise LoadError(sf.uri, f"unsupported file type {what}; supported: {supported}", "unsupported")
    # Size first: a 5 GB file should be refused from the listing, not after reading it.
    _check_size(sf, sf.size, cfg)
    data = read_bytes(sf)
    _check_size(sf, len(data), cfg)  # the listing may be stale or report no size
    return _PARSERS[ftype](sf, data, errors)
