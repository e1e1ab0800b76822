"""api.services.pages: the pages' data, read through the job services for one owner."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from api.errors import ProblemError
from api.services import pages
from models.db import session_scope
from tests.api.report_samples import insert_job


def test_report_page_of_a_finished_job(pg_env: str) -> None:
    job_id, art_ids = insert_job()
    with session_scope() as s:
        page = pages.report_page(s, "local", job_id)
    assert (page.id, page.status, page.task, page.running, page.refresh) == (
        job_id, "succeeded", "image-classification", False, None)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", page.created) and page.finished != "-"
    assert page.pipeline == ["prune structured 0.5", "distill 4 ep", "quantize dynamic"]
    assert [r.key for r in page.comparison][:2] == ["size_bytes", "latency_ms"] and len(page.comparison) == 7
    assert [g.word for g in page.gains] == ["smaller", "faster", "fewer parameters", "accuracy"]
    assert page.quality[0].value_text == "met"
    assert [re.search(r'aria-label="([^"]+)"', c).group(1) for c in page.charts] == [  # type: ignore[union-attr]
        "size (MB)", "latency median (ms)", "parameters", "MACs", "accuracy"]
    assert [(label, len(cs)) for label, cs in page.curves] == [("distill 4 ep", 3)]
    assert [s.label for s in page.steps] == page.pipeline and "chart-steps-bar-2" in page.step_chart
    assert [(a.id, a.name, a.url, a.size_text) for a in page.artifacts] == [
        (art_ids[0], "model.onnx", f"/v1/artifacts/{art_ids[0]}/content", "5.62 MB"),
        (art_ids[1], "report.json", f"/v1/artifacts/{art_ids[1]}/content", "2.29 KB"),
    ]


def test_report_page_of_a_running_job_refreshes_and_has_no_comparison(pg_env: str) -> None:
    job_id, _ = insert_job(status="running", phase="training epoch 2/4")
    with session_scope() as s:
        page = pages.report_page(s, "local", job_id)
    assert page.running and page.refresh == pages.REFRESH_S
    assert page.comparison == [] and page.charts == [] and page.artifacts == [] and page.step_chart == ""
    assert page.pipeline == ["prune (structured 0.5)", "distill", "quantize (dynamic)"]  # from the spec


def test_another_owners_job_is_not_found(pg_env: str) -> None:
    theirs, _ = insert_job(owner="someone-else")
    with session_scope() as s, pytest.raises(ProblemError) as err:
        pages.report_page(s, "local", theirs)
    assert err.value.status == 404 and err.value.code == "not_found"


def test_dashboard_rows(pg_env: str) -> None:
    done, arts = insert_job()
    running, _ = insert_job(status="running", phase="training epoch 2/4",
                            progress={"step": 2, "steps": 3, "percent": 145.0, "epoch": 2, "epochs": 4})
    failed, _ = insert_job(status="failed", phase="failed", progress={"step": 1, "steps": 3, "percent": 10.0},
                           error={"code": "step_failed", "message": "x" * 500, "step": "prune"})
    insert_job(owner="someone-else")
    with session_scope() as s:
        board = pages.dashboard(s, "local", None, 100)
    rows = {r.id: r for r in board.rows}
    assert [r.id for r in board.rows] == [failed, running, done]  # newest first, this owner's only
    assert rows[done].percent == 100.0 and [a.id for a in rows[done].artifacts] == arts
    assert rows[running].percent == 100.0 and rows[running].progress_text == "100% · step 2/3 · epoch 2/4"  # clamped
    assert rows[failed].percent == 10.0 and rows[failed].error == "step_failed: " + "x" * 160
    assert rows[done].pipeline == ["prune (structured 0.5)", "distill", "quantize (dynamic)"]  # the step table's labels
    assert "cancelling" not in board.filters and board.status is None and board.refresh == pages.REFRESH_S


def test_dashboard_lists_a_search_once_and_shows_job_names(pg_env: str, client: TestClient) -> None:
    """A search with its trials is one row (its trials are on its report page); a named job shows its name."""
    from models.tables import Job

    search, _ = insert_job(status="running", phase="2 trials running")
    trial, _ = insert_job(status="running", phase="quantizing")
    named, _ = insert_job()
    with session_scope() as s:
        parent = s.get(Job, search)
        assert parent is not None
        parent.spec = {**parent.spec, "steps": [], "search": {"objective": "size", "space": "auto"}}
        row = s.get(Job, trial)
        assert row is not None
        row.parent_id = search
        job = s.get(Job, named)
        assert job is not None
        job.name = "resnet for the kiosk"
    with session_scope() as s:
        board = pages.dashboard(s, "local", None, 100)
    rows = {r.id: r for r in board.rows}
    assert set(rows) == {search, named}
    assert rows[search].pipeline == ["search for size"] and rows[named].name == "resnet for the kiosk"
    html = client.get("/").text
    assert trial not in html and "<strong>resnet for the kiosk</strong>" in html


def test_dashboard_filters_and_limits(pg_env: str) -> None:
    insert_job()
    newest, _ = insert_job(status="running", phase="exporting")
    with session_scope() as s:
        assert [r.status for r in pages.dashboard(s, "local", "running", 100).rows] == ["running"]
        assert [r.id for r in pages.dashboard(s, "local", "", 1).rows] == [newest]
        assert pages.dashboard(s, "local", "bogus", 100).rows == []  # as before: a filter that matches nothing
