"""/v1/keys and api.services.keys: per-owner keys made by an admin, stored as a digest, scoped, revocable."""

from __future__ import annotations

import hashlib
import time
from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy import update

from api.services import keys
from models.db import session_scope
from models.tables import ApiKey, Model, utcnow
from tests.api import builders
from tests.api.tenants import BOOTSTRAP, bearer, keyed, make_key

__all__ = ["keyed"]
ADMIN = bearer(BOOTSTRAP)
PROBLEM = "application/problem+json"


def _row(key_id: str) -> ApiKey:
    with session_scope() as s:
        row = s.get(ApiKey, key_id)
        assert row is not None
        return row


def test_an_admin_makes_a_key_shown_once_and_stored_only_as_its_digest(keyed: TestClient) -> None:
    r = keyed.post("/v1/keys", json={"owner": "alice", "scope": "write", "name": "laptop"}, headers=ADMIN)
    assert r.status_code == 201, r.text
    body = r.json()
    key = body["key"]
    assert key.startswith("mp_") and len(key) > 60 and r.headers["cache-control"] == "no-store"
    assert r.headers["location"] == f"/v1/keys/{body['id']}"
    assert {k: body[k] for k in ("owner", "scope", "name", "last_used_at", "revoked_at")} == {
        "owner": "alice", "scope": "write", "name": "laptop", "last_used_at": None, "revoked_at": None}
    row = _row(body["id"])
    assert row.secret_sha256 == hashlib.sha256(key.encode()).hexdigest()
    secret = key.rpartition("_")[2]
    assert all(secret not in str(getattr(row, c.name)) for c in ApiKey.__table__.columns)
    # Never shown again: not by id, not in the list.
    shown = keyed.get(f"/v1/keys/{body['id']}", headers=ADMIN)
    assert shown.status_code == 200 and "key" not in shown.json() and secret not in shown.text
    listed = keyed.get("/v1/keys", headers=ADMIN)
    assert [k["id"] for k in listed.json()["data"]] == [body["id"]] and secret not in listed.text
    # The key acts as its owner: an upload with it belongs to alice.
    up = keyed.put("/v1/models", params={"name": "m", "format": "onnx"}, content=builders.onnx_bytes(),
                   headers=bearer(key))
    assert up.status_code == 201, up.text
    with session_scope() as s:
        model = s.get(Model, up.json()["id"])
        assert model is not None and model.owner == "alice"
    assert keyed.get("/v1/models", headers=ADMIN).json()["data"] == []  # the bootstrap owner is someone else


def test_a_revoked_key_is_401_at_once_and_revoking_again_changes_nothing(keyed: TestClient) -> None:
    key_id, key = make_key("alice")
    assert keyed.get("/v1/jobs", headers=bearer(key)).status_code == 200
    r = keyed.post(f"/v1/keys/{key_id}/revoke", headers=ADMIN)
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    first = r.json()["revoked_at"]
    denied = keyed.get("/v1/jobs", headers=bearer(key))
    assert denied.status_code == 401 and denied.headers["content-type"] == PROBLEM
    assert denied.json()["code"] == "unauthorized" and denied.headers["www-authenticate"].startswith("Bearer")
    again = keyed.post(f"/v1/keys/{key_id}/revoke", headers=ADMIN)
    assert again.status_code == 200 and again.json()["revoked_at"] == first
    active = keyed.get("/v1/keys", params={"include_revoked": "false"}, headers=ADMIN).json()["data"]
    assert key_id not in [k["id"] for k in active]


def test_a_wrong_unknown_or_malformed_key_is_401(keyed: TestClient) -> None:
    key_id, key = make_key("alice")
    flipped = key[:-1] + ("A" if key[-1] != "A" else "B")
    unknown_id = keys.ID_PREFIX + "0" * (len(key_id) - len(keys.ID_PREFIX))
    unknown = f"mp_{unknown_id[len(keys.ID_PREFIX):]}_{key.rpartition('_')[2]}"
    for bad in (flipped, unknown, "mp_", "mp_abc", f"mp_{key_id[4:]}_", "mp_a-b_secret", key + "x" * 300):
        r = keyed.get("/v1/jobs", headers=bearer(bad))
        assert r.status_code == 401 and r.json()["code"] == "unauthorized", bad
    assert keyed.get("/v1/jobs", headers=bearer(key)).status_code == 200


def test_last_used_is_written_at_most_once_a_minute(keyed: TestClient) -> None:
    key_id, key = make_key("alice")
    assert _row(key_id).last_used_at is None
    keyed.get("/v1/jobs", headers=bearer(key))
    first = _row(key_id).last_used_at
    assert first is not None and abs((utcnow() - first).total_seconds()) < 30
    keyed.get("/v1/jobs", headers=bearer(key))
    assert _row(key_id).last_used_at == first  # within the minute: not written again
    old = utcnow() - timedelta(minutes=2)
    with session_scope() as s:
        s.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=old))
    keyed.get("/v1/jobs", headers=bearer(key))
    later = _row(key_id).last_used_at
    assert later is not None and later > old + timedelta(seconds=90)
    assert keyed.get(f"/v1/keys/{key_id}", headers=ADMIN).json()["last_used_at"] is not None


