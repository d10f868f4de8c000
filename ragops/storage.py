"""Storage: a folder on the local disk or on object storage, through :mod:`pyarrow.fs`.

The artifact registry (:mod:`ragops.artifacts`) and the run registry (:mod:`ragops.runs`) keep
their manifests and files here, so either can live on S3/GCS. Writes of whole files are atomic
on a local disk (temp file + rename); on object storage a written object appears whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragops.errors import ConfigError, InputError

if TYPE_CHECKING:
    import pyarrow.fs as pafs


class Storage:
    """A folder on the local disk or on object storage, addressed by relative paths.

    Args:
        root: A local path or a URI (``s3://bucket/prefix``, ``gs://...``, ``file:///...``).
    """

    fs: pafs.FileSystem

    def __init__(self, root: str | Path) -> None:
        import pyarrow.fs as pafs

        text = str(root)
        if "://" in text and not text.startswith("file://"):
            try:
                fs, base = pafs.FileSystem.from_uri(text)
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad URIs
                raise ConfigError(f"storage location '{text}' cannot be opened: {exc}") from None
            self.fs = fs
            self.base = base.rstrip("/")
            self.local = False
        else:
            path = Path(text.removeprefix("file://")).expanduser().resolve()
            self.fs = pafs.LocalFileSystem()
            self.base = path.as_posix()
            self.local = True
        self.root = text

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    def path(self, *parts: str) -> str:
        """Filesystem path (no scheme) of ``parts`` under the root."""
        return "/".join([self.base, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """What to show or hand to Ray: a local path, or the URI with its scheme."""
        if self.local:
            return self.path(*parts)
        scheme = self.root.split("://", 1)[0]
        return f"{scheme}://{self.path(*parts)}"

    def local_path(self, *parts: str) -> Path | None:
        """A :class:`Path` when the storage is local, else None."""
        return Path(self.path(*parts)) if self.local else None

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_text(self, *parts: str) -> str | None:
        """The file's text, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(self.path(*parts)) as fh:
                return fh.read().decode("utf-8")
        except (FileNotFoundError, OSError):
            return None

    def write_text(self, rel: str, text: str) -> None:
        """Write a whole file; atomic on a local disk (temp file + rename)."""
        if self.local:
            target = Path(self.path(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return
        parent = self.path(rel).rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(self.path(rel)) as fh:
            fh.write(text.encode("utf-8"))

    def append_text(self, rel: str, text: str) -> None:
        """Append to a file (object stores have no append: the file is rewritten)."""
        if self.local:
            target = Path(self.path(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
            return
        self.write_text(rel, (self.read_text(rel) or "") + text)

    def read_json(self, *parts: str) -> Any:
        text = self.read_text(*parts)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise InputError(f"{self.uri(*parts)}: not valid JSON ({exc})") from None

    def write_json(self, rel: str, data: Any) -> None:
        self.write_text(rel, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def list_dirs(self, *parts: str) -> list[str]:
        """Names of the sub-folders of a folder (empty when it does not exist)."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.Directory)

    def list_files(self, *parts: str) -> list[str]:
        """Relative paths of the files under a folder, recursively."""
        import pyarrow.fs as pafs

        root = self.path(*parts)
        selector = pafs.FileSelector(root, allow_not_found=True, recursive=True)
        return sorted(i.path[len(root) + 1 :] for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File)

    def upload(self, local_file: Path, rel: str) -> None:
        """Copy one local file to ``rel``."""
        if self.local:
            target = Path(self.path(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local_file, target)
            return
        import pyarrow.fs as pafs

        parent = self.path(rel).rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        pafs.copy_files(str(local_file), self.path(rel), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download_dir(self, rel: str, dest: Path) -> Path:
        """Copy a folder to the local ``dest`` (replaced atomically) and return it."""
        import pyarrow.fs as pafs

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        pafs.copy_files(self.path(rel), str(tmp), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        return dest

    def download_file(self, rel: str, dest: Path) -> Path:
        """Copy one file to the local ``dest`` (replaced atomically) and return it."""
        import pyarrow.fs as pafs

        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
        os.close(fd)
        try:
            pafs.copy_files(self.path(rel), tmp, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return dest

    def delete_dir(self, *parts: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_dir(self.path(*parts))

    @contextlib.contextmanager
    def lock(self, rel: str) -> Iterator[None]:
        """An exclusive lock for read-modify-write of ``rel`` (local disks; a no-op elsewhere)."""
        if not self.local:
            yield
            return
        target = Path(self.path(rel))
        lock_path = target.with_name(f".{target.name}.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
