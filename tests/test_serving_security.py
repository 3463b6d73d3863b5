"""The router's control plane attacked from outside: a stranger who can reach the router's port.

One router (``caserve serve`` with an API key and a worker token from 0600 files, one CPU worker of its
own started with the token in its environment) plus one external worker ``w1``. Every attack is
followed by the invariants: the real workers keep their sessions and keep serving, the router's tables
do not grow, and the stranger never sees a user's prompt.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import wait_until
from serving_procs import TINY, Cluster, self_signed_cert
from caserve.serving.messages import WORKER_TOKEN_HEADER

WORKER_ROUTES = [  # (method, path): every route of the worker channel, and the controller's drain
    ("POST", "/internal/workers/register"),
    ("GET", "/internal/workers/w1/channel?session=x"),
    ("POST", "/internal/workers/w1/events"),
    ("POST", "/internal/workers/w1/heartbeat"),
    ("POST", "/internal/workers/w1/unregister"),
    ("POST", "/internal/workers/w1/drain"),
]
SECRET_PROMPT = "my password is hunter2-" + secrets.token_hex(4)
API_KEY = secrets.token_urlsafe(24)
KEY = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    c = Cluster(tmp_path_factory.mktemp("security"))
    key_file = c.log_dir / "api-key"
    key_file.touch(mode=0o600)
    key_file.write_text(API_KEY)
    try:
        c.router("--api-key-file", str(key_file), "--cpu-workers", "1", "--worker-threads", "1",
                 "--max-body-size", "1MiB")
        c.worker("w1")
        c.wait_workers({"w1", "cpu-0"}, timeout=300)
        yield c
    finally:
        c.stop()


def client(c: Cluster, key: str) -> Any:
    return openai.OpenAI(base_url=f"{c.url}/v1", api_key=key, max_retries=0, timeout=60)


def serves(c: Cluster) -> str:
    """One greedy completion with the right key; returns the worker that answered."""
    resp = client(c, API_KEY).with_raw_response.completions.create(
        model=TINY, prompt="still there?", max_tokens=3, temperature=0)
    assert resp.parse().choices[0].finish_reason in ("stop", "length")
    return resp.headers["x-caserve-worker-id"]


def sessions(c: Cluster) -> dict[str, float]:
    return {w["id"]: w["registered_at"] for w in c.workers()}


def router_log(c: Cluster) -> str:
    return next(p for p in c.procs if p.name == "router").log.read_text(errors="replace")


def logged(c: Cluster, text: str, timeout: float = 10.0) -> bool:
    """Whether the router logs ``text`` within ``timeout`` seconds (it writes a refusal's line after
    sending the response, so the client can read the log before the line is there)."""
    return wait_until(lambda: text in router_log(c), timeout=timeout)


def register_body(worker_id: str, model: str = TINY) -> dict[str, Any]:
    return {"worker_id": worker_id, "kind": "cpu", "model": model, "task": "causal-lm", "max_batch": 8,
            "max_context": 1024}


@pytest.mark.parametrize("method,path", WORKER_ROUTES)
def test_worker_routes_refuse_a_missing_or_wrong_token(cluster: Cluster, method: str, path: str) -> None:
    c = cluster
    before = sessions(c)
    body = register_body("intruder") if path.endswith("register") else {"session": "x", "events": []}
    content = json.dumps(body).encode() if method == "POST" else None
    missing = httpx.request(method, c.url + path, content=content, timeout=10)
    wrong = httpx.request(method, c.url + path, content=content, timeout=10,
                          headers={WORKER_TOKEN_HEADER: secrets.token_urlsafe(24)})
    assert missing.status_code == 401 and "worker token" in missing.json()["error"]["message"]
    assert wrong.status_code == 403 and wrong.json()["error"]["message"] == "wrong worker token"
    # The API key is a client credential, not a worker's: it opens no worker route either.
    with_key = httpx.request(method, c.url + path, content=content, timeout=10,
                             headers=KEY)
    assert with_key.status_code == 401
    assert logged(c, f"refused {method} {path.split('?')[0]}")
    assert sessions(c) == before and not any(w["draining"] for w in c.workers())


def test_stranger_registering_a_worker_never_receives_a_users_prompt(cluster: Cluster) -> None:
    """The attack from issue 11: register a worker for the served model, open its channel, wait for
    another user's prompt. Every step is refused; the prompt reaches the real workers only."""
    c = cluster
    seen: list[bytes] = []
    with httpx.Client(base_url=c.url, timeout=10) as stranger:
        for headers in ({}, {WORKER_TOKEN_HEADER: "guess-" + secrets.token_hex(12)},
                        KEY):
            reg = stranger.post("/internal/workers/register", json=register_body("stranger"), headers=headers)
            seen.append(reg.content)
            assert reg.status_code in (401, 403)
            for worker_id in ("stranger", "w1", "cpu-0"):  # guessed sessions on real and made-up ids
                with stranger.stream("GET", f"/internal/workers/{worker_id}/channel",
                                     params={"session": secrets.token_hex(16)}, headers=headers) as ch:
                    seen.append(ch.read())
                    assert ch.status_code in (401, 403)
        answer = client(c, API_KEY).completions.create(
            model=TINY, prompt=SECRET_PROMPT, max_tokens=4, temperature=0)
        assert answer.choices[0].text is not None
        for worker_id in ("stranger", "w1"):
            drained = stranger.post(f"/internal/workers/{worker_id}/drain")
            seen.append(drained.content)
            assert drained.status_code == 401
    assert all(SECRET_PROMPT.encode() not in body for body in seen)
    assert "stranger" not in sessions(c) and set(sessions(c)) == {"w1", "cpu-0"}


