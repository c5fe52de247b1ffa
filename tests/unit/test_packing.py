"""Padding-free packing: the layout worked out by hand, and packed = padded for every loss path.

The exactness half runs the loops' own functions (collate, micro_batch_loss, kto_reference_point,
evaluate_collective, the hint_rft forwards, the reference scorer) on a random 2-layer Qwen2 with LoRA, once
padded and once packed, and holds per-row log-probs, losses and LoRA gradients to 1e-5 relative (fp32), with
sdpa and eager attention, one packed sequence or several bins; then three AdamW steps under accumulation.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fixtures.tiny_lora import (
    PAD,
    REL,
    Engine,
    V,
    assert_rel,
    assert_same_grads,
    lora_grads,
    loss_cfg,
    rows,
    tiny_lora,
)

from uft_ray import losses
from uft_ray.packing import (
    CPU_BREAK_EVEN,
    SEGMENT_ATTENTION,
    choose,
    common_prefix,
    enabled,
    key_groups,
    pack,
    pair_groups,
    register_segment_attention,
)
from uft_ray.packing import args as packing_args
from uft_ray.train import collectives
from uft_ray.train import loop as train_loop

CPU = torch.device("cpu")
register_segment_attention()


def padded(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD)
    attention = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
    return ids, attention


# --- the layout, by hand ----------------------------------------------------------------------------------------


def test_rows_side_by_side_with_positions_restarting_and_no_mask():
    ids, attention = padded([[5, 6, 7], [8, 9]])
    p = pack(ids, attention)
    assert p.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert p.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert p.slot.tolist() == [[0, 1, 2], [3, 4, -1]]
    assert not p.shared and p.attention_mask(torch.float32) is None  # implied by the positions restarting
    assert p.units == [[(0, 0, [(0, 3)]), (3, 0, [(3, 2)])]]
    assert (p.tokens, p.size) == (5, 5)


def test_a_pair_shares_its_prompt_and_the_rejected_does_not_see_the_chosen():
    # chosen = 1 2 | 3 4, rejected = 1 2 | 5: the prompt once, then 3 4, then 5 continuing at position 2
    ids, attention = padded([[1, 2, 3, 4], [1, 2, 5]])
    p = pack(ids, attention, groups=pair_groups(1))
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert p.slot.tolist() == [[0, 1, 2, 3], [0, 1, 4, -1]]
    assert p.units == [[(0, 2, [(2, 2), (4, 1)])]]
    assert p.allowed()[0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # token 5: the prompt and itself, not 3 4
    ]
    assert (p.tokens, p.size) == (5, 5)
    mask = p.attention_mask(torch.float32)
    assert mask.shape == (1, 1, 5, 5) and mask[0, 0, 4, 2] == torch.finfo(torch.float32).min and mask[0, 0, 4, 1] == 0


def test_bins_hold_at_most_max_tokens_first_fit_decreasing():
    ids, attention = padded([[1] * 4, [2] * 3, [3] * 2, [4] * 1])
    p = pack(ids, attention, max_tokens=5)
    # sizes 4, 3, 2, 1: 4 -> bin 0, 3 -> bin 1, 2 -> bin 1, 1 -> bin 0
    assert p.input_ids.tolist() == [[1, 1, 1, 1, 4], [2, 2, 2, 3, 3]]
    assert p.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert p.slot[3].tolist()[0] == 4 and p.slot[2].tolist()[:2] == [8, 9]


def test_group_prefix_is_the_longest_common_one_and_rows_alone_stay_alone():
    assert common_prefix([torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4]), torch.tensor([1, 2])]) == 2
    assert common_prefix([torch.tensor([7, 2]), torch.tensor([1, 2])]) == 0
    assert key_groups(["a", "b", "a", "c", "b"]) == [[0, 2], [1, 4], [3]]
    ids, attention = padded([[1, 2, 3], [9, 9], [1, 2, 4, 4]])
    p = pack(ids, attention, groups=[[0, 2]])
    assert p.input_ids.tolist() == [[1, 2, 3, 4, 4, 9, 9]] and p.tokens == 7
    assert p.position_ids.tolist() == [[0, 1, 2, 2, 3, 0, 1]]
    with pytest.raises(ValueError, match="disjoint"):
        pack(ids, attention, groups=[[0, 2], [2]])


def test_packing_config_fields_and_flash_attention_limits():
    from uft_ray.config import Config
    from uft_ray.config.validation import validate

    cfg = Config()
    assert cfg.train.packing == "auto" and cfg.train.share_prompts and cfg.train.micro_batch_tokens is None
    assert packing_args(cfg) == {"max_tokens": None, "share_prefix": True}  # auto on GPU (the default): packed
    cfg.train.use_gpu = False
    assert packing_args(cfg) is None  # auto, undecided, on CPU: padded
    cfg.train.packing = True
    assert packing_args(cfg) == {"max_tokens": None, "share_prefix": True}
    cfg.train.packing = False
    assert packing_args(cfg) is None
    cfg.train.packing = "sometimes"
    assert "train.packing: 'sometimes' is not allowed; use true, false or auto" in validate(cfg, check_paths=False)
    cfg.train.packing, cfg.train.micro_batch_tokens = True, 0
    cfg.model.attn_implementation = "flash_attention_2"
    problems = "\n".join(validate(cfg, check_paths=False))
    assert "train.micro_batch_tokens: must be > 0" in problems
    assert "train.share_prompts: needs model.attn_implementation sdpa or eager" in problems


@pytest.mark.parametrize(
    ("packing", "use_gpu", "share", "packs"),
    [
        (True, False, 0.0, True),  # forced either way, whatever the padding
        (False, True, 0.9, False),
        ("auto", True, None, True),  # GPU: packed
        ("auto", False, None, False),  # CPU, padding not known before the run (rollouts): padded
        ("auto", False, 0.04, False),  # the demo's length-grouped plan: packing measured 1.16x slower there
        ("auto", False, CPU_BREAK_EVEN, True),
        ("auto", False, 0.36, True),  # ungrouped chat rows: packing measured 0.76x of padded there
    ],
)
def test_auto_packing_packs_on_gpu_and_on_cpu_only_past_the_break_even(packing, use_gpu, share, packs):
    train = SimpleNamespace(packing=packing, use_gpu=use_gpu)
    decided, why = choose(train, share)
    assert decided is packs and enabled(SimpleNamespace(packing=decided, use_gpu=use_gpu)) is packs
    assert why.startswith("train.packing auto: " if packing == "auto" else f"train.packing: {str(packing).lower()}")
    if packing == "auto" and share is not None and not use_gpu:
        assert f"{share:.0%} padding" in why


def test_settle_packing_writes_the_decision_into_the_runs_config(capsys):
    from uft_ray.config import Config
    from uft_ray.runner import Run, settle_packing

    run = Run(Config(), None, None)
    run.cfg.train.use_gpu = False
    cfg = settle_packing(run, 0.04)
    assert cfg.train.packing is False and run.cfg is cfg and packing_args(cfg) is None
    assert "[uft-ray] padded micro-batches (train.packing auto: padded on CPU" in capsys.readouterr().out
    run.cfg.train.packing = "auto"
    assert settle_packing(run, 0.5).train.packing is True and packing_args(run.cfg) is not None


# --- packed = padded -------------------------------------------------------------------------------------------

LAYOUTS = {
    "one sequence": {"max_tokens": None, "share_prefix": True},
    "bins of 24": {"max_tokens": 24, "share_prefix": True},
    "no sharing": {"max_tokens": None, "share_prefix": False},
}


@pytest.mark.parametrize("attn", ["sdpa", "eager", SEGMENT_ATTENTION])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("loss_type", ["uft", "una_bce", "dpo", "kto", "sft"])
def test_micro_batch_loss_packed_equals_padded(loss_type, layout, attn):
    register_segment_attention()
    model = tiny_lora(attn=attn)
    pairs = loss_type == "dpo"
    batch = rows(pairs=pairs, n=4)
    cfg = loss_cfg(loss_type)
    padded_t = train_loop.collate(batch, PAD, CPU, pairs=pairs)
    packed_t = train_loop.collate(batch, PAD, CPU, pairs=pairs, packing=LAYOUTS[layout])
    assert packed_t["tokens"] == padded_t["tokens"] and packed_t["padded"] < padded_t["padded"]
    if pairs and LAYOUTS[layout]["share_prefix"]:  # each pair's prompt (4, 7, 3, 5 tokens) computed once
        assert packed_t["computed"] == padded_t["tokens"] - (4 + 7 + 3 + 5)

    want, want_m = train_loop.micro_batch_loss(Engine(model), cfg, batch, padded_t, kto_z=0.05)
    want.backward()
    want_grads = lora_grads(model)
    got, got_m = train_loop.micro_batch_loss(Engine(model), cfg, batch, packed_t, kto_z=0.05)
    got.backward()
    assert_rel(got, want)
    for key in want_m:
        if key.startswith("rows/"):
            assert_rel(got_m[key], want_m[key])
    assert_same_grads(lora_grads(model), want_grads)


def test_three_steps_with_accumulation_packed_equal_padded():
    """Two micro-batches per step, AdamW, three steps: the trained LoRA weights and each step's loss agree."""
    cfg = loss_cfg("dpo")
    micro = [rows(pairs=True, n=3, seed=s) for s in (1, 2)]
    results = []
    for packing in (None, LAYOUTS["one sequence"]):
        model = tiny_lora(attn=SEGMENT_ATTENTION)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        step_losses = []
        for _ in range(3):
            total = 0.0
            for batch in micro:
                t = train_loop.collate(batch, PAD, CPU, pairs=True, packing=packing)
                loss, _ = train_loop.micro_batch_loss(Engine(model), cfg, batch, t)
                (loss / len(micro)).backward()
                total += float(loss) / len(micro)
            opt.step()
            opt.zero_grad()
            step_losses.append(total)
        results.append((step_losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}))
    (pad_losses, pad_weights), (pack_losses, pack_weights) = results
    assert pad_losses[0] != pad_losses[2]  # it trained
    # Three AdamW steps amplify fp32 rounding: Adam divides each gradient by its own running scale, so a relative
    # difference of 1e-7 in a small gradient entry moves its weight as much as a large one (measured 1.2e-5 on the
    # losses on 2 cores, against 1e-5 for one forward and backward).
    assert_rel(torch.tensor(pack_losses), torch.tensor(pad_losses), tol=5 * REL)
    for name in pad_weights:
        assert_rel(pack_weights[name], pad_weights[name], tol=5 * REL)


