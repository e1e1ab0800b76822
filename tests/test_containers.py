"""No Docker engine runs here: check docker-compose.yml and the Dockerfile against the code instead."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _cli_help(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from client.cli import main; main()", *args, "--help"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_compose_services_and_their_commands_exist_in_the_cli() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(services)
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("migrate", "api", "worker"):
        command = services[name]["command"]
        assert command[0] == "modelpress", name
        sub = [c for c in command[1:] if not c.startswith("-")][:1]
        result = _cli_help(sub)
        assert result.returncode == 0, (name, result.stderr)
        for flag in (c.split("=")[0] for c in command[1:] if c.startswith("--")):
            assert flag in result.stdout, (name, flag)
    env = services["api"]["environment"]
    assert env["MODELPRESS_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["MODELPRESS_BROKER_URL"].startswith("redis://")
    # The API is reachable from this host only, and compose refuses to start it without a key.
    assert all(str(p).startswith("127.0.0.1:") for p in services["api"]["ports"]), services["api"]["ports"]
    assert env["MODELPRESS_API_KEY"].startswith("${MODELPRESS_API_KEY:?")


def test_dockerfile_copies_every_package_and_runs_a_cli_command() -> None:
    text = (ROOT / "Dockerfile").read_text()
    copied = set(re.findall(r"^COPY (\S+) \./", text, flags=re.M))
    for pkg in ("api", "worker", "models", "storage", "migrations", "client"):
        assert pkg in copied and (ROOT / pkg / "__init__.py").exists(), pkg
    cmd = re.search(r'^CMD \[(.*)\]$', text, flags=re.M)
    assert cmd is not None
    args = [a.strip().strip('"') for a in cmd.group(1).split(",")]
    assert args[0] == "modelpress" and _cli_help([args[1]]).returncode == 0


def test_compose_runs_api_and_worker_on_s3_sharing_no_volume() -> None:
    from models.settings import Settings

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    s3 = services["s3"]
    assert s3["image"].startswith("chrislusf/seaweedfs") and s3["command"][0] == "mini"
    flags = dict(c.lstrip("-").split("=", 1) for c in s3["command"][1:])
    # weed mini's one S3 identity is the key pair in its environment: the same the API and worker sign with.
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["MODELPRESS_STORAGE_URL"].startswith("s3://"), name
        endpoint = urlsplit(env["AWS_ENDPOINT_URL"])
        assert (endpoint.hostname, str(endpoint.port)) == ("s3", flags["s3.port"]) and flags["ip"] == "s3"
        assert {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")} == s3["environment"]
        assert env["AWS_REGION"] and services[name]["depends_on"]["s3"]["condition"] == "service_healthy"
        # Every MODELPRESS_* name is a setting (a misspelt one would be silently ignored).
        unknown = {k for k in env if k.startswith("MODELPRESS_")} - {f"MODELPRESS_{f.upper()}" for f in Settings.model_fields}
        assert not unknown, (name, unknown)
        assert "MODELPRESS_STORAGE_DIR" not in env
    assert services["worker"]["environment"]["MODELPRESS_BLOB_CACHE_BYTES"].isdigit()
    assert services["api"]["environment"]["AWS_SECRET_ACCESS_KEY"].startswith("${MODELPRESS_S3_SECRET:?")
    volumes = {name: {v.split(":")[0] for v in services[name].get("volumes", [])} for name in ("api", "worker", "s3")}
    assert not volumes["api"] & volumes["worker"] and not (volumes["api"] | volumes["worker"]) & volumes["s3"]
