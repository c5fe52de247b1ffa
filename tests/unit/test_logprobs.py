"""uft_ray.logprobs: chunked target log-probs against the naive full log-softmax."""

import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from uft_ray.logprobs import model_sequence_logprobs, sequence_logprobs


def naive_sequence_logprobs(logits, labels, loss_mask):
    logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    token_logp = logp.gather(-1, labels[:, 1:, None]).squeeze(-1)
    mask = loss_mask[:, 1:] != 0
    return (token_logp * mask).sum(1), mask.sum(1)


def random_batch(batch, length, vocab, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=g, dtype=torch.float64).to(dtype) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    loss_mask = torch.rand(batch, length, generator=g) < 0.6
    loss_mask[0] = False  # a row with nothing to score
    return logits, labels, loss_mask


def test_uniform_logits_hand_worked():
    """V = 4, all logits 0: every token has log-prob -ln 4.

    Row 0 scores tokens 1..3 -> -3 ln 4, n = 3; row 1 scores token 2 only -> -ln 4, n = 1.
    mask[:, 0] is ignored: nothing predicts the first token.
    """
    logits = torch.zeros(2, 4, 4, dtype=torch.float64)
    labels = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    loss_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 0]])
    sum_logp, n_tokens = sequence_logprobs(logits, labels, loss_mask)
    torch.testing.assert_close(sum_logp, torch.tensor([-3 * math.log(4), -math.log(4)], dtype=torch.float64))
    assert n_tokens.tolist() == [3, 1]


def test_shift_uses_previous_position():
    """V = 3, position 0 has logits [0, 0, ln 3]: p(token 2) = 3 / (1 + 1 + 3) = 0.6.

    Token 1 = 2 is scored by position 0, so sum_logp = ln 0.6; what position 1 predicts does not matter.
    """
    logits = torch.zeros(1, 2, 3, dtype=torch.float64)
    logits[0, 0, 2] = math.log(3)
    logits[0, 1] = torch.tensor([100.0, -100.0, 5.0])
    sum_logp, n_tokens = sequence_logprobs(logits, torch.tensor([[0, 2]]), torch.tensor([[0, 1]]))
    assert sum_logp.item() == pytest.approx(math.log(0.6), abs=1e-12)
    assert n_tokens.tolist() == [1]


@pytest.mark.parametrize(
    "batch,length,vocab,chunk_size",
    [(3, 9, 13, 4), (2, 17, 50, 7), (4, 5, 11, 1), (1, 12, 7, 1000), (5, 2, 3, 2)],
)
def test_matches_naive_float64(batch, length, vocab, chunk_size):
    logits, labels, loss_mask = random_batch(batch, length, vocab, seed=batch * 100 + length)
    sum_logp, n_tokens = sequence_logprobs(logits, labels, loss_mask, chunk_size=chunk_size)
    ref_sum, ref_n = naive_sequence_logprobs(logits, labels, loss_mask)
    assert sum_logp.dtype == torch.float64
    torch.testing.assert_close(sum_logp, ref_sum, rtol=0, atol=1e-10)
    assert torch.equal(n_tokens, ref_n)
    assert sum_logp[0].item() == 0 and n_tokens[0].item() == 0


def test_gradient_matches_naive_float64():
    logits, labels, loss_mask = random_batch(3, 8, 10)
    coef = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    (sequence_logprobs(a, labels, loss_mask, chunk_size=3)[0] * coef).sum().backward()
    (naive_sequence_logprobs(b, labels, loss_mask)[0] * coef).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_gradcheck_float64():
    logits, labels, loss_mask = random_batch(2, 6, 5, seed=3)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sequence_logprobs(x, labels, loss_mask, chunk_size=2)[0], (logits,))


def test_bf16_logits_reduce_in_fp32():
    """bf16 logits give float64 sums equal to the fp32 computation on the same (bf16-rounded) values."""
    logits, labels, loss_mask = random_batch(2, 16, 40, dtype=torch.bfloat16, seed=5)
    logits.requires_grad_()
    sum_logp, _ = sequence_logprobs(logits, labels, loss_mask, chunk_size=5)
    ref_sum, _ = naive_sequence_logprobs(logits.detach().float(), labels, loss_mask)
    assert sum_logp.dtype == torch.float64
    torch.testing.assert_close(sum_logp, ref_sum.double(), rtol=1e-6, atol=1e-5)
    sum_logp.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    assert torch.isfinite(logits.grad.float()).all()


