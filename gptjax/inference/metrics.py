"""`gptjax serve`'s /metrics: counters, gauges and histograms in Prometheus' text exposition
format (version 0.0.4), written here (no client library).

    # HELP gptjax_requests_total Generation requests answered, by route and outcome.
    # TYPE gptjax_requests_total counter
    gptjax_requests_total{route="chat",outcome="ok"} 3
    ...
    gptjax_time_to_first_token_seconds_bucket{le="0.1"} 2
    gptjax_time_to_first_token_seconds_sum 0.31
    gptjax_time_to_first_token_seconds_count 3

Values are read and written from several threads; each update is one locked step.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable

SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    escape = lambda v: str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str):
        self.name, self.help = name, help_text
        self.lock = threading.Lock()

    def head(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str):
        super().__init__(name, help_text)
        self.values: dict[tuple, float] = {}

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.values[key] = self.values.get(key, 0) + amount

    def value(self, **labels: str) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0)

    def lines(self) -> list[str]:
        with self.lock:
            items = sorted(self.values.items()) or [((), 0)]
        return [*self.head(), *(f"{self.name}{_labels(dict(k))} {_number(v)}" for k, v in items)]


class Gauge(_Metric):
    """A value read when the metrics are rendered."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]):
        super().__init__(name, help_text)
        self.read = read

    def lines(self) -> list[str]:
        return [*self.head(), f"{self.name} {_number(self.read())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, bounds: tuple[float, ...] = SECONDS):
        super().__init__(name, help_text)
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound
        self.sum, self.count = 0.0, 0

    def observe(self, x: float) -> None:
        with self.lock:
            self.counts[bisect.bisect_left(self.bounds, x)] += 1
            self.sum += x
            self.count += 1

    def lines(self) -> list[str]:
        with self.lock:
            counts, total, count = list(self.counts), self.sum, self.count
        out, running = self.head(), 0
        for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
            running += n
            out.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        return [*out, f"{self.name}_sum {_number(total)}", f"{self.name}_count {count}"]


def render(metrics: list[_Metric]) -> str:
    """The text exposition of `metrics` (what /metrics answers, text/plain; version=0.0.4)."""
    return "\n".join(line for metric in metrics for line in metric.lines()) + "\n"


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
