"""Test builders for causal LMs: English text that ships on this machine, a byte-level BPE tokenizer
trained on it (with a chat template), random-init tiny Llama and GPT-2 models saved as safetensors,
zipped hf archives, and JSONL rows in the three LM shapes (text, prompt/completion, messages).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.factories_train import zip_dir

LICENCES = Path("/usr/share/common-licenses")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def licence_paragraphs(names: tuple[str, ...] = ("GPL-3", "Apache-2.0"), min_chars: int = 80) -> list[str]:
    """Paragraphs (whitespace-normalised) of licences under /usr/share/common-licenses, in file order."""
    out: list[str] = []
    for name in names:
        text = (LICENCES / name).read_text(encoding="utf-8", errors="replace")
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if len(para) >= min_chars:
                out.append(para)
    return out


def lm_tokenizer(folder: Path, corpus: list[str] | None = None, vocab_size: int = 384,
                 chat_template: bool = True) -> Any:
    """Train a byte-level BPE tokenizer on ``corpus`` (licence text by default) and save it under ``folder``
    as a PreTrainedTokenizerFast (tokenizer.json, tokenizer_config.json with the chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus or licence_paragraphs(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIALS[4:],
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return fast


def tiny_lm_dir(folder: Path, *, kind: str = "llama", layers: int = 4, hidden: int = 64, heads: int = 4,
                kv_heads: int = 2, context: int = 256, seed: int = 0, tokenizer: bool = True,
                max_shard_size: str | None = None) -> Path:
    """A random-init tiny ``LlamaForCausalLM`` (``kind="llama"``, grouped-query attention),
    ``GPT2LMHeadModel`` (``kind="gpt2"``) or ``Gemma3ForCausalLM`` (``kind="gemma3"``: sandwich norms,
    q/k norms, a tied head, sliding-window layers with a window shorter than the check text, every other
    layer global) with a trained tokenizer, saved as safetensors under ``folder`` (sharded with an index when
    ``max_shard_size`` is given, e.g. ``"100KB"``)."""
    import torch
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    folder.mkdir(parents=True, exist_ok=True)
    tok = lm_tokenizer(folder) if tokenizer else None
    vocab = len(tok) if tok is not None else 384
    ids = {} if tok is None else {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                  "pad_token_id": tok.pad_token_id}
    torch.manual_seed(seed)
    model: Any
    config: Any
    if kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                             num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             max_position_embeddings=context, tie_word_embeddings=False, **ids)
        model = LlamaForCausalLM(config)
    elif kind == "gemma3":
        config = Gemma3TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  head_dim=hidden // heads, query_pre_attn_scalar=hidden // heads,
                                  max_position_embeddings=context, sliding_window=16,
                                  layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                               for i in range(layers)],
                                  tie_word_embeddings=True, **ids)
        config.architectures = ["Gemma3ForCausalLM"]
        model = Gemma3ForCausalLM(config)
        with torch.no_grad():  # random norm gains (init is 0, i.e. 1 + 0): the export must apply 1 + w
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.normal_(0.0, 0.3)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context,
                            **ids)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    kwargs: dict[str, Any] = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def tiny_lm_archive(tmp: Path, name: str = "lm", **kwargs: Any) -> Path:
    """A zipped tiny causal LM hf directory (see ``tiny_lm_dir``)."""
    folder = tiny_lm_dir(tmp / f"{name}-src", **kwargs)
    return zip_dir(folder, tmp / f"{name}.zip", prefix=f"{name}/")


def text_rows(n: int | None = None, names: tuple[str, ...] = ("GPL-3",)) -> list[dict[str, Any]]:
    """``{"text"}`` rows: licence paragraphs."""
    paras = licence_paragraphs(names)
    return [{"text": p} for p in paras[:n]]


def prompt_rows(n: int = 16) -> list[dict[str, Any]]:
    """``{"prompt", "completion"}`` rows: the first words of a paragraph, then the next words."""
    rows = []
    for p in licence_paragraphs()[:n]:
        words = p.split()
        rows.append({"prompt": " ".join(words[:8]) + " ", "completion": " ".join(words[8:20])})
    return rows


def chat_rows(n: int = 16) -> list[dict[str, Any]]:
    """``{"messages"}`` rows: a system, a user and an assistant turn."""
    rows = []
    for p in licence_paragraphs()[:n]:
        words = p.split()
        rows.append({"messages": [
            {"role": "system", "content": "Quote the licence."},
            {"role": "user", "content": " ".join(words[:6])},
            {"role": "assistant", "content": " ".join(words[6:18])},
        ]})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Rows as JSON lines."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
