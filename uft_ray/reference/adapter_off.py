"""`reference.mode: adapter_off`: the reference is the policy with its LoRA adapter disabled, inside the step.

No extra GPU and no cache, one more forward per step; the same `model_sequence_logprobs` as the actor scorer,
so both reference modes give the same numbers on the same model (tests/integration/test_reference.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


def adapter_off_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs as the policy with its LoRA adapter disabled: `(sum_logp, n_tokens)`, no grad.

    `model` is a peft model (not a DeepSpeed engine: pass `engine.module`). The same `model_sequence_logprobs`
    as the actor scorer, so both reference modes give the same numbers on the same model. The caller owns
    train/eval mode: the models we train have no dropout outside LoRA, which `disable_adapter` bypasses.
    """
    import torch

    from uft_ray.logprobs import model_sequence_logprobs

    with torch.no_grad(), model.disable_adapter():
        return model_sequence_logprobs(model, input_ids, attention_mask, loss_mask, use_cache=False, **kwargs)
