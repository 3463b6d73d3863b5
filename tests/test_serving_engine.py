"""The batched engine in-process on CPU: padded batches equal single rows, the static KV cache (used by
assisted workers) equals the dynamic one, requeued rows continue, cancellation stops a row."""

from __future__ import annotations

import pytest

from caserve.models import DEFAULT_MODEL, load_model
from caserve.serving.messages import Done, Row, SamplingParams, Tokens
from caserve.serving.worker.engine import Engine

GREEDY = SamplingParams(max_tokens=24, temperature=0, top_p=1, stop=[], seed=None, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=17, temperature=0.9, top_p=0.9, stop=[], seed=11, ignore_eos=True)


@pytest.fixture(scope="module")
def lm():
    return load_model(DEFAULT_MODEL)


def rows() -> list[Row]:
    return [
        Row(dispatch="a", job="a", task="generate", prompt="Hello", params=GREEDY),
        Row(dispatch="b", job="b", task="generate", prompt="A longer prompt here", params=SAMPLED),
        Row(dispatch="c", job="c", task="generate", prompt="Hi", params=GREEDY, prefix_ids=[70, 71, 72]),
    ]


def run(engine: Engine, batch: list[Row], cancelled=lambda d: False) -> dict[str, list[int]]:
    events: list = []
    engine.run(batch, events.append, cancelled)
    out: dict[str, list[int]] = {r.dispatch: [] for r in batch}
    for e in events:
        if isinstance(e, Tokens):
            out[e.dispatch] += e.ids
    assert sorted(e.dispatch for e in events if isinstance(e, Done)) == sorted(out)  # one done per row
    return out


def test_batch_equals_single_rows_and_static_cache_equals_dynamic(lm) -> None:
    dynamic = run(Engine(lm), rows())
    assert [len(v) for v in dynamic.values()] == [24, 17, 21]  # c continues: 24 - 3 already generated
    for row in rows():
        assert run(Engine(lm), [row])[row.dispatch] == dynamic[row.dispatch]
    assert run(Engine(lm, static_cache=True), rows()) == dynamic


def test_cancelled_row_stops_and_gets_no_done(lm) -> None:
    events: list = []
    stats = Engine(lm).run(rows()[:1], events.append, lambda d: len(events) >= 5)
    assert stats.generated_tokens < 24
    assert not [e for e in events if isinstance(e, Done)]
