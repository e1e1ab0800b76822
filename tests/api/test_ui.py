"""The pages' routes: the dashboard at ``/`` (jobs with status, phase, progress, report/artifact links),
and the login that opens the pages when an API key is set (a signed session cookie, good for reads only).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.report_samples import insert_job

EXTERNAL = re.compile(r"https?://|<script[^>]*\bsrc=|<link\b|@import|url\(", re.I)


def test_dashboard_lists_jobs_with_progress_and_links(client: TestClient) -> None:
    done, arts = insert_job()
    running, _ = insert_job(status="running", phase="training epoch 2/4",
                            progress={"step": 2, "steps": 3, "percent": 45.0, "epoch": 2, "epochs": 4})
    failed, _ = insert_job(status="failed", phase="failed", progress={"step": 1, "steps": 3, "percent": 10.0},
                           error={"code": "step_failed", "message": "prune <exploded>", "step": "prune"})
    r = client.get("/")
    assert r.status_code == 200
    page = r.text
    assert not EXTERNAL.search(page)
    assert 'http-equiv="refresh"' in page
    rows = re.findall(r'<tr class="job" data-status="(\w+)">', page)
    assert sorted(rows) == ["failed", "running", "succeeded"]
    for job_id in (done, running, failed):
        assert f'href="/v1/jobs/{job_id}/report.html"' in page
    for art_id in arts:
        assert f'href="/v1/artifacts/{art_id}/content"' in page
    widths = re.findall(r'<span style="width:([\d.]+)%">', page)
    assert sorted(float(w) for w in widths) == [10.0, 45.0, 100.0]
    assert "step 2/3" in page and "epoch 2/4" in page and "training epoch 2/4" in page
    assert "prune &lt;exploded&gt;" in page and "<exploded>" not in page


def test_dashboard_filters_by_status_and_handles_no_jobs(client: TestClient) -> None:
    assert "No jobs yet" in client.get("/").text
    insert_job()
    insert_job(status="running", phase="exporting")
    page = client.get("/", params={"status": "running"}).text
    assert re.findall(r'data-status="(\w+)"', page) == ["running"]

KEY = "s3cret"
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
COOKIE = "modelpress_session"


@pytest.fixture
def keyed(pg_env: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The API with MODELPRESS_API_KEY set."""
    from api.main import create_app
    from models.settings import get_settings

    monkeypatch.setenv("MODELPRESS_API_KEY", KEY)
    monkeypatch.delenv("MODELPRESS_SECRET_KEY", raising=False)
    get_settings.cache_clear()
    with TestClient(create_app(), raise_server_exceptions=False) as c:
        yield c
    get_settings.cache_clear()


def _login(client: TestClient, key: str = KEY, next_: str = "/") -> Any:
    return client.post("/login", data={"key": key, "next": next_}, follow_redirects=False)


