"""The job spec (docs/architecture.md §5): pure pydantic, shared by API, worker and client; STEP_KINDS is the step table."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Task = Literal["image-classification", "text-classification", "feature-extraction", "text-generation", "generic"]
# Every task, in the order the CLI offers them; the one list (a view of ``Task``).
TASKS: tuple[str, ...] = get_args(Task)
# The tasks an uploaded Hugging Face model may name (``generic`` is for ONNX uploads).
HF_TASKS: frozenset[str] = frozenset(TASKS) - {"generic"}
# Tasks whose labels are class indices into the model's first output (checked against it at submit time).
CLASSIFICATION_TASKS: frozenset[str] = frozenset({"image-classification", "text-classification"})
# Tasks whose top-1 accuracy is measured when the data has labels (a generic model may be a classifier).
ACCURACY_TASKS: frozenset[str] = CLASSIFICATION_TASKS | {"generic"}
# Decoder-only language models (``*ForCausalLM``): perplexity, KV-cache export, weight-only INT4.
LM_TASKS: frozenset[str] = frozenset({"text-generation"})

# The form of the working model a step takes: a file (``onnx``) or a trainable module (``torch``).
Form = Literal["onnx", "torch"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class ModelRef:
    """An uploaded model a step reads by id: the field it is named in (``teacher``, ``student.model``) and what
    the step uses it as, for messages (``distillation (as the teacher)``)."""

    field: str
    model_id: str
    use: str


class StepParams(_Strict):
    """Base of every step's parameter model; its ``type`` field (a one-value Literal) names the step."""

    if TYPE_CHECKING:
        type: str

    def model_refs(self) -> list[ModelRef]:
        """The uploaded models this step reads, by id (checked at submit, fetched by the worker, keyed by bytes)."""
        return []


# Calibration rows whose activation maxima set a ``smooth`` step's scales (as many as auto_exclude measures).
SMOOTH_SAMPLES = 32


class Calibration(_Strict):
    """How static quantization collects activation ranges."""

    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    samples: int = Field(256, ge=1, le=100_000)
    percentile: float = Field(99.999, gt=90.0, le=100.0)


class AutoExclude(_Strict):
    """Sensitivity-guided mixed precision: keep in float the fewest nodes that meet one target.

    ``min_fidelity``: worst-case agreement with the input model on the calibration samples (top-1
    agreement for classifiers, the worst sample's output cosine otherwise); ``max_accuracy_drop``:
    accuracy on labelled calibration samples at most this far below the unquantized model's.
    ``max_nodes`` caps the nodes kept in float, ``samples`` the calibration samples measured,
    ``max_rounds`` the quantize+evaluate rounds (one per candidate node, plus the greedy additions).
    """

    min_fidelity: float | None = Field(None, gt=0.0, le=1.0)
    max_accuracy_drop: float | None = Field(None, ge=0.0, le=1.0)
    max_nodes: int = Field(8, ge=1, le=256)
    samples: int = Field(32, ge=1, le=4096)
    max_rounds: int = Field(200, ge=2, le=2000)

    @model_validator(mode="after")
    def _one_target(self) -> AutoExclude:
        if (self.min_fidelity is None) == (self.max_accuracy_drop is None):
            raise ValueError("auto_exclude needs exactly one of min_fidelity and max_accuracy_drop")
        return self


QuantizeMode = Literal["dynamic", "static", "fp16", "int4", "int8_weight", "int8_folded"]
# Weight-only modes: MatMul weights to ONNX Runtime's MatMulNBits (4 or 8 bits), activations stay float.
WEIGHT_ONLY_MODES: frozenset[str] = frozenset({"int4", "int8_weight"})


