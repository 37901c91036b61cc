"""The server's counters and histograms, written in Prometheus' text format for GET /metrics.

A dozen lines of exposition format are simpler than a dependency: counters, two gauges read from
the scheduler, and two histograms (time to first token, inter-token latency) with cumulative
buckets, `_sum` and `_count`, as https://prometheus.io/docs/instrumenting/exposition_formats/ says.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            total += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        return [*out, f"{name}_sum {self.sum}", f"{name}_count {total}"]


class Metrics:
    """Updated from the event loop (and read by it), so a lock only guards against the exporter."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.ttft = Histogram()
        self.itl = Histogram()

    def request_done(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def render(self, queue_length: int, running_rows: int, generated_tokens: int) -> str:
        with self.lock:
            lines = [
                "# HELP llmctl_requests_total Requests answered, by endpoint and HTTP status.",
                "# TYPE llmctl_requests_total counter",
                *(
                    f'llmctl_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())
                ),
                "# HELP llmctl_prompt_tokens_total Prompt tokens prefilled.",
                "# TYPE llmctl_prompt_tokens_total counter",
                f"llmctl_prompt_tokens_total {self.prompt_tokens}",
                "# HELP llmctl_generation_tokens_total Tokens generated (by the scheduler: an abandoned "
                "request's too).",
                "# TYPE llmctl_generation_tokens_total counter",
                f"llmctl_generation_tokens_total {generated_tokens}",
                "# HELP llmctl_time_to_first_token_seconds From a request's arrival to its first token.",
                "# TYPE llmctl_time_to_first_token_seconds histogram",
                *self.ttft.lines("llmctl_time_to_first_token_seconds"),
                "# HELP llmctl_inter_token_latency_seconds Between consecutive tokens of one choice.",
                "# TYPE llmctl_inter_token_latency_seconds histogram",
                *self.itl.lines("llmctl_inter_token_latency_seconds"),
                "# HELP llmctl_queue_length Requests waiting for a place in the running batch.",
                "# TYPE llmctl_queue_length gauge",
                f"llmctl_queue_length {queue_length}",
                "# HELP llmctl_running_rows Rows (choices) in the running batch.",
                "# TYPE llmctl_running_rows gauge",
                f"llmctl_running_rows {running_rows}",
            ]
        return "\n".join(lines) + "\n"