def test_pages_without_a_key_are_not_served(keyed: TestClient) -> None:
    job_id, _ = insert_job()
    r = keyed.get("/", headers=HTML, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2F"
    r = keyed.get(f"/v1/jobs/{job_id}/report.html", headers=HTML, follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == f"/login?next=%2Fv1%2Fjobs%2F{job_id}%2Freport.html"
    assert job_id not in r.text
    # An API client (no text/html in Accept) gets the problem+json 401 the /v1 routes give.
    r = keyed.get(f"/v1/jobs/{job_id}/report.html")
    assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["code"] == "unauthorized" and r.headers["www-authenticate"].startswith("Bearer")
    assert keyed.get("/").status_code == 401


def test_a_wrong_key_is_a_401(keyed: TestClient) -> None:
    job_id, _ = insert_job()
    for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": "Bearer wrong", **HTML}):
        r = keyed.get(f"/v1/jobs/{job_id}/report.html", headers=headers, follow_redirects=False)
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    r = _login(keyed, key="wrong")
    assert r.status_code == 401 and "not valid" in r.text
    assert COOKIE not in r.headers.get("set-cookie", "")
    assert keyed.get(f"/v1/jobs/{job_id}/report.html", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_login_sets_a_session_cookie_that_opens_the_pages(keyed: TestClient) -> None:
    job_id, art_ids = insert_job()
    form = keyed.get("/login", params={"next": f"/v1/jobs/{job_id}/report.html"})
    assert form.status_code == 200 and 'name="key"' in form.text and 'type="password"' in form.text
    assert "form-action 'self'" in form.headers["content-security-policy"]
    r = _login(keyed, next_=f"/v1/jobs/{job_id}/report.html")
    assert r.status_code == 303 and r.headers["location"] == f"/v1/jobs/{job_id}/report.html"
    cookie = r.headers["set-cookie"].lower()
    assert cookie.startswith(f"{COOKIE}=") and "httponly" in cookie and "samesite=strict" in cookie
    assert "max-age=43200" in cookie and "secure" not in cookie  # plain http here
    page = keyed.get(f"/v1/jobs/{job_id}/report.html", headers=HTML)
    assert page.status_code == 200 and f"modelpress report {job_id}" in page.text
    assert keyed.get("/", headers=HTML).status_code == 200
    # The page's links work in the browser too (reads only).
    assert keyed.get(f"/v1/artifacts/{art_ids[0]}").json()["id"] == art_ids[0]
    assert keyed.get(f"/v1/jobs/{job_id}").json()["id"] == job_id


def test_the_session_cookie_cannot_write(keyed: TestClient) -> None:
    job_id, _ = insert_job(status="running", phase="training")
    assert _login(keyed).status_code == 303
    assert COOKIE in keyed.cookies
    r = keyed.post("/v1/jobs", json={"model": "mdl_x", "steps": [{"type": "quantize"}]})
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"
    assert keyed.post(f"/v1/jobs/{job_id}/cancel").status_code == 401
    assert keyed.put("/v1/models", params={"name": "m", "format": "onnx"}, content=b"x").status_code == 401


def test_expired_tampered_or_foreign_cookies_are_rejected(keyed: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from api.services import sessions
    from models.settings import Settings

    job_id, _ = insert_job()
    url = f"/v1/jobs/{job_id}/report.html"
    settings = Settings()
    good = sessions.issue(settings, "local")
    expired = sessions.issue(settings, "local", now=time.time() - settings.session_ttl_s - 1)
    body, _, sig = good.rpartition(".")
    owner_b64, _, expires = body.partition(".")
    longer = f"{owner_b64}.{int(expires) + 10**6}.{sig}"  # a later expiry under the old signature
    flipped = f"{body}.{sig[:-1]}{'A' if sig[-1] != 'A' else 'B'}"
    other_key = sessions.issue(Settings(api_key="another key"), "local")
    for bad in (expired, longer, flipped, other_key, "garbage", ""):
        keyed.cookies.set(COOKIE, bad)
        r = keyed.get(url, headers=HTML, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/login"), bad
        assert keyed.get(url).status_code == 401, bad
    keyed.cookies.set(COOKIE, good)
    assert keyed.get(url, headers=HTML).status_code == 200


def test_another_owners_job_is_a_404(keyed: TestClient) -> None:
    theirs, _ = insert_job(owner="someone-else")
    mine, _ = insert_job()
    _login(keyed)
    r = keyed.get(f"/v1/jobs/{theirs}/report.html", headers=HTML)
    assert r.status_code == 404 and r.json()["code"] == "not_found"
    page = keyed.get("/", headers=HTML).text
    assert mine in page and theirs not in page


def test_https_login_sets_a_secure_cookie(keyed: TestClient) -> None:
    secure = TestClient(keyed.app, base_url="https://testserver")
    r = secure.post("/login", data={"key": KEY}, follow_redirects=False)
    assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()


def test_logout_ends_the_session(keyed: TestClient) -> None:
    _login(keyed)
    assert keyed.get("/", headers=HTML).status_code == 200
    r = keyed.post("/logout", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert f'{COOKIE}=""' in r.headers["set-cookie"] and "max-age=0" in r.headers["set-cookie"].lower()
    assert keyed.get("/", headers=HTML, follow_redirects=False).status_code == 303


def test_login_refuses_cross_site_posts_and_foreign_redirects(keyed: TestClient) -> None:
    r = keyed.post("/login", data={"key": KEY}, headers={"Origin": "https://evil.example"}, follow_redirects=False)
    assert r.status_code == 403 and "set-cookie" not in r.headers
    for target in ("//evil.example/x", "https://evil.example/", "javascript:alert(1)", "relative"):
        r = _login(keyed, next_=target)
        assert r.status_code == 303 and r.headers["location"] == "/", target


def test_without_an_api_key_the_pages_stay_open(client: TestClient) -> None:
    job_id, _ = insert_job()
    assert client.get("/", headers=HTML).status_code == 200
    assert client.get(f"/v1/jobs/{job_id}/report.html").status_code == 200
    r = client.get("/login", params={"next": f"/v1/jobs/{job_id}/report.html"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/v1/jobs/{job_id}/report.html"
