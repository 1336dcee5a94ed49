"""Machine description, markdown table and PNG chart of the overhead benchmark."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

try:
    from . import goals
except ImportError:  # run as a script from this directory
    import goals  # type: ignore[no-redef]

ENGINE_NAMES = {"kernel": "kernel", "intarget": "ubpf-py in-target", "jit": "ubpf-py ptrace JIT",
                "interp": "ubpf-py interp"}
SHORT_NAMES = {"kernel": "kernel", "intarget": "in-target", "jit": "ptrace JIT", "interp": "interp"}
ENGINE_ORDER = ["kernel", "intarget", "jit", "interp"]
COLORS = {"kernel": "#4c72b0", "intarget": "#c44e52", "jit": "#dd8452", "interp": "#55a868"}
PLACEMENTS = {"same": "tracer+target same CPU", "diff": "tracer, target on different CPUs"}


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    vuln = {}
    vdir = Path("/sys/devices/system/cpu/vulnerabilities")
    if vdir.is_dir():
        for f in ("spectre_v2", "meltdown", "retbleed"):
            try:
                vuln[f] = (vdir / f).read_text().strip()
            except OSError:
                pass
    return {
        "kernel": platform.release(), "uname": " ".join(platform.uname()), "cpu": cpu,
        "cpus_online": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_gb": round(mem_kb / 1024 / 1024, 1), "python": platform.python_version(),
        "gcc": _first_line(["gcc", "--version"]), "clang": _first_line(["clang", "--version"]),
        "virtualized": _first_line(["systemd-detect-virt"]) or "unknown",
        "load_avg": os.getloadavg(), "cpu_vulnerabilities": vuln,
    }


def _fmt(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "n/a"
    if cell["error"]:
        if cell["error"].startswith("skipped"):
            return "-"
        return "n/a" if cell["error"].startswith("not available") else "FAILED"
    return f"{cell['overhead_ns']:.0f}"


def _spread(cell: dict[str, Any] | None) -> str:
    """"min-max (CPU share)" of a cell's repetitions: how far apart its runs were, and whether
    the timed target got its CPU (a share well below 1: other work ran there meanwhile)."""
    if not cell or cell["error"] or cell.get("overhead_min") is None:
        return "n/a"
    text = f"{cell['overhead_min']:.0f}-{cell['overhead_max']:.0f}"
    return text + (f" ({cell['cpu_share']:.2f})" if cell.get("cpu_share") is not None else "")


def _ratio(a: dict[str, Any] | None, k: dict[str, Any] | None) -> str:
    if not a or not k or a["error"] or k["error"] or not k["overhead_ns"] or k["overhead_ns"] <= 0:
        return "n/a"
    r = a["overhead_ns"] / k["overhead_ns"]
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"  # two significant digits below 0.1


def _load_line(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    cells = [c for r in doc["rows"] for c in r["cells"]] + doc.get("threads", {}).get("cells", [])
    loads = sorted(c["load1"] for c in cells if c.get("load1") is not None)
    text = (f"Load average (1 min) {m['load_avg_start'][0]:.2f} at start, {m['load_avg'][0]:.2f} at end")
    if loads:
        text += (f"; at the start of each cell: min {loads[0]:.2f}, median {loads[len(loads) // 2]:.2f}, "
                 f"max {loads[-1]:.2f}")
    q = doc.get("quiet_wait")
    if q:
        text += (f". Before starting, waited {q['waited_s']:.0f} s for the load to fall to {q['max_load']:.2f} "
                 f"(it was {q['load_before']:.2f}, then {q['load_after']:.2f})")
    return text + (f" on {m['cpus_usable']} CPUs shared with other work: numbers above the machine's "
                   "quiet figures are the load's, not the probe's." if m["load_avg_start"][0] >= 1 else ".")


def _engines(doc: dict[str, Any]) -> list[str]:
    return [e for e in ENGINE_ORDER if e in doc.get("engines", ENGINE_ORDER)]


def _overhead_tables(doc: dict[str, Any]) -> list[str]:
    engines = _engines(doc)
    ratios = [e for e in ("intarget", "jit") if e in engines and "kernel" in engines]
    spread = ["intarget"] if "intarget" in engines else []
    head = (["function", "program", "probe", "baseline ns"] + [SHORT_NAMES[e] for e in engines]
            + [f"{SHORT_NAMES[e]} min-max (CPU share)" for e in spread]
            + [f"{SHORT_NAMES[e]}/kernel" for e in ratios])
    lines: list[str] = []
    for placement, title in PLACEMENTS.items():
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |",
                  "| --- | --- | --- |" + " ---: |" * (len(head) - 3)]
        for r in doc["rows"]:
            cells = {c["engine"]: c for c in r["cells"] if c["placement"] == placement}
            base = next((c["baseline_ns"] for c in cells.values() if c.get("baseline_ns") is not None), None)
            vals = [r["func"], r["program"], r["mode"], f"{base:.1f}" if base is not None else "n/a"]
            vals += [_fmt(cells.get(e)) for e in engines]
            vals += [_spread(cells.get(e)) for e in spread]
            vals += [_ratio(cells.get(e), cells.get("kernel")) for e in ratios]
            lines.append("| " + " | ".join(vals) + " |")
        lines.append("")
    return lines


def _threads_table(doc: dict[str, Any]) -> list[str]:
    th = doc.get("threads") or {}
    if not th.get("cells"):
        return []
    rows = th.get("rows") or {"threads": th["row"]}
    n_k = doc.get("n_threads", doc["n_kernel"])
    n_i = doc.get("n_threads_intarget", n_k)
    lines = ["## Threads calling the probed function together", "",
             f"Each thread calls the function N = {n_k} (kernel) / {n_i} (in-target) times; hits checked = "
             f"threads x N; median of {doc.get('repeat_threads', doc['repeat'])} rounds, each round running "
             "every thread count once. "
             "calls/s = all threads' probed calls / wall time; ns added = mean per-thread ns per call, "
             "probed - unprobed. Threads are not pinned; with more threads than CPUs a thread's time "
             "includes the time it waited for a CPU, so ns added grows with threads / CPUs and calls/s "
             "is the figure to compare. The per-CPU counter program (pcount) measures the probe: the "
             "threads write no common line. The shared counter program (count) adds one atomic "
             "increment of one shared word per call, which bounces that line between CPUs whoever runs "
             "the program. min-max = the lowest and highest in-target calls/s of the rounds; CPU share = "
             "the threads' CPU time / (wall time x min(threads, CPUs)), median of the rounds: below 1, "
             "other work (or the tracer) held a CPU the threads could have used. CPU ns added = the threads' "
             "CPU time per call, probed - unprobed (median): waiting for a CPU does not count there, "
             "contending for a cache line does, so it stays flat with threads when they share no "
             "written line. Unprobed calls/s = the same threads calling the function with no probe (the "
             "in-target cell's baseline runs, median): how far the machine itself lets the calling loop "
             "scale.", ""]

    def tput(c: dict[str, Any] | None) -> str:
        if not c or c["error"]:
            return _fmt(c)
        return f"{c['calls_per_s']:,.0f}" if c.get("calls_per_s") else "n/a"

    for placement, row in rows.items():
        k = goals.thread_series(doc, "kernel", placement)
        i = goals.thread_series(doc, "intarget", placement)
        if not k and not i:
            continue
        lines += [f"### {row['label']}", "",
                  "| threads | kernel calls/s | in-target calls/s | in-target min-max calls/s | in-target CPU share "
                  "| in-target/kernel calls/s | kernel ns added | in-target ns added | in-target CPU ns added "
                  "| unprobed calls/s |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for t in th["counts"]:
            kc, ic = k.get(t), i.get(t)
            ok = kc and ic and not kc["error"] and not ic["error"] and kc.get("calls_per_s")
            ratio = f"{ic['calls_per_s'] / kc['calls_per_s']:.2f}x" if ok else "n/a"  # type: ignore[index]
            base = ic.get("baseline_calls_per_s") if ic and not ic["error"] else None
            lines.append(f"| {t} | {tput(kc)} | {tput(ic)} | {_tput_spread(ic)} | {_share(ic)} | {ratio} "
                         f"| {_fmt(kc)} | {_fmt(ic)} | {_cpu_added(ic)} | {f'{base:,.0f}' if base else 'n/a'} |")
        lines.append("")
    return lines


def _tput_spread(c: dict[str, Any] | None) -> str:
    """Lowest-highest calls/s of a thread cell's rounds (from its (baseline, probed) ns samples)."""
    if not c or c["error"] or not c.get("tputs"):
        return "n/a"
    return f"{min(c['tputs']):,.0f}-{max(c['tputs']):,.0f}"


