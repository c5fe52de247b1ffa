"""Benchmarks on Ray: one `EvalWorker` actor per `tensor_parallel_size` GPUs (one CPU actor without GPUs), tasks
handed out one at a time.

    caller   resolve the target, check the task names, start the actors
    actor    apply offline mode, load base + adapter once, then `harness.evaluate_task` per task it is given
    caller   as each task comes back: write its lm_eval JSON, print one line, give that actor the next task;
             at the end summary.json

Handing tasks out as actors free up (not fixed slices) keeps 4 GPUs busy when one task (mmlu, 57 subtasks) costs
ten times another. lm_eval's own vLLM data parallelism is not used: it starts Ray actors of its own and ends
with `ray.shutdown()`, which would tear down the cluster connection of the job it runs in.

`EvalWorker` is a plain class (tests run it in-process); `run_eval` wraps it with `ray.remote`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from uft_ray.evaluation import harness
from uft_ray.evaluation.harness import EvalTarget, TaskSpec


class EvalWorker:
    """The model on one device and the task index; `run` evaluates one task with it."""

    def __init__(
        self,
        target: EvalTarget,
        *,
        backend: str = "auto",
        include_path: str | None = None,
        task_names: list[str] | None = None,
        offline: bool | None = None,
        batch_size: int | str | None = None,
        device: str | None = None,
    ) -> None:
        # offline before lm_eval (and datasets) are imported: their flags are read at import
        self.offline = harness.apply_offline(offline)
        if device is None:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.backend = harness.resolve_backend(backend, device)
        self.args = harness.model_args(target, self.backend, device)
        self.batch_size = batch_size or ("auto" if device.startswith("cuda") else 8)
        self.include_path = include_path
        self.task_names = task_names
        self.lm: Any = None
        self.tm: Any = None

    def info(self) -> dict[str, Any]:
        return {"backend": self.backend, "device": self.device, "offline": self.offline, "model_args": self.args}

    def load(self) -> str | None:
        """Load the model and the task index; one line saying why not, or None."""
        try:
            self.tm = harness.task_manager(self.include_path, self.task_names)
            if self.lm is None:
                self.lm = harness.load_lm(self.backend, self.args, self.batch_size)
        except Exception as e:
            adapter = self.args.get("peft") or self.args.get("lora_local_path")
            return (
                f"loading {self.args['pretrained']}{f' + {adapter}' if adapter else ''} ({self.backend}, {self.device})"
                f" failed: {type(e).__name__}: {harness.one_line(e)}"
            )
        return None

    def run(
        self,
        spec: TaskSpec,
        limit: int | float | None = None,
        log_samples: bool = False,
        apply_chat_template: bool = False,
    ) -> dict[str, Any]:
        if self.lm is None:
            err = self.load()
            if err:
                return {"task": spec.task, "ok": False, "error": err}
        return harness.evaluate_task(
            self.lm,
            self.tm,
            spec,
            limit=limit,
            log_samples=log_samples,
            apply_chat_template=apply_chat_template,
            offline=self.offline,
            model_info=(self.backend, self.args),
        )


@dataclass
class EvalReport:
    out_dir: str
    summary: dict[str, Any]
    failed: dict[str, str] = field(default_factory=dict)
    fatal: str | None = None  # no worker could load the model: nothing was evaluated

    @property
    def ok(self) -> bool:
        return self.fatal is None and not self.failed


def _actor_env(offline: bool | None) -> dict[str, str]:
    # The token for gated datasets (gpqa) reaches the actors as `uft-ray submit --env HF_TOKEN` sends it to a job:
    # in the runtime env, never in arguments. Paths (HF_HOME, NLTK_DATA) stay the nodes' own.
    names = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT")
    env = {k: os.environ[k] for k in names if os.environ.get(k)}
    if offline:
        env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return env


def worker_layout(gpus: int, tensor_parallel_size: int, n_tasks: int) -> tuple[int, dict[str, Any]]:
    """How many eval actors and each one's Ray resources: `tensor_parallel_size` GPUs per actor out of `gpus`, at
    most one actor per task; one CPU actor when `gpus` is 0. EvalError when the GPUs cannot hold one actor."""
    if gpus <= 0:
        return 1, {"num_gpus": 0, "num_cpus": 1}
    if tensor_parallel_size > gpus:
        raise harness.EvalError(
            f"eval.tensor_parallel_size {tensor_parallel_size}: each eval worker needs that many GPUs, "
            f"only {gpus} to use"
        )
    return max(1, min(gpus // tensor_parallel_size, n_tasks)), {"num_gpus": tensor_parallel_size, "num_cpus": 1}


def run_eval(
    target: EvalTarget,
    specs: list[TaskSpec],
    *,
    include_path: str | None = None,
    limit: int | float | None = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    backend: str = "auto",
    gpus: int | None = None,
    offline: bool | None = None,
    batch_size: int | str | None = None,
    preset: str | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> EvalReport:
    """Evaluate `specs` on the connected Ray cluster; write each task's results and summary.json to the target's
    eval folder as they come. `gpus`: GPUs to use, `target.tensor_parallel_size` per actor (None: the cluster's
    GPUs, at most one actor per task; 0: one CPU actor). Needs `ray.init` done (uft_ray.ray_utils.init_ray)."""
    import ray

    if not specs:
        raise harness.EvalError("no tasks to evaluate")
    if gpus is None:
        gpus = int(ray.cluster_resources().get("GPU", 0))
    n, options = worker_layout(gpus, target.tensor_parallel_size, len(specs))
    remote = ray.remote(EvalWorker).options(**options, runtime_env={"env_vars": _actor_env(offline)})
    names = [s.task for s in specs]
    actors = [
        remote.remote(
            target,
            backend=backend,
            include_path=include_path,
            task_names=names,
            offline=offline,
            batch_size=batch_size,
            device="cuda" if gpus > 0 else "cpu",
        )
        for _ in range(n)
    ]
    try:
        return _drive(actors, target, specs, limit, log_samples, apply_chat_template, preset, on_result)
    finally:
        for a in actors:  # free the GPUs now, not when the driver exits
            ray.kill(a)


def _drive(
    actors: list[Any],
    target: EvalTarget,
    specs: list[TaskSpec],
    limit: int | float | None,
    log_samples: bool,
    apply_chat_template: bool,
    preset: str | None,
    on_result: Callable[[dict[str, Any]], None] | None,
) -> EvalReport:
    import ray

    loaded = _get_all([a.load.remote() for a in actors])
    if all(loaded):  # every worker says why it could not load; they all tried the same model
        return EvalReport(target.out_dir, {}, fatal=loaded[0])
    actors = [a for a, err in zip(actors, loaded, strict=True) if not err]
    info = ray.get(actors[0].info.remote())
    queue, pending, failed = list(specs), {}, {}
    t0 = time.perf_counter()

    def give(actor: Any) -> None:
        if queue:
            spec = queue.pop(0)
            pending[actor.run.remote(spec, limit, log_samples, apply_chat_template)] = (actor, spec)

    for a in actors:
        give(a)
    while pending:
        [ref], _ = ray.wait(list(pending), num_returns=1)
        actor, spec = pending.pop(ref)
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as e:  # the actor died (out of memory, node lost): its task fails
            outcome = {"task": spec.task, "ok": False, "error": f"{spec.task}: worker lost: {harness.one_line(e)}"}
            actor = None
        if outcome["ok"]:
            harness.write_task_result(target.out_dir, outcome)
        else:
            failed[spec.task] = outcome["error"]
        if on_result is not None:
            on_result(outcome)
        if actor is not None:
            give(actor)
        elif not pending and queue:  # every worker gone
            for s in queue:
                failed[s.task] = f"{s.task}: not run: no worker left"
            queue.clear()
    meta = {
        "base": target.base,
        "adapter": target.adapter,
        "backend": info["backend"],
        "device": info["device"],
        "workers": len(actors),
        "preset": preset,
        "chat_template": apply_chat_template,
        "limit": limit,
        "num_fewshot": {s.task: s.num_fewshot for s in specs},
        "seconds": round(time.perf_counter() - t0, 1),
    }
    summary = harness.write_summary(target.out_dir, failed, meta)
    return EvalReport(target.out_dir, summary, failed)


def _get_all(refs: list[Any]) -> list[Any]:
    import ray

    out = []
    for r in refs:
        try:
            out.append(ray.get(r))
        except ray.exceptions.RayError as e:
            out.append(f"worker failed to start: {harness.one_line(e)}")
    return out
