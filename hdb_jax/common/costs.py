"""What one compiled step costs each device: memory, FLOPs and the bytes its collectives move.

A sharded program compiled ahead of time (``jax.jit(...).lower(...).compile()``) is the program
one device runs. Its ``memory_analysis()`` and ``cost_analysis()`` give the device's buffers and
arithmetic; the bytes sent between devices are read here from its optimised HLO text: every
``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all`` and ``collective-permute``,
with the size of its result and of its replica group. Wire bytes per device assume ring
algorithms (what NCCL and the TPU ICI collectives approach for large messages):

================== ==========================================
all-reduce          2 (g - 1) / g x result bytes
all-gather          (g - 1) / g x result bytes
reduce-scatter      (g - 1) x result bytes (the input is g x it)
all-to-all          (g - 1) / g x result bytes
collective-permute  result bytes
================== ==========================================

A collective inside a ``while`` body runs once per iteration: it is multiplied by the loop's
trip count where XLA recorded one (``known_trip_count``) and flagged otherwise. ``cost_analysis``
counts a loop body once, so FLOPs of loops (e.g. our chunked CPU attention) are undercounted:
``benchmarks/mesh_plan.py`` takes its FLOPs from a compile with loop-free attention (``xla``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<type>.+?)\s+(?P<op>"
    + "|".join(COLLECTIVES)
    + r")(?P<start>-start)?\("
)
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*\bbody=%?(?P<body>[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(?P<n>\d+)"')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program."""

    op: str  # one of COLLECTIVES
    result_bytes: int  # the result's bytes on one device
    group: int  # devices in its replica group
    runs: int  # times one step runs it (a loop's trip count, else 1)
    trip_unknown: bool  # inside a loop whose trip count XLA did not record (counted once)

    @property
    def wire_bytes(self) -> float:
        """Bytes one device sends for it per step (ring algorithms; see the module docstring)."""
        g, size = self.group, self.result_bytes
        per_run = {
            "all-reduce": 2 * (g - 1) / g * size,
            "all-gather": (g - 1) / g * size,
            "reduce-scatter": (g - 1) * size,
            "all-to-all": (g - 1) / g * size,
            "collective-permute": size,
        }[self.op]
        return per_run * self.runs


def shape_bytes(type_text: str) -> list[int]:
    """Bytes of each array shape in an HLO type (``f32[2,3]{1,0}`` or a tuple of them)."""
    return [
        _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        for dtype, dims in _SHAPE.findall(type_text)
    ]


def _group_size(line: str, devices: int) -> int:
    # Newer XLA: replica_groups=mesh['axis_0'=4,'axis_1'=2], device_ids=(...) {'axis_0'}: the
    # group spans the axes in braces.
    named = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
    if named:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", named.group(1))}
        return int(np.prod([sizes[a] for a in re.findall(r"'([^']+)'", named.group(2))]))
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,\s]*)\}", line)
    if listed and listed.group(1).strip():
        return len(listed.group(1).split(","))
    return devices  # empty groups: every device


def collectives(hlo_text: str, devices: int) -> list[Collective]:
    """Every collective of an optimised HLO module's text, one device's view of it.

    Args:
      hlo_text: ``compiled.as_text()``.
      devices: the program's device count (replica groups that list none mean all of them).
    """
    loops: dict[str, int | None] = {}  # while body -> its known trip count
    for line in hlo_text.splitlines():
        match = _WHILE.search(line)
        if match:
            trip = _TRIP.search(line)
            loops[match.group("body")] = int(trip.group("n")) if trip else None
    found, computation = [], ""
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            computation = header.group("name")
            continue
        match = _OP.match(line)
        if not match:
            continue
        sizes = shape_bytes(match.group("type"))
        # An async start's result holds its operands too: the gathered/permuted output is the largest.
        size = max(sizes) if match.group("start") and match.group("op") != "all-reduce" else sum(sizes)
        in_loop = computation in loops
        trip = loops.get(computation)
        found.append(
            Collective(
                op=match.group("op"),
                result_bytes=size,
                group=_group_size(line, devices),
                runs=trip or 1,
                trip_unknown=in_loop and trip is None,
            )
        )
    return found


def _first(analysis: Any) -> dict:
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else {}
    return dict(analysis or {})


def program_costs(compiled, devices: int) -> dict:
    """Per-device memory (bytes), FLOPs and collective traffic of a compiled program.

    Returns:
      ``{"memory": {"argument", "output", "alias", "temp", "peak"}, "flops", "bytes_accessed",
      "collectives": {op: {"count", "result_bytes", "wire_bytes"}}, "wire_bytes",
      "collectives_in_unknown_loops"}``; ``peak`` = argument + output - alias + temp (the
      buffers live at once at worst).
    """
    memory = compiled.memory_analysis()
    mem = {
        "argument": int(memory.argument_size_in_bytes),
        "output": int(memory.output_size_in_bytes),
        "alias": int(memory.alias_size_in_bytes),
        "temp": int(memory.temp_size_in_bytes),
    }
    mem["peak"] = mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    cost = _first(compiled.cost_analysis())
    found = collectives(compiled.as_text(), devices)
    by_op: dict[str, dict] = {}
    for c in found:
        entry = by_op.setdefault(c.op, {"count": 0, "result_bytes": 0, "wire_bytes": 0.0})
        entry["count"] += c.runs
        entry["result_bytes"] += c.result_bytes * c.runs
        entry["wire_bytes"] += c.wire_bytes
    return {
        "memory": mem,
        "flops": float(cost.get("flops", 0.0)),
        "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "collectives": by_op,
        "wire_bytes": float(sum(c.wire_bytes for c in found)),
        "collectives_in_unknown_loops": sum(c.trip_unknown for c in found),
    }
