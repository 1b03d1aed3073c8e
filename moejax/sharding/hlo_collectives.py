"""Bytes moved by collectives, read from a compiled XLA module's HLO text.

Each collective instruction (all-gather, reduce-scatter, all-reduce, all-to-all,
collective-permute, and their async `-start` forms) is counted once per execution: an
instruction inside a `while` body counts `known_trip_count` times (XLA writes it into the
loop's backend_config for scans with static length; a loop without it counts once and is
reported in `unknown_trip_count_loops`). Computations reached through `call`, fusions,
async wrappers and conditional branches inherit their caller's count (every branch is
counted: an upper bound).

Byte conventions, per device and per execution of an op (shapes in the compiled module are
per-device shard shapes):
  bytes       the size of the op's larger buffer: the gathered result of an all-gather,
              the unreduced operand of a reduce-scatter, the operand of an all-reduce,
              all-to-all or collective-permute. This is the data volume the op is "about".
  wire_bytes  what one device sends under the usual ring / pairwise algorithms, with n the
              size of its replica group: all-gather and reduce-scatter (n-1)/n * bytes,
              all-reduce 2(n-1)/n * bytes, all-to-all (n-1)/n * bytes, collective-permute
              bytes.
  ragged-all-to-all (expert-parallel token exchange on GPU/TPU, `ep_exchange=ragged`) moves
              only the rows its runtime `send_sizes` name, which the HLO does not know; its
              `bytes` is the STATIC BOUND: the size of its output buffer (what one device
              could receive, the same size as what it could send), and `wire_bytes`
              (n-1)/n of that. `bound_kinds` in the result lists the kinds counted this way.
"""

from __future__ import annotations

import math
import re

KINDS = (
    "all-gather",
    "reduce-scatter",
    "all-reduce",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
)
BOUND_KINDS = ("ragged-all-to-all",)  # bytes are a static upper bound (module docstring)
DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "s32": 4,
    "u32": 4,
    "s64": 8,
    "u64": 8,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "bf16": 2,
    "f16": 2,
    "f32": 4,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}

_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CALLEES = re.compile(
    r"\b(body|calls|branch_computations|true_computation|"
    r"false_computation)=\{?([%\w.\-,\s]+)\}?"
)
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[([\d,]+)\]<=")
# XLA's mesh-axes form: replica_groups=mesh['axis_0'=2,'axis_1'=4][, device_ids=(..)] {'axis_0'}
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\([^)]*\))? \{([^}]*)\}")
_OPERAND = re.compile(r"%([\w.\-]+)")
_PAIRS = re.compile(r"source_target_pairs=")


def shape_bytes(text: str) -> float:
    """Bytes of every array shape in `text` (a shape, or a tuple of shapes)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(text):
        if dtype not in DTYPE_BYTES:
            continue
        total += DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _split_computations(hlo: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines; the entry computation is 'ENTRY'."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and not line[:1].isspace() and not line.startswith("HloModule"):
                current = "ENTRY" if m.group(1) else m.group(2)
                comps[current] = []
            continue
        if line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    return comps


def _group_size(attrs: str) -> int:
    m = _GROUPS_MESH.search(attrs)
    if m:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    m = _GROUPS_IOTA.search(attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = _GROUPS_LIST.search(attrs)
    if m:
        return len([d for d in m.group(1).split(",") if d])
    return 2 if _PAIRS.search(attrs) else 1


def _operands(rest: str) -> str:
    """The operand list of `op(...)`, up to its closing parenthesis."""
    depth = 1
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return rest[:i]
    return rest


def _multipliers(comps: dict[str, list[str]]) -> tuple[dict[str, float], int]:
    """How many times each computation runs per execution of the entry."""
    unknown = 0
    mult = {name: 0.0 for name in comps}
    mult["ENTRY"] = 1.0

    def visit(name: str, times: float) -> None:
        nonlocal unknown
        for line in comps.get(name, ()):
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            op = m.group(4)
            trip = 1.0
            if op == "while":
                t = _TRIP.search(line)
                if t:
                    trip = float(t.group(1))
                else:
                    unknown += 1
            for key, callees in _CALLEES.findall(line):
                for callee in (c.strip().lstrip("%") for c in callees.split(",")):
                    if callee in comps:
                        n = times * (trip if key == "body" else 1.0)
                        mult[callee] += n
                        visit(callee, n)

    visit("ENTRY", 1.0)
    return mult, unknown


def collective_bytes(hlo: str) -> dict:
    """Per-device bytes, wire bytes and op counts by collective kind (see module doc)."""
    comps = _split_computations(hlo)
    mult, unknown = _multipliers(comps)
    shapes = {}  # instruction name -> its result shape text (operands print names only)
    for lines in comps.values():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if m:
                shapes[m.group(2)] = m.group(3)
    out = {k: {"count": 0.0, "bytes": 0.0, "wire_bytes": 0.0} for k in KINDS}
    for name, lines in comps.items():
        if not mult.get(name):
            continue
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            op = m.group(4)
            kind = op[: -len("-start")] if op.endswith("-start") else op
            if kind not in KINDS:
                continue
            result, rest = m.group(3), m.group(5)
            operands = _operands(rest)
            operand_bytes = shape_bytes(operands) or sum(
                shape_bytes(shapes.get(name, "")) for name in _OPERAND.findall(operands)
            )
            result_bytes = shape_bytes(result)
            if kind == "ragged-all-to-all":  # operands: input, output buffer, offsets, sizes
                size = result_bytes
            elif op.endswith("-start"):  # async results are tuples (operands, results, ...)
                gathered = result_bytes - operand_bytes
                size = gathered if kind in ("all-gather", "collective-permute") else operand_bytes
                size = max(size, operand_bytes)
            else:
                size = max(operand_bytes, result_bytes)
            n = _group_size(rest)
            factor = {"all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}.get(
                kind, (n - 1) / n
            )
            times = mult[name]
            out[kind]["count"] += times
            out[kind]["bytes"] += times * size
            out[kind]["wire_bytes"] += times * size * factor
    for v in out.values():
        for key in v:
            v[key] = int(round(v[key]))
    out["unknown_trip_count_loops"] = unknown
    out["bound_kinds"] = list(BOUND_KINDS)
    return out
