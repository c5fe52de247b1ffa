"""Tokenization (no Ray): response mask, EOS once, BOS never doubled, templates without a system role, length
policies, pairs, and the errors that name their fix. Uses the tiny model's tokenizer and its variants."""

from __future__ import annotations

from pathlib import Path

import pytest

from uft_ray.config import ModelConfig, TokenizeConfig
from uft_ray.data import quarantine as q
from uft_ray.data.normalize import unified_row
from uft_ray.data.quarantine import Reject
from uft_ray.data.tokenize import ChatEncoder, TokenizerError, load_tokenizer, merge_system
from uft_ray.demo.tiny_model import make_tokenizer

LONG = TokenizeConfig(max_prompt_len=1024, max_len=2048)


@pytest.fixture(scope="module")
def tok(tiny_assets: dict):
    return load_tokenizer(ModelConfig(path=tiny_assets["model"]))


@pytest.fixture(scope="module")
def bos_tok(tmp_path_factory: pytest.TempPathFactory):
    # prepends <|startoftext|> on encode AND writes bos_token in its template: naive encoding doubles it
    return make_tokenizer(tmp_path_factory.mktemp("bos"), add_bos=True)


@pytest.fixture(scope="module")
def no_system_tok(tmp_path_factory: pytest.TempPathFactory):
    return make_tokenizer(tmp_path_factory.mktemp("nosys"), template="chatml_no_system")


def row(prompt: str | list, response: str, rejected: str | None = None, system: str | None = None) -> dict:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if system is not None:
        msgs = [{"role": "system", "content": system}, *msgs]
    kind = "pair" if rejected is not None else "sft"
    return unified_row("rid", "src", kind, msgs, response, rejected=rejected)


def test_response_tokens_decode_to_response_plus_eos(tok) -> None:
    r = row("How do I build a garden near the river?", "First, plan the garden carefully.\n\n1. Dig.")
    out = ChatEncoder(tok, LONG).encode(r)
    ids, start = out["input_ids"], out["response_start"]
    assert tok.decode(ids[start:]) == r["response"] + tok.eos_token
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1 + ids[:start].count(tok.eos_token_id)
    rendered = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
    assert ids[:start] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")
    assert out["length"] == len(ids) and out["rejected_input_ids"] is None


def test_eos_appended_exactly_once(tok) -> None:
    enc = ChatEncoder(tok, LONG)
    plain = enc.encode(row("q", "An answer."))
    already = enc.encode(row("q", "An answer." + tok.eos_token))
    assert already["input_ids"] == plain["input_ids"]
    assert already["input_ids"][-2] != tok.eos_token_id


def test_bos_is_never_doubled(bos_tok) -> None:
    bos = bos_tok.bos_token_id
    rendered = bos_tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert bos_tok(rendered)["input_ids"][:2] == [bos, bos]  # the trap: template BOS + tokenizer BOS
    out = ChatEncoder(bos_tok, LONG).encode(row("hi", "hello"))
    assert out["input_ids"][0] == bos and out["input_ids"].count(bos) == 1
    assert bos_tok.decode(out["input_ids"][out["response_start"] :]) == "hello" + bos_tok.eos_token


def test_template_without_system_role_merges_the_system_text(no_system_tok) -> None:
    enc = ChatEncoder(no_system_tok, LONG)
    assert not enc.system_ok
    out = enc.encode(row("What is a river?", "Water.", system="Answer briefly."))
    prompt = no_system_tok.decode(out["input_ids"][: out["response_start"]])
    assert prompt == "<|im_start|>user\nAnswer briefly.\n\nWhat is a river?<|im_end|>\n<|im_start|>assistant\n"
    assert merge_system([{"role": "user", "content": "q"}]) == [{"role": "user", "content": "q"}]


