"""The tiny model and tokenizer load with plain transformers, render ChatML, and are built deterministically."""

from __future__ import annotations

import glob
import hashlib
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from uft_ray.demo.samples import TextGen
from uft_ray.demo.tiny_model import (
    IM_END,
    IM_START,
    PAD_TOKEN,
    STAMP,
    make_tiny_model,
    make_tokenizer,
    make_tokenizer_without_template,
)


def _digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    t0 = time.perf_counter()
    path = Path(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))
    assert time.perf_counter() - t0 < 10, "the tiny model must be quick to make"
    return path


def test_files_and_config(model_dir: Path) -> None:
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", STAMP} <= names
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    c = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (64, 2, 4, 2)
    assert (c.intermediate_size, c.max_position_embeddings, c.tie_word_embeddings) == (128, 2048, False)
    assert model.dtype == torch.float32
    assert c.vocab_size % 64 == 0 and len(tok) <= c.vocab_size < len(tok) + 64
    assert c.eos_token_id == tok.convert_tokens_to_ids(IM_END)
    assert model.generation_config.pad_token_id == tok.pad_token_id


def test_special_tokens(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.eos_token == IM_END and tok.pad_token == PAD_TOKEN and tok.bos_token is None
    assert [tok.convert_tokens_to_ids(t) for t in (PAD_TOKEN, IM_START, IM_END)] == [0, 1, 2]
    assert tok(IM_START + "user", add_special_tokens=False)["input_ids"][0] == 1
    assert tok("hello there")["input_ids"] == tok("hello there", add_special_tokens=False)["input_ids"], "no BOS"


def test_chat_template(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Plan a garden."}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPlan a garden.<|im_end|>\n<|im_start|>assistant\n"
    )
    no_gen = tok.apply_chat_template(msgs[1:], tokenize=False, add_generation_prompt=False)
    assert no_gen == "<|im_start|>user\nPlan a garden.<|im_end|>\n"
    full = msgs[1:] + [{"role": "assistant", "content": "Dig."}]
    assert tok.apply_chat_template(full, tokenize=False).endswith("<|im_start|>assistant\nDig.<|im_end|>\n")


def test_forward_pass(model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "How can I build a quiet garden?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_bpe_learned_the_sample_text(model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    gen = TextGen(123)  # unseen seed: text in the same style, not the training lines
    for _ in range(20):
        s = gen.sentence()
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) < len(s) / 2, (s, len(ids))
        assert tok.decode(ids) == s
    assert tok.decode(tok("naïve café 😀")["input_ids"]) == "naïve café 😀", "byte-level: any text round-trips"


def test_sample_rows_have_useful_lengths(model_dir: Path, tmp_path: Path) -> None:
    from uft_ray.demo.samples import write_samples

    paths = write_samples(tmp_path)
    tok = AutoTokenizer.from_pretrained(model_dir)
    (path,) = glob.glob(paths["ultrachat_200k_train"])
    lengths = []
    for row in pq.read_table(path).to_pylist():
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"][:2]]
        lengths.append(len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]))
    over = sum(n > 128 for n in lengths) / len(lengths)
    assert 0.03 < over < 0.5, "max_len 128 drops some rows, not most"
    assert min(lengths) < 64


def test_deterministic_and_idempotent(model_dir: Path, tmp_path: Path) -> None:
    other = Path(make_tiny_model(tmp_path / "m"))
    assert _digest(other) == _digest(model_dir), "same seed: identical bytes"

    mtime = (other / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    make_tiny_model(other)
    assert time.perf_counter() - t0 < 0.5 and (other / "model.safetensors").stat().st_mtime_ns == mtime

    make_tiny_model(other, seed=1)  # new params: rebuilt in place
    d0, d1 = _digest(model_dir), _digest(other)
    assert d1["model.safetensors"] != d0["model.safetensors"]
    assert d1["tokenizer.json"] == d0["tokenizer.json"], "the seed drives the weights only"
    assert not list(tmp_path.glob(".m.tmp-*")), "no temp dirs left behind"


def test_does_not_touch_callers_rng(tmp_path: Path) -> None:
    torch.manual_seed(42)
    before = torch.get_rng_state()
    make_tiny_model(tmp_path / "m", seed=7, num_layers=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_tokenizer_variants(tmp_path: Path) -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    path = make_tokenizer_without_template(tmp_path / "plain")
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match="chat_template"):
        tok.apply_chat_template(msgs[1:], tokenize=False)

    make_tokenizer(tmp_path / "nosys", template="chatml_no_system")
    tok = AutoTokenizer.from_pretrained(tmp_path / "nosys")
    with pytest.raises(Exception, match="System role not supported"):
        tok.apply_chat_template(msgs, tokenize=False)
    assert tok.apply_chat_template(msgs[1:], tokenize=False) == "<|im_start|>user\nU<|im_end|>\n"

    make_tokenizer(tmp_path / "bos", add_bos=True)
    tok = AutoTokenizer.from_pretrained(tmp_path / "bos")
    text = tok.apply_chat_template(msgs[1:], tokenize=False, add_generation_prompt=True)
    assert text.startswith(tok.bos_token)
    ids = tok(text)["input_ids"]
    assert ids[:2] == [tok.bos_token_id, tok.bos_token_id], "encoding the rendered prompt doubles BOS"
    assert tok(text, add_special_tokens=False)["input_ids"][:2] == [tok.bos_token_id, 1]

    with pytest.raises(ValueError, match="unknown template"):
        make_tokenizer(template="llama")


def test_ensure_demo_assets(tmp_path: Path) -> None:
    from uft_ray.demo import ensure_demo_assets

    paths = ensure_demo_assets(tmp_path)
    assert Path(paths["samples"]) == tmp_path / "samples" and Path(paths["model"]) == tmp_path / "tiny-model"
    for key in ("ultrachat_200k_train", "helpsteer2_train", "helpsteer2_preference", "trl_scored"):
        assert glob.glob(paths[key]), key
    AutoTokenizer.from_pretrained(paths["model"])
    stamp = (tmp_path / "samples/uft_samples.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert ensure_demo_assets(tmp_path) == paths
    assert time.perf_counter() - t0 < 0.5
    assert (tmp_path / "samples/uft_samples.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples", "tiny-model"]


def test_concurrent_sample_setup(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from uft_ray import demo

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda _: demo._ensure_samples(tmp_path / "samples", 0), range(3)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"], "losers of the race clean up"
    assert (tmp_path / "samples/uft_samples.json").is_file()
    assert not (tmp_path / "samples/bad").exists()  # the demo writes no bad-row fixtures
