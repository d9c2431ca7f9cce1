"""Process-local serving metrics rendered in the Prometheus text format (`GET /metrics`).

A dozen numbers do not justify a dependency: counters and gauges are plain floats behind one lock, latency is
a fixed-bucket histogram, tokens/s is generated tokens over generation busy time and over the last minute.
"""

from __future__ import annotations

import threading
import time
from collections import deque

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str], int] = {}  # (route, status class) -> count
        self.tokens_generated = 0
        self.completions = 0
        self.prompt_tokens = 0
        self.generate_busy_s = 0.0
        self.queue_depth = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.weight_syncs = 0
        self.weight_sync_failures = 0
        self.weight_sync_bytes = 0
        self.weight_sync_seconds = 0.0
        self.last_weight_sync_seconds = 0.0
        self._recent: deque[tuple[float, int]] = deque()  # (finish time, tokens) of the last minute

    def count_request(self, route: str, status: int) -> None:
        """`route` must come from a fixed set (app.py maps unknown paths to one label): labels stay bounded."""
        with self._lock:
            key = (route, f"{status // 100}xx")
            self.requests[key] = self.requests.get(key, 0) + 1

    def queue(self, delta: int) -> None:
        with self._lock:
            self.queue_depth += delta

    def generation(self, seconds: float, prompt_tokens: int, tokens: int, completions: int) -> None:
        now = time.monotonic()
        with self._lock:
            self.tokens_generated += tokens
            self.prompt_tokens += prompt_tokens
            self.completions += completions
            self.generate_busy_s += seconds
            self.latency_sum += seconds
            idx = next((i for i, b in enumerate(LATENCY_BUCKETS) if seconds <= b), len(LATENCY_BUCKETS))
            self.latency_counts[idx] += 1
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - 60:
                self._recent.popleft()

    def weight_sync(self, seconds: float, nbytes: int, ok: bool) -> None:
        with self._lock:
            if ok:
                self.weight_syncs += 1
                self.weight_sync_bytes += nbytes
                self.weight_sync_seconds += seconds
                self.last_weight_sync_seconds = seconds
            else:
                self.weight_sync_failures += 1

    def render(self, weight_version: int, backend_dead: bool = False) -> str:
        with self._lock:
            now = time.monotonic()
            recent = sum(t for ts, t in self._recent if ts >= now - 60)
            lines = [
                "# HELP rollout_requests_total HTTP requests by route and status class.",
                "# TYPE rollout_requests_total counter",
            ]
            for (route, cls), v in sorted(self.requests.items()):
                lines.append(f'rollout_requests_total{{route="{route}",status="{cls}"}} {v}')
            busy = self.generate_busy_s
            simple = [
                (
                    "rollout_tokens_generated_total",
                    "counter",
                    "Completion tokens generated.",
                    self.tokens_generated,
                ),
                ("rollout_prompt_tokens_total", "counter", "Prompt tokens processed.", self.prompt_tokens),
                ("rollout_completions_total", "counter", "Completions returned.", self.completions),
                (
                    "rollout_tokens_per_second",
                    "gauge",
                    "Generated tokens per second of generation time.",
                    self.tokens_generated / busy if busy else 0.0,
                ),
                (
                    "rollout_tokens_per_second_1m",
                    "gauge",
                    "Generated tokens per wall second, last minute.",
                    recent / 60.0,
                ),
                ("rollout_queue_depth", "gauge", "Generation requests waiting or running.", self.queue_depth),
                ("rollout_weight_version", "gauge", "Weight version now serving.", weight_version),
                (
                    "rollout_backend_dead",
                    "gauge",
                    "1 once the generation engine died (generation answers 503), else 0.",
                    int(backend_dead),
                ),
                ("rollout_weight_syncs_total", "counter", "Successful weight updates.", self.weight_syncs),
                (
                    "rollout_weight_sync_failures_total",
                    "counter",
                    "Failed weight updates.",
                    self.weight_sync_failures,
                ),
                (
                    "rollout_weight_sync_bytes_total",
                    "counter",
                    "Bytes received by weight updates.",
                    self.weight_sync_bytes,
                ),
                (
                    "rollout_weight_sync_seconds_total",
                    "counter",
                    "Time spent in weight updates.",
                    self.weight_sync_seconds,
                ),
                (
                    "rollout_weight_sync_last_seconds",
                    "gauge",
                    "Duration of the last weight update.",
                    self.last_weight_sync_seconds,
                ),
            ]
            for name, kind, help_, v in simple:
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {v}"]
            lines += [
                "# HELP rollout_generate_latency_seconds Latency of /generate and OpenAI generation calls.",
                "# TYPE rollout_generate_latency_seconds histogram",
            ]
            cum = 0
            for b, c in zip(LATENCY_BUCKETS, self.latency_counts, strict=False):
                cum += c
                lines.append(f'rollout_generate_latency_seconds_bucket{{le="{b}"}} {cum}')
            cum += self.latency_counts[-1]
            lines += [
                f'rollout_generate_latency_seconds_bucket{{le="+Inf"}} {cum}',
                f"rollout_generate_latency_seconds_sum {self.latency_sum}",
                f"rollout_generate_latency_seconds_count {cum}",
            ]
        return "\n".join(lines) + "\n"
