"""GPU checks (skipped without CUDA): the chunked log-probs on a real accelerator, and the reference scorer in bf16.

Run on a GPU machine with `pytest tests/gpu -v`.
"""

from __future__ import annotations

import pytest
import torch

from uft_ray.logprobs import sequence_logprobs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _naive(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, labels[:, 1:, None]).squeeze(2)
    return (logp.double() * mask[:, 1:]).sum(1)


def test_bf16_chunked_logprobs_match_fp32_and_use_less_memory() -> None:
    """Qwen's 152,064 vocabulary, 2 x 2048 tokens, bf16 logits on the GPU.

    The chunked sums equal the naive fp32 log-softmax on the same bf16 values (both reduce in fp32 per token),
    and the extra memory above the logits is at least 4x smaller than the naive path's.
    """
    torch.manual_seed(0)
    b, t, v = 2, 2048, 152_064
    logits = torch.randn(b, t, v, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, v, (b, t), device="cuda")
    mask = torch.zeros(b, t, device="cuda")
    mask[:, t // 2 :] = 1

    def extra_peak(fn) -> tuple[torch.Tensor, int]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base

    chunked, chunked_mem = extra_peak(lambda: sequence_logprobs(logits, labels, mask)[0])
    naive, naive_mem = extra_peak(lambda: _naive(logits, labels, mask))
    torch.testing.assert_close(chunked, naive, rtol=1e-6, atol=1e-3)
    assert naive_mem >= 4 * chunked_mem, (naive_mem, chunked_mem)


def test_reference_scorer_bf16_on_gpu_is_close_to_fp32_on_cpu(tmp_path) -> None:
    """The scorer loads bf16 on GPU (docs/design.md "The reference cache"); its sums stay close to the fp32 CPU ones."""
    import numpy as np

    from uft_ray.demo.tiny_model import make_tiny_model
    from uft_ray.reference.scorer import ReferenceScorer

    model_dir = make_tiny_model(tmp_path / "tiny")
    rng = np.random.default_rng(0)
    ids = [rng.integers(3, 900, size=n).astype(np.int32) for n in (40, 64, 90)]
    starts = [10, 20, 30]
    gpu, _ = ReferenceScorer(model_dir, dtype="bfloat16", gpus=1).score(ids, starts)
    cpu, _ = ReferenceScorer(model_dir, dtype="float32", gpus=0).score(ids, starts)
    for g, c, n, s in zip(gpu, cpu, (40, 64, 90), starts, strict=True):
        # bf16 weights: a few thousandths of a nat per token is the expected rounding.
        assert abs(g - c) < 0.02 * (n - s), (g, c)
