"""Tokenization: unified rows -> input_ids with a response-only loss mask (docs/design.md "Unified rows and tokenization").

    input_ids      = chat_template(prompt, add_generation_prompt=True) + response tokens + EOS
    response_start = len(rendered prompt tokens)     (only positions >= response_start carry loss)

Pairs add `rejected_input_ids` / `rejected_response_start` / `rejected_length`, with the same prompt tokens.

Edge cases handled here, once, for every model family:
- No chat template: `TokenizerError` that names the fix (a chat model's tokenizer, or a saved template).
- Templates without a system role (Gemma, Mistral v0.1 raise; some drop it silently): probed once; when
  unsupported, the system text is prepended to the first user turn instead of being lost.
- BOS: the rendered prompt is encoded with `add_special_tokens=False`, because templates that write
  `bos_token` themselves (Llama, Mistral) would otherwise get a second one from the tokenizer. If the
  tokenizer normally starts sequences with BOS and the template did not write it, it is added once.
- EOS: `tokenizer.eos_token_id` closes the response exactly once, even when the response text already ends
  with the EOS string.
- Length: `tokenize.max_prompt_len` and `tokenize.max_len` (for pairs the longer side counts). `drop` (the
  default) rejects the row as `too_long`; `truncate_prompt_left` keeps the last prompt tokens (and a leading
  BOS) and still drops a row whose response alone does not fit.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

from uft_ray.config import ModelConfig, TokenizeConfig
from uft_ray.data import quarantine as q
from uft_ray.data.quarantine import Reject
from uft_ray.model_store import local_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Row = dict[str, Any]
_PROBE = "uft-ray system probe 7f3a"


class TokenizerError(ValueError):
    """The tokenizer cannot be used as configured; the message says how to fix it."""


def check_tokenizer(tok: PreTrainedTokenizerBase, where: str) -> None:
    """Raise `TokenizerError` when `tok` cannot render chats or end responses."""
    if not getattr(tok, "chat_template", None):
        raise TokenizerError(
            f"the tokenizer at {where!r} has no chat_template, and uft-ray renders every prompt with the "
            "tokenizer's own chat template. Fix: set model.path to a chat/instruct model (its tokenizer has one), "
            f"or add one: tok = AutoTokenizer.from_pretrained({where!r}); tok.chat_template = '<jinja template>'; "
            f"tok.save_pretrained({where!r})  (writes chat_template.jinja)"
        )
    if tok.eos_token_id is None:
        raise TokenizerError(
            f"the tokenizer at {where!r} has no eos_token: responses must end with one. Fix: set eos_token "
            "in its tokenizer_config.json (e.g. the token its chat template closes an assistant turn with)"
        )


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, checked. Remote code runs only when `model.trust_remote_code` says so."""
    from transformers import AutoTokenizer

    path = os.path.expanduser(local_model(model.path, weights=False))
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except Exception as e:
        hint = ""
        if "trust_remote_code" in str(e) and not model.trust_remote_code:
            hint = " (this tokenizer ships its own code: set model.trust_remote_code=true if you trust it)"
        raise TokenizerError(f"cannot load the tokenizer of model.path={model.path!r}: {e}{hint}") from e
    check_tokenizer(tok, model.path)
    return tok


def merge_system(prompt: list[dict[str, str]]) -> list[dict[str, str]]:
    """For templates without a system role: the system text opens the first user turn."""
    if not prompt or prompt[0]["role"] != "system":
        return prompt
    system, rest = prompt[0]["content"], [dict(m) for m in prompt[1:]]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}" if system.strip() else m["content"]
            return rest
    return [{"role": "user", "content": system}, *rest]


