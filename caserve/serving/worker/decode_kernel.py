"""The varlen decode-attention kernel of CPU workers (``decode_attention.c``): built, loaded and called.

PyTorch's CPU SDPA attends every row of a batch over the same number of columns. With continuous
batching a decode step mixes rows that have just started with rows that have decoded for long, and
over one shared window the short rows read (and mask) the long row's columns. The kernel gives each row
its own range of columns in the slot cache, in one call per layer.

It is plain C, compiled on first use with the machine's C compiler (``$CC``, a command line such as
``zig cc`` or ``ccache gcc``, else ``cc``) for this CPU (``-march=native``) into a per-user cache
(``$CASERVE_CACHE_DIR``, else ``~/.cache/caserve``), keyed by the source, the compiler, the flags and the
CPU's feature flags, and loaded with ctypes (which lets go of the GIL during the call). The worker runs
what it loads, so the cache folder must be the user's own (others lose write access to it), and a
cached library that another user could have written is built again. The kernel is built with OpenMP
(the rows of a call shared among the worker's torch threads) where the compiler has it; where it does
not (a clang without libomp: the option refused, or a library that cannot load for want of the
runtime) it is built again without, and each call runs on one thread; a refusal is remembered in the
cache (``*.refused``, keyed like the library), so that later starts do not ask again. Where no build works,
:func:`load` returns None and the engine attends per run of slots with SDPA instead (``attention.py``);
``CASERVE_DECODE_KERNEL=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_attention.c")
# The parts of -ffast-math that let the reductions and expf vectorize, without -ffast-math itself: linked
# into a shared library, that one would set flush-to-zero for the whole process when it loads (denormals
# would vanish in torch and Python alike). Every score is finite (rows attend over their own ranges, no
# -inf masking), which finite-only math assumes.
FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math",
         "-freciprocal-math", "-ffinite-math-only", "-shared", "-fPIC")
OPENMP = "-fopenmp"  # added where the compiler has it; without, the source's one pragma is ignored
ENV_SWITCH = "CASERVE_DECODE_KERNEL"
CACHE_ENV = "CASERVE_CACHE_DIR"
COMPILE_TIMEOUT_S = 60


class DecodeKernel:
    """The loaded kernel. :meth:`__call__` checks what it is given and returns the attention output."""

    def __init__(self, lib: ctypes.CDLL, path: Path, threaded: bool = True) -> None:
        self.path = path
        self.threaded = threaded  # built with OpenMP: a call shares its rows among torch's threads
        fn = lib.caserve_decode_attention
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr] + [i64] * 10 + [ctypes.c_float, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._fn = fn

    @staticmethod
    def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
        """Whether the kernel can take these [n, heads, 1, dim] queries and [n, kv_heads, window, dim]
        keys and values: float32 on the CPU, one query position, heads a multiple of the key-value heads,
        keys and values of the same shape, each key and value column contiguous (the kernel reads the
        columns a row's range names, so every shape it relies on is checked here)."""
        n, heads, q_len, dim = query.shape
        return (query.device.type == "cpu" and q_len == 1
                and query.dtype == key.dtype == value.dtype == torch.float32
                and key.dim() == value.dim() == 4 and key.shape[0] == value.shape[0] == n
                and key.shape[1] == value.shape[1] and heads % key.shape[1] == 0
                and key.shape[2] == value.shape[2]
                and key.shape[3] == dim and value.shape[3] == dim
                and key.stride(3) == 1 and value.stride(3) == 1)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, ranges: "Ranges",
                 scale: float) -> torch.Tensor:
        """Attention of each row ``r`` of ``query`` [n, heads, 1, dim] over its columns ``ranges`` of
        ``key`` and ``value`` [n, kv_heads, window, dim] (views of the slot cache, read in place).
        Returns [n, 1, heads, dim], the layout Transformers' attention functions return."""
        if not self.supports(query, key, value):
            raise ValueError("the decode kernel takes float32 CPU tensors of one query position")
        n, heads, _, dim = query.shape
        if ranges.rows != n or ranges.top > key.shape[2]:
            raise ValueError(f"{ranges.rows} column ranges up to {ranges.top} for {n} rows of "
                             f"{key.shape[2]} columns")
        q = query.reshape(n, heads, dim).contiguous()
        out = torch.empty(n, 1, heads, dim, dtype=torch.float32)
        ks, vs = key.stride(), value.stride()
        failed = self._fn(q.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), ranges.lo.data_ptr(),
                          ranges.hi.data_ptr(), n, heads, key.shape[1], dim, ks[0], ks[1], ks[2], vs[0], vs[1],
                          vs[2], float(scale), torch.get_num_threads() if self.threaded else 1)
        if failed:
            raise MemoryError("the decode kernel could not allocate its scratch memory")
        return out


class Ranges:
    """The columns ``[lo[r], hi[r])`` that row ``r`` of a decode step attends over, checked once per step
    (every layer's call reads them)."""

    def __init__(self, lo: Sequence[int], hi: Sequence[int]) -> None:
        if len(lo) != len(hi) or not lo or any(not 0 <= a < b for a, b in zip(lo, hi)):
            raise ValueError("column ranges need 0 <= lo < hi for every row")
        self.rows, self.top = len(lo), max(hi)
        self.lo = torch.tensor(lo, dtype=torch.int64)
        self.hi = torch.tensor(hi, dtype=torch.int64)


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "caserve")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _vector_math(version: bytes) -> tuple[str, ...]:
    """Flags that give the softmax glibc's vector ``expf`` (libmvec): GCC takes it from the source's
    declaration; clang needs ``-fveclib=libmvec`` (without it the kernel ran 1.3-1.6x slower on rows of
    100-800 columns)."""
    if b"clang" in version and platform.machine() == "x86_64" and platform.libc_ver()[0] == "glibc":
        return ("-fveclib=libmvec",)
    return ()


