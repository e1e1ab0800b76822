"""imagefolder inspection: classes and counts from member names, zip or tar, nothing decoded."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.inspection import InspectionError, inspect_imagefolder
from tests.api import builders


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "up-staged"
    path.write_bytes(data)
    return path


def test_a_tar_without_a_top_folder(tmp_path: Path) -> None:
    files = {"b/1.png": b"1", "a/1.jpg": b"2", "a/2.jpeg": b"3", "LICENSE": b"mit", "a/.DS_Store": b""}
    meta = inspect_imagefolder(_write(tmp_path, builders.tar_gz_bytes(files)))
    assert meta["num_samples"] == 3 and meta["classes"] == ["a", "b"]
    assert meta["class_counts"] == {"a": 2, "b": 1} and meta["root"] == "" and meta["archive"] == "tar"
    assert meta["fields"] == {"image": {"dtype": "image"}, "label": {"dtype": "str"}}


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ({"1.png": b"x"}, "does not fit the layout"),
        ({"README.md": b"only text"}, "holds no images"),
    ],
)
def test_refusals(tmp_path: Path, files: dict[str, bytes], needle: str) -> None:
    with pytest.raises(InspectionError, match=needle):
        inspect_imagefolder(_write(tmp_path, builders.zip_bytes(files)))


def test_links_are_refused(tmp_path: Path) -> None:
    data = builders.tar_gz_bytes({"cat/1.png": b"x"}, symlinks={"cat/2.png": "/etc/passwd"})
    with pytest.raises(InspectionError, match="links are not allowed"):
        inspect_imagefolder(_write(tmp_path, data))
