"""The in-target path's goals (issue 10), checked against one run's numbers.

Goals are ns added per probed call by the in-target column, measured in the same run
as the kernel column; every goal row is judged on both CPU placements.  A goal is
"met" only when every cell it covers ran and passed; a failed cell makes it "missed"
with the failure named, and cells not run make it "not measured".
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

ENGINE = "intarget"
#: diff-CPU may exceed same-CPU by this much and still count as "no slower" (noise)
SAME_DIFF_SLACK = (1.10, 5.0)
#: throughput at T threads must reach this share of min(T, CPUs) x the 1-thread throughput
SCALING_SHARE = 0.8


@dataclass(frozen=True)
class NsGoal:
    what: str
    limit_ns: float
    rows: tuple[str, ...]


NS_GOALS = [
    NsGoal("count, uprobe, push/nop5/endbr64/RIP-relative first instruction", 50,
           ("f_push count uprobe", "f_nop5 count uprobe", "f_endbr count uprobe", "f_riprel count uprobe")),
    NsGoal("uretprobe (count)", 100,
           ("f_push count uretprobe", "f_nop5 count uretprobe", "f_endbr count uretprobe",
            "f_riprel count uretprobe")),
    NsGoal("hash", 80, ("f_push hash uprobe",)),
    NsGoal("ring", 150, ("f_push ring uprobe",)),
    NsGoal("read", 300, ("f_push read uprobe",)),
]


@dataclass
class Verdict:
    goal: str
    where: str
    measured: str
    verdict: str  # "met" | "missed" | "not measured"


def _cell(row: dict[str, Any], placement: str, engine: str = ENGINE) -> dict[str, Any] | None:
    return next((c for c in row["cells"] if c["placement"] == placement and c["engine"] == engine), None)


def _ran(c: dict[str, Any] | None) -> bool:
    return bool(c) and not (c["error"] or "").startswith(("not available", "skipped"))


def _ns(c: dict[str, Any] | None) -> str:
    if not _ran(c):
        return "-"
    assert c is not None
    return "FAILED" if c["error"] else f"{c['overhead_ns']:.0f}"


def _with_spread(c: dict[str, Any] | None) -> str:
    """"median [min-max]" ns added of a cell (just the median when it has one repetition)."""
    text = _ns(c)
    if c and not c["error"] and c.get("overhead_min") is not None and c["overhead_min"] != c["overhead_max"]:
        text += f" [{c['overhead_min']:.0f}-{c['overhead_max']:.0f}]"
    return text


def _ns_goal(goal: NsGoal, rows: dict[str, dict[str, Any]]) -> list[Verdict]:
    out = []
    for label in goal.rows:
        row = rows.get(label)
        cells = [_cell(row, p) for p in ("same", "diff")] if row else [None, None]
        ran = [c for c in cells if _ran(c)]
        measured = f"{_ns(cells[0])} / {_ns(cells[1])}"
        if not ran:
            verdict = "not measured"
        elif any(c["error"] for c in ran):
            verdict = "missed (failed run)"
        else:
            verdict = "met" if all(c["overhead_ns"] <= goal.limit_ns for c in ran) else "missed"
        out.append(Verdict(f"{goal.what} <= {goal.limit_ns:.0f} ns", label, measured, verdict))
    return out


def _same_vs_diff(doc: dict[str, Any]) -> Verdict:
    mult, add = SAME_DIFF_SLACK
    pairs = []
    for r in doc["rows"]:
        s, d = _cell(r, "same"), _cell(r, "diff")
        if _ran(s) and _ran(d) and not s["error"] and not d["error"]:
            pairs.append((r["label"], s["overhead_ns"], d["overhead_ns"]))
    goal = f"different CPUs no slower than same CPU (diff <= same x {mult:.2f} + {add:.0f} ns)"
    if not pairs:
        return Verdict(goal, "every row", "-", "not measured")
    slower = [(lbl, s, d) for lbl, s, d in pairs if d > s * mult + add]
    worst = max(pairs, key=lambda p: p[2] - p[1])
    row = next(r for r in doc["rows"] if r["label"] == worst[0])
    measured = (f"{len(pairs) - len(slower)} of {len(pairs)} rows; largest diff - same: "
                f"{worst[0]} ({_with_spread(_cell(row, 'same'))} / {_with_spread(_cell(row, 'diff'))})")
    return Verdict(goal, "every row with both placements", measured, "missed" if slower else "met")


def thread_series(doc: dict[str, Any], engine: str, placement: str = "threads") -> dict[int, dict[str, Any]]:
    """threads -> cell of one engine in one series of the multi-thread section ("threads": the
    per-CPU counter program; "threads-shared": the shared atomic counter)."""
    return {c["threads"]: c for c in doc.get("threads", {}).get("cells", [])
            if c["engine"] == engine and c.get("placement", "threads") == placement}


def speedup(c: dict[str, Any], one: dict[str, Any]) -> float:
    """T-thread calls/s over 1-thread calls/s: the median of the per-round ratios when both cells
    kept their rounds (a round runs every thread count back to back, so its ratio compares runs
    made under the same load), else the ratio of the medians."""
    a, b = c.get("tputs") or [], one.get("tputs") or []
    if a and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b, strict=True))
    return c["calls_per_s"] / one["calls_per_s"]


def _scaling_parts(series: dict[int, dict[str, Any]], cpus: int) -> tuple[list[str], str]:
    """("T: x" per thread count, verdict) of one series against its 1-thread throughput."""
    one = series.get(1)
    if not one or not _ran(one):
        return ["-"], "not measured"
    if one["error"] or not one.get("calls_per_s"):
        return ["1 thread FAILED"], "missed (failed run)"
    parts, verdict = [], "met"
    for t in sorted(series):
        c = series[t]
        if not _ran(c):
            continue
        if c["error"] or not c.get("calls_per_s"):
            parts.append(f"{t}: FAILED")
            verdict = "missed (failed run)"
            continue
        x = speedup(c, one)
        share = f" (CPU share {c['cpu_share']:.2f})" if c.get("cpu_share") is not None else ""
        parts.append(f"{t}: {x:.2f}x{share}")
        if x < SCALING_SHARE * min(t, cpus) and verdict == "met":
            verdict = "missed"
    return parts, verdict


def _baseline_scaling(series: dict[int, dict[str, Any]]) -> str:
    """"T: x" of the unprobed function's calls/s (each cell's baseline runs) against 1 thread: what
    the machine itself gives the calling loop, the ceiling of any probe's scaling."""
    one = series.get(1)
    if not one or not one.get("baseline_calls_per_s"):
        return ""
    return ", ".join(f"{t}: {c['baseline_calls_per_s'] / one['baseline_calls_per_s']:.2f}x"
                     for t, c in sorted(series.items()) if c.get("baseline_calls_per_s"))


