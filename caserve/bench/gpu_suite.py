"""``caserve bench gpu-suite``: every GPU figure of issue 13 in one command, within a fixed time.

Steps, each in its own subprocess with its own time budget (a step that fails or runs out of time is
reported, and the suite goes on)::

    environment      GPU, driver, torch, transformers, caserve commit           (this process)
    cuda_tests       pytest tests/test_gpu_cuda.py + remote runtime tests with the GPU server on the device
    remote_overhead  one subprocess per model: native vs assisted eager / graph / engine
    server_scaling   N tenants decoding with the serving engine against one GPU server
    onebox           the paper's experiment: 1 native + K assisted workers on pinned cores (caserve.bench.onebox)

The suite writes at most 7 files into ``--out`` (the device tool returns 8), rewriting ``suite.json`` and
``summary.md`` after every step, so a run cut short still leaves what it measured:
``suite.json``, ``summary.md``, ``cuda_tests.log``, ``remote_overhead.png``, ``server_scaling.png``,
``onebox_jct_cdf.png``, ``onebox_queue_delay.png``. Intermediate files live in a temporary folder.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from caserve.bench.compare import subprocess_env
from caserve.bench.datasets import REPO_ROOT

logger = logging.getLogger(__name__)

SCHEMA = "caserve-gpu-suite/1"
CUDA_TESTS = ("tests/test_gpu_cuda.py", "tests/test_remote_runtime.py")
TEST_DEVICE_ENV = "CASERVE_TEST_GPU_DEVICE"  # tests/conftest.py starts its GPU servers on this device
COMMIT_FILE = REPO_ROOT / ".gpu_wheels" / "COMMIT"  # written by scripts/fetch_gpu_wheels.sh
RESERVE_S = 15.0  # kept back from the total for the report


@dataclass
class Profile:
    """What each step runs and for how long, on a GPU (full) or on this CPU (``--quick``)."""

    device: str
    ro_models: tuple[str, ...]
    ro_tokens: int
    ro_runs: int
    scaling_model: str
    scaling_tenants: str
    scaling_tokens: int
    onebox: dict[str, Any]
    budgets: dict[str, float] = field(default_factory=dict)


def profile(device: str, quick: bool) -> Profile:
    if not quick:
        return Profile(device, ("gpt2-124m", "qwen2.5-0.5b"), 32, 3, "gpt2-124m", "1,2,4,8,16", 32,
                       {"model": "gpt2", "assisted": [0, 2, 4, 8], "num_requests": 200, "output_scale": 0.25,
                        "max_output": 192, "max_prompt_words": 48},
                       {"cuda_tests": 60, "remote_overhead:gpt2-124m": 55, "remote_overhead:qwen2.5-0.5b": 70,
                        "server_scaling": 85, "onebox": 185})
    return Profile(device, ("tiny-gpt2",), 8, 1, "tiny-gpt2", "1,2", 8,
                   {"model": "caserve/tiny-gpt2", "assisted": [0, 1], "num_requests": 12, "output_scale": 0.03,
                    "max_output": 8, "max_prompt_words": 24, "max_batch": 4, "start_timeout_s": 150},
                   # generous: about 2 minutes in all on the quiet 2-core machine, 10-15 with 8 sessions on it
                   {"cuda_tests": 120, "remote_overhead:tiny-gpt2": 300, "server_scaling": 360, "onebox": 420})


def environment() -> dict[str, Any]:
    import torch
    import transformers

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "cuda": torch.version.cuda,
                           "cuda_available": torch.cuda.is_available(), "cores": os.cpu_count(),
                           "machine": platform.machine(), "commit": commit()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["gpus"] = torch.cuda.device_count()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=15).stdout.strip()
            env["nvidia_smi"] = out
            env["driver"] = out.split(",")[1].strip() if "," in out else None
        except (OSError, subprocess.TimeoutExpired) as exc:
            env["nvidia_smi"] = f"failed: {exc}"
    for pkg in ("msgspec", "fastapi", "uvicorn", "pydantic", "numpy"):
        try:
            from importlib.metadata import version

            env[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing package is a fact to report
            env[pkg] = None
    return env


def commit() -> Optional[str]:
    """The checkout's commit: git when the tree has it, else the one the wheel script recorded."""
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    if os.environ.get("CASERVE_COMMIT"):
        return os.environ["CASERVE_COMMIT"]
    return COMMIT_FILE.read_text().strip() + " (recorded by fetch_gpu_wheels.sh)" if COMMIT_FILE.is_file() else None


def run_step(argv: list[str], budget_s: float, log: Path, env: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """Run one step in its own process group; kill the group when its budget is spent."""
    t0 = time.monotonic()
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**subprocess_env(), **(env or {}), "PYTHONUNBUFFERED": "1"}, cwd=REPO_ROOT)
        try:
            rc = proc.wait(timeout=max(1.0, budget_s))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc, status = None, "timeout"
    tail = log.read_text(errors="replace")[-1500:] if status != "ok" else ""
    return {"status": status, "returncode": rc, "seconds": round(time.monotonic() - t0, 1), "budget_s": budget_s,
            "log_tail": tail}


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "caserve.cli", *args]


