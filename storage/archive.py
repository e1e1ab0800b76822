"""Safe listing, reading and extraction of uploaded zip and tar.gz archives (stdlib only).

Shared by the API (inspection of an upload) and the worker (extraction into a job's workdir): both apply
the same caps, so an upload that passes inspection also extracts.

docs/architecture.md §8 (security rules): caps on total size, entry count and compression ratio, checked before and while
extracting; no absolute paths, no ``..``, no links, no devices. Member names are validated before they
ever become paths, and extraction never follows or creates a link.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Literal

Kind = Literal["zip", "tar"]
CHUNK = 1024 * 1024
# Below this many uncompressed bytes the ratio cap does not apply (tiny files compress well and harmlessly).
RATIO_FLOOR = 1024 * 1024
JUNK_TOP = frozenset({"__MACOSX"})


class ArchiveError(ValueError):
    """The archive is unreadable, unsafe, or over a limit; the message says which member and why."""


@dataclass(frozen=True)
class Limits:
    """Caps applied while listing and again while extracting."""

    max_total_bytes: int = 32 * 1024**3
    max_entries: int = 100_000
    max_ratio: float = 200.0
    max_member_bytes: int | None = None


DEFAULT_LIMITS = Limits()
# Per upload format. A transformers directory holds the weights in bf16 (an 8 B LLM is 16 GB, a 70 B one
# 140 GB); weights compress poorly, so the ratio cap still catches a bomb, and the total only bounds the disk.
HF_LIMITS = Limits(max_total_bytes=512 * 1024**3, max_entries=10_000, max_ratio=200.0)
IMAGEFOLDER_LIMITS = Limits(max_total_bytes=8 * 1024**3, max_entries=500_000, max_ratio=200.0)
# An npz is a zip the worker inflates whole into memory (np.load): the same ratio cap as any archive.
NPZ_LIMITS = Limits(max_entries=10_000, max_ratio=200.0)


@dataclass(frozen=True)
class Entry:
    """One archive member: a normalised relative POSIX name, its uncompressed size, and whether it is a dir."""

    name: str
    size: int
    is_dir: bool
    raw_name: str

    @property
    def parts(self) -> tuple[str, ...]:
        return PurePosixPath(self.name).parts


def detect_kind(path: Path) -> Kind | None:
    """``zip`` or ``tar`` (plain or gzip/bz2/xz-compressed) by content, or None for anything else."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except (OSError, tarfile.TarError, EOFError):
        return None
    return None


def safe_name(raw: str) -> str:
    """The member name as a clean relative POSIX path; ArchiveError for absolute paths, ``..`` or odd bytes."""
    if not raw or "\x00" in raw:
        raise ArchiveError(f"member {raw!r}: empty name or NUL byte")
    if "\\" in raw:
        raise ArchiveError(f"member {raw!r}: backslash in name")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise ArchiveError(f"member {raw!r}: absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ArchiveError(f"member {raw!r}: '..' in path")
    if not parts:
        raise ArchiveError(f"member {raw!r}: empty path")
    return "/".join(parts)


def _zip_entries(path: Path, limits: Limits) -> list[Entry]:
    entries: list[Entry] = []
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            if len(infos) > limits.max_entries:
                raise ArchiveError(f"{len(infos)} entries, more than the limit of {limits.max_entries}")
            for info in infos:
                mode = (info.external_attr >> 16) & 0xFFFF
                if stat.S_ISLNK(mode):
                    raise ArchiveError(f"member {info.filename!r}: links are not allowed")
                ftype = stat.S_IFMT(mode)
                if ftype and ftype not in (stat.S_IFREG, stat.S_IFDIR):
                    raise ArchiveError(f"member {info.filename!r}: not a regular file or directory")
                if info.flag_bits & 0x1:
                    raise ArchiveError(f"member {info.filename!r}: encrypted members are not allowed")
                name = safe_name(info.filename)
                if not info.is_dir() and info.file_size > RATIO_FLOOR:
                    ratio = info.file_size / max(info.compress_size, 1)
                    if ratio > limits.max_ratio:
                        raise ArchiveError(
                            f"member {name!r}: compression ratio {ratio:.0f} exceeds {limits.max_ratio:.0f}"
                        )
                entries.append(Entry(name, 0 if info.is_dir() else info.file_size, info.is_dir(), info.filename))
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"not a readable zip archive: {exc}") from exc
    return entries


