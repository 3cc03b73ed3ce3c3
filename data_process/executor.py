"""Runs the pipeline's work units: on this machine's process pool (engine "local") or as Ray tasks ("ray").

    with Executor("ray", workers=2, ray_address=None) as ex:       # None: a local Ray instance for this run
        for result in ex.map(run_unit, units, ordered=False, describe=lambda u: u.src):
            ...                                                     # results arrive at the driver

This is the one place that maps work units over an engine; the read, dedup, tokenize and stage steps call `map`
with the units they already plan (files and byte ranges, text batches, token batches, parts), so the units, and therefore
the outputs, are the same whichever engine runs them:
- `ordered=True` yields results in input order (dedup and tokenize consume them in order: the output never
  depends on the worker or node count); `ordered=False` yields them as they finish (the read step keys results
  by unit index). Inputs may be a lazy iterator: at most `ahead` units are in flight, so memory stays at a few
  units however large the corpus.
- `initializer(*initargs)` runs once per worker process before its first unit (local: the pool initializer;
  Ray: once per worker process and initializer, its arguments put in the object store once, not per task).
- A unit that raises re-raises in the driver as the same exception type with a note naming the unit. A Ray
  worker killed mid-unit (OOM killer, a lost node) is retried up to `max_retries` times; units write their
  outputs atomically, so a retry rewrites the same bytes. An application error is not retried.
- Ray is imported only when engine="ray": the local engine (the default) stays as light as it was.

Where the data must live for Ray: units read their inputs and write their outputs by path, so the data dir (and
the corpora) must be on a filesystem every node sees at the same path; docs/scaling.md says how to run it.
"""
from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

ENGINES = ("local", "ray")
ROOT = Path(__file__).resolve().parent.parent     # the project root: Ray workers import data_process from here
MAX_RETRIES = 3                                   # Ray retries of a unit whose worker died
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 ** 2        # a local Ray's object store: units return counts or one batch
CONNECT_TIMEOUT_S = 5.0


class EngineError(RuntimeError):
    """The engine cannot start: Ray missing, or a cluster address that does not answer."""


