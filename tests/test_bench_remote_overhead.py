"""``caserve bench remote-overhead`` runs every mode end to end and reports what crossed the wire."""

from __future__ import annotations

import json

from caserve.bench import remote_overhead as ro


def test_remote_overhead_reports_every_mode(tmp_path):
    out = tmp_path / "ro.json"
    results = ro.run(["tiny-gpt2"], ["eager", "graph", "engine"], server=None, device="cpu", transport="auto",
                     native_device="cpu", new_tokens=6, runs=1, threads=1, out=out)
    by_mode = {r.mode: r for r in results}
    assert set(by_mode) == {"eager", "graph", "engine"}
    for r in results:
        assert r.native_ms_per_token > 0 and r.remote_ms_per_token > 0 and r.frames_per_token > 0
        assert r.server_cpu_s_per_token > 0 and "(random weights)" in r.model
    # A captured decode step is one record instead of one per op.
    assert by_mode["graph"].records_per_token < by_mode["eager"].records_per_token / 2
    assert by_mode["engine"].records_per_token < by_mode["graph"].records_per_token
    assert by_mode["eager"].step_replays_per_token == 0 and by_mode["engine"].step_replays_per_token > 0.5
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "remote-overhead" and len(saved["results"]) == 3
