"""Workloads: the prompts a benchmark sends.

Every loader takes a path to a file of the documented format (the defaults live in ``../shared/datasets``
beside the project checkout, or in ``$CASERVE_DATA_DIR``) and returns a list of :class:`BenchRequest`. Nothing here downloads anything.

| name       | format                                                              | requests           |
|------------|---------------------------------------------------------------------|--------------------|
| sharegpt   | JSON list (or JSONL) of ``{"conversations": [{"from", "value"}]}``  | first human turn   |
| wikitext2  | raw WikiText text, `` = Heading = `` lines                          | continuation       |
| sst2       | TSV ``sentence<TAB>label`` with a header row                        | classification     |
| agnews     | CSV ``Class,Title,Article`` with a header row                       | classification     |
| synthetic  | none (seeded random words)                                          | generation         |

Token counts here are whitespace-word counts (``approx_tokens``); the load generator replaces them with the
server's ``usage`` counts when the server reports them.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

logger = logging.getLogger(__name__)

Task = Literal["generate", "classify"]

#: Default data directory: ``shared/datasets`` beside the project checkout, unless ``$CASERVE_DATA_DIR``
#: names another (the tests point it at their excerpts in ``tests/data``).
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "datasets"
DATA_DIR_ENV = "CASERVE_DATA_DIR"


def default_data_dir() -> Path:
    """Where datasets named without a path are read from: ``$CASERVE_DATA_DIR``, else DEFAULT_DATA_DIR."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env) if env else DEFAULT_DATA_DIR

DEFAULT_FILES = {
    "sharegpt": "sharegpt_v3_first_turn_500.json",
    "wikitext2": "wikitext2_test.txt",
    "sst2": "sst2_dev.tsv",
    "agnews": "ag_news_sample.csv",
}


class DatasetError(ValueError):
    """A dataset file is missing, malformed, or holds no usable requests."""


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload.

    ``prompt_len`` is an approximate token count; ``output_len`` is the ``max_tokens`` asked for
    (0 for pure classification / embedding requests).
    """

    prompt: str
    prompt_len: int
    output_len: int
    task: Task = "generate"
    label: Optional[int] = None


def approx_tokens(text: str) -> int:
    """Whitespace-word count, at least 1: a tokenizer-free stand-in for a prompt's token count."""
    return max(1, len(text.split()))


def default_path(name: str, data_dir: Optional[Path] = None) -> Path:
    if name not in DEFAULT_FILES:
        raise DatasetError(f"dataset {name!r} has no default file")
    return Path(data_dir or default_data_dir()) / DEFAULT_FILES[name]


