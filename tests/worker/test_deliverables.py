"""What a job hands back: an output ONNX that describes itself, one file even from external data, and for a
Hugging Face upload a bundle that loads the way Optimum loads a folder (config + tokenizer + model.onnx)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from models.spec import JobSpec
from tests import factories_onnx
from tests import factories_train as f
from tests.worker.conftest import DigitsFiles
from worker import deliverables, pipeline
from worker.context import LocalContext

FAST = {"latency": {"warmup": 0, "runs": 2}}


def test_the_output_model_names_its_labels_inputs_and_outputs(tmp_path: Path, digits_mlp: DigitsFiles) -> None:
    spec = JobSpec.model_validate({"model": "mdl_mlp", "task": "image-classification", "data": {"eval": "ds_eval"},
                                   "steps": [{"type": "quantize", "mode": "dynamic"}], "evaluate": FAST})
    from api.inspection import inspect_npz

    ctx = digits_mlp.context(tmp_path / "work", spec)
    ctx.datasets["ds_eval"] = (digits_mlp.eval, "npz", inspect_npz(digits_mlp.eval))  # as the upload recorded it
    out = pipeline.run(spec, ctx)
    files = deliverables.prepare(out.output_path, spec, job_id="job_1", model_ref=ctx.models["mdl_mlp"],
                                 classes=ctx.classes(), workdir=tmp_path / "work")
    assert sorted(files) == ["model.onnx"]
    session = ort.InferenceSession(str(files["model.onnx"][1]), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["modelpress.labels"]) == [str(i) for i in range(10)]
    assert json.loads(meta["modelpress.inputs"]) == [{"name": "pixels", "dtype": "float32", "shape": ["batch", 64]}]
    assert json.loads(meta["modelpress.outputs"])[0]["name"] == "logits"
    assert meta["modelpress.task"] == "image-classification" and meta["modelpress.job"] == "job_1"
    proto = onnx.load(str(files["model.onnx"][1]))
    assert proto.graph.output[0].doc_string.startswith("output logits: float32 [batch, 10]; scores over 10 classes")
    assert proto.graph.input[0].doc_string == "input pixels: float32 [batch, 64]"


def test_an_external_data_model_comes_back_as_one_file(tmp_path: Path) -> None:
    src = factories_onnx.opset20_cnn(tmp_path / "src")
    packed = factories_onnx.archive_of(src, tmp_path / "cnn.tar.gz", "tar")
    spec = JobSpec.model_validate({"model": "m", "evaluate": FAST})
    ctx = LocalContext(tmp_path / "work", spec, models={"m": (packed, "onnx", {})}, device="cpu")
    out = pipeline.run(spec, ctx)
    files = deliverables.prepare(out.output_path, spec, job_id="job_2", model_ref=ctx.models["m"],
                                 classes=None, workdir=tmp_path / "work")
    alone = tmp_path / "download" / "model.onnx"
    alone.parent.mkdir()
    alone.write_bytes(files["model.onnx"][1].read_bytes())  # downloaded without any data file next to it
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    got = ort.InferenceSession(str(alone)).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ort.InferenceSession(str(src)).run(None, {"input": x})[0], rtol=1e-5)
    assert "modelpress.labels" not in ort.InferenceSession(str(alone)).get_modelmeta().custom_metadata_map


def test_an_output_past_the_protobuf_limit_comes_back_as_one_archive(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Past 2 GiB the weights cannot be inlined: ``model.zip`` carries model.onnx with its data file, and the
    unpacked folder loads and matches (the limit is lowered here so that a small model stands in for a big one)."""
    from storage import onnx_files

    src = factories_onnx.opset20_cnn(tmp_path / "src")
    packed = factories_onnx.archive_of(src, tmp_path / "cnn.tar.gz", "tar")
    spec = JobSpec.model_validate({"model": "m", "evaluate": FAST})
    ctx = LocalContext(tmp_path / "work", spec, models={"m": (packed, "onnx", {})}, device="cpu")
    out = pipeline.run(spec, ctx)
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", 1024)
    files = deliverables.prepare(out.output_path, spec, job_id="job_3", model_ref=ctx.models["m"],
                                 classes=None, workdir=tmp_path / "work")
    assert files["model.onnx"][1] == out.output_path  # not inlined: it stays with its data file
    assert files["model.zip"][0] == "model-archive"
    with zipfile.ZipFile(files["model.zip"][1]) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "unpacked")
    assert names[0] == "model.onnx" and len(names) >= 2
    x = np.random.default_rng(0).random((2, 1, 8, 8), dtype=np.float32)
    got = ort.InferenceSession(str(tmp_path / "unpacked" / "model.onnx")).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ort.InferenceSession(str(src)).run(None, {"input": x})[0], rtol=1e-5)


