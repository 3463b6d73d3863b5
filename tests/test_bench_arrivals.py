"""Arrival processes and Azure trace replay."""

from __future__ import annotations

import numpy as np
import pytest

from caserve.bench import arrivals as arr
from bench_helpers import TEST_DATA

TRACE = TEST_DATA / "azure_llm_trace_2023_conv.csv"


def test_poisson_rate_and_cv():
    t = arr.poisson(20000, 5.0, seed=1)
    gaps = np.diff(t)
    assert t[0] == 0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_burstiness(cv):
    gaps = np.diff(arr.gamma(40000, 10.0, cv=cv, seed=2))
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_infinite_rate_and_errors():
    assert np.all(arr.poisson(5, float("inf")) == 0)
    for bad in (dict(n=0, rate=1.0), dict(n=3, rate=0.0), dict(n=3, rate=1.0, cv=0.0)):
        with pytest.raises(arr.ArrivalError):
            arr.gamma(**bad)


def test_azure_trace_replay_and_time_scale():
    tr = arr.azure_trace(TRACE, n=100)
    assert len(tr.offsets) == 100 and tr.offsets[0] == 0 and np.all(np.diff(tr.offsets) >= 0)
    assert tr.context_tokens[0] == 374 and tr.generated_tokens[0] == 44
    # first rows: 18:15:46.68059 -> 18:15:50.995169
    assert tr.offsets[1] == pytest.approx(4.314579, abs=1e-5)
    fast = arr.azure_trace(TRACE, n=100, time_scale=0.1)
    assert np.allclose(fast.offsets, tr.offsets * 0.1)
    later = arr.azure_trace(TRACE, n=10, start=50)
    assert later.offsets[0] == 0 and later.context_tokens[0] == tr.context_tokens[50]


def test_azure_trace_other_file_and_errors(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n10.5,3,4\n10.0,1,2\n")
    tr = arr.azure_trace(p)  # numeric timestamps, out of order: sorted
    assert list(tr.offsets) == [0.0, 0.5] and list(tr.context_tokens) == [1, 3]
    bad = tmp_path / "bad.csv"
    bad.write_text("time,a,b\n1,2,3\n")
    with pytest.raises(arr.ArrivalError):
        arr.azure_trace(bad)
    with pytest.raises(arr.ArrivalError):
        arr.make_arrivals(3, process="weibull")


def test_make_arrivals_azure_gives_output_lengths():
    offsets, tr = arr.make_arrivals(20, process="azure", trace_path=TRACE, time_scale=0.5)
    assert tr is not None and len(offsets) == 20 and len(tr.generated_tokens) == 20
