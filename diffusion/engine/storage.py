"""Files anywhere fsspec reaches (``s3://``, ``gs://``, ``memory://``, ``file://``...) beside local paths.

Reading copies a remote file to a local one first (``download``, ``local_copy``), so that it is then read as any
local file. Writing (``upload``, ``put_atomically``, ``copy_atomically``) goes to a hidden temporary name beside the
destination, ``.<name>.<uuid>.tmp``, which is then moved into place: a reader never sees a partial file.
"""

from __future__ import annotations

import os
import posixpath
import re
import tempfile
import uuid
from pathlib import Path

from diffusion.errors import ConfigError, PathNotFound

# a URL: a scheme of two or more letters, then "://" (a Windows drive letter "C:\" is a local path)
URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")
# the temporary names uploads write before moving into place
TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")


def is_url(path: object) -> bool:
    """Whether ``path`` is a URL fsspec opens rather than a local path."""
    return isinstance(path, str) and URL.match(path) is not None


def url_to_fs(url: str):
    """``(filesystem, path within it)`` for ``url``; a missing back-end package is named with its install line."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as error:
        raise ConfigError(f"{url!r} needs a file-system package that is not installed ({error}): "
                          "pip install 'diffusion[remote]' (s3fs, gcsfs) or the fsspec back-end for that scheme") \
            from error


def joined(url: str, *parts: str) -> str:
    """``url`` (or a local path) with ``parts`` appended, separated by ``/``."""
    return "/".join([str(url).rstrip("/"), *(part.strip("/") for part in parts)])


def is_file(url: str) -> bool:
    """Whether ``url`` names a file (not a folder, not nothing)."""
    fs, path = url_to_fs(url)
    return fs.isfile(path)


def is_dir(url: str) -> bool:
    """Whether ``url`` names a folder (on object stores: a prefix that holds files)."""
    fs, path = url_to_fs(url)
    return fs.isdir(path)


def download(url: str, destination: str | Path) -> Path:
    """Copy the file at ``url`` to the local ``destination`` atomically (a temporary file beside it, then renamed)."""
    fs, path = url_to_fs(url)
    if not fs.isfile(path):
        raise PathNotFound(f"{url!r} does not exist (or is a folder): pass the URL of a file")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(temporary_name(destination.name))
    try:
        fs.get_file(path, str(tmp))
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return destination


def local_copy(url: str) -> Path:
    """A local copy of the file at ``url`` in a new temporary folder (``TMPDIR`` chooses where); the caller deletes
    it (``discard_local_copy``)."""
    folder = Path(tempfile.mkdtemp(prefix="diffusion-"))
    try:
        return download(url, folder / (posixpath.basename(url.rstrip("/")) or "file"))
    except BaseException:
        folder.rmdir()
        raise


def discard_local_copy(path: Path) -> None:
    """Delete what ``local_copy`` made: the file and its temporary folder."""
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:
        pass


def upload(local: str | Path, url: str) -> None:
    """Copy the local file ``local`` to ``url`` atomically: a reader sees the old file or the whole new one."""
    fs, path = url_to_fs(url)
    put_atomically(fs, local, path)


def temporary_name(name: str) -> str:
    """The hidden name a file is written under before it is moved to ``name``: ``.<name>.<uuid>.tmp``."""
    return f".{name}.{uuid.uuid4().hex}.tmp"


def put_atomically(fs, local: str | Path, path: str) -> None:
    """``fs.put_file`` to a temporary name beside ``path``, then ``fs.mv`` into place."""
    tmp = posixpath.join(posixpath.dirname(path), temporary_name(posixpath.basename(path)))
    try:
        try:
            fs.put_file(str(local), tmp)
        except FileNotFoundError:  # a local destination folder that does not exist yet (object stores have none)
            if not Path(local).is_file():
                raise
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
            fs.put_file(str(local), tmp)
        fs.mv(tmp, path)
    except BaseException:
        remove_quietly(fs, tmp)
        raise


def copy_atomically(fs, source: str, path: str) -> None:
    """Copy ``source`` to ``path`` within ``fs`` (server-side on object stores) through a temporary name."""
    tmp = posixpath.join(posixpath.dirname(path), temporary_name(posixpath.basename(path)))
    try:
        fs.copy(source, tmp)
        fs.mv(tmp, path)
    except BaseException:
        remove_quietly(fs, tmp)
        raise


def remove_quietly(fs, path: str) -> None:
    """Delete ``path`` if it is there; a failure is ignored (what is left is a hidden temporary name)."""
    try:
        if fs.exists(path):
            fs.rm_file(path)
    except Exception:  # noqa: BLE001 - the upload's own error is the one to report
        pass