def test_an_hf_job_has_a_bundle_that_loads_like_an_optimum_folder(tmp_path: Path) -> None:
    """Optimum's ORTModelForSequenceClassification cannot be installed next to transformers 5 (optimum-onnx
    0.1.0 requires transformers<4.58 and fails to import with 5.x), so the bundle is loaded the way it loads a
    folder: AutoConfig + AutoTokenizer from the folder, an ORT session on its model.onnx, id2label on argmax."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    archive = f.tiny_bert_archive(tmp_path)
    rows = f.sentences(24, seed=3)
    evald = f.write_jsonl(tmp_path / "eval.jsonl", rows)
    spec = JobSpec.model_validate({"model": "b", "task": "text-classification", "data": {"eval": "ev"},
                                   "text": {"max_length": 16}, "evaluate": FAST})
    ctx = LocalContext(tmp_path / "work", spec, models={"b": (archive, "hf", {})},
                       datasets={"ev": (evald, "text", {})}, device="cpu")
    out = pipeline.run(spec, ctx)
    files = deliverables.prepare(out.output_path, spec, job_id="job_3", model_ref=ctx.models["b"],
                                 classes=ctx.classes(), workdir=tmp_path / "work")
    assert files["bundle.zip"][0] == "bundle"
    folder = tmp_path / "bundle"
    with zipfile.ZipFile(files["bundle.zip"][1]) as zf:
        assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(zf.namelist())
        zf.extractall(folder)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    texts = [r["text"] for r in rows]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=16, return_tensors="np")
    feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    logits = session.run(None, feed)[0]
    names = sorted({r["label"] for r in rows})
    assert config.id2label == dict(enumerate(names))
    assert json.loads(session.get_modelmeta().custom_metadata_map["modelpress.labels"]) == names
    source = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert-src").eval()
    with torch.no_grad():
        want = source(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4)
    assert [config.id2label[i] for i in logits.argmax(1)] == [source.config.id2label[i] for i in want.argmax(1)]


def test_single_file_copies_weights_in_blocks_and_equals_onnx_s_own_save(tmp_path: Path) -> None:
    """The streamed splice writes what onnx.save_model writes (parsed equal), holding no copy of the weights."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from worker.deliverables import single_file
    from worker.memory import peak_rss_bytes, reset_peak_rss

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32), "w")
    b = numpy_helper.from_array(np.arange(4, dtype=np.float32), "b")  # small: stays inside the proto
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y0"]), helper.make_node("Add", ["y0", "b0"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4096])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4096])], [w, b])
    graph.initializer[1].name = "b0"
    model = helper.make_model(graph)
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    del model, graph, w
    reset_peak_rss()
    before = peak_rss_bytes()
    out = single_file(path)
    grown = peak_rss_bytes() - before
    assert out != path and grown < 40 * 1024**2  # one 16 MiB block; loading + serialising held 128 MB+
    want = onnx.load(str(path))  # with its external data
    for t in want.graph.initializer:
        del t.external_data[:]
        t.ClearField("data_location")
    got = onnx.load(str(out))
    assert got == want
    assert not onnx_uses_external(got)


def onnx_uses_external(model: object) -> bool:
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)  # type: ignore[attr-defined]