class QuantizeStep(StepParams):
    """Post-training quantization of an ONNX graph with onnxruntime.quantization.

    ``dynamic``/``static``: INT8 (QuantizeLinear/QDQ); ``fp16``: float16 weights and activations;
    ``int4``/``int8_weight``: weight-only block quantization of MatMul (and optionally Gather) weights to
    ``MatMulNBits`` with ``matmul_nbits_quantizer`` (``algorithm``, ``block_size``, ``symmetric``,
    ``accuracy_level``, ``quantize_embeddings``, per-node ``bits``); None means the measured default.
    ``int8_folded``: Conv/ConvTranspose/Gemm/MatMul weights stored as symmetric int8 (per output channel, or per
    tensor with ``per_channel: false``) behind ``Cast -> Mul``, which ONNX Runtime folds to float at load:
    about 4x smaller files, float kernels and speed (worker/passes/quantizers/folded.py).
    """

    type: Literal["quantize"]
    mode: QuantizeMode = "dynamic"
    per_channel: bool = True
    weight_type: Literal["int8", "uint8"] = "int8"
    calibration: Calibration = Field(default_factory=Calibration)
    op_types_to_exclude: list[str] = Field(default_factory=list)
    nodes_to_exclude: list[str] = Field(default_factory=list)
    keep_io_types: bool = True
    # 7-bit weights: x86 CPUs without VNNI saturate int16 sums of u8 x s8 products (ORT's AVX2 kernels),
    # which cost a digits MLP 12% of its output range. None: on exactly when the worker's CPU lacks VNNI.
    reduce_range: bool | None = None
    # -- weight-only (int4 / int8_weight) --
    algorithm: Literal["rtn", "hqq", "gptq"] | None = None
    block_size: int | None = Field(None, ge=16, le=256)
    symmetric: bool | None = None
    accuracy_level: int | None = Field(None, ge=0, le=4)
    # None: on (int4) when the output head's weight is the embedding table (tied), else off.
    quantize_embeddings: bool | None = None
    # {"<node name or op type, fnmatch pattern>": 4 | 8}: per-node bit widths (e.g. keep the head at 8).
    # None: the measured default policy (worker/passes/quantizers/weight_only.py); {}: every node at the mode's width.
    bits: dict[str, Literal[4, 8]] | None = Field(None, max_length=256)
    # int4: share of the decoder layers' weights kept at 8 bits, the layers whose 4-bit weights move the
    # next-token distribution most (KL to the float model on the calibration text); None: the default.
    int8_share: float | None = Field(None, ge=0.0, le=1.0)
    # Measure each node's sensitivity on calibration data and keep the most sensitive ones in float.
    auto_exclude: AutoExclude | None = None
    # SmoothQuant's migration strength alpha (dynamic/static): activation outliers moved into the MatMul
    # weights by per-channel scales measured on calibration rows (worker/passes/quantizers/smooth.py).
    smooth: float | None = Field(None, gt=0.0, lt=1.0)

    @model_validator(mode="after")
    def _weight_only_fields(self) -> QuantizeStep:
        if self.auto_exclude is not None and self.mode not in ("dynamic", "static"):
            raise ValueError(f"auto_exclude applies to modes dynamic and static only, not {self.mode!r}")
        if self.smooth is not None and self.mode not in ("dynamic", "static"):
            raise ValueError(f"smooth applies to modes dynamic and static only, not {self.mode!r}")
        if self.mode not in WEIGHT_ONLY_MODES:
            given = [f for f in ("algorithm", "block_size", "symmetric", "accuracy_level") if getattr(self, f) is not None]
            given += [f for f in ("quantize_embeddings", "bits", "int8_share")
                      if f in self.model_fields_set and getattr(self, f)]
            if given:
                raise ValueError(f"{', '.join(given)} apply to modes int4 and int8_weight only, not {self.mode!r}")
        if self.mode == "int8_folded" and self.weight_type != "int8":
            raise ValueError("int8_folded stores symmetric int8 weights: weight_type uint8 does not apply")
        if self.block_size is not None and self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two (16..256), not {self.block_size}")
        return self


class PruneStep(StepParams):
    """Structured (channels, heads, MLP width) or unstructured (magnitude) pruning."""

    type: Literal["prune"]
    method: Literal["structured", "unstructured"] = "structured"
    ratio: float = Field(0.5, gt=0.0, lt=1.0)
    # What structured pruning removes: ``auto`` is decoder layers on causal LMs (``ratio`` of them, by
    # measured layer importance) and channels/heads/MLP width elsewhere; ``width`` forces the latter.
    target: Literal["auto", "layers", "width"] = "auto"
    importance: Literal["l1", "l2", "taylor"] = "l2"
    scope: Literal["uniform", "global"] = "uniform"
    round_to: int | None = Field(None, ge=1, le=256)
    skip_layers: list[str] = Field(default_factory=list)
    iterative_steps: int = Field(1, ge=1, le=20)
    taylor_batches: int = Field(4, ge=1, le=100)


class LoraConfig(_Strict):
    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None


class Until(_Strict):
    """Train until the budget holds on a validation split carved from data.train (never the eval set):
    the task metric at most ``max_accuracy_drop`` below the input model's on the same split."""

    max_accuracy_drop: float = Field(ge=0.0, le=1.0)


class TrainingParams(_Strict):
    """Optimizer and loop settings shared by fine-tuning and distillation (AdamW, warm-up + cosine)."""

    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(32, ge=1, le=65536)
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    grad_accum: int = Field(1, ge=1, le=1024)
    early_stopping_patience: int | None = Field(None, ge=1)
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    max_steps: int | None = Field(None, ge=1)
    # Stop as soon as the accuracy budget holds (checked after each epoch), at most ``max_epochs``.
    until: Until | None = None
    max_epochs: int | None = Field(None, ge=1, le=1000)

    @model_validator(mode="after")
    def _until_epochs(self) -> TrainingParams:
        if self.max_epochs is not None and self.until is None:
            raise ValueError("max_epochs applies with until only (without it, set epochs)")
        return self

    def planned_epochs(self) -> int:
        """The most epochs the loop runs: ``max_epochs`` with ``until`` (default ``epochs``), else ``epochs``."""
        return self.max_epochs if self.until is not None and self.max_epochs is not None else self.epochs


class TaskData(_Strict):
    """One task's datasets: ``train`` (labelled rows) and, optionally, ``eval`` (its own held-out rows)."""

    train: str
    eval: str | None = None


