"""Model families: what differs between a classifier, an embedding model and a causal LM in a job, behind one
interface chosen once per job (:func:`family_for`).

A family says how a model is evaluated (the whole harness, and the quick measurement after a step), what its
quality budget is, which gains it adds to the common ones, what the report's headline fidelity is, and two
rules of its pipeline (whether its ONNX form can go back to torch, whether an unchanged model's input export
is its output). ``worker.pipeline`` calls these and holds no family branch. The search space of a family is
``models.search_space.auto_space``'s (pure, chosen from the task there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from models.spec import LM_TASKS
from worker.core import StepFailed, WorkingModel

if TYPE_CHECKING:
    from models.spec import JobSpec
    from worker.core import ArrayDataset, PipelineContext
    from worker.evaluate import Evaluation


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, None when either is missing or ``b`` is 0."""
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def metric_value(ev: dict[str, Any]) -> float | None:
    """The value of an evaluation's headline metric, None when it was not measured."""
    value = (ev.get("metric") or {}).get("value")
    return None if value is None else float(value)


class Family:
    """A model family: a classifier (or any model whose ONNX outputs the harness compares) by default."""

    name: ClassVar[str] = "classifier"
    # Keys of an evaluation kept in a step's after-step measurement (ONNX form).
    step_eval_keys: ClassVar[tuple[str, ...]] = (
        "accuracy", "metric", "fidelity", "size_bytes", "params", "macs", "num_samples")
    # Whether a job without steps hands back the input's own export (a costly, parity-checked one).
    reuses_input_export: ClassVar[bool] = False
    # Whether the model decodes token by token (timed with the KV-cache harness when latency is re-checked).
    decodes: ClassVar[bool] = False

    def evaluate(self, model: WorkingModel, ctx: PipelineContext, spec: JobSpec, reference: dict[str, Any] | None,
                 latency: bool | None = None) -> Evaluation:
        """The whole harness on an ONNX model: size, latency, the task metric, fidelity to ``reference``."""
        from worker.evaluate import evaluate

        assert model.onnx_path is not None
        return evaluate(model.onnx_path, ctx.dataset("eval", model), spec.evaluate, spec.task, reference,
                        latency=latency, check_cancelled=ctx.check_cancelled)

    def measure_after_step(self, model: WorkingModel, ctx: PipelineContext, spec: JobSpec,
                           reference: dict[str, Any] | None) -> dict[str, Any]:
        """The task metric right after a step, on the eval data (no latency)."""
        data = ctx.dataset("eval", model)
        if data is None:
            return {"measured": False, "reason": "no eval dataset"}
        if model.form == "onnx" and model.onnx_path is not None:
            ev = self.evaluate(model, ctx, spec, reference, latency=False)
            return {"measured": True, **{k: ev[k] for k in self.step_eval_keys if k in ev}}
        return {"measured": True, **self.measure_module(model, data, ctx, spec, reference)}

    def measure_module(self, model: WorkingModel, data: ArrayDataset, ctx: PipelineContext, spec: JobSpec,
                       reference: dict[str, Any] | None) -> dict[str, Any]:
        """The task metric of a torch-form model, on the samples the baseline's reference outputs cover."""
        from worker.metrics import torch_metric

        primary = None if reference is None else next(iter(reference.values()), None)
        return torch_metric(model, data.take(spec.evaluate.max_samples), spec, reference=primary)

    def check_form(self, model: WorkingModel, form: str) -> None:
        """Refuse a conversion this family cannot make (StepFailed)."""

    def budget(self, spec: JobSpec, baseline: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
        """The headline metric's drop against ``max_accuracy_drop``."""
        in_metric, out_metric = metric_value(baseline), metric_value(output)
        drop = None if in_metric is None or out_metric is None else in_metric - out_metric
        max_drop = spec.evaluate.max_accuracy_drop
        budget: dict[str, Any] = {
            "max_accuracy_drop": max_drop,
            "metric": (baseline.get("metric") or {}).get("name"),
            "accuracy_drop": drop,
            "met": True,
        }
        if max_drop is not None:
            if drop is None:
                budget["met"] = False
                budget["reason"] = "the metric could not be measured (no eval data or no labels)"
            else:
                budget["met"] = bool(drop <= max_drop + 1e-12)
        return budget

    def gains(self, baseline: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
        """Gains of this family beyond the common ones (size, latency, parameters, MACs, metric)."""
        return {}

    def headline(self, output: dict[str, Any]) -> Any:
        """The report's ``fidelity``: how close the output stays to the input."""
        return output.get("fidelity")


class Classifier(Family):
    """Image and text classifiers, and generic ONNX models: top-1 accuracy when the data has labels."""


class Embedding(Family):
    """Sentence and image embedders (task ``feature-extraction``): cosine to the input's embeddings."""

    name = "embedding"


class CausalLM(Family):
    """Decoder-only LMs (task ``text-generation``): perplexity, agreement with the input, decode speed."""

    name = "causal-lm"
    step_eval_keys = ("accuracy", "metric", "perplexity", "nll", "tokens", "agreement", "size_bytes", "params",
                      "num_samples")
    reuses_input_export = True
    decodes = True

    def evaluate(self, model: WorkingModel, ctx: PipelineContext, spec: JobSpec, reference: dict[str, Any] | None,
                 latency: bool | None = None) -> Evaluation:
        """The LM harness: perplexity, agreement and KL against ``reference``, prefill and decode timing."""
        from worker.lm.evaluate import evaluate_lm
        from worker.lm.layout import LMLayout

        assert model.onnx_path is not None
        train = ctx.dataset("train", model) if spec.evaluate.few_shot else None
        layout = LMLayout.from_meta(model.meta["lm"]) if "lm" in model.meta else None
        return evaluate_lm(model.onnx_path, ctx.dataset("eval", model), spec.evaluate, reference,
                           hf_dir=model.hf_dir, train=train, layout=layout, latency=latency,
                           check_cancelled=ctx.check_cancelled)

    def measure_module(self, model: WorkingModel, data: ArrayDataset, ctx: PipelineContext, spec: JobSpec,
                       reference: dict[str, Any] | None) -> dict[str, Any]:
        """Perplexity of a torch-form LM, measured by torch itself."""
        from worker.lm.evaluate import torch_perplexity

        return torch_perplexity(model, data.take(spec.evaluate.max_samples), check_cancelled=ctx.check_cancelled)

    def check_form(self, model: WorkingModel, form: str) -> None:
        """A KV-cache graph cannot be made trainable again."""
        if form == "torch" and model.form == "onnx":
            raise StepFailed(
                "unsupported_model",
                "this step needs the causal LM in torch form, but it is already ONNX (a KV-cache graph cannot be "
                "made trainable again): put prune, finetune, distill and export before quantize",
            )

    def budget(self, spec: JobSpec, baseline: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
        """The relative perplexity increase against ``max_perplexity_increase`` and the choice accuracy drop
        against ``max_accuracy_drop``; ``met`` only when every given bound holds."""
        cfg = spec.evaluate
        in_ppl, out_ppl = baseline.get("perplexity"), output.get("perplexity")
        in_acc, out_acc = baseline.get("accuracy"), output.get("accuracy")
        increase = None if not in_ppl or out_ppl is None else float(out_ppl) / float(in_ppl) - 1.0
        drop = None if in_acc is None or out_acc is None else float(in_acc) - float(out_acc)
        budget: dict[str, Any] = {
            "max_accuracy_drop": cfg.max_accuracy_drop,
            "max_perplexity_increase": cfg.max_perplexity_increase,
            "metric": (baseline.get("metric") or {}).get("name"),
            "accuracy_drop": drop,
            "perplexity_increase": increase,
            "met": True,
        }
        missed: list[str] = []
        if cfg.max_perplexity_increase is not None:
            if increase is None:
                missed.append("perplexity could not be measured (no eval text)")
            elif increase > cfg.max_perplexity_increase + 1e-12:
                missed.append(f"perplexity rose {increase * 100:.2f}% ({in_ppl:.4g} -> {out_ppl:.4g}; "
                              f"allowed {cfg.max_perplexity_increase * 100:.2f}%)")
        if cfg.max_accuracy_drop is not None:
            if drop is None:
                missed.append("choice accuracy could not be measured (no eval rows with evaluate.choices)")
            elif drop > cfg.max_accuracy_drop + 1e-12:
                missed.append(f"choice accuracy fell {drop * 100:.2f} points "
                              f"(allowed {cfg.max_accuracy_drop * 100:.2f})")
        if missed:
            budget["met"] = False
            budget["reason"] = "; ".join(missed)
        return budget

    def gains(self, baseline: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
        """Decode speed-up, perplexity ratio and session memory ratio."""
        def tps(ev: dict[str, Any]) -> float | None:
            return (ev.get("decode") or {}).get("tokens_per_s")

        return {
            "decode_speedup": ratio(tps(output), tps(baseline)),
            "perplexity_ratio": ratio(output.get("perplexity"), baseline.get("perplexity")),
            "memory_ratio": ratio(baseline.get("peak_memory_bytes"), output.get("peak_memory_bytes")),
        }

    def headline(self, output: dict[str, Any]) -> Any:
        """Top-1 agreement and KL against the input model."""
        return output.get("agreement")


_BY_TASK: dict[str, type[Family]] = {"feature-extraction": Embedding, **{t: CausalLM for t in LM_TASKS}}


def family_for(task: str, model: WorkingModel | None = None) -> Family:
    """The family of a job: from its task, or a causal LM when the input model is one (task ``generic``)."""
    from worker.convert import is_causal_lm

    if model is not None and is_causal_lm(model):
        return CausalLM()
    return _BY_TASK.get(task, Classifier)()