def _scaling(doc: dict[str, Any]) -> Verdict:
    """Judged on the per-CPU counter program (the probe's own scaling); the shared-counter
    program's figures are shown beside it, not judged: its atomic bounces one line between the
    CPUs whatever runs the program (the kernel too, hidden there by its larger per-hit cost)."""
    cpus = int(doc["machine"].get("cpus_usable") or 1)
    goal = (f"throughput scales with threads (T threads >= {SCALING_SHARE:.1f} x min(T, {cpus} CPUs) "
            "x 1 thread)")
    rows = (doc.get("threads") or {}).get("rows") or {}
    label = (rows.get("threads") or (doc.get("threads") or {}).get("row") or {}).get("label", "threads")
    series = thread_series(doc, ENGINE)
    parts, verdict = _scaling_parts(series, cpus)
    measured = ", ".join(parts)
    base = _baseline_scaling(series)
    if base:
        measured += f" (the unprobed function in the same runs: {base})"
    shared = thread_series(doc, ENGINE, "threads-shared")
    if shared:
        sparts, _ = _scaling_parts(shared, cpus)
        measured += f" (shared atomic counter program, not judged: {', '.join(sparts)})"
    return Verdict(goal, f"{label}, in-target calls/s vs 1 thread", measured, verdict)


def evaluate(doc: dict[str, Any]) -> list[Verdict]:
    rows = {r["label"]: r for r in doc["rows"]}
    out: list[Verdict] = []
    for g in NS_GOALS:
        out += _ns_goal(g, rows)
    out.append(_same_vs_diff(doc))
    out.append(_scaling(doc))
    return out
