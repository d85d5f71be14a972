"""Tar shards: per-image outputs packed into a few large files, in the layout the ``webdataset``
package reads (``wds.WebDataset("OUT/shards/shard-{000000..000009}.tar")``).

A shard is a POSIX tar whose members are named ``KEY.EXT``: the files of one image share a ``KEY``
and follow each other (``0001.cams.npz``, ``0001.mask.png``, ``0001.json``, then the next image), as
webdataset groups them. ``KEY`` is the image's file stem (:func:`wsl.cam.files.file_stem`) with ``%``
and ``.`` escaped as ``%25`` and ``%2E`` (:func:`shard_key`): webdataset takes the key up to the
first dot of a member's name, so a key cannot hold one.

Shards are written with the standard library's :mod:`tarfile` into a temporary file that is renamed
into place when the shard is complete (:func:`wsl.utils.io.atomic_path`), so a shard that exists is
whole: after a kill the unfinished shard's images are computed again, never half-read. Member headers
carry fixed times and owners, so a shard's bytes depend only on its content.
"""
from __future__ import annotations

import contextlib
import io
import tarfile
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from wsl.errors import DataError
from wsl.utils.io import PathLike, atomic_path

SHARD_DIR = "shards"
SHARD_PATTERN = "shard-{:06d}.tar"


def shard_key(stem: str) -> str:
    """The webdataset key of a file stem: ``%`` -> ``%25``, ``.`` -> ``%2E`` (keys hold no dot)."""
    return stem.replace("%", "%25").replace(".", "%2E")


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def shard_paths(directory: PathLike) -> List[Path]:
    """The finished shards of ``directory`` (its ``shards/`` folder, or itself), sorted; temporaries of
    unfinished ones are not listed."""
    root = Path(directory)
    if (root / SHARD_DIR).is_dir():
        root = root / SHARD_DIR
    return sorted(p for p in root.glob("shard-*.tar") if not p.name.startswith("."))


def has_shards(directory: PathLike) -> bool:
    return Path(directory).is_dir() and bool(shard_paths(directory))


def plan_shards(batches: Sequence[Sequence[int]], images_per_shard: int) -> List[List[List[int]]]:
    """Group consecutive batches into shards of at least ``images_per_shard`` images (the last may hold
    fewer): whole batches, so every image is computed in the same batch as in a per-file export."""
    if images_per_shard < 1:
        raise ValueError(f"images per shard must be >= 1, got {images_per_shard}")
    shards: List[List[List[int]]] = []
    current: List[List[int]] = []
    count = 0
    for batch in batches:
        current.append(list(batch))
        count += len(batch)
        if count >= images_per_shard:
            shards.append(current)
            current, count = [], 0
    if current:
        shards.append(current)
    return shards


class ShardWriter:
    """Writes one shard: ``add(key, {ext: bytes})`` per image, then the shard appears under its name
    when the ``with`` block ends without error (nothing appears otherwise)."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._stack: Optional[contextlib.ExitStack] = None
        self._tar: Optional[tarfile.TarFile] = None
        self.keys: List[str] = []

    def __enter__(self) -> "ShardWriter":
        stack = contextlib.ExitStack()
        tmp = stack.enter_context(atomic_path(self.path))
        self._tar = stack.enter_context(tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT))
        self._stack = stack
        return self

    def add(self, key: str, members: Mapping[str, bytes]) -> None:
        if "." in key or "/" in key or not key:
            raise ValueError(f"shard key {key!r} must be non-empty without '.' or '/' (use shard_key)")
        assert self._tar is not None, "ShardWriter.add outside its with block"
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self.keys.append(key)

    def __exit__(self, *exc: Any) -> Optional[bool]:
        stack, self._stack, self._tar = self._stack, None, None
        assert stack is not None
        return stack.__exit__(*exc)  # closes the tar, then renames it into place (or removes it on error)


def _split(name: str) -> Tuple[str, str]:
    key, dot, ext = Path(name).name.partition(".")
    return key, ext if dot else ""


def iter_shard(path: PathLike) -> Iterator[Tuple[str, Dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per image of a shard, in the order written, reading it once from start to
    end (memory: one image's files)."""
    path = Path(path)
    try:
        with tarfile.open(path, "r:") as tar:
            key, files = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split(member.name)
                if k != key and key is not None:
                    yield key, files
                    files = {}
                key = k
                f = tar.extractfile(member)
                files[ext] = f.read() if f is not None else b""
            if key is not None:
                yield key, files
    except tarfile.TarError as e:
        raise DataError(f"{path}: unreadable tar shard ({e}); write it again (--resume recomputes missing shards "
                        "once the broken one is deleted)") from e


class ShardIndex:
    """Random access to the members of a set of shards: ``read(key, ext)`` seeks straight to the bytes.
    Built from the tar headers alone (no member is read); holds ``(shard, offset, size)`` per member."""

    def __init__(self, paths: Sequence[PathLike]) -> None:
        self.paths = [Path(p) for p in paths]
        self.members: Dict[Tuple[str, str], Tuple[int, int, int]] = {}
        for s, path in enumerate(self.paths):
            try:
                with tarfile.open(path, "r:") as tar:
                    for member in tar:
                        if member.isfile():
                            k, ext = _split(member.name)
                            if (k, ext) in self.members:
                                other = self.paths[self.members[(k, ext)][0]]
                                raise DataError(f"{path}: {member.name} is also in {other}; one image must be in "
                                                "one shard (two exports mixed in one folder?)")
                            self.members[(k, ext)] = (s, member.offset_data, member.size)
            except tarfile.TarError as e:
                raise DataError(f"{path}: unreadable tar shard ({e})") from e

    def __contains__(self, item: Tuple[str, str]) -> bool:
        return item in self.members

    def where(self, key: str, ext: str) -> Path:
        return self.paths[self.members[(key, ext)][0]]

    def read(self, key: str, ext: str) -> bytes:
        s, offset, size = self.members[(key, ext)]
        with open(self.paths[s], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise DataError(f"{self.paths[s]}: {key}.{ext} is cut short; the shard is damaged, write it again")
        return data


__all__ = ["SHARD_DIR", "SHARD_PATTERN", "shard_key", "shard_name", "shard_paths", "has_shards", "plan_shards",
           "ShardWriter", "iter_shard", "ShardIndex"]
