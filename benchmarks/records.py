"""Records of the GPU suite's JSON (``bench_gpu.py``), shared by the suite and ``plot_gpu.py``
(plain Python: the plots need no torch)."""

from __future__ import annotations


def latest_records(records: list[dict]) -> list[dict]:
    """One record per measurement (section, case, model, variant, ssm, batch, length): in a merged
    file the latest run's, a measured one before a skipped one; the first occurrence's order kept."""
    keys = ("section", "case", "model", "variant", "ssm", "batch", "length")
    best: dict[tuple, dict] = {}
    for r in records:
        k = tuple(str(r.get(x)) for x in keys)
        cur = best.get(k)
        rank = ("skipped" not in r and "error" not in r, r.get("run", 0))
        if cur is None or rank >= ("skipped" not in cur and "error" not in cur, cur.get("run", 0)):
            best[k] = r
    return list(best.values())
