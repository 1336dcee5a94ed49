"""Machine description, markdown table and PNG chart of the overhead benchmark."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ENGINE_NAMES = {"kernel": "kernel", "jit": "ubpf-py JIT", "interp": "ubpf-py interp"}
COLORS = {"kernel": "#4c72b0", "jit": "#dd8452", "interp": "#55a868"}
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


def _fmt(cell: dict[str, Any]) -> str:
    if cell["error"]:
        if cell["error"].startswith("skipped"):
            return "-"
        return "n/a" if cell["error"].startswith("not available") else "FAILED"
    return f"{cell['overhead_ns']:.0f}"


def _ratio(a: dict[str, Any] | None, k: dict[str, Any] | None) -> str:
    if not a or not k or a["error"] or k["error"] or not k["overhead_ns"] or k["overhead_ns"] <= 0:
        return "n/a"
    return f"{a['overhead_ns'] / k['overhead_ns']:.2f}x"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# uprobe overhead: kernel uprobes vs ubpf-py",
        "",
        f"Machine: {m['cpu']} ({m['cpus_usable']} usable CPUs, {m['mem_gb']} GB, virtualization: "
        f"{m['virtualized']}), kernel {m['kernel']}, Python {m['python']}; load average "
        f"{m['load_avg_start'][0]:.2f} at start, {m['load_avg'][0]:.2f} at end.",
        f"N = {doc['n_kernel']} calls per kernel run, {doc['n_ubpf']} per ubpf-py run"
        f"{' (quick mode)' if doc['quick'] else ''}; median of {doc['repeat']} (kernel) / "
        f"{doc.get('repeat_ubpf', 1)} (ubpf-py) baseline+probed pair(s) per cell; total time {doc['elapsed_s']} s.",
        "",
        "Cells: ns added per call of the probed function = probed run - unprobed baseline run "
        "just before it (same CPUs). 'both' = entry + return probe on the same call. "
        "Ratio = ubpf-py / kernel (above 1: ubpf-py is slower). Every run's hit count was "
        "checked equal to N from the `hits` map; FAILED cells say why below; '-' = not run "
        "(--quick runs the different-CPU placement for the first row only).",
        "",
    ]
    for key, why in doc.get("unavailable", {}).items():
        lines.append(f"- {ENGINE_NAMES.get(key, key)}: not available: {why}")
    if doc.get("unavailable"):
        lines.append("")
    for placement, title in PLACEMENTS.items():
        lines += [f"## {title}", "",
                  "| function | program | probe | baseline ns | kernel | JIT | interp | JIT/kernel | interp/kernel |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in doc["rows"]:
            cells = {c["engine"]: c for c in r["cells"] if c["placement"] == placement}
            k, j, i = cells.get("kernel"), cells.get("jit"), cells.get("interp")
            base = next((c["baseline_ns"] for c in cells.values() if c.get("baseline_ns") is not None), None)
            lines.append(
                f"| {r['func']} | {r['program']} | {r['mode']} | {base:.1f} |" if base is not None else
                f"| {r['func']} | {r['program']} | {r['mode']} | n/a |")
            lines[-1] += " " + " | ".join(_fmt(c) if c else "n/a" for c in (k, j, i)) + \
                f" | {_ratio(j, k)} | {_ratio(i, k)} |"
        lines.append("")
    errors = [(r["label"], c) for r in doc["rows"] for c in r["cells"]
              if c["error"] and not c["error"].startswith(("not available", "skipped"))]
    if errors:
        lines += ["## Failed runs", ""]
        lines += [f"- {label} {c['engine']} {c['placement']}: {c['error']}" for label, c in errors]
        lines.append("")
    drops = [(r["label"], c) for r in doc["rows"] for c in r["cells"] if c.get("ring_drops")]
    if drops:
        lines += ["Ring buffer records the kernel could not reserve (consumer slower than producer): " +
                  ", ".join(f"{lbl} {c['engine']}/{c['placement']}: {c['ring_drops']}" for lbl, c in drops), ""]
    return "\n".join(lines)


def chart(doc: dict[str, Any], path: Path) -> Path | None:
    """Grouped bars (log scale) of ns added per call, one panel per placement."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = doc["rows"]
    engines = ["kernel", "jit", "interp"]
    fig, axes = plt.subplots(len(PLACEMENTS), 1, figsize=(max(8, len(rows) * 0.7), 8), sharex=True)
    width = 0.27
    for ax, (placement, title) in zip(axes, PLACEMENTS.items(), strict=True):
        for e_i, engine in enumerate(engines):
            xs, ys = [], []
            for r_i, r in enumerate(rows):
                c = next((c for c in r["cells"] if c["placement"] == placement and c["engine"] == engine), None)
                if c and not c["error"] and c["overhead_ns"] and c["overhead_ns"] > 0:
                    xs.append(r_i + (e_i - 1) * width)
                    ys.append(c["overhead_ns"])
            ax.bar(xs, ys, width, label=ENGINE_NAMES[engine], color=COLORS[engine])
        ax.set_yscale("log")
        ax.set_ylabel("ns added per call")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xticks(range(len(rows)))
    axes[-1].set_xticklabels([r["label"] for r in rows], rotation=60, ha="right", fontsize=8)
    m = doc["machine"]
    fig.suptitle(f"uprobe overhead, kernel {m['kernel']}, {m['cpu'][:50]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
