"""The rollout actor pool: n continuations of prompt + hint per prompt, with the trainer's current adapter.

Each actor holds the frozen base once and a LoRA adapter that the trainer replaces after every optimizer step
(`load_adapter`): only the adapter's tensors travel (megabytes), through the object store, never the base. Two
backends behind one interface:

- `hf`: transformers `generate` (CPU tests and the demo; works on a GPU too). Sampling is per request, seeded
  by the request's own seed (`request_seed(seed, step, row_id, k)`) and the token's position: a logits
  processor (uft_ray.rft.sampling) draws every row's next token at once on the logits' device (Gumbel-max with
  noise from a counter-based hash of (seed, position, token id)) and hands `generate` a one-hot score, so the
  draw does not depend on what else is in the batch and a resumed run regenerates the same rollouts.
- `vllm`: vLLM with `enable_lora`, the adapter written as a peft directory and loaded through a new
  `LoRARequest` per version; `SamplingParams(seed=...)` per request. An optional extra (`uft-ray[vllm]`).
  The directories live in one temporary folder per actor (`AdapterDirs`): the current version and the one
  before it, no more; the folder goes when the actor closes or exits, or, after a kill, when the next actor on
  the node starts.

A request is `{"prompt_ids": [...], "seed": int, "greedy": bool}`; the answer is the generated token ids, cut
after the first end-of-sequence token.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import time
import weakref
from typing import Any

import numpy as np

from uft_ray.evaluation.harness import vllm_lora_rank
from uft_ray.model_store import local_model
from uft_ray.preflight import package_missing_error
from uft_ray.rft.actor_calls import actor_label, call_all

MAX_SEED = 2**63 - 1
ADAPTER_DIR_PREFIX = "uft-rollout-"
_LOCK = ".lock"


def request_seed(seed: int, step: int, row_id: str, k: int) -> int:
    """The sampling seed of rollout k of a row at a step: the same in every process and on every rerun."""
    digest = hashlib.sha256(f"{seed}\x1f{step}\x1f{row_id}\x1f{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & MAX_SEED


def adapter_digest(state: dict[str, Any]) -> str:
    """sha1 over the adapter's tensors (names sorted): the trainer's and each actor's must agree."""
    h = hashlib.sha1()
    for name in sorted(state):
        t = state[name]
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def adapter_bytes(state: dict[str, Any]) -> int:
    return int(sum(t.numel() * t.element_size() for t in state.values()))


def _lora_config(lora: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=0.0,  # generation never drops out
        target_modules=list(lora["target_modules"]),
        task_type="CAUSAL_LM",
    )


def vllm_engine_args(
    model_path: str,
    *,
    lora: dict[str, Any],
    dtype: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
) -> dict[str, Any]:
    """The arguments of the rollout actor's `vllm.LLM`: LoRA on, one adapter at a time, room for its rank."""
    try:
        rank = vllm_lora_rank(int(lora["r"]))
    except ValueError as e:
        raise ValueError(f"{e}: use rft.rollout.backend hf") from e
    return {
        "model": model_path,
        "revision": revision,
        "dtype": dtype,
        "enable_lora": True,
        "max_lora_rank": rank,
        "max_loras": 1,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": max_model_len,
        "trust_remote_code": trust_remote_code,
        "enable_prefix_caching": True,  # n rollouts of a prompt share its prefix
    }


def _remove_dir(path: str, lock: Any) -> None:
    shutil.rmtree(path, ignore_errors=True)
    lock.close()  # releases the lock (after the folder is gone: no sweeper races the removal)


