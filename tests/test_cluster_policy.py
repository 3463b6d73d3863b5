"""Cluster mode without Ray: config schema, queue-delay signal, autoscaling policy, GPU server choice,
the router's drain, the status text. In-process and fast."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from caserve.cluster.autoscale import Autoscaler, QueueDelayEstimator, QueueSample, parse_router_metrics
from caserve.cluster.config import AssistedConfig, load_config, parse_config
from caserve.cluster.deploy import format_status
from caserve.cluster.errors import ClusterError, ConfigError
from caserve.cluster.placement import ServerLoad, least_loaded
from caserve.serving.messages import TASK_GENERATE, Done, Progress, DrainReply, SamplingParams
from caserve.serving.router.jobs import Job, JobState
from caserve.serving.router.metrics import ServingMetrics
from caserve.serving.router.router import Router

LOOPBACK = {"network": {"mode": "loopback"}}


def test_config_from_yaml_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text("model: caserve/tiny-gpt2\ngpu_servers: 2\nassisted: {min: 2, max: 6, target_queue_delay_s: 0.2}\n"
                    "gpu_server: {token_file: /etc/caserve/token}\nresources: {cpu_node: idle_cpu}\n")
    cfg = load_config(path)
    assert cfg.gpu_servers == 2 and cfg.assisted.min == 2 and cfg.assisted.max == 6
    assert cfg.assisted.target_queue_delay_s == 0.2 and cfg.resources.cpu_node == "idle_cpu"
    assert cfg.router.port == 8000 and cfg.network.mode == "cluster" and not cfg.loopback
    assert cfg.gpu_server.token_file == Path("/etc/caserve/token")


@pytest.mark.parametrize("data, needle", [
    ({**LOOPBACK, "assisted": {"min": 3, "max": 2}}, "assisted.min (3) > assisted.max (2)"),
    ({**LOOPBACK, "asisted": {"min": 1}}, "asisted"),  # a typo is refused, not ignored
    ({**LOOPBACK, "router": {"policy": "random"}}, "policy"),
    ({**LOOPBACK, "gpu_server": {"tenant_memory_limit": "8 gigs"}}, "tenant_memory_limit"),
    ({}, "token_file"),  # cluster networking without a token: the GPU server would refuse remote peers
    ([1, 2], "mapping"),
])
def test_config_errors_name_the_problem(data: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert needle in str(info.value)


def test_config_file_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_router_metrics_are_parsed_per_model() -> None:
    m = ServingMetrics()
    m.queue_length.labels("a").set(3)
    m.queue_length.labels("b").set(7)
    for delay in (0.5, 1.5):
        m.queue_delay.labels("a").observe(delay)
    sample = parse_router_metrics(m.render().decode(), "a", t=10.0)
    assert sample == QueueSample(10.0, 3, 2.0, 2.0)
    assert parse_router_metrics(m.render().decode(), "unknown", t=1.0) == QueueSample(1.0, 0, 0.0, 0.0)


def test_queue_delay_is_the_recent_mean_or_how_long_the_queue_stalled() -> None:
    est = QueueDelayEstimator()
    assert est.update(QueueSample(0.0, 0, 0.0, 0)) == 0.0
    assert est.update(QueueSample(1.0, 2, 3.0, 2)) == pytest.approx(1.5)  # two dispatches, 3 s in all
    assert est.update(QueueSample(2.0, 4, 3.0, 2)) == pytest.approx(1.0)  # nothing dispatched, queue waiting
    assert est.update(QueueSample(4.0, 4, 3.0, 2)) == pytest.approx(3.0)  # still stalled since t=1
    assert est.update(QueueSample(5.0, 0, 3.2, 4)) == pytest.approx(0.1)  # dispatches resume
    assert est.update(QueueSample(6.0, 1, 0.0, 0)) == 0.0  # counters went back: the router restarted


def _scaler(**kw: float) -> Autoscaler:
    base = {"min": 1, "max": 5, "target_queue_delay_s": 1.0, "scale_up_cooldown_s": 10, "scale_down_after_s": 30}
    return Autoscaler(AssistedConfig(**{**base, **kw}))


def test_autoscaler_scales_up_in_proportion_and_respects_max_loading_and_cooldown() -> None:
    a = _scaler()
    assert a.decide(0.0, delay_s=3.0, queue_length=9, current=2, loading=0).target == 5  # 2 + ceil(2 * 2), max 5
    a = _scaler()
    assert a.decide(0.0, delay_s=1.2, queue_length=1, current=1, loading=0).target == 2  # at least one
    assert a.decide(1.0, delay_s=5.0, queue_length=9, current=2, loading=1).target == 2  # one still loading
    assert a.decide(5.0, delay_s=5.0, queue_length=9, current=2, loading=0).target == 2  # cooling down
    assert a.decide(11.0, delay_s=5.0, queue_length=9, current=2, loading=0).target == 5
    assert a.decide(30.0, delay_s=9.0, queue_length=9, current=5, loading=0).target == 5  # at max


def test_autoscaler_scales_down_one_per_quiet_period_never_below_min() -> None:
    a = _scaler()
    assert a.decide(0.0, delay_s=0.0, queue_length=0, current=3, loading=0).target == 3
    assert a.decide(29.0, delay_s=0.1, queue_length=0, current=3, loading=0).target == 3
    assert a.decide(30.0, delay_s=0.1, queue_length=0, current=3, loading=0).target == 2
    assert a.decide(31.0, delay_s=0.1, queue_length=0, current=2, loading=0).target == 2  # quiet clock restarted
    assert a.decide(40.0, delay_s=0.1, queue_length=1, current=2, loading=0).target == 2  # queue not empty: reset
    assert a.decide(41.0, delay_s=0.1, queue_length=0, current=2, loading=0).target == 2
    assert a.decide(71.0, delay_s=0.1, queue_length=0, current=2, loading=0).target == 1
    assert a.decide(72.0, delay_s=0.0, queue_length=0, current=2, loading=1).target == 2  # loading: reset
    assert a.decide(101.0, delay_s=0.0, queue_length=0, current=2, loading=0).target == 2
    assert a.decide(131.0, delay_s=0.0, queue_length=0, current=2, loading=0).target == 1
    assert a.decide(200.0, delay_s=0.0, queue_length=0, current=1, loading=0).target == 1  # min
    assert a.decide(201.0, delay_s=0.0, queue_length=0, current=0, loading=0).target == 1  # back to min


def test_gpu_server_choice_follows_tenant_load_and_pending_workers() -> None:
    assert least_loaded([ServerLoad(0, 3, 10), ServerLoad(1, 1, 99), ServerLoad(2, 2, 0)]) == 1
    assert least_loaded([ServerLoad(0, 1, 10, pending=1), ServerLoad(1, 1, 10)]) == 1  # counts assigned, unconnected
    assert least_loaded([ServerLoad(0, 1, 50), ServerLoad(1, 1, 10)]) == 1  # tie: fewer stored bytes
    assert least_loaded([ServerLoad(1, 0, 0), ServerLoad(0, 0, 0)]) == 0  # full tie: lower index
    with pytest.raises(ClusterError):
        least_loaded([])


def test_router_drain_stops_new_batches_but_finishes_the_running_one() -> None:
    async def scenario() -> None:
        router = Router(policy="fcfs", max_queue=8)
        ws = router.register(worker_id="w", kind="assisted", model="m", task="causal-lm", max_batch=1, max_context=64)
        router.channel_opened(ws)
        first, second = (Job("m", TASK_GENERATE, {"prompt": "x", "params": SamplingParams(max_tokens=2)}, prompt_units=1, max_tokens=2)
                         for _ in range(2))
        router.submit([first])
        assert first.state is JobState.RUNNING
        assert router.drain("w") == DrainReply(worker_id="w", draining=True, running=1)
        router.submit([second])
        router.handle_events(ws, [Done(dispatch=first.dispatch_id, finish_reason="length"), Progress()])
        assert first.state is JobState.DONE
        assert second.state is JobState.QUEUED  # the idle but draining worker gets nothing new
        assert router.drain("w").running == 0
        assert router.describe()["models"]["m"]["workers"][0]["draining"] is True
        assert router.drain("gone") == DrainReply(worker_id="gone", draining=True, running=0)

    asyncio.run(scenario())


def test_status_text_shows_every_section() -> None:
    status = {
        "name": "caserve", "model": "caserve/tiny-gpt2",
        "nodes": [{"node_id": "abcdef0123456789", "ip": "10.0.0.5", "alive": True, "cpus": 16, "gpus": 1,
                   "custom": {"caserve_cpu": 8}}],
        "router": {"url": "http://10.0.0.5:8000", "state": "running", "node_id": "abcdef0123456789"},
        "gpu_servers": [{"name": "gpu-0", "address": "10.0.0.5:7070", "state": "running", "device": "cuda:0",
                         "gpu_ids": ["0"], "tenants": 2, "tenant_bytes": 3 * 2**30, "stored_bytes": 2**30,
                         "device_allocated": None, "assisted_workers": ["assisted-0", "assisted-1"]}],
        "workers": {"native": [], "assisted": [{"name": "assisted-0", "state": "running", "registered": True,
                                                "busy": False, "running": 0, "node_id": "ffff", "gpu_server": "10.0.0.5:7070"}]},
        "queue": {"length": 4, "delay_s": 0.7, "target_delay_s": 0.5},
        "autoscale": {"min": 1, "max": 8, "assisted": 2, "draining": []},
        "events": ["12:00:00 ready"],
    }
    text = format_status(status)
    for needle in ("10.0.0.5", "caserve_cpu=8", "tenants=2", "tenant_bytes=3.0 GiB", "stored=1.0 GiB",
                   "assisted workers (1)", "native workers (0)", "queue: 4 waiting, delay 0.70s (target 0.50s)",
                   "2 assisted in [1, 8]", "12:00:00 ready"):
        assert needle in text, needle


def test_shipped_config_and_kuberay_manifest_agree() -> None:
    import json

    import yaml

    root = Path(__file__).resolve().parents[1] / "deploy"
    cfg = load_config(root / "cluster.yaml")
    docs = list(yaml.safe_load_all((root / "raycluster.yaml").read_text()))
    ray_cluster = next(d for d in docs if d["kind"] == "RayCluster")["spec"]

    def advertised(params: dict) -> dict:
        return json.loads(json.loads(params.get("resources", '"{}"')))

    head = advertised(ray_cluster["headGroupSpec"]["rayStartParams"])
    groups = {g["groupName"]: g for g in ray_cluster["workerGroupSpecs"]}
    gpu, cpu = advertised(groups["gpu"]["rayStartParams"]), advertised(groups["cpu"]["rayStartParams"])
    assert cfg.router.resource in head and cfg.resources.gpu_node in gpu and cfg.resources.cpu_node in cpu
    assert "nvidia.com/gpu" in groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu_pod_cpus = float(groups["cpu"]["rayStartParams"]["num-cpus"])
    assert cpu[cfg.resources.cpu_node] * cfg.assisted.cpus_per_worker <= cpu_pod_cpus  # the slots fit the pod
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["ports"][0]["targetPort"] == cfg.router.port
    assert str(cfg.gpu_server.token_file) in json.dumps(ray_cluster)  # the Secret is mounted where the config reads it


def test_controller_follows_a_gpu_server_restarted_on_another_node() -> None:
    """Without Ray: actor creation and stopping are recorded instead of done."""
    from caserve.cluster.controller import ClusterController, Managed

    async def scenario() -> None:
        ctrl = ClusterController(parse_config(LOOPBACK))
        created, stopped = [], []

        def fake_create(name, role, cls, args, options, gpu_index=None):  # noqa: ANN001, ANN202
            created.append(name)
            return Managed(name, role, None, args, options, gpu_index, state="running")

        async def fake_stop(m: Managed) -> None:
            stopped.append(m.name)

        ctrl._create, ctrl._stop = fake_create, fake_stop  # type: ignore[method-assign]
        ctrl.router = Managed("router", "router", None, (), {}, state="running", info={"url": "http://r:8000"})
        server = Managed("gpu-0", "gpu-server", None, (), {}, 0, state="running",
                         info={"index": 0, "address": "10.0.0.1:7070", "node_id": "a" * 56, "gpu_ids": ["3"]})
        ctrl.gpu = [server]
        ctrl._create_native(server, 0)
        ctrl.workers["assisted-0"] = Managed("assisted-0", "assisted", None,
                                             (ctrl.cfg, "assisted-0", "assisted", "http://r:8000", "10.0.0.1:7070", None),
                                             {}, 0, state="running")
        await ctrl._follow_gpu_servers()
        assert stopped == []  # nothing moved: nothing replaced
        server.info = {**server.info, "address": "10.0.0.2:7070", "node_id": "b" * 56, "gpu_ids": ["1"]}
        assisted_made = []

        async def fake_create_assisted() -> Managed:
            assisted_made.append(True)
            return Managed("assisted-1", "assisted", None, (), {}, 0)

        ctrl._create_assisted = fake_create_assisted  # type: ignore[method-assign]
        await ctrl._follow_gpu_servers()
        assert sorted(stopped) == ["assisted-0", "native-0-0"] and assisted_made == [True]
        native = ctrl.workers["native-0-0"]
        assert native.options["scheduling_strategy"].node_id == "b" * 56 and native.args[5] == "1"
        await ctrl._http.aclose()

    asyncio.run(scenario())


def test_controller_stops_a_draining_worker_only_once_the_router_shows_it_idle() -> None:
    """Without Ray: the router is an httpx mock that reports the worker busy twice, then idle."""
    import httpx

    from caserve.cluster.controller import ClusterController, Managed

    async def scenario() -> None:
        ctrl = ClusterController(parse_config({**LOOPBACK, "assisted": {"min": 0, "max": 2}}))
        answers, seen, stopped = [1, 1, 0], [], []

        def router(request: httpx.Request) -> httpx.Response:
            seen.append((request.method, request.url.path))
            return httpx.Response(200, json={"worker_id": "assisted-0", "draining": True, "running": answers.pop(0)})

        async def fake_stop(m: Managed) -> None:
            stopped.append((m.name, len(answers)))

        await ctrl._http.aclose()
        ctrl._http = httpx.AsyncClient(transport=httpx.MockTransport(router))
        ctrl._stop = fake_stop  # type: ignore[method-assign]
        ctrl.router = Managed("router", "router", None, (), {}, state="running", info={"url": "http://r:8000"})
        worker = Managed("assisted-0", "assisted", None, ("args",), {}, 0, state="running")
        ctrl.workers["assisted-0"] = worker
        await ctrl._drain_and_stop(worker)
        assert seen == [("POST", "/internal/workers/assisted-0/drain")] * 3
        assert stopped == [("assisted-0", 0)]  # stopped after the third answer (running == 0), not before
        assert "assisted-0" not in ctrl.workers and any("drained and stopped" in e for e in ctrl.events)
        await ctrl._http.aclose()

    asyncio.run(scenario())


def test_actor_names_round_trip_through_the_grammar() -> None:
    from caserve.cluster import names

    assert names.parse(names.gpu_server(3)) == names.ActorName("gpu-3", "gpu-server", gpu_index=3)
    assert names.parse(names.native(1, 2)) == names.ActorName("native-1-2", "native", gpu_index=1, number=2)
    assert names.parse(names.assisted(17)) == names.ActorName("assisted-17", "assisted", number=17)
    assert names.parse(names.ROUTER).role == "router"
    for other in ("controller", "gpu-", "native-1", "assisted-x", "router-2", "gpu-1 "):
        assert names.parse(other) is None
    listing = [{"name": "c-gpu-0", "namespace": names.NAMESPACE}, {"name": "c-controller", "namespace": names.NAMESPACE},
               {"name": "c-assisted-4", "namespace": "elsewhere"}, {"name": "d-router", "namespace": names.NAMESPACE},
               {"name": "c-router", "namespace": names.NAMESPACE}, {"name": names.full_name("c", "native-0-1"),
                                                                   "namespace": names.NAMESPACE}]
    assert names.ours("c", listing) == ["gpu-0", "native-0-1", "router"]


def test_adoption_rebuilds_specs_from_the_actors_info_without_touching_the_controller(monkeypatch) -> None:
    import ray

    from caserve.cluster import adopt as A
    from caserve.cluster.specs import ActorSpecs

    cfg = parse_config(LOOPBACK)
    listing = [{"name": f"{cfg.name}-{n}", "namespace": "caserve"}
               for n in ("gpu-0", "router", "native-0-0", "assisted-4", "assisted-9", "controller")]
    monkeypatch.setattr(ray.util, "list_named_actors", lambda all_namespaces: listing)
    monkeypatch.setattr(ray, "get_actor", lambda name, namespace: f"handle:{name}")
    infos = {"gpu-0": {"address": "10.0.0.1:7070", "node_id": "ab" * 28, "gpu_ids": ["0"]},
             "router": {"url": "http://10.0.0.1:8000"}, "assisted-4": {"gpu_server": "10.0.0.1:7070"},
             "assisted-9": {"gpu_server": "10.9.9.9:7070"}}  # its GPU server is gone

    async def refresh(m) -> None:
        m.info, m.state = infos.get(m.name, {}), "running"

    got = asyncio.run(A.adopt(cfg.name, ActorSpecs(cfg), refresh))
    assert [g.name for g in got.gpu] == ["gpu-0"] and got.router is not None and got.next_assisted == 10
    assert set(got.workers) == {"native-0-0", "assisted-4", "assisted-9"}
    a4, a9, native = got.workers["assisted-4"], got.workers["assisted-9"], got.workers["native-0-0"]
    assert a4.gpu_index == 0 and a4.args[3:5] == ("http://10.0.0.1:8000", "10.0.0.1:7070")
    assert a4.options["name"] == f"{cfg.name}-assisted-4" and a4.options["lifetime"] == "detached"
    assert a9.args == () and a9.gpu_index is None  # cannot be made again: the controller forgets it if it dies
    assert native.gpu_index == 0 and native.args[2] == "native" and native.args[5] == "0"
