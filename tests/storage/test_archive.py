"""Safe archive listing and extraction: path rules, links, caps on size, entries and ratio."""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from storage import archive
from storage.archive import ArchiveError, Limits
from tests.api import builders


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    path.write_bytes(builders.zip_bytes(files))
    return path


def _tar(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None, hard: bool = False) -> Path:
    path.write_bytes(builders.tar_gz_bytes(files, links, hard))
    return path


def test_list_and_extract_zip_with_root_folder(tmp_path: Path) -> None:
    src = _zip(tmp_path / "a.zip", {"model/config.json": b"{}", "model/sub/w.bin": b"1234", "__MACOSX/._x": b""})
    entries = archive.list_entries(src)
    assert {e.name: e.size for e in entries if not e.is_dir}["model/sub/w.bin"] == 4
    assert archive.common_root(entries) == "model/"
    files = archive.extract(src, tmp_path / "out", strip_root=True)
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in files) == ["config.json", "sub/w.bin"]
    assert (tmp_path / "out" / "sub" / "w.bin").read_bytes() == b"1234"


def test_tar_gz_extract_and_read_member(tmp_path: Path) -> None:
    src = _tar(tmp_path / "a.tar.gz", {"./cfg.json": b'{"a": 1}', "w/x.txt": b"hello"})
    assert archive.detect_kind(src) == "tar"
    entries = archive.list_entries(src)
    assert {e.name for e in entries} == {"cfg.json", "w/x.txt"} and archive.common_root(entries) == ""
    cfg = next(e for e in entries if e.name == "cfg.json")
    assert archive.read_member(src, cfg, 100) == b'{"a": 1}'
    with pytest.raises(ArchiveError, match="larger than 3"):
        archive.read_member(src, cfg, 3)
    archive.extract(src, tmp_path / "out")
    assert (tmp_path / "out" / "w" / "x.txt").read_text() == "hello"


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/passwd", "C:/x", "a\\..\\b"])
def test_unsafe_names_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(ArchiveError):
        archive.list_entries(_zip(tmp_path / "a.zip", {"ok.txt": b"x", name: b"y"}))
    with pytest.raises(ArchiveError):
        archive.list_entries(_tar(tmp_path / "a.tgz", {"ok.txt": b"x", name: b"y"}))
    assert not (tmp_path / "evil").exists()


def test_links_rejected(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="links"):
        archive.list_entries(_tar(tmp_path / "s.tgz", {"a": b"x"}, links={"l": "/etc/passwd"}))
    with pytest.raises(ArchiveError, match="links"):
        archive.list_entries(_tar(tmp_path / "h.tgz", {"a": b"x"}, links={"l": "a"}, hard=True))
    zpath = tmp_path / "l.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="links"):
        archive.list_entries(zpath)


def test_caps(tmp_path: Path) -> None:
    bomb = _zip(tmp_path / "bomb.zip", {"zeros": bytes(4 * 1024 * 1024)})
    with pytest.raises(ArchiveError, match="compression ratio"):
        archive.list_entries(bomb, Limits(max_ratio=100))
    tar_bomb = _tar(tmp_path / "bomb.tgz", {"zeros": bytes(4 * 1024 * 1024)})
    with pytest.raises(ArchiveError, match="compression ratio"):
        archive.list_entries(tar_bomb, Limits(max_ratio=100))
    many = _zip(tmp_path / "many.zip", {f"f{i}": b"x" for i in range(20)})
    with pytest.raises(ArchiveError, match="entries"):
        archive.list_entries(many, Limits(max_entries=10))
    big = _zip(tmp_path / "big.zip", {"a": os.urandom(3000), "b": os.urandom(3000)})
    with pytest.raises(ArchiveError, match="uncompressed size"):
        archive.list_entries(big, Limits(max_total_bytes=5000))
    with pytest.raises(ArchiveError, match="twice"):
        archive.list_entries(_tar(tmp_path / "dup.tgz", {"a": b"1", "./a": b"2"}))


def test_not_an_archive_and_nonempty_target(tmp_path: Path) -> None:
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"nothing to see here" * 10)
    assert archive.detect_kind(junk) is None
    with pytest.raises(ArchiveError, match="not a zip or tar"):
        archive.list_entries(junk)
    src = _zip(tmp_path / "a.zip", {"x": b"1"})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep").write_text("k")
    with pytest.raises(ArchiveError, match="not empty"):
        archive.extract(src, tmp_path / "busy")


def test_tar_ratio_is_checked_before_inflating_a_member(tmp_path: Path) -> None:
    # A header declaring 1 GiB followed by only 2 MiB of zeros: listing must refuse on the ratio as soon as
    # it reads the header, not inflate the member's data to reach the next header (a gzip bomb costs the
    # API minutes of CPU before the ratio check ran at the end).
    import gzip

    info = tarfile.TarInfo("zeros")
    info.size = 1024**3
    with gzip.open(tmp_path / "bomb.tgz", "wb") as gz:
        gz.write(info.tobuf())
        gz.write(bytes(2 * 1024 * 1024))
    with pytest.raises(ArchiveError, match="compression ratio"):
        archive.list_entries(tmp_path / "bomb.tgz")


def test_a_name_used_as_both_file_and_directory_is_rejected(tmp_path: Path) -> None:
    """``a`` as a file and ``a/`` as a directory would make extraction fail half-way (FileExistsError)."""
    zpath = _zip(tmp_path / "a.zip", {"a": b"x", "a/": b""})
    with pytest.raises(ArchiveError, match="both a file and a directory"):
        archive.list_entries(zpath)
    with pytest.raises(ArchiveError):
        archive.extract(zpath, tmp_path / "out")
