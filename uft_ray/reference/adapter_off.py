"""`reference.mode: adapter_off`: the reference is the policy with its LoRA adapter disabled, inside the step.

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
    from uft_ray.logprobs import model_sequence_logprobs

    with adapter_disabled(model) as base:
        return model_sequence_logprobs(base, input_ids, attention_mask, loss_mask, use_cache=False, **kwargs)