class Executor:
    """Maps functions over work units on the local process pool or on Ray; use as a context manager."""

    def __init__(self, engine: str = "local", workers: int = 2, ray_address: str | None = None,
                 max_retries: int = MAX_RETRIES, object_store_bytes: int = LOCAL_OBJECT_STORE_BYTES):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if ray_address and engine != "ray":
            raise ValueError("--ray-address needs --engine ray")
        self.engine, self.workers, self.max_retries = engine, max(1, int(workers)), max_retries
        self.ray_address, self.object_store_bytes = ray_address, object_store_bytes
        self._ray, self._owned = None, False
        self._remote = None

    # ------------------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "Executor":
        if self.engine == "ray":
            self._start_ray()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._ray is not None and self._owned:
            _stop_autoscaler_monitor(self._ray)
            self._ray.shutdown()   # a local instance stops; a cluster we joined keeps running
        self._ray = None

    @property
    def parallelism(self) -> int:
        """How many units can run at once: local workers, or the Ray cluster's CPUs."""
        if self._ray is None:
            return self.workers
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def _start_ray(self) -> None:
        try:
            import ray
        except ImportError:
            raise EngineError("--engine ray needs the ray package (pyproject.toml lists it: pip install ray)") from None
        self._remote = ray.remote(num_cpus=1, max_retries=self.max_retries, retry_exceptions=False)(_call_unit)
        address = self.ray_address
        if address and address != "auto":
            check_reachable(address)
        if ray.is_initialized():   # inside a Ray job, or a caller that connected already: use that, leave it up
            current = ray.get_runtime_context().gcs_address
            if address and address != "auto" and not _same_address(address, current):
                raise EngineError(f"this process is already connected to the Ray cluster at {current}, "
                                  f"not {address}")
            self._ray, self._owned = ray, False
            return
        # Workers import data_process, fileio and tokenizer from the project root: on a cluster the checkout must
        # be at the same path on every node (docs/scaling.md), like the data dir. A cluster's workers get it
        # through the job's runtime_env; a local instance's inherit it from this process's environment, which
        # lets Ray use the workers it prestarts (a runtime_env would start new ones: seconds per run).
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        kwargs = dict(include_dashboard=False, log_to_driver=True, logging_level="WARNING", configure_logging=True)
        # A local instance's workers run at this process's priority: Ray starts workers at niceness 15 (so a
        # head node's own daemons stay responsive), which on a machine with any other load lets that load
        # starve the run (the read step took 1.8x the local engine's time at load 2.8). A user's own
        # RAY_worker_niceness wins; a cluster we join keeps the niceness its nodes were started with.
        saved = {name: os.environ.get(name) for name in ("PYTHONPATH", "RAY_worker_niceness")}
        try:
            if address:
                ray.init(address=address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **kwargs)
            else:
                os.environ["PYTHONPATH"] = pythonpath
                os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
                # "local": a new instance even where another Ray runs on this machine (ray.init() would join
                # the last one `ray start` or a test cluster left in /tmp/ray, and then refuse num_cpus)
                ray.init(address="local", num_cpus=self.workers, object_store_memory=self.object_store_bytes,
                         **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise EngineError(f"cannot reach a Ray cluster at {address!r}: {first}") from None
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        self._ray, self._owned = ray, True

    # ------------------------------------------------------------------------------------------ mapping
    def map(self, fn: Callable, items: Iterable, *, ordered: bool = True, ahead: int | None = None,
            initializer: Callable | None = None, initargs: tuple = (), describe: Callable = repr,
            progress: Callable | None = None, start_method: str = "fork") -> Iterator:
        """fn(item) for every item, computed by the engine's workers; see the module docstring.

        `describe(item)` names a unit in errors; `progress(result)` is called in the driver for every result
        (one progress bar per step, however many nodes run it). `start_method` is the local pool's ("fork":
        workers start in milliseconds; "spawn" for callers whose parent holds threads)."""
        if self.engine == "ray":
            if self._ray is None:
                self._start_ray()
            results = self._map_ray(fn, items, ordered, ahead or 2 * self.parallelism, initializer, initargs,
                                    describe)
        else:
            results = self._map_local(fn, items, ordered, ahead or 2 * self.workers, initializer, initargs,
                                      describe, start_method)
        for result in results:
            if progress is not None:
                progress(result)
            yield result

    def mapper(self, fn: Callable, units: Iterable) -> Iterator:
        """`mapper(fn, units)`: fn over units, results in input order (the form data_process/dedup.py takes)."""
        return self.map(fn, units, ordered=True)

    def _map_local(self, fn, items, ordered, ahead, initializer, initargs, describe, start_method):
        if self.workers == 1:
            if initializer is not None:
                initializer(*initargs)
            for item in items:
                yield _named(fn, item, describe)
            return
        if start_method not in multiprocessing.get_all_start_methods():
            start_method = "spawn"
        pool = multiprocessing.get_context(start_method).Pool(self.workers, initializer=initializer,
                                                               initargs=initargs)
        pending = collections.deque()
        try:
            for item in items:
                pending.append((item, pool.apply_async(fn, (item,))))
                while len(pending) >= ahead:
                    yield _local_result(_pop_first_ready(pending, ordered), describe)
            while pending:
                yield _local_result(_pop_first_ready(pending, ordered), describe)
        except BaseException:   # Ctrl-C or a failed unit: stop the workers now; finished units stay on disk
            pool.terminate()
            pool.join()
            raise
        pool.close()
        pool.join()

    def _map_ray(self, fn, items, ordered, ahead, initializer, initargs, describe):
        ray = self._ray
        init = None
        if initializer is not None:   # its arguments go to the object store once for this map, not per task
            init = (uuid.uuid4().hex, initializer, ray.put(initargs))
        pending: dict = {}               # ObjectRef -> its item (named in errors)
        order = collections.deque()      # refs in submission order (ordered=True)
        try:
            for item in items:
                ref = self._remote.remote(fn, item, init)
                pending[ref] = item
                order.append(ref)
                while len(pending) >= ahead:
                    yield self._ray_next(pending, order, ordered, describe)
            while pending:
                yield self._ray_next(pending, order, ordered, describe)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise

    def _ray_next(self, pending, order, ordered, describe):
        ray = self._ray
        if ordered:
            ref = order.popleft()
        else:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            order.remove(ref)
        item = pending.pop(ref)
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
            _add_unit_note(cause, describe, item)
            raise cause from None
        except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                ray.exceptions.OutOfMemoryError) as e:
            raise RuntimeError(f"work unit {_describe(describe, item)}: its Ray worker died "
                               f"{self.max_retries + 1} times ({type(e).__name__}); see the Ray logs") from None


