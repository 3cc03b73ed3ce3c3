"""native.py: C kernels are built once into the cache, keyed by their source; a source that does not compile (or
no compiler) gives None, for the caller's Python path."""
import shutil
import sysconfig
from pathlib import Path

import pytest

import native

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
needs_headers = pytest.mark.skipif(not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file(),
                                   reason="no Python headers (python3-dev) for extension modules")

ADD = "#include <stdint.h>\nint64_t add(int64_t a, int64_t b) { return a + b; }\n"
MODULE = r"""
#include <Python.h>
static PyObject *twice(PyObject *self, PyObject *x) { return PyNumber_Add(x, x); }
static PyMethodDef methods[] = {{"twice", twice, METH_O, ""}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "tiny_module", NULL, -1, methods};
PyMODINIT_FUNC PyInit_tiny_module(void) { return PyModule_Create(&module); }
"""


@needs_cc
def test_a_kernel_is_built_once_per_source_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    lib = native.load("adder", ADD, ["-O2"])
    assert lib.add(2, 3) == 5
    [built] = (tmp_path / "medllm-zh").glob("adder-*.so")
    mtime = built.stat().st_mtime_ns
    assert native.build("adder", ADD, ["-O2"]) == built and built.stat().st_mtime_ns == mtime   # not rebuilt
    assert native.build("adder", ADD.replace("a + b", "b + a"), ["-O2"]) != built                # a new source is


@needs_cc
@needs_headers
def test_an_extension_module_loads_and_a_broken_source_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native.load_module("tiny_module", MODULE, ["-O2"]).twice("ab") == "abab"
    assert native.load("broken", "this is not C", ["-O2"]) is None
    assert native.load_module("broken_module", "int x = ;", ["-O2"]) is None
    assert not list((tmp_path / "medllm-zh").glob("broken*"))   # nothing half-built left in the cache
