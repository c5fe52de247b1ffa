"""The run report from a run directory's files alone: every plot present, numbers that match the metrics,
and nothing lost to a torn metrics line, a resumed run's repeated steps, or a run with no metrics yet.
"""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from uft_ray.config import load_config
from uft_ray.report import PLOTS, sources_in, write_report
from uft_ray.run_dir import read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SOURCES = ("ultrachat", "helpsteer2")


def _metrics(n: int) -> list[dict]:
    rows, cum = [], dict.fromkeys(SOURCES, 0)
    for step in range(1, n + 1):
        k = 5 if step % 2 else 3
        counts = {"ultrachat": k, "helpsteer2": 8 - k}
        for s, c in counts.items():
            cum[s] += c
        r = 0.01 * step
        m = {
            "step": step,
            "epoch": 0,
            "time": 100.0 + 2 * step,
            "loss": 0.2 - 0.001 * step,
            "tokens_per_s": 1000.0,
            "samples_per_s": 4.0,
            "padding_frac": 0.1,
            "data_wait_frac": 0.01,
            "step_time_s": 2.0,
            "lr": 1e-3,
            "grad_norm": 1.0,
        }
        for s in SOURCES:
            m |= {
                f"loss/{s}": (1 / (1 + math.exp(-r)) - 1) ** 2,
                f"reward/{s}": r,
                f"score_pred/{s}": 1 / (1 + math.exp(-r)),
                f"score_target/{s}": 1.0 if s == "ultrachat" else 0.6,
                f"kl/{s}": 0.001 * step,
                f"rows/{s}": counts[s],
                f"mixture/{s}/target": 0.5,
                f"mixture/{s}/step": counts[s] / 8,
                f"mixture/{s}/cumulative": cum[s] / sum(cum.values()),
            }
        rows.append(m)
    return rows


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "demo"
    (d / "prepared").mkdir(parents=True)
    (d / "quarantine").mkdir()
    (d / "adapter").mkdir()
    with open(d / "metrics.jsonl", "w") as f:
        for m in _metrics(30):
            f.write(json.dumps(m) + "\n")
    summary = {
        "sources": {s: {"rows_read": 100, "rows_out": 64, "quota": 64, "quarantined": 3} for s in SOURCES},
        "quarantine": {"roles_not_alternating": 2, "rating_out_of_range": 4},
        "rows_out": 128,
    }
    (d / "prepared/summary.json").write_text(json.dumps(summary))
    q = [("roles_not_alternating", "ultrachat")] * 2 + [("rating_out_of_range", "helpsteer2")] * 4
    pq.write_table(
        pa.table({"reason": [r for r, _ in q], "source": [s for _, s in q], "detail": [""] * 6, "raw": ["{}"] * 6}),
        d / "quarantine/part-0.parquet",
    )
    cfg = load_config(
        {
            "model": {"path": "/models/tiny"},
            "data": {
                "sources": [
                    {"name": "ultrachat", "format": "ultrachat_200k", "path": "/d/u"},
                    {"name": "helpsteer2", "format": "helpsteer2", "path": "/d/h"},
                ]
            },
            "mixture": {"counts": {"ultrachat": 64, "helpsteer2": 64}},
            "output": {"run_name": "demo"},
        },
        check_paths=False,
    )
    (d / "config.yaml").write_text(cfg.to_yaml())
    return d


def _images(html: str) -> dict[str, bytes]:
    return {
        alt: base64.b64decode(b64)
        for alt, b64 in re.findall(r"<img alt='(\w+)' src='data:image/png;base64,([^']+)'", html)
    }


def test_report_has_every_plot_embedded_and_on_disk(run_dir):
    path = write_report(run_dir)
    assert path == str(run_dir / "report.html")
    html = Path(path).read_text()
    images = _images(html)
    assert set(images) == set(PLOTS) == {"loss", "reward", "mixture", "throughput", "optimization", "quarantine"}
    for name, data in images.items():
        assert data.startswith(PNG_MAGIC), name
        assert (run_dir / "plots" / f"{name}.png").read_bytes() == data
        assert len(data) > 5000, f"{name} looks empty"


def test_report_header_has_config_and_final_numbers(run_dir):
    html = Path(write_report(run_dir)).read_text()
    assert "uft-ray run <code>demo</code>" in html
    assert "/models/tiny" in html and "uft, beta 0.01" in html
    assert "ultrachat: 64" in html and "helpsteer2: 64" in html
    assert "<th>steps</th><td>30</td>" in html
    # first step -> mean of the last 10% (steps 28-30: 0.172, 0.171, 0.170)
    assert "0.199 \u2192 0.171" in html
    assert "58.0 s" in html  # wall time from the first to the last step's `time`
    assert str(run_dir / "adapter") in html
    # the quarantine plot's table of per-source data counts
    assert "<th>rows read</th>" in html and "<th>quarantined</th>" in html


def test_report_survives_no_metrics(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    html = Path(write_report(d)).read_text()
    assert set(_images(html)) == set(PLOTS)
    assert "0 (no metrics.jsonl yet)" in html


def test_report_rejects_a_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nope")


def test_read_metrics_skips_torn_lines_and_keeps_the_last_record_of_a_step(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text(
        '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.9}\n'
        '{"step": 2, "loss": 0.8}\n'  # a resumed run re-logged step 2
        '\n{"step": 3, "loss": 0.7}\n{"step": 4, "lo'  # killed mid-write
    )
    rows = read_metrics(str(p))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["loss"] == 0.8


def test_sources_in_metric_keys():
    assert sources_in(_metrics(2)) == list(SOURCES)
    assert sources_in([{"step": 1, "loss": 1.0, "tokens_per_s": 3}]) == []


def test_html_escapes_names(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    (d / "config.yaml").write_text("output: {run_name: '<script>alert(1)</script>'}\n")
    html = Path(write_report(d)).read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html
