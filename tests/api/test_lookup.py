"""Owner-checked look-ups: the owner gets the row; anyone else gets the same 404 as for a missing id."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.errors import ProblemError
from api.services.lookup import find_owned, get_owned
from models.db import session_scope
from models.tables import Artifact, Dataset, Job, Model
from tests.api import builders


def test_the_owner_gets_the_row_and_others_get_none(pg_env: str) -> None:
    model_id = builders.insert_model(owner="alice")
    with session_scope() as s:
        row = find_owned(s, Model, "alice", model_id)
        assert row is not None and row.id == model_id
        assert find_owned(s, Model, "bob", model_id) is None
        assert find_owned(s, Model, "alice", "mdl_missing") is None
        assert get_owned(s, Model, "alice", model_id).id == model_id


@pytest.mark.parametrize(("table", "kind"), [(Model, "model"), (Dataset, "dataset"), (Job, "job"),
                                             (Artifact, "artifact")])
def test_a_foreign_row_is_the_same_404_as_a_missing_one(pg_env: str, table: type, kind: str) -> None:
    model_id = builders.insert_model(owner="alice")
    job_id = builders.insert_job(model_id, owner="alice")
    ids = {Model: model_id, Job: job_id, Artifact: builders.insert_artifact(job_id, b"x", owner="alice"),
           Dataset: builders.insert_dataset(owner="alice")}
    problems = []
    with session_scope() as s:
        for owner, ident in (("bob", ids[table]), ("alice", "missing")):
            with pytest.raises(ProblemError) as caught:
                get_owned(s, table, owner, ident)
            problems.append(caught.value)
    assert [(p.status, p.code) for p in problems] == [(404, "not_found")] * 2
    assert problems[0].detail == f"{kind} {ids[table]!r} not found"
    assert problems[1].detail == f"{kind} 'missing' not found"


def test_fresh_rereads_a_row_the_session_already_holds(pg_env: str) -> None:
    job_id = builders.insert_job(builders.insert_model())
    with session_scope() as s:
        held = get_owned(s, Job, "local", job_id)  # kept, so the identity map keeps it too
        assert held.status == "queued"
        with session_scope() as other:
            other.execute(update(Job).where(Job.id == job_id).values(status="running"))
        assert get_owned(s, Job, "local", job_id).status == "queued"  # the identity map's copy
        assert get_owned(s, Job, "local", job_id, fresh=True) is held and held.status == "running"


def test_over_http_a_foreign_id_reads_exactly_like_a_missing_one(client: TestClient) -> None:
    model_id = builders.insert_model(owner="someone-else")
    foreign = client.get(f"/v1/models/{model_id}")
    missing = client.get("/v1/models/mdl_missing")
    assert foreign.status_code == missing.status_code == 404
    body = foreign.json()
    assert body["code"] == "not_found" and body["detail"] == f"model {model_id!r} not found"
    assert set(body) == set(missing.json())
