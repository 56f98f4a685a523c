"""Reading the shards of a shard set, local or remote: whole-shard copies in a local cache, checked by CRC-32, then one
read per image."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import uuid
import zlib
from pathlib import Path

from diffusion.engine.storage import is_url, url_to_fs

log = logging.getLogger(__name__)

CHUNK = 1 << 22


class ShardFiles:
    """The shard files of ``root`` (a local folder or an fsspec URL): ``path(name)`` is a local file holding the shard,
    the shard itself for a local root, else a copy in ``cache_dir`` downloaded once per machine (a lock file keeps
    the processes and loader workers of one machine from fetching the same shard twice).

    Args:
        root: the folder of ``shards.json``.
        cache_dir: where copies of remote shards go (null: ``~/.cache/diffusion/shards``); a folder per root.
    """

    def __init__(self, root: str, cache_dir: str | None = None) -> None:
        self.root = str(root).rstrip("/")
        self.remote = is_url(self.root)
        if self.remote:
            self.fs, self.base = url_to_fs(self.root)
            digest = hashlib.sha256(self.root.encode()).hexdigest()[:16]
            self.cache = Path(cache_dir or Path.home() / ".cache" / "diffusion" / "shards").expanduser() / digest
        else:
            self.base = str(Path(self.root).expanduser())

    def read_text(self, name: str) -> str:
        """A small file of the root, e.g. the index."""
        if self.remote:
            with self.fs.open(f"{self.base}/{name}", "rb") as f:
                return f.read().decode()
        return Path(self.base, name).read_text()

    def sizes(self) -> dict[str, int]:
        """The byte size of every file in the root, by name (one listing, also for a remote root)."""
        if self.remote:
            return {Path(entry["name"]).name: int(entry["size"]) for entry in self.fs.ls(self.base, detail=True)
                    if entry.get("type") == "file"}
        return {entry.name: entry.stat().st_size for entry in os.scandir(self.base) if entry.is_file()}

    def where(self, name: str) -> str:
        """The shard as a user reads its name: its URL or its path."""
        return f"{self.root}/{name}"

    def path(self, name: str, size: int) -> Path:
        """A local file with the shard's bytes: the shard, or its cached copy, fetched when missing or of another
        size than ``size`` (a copy cut short)."""
        if not self.remote:
            return Path(self.base, name)
        local = self.cache / name
        if local.is_file() and local.stat().st_size == size:
            return local
        self.cache.mkdir(parents=True, exist_ok=True)
        with open(self.cache / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another process of this machine may be fetching it
            if not (local.is_file() and local.stat().st_size == size):
                self.fetch(name, local)
        return local

    def fetch(self, name: str, local: Path) -> None:
        """Copy the shard from the root into ``local`` through a temporary file."""
        temporary = local.with_name(f".{name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.fs.get_file(f"{self.base}/{name}", str(temporary))
            os.replace(temporary, local)
        finally:
            temporary.unlink(missing_ok=True)

    def evict(self, name: str) -> None:
        """Drop the cached copy of a shard (a copy that fails its check is fetched again once)."""
        if self.remote:
            (self.cache / name).unlink(missing_ok=True)


def crc32_of(path: Path) -> int:
    """The CRC-32 of a file's bytes."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc
