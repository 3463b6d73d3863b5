"""``caserve serve`` says "ready" only once every worker it started has registered and answered, prints
examples that fit the model's task, and serves a model from a path under ``--served-model-name``."""

from __future__ import annotations

import ssl
import time

import httpx
import pytest

from serving_procs import Cluster, openai_client, self_signed_cert
from test_serving_api import EMB
from caserve.serving.startup import usage_text


@pytest.mark.parametrize("task,wanted,unwanted", [
    ("causal-lm", ["/v1/completions", "chat.completions"], ["/v1/embeddings"]),
    ("seq2seq", ["/v1/completions"], ["/v1/embeddings", "chat.completions"]),
    ("embedding", ["/v1/embeddings", "embeddings.create"], ["/v1/completions", "chat"]),
    ("classification", ["/v1/classifications"], ["/v1/completions", "/v1/embeddings"]),
])
def test_examples_fit_the_task(task: str, wanted: list[str], unwanted: list[str]) -> None:
    text = usage_text("http://127.0.0.1:1", "m", task, workers=2)
    assert text.startswith("ready: 2 worker(s)")
    assert all(w in text for w in wanted) and not any(u in text for u in unwanted), text


def test_ready_after_the_workers_answer_with_a_served_name(tmp_path) -> None:
    c = Cluster(tmp_path)
    try:
        serve = c.start("serve", ["serve", "--port", str(c.port), "--model", EMB, "--served-model-name", "minilm",
                                  "--native-workers", "1", "--assisted-workers", "0", "--cpu-workers", "1",
                                  "--worker-threads", "1"])
        c.wait_for("ready", lambda: "ready: 2 worker(s)" in serve.log.read_text(errors="replace"), timeout=300)
        log = serve.log.read_text(errors="replace")
        ready_at = log.index("ready: 2 worker(s)")
        for worker in ("native-0", "cpu-0"):  # both registered before "ready"
            assert -1 < log.find(f"worker {worker} ") < ready_at, log[-3000:]
        assert "caserve is serving minilm at" in log and f"{c.url}/v1/embeddings" in log
        assert "/v1/completions" not in log[ready_at:]
        client = openai_client(c.url)
        assert [m.id for m in client.models.list().data] == ["minilm"]
        assert len(client.embeddings.create(model="minilm", input="hello").data[0].embedding) == 384
        assert {w["id"] for w in c.workers("minilm")} == {"native-0", "cpu-0"}
    finally:
        c.stop()


def test_no_ready_while_a_worker_cannot_start(tmp_path) -> None:
    c = Cluster(tmp_path)
    empty = tmp_path / "not-a-model"  # a folder without config.json: serve takes it, the worker cannot load it
    empty.mkdir()
    try:
        serve = c.start("serve", ["serve", "--port", str(c.port), "--model", str(empty),
                                  "--native-workers", "1", "--assisted-workers", "0", "--worker-threads", "1"])
        c.wait_for("the router", lambda: httpx.get(f"{c.url}/health", timeout=5).status_code == 200, timeout=120)
        c.wait_for("the worker's failure", lambda: any(w in serve.log.read_text(errors="replace")
                                                        for w in ("restarting", "cannot open device/model")),
                   timeout=300)
        time.sleep(3)
        log = serve.log.read_text(errors="replace")
        assert "ready: " not in log and "caserve is serving" not in log
    finally:
        c.stop()


def test_serve_over_https_carries_workers_and_users_and_refuses_what_does_not_check(tmp_path) -> None:
    """--tls-cert/--tls-key: the router's one port speaks HTTPS only; the workers it starts check its
    (self-signed) certificate and register over it; a client that checks against it is answered, one that
    trusts only the system store or speaks plain HTTP is not."""
    crt, key = self_signed_cert(tmp_path)
    c = Cluster(tmp_path)
    https = f"https://127.0.0.1:{c.port}"
    try:
        serve = c.start("serve", ["serve", "--port", str(c.port), "--native-workers", "1", "--assisted-workers", "0",
                                  "--worker-threads", "1", "--tls-cert", str(crt), "--tls-key", str(key)])
        c.wait_for("ready", lambda: "ready: 1 worker(s)" in serve.log.read_text(errors="replace"), timeout=300)
        log = serve.log.read_text(errors="replace")
        assert f"caserve is serving caserve/tiny-gpt2 at {https}" in log and f"--cacert {crt}" in log
        body = {"model": "caserve/tiny-gpt2", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
        resp = httpx.post(f"{https}/v1/completions", json=body, verify=ssl.create_default_context(cafile=str(crt)),
                          timeout=60)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 4
        with pytest.raises(httpx.ConnectError):  # the system store does not know a self-signed certificate
            httpx.post(f"{https}/v1/completions", json=body, timeout=10)
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the HTTPS port gets no answer
            httpx.post(f"{c.url}/v1/completions", json=body, timeout=10)
    finally:
        c.stop()


def test_serve_refuses_half_a_tls_configuration(tmp_path) -> None:
    from typer.testing import CliRunner

    from caserve.cli import app

    crt = tmp_path / "cert.pem"
    crt.write_text("not checked before both are given")
    for args in (["--tls-cert", str(crt)], ["--tls-key", str(crt)], ["--tls-ca", str(crt)],
                 ["--tls-cert", str(crt), "--tls-key", str(tmp_path / "missing.pem")]):
        result = CliRunner().invoke(app, ["serve", *args])
        assert result.exit_code == 2 and "tls" in result.output.lower(), (args, result.output)
