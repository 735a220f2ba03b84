"""router_service.metrics.observe_many against prometheus_client's own observe."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram

from router_service.metrics import observe_many

BUCKETS = (0.005, 0.01, 0.025, 0.1, 1, 10)


def _samples(histogram: Histogram) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for metric in histogram.collect() for s in metric.samples
            if not s.name.endswith("_created")}


def test_observe_many_counts_as_observe_does_each_amount() -> None:
    rng = random.Random(3)
    # Bounds themselves (le is inclusive), amounts past the last bound, zero and negatives.
    amounts = [*BUCKETS, 0.0, -1.0, 11.0, 1e9] + [rng.uniform(0, 12) for _ in range(500)]
    one_by_one = Histogram("one", "", buckets=BUCKETS, registry=CollectorRegistry())
    together = Histogram("many", "", buckets=BUCKETS, registry=CollectorRegistry())
    for amount in amounts:
        one_by_one.observe(amount)
    observe_many(together, amounts[:7])
    observe_many(together, amounts[7:])
    observe_many(together, [])
    expected = {(name.replace("one", "many"), labels): value
                for (name, labels), value in _samples(one_by_one).items()}
    got = _samples(together)
    sum_key = ("many_sum", ())
    # The sum is added up in another order: equal but for rounding.
    assert abs(got.pop(sum_key) - expected.pop(sum_key)) < 1e-6
    assert got == expected
    assert got[("many_count", ())] == len(amounts)


def test_observe_many_works_on_a_labelled_child() -> None:
    histogram = Histogram("labelled", "", ["type"], buckets=BUCKETS, registry=CollectorRegistry())
    observe_many(histogram.labels("grpc"), [0.001, 0.5, 0.5, 100.0])
    samples = _samples(histogram)
    assert samples[("labelled_bucket", (("le", "0.005"), ("type", "grpc")))] == 1
    assert samples[("labelled_bucket", (("le", "1.0"), ("type", "grpc")))] == 3
    assert samples[("labelled_bucket", (("le", "+Inf"), ("type", "grpc")))] == 4
