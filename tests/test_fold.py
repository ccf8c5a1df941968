"""Folding the per-head V rotation into v_proj/o_proj leaves the real model's function unchanged."""
from __future__ import annotations

import torch

from sglang_oscar.fold import fold_v_rotation

TEXT = ("The Eiffel Tower was finished in 1889 for the World's Fair in Paris. At first many artists "
        "disliked it, but it soon became the best known symbol of France.")


def _fold_all(model):
    head_dim = model.config.head_dim
    for layer in model.model.layers:
        a = layer.self_attn
        fold_v_rotation(a.v_proj.weight.data, a.o_proj.weight.data, head_dim,
                        None if a.v_proj.bias is None else a.v_proj.bias.data)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_fold_is_exact_in_float32(load_default_model):
    model, tok = load_default_model(torch.float32)
    ids = tok(TEXT, return_tensors="pt").input_ids
    before = _logits(model, ids)
    v0 = model.model.layers[0].self_attn.v_proj.weight.clone()
    _fold_all(model)
    assert not torch.allclose(model.model.layers[0].self_attn.v_proj.weight, v0)  # it did rotate
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=2e-3)


def test_fold_keeps_bf16_logits(load_default_model):
    """Folded in bf16, the model stays as close to the float32 model as the unfolded bf16 model is."""
    ref, tok = load_default_model(torch.float32)
    ids = tok(TEXT, return_tensors="pt").input_ids
    want = _logits(ref, ids)
    model, _ = load_default_model(torch.bfloat16)
    plain = _logits(model, ids)
    _fold_all(model)
    folded = _logits(model, ids)
    e_plain, e_fold = (plain - want).abs().mean(), (folded - want).abs().mean()
    print(f"mean |logit error| vs float32: bf16 {e_plain:.4f}, bf16 folded {e_fold:.4f}")
    assert e_fold < 1.5 * e_plain
    assert (folded.argmax(-1) == want.argmax(-1)).float().mean() >= \
        (plain.argmax(-1) == want.argmax(-1)).float().mean() - 0.05