def test_kto_reference_point_packed_equals_padded(monkeypatch):
    monkeypatch.setattr(collectives.dist, "all_reduce", lambda tensor, op=None: None)  # one rank
    monkeypatch.setattr(collectives.ray.train.torch, "get_device", lambda: CPU)
    model = tiny_lora(attn=SEGMENT_ATTENTION)
    cfg = loss_cfg("kto")
    out = []
    for packing in (None, LAYOUTS["one sequence"]):
        step = [(b, train_loop.collate(b, PAD, CPU, pairs=False, packing=packing)) for b in (rows(), rows(seed=2))]
        out.append(train_loop.kto_reference_point(Engine(model), cfg, step))
    (z_pad, refs_pad), (z_pack, refs_pack) = out
    assert z_pack == pytest.approx(z_pad, rel=1e-5)
    for got, want in zip(refs_pack, refs_pad, strict=True):
        assert_rel(got, want)


def test_hint_rft_packed_shares_each_prompt_and_equals_padded():
    from uft_ray.rft import update

    model = tiny_lora(attn=SEGMENT_ATTENTION)
    g = np.random.default_rng(3)
    prompts = [g.integers(1, V, 6).tolist(), g.integers(1, V, 4).tolist()]
    hints = [g.integers(1, V, 2).tolist(), []]
    rollouts = [
        {"prompt_ids": prompts[k], "hint_ids": hints[k], "response_ids": g.integers(1, V, n).tolist(), "group": k}
        for k, n in ((0, 3), (0, 5), (1, 4), (1, 2))
    ]
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    kw = dict(clip=0.2, kl_coef=0.1, entropy_coef=0.01, hint_coef=0.5)
    out = []
    for packing in (None, LAYOUTS["one sequence"]):
        t = update.pad_rollouts(rollouts, PAD, CPU, packing)
        engine = Engine(model)
        ref = update.reference_logprobs(engine, t, 0.8)
        logp, ent = update.policy_logprobs(engine, t, 0.8, grad=True)
        loss, _ = losses.hint_rft_loss(
            logp, logp.detach() * 0.999, ref, adv, t["response"], ent, hint_logp=logp, hint_mask=t["hint"], **kw
        )
        loss.backward()
        out.append((t, logp.detach(), ref, loss.detach(), lora_grads(model)))
    (_, logp0, ref0, loss0, grads0), (t1, logp1, ref1, loss1, grads1) = out
    # prompt + hint of group 0 (8 tokens) and the prompt of group 1 (4) computed once, not twice
    assert t1["packed"].tokens == int(t1["attention_mask"].sum()) - 8 - 4
    assert_rel(logp1, logp0)
    assert_rel(ref1, ref0)
    assert_rel(loss1, loss0)
    assert_same_grads(grads1, grads0)