def _read(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Suite:
    def __init__(self, out: Path, prof: Profile, time_limit_s: float) -> None:
        self.out, self.prof = out, prof
        self.deadline = time.monotonic() + time_limit_s
        self.work = Path(tempfile.mkdtemp(prefix="caserve-suite-"))
        self.doc: dict[str, Any] = {"schema": SCHEMA, "device": prof.device, "time_limit_s": time_limit_s,
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": {},
                                    "environment": None, "remote_overhead": [], "server_scaling": None,
                                    "onebox": None}

    def budget(self, name: str) -> float:
        return max(0.0, min(self.prof.budgets[name], self.deadline - RESERVE_S - time.monotonic()))

    def step(self, name: str, argv: list[str], env: Optional[dict[str, str]] = None,
             log: Optional[Path] = None) -> dict[str, Any]:
        budget = self.budget(name)
        if budget < 5:
            rec = {"status": "skipped", "reason": "the suite's time limit was spent", "budget_s": budget}
        else:
            logger.info("step %s (budget %.0fs)", name, budget)
            rec = run_step(argv, budget, log or self.work / f"{name.replace(':', '_')}.log", env)
            logger.info("step %s: %s in %.0fs", name, rec["status"], rec["seconds"])
        self.doc["steps"][name] = rec
        return rec

    def run(self) -> dict[str, Any]:
        from caserve.bench.suite_report import write_report

        p = self.prof
        self.out.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            self.doc["environment"] = environment()
            self.doc["steps"]["environment"] = {"status": "ok", "seconds": round(time.monotonic() - t0, 1)}
        except Exception as exc:  # noqa: BLE001 - reported, the suite goes on
            self.doc["steps"]["environment"] = {"status": "failed", "log_tail": f"{type(exc).__name__}: {exc}"}
        write_report(self.doc, self.out)
        self._cuda_tests()
        write_report(self.doc, self.out)
        for model in p.ro_models:
            out = self.work / f"ro_{model}.json"
            self.step(f"remote_overhead:{model}", _cli(
                "bench", "remote-overhead", "--models", model, "--modes", "eager,graph,engine", "--device", p.device,
                "--native-device", p.device, "--new-tokens", str(p.ro_tokens), "--runs", str(p.ro_runs),
                "--out", str(out)))
            if (doc := _read(out)) is not None:
                self.doc["remote_overhead"].extend(doc["results"])
            write_report(self.doc, self.out)
        out = self.work / "scaling.json"
        self.step("server_scaling", _cli(
            "bench", "server-scaling", "--model", p.scaling_model, "--tenants", p.scaling_tenants, "--device", p.device,
            "--new-tokens", str(p.scaling_tokens), "--runs", "2", "--out", str(out)))
        self.doc["server_scaling"] = _read(out)
        write_report(self.doc, self.out)
        out = self.work / "onebox.json"
        spec = {**p.onebox, "gpu_device": p.device}
        self.step("onebox", [sys.executable, "-m", "caserve.bench.onebox", "--spec", json.dumps(spec), "--out", str(out)])
        self.doc["onebox"] = _read(out)
        self.doc["seconds"] = round(time.monotonic() - t0, 1)
        write_report(self.doc, self.out, final=True)
        shutil.rmtree(self.work, ignore_errors=True)
        return self.doc

    def _cuda_tests(self) -> None:
        # On a CPU dry run the remote runtime tests would only repeat CI; the CUDA file checks its own skips.
        wanted = CUDA_TESTS if self.prof.device != "cpu" else CUDA_TESTS[:1]
        present = [t for t in wanted if (REPO_ROOT / t).is_file()]
        missing = [t for t in wanted if t not in present]
        log = self.out / "cuda_tests.log"
        log.write_text(f"missing test files: {missing}\n" if missing else "")
        if not present:
            self.doc["steps"]["cuda_tests"] = {"status": "skipped", "reason": f"no test files: {missing}"}
            return
        junit = self.work / "cuda_tests.xml"
        rec = self.step("cuda_tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                                       f"--junitxml={junit}", *present],
                        env={TEST_DEVICE_ENV: self.prof.device}, log=log)
        rec["files"], rec["missing"] = present, missing
        rec["counts"] = junit_counts(junit)


def junit_counts(path: Path) -> Optional[dict[str, int]]:
    """tests / failures / errors / skipped of a pytest JUnit XML file."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def run(out: Path, *, device: str = "cuda", quick: bool = False, time_limit_s: Optional[float] = None) -> dict[str, Any]:
    """The whole suite; ``time_limit_s`` defaults to 470 s (full) or 1200 s (quick)."""
    limit = time_limit_s if time_limit_s is not None else (1200.0 if quick else 470.0)
    return Suite(Path(out), profile(device, quick), limit).run()
