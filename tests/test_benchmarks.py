"""The GPU checks' scripts (benchmarks/gpu_checks.sh) in their CPU smoke modes: a GPU session is rare and short,
so a script that broke here would waste it."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import pathlib
import subprocess
import sys

import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_no_script_hides_a_module_it_may_need():
    """A script runs with benchmarks/ first on sys.path, so one named like an installed or standard module hides
    it: benchmarks/kernels.py hid Hugging Face's `kernels`, which `transformers` imports, and scale.py's
    `transformers` peer failed to load."""
    names = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    assert not sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem in names)


def test_scale_quick(tmp_path):
    run_script("scale.py", "--quick", "--no-hf", "--out", str(tmp_path / "scale.json"))
    rows = json.loads((tmp_path / "scale.json").read_text())["rows"]
    assert rows and all(r["ar_s"] > 0 and r["floor_s"] > 0 for r in rows)
    assert any(r.get("full_s", 0) > 0 and r.get("partial_s", 0) > 0 for r in rows)  # verifications timed
    assert any(r.get("offload_full_s", 0) > 0 for r in rows)  # and the offloaded full step


def test_offload_generate_quick(tmp_path):
    run_script("offload_generate.py", "--quick", "--out", str(tmp_path / "offload.json"))
    result = json.loads((tmp_path / "offload.json").read_text())
    assert [r["offload"] for r in result["rows"]] == [True, False] and not any("error" in r for r in result["rows"])
    assert result["same_tokens"]
    assert all(r["full_verifications"] > 0 and r["partial_verifications"] > 0 for r in result["rows"])


def test_kernels_quick(tmp_path):
    run_script("attention_kernels.py", "--quick", "--out", str(tmp_path / "kernels.json"))
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["copy_gbps"] > 0 and result["rows"]
    assert all(r["loop_s"] > 0 and r["xla_s"] > 0 and r["triton_s"] > 0 for r in result["rows"])


def test_hlo_audit(tmp_path):
    run_script("hlo_audit.py", "--modes", "specpv", "ar", "--out", str(tmp_path / "audit.json"))
    findings = json.loads((tmp_path / "audit.json").read_text())["findings"]
    assert sorted(findings) == ["ar", "specpv"]


def test_decode_profile_quick(tmp_path):
    run_script("decode_profile.py", "--quick", "--out", str(tmp_path / "profile.json"))
    result = json.loads((tmp_path / "profile.json").read_text())
    rows = result["rows"]
    assert [(r["variant"], r["layers"]) for r in rows] == [("default", 2), ("while_graphs", 2), ("unrolled", 2),
                                                           ("default", 1)]
    assert all(r["wall_s"] > 0 and r["floor_s"] > 0 for r in rows)
    assert all(r["busy_s"] is None for r in rows)  # a CPU trace has no device plane
    compiled = {r["variant"]: (r["loops"], r["instructions"]) for r in rows if r["layers"] == 2}
    assert compiled["default"] == compiled["while_graphs"], compiled  # the same program
    assert compiled["unrolled"][1] > compiled["default"][1], compiled  # each layer's code apart
    kinds = result["meta"]["while_graphs_options"]["xla_gpu_enable_command_buffer"].split(",")
    assert "WHILE" in kinds and "FUSION" in kinds, kinds  # XLA's defaults, plus loops


# Two streams of a GPU plane (a kernel on each overlapping, a memory copy) and a derived line that must not
# count, in the profiler's XSpace text format; times in picoseconds from each line's timestamp (ns).
GPU_TRACE = """
planes { name: "/host:CPU" lines { name: "python" events { metadata_id: 1 duration_ps: 99000000 } }
  event_metadata { key: 1 value { id: 1 name: "host work" } } }
planes { name: "/device:GPU:0"
  lines { name: "Stream #7(Kernel,MemcpyD2H)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 4000000 }
    events { metadata_id: 2 offset_ps: 10000000 duration_ps: 2000000 }
    events { metadata_id: 3 offset_ps: 20000000 duration_ps: 1000000 } }
  lines { name: "Stream #9(Kernel)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 3000000 duration_ps: 4000000 } }
  lines { name: "XLA Ops" timestamp_ns: 1000 events { metadata_id: 2 duration_ps: 50000000 } }
  event_metadata { key: 1 value { id: 1 name: "gemv" } }
  event_metadata { key: 2 value { id: 2 name: "fusion_3" } }
  event_metadata { key: 3 value { id: 3 name: "MemcpyD2H" } } }
"""


def test_decode_profile_calls_a_negative_remainder_noise(monkeypatch):
    """Per layer and "the rest" come from the slope between two layer counts: with a per-layer slope above the
    smaller run's whole step (noise on a shared CPU) the rest was printed as a negative time."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for name in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    decode_profile = importlib.import_module("decode_profile")
    row = dict(variant="default", context=64, attention="xla", loops=1, instructions=10, traced_wall_s=None,
               busy_s=None, kernel_s=None, launches=None, copies=0, floor_s=None, trace_lines=[], top=[])
    text = decode_profile.summarize(1e9, [{**row, "layers": 1, "wall_s": 3.69e-3},
                                          {**row, "layers": 2, "wall_s": 10.04e-3}])
    assert "per layer (default): wall 6.35, busy -, floor -" in text
    assert "the rest (default): wall noise, busy -, floor -" in text


def test_decode_profile_reads_kernels_off_a_gpu_trace(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    for name in ("XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE"):  # the scripts set them on import: undone after
        monkeypatch.setenv(name, os.environ.get(name, ""))
    decode_profile = importlib.import_module("decode_profile")
    run = tmp_path / "plugins" / "profile" / "run"
    run.mkdir(parents=True)
    (run / "host.xplane.pb").write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(GPU_TRACE))
    events, lines = decode_profile.device_events(tmp_path)
    assert lines == ["Stream #7(Kernel,MemcpyD2H)", "Stream #9(Kernel)", "XLA Ops"]
    assert sorted(events) == [("MemcpyD2H", 21000, 1000), ("fusion_3", 11000, 2000), ("gemv", 1000, 4000),
                              ("gemv", 4000, 4000)]
    assert [e[0] for e in events if decode_profile.is_copy(e[0])] == ["MemcpyD2H"]
    assert decode_profile.busy_ns(events) == 7000 + 2000 + 1000  # [1000, 8000), [11000, 13000), [21000, 22000)