def _tar_entries(path: Path, limits: Limits) -> list[Entry]:
    entries: list[Entry] = []
    total = 0
    compressed = max(path.stat().st_size, 1)
    try:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                if len(entries) >= limits.max_entries:
                    raise ArchiveError(f"more entries than the limit of {limits.max_entries}")
                if member.issym() or member.islnk():
                    raise ArchiveError(f"member {member.name!r}: links are not allowed")
                if not (member.isfile() or member.isdir()):
                    raise ArchiveError(f"member {member.name!r}: not a regular file or directory")
                name = safe_name(member.name)
                size = member.size if member.isfile() else 0
                total += size
                if total > limits.max_total_bytes:
                    raise ArchiveError(f"uncompressed size exceeds the limit of {limits.max_total_bytes} bytes")
                # Checked per header: reaching the next header means inflating this member's data.
                if total > RATIO_FLOOR and total / compressed > limits.max_ratio:
                    raise ArchiveError(f"compression ratio {total / compressed:.0f} exceeds {limits.max_ratio:.0f}")
                entries.append(Entry(name, size, member.isdir(), member.name))
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ArchiveError(f"not a readable tar archive: {exc}") from exc
    return entries


def list_entries(path: Path, limits: Limits = DEFAULT_LIMITS) -> list[Entry]:
    """Every member of the archive at ``path``, validated against ``limits`` and the path/link rules."""
    kind = detect_kind(path)
    if kind is None:
        raise ArchiveError("not a zip or tar archive")
    entries = _zip_entries(path, limits) if kind == "zip" else _tar_entries(path, limits)
    seen: set[str] = set()
    total = 0
    for entry in entries:
        if entry.name in seen and not entry.is_dir:
            raise ArchiveError(f"member {entry.name!r} appears twice")
        seen.add(entry.name)
        if limits.max_member_bytes is not None and entry.size > limits.max_member_bytes:
            raise ArchiveError(f"member {entry.name!r} is larger than {limits.max_member_bytes} bytes")
        total += entry.size
    if total > limits.max_total_bytes:
        raise ArchiveError(f"uncompressed size {total} exceeds the limit of {limits.max_total_bytes} bytes")
    compressed = max(path.stat().st_size, 1)
    if total > RATIO_FLOOR and total / compressed > limits.max_ratio:
        raise ArchiveError(f"compression ratio {total / compressed:.0f} exceeds {limits.max_ratio:.0f}")
    files = {e.name for e in entries if not e.is_dir}
    both = files & {e.name for e in entries if e.is_dir}
    if both:
        raise ArchiveError(f"member {min(both)!r} is both a file and a directory")
    for name in files:
        # A file may not also be used as a directory ("a" and "a/b"), which would make extraction ambiguous.
        for parent in PurePosixPath(name).parents:
            if str(parent) != "." and str(parent) in files:
                raise ArchiveError(f"member {name!r} is inside {str(parent)!r}, which is a file")
    return entries


def is_junk(name: str) -> bool:
    """Whether a member is operating-system clutter (``__MACOSX/``, ``.DS_Store``, other hidden files)."""
    parts = PurePosixPath(name).parts
    return bool(parts) and (parts[0] in JUNK_TOP or any(p.startswith(".") for p in parts))


def common_root(entries: list[Entry]) -> str:
    """The single top-level folder every (non-junk) member lives in, with a trailing slash; else ``""``."""
    tops: set[str] = set()
    for entry in entries:
        if is_junk(entry.name):
            continue
        parts = entry.parts
        if len(parts) == 1 and not entry.is_dir:
            return ""
        tops.add(parts[0])
    return f"{next(iter(tops))}/" if len(tops) == 1 else ""