def _cpu_added(c: dict[str, Any] | None) -> str:
    return "n/a" if not c or c["error"] or c.get("cpu_overhead_ns") is None else f"{c['cpu_overhead_ns']:.0f}"


def _share(c: dict[str, Any] | None) -> str:
    return "n/a" if not c or c["error"] or c.get("cpu_share") is None else f"{c['cpu_share']:.2f}"


def _goals_table(doc: dict[str, Any]) -> list[str]:
    lines = ["## Goals (issue 10), in-target column", "",
             "Measured = in-target ns added per call, same CPU / different CPUs.", "",
             "| goal | where | measured | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {v.goal} | {v.where} | {v.measured} | {v.verdict} |" for v in goals.evaluate(doc)]
    return [*lines, ""]


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# uprobe overhead: kernel uprobes vs ubpf-py",
        "",
        f"Machine: {m['cpu']} ({m['cpus_usable']} usable CPUs, {m['mem_gb']} GB, virtualization: "
        f"{m['virtualized']}), kernel {m['kernel']}, Python {m['python']}.",
        _load_line(doc),
        "",
        f"N = {doc['n_kernel']} calls per kernel run, {doc.get('n_intarget', doc['n_kernel'])} per in-target "
        f"run, {doc['n_ubpf']} per ptrace JIT/interp run{' (quick mode)' if doc['quick'] else ''}; median of "
        f"{doc['repeat']} (in-target) / {doc.get('repeat_kernel', doc['repeat'])} (kernel) / "
        f"{doc.get('repeat_ubpf', 1)} (ptrace JIT, interp) baseline+probed "
        "pair(s) per cell, the repetitions interleaved: each round runs both CPU placements once. "
        "In-target min-max = the lowest and highest ns added of a cell's repetitions; CPU share = the "
        "probed run's CPU time / its wall time (median): below 1, other work ran on the target's CPU "
        f"while it was timed. Total time {doc['elapsed_s']} s.",
        "",
        "Cells: ns added per call of the probed function = probed run - unprobed baseline run "
        "just before it (same CPUs). 'both' = entry + return probe on the same call. "
        "in-target = `ubpf-run --engine jit --mode intarget` (the program runs inside the target, "
        "entered from a patched jump; every probe's JSON `attached` event was checked to say "
        "path `in-target`); ptrace JIT = `--engine jit --mode ptrace`, interp = `--engine interp "
        "--mode ptrace` (an int3 stop in the tracer per hit; path `ptrace` checked). "
        "Ratios = ubpf-py / kernel (below 1: ubpf-py adds less). Every run's hit count was "
        "checked equal to N from the `hits` map; FAILED cells say why below; '-' = not run "
        "(--quick runs the different-CPU placement for the first row only).",
        "",
    ]
    for key, why in doc.get("unavailable", {}).items():
        lines.append(f"- {ENGINE_NAMES.get(key, key)}: not available: {why}")
    if doc.get("unavailable"):
        lines.append("")
    lines += _goals_table(doc)
    lines += _overhead_tables(doc)
    lines += _threads_table(doc)
    all_cells = [(r["label"], c) for r in doc["rows"] for c in r["cells"]]
    thread_rows = doc.get("threads", {}).get("rows") or {"threads": doc.get("threads", {}).get("row", {})}
    all_cells += [(f"{thread_rows.get(c['placement'], {}).get('label', '')} x{c['threads']} threads", c)
                  for c in doc.get("threads", {}).get("cells", [])]
    errors = [(label, c) for label, c in all_cells
              if c["error"] and not c["error"].startswith(("not available", "skipped"))]
    if errors:
        lines += ["## Failed runs", ""]
        for label, c in errors:
            lines.append(f"- {label}, {SHORT_NAMES.get(c['engine'], c['engine'])}, {c['placement']}: "
                         f"{c['error']}" + (f" (command: `{c['command']}`)" if c.get("command") else ""))
        lines.append("")
    drops = [(label, c) for label, c in all_cells if c.get("ring_drops")]
    if drops:
        lines += ["Ring buffer records that could not be reserved (consumer slower than producer): " +
                  ", ".join(f"{lbl} {c['engine']}/{c['placement']}: {c['ring_drops']}" for lbl, c in drops), ""]
    return "\n".join(lines)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def chart(doc: dict[str, Any], path: Path) -> Path | None:
    """Grouped bars (log scale) of ns added per call, one panel per placement."""
    plt = _pyplot()
    if plt is None:
        return None
    rows = doc["rows"]
    engines = _engines(doc)
    fig, axes = plt.subplots(len(PLACEMENTS), 1, figsize=(max(9, len(rows) * 0.8), 8), sharex=True)
    width = 0.8 / max(1, len(engines))
    for ax, (placement, title) in zip(axes, PLACEMENTS.items(), strict=True):
        for e_i, engine in enumerate(engines):
            xs, ys = [], []
            for r_i, r in enumerate(rows):
                c = next((c for c in r["cells"] if c["placement"] == placement and c["engine"] == engine), None)
                if c and not c["error"] and c["overhead_ns"] and c["overhead_ns"] > 0:
                    xs.append(r_i + (e_i - (len(engines) - 1) / 2) * width)
                    ys.append(c["overhead_ns"])
            ax.bar(xs, ys, width, label=ENGINE_NAMES[engine], color=COLORS[engine])
        ax.set_yscale("log")
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top * 30)  # room for the legend above the tallest bar
        ax.set_ylabel("ns added per call")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8, ncol=len(engines))
    axes[-1].set_xticks(range(len(rows)))
    axes[-1].set_xticklabels([r["label"] for r in rows], rotation=60, ha="right", fontsize=8)
    m = doc["machine"]
    fig.suptitle(f"uprobe overhead, kernel {m['kernel']}, {m['cpu'][:50]}, load {m['load_avg_start'][0]:.1f}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def threads_chart(doc: dict[str, Any], path: Path) -> Path | None:
    """Total probed calls per second against the number of threads, kernel vs in-target."""
    plt = _pyplot()
    th = doc.get("threads") or {}
    if plt is None or not th.get("cells"):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = th.get("rows") or {"threads": th["row"]}
    for placement, row in rows.items():
        for engine in ("kernel", "intarget"):
            series = goals.thread_series(doc, engine, placement)
            pts = sorted((t, c["calls_per_s"]) for t, c in series.items()
                         if not c["error"] and c.get("calls_per_s"))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        label=f"{ENGINE_NAMES[engine]}, {row['program']}", color=COLORS[engine],
                        linestyle="-" if placement == "threads" else "--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(th["counts"])
    ax.set_xticklabels([str(t) for t in th["counts"]])
    ax.set_xlabel("threads calling the probed function")
    ax.set_ylabel("probed calls per second (all threads)")
    ax.set_title(f"uprobe f_push, {doc['machine']['cpus_usable']} CPUs", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
