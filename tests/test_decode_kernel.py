"""The varlen decode-attention kernel of CPU workers: each row's output equals SDPA over that row's own
columns (head sizes unrolled (16, 64, 128), vectorised at run time (24, 80) and plain (5), grouped-query
attention, ranges that do not start at column 0, keys and values read in place from a larger cache),
does not depend on the other rows or the thread count, refuses what it cannot take, and the engine
falls back to per-run SDPA when the kernel cannot be built."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from caserve.serving.worker import attention, decode_kernel
from caserve.serving.worker.decode_kernel import Ranges


@pytest.fixture(scope="module")
def kernel():
    k = decode_kernel.load()
    assert k is not None, "the machine has a C compiler: the kernel must build"
    return k


def reference(query, key, value, lo, hi, scale):
    """SDPA per row over its own columns (the grouped key-value heads repeated)."""
    group = query.shape[1] // key.shape[1]
    outs = []
    for r in range(query.shape[0]):
        k = key[r:r + 1, :, lo[r]:hi[r]].repeat_interleave(group, 1)
        v = value[r:r + 1, :, lo[r]:hi[r]].repeat_interleave(group, 1)
        outs.append(F.scaled_dot_product_attention(query[r:r + 1], k, v, scale=scale).transpose(1, 2))
    return torch.cat(outs)


def case(rng: random.Random, heads: int, kv_heads: int, dim: int, rows: int, length: int = 300):
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    slots = rows + rng.randint(0, 3)
    cache_k = torch.randn(slots, kv_heads, length, dim, generator=gen)
    cache_v = torch.randn(slots, kv_heads, length, dim, generator=gen)
    window = rng.randint(1, length)
    hi = [rng.randint(1, window) for _ in range(rows)]
    lo = [rng.choice([0, 0, h - 1, rng.randint(0, h - 1)]) for h in hi]
    query = torch.randn(rows, heads, 1, dim, generator=gen) * 3
    return query, cache_k[:rows, :, :window], cache_v[:rows, :, :window], lo, hi


# (heads, kv_heads, dim): every vector path, grouped queries, and the constant small heads (1, 2, 4 floats)
SHAPES = [(4, 4, 16), (14, 2, 64), (8, 4, 128), (3, 3, 24), (10, 2, 80), (6, 2, 5), (2, 2, 1), (4, 2, 2), (8, 2, 4)]


@pytest.mark.parametrize("heads,kv_heads,dim", SHAPES)
def test_each_row_equals_sdpa_over_its_own_columns(kernel, heads, kv_heads, dim) -> None:
    rng = random.Random(heads * 1000 + dim)
    for _ in range(12):
        query, key, value, lo, hi = case(rng, heads, kv_heads, dim, rows=rng.randint(1, 9))
        scale = rng.choice([dim ** -0.5, 0.1, 1.0])
        got = kernel(query, key, value, Ranges(lo, hi), scale)
        assert got.shape == (query.shape[0], 1, heads, dim)
        torch.testing.assert_close(got, reference(query, key, value, lo, hi, scale), rtol=1e-4, atol=5e-5)


def test_a_rows_output_depends_only_on_its_own_columns(kernel) -> None:
    """Bit for bit: a row alone, among others, and with two threads; columns outside its range, and
    other rows, never change it."""
    rng = random.Random(7)
    query, key, value, lo, hi = case(rng, 8, 2, 64, rows=6, length=400)
    together = kernel(query, key, value, Ranges(lo, hi), 0.125)
    for r in range(6):
        alone = kernel(query[r:r + 1], key[r:r + 1], value[r:r + 1], Ranges([lo[r]], [hi[r]]), 0.125)
        assert torch.equal(alone, together[r:r + 1])
    noisy_k, noisy_v = key.clone(), value.clone()
    for r in range(6):  # scribble over every column outside the row's range
        noisy_k[r, :, :lo[r]], noisy_k[r, :, hi[r]:] = 1e6, -1e6
        noisy_v[r, :, :lo[r]], noisy_v[r, :, hi[r]:] = float("nan"), 1e6
    assert torch.equal(kernel(query, noisy_k, noisy_v, Ranges(lo, hi), 0.125), together)
    assert torch.equal(on_two_threads(kernel, query, key, value, Ranges(lo, hi), 0.125), together)


def on_two_threads(kernel, *args):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        return kernel(*args)
    finally:
        torch.set_num_threads(threads)


def test_what_the_kernel_cannot_take_is_refused(kernel) -> None:
    rng = random.Random(3)
    query, key, value, lo, hi = case(rng, 4, 4, 16, rows=3, length=64)
    window = key.shape[2]
    for bad_lo, bad_hi in [([0, 0], [1]), ([0, 1, 0], [1, 1, 1]), ([-1, 0, 0], [1, 1, 1]), ([], [])]:
        with pytest.raises(ValueError):
            Ranges(bad_lo, bad_hi)
    with pytest.raises(ValueError, match="column ranges"):  # past the window of the keys it is given
        kernel(query, key, value, Ranges([0, 0, 0], [1, 1, window + 1]), 0.25)
    with pytest.raises(ValueError, match="column ranges"):  # ranges for another number of rows
        kernel(query, key, value, Ranges([0, 0], [1, 1]), 0.25)
    for q, k, v in [(query.double(), key.double(), value.double()),  # float32 only
                    (torch.cat([query, query], 2), key, value),  # one query position
                    (query, key[..., :8], value[..., :8]),  # the query's head size
                    (query[:, :3], key, value),  # heads a multiple of the key-value heads
                    (query, key, value[:, :, :window - 1]),  # values with fewer columns than keys
                    (query, key, value[:, :2]),  # values with fewer heads than keys
                    (query, key.transpose(2, 3).contiguous().transpose(2, 3), value)]:  # contiguous columns
        assert not kernel.supports(q, k, v)
        with pytest.raises(ValueError):
            kernel(q, k, v, Ranges([0, 0, 0], [1, 1, 1]), 0.25)


def test_the_attention_function_leaves_what_the_kernel_cannot_honour_to_sdpa(kernel, monkeypatch) -> None:
    """Under per-row ranges, a softcap, attention sinks, a sliding window, dropout or a float64 model go
    to SDPA over the step's (exact) mask; otherwise the kernel answers, with the module's scaling."""
    sdpa_calls: list[dict] = []
    plain = attention.sdpa_attention_forward

    def recorded(module, query, key, value, mask, **kwargs):
        sdpa_calls.append(kwargs)
        return plain(module, query, key, value, mask, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", recorded)
    rng = random.Random(11)
    query, key, value, lo, hi = case(rng, 4, 4, 16, rows=3, length=64)
    lo = [0, 0, 0]
    mask = (torch.arange(key.shape[2]).view(1, -1) < torch.tensor(hi).view(-1, 1))[:, None, None, :]
    module = torch.nn.Module()
    with attention.decoding(Ranges(lo, hi)):
        out, _ = attention.slot_run_attention(module, query, key, value, mask, scaling=0.3)
        assert not sdpa_calls
        expected = reference(query, key, value, lo, hi, 0.3)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        for extra in [{"softcap": 30.0}, {"s_aux": torch.zeros(4)}, {"sliding_window": 16}, {"dropout": 0.1}]:
            try:
                attention.slot_run_attention(module, query, key, value, mask, scaling=0.3, **extra)
            except ValueError as exc:  # Transformers 5.24's SDPA function refuses a softcap (5.17's does not)
                assert "softcap" in extra and "softcap" in str(exc)
            assert sdpa_calls.pop() == {"scaling": 0.3, **extra}
        out64, _ = attention.slot_run_attention(module, query.double(), key.double(), value.double(), mask,
                                                scaling=0.3)
        assert sdpa_calls and out64.dtype == torch.float64
        torch.testing.assert_close(out64.float(), expected, rtol=1e-5, atol=1e-5)


def test_build_failures_leave_the_engine_on_per_run_sdpa(monkeypatch, tmp_path) -> None:
    with pytest.raises(RuntimeError, match="no C compiler"):
        decode_kernel.build(compiler="caserve-no-such-cc", cache_dir=tmp_path)
    bad = tmp_path / "broken.c"
    bad.write_text("int caserve_decode_attention( {\n")
    monkeypatch.setattr(decode_kernel, "SOURCE", bad)
    with pytest.raises(RuntimeError, match="compiling broken.c failed"):
        decode_kernel.build(cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-written is left to load later

    from caserve.models import DEFAULT_MODEL, load_model
    from caserve.serving.worker.engine import Engine

    lm = load_model(DEFAULT_MODEL)
    decode_kernel.load.cache_clear()
    try:
        monkeypatch.setenv("CASERVE_CACHE_DIR", str(tmp_path / "cache"))  # the broken source, compiled afresh
        assert decode_kernel.load() is None
        engine = Engine(lm, max_batch=2)
        assert engine.runs and not engine.kernel
        decode_kernel.load.cache_clear()
        monkeypatch.setattr(decode_kernel, "SOURCE", Path(decode_kernel.__file__).with_name("decode_attention.c"))
        monkeypatch.setenv(decode_kernel.ENV_SWITCH, "0")
        assert decode_kernel.load() is None
        assert not Engine(lm, max_batch=2).kernel
    finally:
        decode_kernel.load.cache_clear()


def test_loading_and_calling_the_kernel_keeps_denormals(kernel) -> None:
    """The kernel must not switch the process to flush-to-zero (what -ffast-math does to a shared library
    as it loads): subnormal numbers stay representable in Python and in torch."""
    import ctypes
    import sys

    rng = random.Random(2)
    query, key, value, lo, hi = case(rng, 4, 4, 16, rows=2, length=32)
    kernel(query, key, value, Ranges(lo, hi), 0.25)
    ctypes.CDLL(str(kernel.path))  # loaded once more, as another worker would
    assert sys.float_info.min / 4 > 0.0
    tiny = torch.tensor([1e-39, 1e-44], dtype=torch.float32)  # below float32's smallest normal number
    assert bool((tiny * 1.0 > 0).all()) and bool((tiny + tiny > 0).all())


def test_a_built_kernel_is_reused_from_the_cache(tmp_path) -> None:
    first = decode_kernel.build(cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert decode_kernel.build(cache_dir=tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary folder left behind


def _fresh_load(monkeypatch, tmp_path: Path, compiler: str):
    """``decode_kernel.load()`` with ``$CC`` set to ``compiler`` and an empty build cache."""
    monkeypatch.setenv("CC", compiler)
    monkeypatch.setenv("CASERVE_CACHE_DIR", str(tmp_path / "cache"))
    decode_kernel.load.cache_clear()
    return decode_kernel.load()


def _assert_exact(kernel) -> None:
    """Every shape of the parametrised test above against SDPA, and one call bit for bit the same on one
    thread and on two."""
    rng = random.Random(5)
    for heads, kv_heads, dim in SHAPES:
        for _ in range(3):
            query, key, value, lo, hi = case(rng, heads, kv_heads, dim, rows=rng.randint(1, 9))
            got = kernel(query, key, value, Ranges(lo, hi), dim ** -0.5)
            torch.testing.assert_close(got, reference(query, key, value, lo, hi, dim ** -0.5), rtol=1e-4, atol=5e-5)
    query, key, value, lo, hi = case(rng, 8, 2, 64, rows=6, length=400)
    one = kernel(query, key, value, Ranges(lo, hi), 0.125)
    assert torch.equal(on_two_threads(kernel, query, key, value, Ranges(lo, hi), 0.125), one)


@pytest.mark.parametrize("fault", ["refused", "unloadable"])
def test_a_compiler_without_openmp_still_builds_the_kernel(monkeypatch, tmp_path, caplog, fault) -> None:
    """A clang without libomp either refuses ``-fopenmp`` or builds a library that cannot load (the
    OpenMP runtime's symbols undefined): the kernel is built again without it and runs each call on one
    thread, with the same results."""
    calls = tmp_path / "calls"
    on_openmp = ('echo "error: unsupported option \'-fopenmp\'" >&2; exit 1' if fault == "refused" else
                 'out=; prev=; for a in "$@"; do [ "$prev" = -o ] && out=$a; prev=$a; done; '
                 'echo "not a library" > "$out"; exit 0')
    wrapper = tmp_path / "cc-without-openmp"
    wrapper.write_text(f'#!/bin/sh\necho "$*" >> "{calls}"\n'
                       f'for a in "$@"; do if [ "$a" = -fopenmp ]; then {on_openmp}; fi; done\n'
                       'exec cc "$@"\n')
    wrapper.chmod(0o755)
    try:
        with caplog.at_level("INFO", logger=decode_kernel.__name__):
            kernel = _fresh_load(monkeypatch, tmp_path, str(wrapper))
        assert kernel is not None and not kernel.threaded
        compiles = [line for line in calls.read_text().splitlines() if "--version" not in line]
        assert len(compiles) == 2 and "-fopenmp" in compiles[0] and "-fopenmp" not in compiles[1]
        assert "one thread per call" in caplog.text and "with OpenMP" in caplog.text
        _assert_exact(kernel)
        calls.unlink()
        assert _fresh_load(monkeypatch, tmp_path, str(wrapper)).path == kernel.path  # the next worker's start
        # reuses the build without OpenMP and compiles nothing: a refusal is remembered, an unloadable
        # library is cached (and fails to load at once)
        assert [line for line in calls.read_text().splitlines() if "--version" not in line] == []
        refusals = list((tmp_path / "cache").glob("*.refused"))
        assert len(refusals) == (1 if fault == "refused" else 0)
    finally:
        decode_kernel.load.cache_clear()


def test_clang_builds_the_kernel(monkeypatch, tmp_path) -> None:
    """The source's clang branches (its vector shuffles; glibc's vector expf through ``-fveclib``) built
    by a real clang: zig's, from PyPI (``ziglang``, in the test extras), given as a command line in
    ``$CC``."""
    import platform
    import shlex
    import subprocess
    import sys

    clang = f"{shlex.quote(sys.executable)} -m ziglang cc"
    version = subprocess.run(shlex.split(clang) + ["--version"], capture_output=True, text=True, timeout=60)
    assert "clang" in version.stdout
    try:
        kernel = _fresh_load(monkeypatch, tmp_path, clang)
        assert kernel is not None, "zig's clang must build the kernel"
        if platform.machine() == "x86_64" and platform.libc_ver()[0] == "glibc":  # glibc's vector expf
            assert b"_ZGVdN8v_expf" in kernel.path.read_bytes()
        _assert_exact(kernel)
    finally:
        decode_kernel.load.cache_clear()


def test_the_worker_loads_only_a_library_no_one_else_could_have_written(monkeypatch, tmp_path, caplog) -> None:
    """The worker runs the library it loads: a cache folder that others can write loses their access, a
    cached library that others could have written (or a link in its place) is built again, and another
    user's folder is refused, once, with the engine left on per-run SDPA."""
    import ctypes
    import stat

    folder = tmp_path / "cache"
    built = decode_kernel.build(cache_dir=folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o777)
    assert decode_kernel.build(cache_dir=folder) == built
    assert not stat.S_IMODE(folder.stat().st_mode) & 0o022
    built.write_bytes(b"planted")
    built.chmod(0o666)
    assert decode_kernel.build(cache_dir=folder) == built
    assert built.read_bytes() != b"planted" and not stat.S_IMODE(built.stat().st_mode) & 0o022
    ctypes.CDLL(str(built))
    elsewhere = tmp_path / "elsewhere.so"
    elsewhere.write_bytes(b"planted")
    built.unlink()
    built.symlink_to(elsewhere)
    assert decode_kernel.build(cache_dir=folder) == built and not built.is_symlink()
    assert elsewhere.read_bytes() == b"planted"
    ctypes.CDLL(str(built))

    owner = folder.stat().st_uid
    monkeypatch.setattr(decode_kernel.os, "getuid", lambda: owner + 1)
    with pytest.raises(decode_kernel.UnsafeCache, match="belongs to another user"):
        decode_kernel.build(cache_dir=folder)
    monkeypatch.setenv("CASERVE_CACHE_DIR", str(folder))
    decode_kernel.load.cache_clear()
    try:
        with caplog.at_level("WARNING", logger=decode_kernel.__name__):
            assert decode_kernel.load() is None
        assert caplog.text.count("belongs to another user") == 1  # not tried again without OpenMP
    finally:
        decode_kernel.load.cache_clear()
