"""hint_rft's reference when the policy continues an adapter: the initial policy, base + that
adapter, loaded a second time as a frozen peft adapter (uft_ray.reference.adapter_off), not the bare base.

A tiny random-init Qwen2 with peft, no DeepSpeed: an "SFT adapter" with random B (so base + adapter != base) is
saved, then loaded as the policy's trainable adapter and as the frozen reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from uft_ray.config import load_config
from uft_ray.losses import k3_kl
from uft_ray.reference.adapter_off import (
    REFERENCE_ADAPTER,
    adapter_disabled,
    load_reference_adapter,
    reference_model,
)
from uft_ray.rft import update

V = 128
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="eager",
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def sft_adapter(path: Path, dropout: float) -> str:
    """An adapter as stage 1 leaves it: B away from peft's zero init."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(base_model(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(str(path))
    return str(path)


def policy_from(adapter: str, *, reference: bool):
    """What build_engine makes of `model.adapter` (+ the reference adapter), without DeepSpeed."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model(), adapter, is_trainable=True)
    if reference:
        load_reference_adapter(model, adapter)
    return model


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


IDS = torch.tensor([[5, 17, 33, 2, 90, 41, 7, 64], [9, 3, 120, 55, 1, 18, 77, 30]])


def test_the_frozen_reference_is_the_initial_policy_and_stays_it(tmp_path: Path):
    adapter = sft_adapter(tmp_path / "sft", dropout=0.0)
    model = policy_from(adapter, reference=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # Only the policy's adapter trains: 2 layers x 7 modules x (A, B); the reference's is frozen.
    assert len(trainable) == 28 and all(".default." in n for n in trainable)
    assert sum(f".{REFERENCE_ADAPTER}." in n for n, _ in model.named_parameters()) == 28
    model.eval()
    policy = logits(model, IDS).detach()
    with reference_model(model) as ref:
        reference = logits(ref, IDS)
        assert not reference.requires_grad
    assert torch.equal(reference, policy)  # before any update: the same tensors from the same file
    with adapter_disabled(model) as bare:
        assert (logits(bare, IDS) - policy).abs().max() > 1e-3  # the old reference, the bare base: not it
    # The context put everything back: the policy's adapter active and the only trainable one.
    assert model.active_adapter == "default"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    # An update moves the policy, never the reference.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." in name and "lora_B" in name:
                p.add_(0.1)
    assert (logits(model, IDS) - policy).abs().max() > 1e-3
    with reference_model(model) as ref:
        assert torch.equal(logits(ref, IDS), reference)
    # A backward after a reference forward reaches the policy's adapter only.
    with reference_model(model) as ref:
        logits(ref, IDS)
    logits(model, IDS).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trainable


def test_the_reference_adapter_runs_without_its_dropout(tmp_path: Path):
    """Stage 1 trained with LoRA dropout 0.3: in train mode the policy drops, the reference never does."""
    adapter = sft_adapter(tmp_path / "sft-dropout", dropout=0.3)
    model = policy_from(adapter, reference=True)
    model.eval()
    exact = logits(model, IDS).detach()
    model.train()
    with reference_model(model) as ref:
        first, second = logits(ref, IDS), logits(ref, IDS)
    assert torch.equal(first, exact) and torch.equal(second, exact)
    assert not torch.equal(logits(model, IDS).detach(), exact)  # the policy's own dropout is still there


def test_a_model_without_a_reference_adapter_keeps_the_adapter_off_reference(tmp_path: Path):
    model = policy_from(sft_adapter(tmp_path / "sft", dropout=0.0), reference=False).eval()
    with reference_model(model) as ref, adapter_disabled(model) as bare:
        assert torch.equal(logits(ref, IDS), logits(bare, IDS))


def test_hint_rfts_reference_is_the_initial_policy():
    cfg = lambda *o: load_config("jobs/configs/demo_hint_rft_tiny.yaml", ["model.path=/m", *o], check_paths=False)  # noqa: E731
    assert update.reference_adapter(cfg()) is None  # a fresh LoRA starts as the base
    assert update.reference_adapter(cfg("model.adapter=/sft")) == "/sft"  # SFT-then-RFT's stage 2
    assert update.reference_adapter(cfg("model.adapter=/sft", "reference.adapter=/other")) == "/other"


@pytest.mark.parametrize("reference", [True, False])
def test_the_kl_before_the_first_update_is_zero_against_the_initial_policy(tmp_path: Path, reference: bool):
    """hint_rft's k3 KL, from the loop's own log-prob function at the sampling temperature (policy: grad forward
    through peft's wrapper; reference: `reference_model`, below it): exactly 0 before any update when the
    reference is base + the continued adapter; against the bare base (the reference before this fix) it is not."""
    model = policy_from(sft_adapter(tmp_path / "sft", dropout=0.0), reference=reference)
    mask = torch.zeros_like(IDS)
    mask[:, 3:] = 1  # the response: the last 5 tokens
    attention = torch.ones_like(IDS)
    logp, _ = update.scaled_token_logprobs(model, IDS, attention, mask, temperature=0.7, with_entropy=True)
    with reference_model(model) as ref:
        ref_logp, _ = update.scaled_token_logprobs(ref, IDS, attention, mask, temperature=0.7, with_entropy=False)
    kl = float(k3_kl(logp.detach(), ref_logp, mask))
    if reference:
        assert kl == 0.0
    else:
        assert kl > 1e-4


def test_the_actor_scorers_reference_adapter_gives_the_policys_numbers_in_bf16(tiny_assets, tmp_path: Path):
    """UFT's stage 2 (a sequential recipe): the policy continues the stage-1 adapter unmerged, in float32 over the
    bf16 base, and the reference actor scores base + that adapter. Merged into the bf16 weights, the reference was
    off by bf16 rounding (0.015 nats over 78 tokens here), so r != 0 before the first update; unmerged it is the
    policy's function, the same numbers."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from uft_ray.reference.scorer import load_reference_model

    g = torch.Generator().manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_assets["model"], dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))  # fmt: skip
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05
    model.save_pretrained(tmp_path / "stage1")
    ids = torch.randint(5, 500, (2, 40), generator=g)
    reference = load_reference_model(tiny_assets["model"], adapter=str(tmp_path / "stage1"), dtype="bfloat16")
    base = AutoModelForCausalLM.from_pretrained(tiny_assets["model"], dtype=torch.bfloat16)
    policy = PeftModel.from_pretrained(base, str(tmp_path / "stage1"), is_trainable=True)  # as the engine loads it

    def logp(m) -> torch.Tensor:
        with torch.no_grad():
            lp = m(input_ids=ids).logits.float().log_softmax(-1)
        return lp[:, :-1].gather(-1, ids[:, 1:, None]).sum()

    assert logp(reference).item() == logp(policy).item()