def test_reference_scorer_packed_equals_padded(tmp_path):
    from uft_ray.reference.scorer import ReferenceScorer

    tiny_lora(attn=SEGMENT_ATTENTION).unload().save_pretrained(tmp_path / "m", safe_serialization=True)
    batch = rows(pairs=True, n=4)
    results = []
    for packing in (False, True):
        scorer = ReferenceScorer(str(tmp_path / "m"), dtype="float32", max_tokens_per_forward=40, packing=packing)
        out = scorer(dict(batch))
        results.append(np.stack([out["ref_logp"], out["ref_logp_rejected"]]))
    assert_rel(torch.from_numpy(results[1]), torch.from_numpy(results[0]))


def test_heldout_evaluation_packed_equals_padded(monkeypatch):
    from uft_ray.evaluation import heldout

    monkeypatch.setattr(collectives.dist, "all_reduce", lambda tensor, op=None: None)
    monkeypatch.setattr(collectives.dist, "all_gather_object", lambda out, obj: out.__setitem__(0, obj))
    monkeypatch.setattr(collectives.ray.train.torch, "get_device", lambda: CPU)
    seen: list[list[dict]] = []
    monkeypatch.setattr(heldout, "metrics", lambda records, cfg: seen.append(records) or {})
    model = tiny_lora(attn=SEGMENT_ATTENTION)

    class Shard:
        def iter_batches(self, batch_size, batch_format):
            return iter([rows(), rows(pairs=True, seed=4)])

    for packing in (False, True):
        cfg = loss_cfg("uft", mode="actor")
        cfg.needs_reference = False  # the reference: the adapter-off policy
        cfg.reference_from_cache = False
        cfg.train = SimpleNamespace(micro_batch_size=3, packing=packing, micro_batch_tokens=None, share_prompts=True)
        train_loop.evaluate_collective(Engine(model), cfg, Shard(), PAD, world=1)
    padded_rows, packed_rows = seen
    assert len(padded_rows) == len(packed_rows) == 6
    for got, want in zip(packed_rows, padded_rows, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-5), key
            else:
                assert got[key] == value


