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
# -fopenmp-simd: honour the `omp simd` loop hints without linking an OpenMP runtime (torch brings
# its own; two runtimes in one process fight over cores).
CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-strict-aliasing", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    """A per-user folder for built libraries (survives the process, not the machine)."""
    return Path(tempfile.gettempdir()) / f"batonserve-native-{os.getuid()}"


def build(name: str, source: str) -> Path | None:
    """Compile `source` into a shared library (cached by content); None without a working compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    key = hashlib.sha256("\0".join([source, *CFLAGS, platform.machine(), cc]).encode()).hexdigest()[
        :16
    ]
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
        subprocess.run(
            [cc, *CFLAGS, str(src), "-o", tmp_name, "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(tmp_name, out)
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("CPU kernel %s not built (%s); using the torch reference", name, e)
        Path(tmp_name).unlink(missing_ok=True)
        return None
    finally:
        src.unlink(missing_ok=True)
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
