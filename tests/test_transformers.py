"""README's Hugging Face recipe: a transformers causal LM's loss from its last hidden states and
its head's weight, without the logits, equals the model's own ``model(..., labels=...).loss``.

Tiny random models (no download): Llama (untied head) and Gemma 2 (head tied to the embedding,
final logit softcap 30). transformers computes its loss from float32 logits; the models here
are float32 too, so losses and gradients agree to float32 rounding (rtol 1e-5, and gradients
within 1e-5 of their largest entry).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models from configs: nothing to fetch, ever
transformers = pytest.importorskip("transformers")
if not transformers.utils.is_torch_available():  # transformers 5 needs torch >= 2.6
    pytest.skip("this transformers release does not run on this torch", allow_module_level=True)

import fastxent  # noqa: E402

SIZES = dict(
    vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
)  # fmt: skip
MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"final_logit_softcapping": 30.0}),
}


def tiny_model(name: str):
    config_name, model_name, extra = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**SIZES, **extra)
    return getattr(transformers, model_name)(config).float()


def fastxent_loss(model, input_ids, labels, attention_mask=None, **kwargs):
    """The recipe in README.md: hidden states from the model's body, the head's weight."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return fastxent.linear_cross_entropy(
        hidden,
        model.lm_head.weight,
        labels,
        shift=True,
        softcap=getattr(model.config, "final_logit_softcapping", None),
        **kwargs,
    )


def loss_and_grads(model, compute):
    model.zero_grad()
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0.0)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        scale = want_grads[name].abs().max().item()
        torch.testing.assert_close(grad, want_grads[name], rtol=0.0, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("name", list(MODELS))
def test_recipe_gives_the_models_own_loss_and_gradients(name):
    model = tiny_model(name)
    input_ids = torch.randint(0, SIZES["vocab_size"], (3, 17))
    labels = input_ids.clone()
    labels[0, :5] = -100  # a prompt the loss ignores
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, :3] = 0  # left padding
    labels[2, :3] = -100
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    want = loss_and_grads(model, lambda: model(**inputs, labels=labels).loss)
    got = loss_and_grads(model, lambda: fastxent_loss(model, labels=labels, **inputs))
    assert_same(got, want)


def test_recipe_with_num_items_in_batch_for_gradient_accumulation():
    """transformers divides the summed loss by ``num_items_in_batch`` (the counted tokens of
    all accumulated micro-batches): ``reduction="sum"`` divided by the same number."""
    model = tiny_model("llama")
    input_ids = torch.randint(0, SIZES["vocab_size"], (2, 11))
    labels = input_ids.clone()
    labels[1, :4] = -100
    items = 37  # this micro-batch counts 16 of them
    want = loss_and_grads(
        model, lambda: model(input_ids=input_ids, labels=labels, num_items_in_batch=items).loss
    )
    got = loss_and_grads(
        model, lambda: fastxent_loss(model, input_ids, labels, reduction="sum") / items
    )
    assert_same(got, want)