class ChatEncoder:
    """Encodes unified rows for one tokenizer and one length policy."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: TokenizeConfig, where: str = "tokenizer"):
        check_tokenizer(tokenizer, where)
        self.tok = tokenizer
        self.cfg = cfg
        self.eos: int = tokenizer.eos_token_id
        self.bos: int | None = tokenizer.bos_token_id
        # whether this tokenizer starts every sequence with BOS (Llama/Mistral do; Qwen has no BOS)
        self.wants_bos = self.bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [
            self.bos
        ]
        self.system_ok = self._system_supported()

    def _system_supported(self) -> bool:
        msgs = [{"role": "system", "content": _PROBE}, {"role": "user", "content": "hi"}]
        try:
            text = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # jinja2 TemplateError from raise_exception(), or the template's own checks
            return False
        return _PROBE in text  # some templates drop the system turn silently

    def render(self, prompt: list[dict[str, str]]) -> str:
        msgs = prompt if self.system_ok else merge_system(prompt)
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    def _prompt_ids(self, ids: list[int]) -> list[int]:
        if self.bos is None:
            return ids
        while len(ids) >= 2 and ids[0] == self.bos and ids[1] == self.bos:
            ids = ids[1:]
        if self.wants_bos and (not ids or ids[0] != self.bos):
            ids = [self.bos, *ids]
        return ids

    def _response_ids(self, ids: list[int]) -> list[int]:
        while ids and ids[-1] == self.eos:  # the text already ended with the EOS string: append it once
            ids = ids[:-1]
        return [*ids, self.eos]

    def _fit(self, prompt: list[int], longest: int) -> list[int]:
        c = self.cfg
        total = len(prompt) + longest
        if len(prompt) <= c.max_prompt_len and total <= c.max_len:
            return prompt
        if c.overflow == "drop":
            raise Reject(
                q.TOO_LONG,
                f"prompt {len(prompt)} tokens (max_prompt_len {c.max_prompt_len}), prompt + response {total} "
                f"tokens (max_len {c.max_len}); tokenize.overflow=drop",
            )
        keep_bos = self.bos is not None and bool(prompt) and prompt[0] == self.bos
        budget = min(c.max_prompt_len, c.max_len - longest)
        if budget < 1 + keep_bos:
            raise Reject(
                q.TOO_LONG,
                f"the response alone is {longest} tokens, no room for a prompt within max_len {c.max_len}",
            )
        tail = prompt[len(prompt) - (budget - keep_bos) :]
        return [self.bos, *tail] if keep_bos else tail  # type: ignore[list-item]

    def encode_batch(self, rows: list[Row]) -> list[Row | Reject]:
        """Each row with its token columns added, or a `Reject` (too_long)."""
        if not rows:
            return []
        prompts = [self.render(r["prompt"]) for r in rows]
        pair = [r.get("rejected") is not None for r in rows]
        texts = [r["response"] for r in rows] + [r["rejected"] for r, p in zip(rows, pair, strict=True) if p]
        # verbose=False: lengths are checked here, not by the tokenizer's model_max_length warning
        p_ids = self.tok(prompts, add_special_tokens=False, verbose=False)["input_ids"]
        t_ids = self.tok(texts, add_special_tokens=False, verbose=False)["input_ids"]
        out: list[Row | Reject] = []
        j = len(rows)
        for i, r in enumerate(rows):
            resp = self._response_ids(list(t_ids[i]))
            rej = None
            if pair[i]:
                rej = self._response_ids(list(t_ids[j]))
                j += 1
            try:
                prompt = self._fit(self._prompt_ids(list(p_ids[i])), max(len(resp), len(rej or ())))
            except Reject as e:
                out.append(e)
                continue
            row = dict(r)
            row["input_ids"] = prompt + resp
            row["response_start"] = len(prompt)
            row["length"] = len(prompt) + len(resp)
            row["rejected_input_ids"] = prompt + rej if rej is not None else None
            row["rejected_response_start"] = len(prompt) if rej is not None else None
            row["rejected_length"] = len(prompt) + len(rej) if rej is not None else None
            out.append(row)
        return out

    def encode(self, row: Row) -> Row:
        """One row (raises `Reject` for a row that does not fit)."""
        (res,) = self.encode_batch([row])
        if isinstance(res, Reject):
            raise res
        return res


@functools.lru_cache(maxsize=4)
def cached_encoder(model: tuple[str, str | None, bool], tokenize: tuple[int, int, str]) -> ChatEncoder:
    """One encoder per worker process (Ray reuses workers across tasks, so the tokenizer loads once)."""
    path, revision, trust = model
    m = ModelConfig(path=path, revision=revision, trust_remote_code=trust)
    return ChatEncoder(load_tokenizer(m), TokenizeConfig(*tokenize), where=path)


def encoder_key(model: ModelConfig, cfg: TokenizeConfig) -> tuple[tuple[str, str | None, bool], tuple[int, int, str]]:
    """The hashable arguments of `cached_encoder` for a config."""
    return (model.path, model.revision, model.trust_remote_code), (cfg.max_prompt_len, cfg.max_len, cfg.overflow)