class TaskSpec(_Strict):
    """One task of a multi-task step: a name (the ONNX output is ``logits_<name>``), its data, its weight in the
    sampling rule, and optionally the label set its datasets must hold (checked at submit time)."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,39}$")
    data: TaskData
    weight: float = Field(1.0, gt=0.0, le=1000.0)
    labels: list[str] | None = Field(None, min_length=2, max_length=1000)
    # ``adapters: merge``: this task's LoRA rank (default the step's ``lora.r``); the task's ``weight`` is its
    # adapter's weight in the merge.
    rank: int | None = Field(None, ge=1, le=256)


Sampling = Literal["proportional", "temperature", "uniform"]
# peft ``add_weighted_adapter`` combination types a merge may try. ``linear``, ``ties``, ``dare_*`` and
# ``magnitude_prune`` combine the A and B matrices separately and need every adapter at one rank; ``cat`` stacks
# them (exact sum of the weighted updates) and the ``*_svd`` ones fold the weighted updates back to one rank.
MergeMethod = Literal["linear", "cat", "svd", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                      "dare_linear_svd", "magnitude_prune"]
EQUAL_RANK_METHODS: frozenset[str] = frozenset({"linear", "ties", "dare_ties", "dare_linear", "magnitude_prune"})
DENSITY_METHODS: frozenset[str] = frozenset(get_args(MergeMethod)) - {"linear", "cat", "svd"}


def _default_merge_methods() -> list[MergeMethod]:
    return ["linear", "ties", "dare_ties", "dare_linear", "cat"]


class MergeConfig(_Strict):
    """How ``adapters: merge`` combines the tasks' LoRA adapters (peft ``add_weighted_adapter``, each adapter
    weighted by its task's ``weight``): every method in ``methods`` is measured on each task's validation split
    (``validation`` of its train rows, carved off before training) and the best mean metric is kept.
    ``density``: the share of each update the pruning methods (``ties``, ``dare_*``, ``magnitude_prune``) keep.
    ``refit_heads``: after each merge, refit every task's head (the backbone frozen) on its train rows' features,
    since the heads were trained against their own adapter's features, not the merged ones."""

    methods: list[MergeMethod] = Field(default_factory=_default_merge_methods, min_length=1, max_length=10)
    density: float = Field(0.5, gt=0.0, le=1.0)
    validation: float = Field(0.2, gt=0.0, le=0.5)
    refit_heads: bool = True


class FinetuneStep(TrainingParams, StepParams):
    """Fine-tuning: full, frozen backbone with a (new) head, last-N layers, or LoRA (peft).

    ``tasks`` (multi-task): one shared backbone and one head per task for encoders and CNNs, one model trained
    on the tasks' rows mixed for causal LMs; each batch is drawn from a task picked by ``sampling``
    (``proportional`` to weight x rows, ``temperature``: (weight x rows)^(1/T), ``uniform``: by weight alone).
    """

    type: Literal["finetune"]
    mode: Literal["full", "head", "last_n", "lora"] = "full"
    num_labels: int | None = Field(None, ge=1)
    last_n: int | None = Field(None, ge=1)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    tasks: list[TaskSpec] | None = Field(None, min_length=1, max_length=16)
    sampling: Sampling = "proportional"
    temperature: float = Field(2.0, gt=0.0, le=100.0)
    # Multi-task transfer: one LoRA adapter per task (each trained on its task alone), merged into one model.
    adapters: Literal["merge"] | None = None
    merge: MergeConfig | None = None
    # With adapters 'merge' on a causal LM: also deliver the unmerged base ONNX and one adapter file per task
    # (adapters.zip) that onnxruntime-genai's multi-LoRA API loads and switches at run time.
    adapter_files: bool = False
    # Set by the job on its child jobs (one per task, spread over the workers): train only this task's adapter and
    # keep it as the ``adapter.zip`` artifact; the other tasks are loaded for their seeds and heads only.
    adapter_task: str | None = None
    # Each task's metric against a single-task fine-tune of the same budget: one sibling job per task (child jobs
    # spread over the workers, from the whole-job cache when an identical one succeeded before).
    baselines: Literal["single_task"] | None = None

    @model_validator(mode="after")
    def _last_n_given(self) -> FinetuneStep:
        if self.mode == "last_n" and self.last_n is None:
            raise ValueError("mode 'last_n' needs last_n")
        if self.tasks is not None:
            for field in ("num_labels", "until"):
                if getattr(self, field) is not None:
                    raise ValueError(f"{field} does not apply with tasks (each task's head fits its own labels)")
        elif any(getattr(self, f) != type(self).model_fields[f].default for f in ("sampling", "temperature")):
            # not model_fields_set: a stored spec carries the defaults, and it must validate again
            raise ValueError("sampling and temperature apply with tasks only")
        return self


class StudentLayers(_Strict):
    layers: int = Field(ge=1, le=128)


class StudentModel(_Strict):
    model: str