def _require(path: Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    return path


def load_sharegpt(path: Path, *, output_len: int = 128, max_prompt_words: int = 1024) -> list[BenchRequest]:
    """First human turn of each conversation; JSON list or JSON Lines."""
    text = _require(path).read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not JSON or JSONL: {exc}") from exc
    out: list[BenchRequest] = []
    for rec in records:
        turns = rec.get("conversations") if isinstance(rec, dict) else None
        if not turns:
            continue
        first = next((t for t in turns if t.get("from") in ("human", "user")), None)
        if first is None or not str(first.get("value", "")).strip():
            continue
        words = str(first["value"]).split()[:max_prompt_words]
        prompt = " ".join(words)
        out.append(BenchRequest(prompt, approx_tokens(prompt), output_len))
    return _nonempty(out, path)


def load_wikitext(
    path: Path, *, prompt_words: int = 48, output_len: int = 64, min_paragraph_words: int = 32
) -> list[BenchRequest]:
    """Continuation prompts: the first ``prompt_words`` words of each body paragraph (headings skipped);
    ``output_len`` is capped by how many words of the paragraph remain."""
    out: list[BenchRequest] = []
    for line in _require(path).read_text(encoding="utf-8").splitlines():
        s = line.strip()
        if not s or (s.startswith("=") and s.endswith("=")):
            continue
        words = s.split()
        if len(words) < min_paragraph_words:
            continue
        head = words[: min(prompt_words, len(words) // 2)]
        prompt = " ".join(head)
        out.append(BenchRequest(prompt, len(head), max(1, min(output_len, len(words) - len(head)))))
    return _nonempty(out, path)


def load_sst2(path: Path, *, output_len: int = 0) -> list[BenchRequest]:
    """SST-2 TSV ``sentence<TAB>label`` (0/1) with a header row."""
    out: list[BenchRequest] = []
    with _require(path).open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if not header or header[0].strip().lower() != "sentence":
            raise DatasetError(f"{path}: expected a 'sentence<TAB>label' header, got {header!r}")
        for row in reader:
            if len(row) < 2 or not row[0].strip():
                continue
            text = row[0].strip()
            out.append(BenchRequest(text, approx_tokens(text), output_len, "classify", int(row[1])))
    return _nonempty(out, path)


def load_agnews(path: Path, *, output_len: int = 0) -> list[BenchRequest]:
    """AG News CSV ``Class,Title,Article`` (classes 1-4) with a header row; prompt = title + article."""
    out: list[BenchRequest] = []
    with _require(path).open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or header[0].strip().lower() != "class":
            raise DatasetError(f"{path}: expected a 'Class,Title,Article' header, got {header!r}")
        for row in reader:
            if len(row) < 3:
                continue
            text = f"{row[1].strip()}. {row[2].strip()}".replace("\\", " ")
            out.append(BenchRequest(text, approx_tokens(text), output_len, "classify", int(row[0])))
    return _nonempty(out, path)


_VOCAB = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there been one all we their has would when if so no out up into do "
    "time model server request token queue worker cluster latency memory compute batch node"
).split()


def synthetic(
    n: int, *, prompt_len: int = 32, output_len: int = 32, spread: float = 0.5, seed: int = 0
) -> list[BenchRequest]:
    """Seeded random-word prompts; lengths uniform in ``[len*(1-spread), len*(1+spread)]``."""
    if n < 1:
        raise DatasetError("synthetic workload needs n >= 1")
    rng = random.Random(seed)

    def draw(mean: int) -> int:
        lo, hi = max(1, int(mean * (1 - spread))), max(1, int(mean * (1 + spread)))
        return rng.randint(lo, hi)

    out = []
    for _ in range(n):
        plen = draw(prompt_len)
        prompt = " ".join(rng.choice(_VOCAB) for _ in range(plen))
        out.append(BenchRequest(prompt, plen, draw(output_len) if output_len > 0 else 0))
    return out


def _nonempty(reqs: list[BenchRequest], path: Path) -> list[BenchRequest]:
    if not reqs:
        raise DatasetError(f"{path}: no usable requests")
    logger.debug("loaded %d requests from %s", len(reqs), path)
    return reqs


LOADERS: dict[str, Callable[..., list[BenchRequest]]] = {
    "sharegpt": load_sharegpt,
    "wikitext2": load_wikitext,
    "sst2": load_sst2,
    "agnews": load_agnews,
}
DATASET_NAMES: tuple[str, ...] = ("synthetic", *LOADERS)


def load_workload(
    name: str,
    n: int,
    *,
    path: Optional[Path] = None,
    seed: int = 0,
    output_len: Optional[int] = None,
    output_lens: Optional[Sequence[int]] = None,
    max_prompt_words: Optional[int] = None,
) -> list[BenchRequest]:
    """``n`` requests of dataset ``name`` (file ``path`` or the default one), sampled with a seeded RNG.

    ``output_len`` overrides every request's output length; ``output_lens`` (e.g. an Azure trace's
    GeneratedTokens) assigns them in order, cycling. ``max_prompt_words`` truncates prompts (useful for
    small-context models).
    """
    if name == "synthetic":
        reqs = synthetic(n, output_len=32 if output_len is None else output_len, seed=seed)
    elif name in LOADERS:
        pool = LOADERS[name](path or default_path(name))
        rng = random.Random(seed)
        reqs = rng.sample(pool, n) if n <= len(pool) else [rng.choice(pool) for _ in range(n)]
        if output_len is not None:
            reqs = [_replace(r, output_len=output_len) for r in reqs]
    else:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASET_NAMES)}")
    if output_lens is not None and len(output_lens) > 0:
        reqs = [_replace(r, output_len=int(output_lens[i % len(output_lens)])) for i, r in enumerate(reqs)]
    if max_prompt_words is not None:
        reqs = [_truncate(r, max_prompt_words) for r in reqs]
    return reqs


def _replace(r: BenchRequest, **kw) -> BenchRequest:
    d = dict(r.__dict__)
    d.update(kw)
    return BenchRequest(**d)


def _truncate(r: BenchRequest, words: int) -> BenchRequest:
    toks = r.prompt.split()
    if len(toks) <= words:
        return r
    prompt = " ".join(toks[:words])
    return _replace(r, prompt=prompt, prompt_len=words)
