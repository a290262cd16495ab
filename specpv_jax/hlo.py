"""Copies, materialized slices and all-gathers inside the loops of a compiled program, read off its optimized
HLO text.

Decoding is bound by memory traffic, so a loop that copies a KV cache, or cuts a
layer's weights out of the stacked parameters into a new buffer, pays for it at
every step. XLA inserts such copies where it cannot update or read a buffer in
place (a buffer written inside a `lax.cond` branch, on JAX 0.10.2's XLA; a
loop carry swapped with another); they show only in the compiled program,
which differs by backend and XLA version. On a mesh, an all-gather in a loop
copies from the other devices at every step (a cache the partitioner split
one way and reads another). Tests check the decode loops with
`loop_copies`; `benchmarks/hlo_audit.py` reports them for a backend at real
model shapes.
"""

from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
RESULT = re.compile(r"= (\w+)\[([\d,]*)\]")
PASS_THROUGH = ("bitcast", "reshape", "copy", "convert")  # a CPU computes bf16 in f32: its slices come converted


@dataclasses.dataclass(frozen=True)
class Finding:
    """kind: "copy" (a standalone copy), "slice" (a slice, or a fusion whose result is one, bitcast or
    converted: a new buffer holding part of a larger one) or "all-gather" (its result); shape: as HLO prints
    it ("f32[8,1,2,1280,16]"); computation: the loop body, branch or called computation it runs in."""

    kind: str
    shape: str
    nbytes: int
    computation: str

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.shape.split("[")[1].rstrip("]").split(",") if d)


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """Computation name -> its instruction lines, and the entry computation's name."""
    comps, name, entry = {}, None, ""
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            name = (line.split()[1] if line.startswith("ENTRY") else line.split()[0]).lstrip("%")
            entry = name if line.startswith("ENTRY") else entry
            comps[name] = []
        elif name and line.startswith("  "):
            comps[name].append(line.strip())
    return comps, entry


def _root_op(lines: list[str]) -> str:
    """The op at a fusion body's root, looking through `PASS_THROUGH` ops."""
    by_name = {ln.split(" = ")[0].removeprefix("ROOT ").lstrip("%"): ln for ln in lines if " = " in ln}
    line = next((ln for ln in lines if ln.startswith("ROOT")), "")
    for _ in range(len(lines)):
        m = re.search(r"= \S+ ([\w\-]+)\((%?[\w.\-]+)", line)
        if not m:
            return ""
        op, operand = m.group(1), m.group(2).lstrip("%")
        if op not in PASS_THROUGH or operand not in by_name:
            return op
        line = by_name[operand]
    return ""


def loop_copies(hlo: str, min_bytes: int = 0) -> list[Finding]:
    """Copies, materialized slices and all-gathers of at least `min_bytes` outside the entry computation: in
    loop bodies, conditional branches and called computations (a fusion's body counts as the fusion).

    hlo: `jax.jit(f).lower(...).compile().as_text()`.
    """
    comps, entry = _computations(hlo)
    fusion_bodies = {c for lines in comps.values() for ln in lines for c in re.findall(r"calls=%?([\w.\-]+)", ln)}
    found = []
    for name, lines in comps.items():
        if name == entry or name in fusion_bodies:
            continue
        for ln in lines:
            m = RESULT.search(ln)
            if not m:
                continue
            nbytes = DTYPE_BYTES.get(m.group(1), 4) * math.prod(int(d) for d in m.group(2).split(",") if d)
            if nbytes < min_bytes:
                continue
            called = re.search(r" fusion\(.*calls=%?([\w.\-]+)", ln)
            if re.search(r" copy\(", ln):
                kind = "copy"
            elif re.search(r" (dynamic-slice|slice)\(", ln) or (
                    called and _root_op(comps.get(called.group(1), [])) in ("dynamic-slice", "slice")):
                kind = "slice"
            elif re.search(r" all-gather(-done)?\(", ln):
                kind = "all-gather"
            else:
                continue
            found.append(Finding(kind, f"{m.group(1)}[{m.group(2)}]", nbytes, name))
    return found