@contextlib.contextmanager
def open_member(path: Path, entry: Entry) -> Iterator[IO[bytes]]:
    """A binary stream of one (already listed and validated) member."""
    kind = detect_kind(path)
    if kind == "zip":
        with zipfile.ZipFile(path) as zf, zf.open(entry.raw_name) as fh:
            yield fh
        return
    with tarfile.open(path, "r:*") as tf:
        fobj = tf.extractfile(entry.raw_name)
        if fobj is None:
            raise ArchiveError(f"member {entry.name!r} is not a file")
        with fobj:
            yield fobj


def read_member(path: Path, entry: Entry, max_bytes: int) -> bytes:
    """The whole content of a small member; ArchiveError when it is larger than ``max_bytes``."""
    if entry.size > max_bytes:
        raise ArchiveError(f"member {entry.name!r} is larger than {max_bytes} bytes")
    with open_member(path, entry) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ArchiveError(f"member {entry.name!r} is larger than {max_bytes} bytes")
    return data


def _write_member(src: IO[bytes], dest: Path, declared: int, budget: int) -> int:
    """Copy one member to a new file at ``dest`` (never following links); return bytes written."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(dest, flags, 0o644)
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > declared:
                raise ArchiveError(f"member {dest.name!r} is larger than its header says")
            if written > budget:
                raise ArchiveError("uncompressed size exceeds the limit while extracting")
            out.write(chunk)
    return written


def extract(path: Path, dest: Path, limits: Limits = DEFAULT_LIMITS, strip_root: bool = False) -> list[Path]:
    """Extract the archive into ``dest`` (created, must be empty), enforcing ``limits`` while writing.

    With ``strip_root`` a single top-level folder is removed from every name. Returns the files written.
    """
    entries = list_entries(path, limits)
    root = common_root(entries) if strip_root else ""
    dest.mkdir(parents=True, exist_ok=True)
    base = dest.resolve()
    if any(base.iterdir()):
        raise ArchiveError(f"extraction target {dest} is not empty")
    remaining = limits.max_total_bytes
    written_files: list[Path] = []
    kind = detect_kind(path)

    def target(entry: Entry) -> Path | None:
        name = entry.name
        if root:
            if not name.startswith(root):
                return None  # junk outside the root folder
            name = name[len(root):]
            if not name:
                return None
        out = (base / name).resolve()
        if out != base and base not in out.parents:
            raise ArchiveError(f"member {entry.name!r} escapes the extraction folder")
        return out

    def place(entry: Entry, src: IO[bytes]) -> None:
        nonlocal remaining
        out = target(entry)
        if out is None:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        n = _write_member(src, out, entry.size, remaining)
        remaining -= n
        written_files.append(out)

    by_raw = {e.raw_name: e for e in entries}
    try:
        _extract_members(path, kind, entries, by_raw, target, place)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise ArchiveError(f"archive is corrupt: {exc}") from exc
    return written_files


def _extract_members(
    path: Path,
    kind: Kind | None,
    entries: list[Entry],
    by_raw: dict[str, Entry],
    target: Callable[[Entry], Path | None],
    place: Callable[[Entry, IO[bytes]], None],
) -> None:
    if kind == "zip":
        with zipfile.ZipFile(path) as zf:
            for entry in entries:
                if entry.is_dir:
                    out = target(entry)
                    if out is not None:
                        out.mkdir(parents=True, exist_ok=True)
                    continue
                with zf.open(entry.raw_name) as src:
                    place(entry, src)
    else:
        with tarfile.open(path, "r:*") as tf:
            for member in tf:
                known = by_raw.get(member.name)
                if known is None:
                    raise ArchiveError(f"member {member.name!r} changed between listing and extraction")
                if member.isdir():
                    out = target(known)
                    if out is not None:
                        out.mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise ArchiveError(f"member {member.name!r}: not a regular file")
                fobj = tf.extractfile(member)
                if fobj is None:
                    raise ArchiveError(f"member {member.name!r} is not a file")
                with fobj:
                    place(known, fobj)
