"""A tiny, local, deterministic chat model: what tests and the demo train when there is no GPU and no network.

:func:`make_tiny_model` trains a byte-level BPE tokenizer (``tokenizers``) on text from :mod:`uft_ray.demo.samples`,
so sample rows tokenize to about one token per word, wraps it as a ``transformers`` fast tokenizer with ChatML
special tokens and chat template (Qwen2 style), and saves a randomly initialised ``Qwen2ForCausalLM`` next to it::

    {out_dir}/config.json  generation_config.json  model.safetensors
    {out_dir}/tokenizer.json  tokenizer_config.json  chat_template.jinja
    {out_dir}/uft_tiny.json          stamp: the parameters, written last; a rerun with the same ones returns at once

Same parameters -> bitwise identical weights and identical tokenizer files (BPE training has no randomness and
was checked to give the same merges across processes; the weights come from a seeded, forked torch RNG).
The model's ``vocab_size`` is the tokenizer's length rounded up to a multiple of 64, as real checkpoints pad it:
``len(tokenizer) < config.vocab_size`` is the normal case the pipeline must handle.

Tokenizer variants for the tokenization edge cases (no template, a template without a system role, BOS doubling)
come from :func:`make_tokenizer` / :func:`make_tokenizer_without_template`.
:func:`uft_ray.demo.ensure_demo_assets` makes the samples and the model under one root.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uft_ray.demo import samples as _samples

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # EOS: ends every assistant turn
BOS_TOKEN = "<|startoftext|>"  # only in the add_bos variant
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)  # ids 0, 1, 2

TINY_FORMAT_VERSION = 1  # bump when what make_tiny_model writes changes, so stamped dirs are rebuilt
STAMP = "uft_tiny.json"
VOCAB_PAD_MULTIPLE = 64
CORPUS_LINES = 3000

# ChatML as Qwen2 renders it, without Qwen's default system message (keeps tiny prompts short)
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# ChatML that refuses a system turn, like Gemma / Mistral templates do
CHATML_NO_SYSTEM_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
TEMPLATES = {"chatml": CHATML_TEMPLATE, "chatml_no_system": CHATML_NO_SYSTEM_TEMPLATE}

# every file a tiny-model dir may hold: a rebuild removes the ones the new build does not write
_MANAGED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    STAMP,
)


_DEFAULT_CORPUS_ID = f"samples-v{_samples.SAMPLES_FORMAT_VERSION}-{CORPUS_LINES}"


@functools.lru_cache(maxsize=1)
def _default_corpus() -> tuple[str, ...]:
    return tuple(_samples.corpus_lines(0, CORPUS_LINES))


def _corpus(corpus: Iterable[str] | None) -> tuple[list[str], str]:
    """The training lines and their identity for the stamp."""
    if corpus is None:
        return list(_default_corpus()), _DEFAULT_CORPUS_ID
    lines = list(corpus)
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\0")
    return lines, h.hexdigest()


def _train_bpe(lines: list[str], vocab_size: int, add_bos: bool) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable, whatever the corpus
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    if add_bos:
        # a tokenizer that prepends BOS on encode, like Llama / Mistral: with a template that also writes
        # bos_token, naive encoding of the rendered prompt doubles the BOS
        tok.add_special_tokens([BOS_TOKEN])
        bos_id = tok.token_to_id(BOS_TOKEN)
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{BOS_TOKEN} $A",
                    pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                    special_tokens=[(BOS_TOKEN, bos_id)],
                ),
            ]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)  # no BOS, as Qwen2
    return tok


def make_tokenizer(
    out_dir: str | os.PathLike[str] | None = None,
    *,
    vocab_size: int = 2048,
    template: str | None = "chatml",
    add_bos: bool = False,
    corpus: Iterable[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer; save it to `out_dir` when given.

    `template`: ``"chatml"`` (default), ``"chatml_no_system"`` (raises on a system turn) or None (no chat
    template: ``apply_chat_template`` raises). `add_bos`: prepend ``<|startoftext|>`` on encode and start the
    template with ``bos_token``. `vocab_size` is an upper bound: on the sample text the BPE runs out of merges
    at about 1000 tokens.
    """
    from transformers import PreTrainedTokenizerFast

    if template is not None and template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {sorted(TEMPLATES)} or None")
    lines, _ = _corpus(corpus)
    chat_template = None
    if template is not None:
        chat_template = ("{{- bos_token }}" if add_bos else "") + TEMPLATES[template]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(lines, vocab_size, add_bos),
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN if add_bos else None,
        chat_template=chat_template,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
    return tok


def make_tokenizer_without_template(out_dir: str | os.PathLike[str]) -> str:
    """Save the tiny tokenizer with no chat template to `out_dir` (for the "no chat template" error path)."""
    make_tokenizer(out_dir, template=None)
    return str(out_dir)


def _stamp_ok(out: Path, stamp: dict[str, Any]) -> bool:
    try:
        found = json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return found.get("params") == stamp["params"] and all((out / f).is_file() for f in found.get("files", []))


def make_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    vocab_size: int = 2048,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    corpus: Iterable[str] | None = None,
    template: str | None = "chatml",
) -> str:
    """Create (or reuse) the tiny Qwen2 chat model and its tokenizer in `out_dir`; returns `out_dir`.

    `vocab_size` bounds the BPE vocabulary; the model's embedding is the tokenizer's length rounded up to a
    multiple of 64. `seed` drives the weights only (the tokenizer depends on the corpus alone), so models made
    with different seeds share one tokenizer. Idempotent: a dir stamped with the same parameters is returned as is.
    """
    out = Path(out_dir)
    lines: list[str] | None = None
    if corpus is None:  # the default corpus is known by name: no need to generate it to check the stamp
        corpus_id = _DEFAULT_CORPUS_ID
    else:
        lines, corpus_id = _corpus(corpus)
    params = {
        "format_version": TINY_FORMAT_VERSION,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "seed": seed,
        "corpus": corpus_id,
        "template": template,
    }
    if _stamp_ok(out, {"params": params}):
        return str(out)

    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target, then move in: a reader never sees a half-written model
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tok = make_tokenizer(tmp, vocab_size=vocab_size, template=template, corpus=lines)  # None: default corpus
        n_tok = len(tok)
        config = Qwen2Config(
            vocab_size=-(-n_tok // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            use_sliding_window=False,
            dtype="float32",
            bos_token_id=tok.convert_tokens_to_ids(PAD_TOKEN),  # Qwen2 convention: bos = <|endoftext|>
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config).to(torch.float32).eval()
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=[tok.eos_token_id, tok.pad_token_id],  # stop on <|im_end|> or <|endoftext|>
            pad_token_id=tok.pad_token_id,
            do_sample=False,
            max_new_tokens=64,
        )
        model.save_pretrained(str(tmp))  # safetensors is the transformers 5 default
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        out.mkdir(parents=True, exist_ok=True)
        (out / STAMP).unlink(missing_ok=True)
        for name in _MANAGED_FILES:  # drop what an earlier, different build left (e.g. a chat_template.jinja)
            if name not in files:
                (out / name).unlink(missing_ok=True)
        for name in files:
            os.replace(tmp / name, out / name)
        stamp = {"params": params, "files": files, "tokenizer_len": n_tok, "model_vocab_size": config.vocab_size}
        (out / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)