def test_only_admin_keys_manage_keys(keyed: TestClient) -> None:
    _, write = make_key("alice", "write")
    _, read = make_key("alice", "read")
    admin_id, admin = make_key("ops", "admin")
    for key in (write, read):
        for method, path, body in (("GET", "/v1/keys", None), ("POST", "/v1/keys", {"owner": "alice"}),
                                   ("GET", f"/v1/keys/{admin_id}", None), ("POST", f"/v1/keys/{admin_id}/revoke", None)):
            r = keyed.request(method, path, json=body, headers=bearer(key))
            assert r.status_code == 403 and r.json()["code"] == "insufficient_scope", (key[:12], method, path)
    assert _row(admin_id).revoked_at is None
    # A per-owner admin key manages keys of any owner.
    r = keyed.post("/v1/keys", json={"owner": "bob", "scope": "read"}, headers=bearer(admin))
    assert r.status_code == 201 and r.json()["owner"] == "bob" and r.json()["scope"] == "read"
    assert keyed.get("/v1/jobs", headers=bearer(r.json()["key"])).status_code == 200


def test_bad_key_requests_are_422_naming_the_field_and_unknown_ids_404(keyed: TestClient) -> None:
    for body, field in (({}, "owner"), ({"owner": ""}, "owner"), ({"owner": "a b"}, "owner"),
                        ({"owner": "x" * 65}, "owner"), ({"owner": "alice", "scope": "root"}, "scope"),
                        ({"owner": "alice", "name": "n" * 256}, "name"), ({"owner": "alice", "extra": 1}, "extra")):
        r = keyed.post("/v1/keys", json=body, headers=ADMIN)
        assert r.status_code == 422 and r.headers["content-type"] == PROBLEM, body
        assert r.json()["errors"][0]["field"] == field, (body, r.json())
    with session_scope() as s:
        assert s.query(ApiKey).count() == 0
    for method, path in (("GET", "/v1/keys/key_nope"), ("POST", "/v1/keys/key_nope/revoke")):
        r = keyed.request(method, path, headers=ADMIN)
        assert r.status_code == 404 and r.json()["code"] == "not_found" and "key_nope" in r.json()["detail"]
    r = keyed.get("/v1/keys", params={"limit": 0}, headers=ADMIN)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "limit"


def test_the_list_filters_by_owner_and_pages_newest_first(keyed: TestClient) -> None:
    ids = []
    for owner in ("alice", "bob", "alice", "alice"):
        ids.append(make_key(owner)[0])
        time.sleep(0.002)  # ids order by millisecond
    alice = [i for i, owner in zip(ids, ("alice", "bob", "alice", "alice"), strict=True) if owner == "alice"]
    page = keyed.get("/v1/keys", params={"owner": "alice", "limit": 2}, headers=ADMIN).json()
    assert [k["id"] for k in page["data"]] == alice[::-1][:2] and page["next_cursor"] == alice[1]
    rest = keyed.get("/v1/keys", params={"owner": "alice", "after": page["next_cursor"]}, headers=ADMIN).json()
    assert [k["id"] for k in rest["data"]] == [alice[0]] and rest["next_cursor"] is None
    everyone = keyed.get("/v1/keys", headers=ADMIN).json()["data"]
    assert [k["id"] for k in everyone] == ids[::-1]


def test_keys_work_on_the_embedded_sqlite_database(sqlite_env: str) -> None:
    key_id, key = make_key("alice", "admin", "ci")
    principal = keys.authenticate(key)
    assert principal == keys.Principal("alice", "admin", key_id)
    assert _row(key_id).last_used_at is not None
    with session_scope() as s:
        keys.revoke_key(s, key_id)
        assert keys.list_keys(s, "alice", None, 10, include_revoked=False).data == []
    assert keys.authenticate(key) is None


def test_the_listing_says_an_admin_key_is_global_whatever_its_owner(keyed: TestClient) -> None:
    _, alice_admin = make_key("alice", "admin")
    make_key("alice", "write")
    listed = {k["scope"]: k for k in keyed.get("/v1/keys", params={"owner": "alice"}, headers=bearer(BOOTSTRAP))
              .json()["data"]}
    assert listed["admin"]["manages_keys_of"] == "*" and listed["write"]["manages_keys_of"] is None
    # ... as it is: alice's admin key makes a key for bob.
    made = keyed.post("/v1/keys", json={"owner": "bob", "scope": "read"}, headers=bearer(alice_admin))
    assert made.status_code == 201 and made.json()["owner"] == "bob" and made.json()["manages_keys_of"] is None