class AdapterDirs:
    """The vLLM backend's adapter directories: `v{version}/` in one temporary folder, the current and the previous
    version kept (a request may still name the previous one), older ones removed as each new one is written.

    The folder is removed by `close`, at interpreter exit, or when this object is collected. A force-killed actor
    (`ray.kill`) runs none of those: each folder holds an flock for its owner's lifetime (the kernel drops it when
    the process dies), and a new `AdapterDirs` removes the folders under `parent` whose lock is free and that are
    older than `stale_after_s` (a folder just created has not taken its lock yet).
    """

    KEEP = 2

    def __init__(self, parent: str | None = None, *, stale_after_s: float = 60.0) -> None:
        parent = parent or tempfile.gettempdir()
        sweep_stale_adapter_dirs(parent, stale_after_s)
        self.root = tempfile.mkdtemp(prefix=ADAPTER_DIR_PREFIX, dir=parent)
        lock = open(os.path.join(self.root, _LOCK), "w")  # held open: the lock lives as long as the folder
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.paths: list[str] = []  # oldest first
        self._finalizer = weakref.finalize(self, _remove_dir, self.root, lock)

    def write(self, state: dict[str, Any], version: int, lora: dict[str, Any]) -> str:
        """Write `state` (peft adapter tensors) as a peft directory for `version`; returns its path."""
        from safetensors.torch import save_file

        path = os.path.join(self.root, f"v{version}")
        os.makedirs(path, exist_ok=True)
        save_file(state, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
        _lora_config(lora).save_pretrained(path)
        if path in self.paths:  # the same version again (a restarted actor is sent the adapter again)
            self.paths.remove(path)
        self.paths.append(path)
        while len(self.paths) > self.KEEP:
            shutil.rmtree(self.paths.pop(0), ignore_errors=True)
        return path

    def close(self) -> None:
        """Remove the folder now (idempotent)."""
        self._finalizer()


def sweep_stale_adapter_dirs(parent: str, stale_after_s: float = 60.0) -> list[str]:
    """Remove the adapter folders under `parent` that no live process holds; returns the removed paths."""
    removed = []
    now = time.time()
    try:
        names = [n for n in os.listdir(parent) if n.startswith(ADAPTER_DIR_PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        try:
            if now - os.stat(path).st_mtime < stale_after_s:
                continue
            lock = open(os.path.join(path, _LOCK))
        except OSError:  # gone, not ours to open, or a folder without a lock (not made by AdapterDirs)
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: its actor is alive
            lock.close()
            continue
        _remove_dir(path, lock)
        removed.append(path)
    return removed


class RolloutActor:
    """One rollout engine (a Ray actor: `ray.remote(RolloutActor)`), the base loaded once, the adapter per step."""

    def __init__(
        self,
        model_path: str,
        *,
        lora: dict[str, Any],
        backend: str,
        dtype: str,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        eos_token_ids: list[int],
        pad_token_id: int,
        vocab_limit: int,
        batch_size: int = 64,
        threads: int = 1,
        revision: str | None = None,
        trust_remote_code: bool = False,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
    ) -> None:
        import torch

        self.backend = backend
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.eos = set(eos_token_ids)
        self.pad_token_id, self.vocab_limit, self.batch_size = pad_token_id, vocab_limit, batch_size
        self.lora = lora
        self.version = -1
        self._state: dict[str, Any] = {}
        self._dirs: AdapterDirs | None = None
        model_path = local_model(model_path)  # a bucket's model: downloaded once per node
        if backend == "vllm":
            try:
                from vllm import LLM
            except ModuleNotFoundError as e:  # a node the pre-check could not see yet (uft_ray.preflight)
                raise package_missing_error("vllm", "rft.rollout.backend: vllm", "rollout actors") from e

            args = vllm_engine_args(
                model_path,
                lora=lora,
                dtype=dtype,
                revision=revision,
                trust_remote_code=trust_remote_code,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
            )
            self.llm = LLM(**args)
            self._dirs = AdapterDirs()
            return
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))  # no more threads than this node's cores
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
        base = AutoModelForCausalLM.from_pretrained(
            model_path, revision=revision, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        self.model = get_peft_model(base, _lora_config(lora)).to(self.device).eval()

    # -- the adapter ---------------------------------------------------------------------------------------

    def load_adapter(self, state: dict[str, Any], version: int) -> str:
        """Replace the adapter with the trainer's (peft state dict, full tensors); returns its digest."""
        self._state = {k: v.detach().cpu() for k, v in state.items()}
        self.version = version
        if self._dirs is not None:
            self._lora_path = self._dirs.write(self._state, version, self.lora)
        else:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.model, self._state)
            missing = [k for k in getattr(result, "unexpected_keys", []) or [] if "lora_" in k]
            if missing:
                raise RuntimeError(f"adapter tensors not in the rollout model: {missing[:3]}")
        return self.digest()

    def close(self) -> None:
        """Remove the adapter directories (vllm); call before killing the actor, which runs no exit handler."""
        if self._dirs is not None:
            self._dirs.close()

    def digest(self) -> str:
        """The digest of the adapter generation uses (the model's own tensors for hf, the loaded file's for vllm)."""
        if self.backend == "vllm":
            return adapter_digest(self._state)
        from peft import get_peft_model_state_dict

        return adapter_digest(get_peft_model_state_dict(self.model))

    # -- generation ----------------------------------------------------------------------------------------

    def generate(self, requests: list[dict[str, Any]]) -> dict[str, Any]:
        """Token ids generated for each request, in order, and the seconds it took."""
        t0 = time.perf_counter()
        if self.backend == "vllm":
            out = self._generate_vllm(requests)
        else:
            out = []
            for i in range(0, len(requests), self.batch_size):
                out += self._generate_hf(requests[i : i + self.batch_size])
        return {"responses": out, "seconds": time.perf_counter() - t0, "version": self.version}

    def _cut(self, ids: list[int]) -> list[int]:
        for i, t in enumerate(ids):
            if t in self.eos:
                return ids[: i + 1]
        return ids

    def _generate_hf(self, requests: list[dict[str, Any]]) -> list[list[int]]:
        import torch
        from transformers import LogitsProcessorList

        from uft_ray.rft.sampling import SeededSampler  # torch at import: only where an actor generates

        longest = max(len(r["prompt_ids"]) for r in requests)
        ids = torch.full((len(requests), longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(requests):  # left padding: every prompt ends where generation starts
            p = r["prompt_ids"]
            ids[i, longest - len(p) :] = torch.as_tensor(p)
            mask[i, longest - len(p) :] = 1
        sampler = SeededSampler(
            [int(r["seed"]) for r in requests],
            [bool(r.get("greedy")) for r in requests],
            self.temperature,
            self.top_p,
            self.vocab_limit,
            prompt_len=longest,
        )
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,  # the sampler above draws; greedy takes its one-hot choice
                logits_processor=LogitsProcessorList([sampler]),
                eos_token_id=sorted(self.eos),
                pad_token_id=self.pad_token_id,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        return [self._cut(row[longest:].tolist()) for row in out.cpu()]

    def _generate_vllm(self, requests: list[dict[str, Any]]) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        params = [
            SamplingParams(
                temperature=0.0 if r.get("greedy") else self.temperature,
                top_p=1.0 if r.get("greedy") else self.top_p,
                max_tokens=self.max_new_tokens,
                seed=int(r["seed"]),
                stop_token_ids=sorted(self.eos),
            )
            for r in requests
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(r["prompt_ids"])) for r in requests]
        lora = LoRARequest(f"uft-v{self.version}", self.version + 2, self._lora_path) if self._state else None
        outs = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        return [self._cut(list(o.outputs[0].token_ids)) for o in outs]


def actors_of_rank(n_actors: int, rank: int, world: int) -> list[int]:
    """The actors a trainer rank sends its requests to: its own contiguous share when there are at least as many
    actors as ranks (8 actors, 4 ranks: rank 1 gets [2, 3]), else one actor shared by ranks rank % n_actors.

    Each rank's requests then go out as one big call per actor, instead of every rank splitting its few prompts
    over every actor (an actor serves its calls one after another: W small calls cost W round trips and W
    under-filled batches)."""
    if n_actors < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"need n_actors >= 1 and 0 <= rank < world, got {n_actors}, {rank}, {world}")
    if n_actors < world:
        return [rank % n_actors]
    bounds = np.linspace(0, n_actors, world + 1).round().astype(int)
    return list(range(bounds[rank], bounds[rank + 1]))


def rollout_memory_fraction(gpu_memory_utilization: float | None, gpus_per_actor: float) -> float:
    """vLLM's `gpu_memory_utilization` (a share of the whole device): the configured value, else 0.9 of the share
    of the GPU the actor holds (a dedicated GPU 0.9; half of one 0.45, leaving the other half to its neighbour)."""
    if gpu_memory_utilization is not None:
        return float(gpu_memory_utilization)
    return round(0.9 * min(1.0, max(gpus_per_actor, 0.0)) or 0.9, 4)


class RolloutPool:
    """The actors one trainer rank uses (`actors_of_rank`): its requests split into one contiguous slice per
    actor of its own; the adapter (rank 0's sync) sent to every actor.

    Every rank remembers the adapter of the last sync (`remember`), so that an actor Ray restarted (it comes back
    with no adapter) gets it again from whichever rank finds out, and the call is asked again
    (uft_ray.rft.actor_calls): mid-call, or on its next call (version -1), evaluation included. Each call has a
    time limit, `timeout_s`, whose error names the actor."""

    def __init__(self, actors: list[Any], rank: int = 0, world: int = 1, *, timeout_s: float = 900.0) -> None:
        self.actors = list(actors)
        self.own_index = actors_of_rank(len(self.actors), rank, world)
        self.own = [self.actors[i] for i in self.own_index]
        self.timeout_s = timeout_s
        self.version: int | None = None
        self._state: dict[str, Any] | None = None
        self._ref: Any = None

    def remember(self, state: dict[str, Any], version: int) -> None:
        """The adapter every actor should hold now (every rank keeps it; rank 0 sends it)."""
        self._state, self.version, self._ref = state, version, None

    def _adapter_ref(self) -> Any:
        import ray

        if self._ref is None:
            self._ref = ray.put(self._state)
        return self._ref

    def _resend(self, actor: Any) -> Any:
        """The adapter back into a restarted actor (an ObjectRef), or None before the first sync."""
        if self._state is None:
            return None
        return actor.load_adapter.remote(self._adapter_ref(), self.version)

    def generate(self, requests: list[dict[str, Any]]) -> dict[str, Any]:
        """`responses` in request order, `seconds` (the slowest actor's), `versions` (adapter versions used)."""
        if not requests:
            return {"responses": [], "seconds": 0.0, "versions": set()}
        n = len(self.own)
        bounds = np.linspace(0, len(requests), n + 1).round().astype(int)
        busy = [i for i in range(n) if bounds[i + 1] > bounds[i]]
        actors = [self.own[i] for i in busy]
        labels = [actor_label(self.own[i], self.own_index[i]) for i in busy]
        parts = {id(a): requests[bounds[i] : bounds[i + 1]] for a, i in zip(actors, busy, strict=True)}

        def call(actors: list[Any], labels: list[str]) -> list[dict[str, Any]]:
            return call_all(
                actors,
                lambda a: a.generate.remote(parts[id(a)]),
                what=f"generating {len(requests)} rollouts",
                timeout_s=self.timeout_s,
                labels=labels,
                recover=self._resend,
            )

        results = call(actors, labels)
        # An actor restarted between calls answers with no adapter (version -1): the adapter again, then its part.
        behind = [j for j, r in enumerate(results) if self.version is not None and r["version"] != self.version]
        if behind:
            call_all([actors[j] for j in behind], self._resend, what="resending the adapter",
                     timeout_s=self.timeout_s, labels=[labels[j] for j in behind])  # fmt: skip
            for j, again in zip(behind, call([actors[j] for j in behind], [labels[j] for j in behind]), strict=True):
                results[j] = again
        return {
            "responses": [resp for r in results for resp in r["responses"]],
            "seconds": max(r["seconds"] for r in results),
            "versions": {r["version"] for r in results},
        }

    def load_adapter(self, state: dict[str, Any], version: int) -> list[str]:
        """Send the adapter once through the object store to every actor; their digests after loading. An actor
        that dies while loading is waited for and sent it again."""
        self.remember(state, version)
        ref = self._adapter_ref()
        return call_all(
            self.actors,
            lambda a: a.load_adapter.remote(ref, version),
            what=f"sending adapter version {version}",
            timeout_s=self.timeout_s,
        )
