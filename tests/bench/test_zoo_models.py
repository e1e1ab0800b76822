"""bench.zoo_models: the residual-stream rotation that moves a GGUF's weights off its 4-bit grid keeps the
model's function (tiny random Llama with a tied head and non-unit norm gains)."""

from __future__ import annotations

import numpy as np
import torch

from bench.zoo_models import _fold_and_rotate, _gemma3_perturb, _permute


def test_fold_and_rotate_keeps_the_logits_and_unties_the_head() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.rand_like(p))  # gains that must be folded
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    q_before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    _fold_and_rotate(model, seed=1)
    with torch.no_grad():
        after = model(ids).logits
    assert float((before - after).abs().max()) < 1e-4
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert all(float((p - 1).abs().max()) == 0 for n, p in model.named_parameters() if "norm" in n)
    # every weight moved: a rotated matrix shares no column with the original
    assert float((model.model.layers[0].self_attn.q_proj.weight - q_before).abs().min()) > 0


def test_gemma3_perturbation_keeps_the_logits_and_moves_every_quantized_matrix() -> None:
    """Gemma 3 (sandwich norms, 1 + w gains, q/k norms, GQA, tied head): per-channel scales and per-kv-head
    rotations keep the function; every q/k/v/o/gate/up/down weight changes, the tied table does not."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                              sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(2 * torch.rand_like(p))
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    _gemma3_perturb(model, seed=1)
    with torch.no_grad():
        after = model(ids).logits
    assert float((before - after).abs().max()) < 1e-4 * float(before.abs().max())
    new = dict(model.named_parameters())
    for n in old:  # the post-norms, q/k norms and the tied table stay as they were
        moved = n.endswith(("_proj.weight", "input_layernorm.weight", "pre_feedforward_layernorm.weight"))
        assert torch.equal(old[n], new[n]) != moved, n
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_permute_is_llama_cpp_row_order() -> None:
    """Rows of each head go from HF's [first halves..., second halves...] back to interleaved pairs."""
    w = np.arange(8)[:, None].repeat(2, 1)  # one head of 8 rows
    assert _permute(w, 1)[:, 0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
