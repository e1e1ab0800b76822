"""api.deps: who a request acts as (bootstrap key, per-owner key, open server, page session) and its scope."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from api import deps
from api.services import sessions
from api.services.keys import Principal
from models.db import session_scope
from models.settings import Settings
from models.tables import Job, Model
from tests.api import builders
from tests.api.conftest import blobs, temp_files
from tests.api.tenants import BOOTSTRAP, bearer, keyed, make_key

__all__ = ["keyed"]
HTML = {"Accept": "text/html"}


def test_scopes_include_the_ones_below() -> None:
    read, write, admin = (Principal("o", s) for s in ("read", "write", "admin"))
    assert [read.allows(s) for s in ("read", "write", "admin")] == [True, False, False]
    assert [write.allows(s) for s in ("read", "write", "admin")] == [True, True, False]
    assert [admin.allows(s) for s in ("read", "write", "admin")] == [True, True, True]
    assert Principal("o", "write", "key_1").bucket == "key_1" and Principal("o", "admin").bucket == "owner:o"


def test_the_bootstrap_key_stays_the_local_admin_and_per_owner_keys_act_as_their_owner(pg_env: str) -> None:
    closed = Settings(api_key=BOOTSTRAP)
    _, alice = make_key("alice", "read")
    assert deps.principal_for_key(closed, BOOTSTRAP) == Principal("local", "admin", None)
    assert deps.principal_for_key(closed, None) is None
    assert deps.principal_for_key(closed, "wrong") is None
    found = deps.principal_for_key(closed, alice)
    assert found is not None and (found.owner, found.scope) == ("alice", "read") and found.key_id
    assert deps.owner_for_key(closed, alice) == "alice"
    # An open server (no bootstrap key): no key or any other token is the local owner, as before;
    # a per-owner key still acts as its owner, and a broken one is refused.
    open_ = Settings(api_key=None)
    assert deps.principal_for_key(open_, None) == Principal("local", "admin", None)
    assert deps.principal_for_key(open_, "anything") == Principal("local", "admin", None)
    assert deps.owner_for_key(open_, alice) == "alice"
    assert deps.principal_for_key(open_, alice[:-2]) is None


def test_a_read_key_reads_and_is_refused_every_write_before_anything_is_stored(
    keyed: TestClient, storage_dir: Path
) -> None:
    _, read = make_key("alice", "read")
    model_id = builders.insert_model(owner="alice")
    job_id = builders.insert_job(model_id, owner="alice")
    assert keyed.get(f"/v1/jobs/{job_id}", headers=bearer(read)).status_code == 200
    assert keyed.get(f"/v1/models/{model_id}", headers=bearer(read)).status_code == 200
    for method, path, kw in (
        ("PUT", "/v1/models?name=m&format=onnx", {"content": builders.onnx_bytes(seed=3)}),
        ("POST", "/v1/datasets", {"files": {"file": ("d.npz", b"x")}, "data": {"format": "npz"}}),
        ("POST", "/v1/jobs", {"json": {"model": model_id, "steps": [{"type": "quantize"}]}}),
        ("POST", f"/v1/jobs/{job_id}/cancel", {}),
    ):
        r = keyed.request(method, path, headers=bearer(read), **kw)  # type: ignore[arg-type]
        assert r.status_code == 403, (method, path, r.text)
        body = r.json()
        assert body["code"] == "insufficient_scope" and "'read'" in body["detail"] and "'write'" in body["detail"]
    with session_scope() as s:
        assert s.query(Model).count() == 1 and s.query(Job).count() == 1
        job = s.get(Job, job_id)
        assert job is not None and job.status == "queued"
    assert blobs(storage_dir) == [] and temp_files(storage_dir) == []


def test_a_page_session_signed_in_with_a_key_carries_its_owner_and_ends_when_the_key_is_revoked(
    keyed: TestClient,
) -> None:
    key_id, alice = make_key("alice", "write")
    mine = builders.insert_job(builders.insert_model(owner="alice"), owner="alice")
    theirs = builders.insert_job(builders.insert_model())
    r = keyed.post("/login", data={"key": alice, "next": "/"}, follow_redirects=False)
    assert r.status_code == 303 and sessions.COOKIE in r.cookies
    claim = sessions.claim_of(Settings(api_key=BOOTSTRAP), r.cookies[sessions.COOKIE])
    assert claim == sessions.Claim("alice", key_id)
    page = keyed.get("/", headers=HTML)
    assert page.status_code == 200 and mine in page.text and theirs not in page.text
    assert keyed.get(f"/v1/jobs/{theirs}/report.html", headers=HTML).status_code == 404
    assert keyed.get(f"/v1/jobs/{mine}", headers={"Accept": "application/json"}).status_code == 200
    # The cookie never writes, even for a write key.
    assert keyed.post(f"/v1/jobs/{mine}/cancel").status_code == 401
    revoked = keyed.post(f"/v1/keys/{key_id}/revoke", headers=bearer(BOOTSTRAP))
    assert revoked.status_code == 200
    after = keyed.get("/", headers=HTML, follow_redirects=False)
    assert after.status_code == 303 and after.headers["location"].startswith("/login")
    assert keyed.get(f"/v1/jobs/{mine}").status_code == 401


def test_a_key_session_cannot_be_moved_to_another_owner(keyed: TestClient) -> None:
    key_id, _ = make_key("alice")
    settings = Settings(api_key=BOOTSTRAP)
    forged = sessions.issue(settings, "bob", key_id=key_id)  # signed, but alice's key names bob
    assert deps.session_principal(settings, forged) is None
    good = deps.session_principal(settings, sessions.issue(settings, "alice", key_id=key_id))
    assert good == Principal("alice", "read", key_id)
    assert deps.session_principal(settings, sessions.issue(settings, "local")) == Principal("local", "read", None)
    assert deps.session_principal(settings, sessions.issue(settings, "bob")) is None  # bootstrap names local only
