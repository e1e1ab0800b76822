"""Builders for the training-pass tests: a residual CNN on digits (trained, exported to ONNX), a tiny BERT
hf archive with its tokenizer, a synthetic text-classification set, an image-folder zip, and a small
in-memory PassContext."""

from __future__ import annotations

import functools
import json
import random
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models.spec import JobSpec
from worker.core import ArrayDataset, JobCancelled, WorkingModel

INPUT = "input"
OUTPUT = "logits"
TEXT_CLASSES = {
    "sports": ["goal", "match", "team", "score", "coach", "league"],
    "food": ["pizza", "bread", "soup", "cheese", "recipe", "spice"],
    "tech": ["laptop", "code", "chip", "server", "robot", "phone"],
}
FILLER = [
    *[
        "the",
        "a",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "it",
        "for",
        "on",
        "with",
        "as",
        "at",
        "by",
        "this",
        "that",
        "from",
        "very",
        "some",
        "more",
    ]
]


# ---------------------------------------------------------------------------------------------------------
# digits + residual CNN


@functools.cache
def digits() -> tuple[ArrayDataset, ArrayDataset]:
    """sklearn digits as (train, eval): NCHW float32 in [0, 1] under ``input``, 1200 / 597 samples."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    classes = [str(i) for i in range(10)]
    return ArrayDataset({INPUT: x[:1200]}, y[:1200], classes), ArrayDataset(
        {INPUT: x[1200:]}, y[1200:], classes
    )


def residual_cnn(width: int = 16) -> Any:
    """A small CNN for 8x8 digits with a residual (add) skip and a channel concat."""
    import torch
    from torch import nn

    class ResidualCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            self.block = nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
            )
            self.down = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
            self.mix = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU())
            self.pool = nn.AvgPool2d(2)
            self.fc = nn.Linear(2 * width, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.stem(x)
            r = a + self.block(a)  # residual coupling
            c = torch.cat([self.down(r), self.pool(r)], dim=1)  # concat coupling
            return self.fc(self.mix(c).mean(dim=(2, 3)))

    return ResidualCNN()


def fit(module: Any, data: ArrayDataset, epochs: int, lr: float = 3e-3, seed: int = 0) -> Any:
    """A bare Adam loop (test fixture training, not the service's loop)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    x = torch.from_numpy(data.inputs[INPUT])
    y = torch.from_numpy(data.labels)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    module.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(module(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return module.eval()


def accuracy_of(module: Any, data: ArrayDataset) -> float:
    """Top-1 accuracy of a plain ``module(x)`` on digits."""
    import torch

    with torch.no_grad():
        out = module.eval()(torch.from_numpy(data.inputs[INPUT]))
    return float((out.argmax(1).numpy() == data.labels).mean())


@functools.cache
def cnn_onnx() -> tuple[Path, float]:
    """A residual CNN trained on digits (>= 90%) and exported to ONNX; (path, eval accuracy)."""
    import torch

    train, evald = digits()
    torch.manual_seed(0)
    module = fit(residual_cnn(), train, epochs=8)
    acc = accuracy_of(module, evald)
    assert acc >= 0.9, acc
    return export_digits_onnx(module, Path(tempfile.mkdtemp(prefix="mp-cnn-")) / "cnn.onnx"), acc


def small_resnet(in_channels: int, blocks: list[tuple[int, int, int]], classes: int = 10) -> Any:
    """A ResNet-style CNN: conv stem, two-conv residual blocks ``(cin, cout, stride)`` (1x1 projection
    shortcuts where the shape changes), global average pooling, a linear head; BatchNorm after every conv."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut: nn.Module = (
                nn.Identity()
                if cin == cout and stride == 1
                else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))  # residual coupling

    class SmallResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            first = blocks[0][0]
            self.stem = nn.Sequential(nn.Conv2d(in_channels, first, 3, 1, 1, bias=False), nn.BatchNorm2d(first),
                                      nn.ReLU())
            self.layers = nn.Sequential(*(Block(*b) for b in blocks))
            self.fc = nn.Linear(blocks[-1][1], classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))

    return SmallResNet()


def digits_resnet(widths: tuple[int, int] = (64, 128)) -> Any:
    """A ResNet-style CNN for 8x8 digits: three residual blocks (the second downsamples). ``(64, 128)``:
    about 0.6 M parameters and 10 M MACs per sample (the ONNX export folds BatchNorm into the convs)."""
    a, b = widths
    return small_resnet(1, [(a, a, 1), (a, b, 2), (b, b, 1)])


def fit_cosine(
    module: Any, data: ArrayDataset, epochs: int, lr: float = 3e-3, batch_size: int = 64, seed: int = 0
) -> Any:
    """A bare AdamW loop with cosine decay and +-1 pixel random shifts (fixture training for the baselines)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    x = torch.from_numpy(data.inputs[INPUT])
    y = torch.from_numpy(data.labels)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    module.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), batch_size):
            idx = perm[i : i + batch_size]
            dx, dy = (int(v) for v in torch.randint(-1, 2, (2,)))
            xb = torch.roll(x[idx], shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(module(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return module.eval()


def export_digits_onnx(module: Any, path: Path) -> Path:
    """Export a digits CNN (eval mode, BatchNorm folded) with a dynamic batch axis, ``input`` -> ``logits``."""
    import warnings

    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (torch.zeros(2, 1, 8, 8),),
            str(path),
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path


def digits_resnet_onnx(
    path: Path, widths: tuple[int, int] = (64, 128), epochs: int = 15, seed: int = 0
) -> tuple[Path, float]:
    """Train :func:`digits_resnet` on the digits train split and export it to ``path``; (path, eval accuracy)."""
    import torch

    train, evald = digits()
    torch.manual_seed(seed)
    module = fit_cosine(digits_resnet(widths), train, epochs, seed=seed)
    return export_digits_onnx(module, path), accuracy_of(module, evald)


def onnx_model(path: Path) -> WorkingModel:
    """An ONNX-form working model with the digits interface."""
    return WorkingModel(
        form="onnx", origin="onnx", input_names=[INPUT], output_names=[OUTPUT], onnx_path=path
    )


# ---------------------------------------------------------------------------------------------------------
# text + tiny BERT


def sentences(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Synthetic rows {text, label}: filler words plus two keywords of the row's class."""
    rng = random.Random(seed)
    names = sorted(TEXT_CLASSES)
    rows = []
    for i in range(n):
        label = names[i % len(names)]
        words = rng.choices(FILLER, k=rng.randint(4, 8)) + rng.sample(TEXT_CLASSES[label], 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as JSON lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as CSV with a header."""
    import csv

    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["text", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def tokenizer(folder: Path, corpus: list[str] | None = None) -> None:
    """Save a WordLevel tokenizer (vocabulary of ``corpus``, by default the synthetic one) as a
    PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if corpus is None:
        corpus = [" ".join(FILLER)] + [" ".join(v) for v in TEXT_CLASSES.values()]
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    fast.save_pretrained(folder)


def tiny_bert_dir(
    folder: Path, *, task: str = "text-classification", layers: int = 4, seed: int = 0, init: float = 0.02
) -> Path:
    """A randomly initialised tiny BERT (+ tokenizer) saved as safetensors under ``folder``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    names = sorted(TEXT_CLASSES)
    config = BertConfig(  # type: ignore[call-arg]
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=64,
        max_position_embeddings=64,
        initializer_range=init,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    model = BertForSequenceClassification(config) if task == "text-classification" else BertModel(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer(folder)
    return folder


def zip_dir(folder: Path, out: Path, prefix: str = "") -> Path:
    """Zip every file under ``folder`` (names relative to it, under ``prefix``)."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(folder).as_posix())
    return out


def tiny_bert_archive(tmp: Path, **kwargs: Any) -> Path:
    """A zipped tiny BERT hf directory."""
    folder = tiny_bert_dir(tmp / "bert-src", **kwargs)
    return zip_dir(folder, tmp / "bert.zip", prefix="bert/")


def digits_imagefolder(out: Path, per_class: int = 5) -> Path:
    """A zip of class folders (0..9) holding 8x8 grayscale PNGs of digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    with zipfile.ZipFile(out, "w") as zf:
        for label in range(10):
            idx = np.flatnonzero(d.target == label)[:per_class]
            for j, i in enumerate(idx):
                img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8), mode="L")
                with tempfile.SpooledTemporaryFile() as fh:
                    img.save(fh, format="PNG")
                    fh.seek(0)
                    zf.writestr(f"digits/{label}/{j}.png", fh.read())
    return out


# ---------------------------------------------------------------------------------------------------------
# An in-memory PassContext


@dataclass
class MemoryContext:
    """PassContext over in-memory datasets and model factories; records progress and logs."""

    workdir: Path
    spec: JobSpec
    data: dict[str, ArrayDataset | Any] = field(default_factory=dict)
    models: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    cancel_after: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    cancel_checks: int = 0

    def dataset(self, role: str, model: WorkingModel) -> ArrayDataset | None:
        item = self.data.get(role)
        if item is None and role == "calibration":
            item = self.data.get("train") or self.data.get("eval")
        return item(model) if callable(item) else item

    def load_model(self, ref: str) -> WorkingModel:
        return self.models[ref]()

    def progress(self, phase: str, **kw: Any) -> None:
        self.events.append({"kind": "progress", "phase": phase, **kw})

    def log(self, message: str, **data: Any) -> None:
        self.events.append({"kind": "log", "message": message, **data})

    def check_cancelled(self) -> None:
        self.cancel_checks += 1
        if self.cancel_after is not None and self.cancel_checks > self.cancel_after:
            raise JobCancelled()


def spec(task: str = "image-classification", **kw: Any) -> JobSpec:
    """A JobSpec with train/eval data ids set (the context ignores them)."""
    return JobSpec.model_validate({"model": "m", "task": task, "data": {"train": "t", "eval": "e"}, **kw})