class DistillStep(TrainingParams, StepParams):
    """Knowledge distillation (Hinton et al. 2015): a' KL(teacher/T || student/T) T^2 + (1-a) task loss."""

    type: Literal["distill"]
    # Recovery after pruning gets few optimizer steps (a handful of epochs): 2e-3 recovers a pruned CNN
    # within a few tenths of a point where TrainingParams' 1e-3 stays about a point short.
    lr: float = Field(2e-3, gt=0.0, le=10.0)
    # "input": the job's input model; "current": the working model as the earlier steps left it
    # (e.g. after a LoRA fine-tune); otherwise an uploaded model's id.
    teacher: str = "input"
    student: StudentLayers | StudentModel | None = None
    temperature: float = Field(4.0, gt=0.0, le=100.0)
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    feature_loss: Literal["cosine", "mse"] = "cosine"
    hidden_weight: float = Field(0.0, ge=0.0)

    def model_refs(self) -> list[ModelRef]:
        """An uploaded teacher and an uploaded student model."""
        refs = [] if self.teacher in ("input", "current") else [ModelRef("teacher", self.teacher, "distillation (as the teacher)")]
        if isinstance(self.student, StudentModel):
            refs.append(ModelRef("student.model", self.student.model, "distillation (as the student)"))
        return refs


class ExportStep(StepParams):
    """Torch to ONNX export with a parity check against the torch model."""

    type: Literal["export"]
    opset: int = Field(17, ge=11, le=23)
    dynamic_batch: bool = True
    dynamic_sequence: bool = True
    atol: float = Field(1e-3, gt=0.0)
    samples: int = Field(16, ge=1, le=4096)




@dataclass(frozen=True)
class StepKind:
    """One step type: its parameter model, the form it takes, whether it trains, its label.

    ``trains``: the step fits weights on ``data.train`` (the spec then requires it);
    ``gpu``: the step works on the torch module, so a job with it goes to the gpu queue by default;
    ``label``: the job's phase and the report's name for a step (given the validated parameters).
    """

    params: type[StepParams]
    takes: Form
    label: Callable[[Any], str]
    trains: bool = False
    gpu: bool = False

    @property
    def name(self) -> str:
        """The step's ``type`` (the one value of its parameter model's ``type`` Literal)."""
        return str(self.params.model_fields["type"].annotation.__args__[0])  # type: ignore[union-attr]


def _quantize_detail(s: QuantizeStep) -> str:
    """What tells quantize recipes apart in a label: a weight-only step's algorithm, block size, per-node bits,
    4-bit embedding tables and 8-bit layer share when given; an INT8 step's calibration method (not minmax),
    per-tensor weights, and sensitivity-guided exclusion."""
    detail = (f" {s.algorithm}" if s.algorithm else "") + (f" b{s.block_size}" if s.block_size else "")
    if s.mode in WEIGHT_ONLY_MODES:
        if s.bits is not None:
            detail += " bits {" + ", ".join(f"{k}: {v}" for k, v in s.bits.items()) + "}"
        detail += " 4-bit tables" if s.quantize_embeddings and not (s.bits or {}).get("Gather") else ""
        detail += f" 8-bit share {s.int8_share:g}" if s.int8_share else ""
    if s.mode == "static" and s.calibration.method != "minmax":
        cal = s.calibration
        detail += f" {cal.method}" + (f" {cal.percentile:g}" if cal.method == "percentile" else "")
    if s.mode in ("static", "dynamic", "int8_folded") and not s.per_channel:
        detail += " per-tensor"
    detail += f" smooth {s.smooth:g}" if s.smooth is not None else ""
    return detail + (" auto_exclude" if s.auto_exclude is not None else "")


# The step table: every step type, in the order ``GET /v1/passes`` lists them. It drives the ``Step``
# union, ``step_types()``, ``JobSpec.needs_training()``, ``step_label()`` and the worker's pass registry.
#
# A new pass is: one parameter model above (a ``StepParams`` with ``type: Literal["<name>"]``), its row
# here, one module in worker/passes/ with a ``Pass`` subclass whose ``name = "<name>"`` (it registers
# itself and takes ``params``/``takes`` from this row), and its tests (tests/worker/passes/test_<name>.py).
_KINDS = (
    StepKind(QuantizeStep, "onnx", lambda s: f"quantize ({s.mode}{_quantize_detail(s)})"),
    StepKind(PruneStep, "torch", lambda s: f"prune ({s.method} {s.ratio:g})", gpu=True),
    StepKind(FinetuneStep, "torch", lambda s: f"finetune ({s.mode}{f', {len(s.tasks)} tasks' if s.tasks else ''}"
             f"{', adapters merged' if s.adapters == 'merge' else ''})",
             trains=True, gpu=True),
    StepKind(DistillStep, "torch", lambda s: f"distill (to {s.student.layers} layers)"
             if isinstance(s.student, StudentLayers) else "distill", trains=True, gpu=True),
    StepKind(ExportStep, "torch", lambda s: f"export (opset {s.opset})"),
)
STEP_KINDS: dict[str, StepKind] = {k.name: k for k in _KINDS}

# The form each step takes, by type (a view of STEP_KINDS).
STEP_FORMS: dict[str, Form] = {name: k.takes for name, k in STEP_KINDS.items()}

if TYPE_CHECKING:
    Step = StepParams  # the checker sees the common base; narrow with isinstance
else:
    Step = Annotated[Union[tuple(k.params for k in _KINDS)], Field(discriminator="type")]  # noqa: UP007