class NoCompiler(RuntimeError):
    """The compiler named is not on the PATH (no build is worth trying)."""


class CompileFailed(RuntimeError):
    """The compiler refused the source or the flags; ``target`` is the library that was to be built."""

    def __init__(self, message: str, target: Path) -> None:
        super().__init__(message)
        self.target = target


class UnsafeCache(RuntimeError):
    """The build cache belongs to another user: a library loaded from it could run their code in the
    worker."""


def _mine(st: os.stat_result) -> bool:
    """Whether the file ``st`` describes belongs to this user (always, where there are no user ids)."""
    return not hasattr(os, "getuid") or st.st_uid == os.getuid()


def _private_folder(folder: Path) -> None:
    """Raise :class:`UnsafeCache` unless ``folder`` is this user's; take write access away from others
    where they have it (they could have put a library there)."""
    st = folder.stat()
    if not _mine(st):
        raise UnsafeCache(f"{folder} belongs to another user: the decode kernel is not built or loaded there "
                          f"(set {CACHE_ENV} to a folder of your own)")
    if st.st_mode & 0o022:
        os.chmod(folder, stat.S_IMODE(st.st_mode) & ~0o022)
        logger.info("%s was writable by other users: no longer", folder)


def _trusted(path: Path) -> bool:
    """Whether ``path`` is a plain file of this user's that no one else can write (False when missing)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and not st.st_mode & 0o022 and _mine(st)


def build(compiler: Optional[str] = None, cache_dir: Optional[Path] = None, openmp: bool = True) -> Path:
    """Compile the kernel (or find it compiled) and return the shared library's path. ``compiler`` is a
    command line (``$CC``, else ``cc``); ``openmp`` adds ``-fopenmp``. Raises :class:`NoCompiler` when
    the compiler is not found, :class:`UnsafeCache` when the cache folder is another user's,
    ``RuntimeError`` when the compile fails."""
    named = compiler or os.environ.get("CC") or "cc"
    command = shlex.split(named)
    exe = shutil.which(command[0]) if command else None
    if exe is None:
        raise NoCompiler(f"no C compiler {named!r} on the PATH")
    command[0] = exe
    source = SOURCE.read_bytes()
    version = subprocess.run([*command, "--version"], capture_output=True, timeout=COMPILE_TIMEOUT_S).stdout
    flags = FLAGS + ((OPENMP,) if openmp else ()) + _vector_math(version)
    key = hashlib.sha256(b"\0".join([source, " ".join(command).encode(), version, " ".join(flags).encode(),
                                     _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
    folder = cache_dir or _cache_dir()
    target = folder / f"decode_attention-{key}.so"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _private_folder(folder)  # the worker loads what lies here
    if _trusted(target):
        return target  # else (missing, another's, writable by others, a link) built again and replaced
    if _trusted(_refusal_mark(target)):  # this compiler refused these flags before: not asked again
        raise CompileFailed(f"compiling {SOURCE.name} failed before ({_refusal_mark(target).name})", target)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # compile aside, then move in place (atomic)
        partial = Path(tmp) / target.name
        done = subprocess.run([*command, *flags, str(SOURCE), "-o", str(partial), "-lm"], capture_output=True,
                              text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0 or not partial.exists():
            raise CompileFailed(f"compiling {SOURCE.name} failed: {done.stderr.strip()[-2000:]}", target)
        os.chmod(partial, 0o755)
        os.replace(partial, target)
    return target


def _refusal_mark(target: Path) -> Path:
    """The file that records that building ``target`` was refused while the build without OpenMP worked."""
    return target.with_suffix(".refused")


def _mark_refused(target: Path) -> None:
    """Record that building ``target`` (with OpenMP) was refused, so that later starts skip that try."""
    try:
        with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False) as f:
            f.write("the compiler refused these flags; the build without OpenMP worked\n")
        os.chmod(f.name, 0o644)
        os.replace(f.name, _refusal_mark(target))
    except OSError as exc:  # only a cost: the next start asks the compiler again
        logger.info("could not record the refused OpenMP build: %s", exc)


@functools.lru_cache(maxsize=1)
def load() -> Optional[DecodeKernel]:
    """The kernel, built on first use (with OpenMP, else without); None when it is switched off or cannot
    be built on this machine."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        logger.info("the varlen decode kernel is off (%s)", ENV_SWITCH)
        return None
    failures: list[str] = []
    refused: Optional[Path] = None  # the OpenMP build, where the compiler refused it
    for openmp in (True, False):
        try:
            path = build(openmp=openmp)
            kernel = DecodeKernel(ctypes.CDLL(str(path)), path, threaded=openmp)
        except (NoCompiler, UnsafeCache) as exc:
            failures.append(str(exc))
            break
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            failures.append(f"{'with' if openmp else 'without'} OpenMP: {exc}")
            if openmp and isinstance(exc, CompileFailed):
                refused = exc.target
            continue
        if failures:
            if refused is not None and not _trusted(_refusal_mark(refused)):
                _mark_refused(refused)  # a refusal confirmed by the build without: not asked again
            logger.info("the varlen decode kernel runs on one thread per call (%s)", failures[0])
        logger.info("varlen decode kernel loaded from %s", path)
        return kernel
    logger.warning("the varlen decode kernel is unavailable, decode attention runs per run of slots: %s",
                   "; ".join(failures))
    return None
