"""Build (once per source and machine) and load the C kernels of kernels/cpu with ctypes."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# -march=native: the library is built on the machine that runs it (AVX-512 / AMX where present).
# -fopenmp-simd: honour the `omp simd` loop hints whether or not OpenMP is linked (below).
CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-strict-aliasing", "-shared", "-fPIC"]

# `SPLIT(begin, end, nth, call)`: run `call` (which reads int64 `a`, `b`) over [begin, end) cut
# into `nth` equal parts, one per thread of the OpenMP team. The kernels are linked against the
# OpenMP runtime torch already loaded (`openmp_runtime`), so their threads are torch's own: a
# second pool beside torch's spinning threads would oversubscribe the cores. Without OpenMP the
# whole range runs on the calling thread.
SPLIT_C = r"""
#ifdef _OPENMP
#include <omp.h>
#define SPLIT(BEGIN, END, NTH, CALL)                                                            \
    do {                                                                                        \
        const int64_t b0_ = (BEGIN), b1_ = (END);                                               \
        const int nth_ = (NTH) < (b1_ - b0_) ? (int)(NTH) : (int)(b1_ - b0_);                   \
        if (nth_ <= 1) { const int64_t a = b0_, b = b1_; CALL; break; }                         \
        _Pragma("omp parallel num_threads(nth_)")                                              \
        {                                                                                       \
            const int64_t id_ = omp_get_thread_num(), nt_ = omp_get_num_threads();              \
            const int64_t a = b0_ + (b1_ - b0_) * id_ / nt_;                                    \
            const int64_t b = b0_ + (b1_ - b0_) * (id_ + 1) / nt_;                              \
            CALL;                                                                               \
        }                                                                                       \
    } while (0)
#else
#define SPLIT(BEGIN, END, NTH, CALL) do { const int64_t a = (BEGIN), b = (END); CALL; } while (0)
#endif
"""


def openmp_runtime() -> str | None:
    """The path of the GNU OpenMP runtime already loaded in this process (torch's), or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode[, path]
        if len(fields) == 6 and Path(fields[5]).name.startswith("libgomp"):
            return fields[5] if Path(fields[5]).is_file() else None
    return None


def _cache_dir() -> Path:
    """A per-user folder for built libraries (survives the process, not the machine)."""
    return Path(tempfile.gettempdir()) / f"batonserve-native-{os.getuid()}"


def _commands(cc: str, src: Path, out: str, gomp: str | None) -> list[list[str]]:
    """Compile and link commands; with `gomp`, OpenMP linked to that very file (not -lgomp)."""
    if gomp is None:
        return [[cc, *CFLAGS, str(src), "-o", out, "-lm"]]
    obj = str(src.with_suffix(".o"))
    rpath = f"-Wl,-rpath,{Path(gomp).parent}"
    return [
        [cc, *CFLAGS, "-fopenmp", "-c", str(src), "-o", obj],
        [cc, "-shared", obj, gomp, rpath, "-o", out, "-lm"],
    ]


def build(name: str, source: str) -> Path | None:
    """Compile `source` into a shared library (cached by content); None without a working compiler.

    With OpenMP where torch has loaded a runtime; if that build fails (no omp.h, say), without:
    the kernels then run on one thread, still far ahead of the torch reference.
    """
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    gomp = openmp_runtime()
    if gomp is not None:
        out = _build(name, source, cc, gomp)
        if out is not None:
            return out
    return _build(name, source, cc, None)


def _build(name: str, source: str, cc: str, gomp: str | None) -> Path | None:
    parts = [source, *CFLAGS, platform.machine(), cc, gomp or "no openmp"]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    out = _cache_dir() / f"{name}-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build under a unique name and rename: concurrent processes never load a half-written file.
    fd, tmp_name = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    src = Path(tmp_name).with_suffix(".c")
    src.write_text(source)
    try:
        for cmd in _commands(cc, src, tmp_name, gomp):
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        os.replace(tmp_name, out)
    except (OSError, subprocess.SubprocessError) as e:
        if gomp:
            log.warning("CPU kernel %s not built with OpenMP (%s); trying without", name, e)
        else:
            log.warning("CPU kernel %s not built (%s); using the torch reference", name, e)
        Path(tmp_name).unlink(missing_ok=True)
        return None
    finally:
        src.unlink(missing_ok=True)
        src.with_suffix(".o").unlink(missing_ok=True)
    return out


@functools.cache
def load(name: str, source: str) -> ctypes.CDLL | None:
    """The built library `name`, loaded once per process; None when it cannot be built or loaded."""
    path = build(name, source)
    if path is None:
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        log.warning("CPU kernel %s not loaded (%s); using the torch reference", name, e)
        return None