def test_packed_bf16_is_within_bf16_rounding_of_padded():
    model = tiny_lora(attn=SEGMENT_ATTENTION)
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    batch = rows(pairs=True, n=4)
    cfg = loss_cfg("dpo")
    results = []
    for m in (model, model16):
        for packing in (None, LAYOUTS["one sequence"]):
            t = train_loop.collate(batch, PAD, CPU, pairs=True, packing=packing)
            with torch.no_grad():
                _, metrics = train_loop.micro_batch_loss(Engine(m), cfg, batch, t)
            results.append(metrics["rows/logp"])
    fp32_pad, fp32_pack, bf16_pad, bf16_pack = results
    # packing moves bf16 by no more than bf16 itself moves from fp32
    assert float((bf16_pack - bf16_pad).abs().max()) <= float((bf16_pad - fp32_pad).abs().max()) + 1e-9
    assert_rel(fp32_pack, fp32_pad)


def test_segment_attention_builds_no_sequence_wide_mask(monkeypatch):
    """Under segment attention a packed forward attends per row: no [L, L] mask is made, by us or by transformers."""
    import transformers.masking_utils as masking

    from uft_ray.packing import Packed

    model = tiny_lora(attn=SEGMENT_ATTENTION)
    batch = rows(pairs=True, n=4)
    t = train_loop.collate(batch, PAD, CPU, pairs=True, packing=LAYOUTS["one sequence"])
    assert t["packed"].shared
    monkeypatch.setattr(Packed, "allowed", lambda self: pytest.fail("a 4D mask was built"))
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda *a: pytest.fail("transformers built a mask"))
    with torch.no_grad():
        _, metrics = train_loop.micro_batch_loss(Engine(model), loss_cfg("dpo"), batch, t)
    assert torch.isfinite(metrics["rows/logp"]).all()