def step_types() -> list[str]:
    """Names of every step type the union accepts (the worker's pass registry names the same)."""
    return sorted(STEP_KINDS)


def step_label(step: StepParams | Mapping[str, Any]) -> str:
    """A human label for a step (e.g. ``quantize (static)``): the job's phase, the report's step name, a trial's name.

    Takes a step model or a plain dict (a stored spec); a dict that is not a valid step gets its type.
    """
    if isinstance(step, StepParams):
        return STEP_KINDS[step.type].label(step)
    kind = STEP_KINDS.get(str(step.get("type")))
    if kind is None:
        return str(step.get("type", "?"))
    try:
        return kind.label(kind.params.model_validate(step))
    except ValidationError:
        return kind.name


class DataRefs(_Strict):
    train: str | None = None
    eval: str | None = None
    calibration: str | None = None


class ExportConfig(_Strict):
    format: Literal["onnx"] = "onnx"
    opset: int = Field(17, ge=11, le=23)


# ONNX Runtime execution providers a latency measurement may ask for (the worker must have it installed).
Provider = Literal[
    "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider", "OpenVINOExecutionProvider",
    "DmlExecutionProvider", "CoreMLExecutionProvider", "ROCMExecutionProvider",
]


class LatencyConfig(_Strict):
    warmup: int = Field(5, ge=0, le=1000)
    runs: int = Field(30, ge=1, le=1000)
    # Clamped by the worker to the cores it has (the report records the threads used).
    threads: int = Field(1, ge=1, le=256)
    batch_size: int = Field(1, ge=1, le=1024)
    # The provider latency is measured with (and the report names); a worker without it fails the job saying so.
    provider: Provider = "CPUExecutionProvider"


Metric = Literal["accuracy", "latency", "size", "fidelity"]


def _all_metrics() -> list[Metric]:
    return ["accuracy", "latency", "size", "fidelity"]


class GenerationConfig(_Strict):
    """Causal LMs: greedy generations shown before/after in the report, and the prefill/decode timing."""

    samples: int = Field(3, ge=0, le=16)
    max_new_tokens: int = Field(32, ge=1, le=512)
    prompt_tokens: int = Field(128, ge=1, le=8192)  # prefill latency is timed on a prompt this long


class EvaluateConfig(_Strict):
    metrics: list[Metric] = Field(default_factory=_all_metrics)
    max_accuracy_drop: float | None = Field(None, ge=0.0, le=1.0)
    # Causal LMs: the largest relative perplexity increase allowed (0.05 = output ppl at most 5% above input).
    max_perplexity_increase: float | None = Field(None, ge=0.0, le=100.0)
    # Zero-/few-shot classification of eval rows {"text", "label"}: each choice scored by its
    # log-likelihood after the prompt; ``few_shot`` examples are drawn from data.train.
    choices: list[str] | None = Field(None, min_length=2, max_length=64)
    few_shot: int = Field(0, ge=0, le=32)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    max_samples: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1, le=65536)
    latency: LatencyConfig = Field(default_factory=LatencyConfig)


class TextConfig(_Strict):
    max_length: int = Field(128, ge=2, le=8192)
    # Causal LMs, ``{"text"}`` rows: concatenate and cut into max_length blocks (else one row a sequence).
    packing: bool = True


class ImageConfig(_Strict):
    size: int = Field(224, ge=4, le=4096)
    mean: list[float] = Field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = Field(default_factory=lambda: [0.229, 0.224, 0.225])


Objective = Literal["latency", "size"]


class SearchConstraints(_Strict):
    """What a trial must meet to win (docs/architecture.md §10). ``min_fidelity`` is judged on the worst case:
    the lowest per-sample cosine to the input model's outputs (top-1 agreement for classifiers)."""

    max_accuracy_drop: float | None = Field(None, ge=0.0, le=1.0)
    min_fidelity: float | None = Field(None, ge=-1.0, le=1.0)
    max_perplexity_increase: float | None = Field(None, ge=0.0, le=100.0)
    max_latency_ms: float | None = Field(None, gt=0.0)
    max_size_mb: float | None = Field(None, gt=0.0)

    def needing_eval(self) -> list[str]:
        """The constraints set that are measured on eval data."""
        names = ("max_accuracy_drop", "min_fidelity", "max_perplexity_increase")
        return [n for n in names if getattr(self, n) is not None]


class SearchBudget(_Strict):
    max_trials: int = Field(8, ge=1, le=64)
    max_wall_s: float | None = Field(None, gt=0.0)


class SearchSpec(_Strict):
    """An auto-optimize search: trials (each a steps list) fanned out as child jobs, the best one wins.

    ``space``: ``"auto"`` (derived from the task, the model and the data given) or explicit step lists,
    each validated like ``steps``; ``prefix``: steps every trial runs first (a multi-task ``finetune``: the
    ``auto`` space is then its post-training recipes, and the stage cache computes the prefix once);
    ``parallelism``: trials running at once. With multi-task trials the accuracy constraint holds on every
    task (the worst task decides)."""

    objective: Objective = "latency"
    constraints: SearchConstraints = Field(default_factory=SearchConstraints)
    budget: SearchBudget = Field(default_factory=SearchBudget)
    space: Literal["auto"] | list[list[Step]] = "auto"
    prefix: list[Step] = Field(default_factory=list, max_length=8)
    parallelism: int = Field(2, ge=1, le=16)

    @model_validator(mode="after")
    def _space_not_empty(self) -> SearchSpec:
        if isinstance(self.space, list):
            if not self.space or len(self.space) > 64:
                raise ValueError("search.space: give 1 to 64 step lists, or 'auto'")
            for i, steps in enumerate(self.space):
                if not steps:
                    raise ValueError(f"search.space.{i}: a trial needs at least one step")
        return self


