"""Workload loaders: excerpts of the benchmark data files (tests/data) and any other file of the same format."""

from __future__ import annotations

import json

import pytest

from caserve.bench import datasets as ds
from bench_helpers import REPO_ROOT, TEST_DATA


def test_default_dir_is_shared_beside_checkout_unless_the_environment_names_one(monkeypatch):
    assert ds.DEFAULT_DATA_DIR == REPO_ROOT.parent / "shared" / "datasets"
    monkeypatch.delenv(ds.DATA_DIR_ENV, raising=False)
    assert ds.default_path("sst2") == ds.DEFAULT_DATA_DIR / "sst2_dev.tsv"
    monkeypatch.setenv(ds.DATA_DIR_ENV, str(TEST_DATA))
    assert ds.default_path("sst2") == TEST_DATA / "sst2_dev.tsv" and ds.default_path("sst2").is_file()


def test_test_data_are_small_excerpts_with_their_sources():
    files = {p.name: p.stat().st_size for p in TEST_DATA.iterdir()}
    readme = (TEST_DATA / "README.md").read_text()
    for name in [*ds.DEFAULT_FILES.values(), "azure_llm_trace_2023_conv.csv"]:
        assert 0 < files[name] < 16_000 and name in readme


def test_sharegpt_file():
    reqs = ds.load_sharegpt(TEST_DATA / "sharegpt_v3_first_turn_500.json", output_len=7)
    assert len(reqs) == 11
    assert all(r.prompt.strip() and r.output_len == 7 and r.task == "generate" for r in reqs)
    assert reqs[0].prompt.startswith("How to stop automatic updates")


def test_sharegpt_jsonl_and_skips_bad_records(tmp_path):
    p = tmp_path / "x.jsonl"
    rows = [
        {"id": "a", "conversations": [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "tell me a story"}]},
        {"id": "b", "conversations": []},
        {"id": "c", "conversations": [{"from": "human", "value": "   "}]},
    ]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    reqs = ds.load_sharegpt(p)
    assert [r.prompt for r in reqs] == ["tell me a story"]
    assert reqs[0].prompt_len == 4


def test_wikitext_continuations():
    reqs = ds.load_wikitext(TEST_DATA / "wikitext2_test.txt", prompt_words=20, output_len=30)
    assert len(reqs) >= 5
    assert all(r.prompt_len <= 20 and not r.prompt.startswith("=") for r in reqs)
    assert all(1 <= r.output_len <= 30 for r in reqs)


def test_sst2_and_agnews_labels():
    sst = ds.load_sst2(TEST_DATA / "sst2_dev.tsv")
    assert {r.label for r in sst} == {0, 1} and all(r.task == "classify" for r in sst)
    ag = ds.load_agnews(TEST_DATA / "ag_news_sample.csv")
    assert {r.label for r in ag} == {1, 2, 3, 4}
    assert ag[0].prompt.startswith("Fears for T N pension after talks.")


def test_any_path_of_same_format(tmp_path):
    tsv = tmp_path / "mine.tsv"
    tsv.write_text("sentence\tlabel\ngreat movie\t1\nawful\t0\n")
    assert [(r.prompt, r.label) for r in ds.load_sst2(tsv)] == [("great movie", 1), ("awful", 0)]
    csv_ = tmp_path / "mine.csv"
    csv_.write_text('Class,Title,Article\n2,"Goal, late","A late goal won it"\n')
    (r,) = ds.load_agnews(csv_)
    assert r.label == 2 and r.prompt == "Goal, late. A late goal won it"


def test_format_errors_are_typed(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tlabel\nx\t1\n")
    with pytest.raises(ds.DatasetError):
        ds.load_sst2(bad)
    with pytest.raises(ds.DatasetError):
        ds.load_sharegpt(tmp_path / "missing.json")
    (tmp_path / "nojson.json").write_text("{not json")
    with pytest.raises(ds.DatasetError):
        ds.load_sharegpt(tmp_path / "nojson.json")
    with pytest.raises(ds.DatasetError):
        ds.load_workload("nope", 3)


def test_synthetic_is_seeded():
    a, b, c = ds.synthetic(20, seed=1), ds.synthetic(20, seed=1), ds.synthetic(20, seed=2)
    assert a == b and a != c
    assert all(16 <= r.prompt_len <= 48 and r.prompt_len == len(r.prompt.split()) for r in a)


def test_load_workload_sampling_and_overrides():
    reqs = ds.load_workload("sst2", 10, seed=3, output_len=2, max_prompt_words=5)
    assert len(reqs) == 10 and all(r.output_len == 2 and r.prompt_len <= 5 for r in reqs)
    assert reqs == ds.load_workload("sst2", 10, seed=3, output_len=2, max_prompt_words=5)
    cyc = ds.load_workload("sharegpt", 4, output_lens=[5, 9])
    assert [r.output_len for r in cyc] == [5, 9, 5, 9]
    many = ds.load_workload("sharegpt", 30)  # more than the file holds: sampled with replacement
    assert len(many) == 30 and len({r.prompt for r in many}) <= 11
