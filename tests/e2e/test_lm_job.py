"""A text-generation job over HTTP on a real Celery worker (Redis + PostgreSQL): tiny Llama hf archive +
JSONL text -> export with a KV cache -> succeeded, a report with LM metrics and generations, and a
downloaded model.onnx that ONNX Runtime loads and that generates what torch generates."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.e2e.harness import LiveService
from tests.factories_lm import text_rows, tiny_lm_archive, write_jsonl

pytestmark = pytest.mark.e2e


def test_lm_export_job_end_to_end(distributed: LiveService, tmp_path: Path) -> None:
    archive = tiny_lm_archive(tmp_path, "llama")
    texts = write_jsonl(tmp_path / "eval.jsonl", text_rows(24))
    with httpx.Client(base_url=distributed.url, timeout=60) as client:
        mdl = client.put("/v1/models", params={"format": "hf", "name": "tiny-llama"}, content=archive.read_bytes())
        assert mdl.status_code in (200, 201), mdl.text
        ds = client.put("/v1/datasets", params={"format": "text", "name": "licences"}, content=texts.read_bytes())
        assert ds.status_code in (200, 201), ds.text
        spec = {
            "model": mdl.json()["id"], "task": "text-generation", "data": {"eval": ds.json()["id"]},
            "steps": [{"type": "export"}],
            "text": {"max_length": 64},
            "evaluate": {"max_perplexity_increase": 0.01, "latency": {"runs": 3, "warmup": 1},
                         "generation": {"samples": 3, "max_new_tokens": 12, "prompt_tokens": 64}},
        }
        created = client.post("/v1/jobs", json=spec)
        assert created.status_code == 202, created.text
        job = distributed.wait_job(client, created.json()["id"], timeout=420)
        assert job["status"] == "succeeded", (job.get("error"), distributed.logs("worker.log"))

        report = job["result"]["report"]
        b, a = report["input"], report["output"]
        assert b["perplexity"] > 1 and a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
        assert a["agreement"]["top1"] == 1.0
        assert a["decode"]["tokens_per_s"] > 0 and a["latency_ms"]["median"] > 0
        assert a["latency_setup"]["prompt_tokens"] == 64
        assert report["budget"]["met"] is True and report["gains"]["decode_speedup"] > 0
        assert len(a["generations"]) == 3
        assert [g["text"] for g in a["generations"]] == [g["text"] for g in b["generations"]]

        page = client.get(f"/v1/jobs/{job['id']}/report.html").text
        assert 'class="generations"' in page and "perplexity (eval text)" in page

        art = next(x for x in job["result"]["artifacts"] if x["name"] == "model.onnx")
        onnx_file = tmp_path / "dl" / "model.onnx"
        onnx_file.parent.mkdir()
        onnx_file.write_bytes(client.get(f"/v1/artifacts/{art['id']}/content").content)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.worker.lm.builders import torch_greedy
    from worker.lm.session import LMSession

    src = tmp_path / "llama-src"
    tok = AutoTokenizer.from_pretrained(src)
    prompt = tok(a["generations"][0]["prompt"])["input_ids"]
    got = LMSession(onnx_file).generate(prompt, 12)
    assert got == torch_greedy(AutoModelForCausalLM.from_pretrained(src).eval(), prompt, 12)


def test_lm_finetune_then_export_job_lowers_perplexity(distributed: LiveService, tmp_path: Path) -> None:
    archive = tiny_lm_archive(tmp_path, "llama")
    evalset = write_jsonl(tmp_path / "eval.jsonl", text_rows(24))
    trainset = write_jsonl(tmp_path / "train.jsonl", text_rows(60)[24:])
    with httpx.Client(base_url=distributed.url, timeout=60) as client:
        mdl = client.put("/v1/models", params={"format": "hf"}, content=archive.read_bytes()).json()
        ev = client.put("/v1/datasets", params={"format": "text"}, content=evalset.read_bytes()).json()
        tr = client.put("/v1/datasets", params={"format": "text"}, content=trainset.read_bytes()).json()
        spec = {
            "model": mdl["id"], "task": "text-generation", "data": {"eval": ev["id"], "train": tr["id"]},
            "steps": [{"type": "finetune", "mode": "lora", "epochs": 2, "lr": 3e-3, "batch_size": 8},
                      {"type": "export"}],
            "text": {"max_length": 64},
            "evaluate": {"latency": {"runs": 3, "warmup": 1},
                         "generation": {"samples": 2, "max_new_tokens": 12, "prompt_tokens": 64}},
        }
        created = client.post("/v1/jobs", json=spec)
        assert created.status_code == 202, created.text
        job = distributed.wait_job(client, created.json()["id"], timeout=420)
        assert job["status"] == "succeeded", (job.get("error"), distributed.logs("worker.log"))
        report = job["result"]["report"]
        b, a = report["input"], report["output"]
        assert a["perplexity"] < 0.97 * b["perplexity"], (b["perplexity"], a["perplexity"])
        assert report["steps"][0]["eval"]["perplexity"] == pytest.approx(a["perplexity"], rel=1e-3)  # torch vs ORT
        assert 0 < a["agreement"]["top1"] < 1 and a["agreement"]["mean_kl"] > 0
        assert report["gains"]["perplexity_ratio"] < 0.97
        art = next(x for x in job["result"]["artifacts"] if x["name"] == "model.onnx")
        onnx_file = tmp_path / "model.onnx"
        onnx_file.write_bytes(client.get(f"/v1/artifacts/{art['id']}/content").content)

    from transformers import AutoTokenizer

    from worker.lm.session import LMSession

    tok = AutoTokenizer.from_pretrained(tmp_path / "llama-src")
    gen = a["generations"][0]
    new = LMSession(onnx_file).generate(tok(gen["prompt"])["input_ids"], 12, eos_token_id=tok.eos_token_id)
    assert tok.decode(new, skip_special_tokens=True) == gen["text"]  # the artifact is the model evaluated


def _matmul_bits(path: Path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path))
    # ORT's quantizer names each node after its source MatMul with a ``_Q4``/``_Q8`` suffix
    return {n.name.rsplit("_Q", 1)[0]: next(a.i for a in n.attribute if a.name == "bits")
            for n in m.graph.node if n.op_type == "MatMulNBits"}


def test_int4_job_through_the_api_applies_the_default_bits_per_matmul(
    distributed: LiveService, tmp_path: Path
) -> None:
    """``quantize {mode: int4}`` as a client sends it: the stored spec keeps ``bits`` unset, so the documented
    default (output head at 8 bits, every other MatMul at 4) is what the file gets; ``bits: {}`` means all 4."""
    archive = tiny_lm_archive(tmp_path, "llama")
    texts = write_jsonl(tmp_path / "eval.jsonl", text_rows(16))
    got: dict[str, dict[str, int]] = {}
    with httpx.Client(base_url=distributed.url, timeout=60) as client:
        mdl = client.put("/v1/models", params={"format": "hf"}, content=archive.read_bytes()).json()
        ds = client.put("/v1/datasets", params={"format": "text"}, content=texts.read_bytes()).json()
        for label, step in (("default", {"type": "quantize", "mode": "int4"}),
                            ("all4", {"type": "quantize", "mode": "int4", "bits": {}})):
            spec = {"model": mdl["id"], "task": "text-generation", "data": {"eval": ds["id"]},
                    "steps": [{"type": "export"}, step], "text": {"max_length": 32},
                    "evaluate": {"latency": {"runs": 2, "warmup": 1}, "generation": {"samples": 0}}}
            created = client.post("/v1/jobs", json=spec)
            assert created.status_code == 202, created.text
            job = distributed.wait_job(client, created.json()["id"], timeout=420)
            assert job["status"] == "succeeded", (job.get("error"), distributed.logs("worker.log"))
            stored = client.get(f"/v1/jobs/{job['id']}").json()["spec"]["steps"][1]
            assert stored.get("bits") == step.get("bits")  # unset stays unset (None), {} stays {}
            art = next(x for x in job["result"]["artifacts"] if x["name"] == "model.onnx")
            onnx_file = tmp_path / label / "model.onnx"
            onnx_file.parent.mkdir()
            onnx_file.write_bytes(client.get(f"/v1/artifacts/{art['id']}/content").content)
            got[label] = _matmul_bits(onnx_file)
    default, all4 = got["default"], got["all4"]
    assert set(default) == set(all4) and len(default) >= 4 * 4 + 1, default  # >= 4 per layer (qkv may be fused) + head
    heads = [name for name in default if "lm_head" in name]
    assert len(heads) == 1 and default[heads[0]] == 8
    assert all(bits == 4 for name, bits in default.items() if name not in heads)
    assert set(all4.values()) == {4}
