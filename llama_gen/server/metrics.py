"""The server's Prometheus metrics, in a registry of its own (each app has one, so several can live in a process).

llama_gen_requests_total{endpoint, status}      HTTP requests answered, by endpoint and status code
llama_gen_generations_total{finish_reason}      engine requests ended: stop, length, cancelled, error
llama_gen_prompt_tokens_total                   prompt tokens of the engine requests submitted
llama_gen_completion_tokens_total               tokens generated (what the outputs keep)
llama_gen_queue_depth                           engine requests waiting for a slot
llama_gen_active_slots / llama_gen_slots        slots running a request / all of them (max_batch_size)
llama_gen_time_to_first_token_seconds           histogram: submission to the first token
llama_gen_time_per_output_token_seconds         histogram: the decode time per token after the first
llama_gen_request_duration_seconds              histogram: submission to the end
"""

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llama_gen.serve import Completion, Engine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class Metrics:
    """The counters, gauges and histograms of one server (on its engine)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "llama_gen_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.generations = Counter(
            "llama_gen_generations", "engine requests ended, by finish reason", ["finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("llama_gen_prompt_tokens", "prompt tokens submitted", registry=r)
        self.completion_tokens = Counter("llama_gen_completion_tokens", "tokens generated", registry=r)
        Gauge("llama_gen_queue_depth", "engine requests waiting for a slot", registry=r).set_function(
            lambda: len(engine.waiting)
        )
        Gauge("llama_gen_active_slots", "slots running a request", registry=r).set_function(
            lambda: len(engine.admitted)
        )
        Gauge("llama_gen_slots", "slots (max_batch_size)", registry=r).set(len(engine.slots.slots))
        self.ttft = Histogram(
            "llama_gen_time_to_first_token_seconds", "submission to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.per_token = Histogram(
            "llama_gen_time_per_output_token_seconds", "decode seconds per token after the first",
            buckets=PER_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "llama_gen_request_duration_seconds", "submission to end", buckets=DURATION_BUCKETS, registry=r
        )

    def finished(self, done: Completion) -> None:
        """Records a finished engine request."""
        t = done.timings
        self.generations.labels(done.finish_reason).inc()
        self.completion_tokens.inc(done.completion_tokens)
        if t.time_to_first_token is not None:
            self.ttft.observe(t.time_to_first_token)
        if done.decode_tokens_per_s:
            self.per_token.observe(1 / done.decode_tokens_per_s)
        if t.finished is not None:
            self.duration.observe(t.finished - t.submitted)

    def ended_early(self, reason: str, n_tokens: int = 0) -> None:
        """Records an engine request that was cancelled or failed after n_tokens tokens."""
        self.generations.labels(reason).inc()
        self.completion_tokens.inc(n_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
