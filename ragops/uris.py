"""Reading user input files from a local path or a URI, through pyarrow filesystems.

Commands that run as cluster jobs take their inputs as paths or URIs (``s3://``, ``gs://``,
``hdfs://``, ...): the same code path reads both, so a job spec differs from a laptop run only
in the location it names.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from ragops.errors import InputError


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` names a filesystem URI (``scheme://...``) rather than a local path."""
    return "://" in str(location)


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
    fs, path = filesystem_for(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{location}: file not found")
    if info.type == pafs.FileType.Directory:
        raise InputError(f"{location}: is a folder, expected a file")
    try:
        with fs.open_input_stream(path) as fh:
            raw = fh.read()
    except OSError as exc:
        raise InputError(f"{location}: cannot read ({exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{location}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