# ---------------------------------------------------------------------------------------------- helpers

def _stop_autoscaler_monitor(ray) -> None:
    """Stop the local instance's autoscaler monitor before ray.shutdown(). Shutdown stops the processes one type
    at a time, SIGTERM and up to a second each; the monitor (which a fixed-size local instance has no use for)
    sits out that whole second, and SIGTERM'd while the GCS is up it reports itself failed on the driver's
    terminal. SIGKILL ends it at once and quietly, so every run's shutdown is ~1 s shorter. This reads Ray's
    internal node handle: on a Ray without it, shutdown just takes the second."""
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    for info in (getattr(node, "all_processes", None) or {}).get("monitor", []):
        with contextlib.suppress(Exception):
            info.process.kill()
            info.process.wait(5)


def on_ray(executor: "Executor | None") -> bool:
    """Whether a step's units go to Ray tasks (else the step keeps its own in-process or local-pool path)."""
    return executor is not None and executor.engine == "ray"


_initialized: set = set()   # in a Ray worker process: the initializers that have run there


def _call_unit(fn, item, init):
    """The Ray task: run the unit's initializer once in this worker process, then the unit."""
    if init is not None:
        key, initializer, initargs_ref = init
        if key not in _initialized:
            import ray   # a nested ObjectRef is not resolved by Ray: fetched here, once per worker process
            initializer(*ray.get(initargs_ref))
            _initialized.clear()
            _initialized.add(key)
    return fn(item)


def _pop_first_ready(pending: collections.deque, ordered: bool):
    if ordered:
        return pending.popleft()
    while True:
        for i, (item, res) in enumerate(pending):
            if res.ready():
                del pending[i]
                return item, res
        pending[0][1].wait(0.05)


def _local_result(entry, describe):
    item, res = entry
    try:
        return res.get()
    except Exception as e:
        _add_unit_note(e, describe, item)
        raise


def _named(fn, item, describe):
    try:
        return fn(item)
    except Exception as e:
        _add_unit_note(e, describe, item)
        raise


def _describe(describe, item) -> str:
    try:
        text = str(describe(item))
    except Exception:   # a describe that fails must not hide the unit's own error
        text = object.__repr__(item)
    return text if len(text) <= 200 else text[:197] + "..."


def _add_unit_note(e: BaseException, describe, item) -> None:
    note = f"in work unit {_describe(describe, item)}"
    if note not in getattr(e, "__notes__", ()):
        e.add_note(note)


def _same_address(a: str, b: str) -> bool:
    def norm(addr):
        host, _, port = addr.rpartition(":")
        try:
            return socket.gethostbyname(host), port
        except OSError:
            return host, port
    return norm(a) == norm(b)


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise EngineError at once when HOST:PORT does not accept a connection (ray.init would retry for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EngineError(f"--ray-address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by "
                          "default) or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise EngineError(f"cannot reach a Ray cluster at {address}: {e.strerror or e} (is `ray start --head` "
                          f"running there, and the port open?)") from None


def print_engine(ex: Executor, file=sys.stderr) -> None:
    """One line saying what will run the units: `engine: ray, 2 node(s), 64 CPUs (cluster at 10.0.0.1:6379)`."""
    if ex.engine == "ray" and ex._ray is not None:
        nodes = [n for n in ex._ray.nodes() if n.get("Alive")]
        where = "a local instance for this run" if ex._owned and not ex.ray_address else \
            f"cluster at {ex._ray.get_runtime_context().gcs_address}"
        print(f"engine: ray, {len(nodes)} node(s), {ex.parallelism} CPUs ({where})", file=file, flush=True)
