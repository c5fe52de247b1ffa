"""The reference scorer: the frozen model, loaded once per Ray actor, scoring batches of prepared rows.

    logp_ref(y|x) = sum_{t in response} log pi_ref(y_t | x, y_<t)       (docs/design.md "The losses")

`ReferenceScorer` is a callable class for `ds.map_batches` (an actor pool; uft_ray.reference.service builds
the stage). It loads the base weights (safetensors only) plus an optional peft adapter merged in, sorts each
batch's sequences (`reference.batch_size` rows) by length into forwards of at most `reference.batch_tokens` padded
tokens (`length_groups`), and scores them through `uft_ray.logprobs.model_sequence_logprobs`, the same function
the policy uses (logits at the response positions only).

Each batch's values go to the collector without a round trip on the batch's path: `collector.add.remote` is not
waited for, at most `reports_in_flight` reports are outstanding (the oldest is waited for beyond that, and a failed
one fails the batch), and `flush` waits for the rest (called when Ray Data deletes the scorer at its actor's
graceful exit). A report lost with its actor (killed after its batch returned) leaves rows the collector lacks: the
driver waits for the reports to land (`collector.wait_for_rows`) and scores what is still missing again; the
collector keeps the first value per row id, so every row counts once.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from uft_ray import packing as packing_lib
from uft_ray import schema
from uft_ray.config import Config, compute_dtype, reference_revision
from uft_ray.logprobs import model_sequence_logprobs
from uft_ray.model_store import local_model
from uft_ray.packing import pack

if TYPE_CHECKING:  # pragma: no cover
    import torch

logger = logging.getLogger(__name__)

# Padded tokens per forward (`reference.batch_tokens`'s default): 8 x 2048 keeps the logits of a 152k-vocab bf16
# model under 5 GB (only the response positions get logits: uft_ray.logprobs.scored_logits).
DEFAULT_MAX_TOKENS_PER_FORWARD = 16_384
# Packed (`train.packing`): a forward's tokens go in sequences of at most this many, so the attention's [L, L] mask
# and cost stay those of a 4k sequence whatever `reference.batch_tokens` is.
PACKED_SEQUENCE_TOKENS = 4096
MAX_REPORTS_IN_FLIGHT = 4  # collector reports a scorer leaves outstanding before it waits for the oldest
_PAIR_COLUMNS = ("rejected_input_ids", "rejected_response_start")
SCORER_INPUT_COLUMNS = ("row_id", "input_ids", "response_start", *_PAIR_COLUMNS)


def actor_gpus(cfg: Config) -> float:
    """GPUs per scorer actor. A CPU-only run (train.use_gpu false: tests, the demo) scores on CPU whatever
    `reference.gpus_per_actor` says."""
    return cfg.reference.gpus_per_actor if cfg.train.use_gpu else 0.0


def length_groups(lengths: list[int], max_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices grouped by similar length: sorted by length, cut so that rows x longest <= max_tokens (the group's
    padded cost), and at most `max_rows` rows when given.

    A sequence longer than `max_tokens` gets a group of its own. Sorting first keeps the padding in a group small:
    lengths [10, 200, 30, 190] with 400 tokens give [[0, 2], [3, 1]], padded costs 2 x 30 and 2 x 200.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[i]  # ascending order: the newcomer is the longest
        if current and ((len(current) + 1) * longest > max_tokens or (max_rows and len(current) >= max_rows)):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_reference_model(
    model_path: str,
    *,
    revision: str | None = None,
    adapter: str | None = None,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    gpus: float = 0.0,
) -> torch.nn.Module:
    """The frozen reference: base weights (safetensors only), plus an optional peft adapter (unmerged), eval mode.

    `gpus > 1` spreads the layers over the actor's GPUs with `device_map="auto"` (a model one GPU cannot hold).
    """
    import torch
    from transformers import AutoModelForCausalLM

    on_gpu = gpus > 0 and torch.cuda.is_available()
    if gpus > 0 and not on_gpu:
        logger.warning("reference actor was given %s GPUs but sees no CUDA device: scoring on CPU", gpus)
    device_map: Any = None
    if on_gpu:
        device_map = "auto" if gpus > 1 else {"": torch.cuda.current_device()}

    model = AutoModelForCausalLM.from_pretrained(
        os.path.expanduser(local_model(model_path)),  # a bucket's model: downloaded once per node
        revision=revision,
        dtype=_torch_dtype(dtype),
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
        device_map=device_map,
    )
    if adapter:
        from peft import PeftModel

        # Unmerged, as the policy runs it (float32 LoRA beside the base): merged into bf16 weights the reference
        # was off by bf16 rounding, so r != 0 before the first update of a run that continues this adapter.
        model = PeftModel.from_pretrained(model, os.path.expanduser(local_model(adapter)))
    model.eval()
    model.requires_grad_(False)
    return model


class ReferenceScorer:
    """Ray Data callable class: adds `ref_logp` (and `ref_logp_rejected` for pairs, null otherwise) per row.

    Use through `ds.map_batches(ReferenceScorer, fn_constructor_kwargs=scorer_kwargs(cfg), ...)` (see
    `stream_stage`). Input batches (pyarrow, or numpy dicts) hold `row_id`, `input_ids`, `response_start` and,
    for pairs, `rejected_input_ids` / `rejected_response_start`. Each batch's sequences (chosen and rejected
    alike) are sorted by length and scored in sub-batches of at most `max_tokens_per_forward` padded tokens.

    With a `collector` (see `new_collector`), every batch's results and its forward count are sent to it
    (asynchronously, at most `reports_in_flight` outstanding; `flush` waits for them): the driver's proof of what was
    computed (a cache hit shows 0 forwards) and the stream mode's cache feed. `output_columns` limits what the stage
    emits (precompute needs only `row_id`).
    """

    def __init__(
        self,
        model_path: str,
        *,
        revision: str | None = None,
        adapter: str | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        gpus: float = 0.0,
        max_tokens_per_forward: int = DEFAULT_MAX_TOKENS_PER_FORWARD,
        output_columns: list[str] | None = None,
        collector: Any = None,
        reports_in_flight: int = MAX_REPORTS_IN_FLIGHT,
        packing: bool = False,
        share_prompts: bool = True,
    ):
        import torch

        self.collector = None  # set last: __del__ flushes only a scorer that finished starting
        self._reports: list[Any] = []

        self.model = load_reference_model(
            model_path,
            revision=revision,
            adapter=adapter,
            dtype=dtype,
            attn_implementation=packing_lib.attn_implementation(attn_implementation, packing),
            trust_remote_code=trust_remote_code,
            gpus=gpus,
        )
        self.device = self.model.get_input_embeddings().weight.device
        self.max_tokens = max_tokens_per_forward
        self.packing, self.share_prompts = packing, share_prompts
        self.output_columns = output_columns
        self.reports_in_flight = max(0, int(reports_in_flight))
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self._torch = torch
        if collector is not None:
            import ray

            ray.get(collector.hello.remote(self.host, self.pid))
        self.collector = collector

    def score(
        self, sequences: list[np.ndarray], starts: list[int], pairs: list[list[int]] | None = None
    ) -> tuple[np.ndarray, int]:
        """Summed response log-probs of each sequence (float64), and the number of model forwards.

        `pairs`: sequences that share a prompt (a pair's chosen and rejected); packed, it is computed once."""
        if self.packing:
            return self._score_packed(sequences, starts, pairs or [])
        torch = self._torch
        out = np.zeros(len(sequences), dtype=np.float64)
        groups = length_groups([len(s) for s in sequences], self.max_tokens)
        with torch.inference_mode():
            for group in groups:
                ids, attn, loss = self._padded(sequences, starts, group)
                logp, _ = model_sequence_logprobs(self.model, ids, attn, loss, use_cache=False)
                out[group] = logp.double().cpu().numpy()
        return out, len(groups)

    def _padded(self, sequences: list[np.ndarray], starts: list[int], rows: list[int]) -> tuple[Any, Any, Any]:
        """`rows` of `sequences` right-padded on the model's device: ids, attention mask, response mask."""
        torch = self._torch
        width = max(len(sequences[i]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        attn = torch.zeros_like(ids)
        loss = torch.zeros_like(ids)
        for r, i in enumerate(rows):
            n = len(sequences[i])
            ids[r, :n] = torch.from_numpy(np.asarray(sequences[i], dtype=np.int64))
            attn[r, :n] = 1
            loss[r, int(starts[i]) : n] = 1
        return ids.to(self.device), attn.to(self.device), loss.to(self.device)

    def _score_packed(
        self, sequences: list[np.ndarray], starts: list[int], pairs: list[list[int]]
    ) -> tuple[np.ndarray, int]:
        """`score` without padding: units (a pair, or a sequence alone) into forwards of at most `max_tokens`
        tokens, each laid out by `uft_ray.packing.pack` in sequences of at most `PACKED_SEQUENCE_TOKENS`."""
        torch = self._torch
        paired = {i for p in pairs for i in p}
        units = [list(p) for p in pairs] + [[i] for i in range(len(sequences)) if i not in paired]
        sizes = [sum(len(sequences[i]) for i in u) for u in units]
        out = np.zeros(len(sequences), dtype=np.float64)
        forwards = 0
        with torch.inference_mode():
            for chunk in length_groups(sizes, self.max_tokens):  # by size, rows x largest <= budget: a bound
                members = [i for u in chunk for i in units[u]]
                ids, attn, loss = self._padded(sequences, starts, members)
                local = {i: r for r, i in enumerate(members)}
                groups = [[local[i] for i in units[u]] for u in chunk if len(units[u]) > 1]
                packed = pack(
                    ids, attn, groups=groups, max_tokens=PACKED_SEQUENCE_TOKENS, share_prefix=self.share_prompts
                )
                logp, _ = model_sequence_logprobs(self.model, ids, attn, loss, packed=packed)
                out[members] = logp.double().cpu().numpy()
                forwards += 1
        return out, forwards

    def __call__(self, batch: pa.Table | dict[str, np.ndarray]) -> pa.Table | dict[str, np.ndarray]:
        is_arrow = isinstance(batch, pa.Table)

        def col(name: str) -> list[Any]:
            if is_arrow:
                return batch.column(name).to_numpy(zero_copy_only=False) if name in batch.column_names else None
            return batch.get(name)

        row_ids = [str(r) for r in col("row_id")]
        n = len(row_ids)
        chosen, chosen_start = col("input_ids"), col("response_start")
        rejected, rejected_start = col("rejected_input_ids"), col("rejected_response_start")
        sequences, starts, slots = [], [], []  # slot: (row, 0 chosen | 1 rejected)
        pairs = []
        for i in range(n):
            sequences.append(chosen[i])
            starts.append(chosen_start[i])
            slots.append((i, 0))
            if rejected is not None and rejected[i] is not None:
                pairs.append([len(sequences) - 1, len(sequences)])
                sequences.append(rejected[i])
                starts.append(rejected_start[i])
                slots.append((i, 1))
        values, forwards = self.score(sequences, starts, pairs)
        logp = np.full(n, np.nan)
        logp_rej: list[float | None] = [None] * n
        for (i, side), v in zip(slots, values, strict=True):
            if side == 0:
                logp[i] = v
            else:
                logp_rej[i] = float(v)
        if self.collector is not None:
            tokens = int(sum(len(s) for s in sequences))
            self._reports.append(
                self.collector.add.remote(self.host, self.pid, row_ids, logp, logp_rej, forwards, tokens)
            )
            self._settle(self.reports_in_flight)

        if is_arrow:
            out = batch if self.output_columns is None else batch.select(self.output_columns)
            out = out.drop_columns([c for c in (schema.REF_LOGP, schema.REF_LOGP_REJECTED) if c in out.column_names])
            out = out.append_column(pa.field(schema.REF_LOGP, pa.float64()), pa.array(logp, pa.float64()))
            return out.append_column(
                pa.field(schema.REF_LOGP_REJECTED, pa.float64()), pa.array(logp_rej, pa.float64())
            )
        keep = batch.keys() if self.output_columns is None else self.output_columns
        result = {k: batch[k] for k in keep}
        result[schema.REF_LOGP] = logp
        result[schema.REF_LOGP_REJECTED] = np.array([np.nan if v is None else v for v in logp_rej])
        return result

    def _settle(self, keep: int) -> None:
        """Leave at most `keep` collector reports in flight, waiting for the oldest; a failed one raises here."""
        import ray

        if not self._reports:
            return
        done, self._reports = ray.wait(self._reports, num_returns=len(self._reports), timeout=0, fetch_local=False)
        ray.get(done)  # landed ones: a collector error fails this batch instead of going unnoticed
        if len(self._reports) > keep:
            done, self._reports = ray.wait(self._reports, num_returns=len(self._reports) - keep, fetch_local=False)
            ray.get(done)

    def pending_reports(self) -> int:
        """Collector reports sent and not yet known to have landed."""
        return len(self._reports)

    def flush(self) -> None:
        """Wait for every report in flight: afterwards the collector holds every batch this scorer returned."""
        self._settle(0)

    def __del__(self) -> None:
        # Ray Data deletes its callable when the actor exits gracefully (`_MapWorker.__ray_shutdown__`): the last
        # reports land before the process goes. A killed actor runs none of this (the driver rescores its rows).
        if getattr(self, "collector", None) is None or not getattr(self, "_reports", None):
            return
        try:
            self.flush()
        except Exception as e:  # interpreter exit, a lost collector: the driver sees the rows missing
            logger.warning("reference scorer %s:%s: %d collector reports not confirmed: %s",
                           self.host, self.pid, len(self._reports), e)  # fmt: skip


def scorer_kwargs(cfg: Config) -> dict[str, Any]:
    """`fn_constructor_kwargs` for `ReferenceScorer` from the config."""
    ref_path = cfg.reference.model_path or cfg.model.path
    return {
        "model_path": ref_path,
        "revision": reference_revision(cfg),
        "adapter": cfg.reference.adapter,
        "dtype": compute_dtype(cfg),
        "attn_implementation": cfg.model.attn_implementation,
        "trust_remote_code": cfg.model.trust_remote_code,
        "gpus": actor_gpus(cfg),
        "max_tokens_per_forward": cfg.reference.batch_tokens,
        "packing": packing_lib.enabled(cfg.train),
        "share_prompts": cfg.train.share_prompts,
    }
