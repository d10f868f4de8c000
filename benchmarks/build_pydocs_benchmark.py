"""Build a retrieval benchmark from the Python documentation that Debian ships as HTML.

Corpus: one document per section (``<section id=...>``) of the pages under ``library/``,
``reference/``, ``tutorial/``, ``howto/``, ``faq/`` and ``using/`` of the Sphinx-built
Python docs (Debian package ``python3.11-doc``: ``/usr/share/doc/python3.11/html``). A
document holds the section's own text (headings, prose, code, API entries), not that of its
sub-sections, which are documents of their own. Its id is ``<page>#<section-id>``, its title
``<page title> > <section heading>``.

Queries (no hand labelling): every API entry the docs mark up as ``<dl class="py function">``
(also ``method``, ``class``, ``exception``) gives one candidate query: the first sentence of
its description, e.g. "Return the absolute value of a number." gives the query "Return the
absolute value of a number". The relevant document is the section that holds the entry. That
first sentence is then *removed* from the indexed text of the section, so the query is never
a verbatim substring of its answer; the entry's signature and the rest of its description stay.

A candidate is dropped when:

* it is shorter than 4 or longer than 40 words, or starts like a cross-reference
  ("Alias for", "See", "Same as", "Deprecated", ...);
* it names the documented object itself (its identifier as a whole word, case-sensitive,
  or its dotted name), since the name would make the lookup trivial for BM25;
* the same sentence (case- and space-normalised) describes two or more entries (e.g. "Return
  the number of elements."), since one query would then have several equally right answers;
* after the removal the sentence still occurs verbatim in any indexed document (its own
  or another page repeating it): such a query could be answered by string matching.

Splits are by page, never by query, with a fixed seed: pages are shuffled and assigned to
``test`` until it holds at least ``--test-share`` of the queries, then ``dev``, then
``train``. ``queries.jsonl``/``qrels.jsonl`` are the test split (what the results report);
``dev_*`` is for investigating settings; ``train_*`` is for training a reranker
(``benchmarks/train_reranker.py``). No page contributes queries to two splits, so a reranker
trained on ``train`` never sees a test query's relevant section as a positive.

Outputs (``--out``, default ``benchmarks/out/pydocs``)::

    corpus/<area>/<page>.jsonl   {"id", "title", "text", "metadata": {"page", "section", "area"}}
    queries.jsonl            {"qid", "query"}            test split
    qrels.jsonl              {"qid", "doc_id"}           test split
    dev_queries.jsonl, dev_qrels.jsonl, train_queries.jsonl, train_qrels.jsonl
    stats.json               counts, package and version, the settings used

Usage::

    python benchmarks/build_pydocs_benchmark.py                      # Debian's default path
    python benchmarks/build_pydocs_benchmark.py python-3.11-docs/html --out benchmarks/out/pydocs
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

DEFAULT_DOCS = Path("/usr/share/doc/python3.11/html")
DEFAULT_PACKAGE = "python3.11-doc"
AREAS = ("library", "reference", "tutorial", "howto", "faq", "using")
ENTRY_KINDS = ("function", "method", "class", "exception")
SEED = 20240611

VOID = frozenset(
    [
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "param",
        "source",
        "track",
        "wbr",
    ]
)
BLOCK = frozenset(
    [
        "p",
        "div",
        "section",
        "dl",
        "dt",
        "dd",
        "li",
        "ul",
        "ol",
        "pre",
        "table",
        "thead",
        "tbody",
        "tr",
        "td",
        "th",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "blockquote",
        "hr",
        "br",
        "figure",
        "figcaption",
        "caption",
        "aside",
        "nav",
    ]
)
SKIP_TAGS = frozenset(("script", "style"))
XREF_STARTS = (
    "alias", "an alias", "see ", "same as", "deprecated", "synonym", "identical to",
    "changed in", "new in", "added in", "this is an alias", "a deprecated alias",
)  # fmt: skip
_ABBREV = re.compile(
    r"(?:\b(?:e\.g|i\.e|etc|vs|cf|approx|resp|Ex|No|Dr|Mr|St)|\b[A-Za-z])\.$"
)
_SENT_END = re.compile(r"[.!?](?=\s+[A-Z(`\"']|\s*$)")


# ---------------------------------------------------------------------------------------
# A small DOM on the standard library's HTML parser
# ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class Node:
    """An element; ``children`` hold nodes and strings (text)."""

    tag: str
    attrs: dict[str, str]
    parent: Node | None = None
    children: list[Node | str] = field(default_factory=list)

    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def iter(self) -> Iterator[Node]:
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def find_all(self, tag: str, cls: str | None = None) -> list[Node]:
        return [
            n
            for n in self.iter()
            if n.tag == tag and (cls is None or cls in n.classes())
        ]

    def ancestors(self) -> Iterator[Node]:
        n = self.parent
        while n is not None:
            yield n
            n = n.parent


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.cur = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs}, self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.cur.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.cur))

    def handle_endtag(self, tag: str) -> None:
        # Close up to the matching open element; a stray end tag is ignored.
        n: Node | None = self.cur
        while n is not None and n.tag != tag:
            n = n.parent
        if n is not None and n.parent is not None:
            self.cur = n.parent

    def handle_data(self, data: str) -> None:
        self.cur.children.append(data)


def parse_html(text: str) -> Node:
    b = _Builder()
    b.feed(text)
    b.close()
    return b.root


def _skipped(node: Node) -> bool:
    return node.tag in SKIP_TAGS or (node.tag == "a" and "headerlink" in node.classes())


def _collapse(s: str) -> str:
    return re.sub(r"\s+", " ", s)


_PRE = "\x01"


def render(node: Node, exclude: set[int] | None = None) -> str:
    """Visible text of ``node``: blocks on their own lines, inline whitespace collapsed.

    ``exclude`` holds ``id()`` of nodes left out (nested sections).
    """
    out: list[str] = []

    def raw(n: Node) -> str:
        return "".join(
            c if isinstance(c, str) else raw(c)
            for c in n.children
            if isinstance(c, str) or not _skipped(c)
        )

    def walk(n: Node) -> None:
        if _skipped(n) or (exclude and id(n) in exclude):
            return
        if n.tag == "pre":
            # Code keeps its indentation: mark its lines so the clean-up below keeps them.
            out.append(
                "\n"
                + "\n".join(_PRE + ln for ln in raw(n).strip("\n").split("\n"))
                + "\n"
            )
            return
        block = n.tag in BLOCK
        if block:
            out.append("\n")
        for c in n.children:
            if isinstance(c, str):
                out.append(_collapse(c))
            else:
                walk(c)
        if block:
            out.append("\n")

    walk(node)
    lines = [
        ln[1:].rstrip() if ln.startswith(_PRE) else ln.strip()
        for ln in "".join(out).split("\n")
    ]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def inline_text(node: Node) -> str:
    return _collapse(render(node).replace("\n", " ")).strip()


# ---------------------------------------------------------------------------------------
# First sentences
# ---------------------------------------------------------------------------------------


def first_sentence(text: str) -> str:
    """The first sentence of a paragraph ('' when none ends within it)."""
    for m in _SENT_END.finditer(text):
        head = text[: m.start() + 1]
        if _ABBREV.search(head):
            continue
        return head.strip()
    return ""


def remove_prefix_chars(p: Node, n_chars: int) -> None:
    """Remove the first ``n_chars`` visible characters of a paragraph (as :func:`inline_text` counts them).

    Walks the text nodes in order and counts characters the way :func:`inline_text` sees
    them (leading whitespace and runs of whitespace across node boundaries collapse to one
    space), emptying what it consumes; the element structure stays (an emptied inline
    element renders as nothing).
    """
    remaining = n_chars
    last_ws = (
        True  # inline_text strips leading whitespace: it is consumed without counting
    )

    def walk(n: Node) -> bool:
        nonlocal remaining, last_ws
        for i, c in enumerate(n.children):
            if remaining <= 0:
                return True
            if isinstance(c, Node):
                if not _skipped(c) and walk(c):
                    return True
                continue
            s = _collapse(c)
            j = 0
            while j < len(s) and remaining > 0:
                ws = s[j].isspace()
                if not (ws and last_ws):
                    remaining -= 1
                last_ws = ws
                j += 1
            n.children[i] = s[j:]
        return remaining <= 0

    walk(p)


# ---------------------------------------------------------------------------------------
# Pages → sections and candidate queries
# ---------------------------------------------------------------------------------------


@dataclass
class Candidate:
    page: str
    doc_id: str
    name: str
    kind: str
    query: str


@dataclass
class SectionDoc:
    doc_id: str
    page: str
    section: str
    area: str
    title: str
    text: str


def _heading(section: Node) -> str:
    for c in section.children:
        if isinstance(c, Node) and re.fullmatch(r"h[1-6]", c.tag):
            return inline_text(c)
    return ""


def process_page(path: Path, rel: str) -> tuple[list[SectionDoc], list[Candidate]]:
    """Sections of one page as documents, and the API entries' candidate queries.

    The candidates' first sentences are removed from the page before its sections are
    rendered, so no document contains its own query sentence at that place.
    """
    root = parse_html(path.read_text(encoding="utf-8", errors="replace"))
    body = next(
        (n for n in root.find_all("div", "body") if n.attrs.get("role") == "main"), None
    )
    if body is None:
        return [], []
    sections = body.find_all("section")
    if not sections:
        return [], []
    page_title = _heading(sections[0]) or rel

    def owner(n: Node) -> Node | None:
        return next((a for a in n.ancestors() if a.tag == "section"), None)

    doc_of = {
        id(s): f"{rel}#{s.attrs.get('id', str(i))}" for i, s in enumerate(sections)
    }
    candidates: list[Candidate] = []
    for dl in body.find_all("dl"):
        cls = dl.classes()
        kind = next((k for k in ENTRY_KINDS if k in cls), None)
        if "py" not in cls or kind is None:
            continue
        dt = next(
            (c for c in dl.children if isinstance(c, Node) and c.tag == "dt"), None
        )
        dd = next(
            (c for c in dl.children if isinstance(c, Node) and c.tag == "dd"), None
        )
        sec = owner(dl)
        if dt is None or dd is None or sec is None or not dt.attrs.get("id"):
            continue
        p = next((c for c in dd.children if isinstance(c, Node) and c.tag == "p"), None)
        if p is None:
            continue
        para = inline_text(p)
        sentence = first_sentence(para)
        if not sentence:
            continue
        remove_prefix_chars(p, len(sentence))
        if (
            inline_text(p) != para[len(sentence) :].strip()
        ):  # never happened on 3.11's docs
            raise AssertionError(
                f"{rel}#{dt.attrs['id']}: removing the first sentence went wrong"
            )
        candidates.append(
            Candidate(
                rel, doc_of[id(sec)], dt.attrs["id"], kind, sentence.rstrip(".").strip()
            )
        )

    docs: list[SectionDoc] = []
    for s in sections:
        nested = {id(n) for n in s.iter() if n is not s and n.tag == "section"}
        text = render(s, exclude=nested)
        heading = _heading(s)
        if (
            len(text) <= len(heading) + 20
        ):  # a heading alone (e.g. a section of sub-sections)
            continue
        title = (
            page_title if heading in ("", page_title) else f"{page_title} > {heading}"
        )
        docs.append(
            SectionDoc(
                doc_of[id(s)],
                rel,
                s.attrs.get("id", ""),
                rel.split("/")[0],
                title,
                text,
            )
        )
    return docs, candidates


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def filter_candidates(
    cands: list[Candidate], docs: list[SectionDoc]
) -> tuple[list[Candidate], Counter[str]]:
    """Apply the drop rules of the module docstring; returns the kept ones and drop counts."""
    dropped: Counter[str] = Counter()
    doc_ids = {d.doc_id for d in docs}
    by_text: dict[str, set[str]] = defaultdict(set)
    for c in cands:
        by_text[_norm(c.query)].add(c.name)
    kept: list[Candidate] = []
    for c in cands:
        q = _norm(c.query)
        words = q.split()
        short = c.name.rsplit(".", 1)[-1]
        if c.doc_id not in doc_ids:
            dropped["section not indexed"] += 1
        elif not 4 <= len(words) <= 40:
            dropped["length"] += 1
        elif q.startswith(XREF_STARTS):
            dropped["cross-reference"] += 1
        elif (
            re.search(rf"(?<![\w.]){re.escape(short)}(?!\w)", c.query)
            or c.name in c.query
        ):
            dropped["names its object"] += 1
        elif len(by_text[q]) > 1:
            dropped["same sentence for several entries"] += 1
        else:
            kept.append(c)
    # A query whose sentence is still somewhere in the index can be answered by string match.
    corpus = "\n".join(_norm(d.text) for d in docs)
    final = []
    for c in kept:
        if _norm(c.query) in corpus:
            dropped["still verbatim in the index"] += 1
        else:
            final.append(c)
    # Several entries of one section may not share a sentence, but two entries in different
    # sections can still only be told apart by the query text: that is the task.
    return final, dropped


def split_pages(
    cands: list[Candidate], test_share: float, dev_share: float, seed: int
) -> dict[str, str]:
    """Page → split, pages shuffled with ``seed`` and filled test first, then dev, then train."""
    per_page = Counter(c.page for c in cands)
    pages = sorted(per_page)
    random.Random(seed).shuffle(pages)
    total = sum(per_page.values())
    out: dict[str, str] = {}
    test = dev = 0
    for page in pages:
        if test < test_share * total:
            out[page] = "test"
            test += per_page[page]
        elif dev < dev_share * total:
            out[page] = "dev"
            dev += per_page[page]
        else:
            out[page] = "train"
    return out


def package_version(package: str) -> str:
    try:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return "unknown (no dpkg)"
    return res.stdout.strip() or "unknown (not installed)"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "docs",
        nargs="?",
        type=Path,
        default=DEFAULT_DOCS,
        help=f"root of the Sphinx HTML docs (default {DEFAULT_DOCS}, from `apt-get install {DEFAULT_PACKAGE}`)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "out" / "pydocs",
        help="output folder",
    )
    ap.add_argument(
        "--areas",
        nargs="+",
        default=list(AREAS),
        help="sub-folders of the docs to index",
    )
    ap.add_argument(
        "--package",
        default=DEFAULT_PACKAGE,
        help="Debian package the docs came from (for the stats)",
    )
    ap.add_argument(
        "--test-share",
        type=float,
        default=0.5,
        help="share of the queries (by page) in the test split",
    )
    ap.add_argument(
        "--dev-share",
        type=float,
        default=0.15,
        help="share of the queries (by page) in the dev split",
    )
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args(argv)

    docs_root: Path = args.docs
    if not (docs_root / "library").is_dir():
        hint = (
            f" (install it with `apt-get install {DEFAULT_PACKAGE}`)"
            if docs_root == DEFAULT_DOCS
            else ""
        )
        print(
            f"error: {docs_root} is not the root of the Python HTML docs: no library/ folder there{hint}",
            file=sys.stderr,
        )
        return 2

    all_docs: list[SectionDoc] = []
    all_cands: list[Candidate] = []
    pages = 0
    for area in args.areas:
        for path in sorted((docs_root / area).glob("*.html")):
            rel = path.relative_to(docs_root).as_posix()
            docs, cands = process_page(path, rel)
            pages += bool(docs)
            all_docs.extend(docs)
            all_cands.extend(cands)
    kept, dropped = filter_candidates(all_cands, all_docs)
    splits = split_pages(kept, args.test_share, args.dev_share, args.seed)

    out: Path = args.out
    # One JSONL file per page (ids are the records' "id", not the file names): many files
    # let Ray Data overlap loading/chunking with embedding.
    if (out / "corpus").exists():
        shutil.rmtree(out / "corpus")
    per_page: dict[str, list[SectionDoc]] = defaultdict(list)
    for d in all_docs:
        per_page[d.page].append(d)
    for page, page_docs in per_page.items():
        dest = out / "corpus" / Path(page).with_suffix(".jsonl")
        dest.parent.mkdir(parents=True, exist_ok=True)
        _write_jsonl(dest, [
            {"id": d.doc_id, "title": d.title, "text": d.text, "metadata": {"page": d.page, "section": d.section, "area": d.area}}
            for d in page_docs
        ])  # fmt: skip
    by_split: dict[str, list[Candidate]] = defaultdict(list)
    for c in kept:
        by_split[splits[c.page]].append(c)
    prefix = {"test": "", "dev": "dev_", "train": "train_"}
    for split, pre in prefix.items():
        rows = sorted(by_split[split], key=lambda c: (c.page, c.name))
        _write_jsonl(
            out / f"{pre}queries.jsonl",
            [{"qid": f"{split}-{i:05d}", "query": c.query} for i, c in enumerate(rows)],
        )
        _write_jsonl(out / f"{pre}qrels.jsonl", [
            {"qid": f"{split}-{i:05d}", "doc_id": c.doc_id, "entry": c.name, "kind": c.kind} for i, c in enumerate(rows)
        ])  # fmt: skip

    chars = sum(len(d.text) for d in all_docs)
    stats = {
        "docs_root": str(docs_root),
        "package": args.package,
        "package_version": package_version(args.package),
        "areas": args.areas,
        "pages": pages,
        "documents": len(all_docs),
        "document_chars": chars,
        "candidate_queries": len(all_cands),
        "dropped": dict(dropped),
        "queries": {s: len(by_split[s]) for s in prefix},
        "pages_per_split": dict(Counter(splits.values())),
        "relevant_docs_per_split": {
            s: len({c.doc_id for c in by_split[s]}) for s in prefix
        },
        "query_kinds": dict(Counter(c.kind for c in kept)),
        "seed": args.seed,
    }
    (out / "stats.json").write_text(
        json.dumps(stats, indent=2) + "\n", encoding="utf-8"
    )
    print(json.dumps(stats, indent=2))
    print(
        f"wrote {out}/corpus/ ({len(per_page)} JSONL files, one per page) and queries/qrels for test, dev, train"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
