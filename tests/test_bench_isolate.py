"""bench_gpu --isolate (benchmarks/bench_gpu.py): one process per section, the time budget shared
by weight, a section whose process dies (a segfault, as one did in a compile on the H200) keeps its
partial records and gets an error record, and the runs are merged."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = mod  # dataclasses look their module up while the class is built
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return mod


def test_without_drops_options_and_their_values():
    b = _bench()
    argv = [
        "--quick",
        "--sections",
        "vqa",
        "decode",
        "--out",
        "x.json",
        "--isolate",
        "--time-budget",
        "30",
        "--ssm",
        "mamba1",
    ]
    assert b._without(argv, {"--isolate": 0, "--sections": -1, "--out": 1, "--time-budget": 1}) == [
        "--quick", "--ssm", "mamba1",
    ]  # fmt: skip


def test_a_crashed_section_is_recorded_and_the_rest_merged(tmp_path, monkeypatch):
    b = _bench()
    calls = []
    template = {
        "benchmark": "bench_gpu", "date": "d", "wall_s": 1.0, "environment": {"device_name": "cpu", "torch": "t", "mamba_ssm": None, "dtype": "fp32"},
        "plan": {}, "conventions": {}, "info": {},
    }  # fmt: skip

    def fake_run(cmd, env=None):
        section = cmd[cmd.index("--sections") + 1]
        out = Path(cmd[cmd.index("--out") + 1])
        calls.append((section, float(cmd[cmd.index("--time-budget") + 1])))
        if section == "vqa":  # a clean run
            rec = {
                "section": "vqa",
                "case": "c",
                "model": "ours",
                "variant": "image_state_cache",
                "questions_per_s": 1.0,
            }
            out.write_text(json.dumps({**template, "command": "c", "complete": True, "records": [rec]}))
            return subprocess.CompletedProcess(cmd, 0)
        # decode: one record written, then the process dies of SIGSEGV
        rec = {"section": "decode", "case": "b=1", "model": "ours", "ssm": "mamba1", "skipped": "time budget"}
        out.write_text(json.dumps({**template, "command": "c", "complete": False, "records": [rec]}))
        return subprocess.CompletedProcess(cmd, -11)

    monkeypatch.setattr(b.subprocess, "run", fake_run)
    monkeypatch.setenv("OUT", "")
    args = b.parse_args(
        [
            "--sections",
            "vqa",
            "decode",
            "--isolate",
            "--time-budget",
            "100",
            "--out",
            str(tmp_path / "r.json"),
        ]
    )
    rc = b.isolated(
        args, ["--sections", "vqa", "decode", "--isolate", "--time-budget", "100", "--out", "r.json"]
    )
    assert rc == 1
    w = b.SECTION_WEIGHT
    assert calls[0][0] == "vqa" and abs(calls[0][1] - 100 * w["vqa"] / (w["vqa"] + w["decode"])) <= 1
    result = json.loads((tmp_path / "r.json").read_text())
    sections = [r["section"] for r in result["records"]]
    assert sections.count("vqa") == 1 and sections.count("decode") == 2
    err = [r for r in result["records"] if "error" in r]
    assert len(err) == 1 and "signal 11" in err[0]["error"] and err[0]["section"] == "decode"


def _run_file(path: Path, records: list[dict], command: str = "bench_gpu.py", date: str = "d") -> Path:
    env = {"device_name": "x", "torch": "t", "mamba_ssm": "m", "dtype": "bf16"}
    run = {"command": command, "date": date, "wall_s": 1.0, "complete": True, "environment": env,
           "plan": {}, "conventions": {}, "info": {}, "records": records}  # fmt: skip
    path.write_text(json.dumps(run))
    return path


def test_merged_summary_pairs_records_of_one_run(tmp_path):
    """A run measuring ours and the reference (2x), then a run measuring ours alone (300 q/s): the
    merged summary keeps run 0's pair (2x), not ours of run 1 over the reference of run 0 (6x); a
    file already merged (--isolate's output) is taken as one run."""
    b = _bench()

    def vqa(variant, qps):
        return {"section": "vqa", "case": "c", "model": "ours", "variant": variant, "questions_per_s": qps}

    first = _run_file(tmp_path / "a.json", [vqa("image_state_cache", 100.0), vqa("recompute", 50.0)])
    second = _run_file(tmp_path / "b.json", [vqa("image_state_cache", 300.0)])
    inner = tmp_path / "inner.json"
    assert b.merge([second], inner) == 0  # a merged file of one run, as --isolate writes
    out = tmp_path / "merged.json"
    assert b.merge([first, inner], out) == 0
    data = json.loads(out.read_text())
    rows = [r for r in data["summary"]["rows"] if r["topic"] == "VQA: image-state cache vs recompute"]
    assert [(r["ratio"], r["run"]) for r in rows] == [(2.0, 0)]
    assert [m["file"] for m in data["merged_from"]] == ["a.json", "inner.json"]
    assert data["merged_from"][1]["command"] == "bench_gpu.py"
    # the plots' view still takes each measurement's latest run
    latest = b.latest_records(data["records"])
    assert {r["variant"]: r["questions_per_s"] for r in latest} == {
        "image_state_cache": 300.0,
        "recompute": 50.0,
    }


def test_merge_takes_runs_in_date_order(tmp_path):
    """`--merge results/*_run_*.json` lists files by name, not by date: the runs are ordered by their
    dates, so the latest run's record is the one measured last."""
    b = _bench()

    def vqa(qps):
        return {
            "section": "vqa",
            "case": "c",
            "model": "ours",
            "variant": "image_state_cache",
            "questions_per_s": qps,
        }

    new = _run_file(tmp_path / "a_new.json", [vqa(300.0)], date="2026-12-03T10:00:00")
    old = _run_file(tmp_path / "b_old.json", [vqa(100.0)], date="2026-12-01T10:00:00")
    out = tmp_path / "merged.json"
    assert b.merge([new, old], out) == 0
    data = json.loads(out.read_text())
    assert [m["file"] for m in data["merged_from"]] == ["b_old.json", "a_new.json"]
    assert [r["questions_per_s"] for r in b.latest_records(data["records"])] == [300.0]