def test_scored_rows_only_equal_the_full_tensor_path_bf16():
    """The model path hands the function [N, V] logits of the scored positions only (and takes their buffer for
    the gradient): values and gradients equal those of the [B, T, V] path on the same bf16 logits."""
    from uft_ray.logprobs import _TargetLogProb

    logits, labels, loss_mask = random_batch(3, 9, 40, dtype=torch.bfloat16, seed=7)
    rows, pos = (loss_mask[:, 1:] != 0).nonzero(as_tuple=True)  # position pos predicts token pos + 1
    coef = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    full = logits.clone().requires_grad_()
    want, _ = sequence_logprobs(full, labels, loss_mask, chunk_size=3)
    (want * coef).sum().backward()
    picked = logits[rows, pos].clone().requires_grad_()
    token = _TargetLogProb.apply(picked * 1, None, None, labels[rows, pos + 1], 3)  # * 1: a non-leaf, as a head's
    got = torch.zeros(3, dtype=torch.float64).index_add(0, rows, token.double())
    (got * coef).sum().backward()
    assert torch.equal(got, want)
    assert torch.equal(picked.grad, full.grad[rows, pos])
    assert picked.grad.dtype == torch.bfloat16


def test_no_scored_tokens_and_no_grad():
    logits, labels, _ = random_batch(2, 4, 6)
    logits.requires_grad_()
    sum_logp, n_tokens = sequence_logprobs(logits, labels, torch.zeros(2, 4, dtype=torch.bool))
    assert sum_logp.tolist() == [0.0, 0.0] and n_tokens.tolist() == [0, 0]
    sum_logp.sum().backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_shape_errors():
    logits = torch.zeros(2, 4, 5)
    with pytest.raises(ValueError, match="logits must be"):
        sequence_logprobs(logits[0], torch.zeros(4, dtype=torch.long), torch.ones(4))
    with pytest.raises(ValueError, match="must match"):
        sequence_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))


class TinyCausalLM(nn.Module):
    """Embedding -> running mean over the prefix (causal, context dependent) -> Linear."""

    def __init__(self, vocab: int = 11, dim: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids).cumsum(dim=1)
        h = h / torch.arange(1, input_ids.shape[1] + 1, dtype=h.dtype)[:, None]
        return SimpleNamespace(logits=self.head(torch.tanh(h)))


def test_model_sequence_logprobs_right_padding_matches_unpadded():
    torch.manual_seed(0)
    model = TinyCausalLM().double()
    pad = 0
    # (token ids, response_start): the response is every token from response_start on.
    seqs = [([3, 4, 5, 6, 7], 2), ([1, 2, 3, 4, 5, 6, 7, 8], 5), ([9, 10, 2], 1)]
    width = 10  # wider than the longest: all-pad trailing columns
    input_ids = torch.full((3, width), pad)
    attention_mask = torch.zeros(3, width, dtype=torch.long)
    loss_mask = torch.zeros(3, width, dtype=torch.long)
    for i, (ids, start) in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        loss_mask[i, start : len(ids)] = 1

    sum_logp, n_tokens = model_sequence_logprobs(model, input_ids, attention_mask, loss_mask, chunk_size=3)
    sum_logp.sum().backward()
    padded_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    expected = []
    for ids, start in seqs:
        ids_t = torch.tensor([ids])
        mask = torch.zeros_like(ids_t)
        mask[0, start:] = 1
        logits = model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t)).logits
        expected.append(naive_sequence_logprobs(logits, ids_t, mask)[0])
    expected = torch.cat(expected)
    expected.sum().backward()

    torch.testing.assert_close(sum_logp, expected.detach(), rtol=0, atol=1e-10)
    assert n_tokens.tolist() == [3, 3, 2]
    for got, want in zip(padded_grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_model_sequence_logprobs_accepts_tensor_output_and_rejects_masked_padding():
    model = TinyCausalLM()

    def plain(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    input_ids = torch.tensor([[1, 2, 3, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 0]])
    loss_mask = torch.tensor([[0, 1, 1, 0]])
    got, _ = model_sequence_logprobs(plain, input_ids, attention_mask, loss_mask)
    want, _ = model_sequence_logprobs(model, input_ids, attention_mask, loss_mask)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="padding"):
        model_sequence_logprobs(model, input_ids, attention_mask, torch.tensor([[0, 1, 1, 1]]))


def test_math_imports_torch_only():
    """Losses and logprobs import torch only, so the math is testable without Ray or DeepSpeed."""
    code = (
        "import sys, uft_ray.logprobs, uft_ray.losses; "
        "print([m for m in ('ray', 'deepspeed', 'transformers', 'peft') if m in sys.modules])"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=repo).stdout
    assert out.strip() == "[]"
