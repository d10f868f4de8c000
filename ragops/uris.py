"""Reading user input files from a local path or a URI, through pyarrow filesystems.

Commands that run as cluster jobs take their inputs as paths or URIs (``s3://``, ``gs://``,
``hdfs://``, ...): the same code path reads both, so a job spec differs from a laptop run only
in the location it names.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow.fs as pafs

from ragops.errors import InputError


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` names a filesystem URI (``scheme://...``) rather than a local path."""
    # "C:\\docs" has a one-letter "scheme"; real URI schemes are longer.
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", str(location)) is not None


def filesystem_for(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding ``location`` and the path inside it.

    Raises:
        InputError: a URI whose scheme pyarrow cannot open (the message names it).
    """
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    try:
        return pafs.FileSystem.from_uri(str(location))
    except (ValueError, OSError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise InputError(f"{location}: cannot open this location ({exc})") from None


def read_text(location: str | Path) -> str:
    """The UTF-8 text of a file at a local path or URI.

    Raises:
        InputError: not found, a folder, unreadable, or not UTF-8 (one message naming the file).
    """
    raw = read_bytes(location)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{location}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_bytes(location: str | Path) -> bytes:
    """The bytes of a file at a local path or URI (errors as in :func:`read_text`)."""
    fs, path = _existing_file(location)
    try:
        with fs.open_input_stream(path) as fh:
            return fh.read()
    except OSError as exc:
        raise InputError(f"{location}: cannot read ({exc})") from None


def _existing_file(location: str | Path) -> tuple[pafs.FileSystem, str]:
    fs, path = filesystem_for(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{location}: file not found")
    if info.type == pafs.FileType.Directory:
        raise InputError(f"{location}: is a folder, expected a file")
    return fs, path


def expand_files(location: str | Path, suffix: str) -> list[str]:
    """Files named by ``location``: a file, a folder (its ``*<suffix>`` files) or a glob.

    Local results are plain paths; remote ones keep their URI scheme, so they can be read
    back with :func:`read_text`. A glob's wildcards apply to the last path component.

    Raises:
        InputError: the location does not exist (a glob matching nothing returns ``[]``).
    """
    import fnmatch

    text = str(location)
    if not is_uri(text) and any(c in text for c in "*?["):
        import glob

        return sorted(m for m in glob.glob(str(Path(text).expanduser())) if Path(m).is_file())
    fs, path = filesystem_for(location)
    scheme = text.split("://", 1)[0] + "://" if is_uri(text) else ""

    def named(p: str) -> str:
        return scheme + p if scheme else p

    if any(c in Path(path).name for c in "*?["):
        parent, pattern = path.rsplit("/", 1) if "/" in path else ("", path)
        if fs.get_file_info(parent).type != pafs.FileType.Directory:
            return []
        infos = fs.get_file_info(pafs.FileSelector(parent, recursive=False))
        return sorted(named(i.path) for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.base_name, pattern))
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [named(path) if scheme else str(Path(text).expanduser())]
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
        return sorted(named(i.path) for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(suffix))
    raise InputError(f"'{location}' not found")
