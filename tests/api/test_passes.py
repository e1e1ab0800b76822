"""The capabilities list names every step type with its form and JSON schema."""

from __future__ import annotations

from fastapi.testclient import TestClient

from models.spec import STEP_FORMS, step_types


def test_passes_list_every_step_type_with_a_schema(client: TestClient) -> None:
    r = client.get("/v1/passes")
    assert r.status_code == 200
    passes = {p["type"]: p for p in r.json()}
    assert sorted(passes) == step_types()
    for name, info in passes.items():
        assert info["takes"] == STEP_FORMS[name]
        assert info["description"]
        assert info["schema"]["type"] == "object" and "type" in info["schema"]["properties"]
    assert passes["prune"]["schema"]["properties"]["ratio"]["exclusiveMaximum"] == 1.0
    assert "quantization" in passes["quantize"]["description"]
