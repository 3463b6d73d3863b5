"""Processes that never run a model do not load torch or transformers.

The router (inside ``caserve serve``'s own process), the CLI and the cluster config need no tensor
library; loading one costs every start several seconds of CPU and a few hundred MB of memory. A worker
started with a missing or weak token is refused before it loads them.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from serving_procs import REPO, child_env

HEAVY = ("torch", "transformers")


def _loaded_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    env = {k: v for k, v in child_env().items() if k not in ("CASERVE_WORKER_TOKEN", "CASERVE_API_KEY")}
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()


@pytest.mark.parametrize("module", ["caserve.cli", "caserve.serving.launch", "caserve.serving.router.api",
                                    "caserve.serving.router.router", "caserve.cluster.config"])
def test_light_modules_do_not_load_torch_or_transformers(module: str) -> None:
    assert _loaded_after(f"import {module}") == []


def test_the_probe_sees_a_module_that_does_load_them() -> None:
    assert _loaded_after("import caserve.models") == list(HEAVY)


def _refused_before_torch(argv: list[str], complaint: str) -> None:
    code = ("import typer\nfrom caserve.cli import app\n"
            f"try:\n    app({argv!r}, standalone_mode=False)\n"
            f"except typer.BadParameter as exc:\n    assert {complaint!r} in str(exc), exc\n"
            "else:\n    raise SystemExit('not refused')")
    assert _loaded_after(code) == []


@pytest.mark.parametrize("args,complaint", [
    (["--kind", "cpu"], "worker token"),
    (["--kind", "assisted"], "--gpu-server"),
    (["--kind", "gpu"], "kind must be one of"),
    (["--kind", "cpu", "--token-file", "/nonexistent/caserve-token"], "No such file"),
])
def test_a_worker_with_a_bad_layout_is_refused_before_loading_torch(args: list[str], complaint: str) -> None:
    _refused_before_torch(["worker", "--router", "http://127.0.0.1:9", *args], complaint)


@pytest.mark.parametrize("args,complaint", [
    (["--max-frame", "banana"], "cannot read size"),
    (["--tenant-memory-limit", "lots"], "cannot read size"),
    (["--token-file", "/nonexistent/caserve-token"], "No such file"),
    (["--admin-token-file", "/nonexistent/caserve-admin"], "No such file"),
])
def test_a_gpu_server_with_bad_settings_is_refused_before_loading_torch(args: list[str], complaint: str) -> None:
    _refused_before_torch(["gpu-server", "--port", "0", *args], complaint)


def test_serve_refuses_an_unreadable_gpu_server_token_file() -> None:
    _refused_before_torch(["serve", "--port", "0", "--native-workers", "0", "--assisted-workers", "0",
                          "--token-file", "/nonexistent/caserve-token"], "not a readable file")


@pytest.mark.parametrize("command", [["serve", "--port", "0", "--native-workers", "1", "--assisted-workers", "0"],
                                     ["worker", "--router", "http://127.0.0.1:9", "--kind", "cpu",
                                      "--worker-token-file", "/nonexistent/t"]])
@pytest.mark.parametrize("model", ["/nonexistent/caserve-model", "./no-such-caserve-model", "~/no-such-caserve-model"])
def test_a_model_path_that_is_not_a_folder_is_refused(command: list[str], model: str) -> None:
    """Workers would retry loading it for ever; the model check comes before the token file's."""
    _refused_before_torch([*command, "--model", model], "is not a folder")


def test_hub_ids_and_zoo_names_are_not_taken_for_paths() -> None:
    from caserve.cli_common import check_model_path

    for name in ("Qwen/Qwen2.5-0.5B", "gpt2-124m", "caserve/tiny-gpt2", None, str(REPO)):
        check_model_path(name)  # no refusal


def test_a_router_alone_takes_a_model_path_it_does_not_have(tmp_path) -> None:
    """Cluster mode starts the router with no workers, on a node that may lack the model's folder: the
    path is the workers' to check."""
    from serving_procs import free_port

    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "caserve.cli", "serve", "--port", str(free_port()),
                                 "--native-workers", "0", "--assisted-workers", "0", "--cpu-workers", "0",
                                 "--model", "/nonexistent/caserve-model"], cwd=REPO, env=child_env(),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "ready: the router alone" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None and "ready: the router alone" in log.read_text(), log.read_text()[-2000:]
    finally:
        proc.terminate()
        proc.wait(30)
