"""loss.sft_reduction: token: the SFT loss is the optimizer step's token mean over every rank and micro-batch (the
papers' summed token NLL up to one factor per step), on a real tiny model through the loop's own functions."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fixtures.tiny_lora import PAD, Engine, loss_cfg, quiet_collectives, rows, tiny_lora

from uft_ray.config import ConfigError, load_config
from uft_ray.logprobs import model_sequence_logprobs
from uft_ray.train import collectives
from uft_ray.train import loop as train_loop


def _cfg(reduction: str, world: int, ga: int, mb: int):
    cfg = loss_cfg("sft", sft_reduction=reduction)
    cfg.loss.source_weights = None
    cfg.train = SimpleNamespace(global_batch_size=mb * world * ga)
    return cfg


def test_the_field_defaults_to_row_and_refuses_anything_else():
    base = {"model": {"path": "/models/tiny"}, "data": {"sources": [{"name": "u", "format": "ultrachat_200k", "path": "/d/u"}]},
            "mixture": {"counts": {"u": 8}}, "loss": {"type": "sft"}}  # fmt: skip
    assert load_config(base, check_paths=False).loss.sft_reduction == "row"
    assert load_config(base, ["loss.sft_reduction=token"], check_paths=False).loss.sft_reduction == "token"
    with pytest.raises(ConfigError, match=r"loss.sft_reduction: 'sum' is not allowed; use one of: row, token"):
        load_config(base, ["loss.sft_reduction=sum"], check_paths=False)


@pytest.mark.parametrize("reduction", ["token", "row"])
def test_two_ranks_of_two_micro_batches_give_the_global_mean(monkeypatch, reduction):
    """Scaled as the loop scales them, the micro-batch losses of 2 ranks x 2 micro-batches sum (DeepSpeed: / ga,
    mean over ranks) to the step's token mean (token) or row mean (row), computed by hand from the same model."""
    quiet_collectives(monkeypatch, collectives)
    model = tiny_lora(seed=3)
    engine = Engine(model)
    world, ga, mb = 2, 2, 3
    cfg = _cfg(reduction, world, ga, mb)
    cpu = torch.device("cpu")
    ranks = [[rows(n=mb, seed=s) for s in (1, 2)], [rows(n=mb, seed=s) for s in (3, 4)]]
    for rank in ranks:
        for b in rank:
            b["kind"] = np.array(["sft"] * mb, dtype=object)
    tensors = [[train_loop.collate(b, PAD, cpu, pairs=False) for b in rank] for rank in ranks]
    total = sum(train_loop.scored_tokens(t) for rank in tensors for t in rank)
    # the loop's count of one rank's step is that rank's tokens; all_reduce sums the ranks' (done by hand here)
    per_rank = [train_loop.step_token_count(cfg, list(zip(b, t, strict=True))) for b, t in zip(ranks, tensors, strict=True)]  # fmt: skip
    if reduction == "token":
        assert sum(per_rank) == total
    else:
        assert per_rank == [None, None]
    step_tokens = total if reduction == "token" else None
    applied, nll, n_rows_mean = 0.0, 0.0, []
    with torch.no_grad():
        for b_rank, t_rank in zip(ranks, tensors, strict=True):
            for batch, t in zip(b_rank, t_rank, strict=True):
                loss, _ = train_loop.micro_batch_loss(engine, cfg, batch, t)
                scale = train_loop.loss_scale(cfg, batch, t, step_tokens, world, ga)
                applied += float(loss) * scale / ga / world  # DeepSpeed: / grad_accum, then the mean over ranks
                logp, n = model_sequence_logprobs(model, t["input_ids"], t["attention_mask"], t["loss_mask"])
                assert int(n.sum()) == train_loop.scored_tokens(t)
                nll += float(-logp.sum())
                n_rows_mean += (-logp / n).tolist()
    want = nll / total if reduction == "token" else float(np.mean(n_rows_mean))
    assert applied == pytest.approx(want, rel=1e-9)
    # the rows' lengths differ: the two means differ (a random model's tokens all cost about ln 128, so barely)
    assert nll / total != pytest.approx(float(np.mean(n_rows_mean)), rel=1e-5)
