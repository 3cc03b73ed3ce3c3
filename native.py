"""The one way this project builds and loads its small C kernels (bf16_gemv.py's decode step, the quality
operators' scans in data_process/quality.py and quality_model.py).

Each kernel's C source lives as a string beside the Python that calls it. `load(name, source, flags)` compiles it
once with the system C compiler (`cc`, or `$CC`) into ~/.cache/medllm-zh (`$XDG_CACHE_HOME` if set), under a
name keyed by the hash of the source, flags and compiler, and opens it with ctypes; `load_module` builds a C
extension module instead (for kernels that read str objects and are called per document, where ctypes' ~0.4 us
a call would be most of the time). Both return None where there is no compiler (or no Python headers) or the
build fails, and each caller keeps its pure-Python path for that case.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import subprocess
import sysconfig
import tempfile
from pathlib import Path

# Extension modules compile against this interpreter's headers (and the path keys the build by its version)
PYTHON_INCLUDE = ["-I" + sysconfig.get_paths()["include"]]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medllm-zh"


def build(name: str, source: str, flags: list[str], libs: list[str] = ()) -> Path:
    """Compile `source` once per (source, flags, compiler); concurrent builders each write a temp file and
    rename, so a reader never opens a half-written library."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\0".join([source, cc, *flags, *libs]).encode()).hexdigest()[:16]
    cache = cache_dir()
    lib = cache / f"{name}-{key}.so"
    if lib.is_file():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        src, out = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        subprocess.run([cc, *flags, "-shared", "-fPIC", str(src), "-o", str(out), *libs], check=True,
                       capture_output=True, timeout=120)
        os.replace(out, lib)
    return lib


def load(name: str, source: str, flags: list[str], libs: list[str] = (), keep_gil: bool = False):
    """The compiled library (ctypes), or None where it cannot be built. keep_gil: calls hold the GIL
    (ctypes.PyDLL): for kernels of a few microseconds, where releasing and taking it back is a real share of
    the call."""
    try:
        path = build(name, source, flags, list(libs))
        return (ctypes.PyDLL if keep_gil else ctypes.CDLL)(str(path))
    except (OSError, subprocess.SubprocessError):   # no compiler, or one that refuses the flags
        return None


def load_module(name: str, source: str, flags: list[str]):
    """The C extension module `name` (its source defines PyInit_<name>), or None where it cannot be built."""
    try:
        path = build(name, source, [*flags, *PYTHON_INCLUDE])
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except (OSError, ImportError, subprocess.SubprocessError):
        return None