def _tasks_evaluated(search: SearchSpec) -> bool:
    """Whether every trial runs a multi-task step whose tasks all name eval rows (then no ``data.eval`` is needed:
    each task is measured on its own)."""
    def evaluated(steps: list[Any]) -> bool:
        return any(getattr(s, "tasks", None) and all(t.data.eval for t in s.tasks) for s in steps)

    if evaluated(search.prefix):
        return True
    return isinstance(search.space, list) and all(evaluated(steps) for steps in search.space)


def trial_spec(spec: JobSpec, steps: list[Any], *, prefix: bool = True) -> JobSpec:
    """The spec of one trial of a search: the parent's, with the search's ``prefix`` (unless ``prefix`` is false:
    the input's own baseline row) then ``steps``, and the search's eval budgets."""
    assert spec.search is not None
    c = spec.search.constraints
    evaluate = spec.evaluate.model_copy(update={
        "max_accuracy_drop": c.max_accuracy_drop if c.max_accuracy_drop is not None else spec.evaluate.max_accuracy_drop,
        "max_perplexity_increase": (c.max_perplexity_increase if c.max_perplexity_increase is not None
                                    else spec.evaluate.max_perplexity_increase),
    })
    # JobSpec's own fields only: the API's JobCreate adds the job's name and metadata, which a trial's spec has not
    own = set(JobSpec.model_fields) - {"search", "steps", "evaluate"}
    body = spec.model_dump(mode="json", include=own)
    body["evaluate"] = evaluate.model_dump(mode="json")
    body["steps"] = [s if isinstance(s, dict) else s.model_dump(mode="json") for s in [*(spec.search.prefix if prefix else []), *steps]]
    return JobSpec.model_validate(body)


