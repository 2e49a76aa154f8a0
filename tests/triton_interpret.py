"""Run a script of Triton kernel cases under the interpreter, on the CPU.

TRITON_INTERPRET=1 must be set before triton is first imported, so the cases run in a child
process that prints one JSON line of results (``_triton_*_cases.py``)."""

import json
import os
import subprocess
import sys
from pathlib import Path


def run_interpreted(cases: Path) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, str(cases)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
