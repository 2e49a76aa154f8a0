"""bench_gpu --quick (benchmarks/bench_gpu.py): the CPU smoke run of every section the GPU suite
measures, so a change that breaks a benchmark path shows before it costs a GPU call."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_of_every_section_writes_records_and_no_errors(tmp_path):
    out = tmp_path / "quick.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench_gpu.py"),
        "--quick",
        "--decode-sampling",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    records = data["records"]
    errors = [r for r in records if r.get("error")]
    assert not errors, errors[:3]
    measured = {r["section"] for r in records if not r.get("skipped")}
    for section in ("lm_vs_stock", "arch", "lengths", "decode", "prefill_state", "vision", "vqa"):
        assert section in measured, (section, sorted(measured))
    sampled = [r for r in records if r.get("model") == "ours_sample" and "itl_ms" in r]
    assert sampled and all(r["itl_ms"] > 0 for r in sampled)
    assert data["summary"], "no headline rows"
