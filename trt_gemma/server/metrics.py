"""Prometheus metrics of one server: engine state read at scrape time, latencies per request.

Each app owns its CollectorRegistry (no global default registry), so two apps in one process (tests)
never collide. Engine gauges and counters are not mirrored into prometheus objects on the hot path:
a custom collector reads ``EngineStats`` when /metrics is scraped, so the numbers are the engine's
own and cost nothing between scrapes. Latency histograms are observed by the request handlers,
which are the only place that sees a token arrive at the client's side of the engine; the stage
histograms (queue, prefill, decode) take the engine's own timestamps (``RequestOutput.metrics``)
of each finished request. Every sample carries a ``model_name`` label (as vLLM's do), added once
at exposition, so no metric can forget it and the handlers never pass it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from trt_gemma.outputs import RequestMetrics
    from trt_gemma.runtime import EngineStats


PREFIX = "trt_gemma"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)
# Queue, prefill and decode: from milliseconds (an idle server's queue) to minutes.
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                 40.0, 60.0, 120.0, 300.0)


class _EngineCollector(Collector):
    """Yields the engine's gauges and counters from one stats snapshot per scrape."""

    def __init__(self, read_stats: Callable[[], EngineStats | None]):
        self._read_stats = read_stats

    def collect(self) -> Iterator[Metric]:
        stats = self._read_stats()
        if stats is None:  # engine not started yet, or gone
            return
        gauges = [
            ("requests_running", "Sequences holding KV blocks, scheduled every step",
             stats.num_running),
            ("requests_waiting", "Sequences queued for admission (new or preempted)",
             stats.num_waiting),
            ("kv_cache_usage_ratio", "Share of KV-cache blocks in use, 0..1",
             stats.kv_cache_usage),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        counters = [
            ("preemptions", "Sequences preempted for lack of KV blocks", stats.num_preemptions),
            ("prompt_tokens", "Prompt tokens of accepted requests", stats.num_prompt_tokens),
            ("generation_tokens", "Tokens sampled", stats.num_generation_tokens),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
             stats.prefix_cache_queried_tokens),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache",
             stats.prefix_cache_hit_tokens),
            ("engine_finished_requests", "Requests the engine finished (not aborted)",
             stats.num_finished_requests),
        ]
        counters += [  # speculative decoding (vLLM's names); zero without it
            ("spec_decode_num_drafts", "Verifications: sequences x steps that checked drafts",
             stats.spec_num_drafts),
            ("spec_decode_num_draft_tokens", "Draft tokens proposed and verified",
             stats.spec_num_draft_tokens),
            ("spec_decode_num_accepted_tokens", "Draft tokens accepted",
             stats.spec_num_accepted_tokens),
        ]
        for name, doc, value in counters:
            # CounterMetricFamily appends _total to the exposed sample name.
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        if stats.spec_accepted_per_position:
            per_position = CounterMetricFamily(
                f"{PREFIX}_spec_decode_num_accepted_tokens_per_pos",
                "Draft tokens accepted, by position in their proposal (0 = first)",
                labels=["position"])
            for position, value in enumerate(stats.spec_accepted_per_position):
                per_position.add_metric([str(position)], value)
            yield per_position


class _Labelled(Collector):
    """Every sample of another registry, with constant labels added (prometheus_client has no
    constant labels of its own)."""

    def __init__(self, source: CollectorRegistry, labels: dict[str, str]):
        self._source, self._labels = source, labels

    def collect(self) -> Iterator[Metric]:
        for family in self._source.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples = [s._replace(labels={**s.labels, **self._labels})
                           for s in family.samples]
            yield out


class ServerMetrics:
    def __init__(self, read_stats: Callable[[], EngineStats | None], model_name: str = ""):
        self.registry = CollectorRegistry(auto_describe=True)  # the metrics, unlabelled
        self.registry.register(_EngineCollector(read_stats))
        self.exposed = CollectorRegistry(auto_describe=False)  # the same, with model_name
        self.exposed.register(_Labelled(self.registry, {"model_name": model_name}))
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "From request arrival to its first generated token", buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Between consecutive generated tokens of one sample", buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e_latency = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "From request arrival to its last token", buckets=E2E_BUCKETS, registry=self.registry,
        )
        self.requests = Counter(
            f"{PREFIX}_requests", "Generation requests answered, by how they ended",
            ["finish_reason"], registry=self.registry,
        )
        self.rejected = Counter(
            f"{PREFIX}_requests_rejected", "Requests answered with an error, by code or status",
            ["reason"], registry=self.registry,
        )
        self.queue_time = Histogram(
            f"{PREFIX}_request_queue_time_seconds",
            "From request arrival to its first scheduling (engine clock)",
            buckets=STAGE_BUCKETS, registry=self.registry,
        )
        self.prefill_time = Histogram(
            f"{PREFIX}_request_prefill_time_seconds",
            "From first scheduling to the first token: the prompt's forward (engine clock)",
            buckets=STAGE_BUCKETS, registry=self.registry,
        )
        self.decode_time = Histogram(
            f"{PREFIX}_request_decode_time_seconds",
            "From the first token to the request's end (engine clock)",
            buckets=STAGE_BUCKETS, registry=self.registry,
        )
        self.safety_screening_time = Histogram(
            f"{PREFIX}_safety_screening_seconds",
            "From a screening call (prompts or a response) to its verdicts: queue + classifier "
            "forward", buckets=STAGE_BUCKETS, registry=self.registry,
        )
        self.safety_flagged = Counter(
            f"{PREFIX}_safety_flagged", "Prompts and responses the content filter flagged",
            ["kind"], registry=self.registry,
        )

    def observe_stages(self, timings: RequestMetrics | None) -> None:
        """The stage times of one finished engine request (engines without timestamps: none)."""
        if timings is None:
            return
        for histogram, seconds in ((self.queue_time, timings.queue_time),
                                   (self.prefill_time, timings.prefill_time),
                                   (self.decode_time, timings.decode_time)):
            if seconds is not None:
                histogram.observe(max(0.0, seconds))

    def exposition(self) -> bytes:
        return generate_latest(self.exposed)


class RequestTimer:
    """Latencies of one engine request, fed with each snapshot's arrival time and token counts."""

    def __init__(self, metrics: ServerMetrics, arrival: float):
        self._metrics = metrics
        self._arrival = arrival
        self._last: float | None = None  # when the previous tokens arrived

    def tokens(self, now: float, num_new: int) -> None:
        """num_new: new tokens per sample in this snapshot (the engine may merge steps)."""
        if num_new <= 0:
            return
        if self._last is None:
            self._metrics.time_to_first_token.observe(now - self._arrival)
            num_new -= 1
        elif num_new:
            gap = (now - self._last) / num_new
            for _ in range(num_new):
                self._metrics.inter_token_latency.observe(gap)
        self._last = now

    def finished(self, now: float, reasons: list[str | None]) -> None:
        self._metrics.e2e_latency.observe(now - self._arrival)
        for reason in reasons:
            self._metrics.requests.labels(reason or "abort").inc()
