"""The GPU checks' scripts (benchmarks/gpu_checks.sh) in their CPU smoke modes: a GPU session is rare and short,
so a script that broke here would waste it."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_scale_quick(tmp_path):
    run_script("scale.py", "--quick", "--no-hf", "--out", str(tmp_path / "scale.json"))
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert rows and all(r["ar_s"] > 0 and r["floor_s"] > 0 for r in rows)
    assert any(r.get("full_s", 0) > 0 and r.get("partial_s", 0) > 0 for r in rows)  # verifications timed
    assert any(r.get("offload_full_s", 0) > 0 for r in rows)  # and the offloaded full step


def test_kernels_quick(tmp_path):
    run_script("kernels.py", "--quick", "--out", str(tmp_path / "kernels.json"))
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["copy_gbps"] > 0 and result["rows"]
    assert all(r["xla_s"] > 0 and r["triton_s"] > 0 for r in result["rows"])


def test_hlo_audit(tmp_path):
    run_script("hlo_audit.py", "--modes", "specpv", "ar", "--out", str(tmp_path / "audit.json"))
    findings = json.loads((tmp_path / "audit.json").read_text())["findings"]
    assert sorted(findings) == ["ar", "specpv"]