class JobSpec(_Strict):
    """A whole job: input model, data, ordered steps, export and evaluation settings."""

    model: str
    task: Task = "generic"
    data: DataRefs = Field(default_factory=DataRefs)
    steps: list[Step] = Field(default_factory=list, max_length=32)
    export: ExportConfig = Field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    image: ImageConfig = Field(default_factory=ImageConfig)
    seed: int = 0
    queue: Literal["cpu", "gpu"] | None = None
    # The stage cache (worker.stage_cache): false runs every step afresh and stores nothing (benchmarks).
    cache: bool = True
    # An auto-optimize search instead of ``steps`` (models/search_space.py derives the ``auto`` space).
    search: SearchSpec | None = None

    @model_validator(mode="after")
    def _check_order_and_data(self) -> JobSpec:
        if self.search is not None:
            self._check_search(self.search)
        quantized_at: int | None = None
        for i, step in enumerate(self.steps):
            if step.type == "quantize":
                quantized_at = i if quantized_at is None else quantized_at
            elif quantized_at is not None:
                raise ValueError(
                    f"steps.{i}: a '{step.type}' step cannot follow 'quantize' (steps.{quantized_at}); "
                    "quantize last"
                )
            tasks = getattr(step, "tasks", None)
            if tasks:
                seen: dict[str, int] = {}
                for j, task in enumerate(tasks):
                    if task.name in seen:
                        raise ValueError(f"steps.{i}.tasks.{j}.name: task {task.name!r} is repeated "
                                         f"(steps.{i}.tasks.{seen[task.name]}.name)")
                    seen[task.name] = j
                if isinstance(step, FinetuneStep):
                    self._check_adapters(i, step, tasks)
                    self._check_baselines(i, step, tasks)
            elif isinstance(step, FinetuneStep) and (step.adapters or step.merge or step.baselines
                                                     or step.adapter_files or step.adapter_task or None) is not None:
                field = next(f for f in ("adapters", "merge", "baselines", "adapter_files", "adapter_task")
                             if getattr(step, f) not in (None, False))
                why = ("single-task baselines compare each task of a multi-task step" if field == "baselines"
                       else "merging adapters takes one adapter per task")
                raise ValueError(f"steps.{i}.{field}: {why}, and the step names no tasks")
            elif STEP_KINDS[step.type].trains and self.data.train is None:
                raise ValueError(f"steps.{i}: a '{step.type}' step needs data.train")
            if isinstance(step, QuantizeStep) and step.mode == "static" and not self._has_rows():
                raise ValueError(f"steps.{i}: static quantization needs data.calibration")
            if isinstance(step, QuantizeStep) and step.auto_exclude is not None and not self._has_rows():
                raise ValueError(f"steps.{i}: auto_exclude measures sensitivity on data.calibration, which is not given")
            if isinstance(step, QuantizeStep) and step.smooth is not None and not self._has_rows():
                raise ValueError(f"steps.{i}: smooth measures activation ranges on data.calibration, which is not given")
            if isinstance(step, QuantizeStep) and step.algorithm == "gptq" and not self._has_rows():
                raise ValueError(f"steps.{i}: algorithm 'gptq' needs calibration text (data.calibration)")
        if self.evaluate.few_shot and not self.evaluate.choices:
            raise ValueError("evaluate.few_shot needs evaluate.choices")
        if self.evaluate.few_shot and self.data.train is None:
            raise ValueError("evaluate.few_shot draws its examples from data.train, which is not given")
        return self

    def _check_adapters(self, i: int, step: FinetuneStep, tasks: list[TaskSpec]) -> None:
        """``adapters: merge``: LoRA, two tasks or more, no sampling, ranks every merge method can combine."""
        at = f"steps.{i}"
        if step.adapters is None:
            for j, task in enumerate(tasks):
                if task.rank is not None:
                    raise ValueError(f"{at}.tasks.{j}.rank: task {task.name!r}: rank applies with adapters 'merge' only")
            for field in ("merge", "adapter_files", "adapter_task"):
                if getattr(step, field) not in (None, False):
                    raise ValueError(f"{at}.{field}: applies with adapters 'merge' only")
            return
        if step.adapter_files and self.task not in LM_TASKS:
            raise ValueError(f"{at}.adapter_files: per-task adapter files are for causal LMs (onnxruntime-genai's "
                             f"multi-LoRA API); task {self.task!r} gets one merged model with an output per task")
        if step.adapter_task is not None and step.adapter_task not in {t.name for t in tasks}:
            raise ValueError(f"{at}.adapter_task: {step.adapter_task!r} is not one of the step's tasks")
        if step.mode != "lora":
            raise ValueError(f"{at}.mode: adapters 'merge' trains one LoRA adapter per task; set mode 'lora' "
                             f"(not {step.mode!r})")
        if len(tasks) < 2:
            raise ValueError(f"{at}.tasks: adapters 'merge' needs two tasks or more (one adapter per task), "
                             f"got {len(tasks)}")
        for j, task in enumerate(tasks):
            if task.name in "lora_":  # peft names each adapter after its task; such names clash with its keys
                raise ValueError(f"{at}.tasks.{j}.name: task {task.name!r} cannot name a LoRA adapter (peft keys "
                                 "its weights 'lora_<A|B>.<adapter>'); choose another name")
        defaults = type(step).model_fields
        for name in ("sampling", "temperature"):
            if getattr(step, name) != defaults[name].default:
                raise ValueError(f"{at}.{name}: each adapter trains on its own task alone; {name} does not apply "
                                 "with adapters 'merge'")
        merge = step.merge or MergeConfig()
        ranks = {task.name: task.rank or step.lora.r for task in tasks}
        for k, method in enumerate(merge.methods):
            if method in merge.methods[:k]:
                raise ValueError(f"{at}.merge.methods.{k}: {method!r} is repeated")
            if method in EQUAL_RANK_METHODS and len(set(ranks.values())) > 1:
                (a, ra), (b, rb) = next((x, y) for x in ranks.items() for y in ranks.items() if x[1] != y[1])
                raise ValueError(f"{at}.merge.methods.{k}: {method!r} needs every adapter at one rank, but task "
                                 f"{a!r} has r={ra} and task {b!r} r={rb} (use cat or an *_svd method)")

    def _check_baselines(self, i: int, step: FinetuneStep, tasks: list[TaskSpec]) -> None:
        """``baselines: single_task``: two tasks or more, not with merged adapters, every task with eval rows."""
        if step.baselines is None:
            return
        at = f"steps.{i}.baselines"
        if step.adapters is not None:
            raise ValueError(f"{at}: adapters 'merge' already measures each task's adapter alone (report: merge); "
                             "single-task baselines apply to a multi-task fine-tune")
        if len(tasks) < 2:
            raise ValueError(f"{at}: a single-task baseline of a step with one task is the step itself; name two "
                             f"tasks or more (got {len(tasks)})")
        for j, task in enumerate(tasks):
            if task.data.eval is None:
                raise ValueError(f"steps.{i}.tasks.{j}.data.eval: task {task.name!r}: baselines 'single_task' "
                                 "compares each task on its own eval rows, which are not given")

    def _has_rows(self) -> bool:
        """Whether any rows can calibrate: ``data``'s, else a multi-task step's first task's train rows."""
        return bool(self.data.calibration or self.data.train or self.data.eval or self.first_task_data())

    def _check_search(self, search: SearchSpec) -> None:
        if self.steps:
            raise ValueError("steps: must be empty when search is given (the search's space holds the steps)")
        if self.data.eval is None and not _tasks_evaluated(search):
            for name in search.constraints.needing_eval():
                raise ValueError(f"search.constraints.{name}: measured on eval data, which is not given (data.eval, "
                                 "or every task's data.eval in a multi-task step each trial runs)")
        if isinstance(search.space, list):
            for i, steps in enumerate(search.space):
                try:
                    trial_spec(self, steps)
                except ValidationError as e:
                    first = e.errors()[0]
                    raise ValueError(f"search.space.{i}: {str(first['msg']).removeprefix('Value error, ')}") from None
        elif search.prefix:
            try:
                trial_spec(self, [])
            except ValidationError as e:
                first = e.errors()[0]
                raise ValueError(f"search.prefix: {str(first['msg']).removeprefix('Value error, ')}") from None

    def step_paths(self) -> list[tuple[str, Step]]:
        """Every step the job (or its search's trials) may run, with its field path (``search.space.1.0``)."""
        found: list[tuple[str, Step]] = [(f"steps.{i}", s) for i, s in enumerate(self.steps)]
        if self.search is not None:
            found += [(f"search.prefix.{i}", s) for i, s in enumerate(self.search.prefix)]
            if isinstance(self.search.space, list):
                found += [(f"search.space.{k}.{i}", s) for k, steps in enumerate(self.search.space)
                          for i, s in enumerate(steps)]
        return found

    def output_tasks(self) -> list[TaskSpec] | None:
        """The tasks of the last multi-task step: the output model has one output per task (classifiers)."""
        for step in reversed(self.steps):
            tasks = getattr(step, "tasks", None)
            if tasks:
                return list(tasks)
        return None

    def model_ids(self) -> set[str]:
        """Every model id the job may read: the input and the models its steps refer to."""
        return {self.model} | {ref.model_id for step in self.steps for ref in step.model_refs()}

    def dataset_ids(self) -> set[str]:
        """Every dataset id the job may read: ``data``'s and those of its steps' tasks."""
        ids = {i for i in (self.data.train, self.data.eval, self.data.calibration) if i}
        for _, step in self.step_paths():
            for task in getattr(step, "tasks", None) or []:
                ids.update(i for i in (task.data.train, task.data.eval) if i)
        return ids

    def first_task_data(self) -> TaskData | None:
        """The first task's data of the first multi-task step (the job's eval data when ``data`` has none)."""
        for step in self.steps:
            tasks = getattr(step, "tasks", None)
            if tasks:
                return tasks[0].data
        return None

    def needs_training(self) -> bool:
        """Whether any step works on the torch module (such jobs go to the GPU queue by default)."""
        return any(STEP_KINDS[s.type].gpu for s in self.steps)

    def calibration_readers(self) -> list[tuple[str, int]]:
        """The steps that read calibration rows, as (field naming why, rows wanted): static INT8, auto_exclude,
        ``smooth``, GPTQ, ``int8_share``, Taylor-importance pruning (its gradients)."""
        found: list[tuple[str, int]] = []
        for i, step in enumerate(self.steps):
            if isinstance(step, QuantizeStep):
                wanted = step.calibration.samples
                if step.mode == "static":
                    found.append((f"steps.{i}.mode", wanted))
                if step.auto_exclude is not None:
                    found.append((f"steps.{i}.auto_exclude", step.auto_exclude.samples))
                if step.smooth is not None:
                    found.append((f"steps.{i}.smooth", SMOOTH_SAMPLES))
                if step.algorithm == "gptq":
                    found.append((f"steps.{i}.algorithm", wanted))
                if step.int8_share:
                    found.append((f"steps.{i}.int8_share", wanted))
            elif isinstance(step, PruneStep) and step.importance == "taylor":
                found.append((f"steps.{i}.importance", CARVE_DEFAULT_ROWS))
        return found

    def carves_calibration(self) -> bool:
        """Whether calibration rows are carved from data.eval: a step reads calibration rows and the job gives
        neither data.calibration nor data.train (never calibrate on the rows accuracy is measured on)."""
        no_other = self.data.calibration is None and self.data.train is None
        return no_other and self.data.eval is not None and bool(self.calibration_readers())


