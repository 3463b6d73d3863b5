"""Discrete-event simulator: queueing theory, policies and cluster shapes."""

from __future__ import annotations

import numpy as np
import pytest

from caserve.bench.arrivals import poisson
from caserve.bench.sim import ClusterSpec, ServiceModel, SimError, project, simulate


def expo(mean, n=20000, seed=0):
    return np.random.default_rng(seed).exponential(mean, n)


@pytest.mark.parametrize("dispatch", ["fastest", "longest-idle"])
def test_mm1_matches_theory(dispatch):
    lam, mean_s = 8.0, 0.1  # rho = 0.8: E[JCT] = 1 / (mu - lambda) = 0.5 s
    svc = ServiceModel({"native": expo(mean_s, 50000)})
    res = simulate(poisson(60000, lam, seed=3), svc, ClusterSpec(gpus=1, dispatch=dispatch), seed=1)
    assert res.jct.mean() == pytest.approx(0.5, rel=0.08)
    assert res.queue_delay.mean() == pytest.approx(0.4, rel=0.1)


def test_fifo_is_fifo_and_work_conserving():
    svc = ServiceModel({"native": expo(0.2), "assisted": expo(0.4)})
    a = poisson(3000, 12.0, seed=5)
    res = simulate(a, svc, ClusterSpec(gpus=2, cpu_nodes=2, tenants_per_gpu=1), seed=0)
    assert np.all(np.diff(res.start) >= -1e-12)  # served in arrival order
    assert np.all(res.queue_delay >= 0)
    # no request waits while a worker is idle: at each start with delay, some worker just finished
    waited = res.queue_delay > 1e-9
    assert np.all(np.isin(res.start[waited], res.finish))
    assert set(np.unique(res.kind)) == {0, 1}


def test_more_cpu_nodes_reduce_delay_and_tenant_cap():
    svc = ServiceModel({"native": expo(0.05), "assisted": expo(0.08)})
    proj = project(svc, gpus=10, cpu_nodes=[0, 5, 20, 100], load=1.1, num_requests=20000, tenants_per_gpu=4)
    jcts = [r["mean_jct_s"] for r in proj.rows]
    assert jcts[0] > jcts[1] > jcts[2] >= jcts[3] * 0.999
    assert proj.rows[-1]["assisted_workers"] == 40  # 100 nodes, 10 GPUs x 4 tenants
    assert proj.rows[2]["jct_reduction_pct"] > 50


def test_large_cluster_projection_runs():
    svc = ServiceModel({"native": expo(1.0), "assisted": expo(2.0)})
    for policy in ("fifo", "ect"):
        proj = project(svc, gpus=100, cpu_nodes=[0, 1000], load=1.05, num_requests=30000, policy=policy)
        assert proj.rows[1]["assisted_workers"] == 800
        assert proj.rows[1]["mean_queue_delay_s"] < proj.rows[0]["mean_queue_delay_s"]


def test_ect_prefers_fast_workers():
    svc = ServiceModel({"native": np.full(10, 0.1), "assisted": np.full(10, 1.0)})
    res = simulate(np.arange(50) * 0.2, svc, ClusterSpec(gpus=1, cpu_nodes=3, policy="ect"))
    assert np.all(res.kind == 0) and np.allclose(res.jct, 0.1)


def test_tenant_slowdown_and_errors():
    svc = ServiceModel({"native": np.full(5, 1.0), "assisted": np.full(5, 1.0)})
    kinds, factor = ClusterSpec(gpus=2, cpu_nodes=6, tenants_per_gpu=3, tenant_slowdown=0.5).workers()
    assert list(kinds) == [0, 0] + [1] * 6 and np.allclose(factor[2:], 2.0)
    with pytest.raises(SimError):
        simulate(np.array([1.0, 0.5]), svc, ClusterSpec())
    with pytest.raises(SimError):
        ClusterSpec(gpus=0, cpu_nodes=5).workers()
    with pytest.raises(SimError):
        simulate(np.zeros(2), svc, ClusterSpec(policy="random"))
    with pytest.raises(SimError):
        ServiceModel({})


def test_assisted_factor_only_when_unmeasured():
    native = ServiceModel({"native": np.full(4, 2.0)})
    both = native.with_assisted_factor(1.5)
    assert both.mean("assisted") == pytest.approx(3.0) and both.mean("native") == pytest.approx(2.0)
    measured = ServiceModel({"native": np.ones(3), "assisted": np.full(3, 5.0)})
    assert measured.with_assisted_factor(2.0).mean("assisted") == pytest.approx(5.0)
    with pytest.raises(SimError):
        native.with_assisted_factor(0.0)


def test_trace_driven_replay_is_lindley():
    a = np.array([0.0, 0.1, 0.15, 1.0])
    st = np.array([0.3, 0.1, 0.2, 0.05])
    svc = ServiceModel({"native": np.ones(2)})
    res = simulate(a, svc, ClusterSpec(gpus=1), service_times=st)
    # W_{i+1} = max(0, W_i + S_i - (a_{i+1} - a_i))
    assert np.allclose(res.start, [0.0, 0.3, 0.4, 1.0]) and np.allclose(res.finish, [0.3, 0.4, 0.6, 1.05])
    with pytest.raises(SimError):
        simulate(a, svc, ClusterSpec(), service_times=st[:2])
