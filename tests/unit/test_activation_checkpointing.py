"""Activation checkpointing is switched on, non-reentrant, through whichever API the installed transformers has:
`activation_checkpointing_enable` (transformers >= 5.24) or `gradient_checkpointing_enable` (5.17 / 5.18)."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers

from uft_ray.train.engine import enable_activation_checkpointing


def _tiny_qwen2(cls: type = transformers.Qwen2ForCausalLM) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return cls(cfg)


class _NoActivationApi(transformers.Qwen2ForCausalLM):
    """Qwen2 as a transformers before 5.24 shows it: no `activation_checkpointing_enable`.

    On a transformers that has both, the base class's `gradient_checkpointing_enable` delegates to the new name;
    overriding it (unchanged) makes transformers take its own compatibility path for subclasses instead, which does
    the real work without going through the hidden attribute."""

    @property
    def activation_checkpointing_enable(self):  # type: ignore[override]
        raise AttributeError("activation_checkpointing_enable")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):  # type: ignore[override]
        return super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)


def _checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]


def _assert_on_and_non_reentrant(model: torch.nn.Module) -> None:
    layers = _checkpointed_layers(model)
    assert len(layers) >= 2, "every decoder layer checkpoints"
    for m in layers:
        fn = m._gradient_checkpointing_func
        assert isinstance(fn, functools.partial) and fn.func is torch.utils.checkpoint.checkpoint
        assert fn.keywords.get("use_reentrant") is False
    # and it runs: a frozen base with checkpointed layers still passes a gradient to a trainable tensor after it
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.lm_head.weight
    head.requires_grad_(True)
    model.train()
    out = model(input_ids=torch.tensor([[1, 2, 3, 4]]), use_cache=False)
    out.logits.sum().backward()
    assert head.grad is not None and bool(head.grad.abs().sum() > 0)


def test_checkpointing_on_a_tiny_qwen2_is_non_reentrant():
    model = _tiny_qwen2()
    assert not _checkpointed_layers(model)
    enable_activation_checkpointing(model)
    _assert_on_and_non_reentrant(model)


def test_fallback_to_gradient_checkpointing_enable_when_the_new_api_is_absent():
    model = _tiny_qwen2(_NoActivationApi)
    assert not hasattr(model, "activation_checkpointing_enable")
    enable_activation_checkpointing(model)
    _assert_on_and_non_reentrant(model)


def test_a_model_without_either_api_is_refused_by_name():
    with pytest.raises(TypeError, match="Linear"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))
