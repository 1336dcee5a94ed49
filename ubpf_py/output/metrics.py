"""``--metrics HOST:PORT``: the maps as Prometheus metrics, the way ebpf_exporter serves them.

* a hash/array map of integers (per-CPU values summed) is a counter
  ``ubpf_<map>_total`` with one sample per key; the key, decoded through BTF,
  becomes labels (``key`` for a scalar, one label per field of a struct key);
* a histogram map (``output.hist``: by type, or ``--hist``) is a Prometheus
  histogram ``ubpf_<map>``: log2 slot ``i`` holds integers up to ``2**(i+1)-1``,
  which is its cumulative bucket's ``le``; ``_count`` is the number of
  observations; ``_sum`` is the sum of each slot's lower bound times its count
  (a histogram keeps no exact sum: this is the largest value the true sum is
  known to be at least);
* an integer global variable is a counter ``ubpf_<name>_total``.

Scrapes are answered from a snapshot that the tracing thread refreshes between
program runs (``refresh``, about every second), so a scrape never reads a map
while a program changes it.
"""

from __future__ import annotations

import re
import threading
from typing import Any

from ubpf_py.errors import UsageError
from ubpf_py.output.dump import NO_ENTRIES
from ubpf_py.output.hist import Histogram, map_histograms, slot_lower_bound, slot_upper_bound, slots_of

PREFIX = "ubpf_"


def _metric_name(name: str) -> str:
    clean = re.sub(r"[^a-zA-Z0-9_]", "_", name).strip("_") or "map"
    return PREFIX + clean


def _label_name(name: str) -> str:
    clean = re.sub(r"[^a-zA-Z0-9_]", "_", str(name))
    return clean if clean and not clean[0].isdigit() and not clean.startswith("__") else f"f_{clean}"


def key_labels(key: Any, prefix: str = "") -> dict[str, str]:
    """A decoded key as labels: ``key`` for a scalar, one label per struct field (nested: a_b)."""
    if isinstance(key, dict):
        out: dict[str, str] = {}
        for k, v in key.items():
            out.update(key_labels(v, f"{prefix}{k}_" if isinstance(v, dict) else f"{prefix}{k}"))
        return {_label_name(k): v for k, v in out.items()}
    if isinstance(key, list):
        return {_label_name(prefix or "key"): ",".join(str(x) for x in key)}
    return {_label_name(prefix or "key"): str(key)}


def histogram_buckets(h: Histogram) -> tuple[list[tuple[str, float]], float]:
    """Cumulative ``(le, count)`` buckets ending with ``+Inf``, and the ``_sum`` (``le`` spelt as
    prometheus_client spells its own buckets: ``7.0``)."""
    from prometheus_client.utils import floatToGoString

    buckets = []
    total = 0
    sum_value = 0
    for i, c in enumerate(h.slots):
        total += c
        sum_value += c * slot_lower_bound(i, h.kind)
        buckets.append((floatToGoString(slot_upper_bound(i, h.kind)), float(total)))
    buckets.append(("+Inf", float(total)))
    return buckets, float(sum_value)


def families(obj: Any, hist_modes: dict[str, str] | None = None) -> list[Any]:
    """Metric families for the object's maps and integer globals, read now."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    modes = hist_modes or {}
    out: list[Any] = []
    for view in obj.maps.values():
        if view.spec.internal or view.type in NO_ENTRIES:
            continue
        d = view.dump()
        if not d.entries:
            continue
        hists = map_histograms(d, obj.decoder, modes.get(view.name))
        if hists is not None:
            labelled = [(key_labels(h.key_value) if h.key_value is not None else {}, h) for h in hists]
            names = sorted({n for lab, _ in labelled for n in lab})
            fam = HistogramMetricFamily(_metric_name(view.name), f"histogram map {view.name}", labels=names)
            for lab, h in labelled:
                buckets, s = histogram_buckets(h)
                fam.add_metric([lab.get(n, "") for n in names], buckets, s)
            out.append(fam)
            continue
        if view.spec.value_size not in (1, 2, 4, 8):
            continue
        rows = []
        for k, v in d.entries:
            vals = v if isinstance(v, list) else [v]
            rows.append((key_labels(view.decode_key(k)),
                         sum(int.from_bytes(x[:view.spec.value_size], "little") for x in vals)))
        names = sorted({n for lab, _ in rows for n in lab})
        fam = CounterMetricFamily(_metric_name(view.name), f"map {view.name}", labels=names)
        for lab, value in rows:
            fam.add_metric([lab.get(n, "") for n in names], value)
        out.append(fam)
    for g in obj.globals.dumps():
        if g.static_const:
            continue
        value = obj.decoder.value(g.type_id, g.data)
        slots = slots_of(value)
        if slots is not None:
            fam = HistogramMetricFamily(_metric_name(g.name), f"histogram global {g.name}", labels=[])
            buckets, s = histogram_buckets(Histogram(g.name, None, modes.get(g.name, "log2"), slots))
            fam.add_metric([], buckets, s)
            out.append(fam)
        elif isinstance(value, int) and not isinstance(value, bool):
            out.append(CounterMetricFamily(_metric_name(g.name), f"global {g.name}", value=value))
    return out


class MetricsServer:
    """prometheus_client's HTTP server over a snapshot of one object's maps."""

    def __init__(self, obj: Any, hist_modes: dict[str, str] | None = None) -> None:
        from prometheus_client import CollectorRegistry

        self.obj = obj
        self.hist_modes = hist_modes or {}
        self._lock = threading.Lock()
        self._snapshot: list[Any] = []
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._server: Any = None
        self._thread: Any = None

    @classmethod
    def start(cls, where: str, obj: Any, hist_modes: dict[str, str] | None = None) -> MetricsServer:
        host, port = parse_host_port(where)
        self = cls(obj, hist_modes)
        self.refresh()
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise UsageError(f"--metrics {where}: cannot listen there: {e.strerror or e} "
                             f"(choose a free port)") from None
        return self

    @property
    def port(self) -> int:
        return self._server.server_port

    def refresh(self) -> None:
        """Read the maps now (call where no program runs: the tracing thread's tick)."""
        fams = families(self.obj, self.hist_modes)
        with self._lock:
            self._snapshot = fams

    def collect(self) -> list[Any]:
        with self._lock:
            return list(self._snapshot)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"bad --metrics {text!r}: expected HOST:PORT (e.g. 127.0.0.1:9435, or :9435)")
    return (host.strip("[]") or "0.0.0.0"), int(port)