def test_system_role_kept_where_supported(tok) -> None:
    enc = ChatEncoder(tok, LONG)
    assert enc.system_ok
    out = enc.encode(row("q", "a", system="Be brief."))
    assert tok.decode(out["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_pairs_share_the_prompt_tokens(tok) -> None:
    out = ChatEncoder(tok, LONG).encode(row("Which is better?", "The first one is better.", rejected="No."))
    s = out["response_start"]
    assert out["rejected_response_start"] == s
    assert out["rejected_input_ids"][:s] == out["input_ids"][:s]
    assert tok.decode(out["rejected_input_ids"][s:]) == "No." + tok.eos_token
    assert out["rejected_length"] == len(out["rejected_input_ids"])


def test_drop_policy_rejects_over_long_rows(tok) -> None:
    cfg = TokenizeConfig(max_prompt_len=16, max_len=40, overflow="drop")
    enc = ChatEncoder(tok, cfg)
    words = " ".join(["garden"] * 30)
    for r in (row(words, "ok"), row("short question", words), row("q", "fine", rejected=words)):
        with pytest.raises(Reject) as e:
            enc.encode(r)
        assert e.value.reason == q.TOO_LONG and "max_len 40" in e.value.detail
    ok = enc.encode(row("short question", "short answer"))
    assert ok["length"] <= 40


def test_truncate_prompt_left_keeps_the_end_of_the_prompt(tok, bos_tok) -> None:
    cfg = TokenizeConfig(max_prompt_len=16, max_len=40, overflow="truncate_prompt_left")
    words = " ".join(f"w{i}" for i in range(60))
    out = ChatEncoder(tok, cfg).encode(row(words, "short answer"))
    s = out["response_start"]
    assert s == 16 and out["length"] <= 40
    assert tok.decode(out["input_ids"][:s]).endswith("<|im_start|>assistant\n")  # the generation prompt survives
    assert tok.decode(out["input_ids"][s:]) == "short answer" + tok.eos_token
    # the budget shrinks for a long response
    resp = " ".join(["garden"] * 30)
    out = ChatEncoder(tok, cfg).encode(row(words, resp))
    assert out["length"] <= 40 and tok.decode(out["input_ids"][out["response_start"] :]) == resp + tok.eos_token
    # a response that alone exceeds max_len is still dropped
    with pytest.raises(Reject, match="the response alone"):
        ChatEncoder(tok, cfg).encode(row("q", " ".join(["garden"] * 80)))
    # a leading BOS survives truncation
    b = ChatEncoder(bos_tok, cfg).encode(row(words, "short answer"))
    assert b["input_ids"][0] == bos_tok.bos_token_id and b["input_ids"].count(bos_tok.bos_token_id) == 1


def test_batch_mixes_kept_and_rejected_rows_in_order(tok) -> None:
    enc = ChatEncoder(tok, TokenizeConfig(max_prompt_len=16, max_len=40))
    rows = [row("a", "b"), row(" ".join(["garden"] * 50), "x"), row("c", "d", rejected="e")]
    out = enc.encode_batch(rows)
    assert isinstance(out[1], Reject)
    assert out[0]["response"] == "b" and out[2]["rejected"] == "e" and out[2]["rejected_input_ids"]


def test_no_chat_template_is_an_error_that_names_the_fix(tmp_path: Path) -> None:
    make_tokenizer(tmp_path, template=None)
    with pytest.raises(TokenizerError) as e:
        load_tokenizer(ModelConfig(path=str(tmp_path)))
    msg = str(e.value)
    assert "has no chat_template" in msg and "model.path" in msg and "tok.chat_template = " in msg
    assert str(tmp_path) in msg


def test_trust_remote_code_comes_from_config_only(monkeypatch: pytest.MonkeyPatch, tiny_assets: dict) -> None:
    import transformers

    seen = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(path, **kw):
        seen.append(kw.get("trust_remote_code"))
        return real(path, **kw)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    load_tokenizer(ModelConfig(path=tiny_assets["model"]))
    load_tokenizer(ModelConfig(path=tiny_assets["model"], trust_remote_code=True))
    assert seen == [False, True]


def test_unloadable_tokenizer_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="cannot load the tokenizer of model.path="):
        load_tokenizer(ModelConfig(path=str(tmp_path / "nothing-here")))
