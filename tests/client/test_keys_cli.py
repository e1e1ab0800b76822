"""``modelpress keys create|list|revoke``: server-side on the database; ``create`` prints the key alone on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from client.cli import run
from models.db import session_scope
from models.tables import ApiKey
from tests.api.tenants import BOOTSTRAP, bearer, keyed

__all__ = ["keyed"]
BIN = Path(sys.executable).with_name("modelpress")


def _modelpress(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script (``python -m client.cli`` when missing), on this test's database."""
    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "client.cli"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, timeout=120)


def test_create_prints_only_the_key_and_the_key_works_until_revoked(
    keyed: TestClient, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    proc = _modelpress("keys", "create", "--owner", "alice", "--scope", "read", "--name", "[b]laptop")
    assert proc.returncode == 0, proc.stderr
    key = proc.stdout.strip()
    assert proc.stdout == key + "\n" and key.startswith("mp_")  # alone: KEY=$(modelpress keys create ...)
    assert "alice" in proc.stderr and "read" in proc.stderr and key not in proc.stderr
    r = keyed.get("/v1/jobs", headers=bearer(key))
    assert r.status_code == 200
    assert keyed.post("/v1/jobs", json={}, headers=bearer(key)).status_code == 403  # read scope
    with session_scope() as s:
        (row,) = s.query(ApiKey).all()
        key_id = row.id
        assert (row.owner, row.scope, row.name) == ("alice", "read", "[b]laptop")

    assert run(["keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(k["id"], k["owner"], k["scope"]) for k in listed] == [(key_id, "alice", "read")]
    assert key.rpartition("_")[2] not in json.dumps(listed)
    assert run(["keys", "list"]) == 0
    table = capsys.readouterr().out
    assert key_id in table and "[b]laptop" in table

    assert run(["keys", "revoke", key_id]) == 0
    assert "revoked" in capsys.readouterr().err
    assert keyed.get("/v1/jobs", headers=bearer(key)).status_code == 401
    assert run(["keys", "list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # revoked keys only with --all
    assert run(["keys", "list", "--all", "--json", "--owner", "alice"]) == 0
    (shown,) = json.loads(capsys.readouterr().out)
    assert shown["revoked_at"] is not None
    assert keyed.get("/v1/jobs", headers=bearer(BOOTSTRAP)).status_code == 200  # the bootstrap key still works


def test_bad_arguments_exit_2_and_store_nothing(pg_env: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["keys", "create", "--owner", "not an owner"]) == 2
    err = capsys.readouterr()
    assert err.out == "" and "--owner" in err.err
    with pytest.raises(SystemExit) as usage:
        run(["keys", "create", "--owner", "alice", "--scope", "root"])
    assert usage.value.code == 2
    assert run(["keys", "revoke", "key_nope"]) == 2
    revoke_err = capsys.readouterr().err
    assert "key_nope" in revoke_err and "not found" in revoke_err
    with session_scope() as s:
        assert s.query(ApiKey).count() == 0


def test_keys_create_on_a_fresh_home_migrates_first(tmp_path: Path) -> None:
    """Before any ``serve`` or ``migrate``: no SQLAlchemy traceback, the schema is made and the key works."""
    home = tmp_path / "fresh-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPRESS_")}
    env.update(MODELPRESS_HOME=str(home), PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    cmd = [str(BIN)] if BIN.exists() else [sys.executable, "-m", "client.cli"]
    proc = subprocess.run([*cmd, "keys", "create", "--owner", "alice"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "no such table" not in proc.stderr
    assert "migrated the database" in proc.stderr and proc.stdout.strip().startswith("mp_")
    again = subprocess.run([*cmd, "keys", "list", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "migrated" not in again.stderr  # already current: said once
    assert [k["owner"] for k in json.loads(again.stdout)] == ["alice"]