# Calibration carved from data.eval: at most a CARVE_EVAL_SHARE-th of the eval rows (and no more than the steps
# use), at least CARVE_MIN_ROWS, chosen by a permutation seeded with the job's seed; the rest measure accuracy.
CARVE_EVAL_SHARE = 4
CARVE_MIN_ROWS = 8
CARVE_DEFAULT_ROWS = 256


def carve_sizes(spec: JobSpec, eval_rows: int) -> tuple[int, int] | None:
    """(calibration rows, eval rows left) carved from ``eval_rows``; None when too few rows to split."""
    wanted = max((n for _, n in spec.calibration_readers()), default=CARVE_DEFAULT_ROWS)
    calibration = min(wanted, eval_rows // CARVE_EVAL_SHARE)
    return None if calibration < CARVE_MIN_ROWS else (calibration, eval_rows - calibration)


def carve_refusal(spec: JobSpec, eval_rows: int) -> str:
    """Why ``eval_rows`` eval rows cannot be split for ``spec``'s calibration, and what to give instead."""
    field = spec.calibration_readers()[0][0]
    least = CARVE_MIN_ROWS * CARVE_EVAL_SHARE
    return (f"{field} needs calibration rows and the job gives neither data.calibration nor data.train; data.eval "
            f"has {eval_rows} rows, too few to carve {CARVE_MIN_ROWS} calibration rows from and still measure "
            f"accuracy on the rest (at least {least}); give data.calibration (or data.train), or more eval rows")