def test_a_live_worker_id_cannot_be_taken_over(cluster: Cluster) -> None:
    """Even with the worker token, registering under a live worker's id is refused (409) and the real
    worker keeps its session and keeps serving."""
    c = cluster
    before = sessions(c)
    resp = httpx.post(f"{c.url}/internal/workers/register", json=register_body("w1"), headers=c.admin, timeout=10)
    assert resp.status_code == 409 and "live session" in resp.json()["error"]["message"]
    other_model = httpx.post(f"{c.url}/internal/workers/register", json=register_body("w1", model="other/model"),
                             headers=c.admin, timeout=10)
    assert other_model.status_code == 409  # ids are unique across models, not per model
    assert sessions(c) == before
    answered_by = {serves(c) for _ in range(4)}
    assert answered_by <= {"w1", "cpu-0"} and answered_by


def test_api_key_is_enforced_on_public_routes(cluster: Cluster) -> None:
    c = cluster
    with pytest.raises(openai.AuthenticationError):
        client(c, "sk-wrong-" + secrets.token_hex(8)).completions.create(model=TINY, prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(c, "sk-wrong-" + secrets.token_hex(8)).models.list()
    no_key = httpx.post(f"{c.url}/v1/chat/completions", json={"model": TINY, "messages": []}, timeout=10)
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert {m.id for m in client(c, API_KEY).models.list().data} == {TINY}
    assert serves(c) in {"w1", "cpu-0"}
    # /health: liveness for anyone, details with the API key or the worker token; /metrics: key or token.
    assert httpx.get(f"{c.url}/health", timeout=10).json() == {"status": "ok"}
    bad = httpx.get(f"{c.url}/health", headers={"Authorization": "Bearer nope-" + "x" * 20}, timeout=10)
    assert bad.json() == {"status": "ok"}
    for headers in (KEY, {WORKER_TOKEN_HEADER: c.worker_token}):
        assert TINY in httpx.get(f"{c.url}/health", headers=headers, timeout=10).json()["models"]
        assert "caserve_queue_length" in httpx.get(f"{c.url}/metrics", headers=headers, timeout=10).text
    assert httpx.get(f"{c.url}/metrics", timeout=10).status_code == 401


def test_oversized_bodies_are_refused_before_they_are_read(cluster: Cluster) -> None:
    c = cluster
    prompt = "a" * (10 << 20)  # 10 MB, over the 1 MiB limit this router was started with
    body = json.dumps({"model": TINY, "prompt": prompt, "max_tokens": 1}).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    with httpx.Client(timeout=30) as http:
        took = []
        for _ in range(3):
            t0 = time.perf_counter()
            resp = http.post(f"{c.url}/v1/completions", content=body, headers=headers)
            took.append(time.perf_counter() - t0)
            assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the router reads up to its limit, then refuses
            for _ in range(20):
                yield b"x" * (1 << 20)

        chunked = http.post(f"{c.url}/v1/completions", content=chunks(), headers=headers)
        assert chunked.status_code == 413
    # Client-side round trip, sending 10 MB over loopback included, on a shared 2-core machine.
    assert sorted(took)[1] < 2.0, took
    assert logged(c, "with 413 in")
    with pytest.raises(openai.APIStatusError) as refused:
        client(c, API_KEY).completions.create(model=TINY, prompt=prompt, max_tokens=1)
    assert refused.value.status_code == 413
    assert serves(c) in {"w1", "cpu-0"}


def test_made_up_model_names_do_not_grow_the_routers_tables(cluster: Cluster) -> None:
    c = cluster
    headers = KEY
    metrics_before = httpx.get(f"{c.url}/metrics", headers=headers, timeout=10).text
    with httpx.Client(base_url=c.url, headers=headers, timeout=10) as http:
        for i in range(100):
            name = f"made-up-{i}-" + secrets.token_hex(8) + ("x" * 5000 if i % 10 == 0 else "")
            routes = [("/v1/completions", {"model": name, "prompt": "x", "max_tokens": 1}),
                      ("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "x"}]}),
                      ("/v1/embeddings", {"model": name, "input": "x"}),
                      ("/v1/classifications", {"model": name, "input": "x"})]
            path, body = routes[i % len(routes)]
            resp = http.post(path, json=body)
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
            assert len(resp.content) < 1000  # a long name is not echoed back in full
            assert http.get(f"/v1/models/{name[:200]}").status_code == 404
    assert set(c.health()["models"]) == {TINY}
    assert {m.id for m in client(c, API_KEY).models.list().data} == {TINY}
    metrics_after = httpx.get(f"{c.url}/metrics", headers=headers, timeout=10).text
    assert "made-up" not in metrics_after
    series = lambda text: {line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")}  # noqa: E731
    assert series(metrics_after) == series(metrics_before)


def test_serve_passes_the_token_to_its_workers_off_the_command_line(cluster: Cluster) -> None:
    """``cpu-0`` registered (so it had the token), yet no process shows the token in its argv."""
    c = cluster
    assert "cpu-0" in sessions(c)
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            assert c.worker_token.encode() not in argv
            assert API_KEY.encode() not in argv


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
                    max_leaves=20)
FIELDS = st.fixed_dictionaries({}, optional={
    "worker_id": JSON | st.text(max_size=300), "kind": JSON | st.sampled_from(["cpu", "native", "gpu"]),
    "model": JSON | st.just(TINY), "task": JSON | st.just("causal-lm"), "max_batch": JSON, "max_context": JSON,
    "session": JSON, "events": JSON | st.lists(st.dictionaries(st.sampled_from(["type", "dispatch", "ids"]), JSON))})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(route=st.sampled_from([r for r in WORKER_ROUTES if r[0] == "POST"]), body=JSON | FIELDS,
       token=st.sampled_from(["none", "wrong", "right"]))
def test_hostile_json_to_worker_routes_is_refused(cluster: Cluster, route: tuple[str, str], body: Any,
                                                  token: str) -> None:
    c = cluster
    method, path = route
    if path.endswith("/drain"):
        path = path.replace("/w1/", "/nobody/")  # a token holder may drain; never the real worker here
    elif token == "right":
        path = path.replace("/w1/", "/intruder/")
    headers = {"none": {}, "wrong": {WORKER_TOKEN_HEADER: "w" * 32}, "right": c.admin}[token]
    resp = httpx.request(method, c.url + path, json=body, headers=headers, timeout=10)
    if token == "none":
        assert resp.status_code == 401
    elif token == "wrong":
        assert resp.status_code == 403
    else:  # a token holder's malformed message is a 4xx, never a 5xx and never a crash
        assert resp.status_code < 500, resp.text
        if resp.status_code == 200 and path.endswith("/register"):  # a well-formed registration slipped in
            httpx.post(f"{c.url}/internal/workers/{quote(body['worker_id'], safe='')}/unregister",
                       json={"session": resp.json()["session"]}, headers=c.admin, timeout=10)
    assert {"w1", "cpu-0"} <= set(sessions(c))


def test_router_still_serves_after_the_attacks(cluster: Cluster) -> None:
    c = cluster
    c.wait_for("only the real workers registered", lambda: set(sessions(c)) == {"w1", "cpu-0"}, timeout=20)
    assert serves(c) in {"w1", "cpu-0"}


# ------------------------------------------------------------------------------------ in process


def test_guard_in_process_decides_before_the_body_is_read() -> None:
    """The ASGI app alone (no sockets): what reaches the router's tables under each credential."""
    import asyncio

    from caserve.serving.router.api import create_app
    from caserve.serving.router.router import Router
    from caserve.serving.router.security import RouterSecurity

    token = secrets.token_urlsafe(24)
    router = Router(models=[TINY], max_models=2)
    app = create_app(router, RouterSecurity(token, max_body_bytes=1000))
    good = {WORKER_TOKEN_HEADER: token}

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as http:
            assert (await http.post("/internal/workers/register", json=register_body("a"))).status_code == 401
            wrong = await http.post("/internal/workers/register", json=register_body("a"),
                                    headers={WORKER_TOKEN_HEADER: token[:-1] + "?"})
            assert wrong.status_code == 403 and not router.models[TINY].workers
            first = await http.post("/internal/workers/register", json=register_body("a"), headers=good)
            assert first.status_code == 200
            session = router.models[TINY].workers["a"].session
            again = await http.post("/internal/workers/register", json=register_body("a"), headers=good)
            assert again.status_code == 409 and router.models[TINY].workers["a"].session == session
            for i in range(2):  # a token holder may add models, up to the router's bound
                ok = await http.post("/internal/workers/register", json=register_body(f"m{i}", f"model-{i}"),
                                     headers=good)
                assert ok.status_code == (200 if i == 0 else 409)
            assert len(router.models) == 2
            # No API key configured: public routes are open, unknown models 404 and add nothing.
            for i in range(50):
                resp = await http.post("/v1/completions", json={"model": f"nope-{i}", "prompt": "x"})
                assert resp.status_code == 404
            assert len(router.models) == 2
            assert TINY in (await http.get("/health")).json()["models"]  # open router: details for all

            async def chunked():  # no Content-Length: read up to the limit, then refused
                for _ in range(5):
                    yield b"x" * 400

            for path in ("/internal/workers/register/", "/%69nternal/workers/register", "/Internal/workers/register",
                         "/internal/workers/./register", "/v1/../internal/workers/register"):
                sneaky = await http.post(path, json=register_body("sneaky"))  # spellings of a worker route
                assert sneaky.status_code in (401, 404), (path, sneaky.status_code)
            assert set(router.models[TINY].workers) == {"a"}
            assert (await http.post("/v1/completions", content=chunked())).status_code == 413
            big = await http.post("/v1/completions", content=b"x" * 1001)
            assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
            # Worker routes have their own, larger limit: an events batch of 5000 bytes is read (and
            # decoded: its dispatch id was never sent to this session, so it is a 400, not a 413).
            events = await http.post("/internal/workers/a/events", headers=good, json={
                "session": session, "events": [{"type": "tokens", "dispatch": "d", "text": "x" * 5000}]})
            assert events.status_code == 400

    asyncio.run(scenario())


def test_router_security_refuses_short_secrets_and_bad_limits() -> None:
    from caserve.serving.router.security import RouterSecurity

    with pytest.raises(ValueError, match="worker token"):
        RouterSecurity("short")
    with pytest.raises(ValueError, match="API key"):
        RouterSecurity("t" * 32, api_key="k")
    with pytest.raises(ValueError, match="positive"):
        RouterSecurity("t" * 32, max_body_bytes=0)
    assert "t" * 32 not in repr(RouterSecurity("t" * 32, api_key="k" * 32))


def test_secret_files_and_the_cli_refuse_what_is_not_a_secret(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import subprocess
    import sys

    from caserve.serving.credentials import CredentialError, read_secret_file
    from serving_procs import REPO, child_env

    loose = tmp_path / "loose"
    loose.write_text("s" * 32 + "\nignored second line\n")
    loose.chmod(0o644)
    assert read_secret_file(loose, "worker token") == "s" * 32
    assert "readable by other users" in caplog.text
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(CredentialError, match="at least 16"):
        read_secret_file(short, "API key")
    env = {k: v for k, v in child_env().items() if k not in ("CASERVE_WORKER_TOKEN", "CASERVE_API_KEY")}
    for args, complaint in (
            (["worker", "--router", "http://127.0.0.1:9", "--kind", "cpu"], "worker token"),
            (["worker", "--router", "http://127.0.0.1:9", "--kind", "cpu", "--worker-token-file", str(short)],
             "at least 16"),
            (["serve", "--api-key-file", str(tmp_path / "missing")], "cannot read the API key file"),
            (["serve", "--max-body-size", "0"], "positive size")):
        done = subprocess.run([sys.executable, "-m", "caserve.cli", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, (args, done.stderr[-2000:])
        assert complaint in " ".join((done.stdout + done.stderr).split()), (args, done.stderr[-2000:])


def test_a_worker_whose_token_is_refused_stops_instead_of_retrying() -> None:
    import asyncio
    from types import SimpleNamespace

    from caserve.serving.worker.config import WorkerConfig
    from caserve.serving.worker.worker import Worker, WorkerTokenRefused

    token = "t" * 32
    worker, seen = Worker(WorkerConfig(router_url="http://r", kind="cpu", model="m", worker_id="w",
                                       router_token=token)), []
    worker.engine = SimpleNamespace(lm=SimpleNamespace(task="causal-lm"), context=64)  # type: ignore[assignment]

    def router(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get(WORKER_TOKEN_HEADER))
        return httpx.Response(403, json={"error": {"message": "wrong worker token"}})

    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(router),
                                     headers={WORKER_TOKEN_HEADER: token}) as client:
            with pytest.raises(WorkerTokenRefused, match="403"):
                await worker._register_with_backoff(client)

    asyncio.run(scenario())
    assert seen == [token]  # sent once, not retried


def test_cluster_mode_hands_one_token_to_every_actor_child_by_environment(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Path) -> None:
    """Without Ray: `cluster up`'s config carries the token through pickling (Ray's copy of actor
    arguments); router and worker actors put it in their child's environment, never its argv; the
    controller sends it. A token file configured in YAML is read once, where `cluster up` runs."""
    import asyncio
    import pickle

    from caserve.cluster import actors
    from caserve.cluster.config import parse_config
    from caserve.cluster.controller import ClusterController

    started: list[tuple[str, list[str], dict[str, str]]] = []

    class FakeProcess:  # records what SupervisedProcess would spawn
        def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
            started.append((name, argv, env))

        def start(self) -> "FakeProcess":
            return self

    monkeypatch.setattr(actors, "SupervisedProcess", FakeProcess)
    key_file = tmp_path / "key"
    key_file.write_text("k" * 32)
    key_file.chmod(0o600)
    cfg = pickle.loads(pickle.dumps(parse_config({
        "network": {"mode": "loopback"}, "router": {"api_key_file": str(key_file)}}).with_secrets()))
    assert cfg.worker_token and len(cfg.worker_token) >= 32 and cfg.api_key == "k" * 32
    assert cfg.worker_token not in cfg.model_dump_json()  # never written back to YAML/JSON
    actors.RouterActor(cfg)
    actors.WorkerActor(cfg, "assisted-0", "assisted", "http://127.0.0.1:8000", "127.0.0.1:7070")
    actors.WorkerActor(cfg, "native-0-0", "native", "http://127.0.0.1:8000", None, "0")
    assert [name for name, _, _ in started] == ["router", "assisted-0", "native-0-0"]
    for name, argv, env in started:
        assert env["CASERVE_WORKER_TOKEN"] == cfg.worker_token
        assert cfg.worker_token not in " ".join(argv) and "k" * 32 not in " ".join(argv)
    assert started[0][2]["CASERVE_API_KEY"] == "k" * 32 and "CASERVE_API_KEY" not in started[1][2]

    async def controller_header() -> str:
        ctrl = ClusterController(cfg)
        try:
            return ctrl._http.headers[WORKER_TOKEN_HEADER]
        finally:
            await ctrl._http.aclose()

    assert asyncio.run(controller_header()) == cfg.worker_token
    other = parse_config({"network": {"mode": "loopback"}}).with_secrets()
    assert other.worker_token != cfg.worker_token  # generated per deployment


def test_cluster_mode_passes_tls_to_router_gpu_servers_and_workers(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    """Without Ray: router.tls and gpu_server.tls in the cluster config reach the router's `caserve serve`
    (https URL, certificate, key, the CA its probe checks), every worker (--router-ca, and --tls-ca for the
    GPU server of an assisted one) and the controller's HTTP client; half a TLS config is refused."""
    import asyncio
    import ssl

    from caserve.cluster import actors
    from caserve.cluster.config import parse_config
    from caserve.cluster.controller import ClusterController
    from caserve.cluster.errors import ConfigError

    started: list[tuple[str, list[str]]] = []

    class FakeProcess:
        def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
            started.append((name, argv))

        def start(self) -> "FakeProcess":
            return self

    monkeypatch.setattr(actors, "SupervisedProcess", FakeProcess)
    crt, key = self_signed_cert(tmp_path, "router")
    gcrt, gkey = self_signed_cert(tmp_path, "gpu-server")
    cfg = parse_config({"network": {"mode": "loopback"},
                        "router": {"tls": {"cert": str(crt), "key": str(key)}},
                        "gpu_server": {"tls": {"cert": str(gcrt), "key": str(gkey)}}}).with_secrets()
    router = actors.RouterActor(cfg)
    assert router.url.startswith("https://")
    actors.WorkerActor(cfg, "assisted-0", "assisted", router.url, "127.0.0.1:7070")
    actors.WorkerActor(cfg, "native-0-0", "native", router.url, None, "0")
    (_, serve), (_, assisted), (_, native) = started
    flags = lambda argv: {a: argv[i + 1] for i, a in enumerate(argv) if a.startswith("--tls") or a == "--router-ca"}
    assert flags(serve) == {"--tls-cert": str(crt), "--tls-key": str(key), "--tls-ca": str(crt)}
    assert flags(assisted) == {"--tls-ca": str(gcrt), "--router-ca": str(crt)}
    assert flags(native) == {"--router-ca": str(crt)}

    async def controller_verifies() -> object:
        ctrl = ClusterController(cfg)
        try:
            return ctrl._http._transport._pool._ssl_context
        finally:
            await ctrl._http.aclose()

    context = asyncio.run(controller_verifies())
    assert isinstance(context, ssl.SSLContext) and context.verify_mode == ssl.CERT_REQUIRED
    assert len(context.get_ca_certs()) == 1  # the router's certificate, not the system store
    for bad in ({"cert": str(crt)}, {"key": str(key)}, {"ca": str(crt)}):
        with pytest.raises((ConfigError, ValueError), match="tls"):
            parse_config({"network": {"mode": "loopback"}, "router": {"tls": bad}})


def test_refusals_are_logged_within_a_budget(caplog: pytest.LogCaptureFixture) -> None:
    """A flood of refused requests writes at most the burst plus the rate's lines, and the next line
    written says how many were left out."""
    import logging

    from caserve.serving.router.security import RefusalLog

    now = [0.0]
    log = RefusalLog(logging.getLogger("caserve.test.refusals"), per_s=5.0, burst=20, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="caserve.test.refusals"):
        written = sum(log.warning("refused %d", i) for i in range(1000))  # one instant: only the burst
        assert written == 20 and log.suppressed == 980
        now[0] += 1.0  # a second later: five more lines, the first of them with the count
        written = sum(log.warning("refused %d", i) for i in range(100))
        assert written == 5
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 25
    assert lines[20] == "refused 0 (980 similar refusals not logged before this one)"
    assert log.suppressed == 95


def test_a_flood_of_refused_requests_does_not_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """The router's own guard: 300 requests without the worker token, refused in process; the log holds at
    most its burst plus what its rate allowed in the time taken, and every request still got its 401."""
    import asyncio
    import logging

    from caserve.serving.router import security
    from caserve.serving.router.api import create_app
    from caserve.serving.router.router import Router

    app = create_app(Router(models=[TINY]), security.RouterSecurity(secrets.token_urlsafe(24)))
    security.refusals.tokens = float(security.refusals.burst)  # a fresh budget for this test

    async def flood() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as http:
            return [(await http.post("/internal/workers/register", json=register_body("x"))).status_code
                    for _ in range(300)]

    with caplog.at_level(logging.WARNING, logger="caserve.serving.router.security"):
        started = time.monotonic()
        codes = asyncio.run(flood())
        elapsed = time.monotonic() - started
    assert codes == [401] * 300
    lines = [r for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(lines) <= security.refusals.burst + elapsed * security.refusals.per_s + 1
    assert len(lines) < 300
