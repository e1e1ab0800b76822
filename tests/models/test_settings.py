"""Settings fill embedded defaults under MODELPRESS_HOME and refuse inconsistent time limits."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from models.ids import new_id
from models.settings import Settings


def test_embedded_defaults_live_under_home(tmp_path: Path) -> None:
    s = Settings(home=tmp_path)
    assert s.database_url == f"sqlite:///{tmp_path / 'modelpress.db'}"
    assert s.broker_url == f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    assert s.blob_dir == tmp_path / "storage"
    assert s.max_upload_bytes is None  # no cap beyond the disk and the quota
    assert s.visibility_timeout > s.task_hard_time_limit > s.task_soft_time_limit


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELPRESS_DATABASE_URL", "postgresql+psycopg://x@h/db")
    monkeypatch.setenv("MODELPRESS_MAX_UPLOAD_BYTES", "1234")
    s = Settings(home=tmp_path)
    assert s.database_url == "postgresql+psycopg://x@h/db" and s.max_upload_bytes == 1234


def test_soft_limit_must_be_below_hard_limit(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="soft_time_limit"):
        Settings(home=tmp_path, task_soft_time_limit=100, task_hard_time_limit=100)


def test_ids_sort_by_creation_time() -> None:
    import time

    a = new_id("job")
    time.sleep(0.002)
    b = new_id("job")
    assert a.startswith("job_") and len(a) == 30 and a < b


@pytest.mark.parametrize("key", ["", "   ", "\t"])
def test_an_empty_api_key_is_a_configuration_error(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValidationError, match="MODELPRESS_API_KEY is set but empty"):
        Settings(home=tmp_path, api_key=key)
    assert Settings(home=tmp_path).api_key is None  # unset: no authentication, as before


def test_docs_are_public_by_default_only_without_a_key(tmp_path: Path) -> None:
    assert Settings(home=tmp_path).docs_are_public
    assert not Settings(home=tmp_path, api_key="k").docs_are_public
    assert Settings(home=tmp_path, api_key="k", public_docs=True).docs_are_public
    assert not Settings(home=tmp_path, public_docs=False).docs_are_public
