"""In-process references: the policy with its LoRA adapter disabled (`reference.mode: adapter_off`, and hint_rft
from a fresh adapter), or the policy's base with a second, frozen adapter (hint_rft from `model.adapter`).

The frozen adapter (`load_reference_adapter`, `reference_model`): SFT-then-RFT's stage 2 continues the SFT adapter,
and its reference is the model it starts from, base + that adapter (the authors' reference is the initial actor),
not the bare base: the KL would otherwise pull stage 2 back to the model before SFT. The adapter is loaded a
second time, under the name `REFERENCE_ADAPTER`, frozen and with its dropout off; the reference forward activates
it in place of the trained one. Before the first update both are the same tensors from the same file, so the
policy's log-probs equal the reference's (kl 0), and the trained adapter saved afterwards is still a whole
adapter over the untouched base (what users load, what the rollout actors receive): nothing is merged.

No extra GPU and no cache, one more forward per step; the same `model_sequence_logprobs` as the actor scorer,
so both reference modes give the same numbers on the same model (tests/integration/test_reference.py).

Order and ZeRO-3: DeepSpeed's ZeRO-3 restarts its recorded module order (the trace it prefetches parameters
by) at every forward of the module it wraps, the peft model. A reference forward through that module between
two policy micro-batches makes the steps alternate between two orders ("Invalidate trace cache") and nothing
is prefetched. So the reference runs on the model inside it (`get_base_model()`: the same LoRA layers,
disabled), which continues the current trace, and the loops run it before the policy's forward: every
micro-batch then records the same order (policy forward, backward, next reference forward), and the reference's
activations are gone before the policy's forward keeps its own for the backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

REFERENCE_ADAPTER = "reference"  # the frozen adapter's name inside the policy's peft model (the policy's: "default")


@contextmanager
def adapter_disabled(model: Any) -> Iterator[torch.nn.Module]:
    """The model below peft's wrapper with the adapter disabled, under no grad: call it like the policy.

    `model` is a peft model (not a DeepSpeed engine: pass `engine.peft_model`). The caller owns train/eval mode:
    the models we train have no dropout outside LoRA, which `disable_adapter` bypasses."""
    import torch

    with torch.no_grad(), model.disable_adapter():
        yield model.get_base_model()


def adapter_off_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs as the policy with its LoRA adapter disabled: `(sum_logp, n_tokens)`, no grad.

    `model` is a peft model (`engine.peft_model`). The same `model_sequence_logprobs` as the actor scorer, so both
    reference modes give the same numbers on the same model."""
    from uft_ray.logprobs import model_sequence_logprobs  # imports torch: when a forward runs

    with adapter_disabled(model) as base:
        return model_sequence_logprobs(base, input_ids, attention_mask, loss_mask, use_cache=False, **kwargs)


def load_reference_adapter(model: Any, path: str) -> None:
    """Load the LoRA adapter in the local directory `path` into the peft model `model` as `REFERENCE_ADAPTER`:
    frozen (`inference_mode`), its dropout off (the reference is deterministic in train mode too), float32 like
    the policy's (peft's autocast), inactive: the policy's adapter stays the active, trained one.

    Call before DeepSpeed wraps the model: ZeRO-3 then partitions it like the base."""
    from peft import LoraConfig, PeftConfig, load_peft_weights, set_peft_model_state_dict

    config = PeftConfig.from_pretrained(path)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{path}: the reference adapter must be a LoRA adapter, got {type(config).__name__}")
    config.lora_dropout = 0.0
    config.inference_mode = True
    model.add_adapter(REFERENCE_ADAPTER, config)
    result = set_peft_model_state_dict(model, load_peft_weights(path, device="cpu"), adapter_name=REFERENCE_ADAPTER)
    missing = [k for k in result.missing_keys if f".{REFERENCE_ADAPTER}." in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: the reference adapter does not fit the model (missing {missing[:3]}, unexpected "
            f"{list(result.unexpected_keys)[:3]})"
        )


@contextmanager
def reference_model(model: Any) -> Iterator[torch.nn.Module]:
    """The reference inside the policy's peft model `model`, under no grad: the base with `REFERENCE_ADAPTER`
    active when `load_reference_adapter` gave it one, else the base with the adapter off (`adapter_disabled`).
    Call it like the policy.

    The adapter switch is peft's `set_adapter`, which also marks the adapter it activates trainable: every
    parameter's `requires_grad` is put back as it was on the way out, so DeepSpeed trains the same tensors."""
    if REFERENCE_ADAPTER not in model.peft_config:
        with adapter_disabled(model) as base:
            yield base
        return
    import torch

    active = model.active_adapter
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        with torch.no_grad():
            yield model.get_base_model()
    finally:
        model.set_adapter(active)
        for p, flag in trainable:
            p.requires_grad_(flag)
