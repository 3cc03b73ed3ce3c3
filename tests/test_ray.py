"""`--engine ray` against the local engine, on a real Ray runtime: a local instance with 2 CPUs and a two-node
cluster on this machine (ray.cluster_utils.Cluster). Every output of `python data_process.py` (clean parts,
rejects, dedup parts, tokenizer, .bin/.idx shards, manifests, SFT CSV, DPO JSONL) is byte-identical to the local
engine's on a small recipe over the real samples; a worker killed mid-unit is retried by Ray; a driver killed
mid-run resumes on re-run from the finished units; an unreachable --ray-address is a one-line error.

The local-instance run comes first; then one cluster serves the rest of the module."""
import functools
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import ROOT
from data_process import pipeline
from data_process.executor import Executor
from data_process.recipe import load_recipe
from data_process.records import iter_records

_spec = importlib.util.spec_from_file_location("data_process_cli", ROOT / "data_process.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

# functions of this module run inside Ray workers (the killing unit below): send them by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

OBJECT_STORE = 80 * 1024 ** 2
CHUNK_BYTES = 200_000                  # the web corpus becomes several byte-range units
TIMING_KEYS = {"seconds", "hash_seconds", "mchars_per_s", "tokens_per_s", "train_seconds", "workers"}

RECIPE = """
[run]
data_dir = "{data}"
workers = 2
[[corpus]]
name = "fever"
reader = "plain_text"
paths = ["{samples}/medicalgpt/pretrain/fever.txt"]
priority = 90
[[corpus]]
name = "web"
reader = "text_jsonl"
paths = ["{web}"]
priority = 30
[[corpus]]
name = "firefly"
reader = "text_jsonl"
paths = ["{samples}/firefly/dummy_pretrain.jsonl"]
priority = 30
[[corpus]]
name = "medical_sft"
reader = "sharegpt_jsonl"
paths = ["{samples}/medicalgpt/sft/medical_sft_1K_format.jsonl"]
role = "sft"
stage = "medical"
lang = "mixed"
[[corpus]]
name = "reward"
reader = "medical_reward_jsonl"
paths = ["{samples}/medicalgpt/reward/medical_reward_pairs.jsonl"]
role = "dpo"
stage = "medical"
[[corpus]]
name = "firefly_dpo"
reader = "pref_messages_jsonl"
paths = ["{samples}/firefly/dummy_dpo.jsonl"]
role = "dpo"
stage = "general"
lang = "mixed"
[[eval_set]]
name = "ceval"
format = "ceval"
paths = ["{samples}/ceval-medical/*/*.csv"]
[tokenizer]
vocab_size = 4000
sample_chars = 300000
[tokenize]
val_fraction = 0.05
shard_tokens = 60000
sft_as_pretrain = ["medical"]
[sft]
stages = ["medical"]
"""


def web_jsonl(samples: Path, path: Path, copies: int) -> Path:
    """The real SkyPile-style web sample, repeated (exact duplicates for dedup) with a few bad lines."""
    base = (samples / "skywork-zh-web/zh_general.jsonl").read_bytes()
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(base + b'{"text": "broken\n{"text": "short"}\n')
    os.utime(path, ns=(1_700_000_000 * 10**9,) * 2)   # the same input (name, size, mtime) in every data dir
    return path


def make_recipe(tmp: Path, samples: Path, copies: int = 2):
    tmp.mkdir(parents=True, exist_ok=True)
    web = web_jsonl(samples, tmp / "web.jsonl", copies)
    path = tmp / "recipe.toml"
    path.write_text(RECIPE.format(data=tmp / "data", samples=samples, web=web))
    return load_recipe(path, root=tmp)


def _strip_timings(obj):
    if isinstance(obj, dict):
        return {k: _strip_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_strip_timings(v) for v in obj]
    return obj


def output_bytes(data_dir: Path) -> dict:
    """Every output file's bytes; JSON reports and manifests without their timing fields."""
    out = {}
    for p in sorted(data_dir.rglob("*")):
        rel = str(p.relative_to(data_dir))
        if not p.is_file() or rel in ("summary.json", ".lock"):   # .lock: the run's DirLock
            continue
        if p.suffix == ".json":
            out[rel] = _strip_timings(json.loads(p.read_text()))
        else:
            out[rel] = p.read_bytes()
    return out


def read_step_outputs(reference: dict, got: dict) -> dict:
    """The reference's files in the folders a read-only run wrote (clean/, rejects/, and whatever else it writes)."""
    folders = {k.split("/")[0] for k in got}
    assert {"clean", "rejects"} <= folders
    return {k: v for k, v in reference.items() if k.split("/")[0] in folders}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, samples):
    """The whole pipeline on the local engine: what every Ray run must reproduce."""
    recipe = make_recipe(tmp_path_factory.mktemp("local"), samples)
    pipeline.run(recipe, engine="local", progress=False, chunk_bytes=CHUNK_BYTES)
    out = output_bytes(recipe.data_dir)
    assert len([k for k in out if k.startswith("clean/web/part-")]) > 3       # really split into ranges
    assert any(k.endswith(".bin") for k in out) and "sft/medical.csv" in out and "dpo/medical.jsonl" in out
    return out


@pytest.mark.slow
def test_a_run_on_its_own_local_ray_instance_is_byte_identical_to_the_local_engine(reference, tmp_path, samples):
    """No --ray-address: the run starts a local Ray instance (2 CPUs) and shuts it down at the end. First in
    the module, before the cluster fixture connects this process to the cluster."""
    if ray.is_initialized():
        ray.shutdown()
    recipe = make_recipe(tmp_path, samples)
    summary = pipeline.run(recipe, engine="ray", workers=2, progress=False, chunk_bytes=CHUNK_BYTES)
    assert not ray.is_initialized()
    assert output_bytes(recipe.data_dir) == reference
    web = summary["read"]["corpora"]["web"]
    assert web["rejected_by_reason"] and web["kept"] + web["rejected"] == web["read"]


def test_a_local_ray_instance_runs_its_workers_at_the_drivers_priority(monkeypatch):
    """Ray starts workers at niceness 15; on a machine with other load that starves the run, so the local
    instance the engine starts runs them at the driver's niceness (a user's RAY_worker_niceness wins)."""
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    with Executor(engine="ray", workers=2, object_store_bytes=OBJECT_STORE) as executor:
        assert list(executor.map(os.nice, [0, 0])) == [os.nice(0)] * 2
    assert not ray.is_initialized() and "RAY_worker_niceness" not in os.environ
    monkeypatch.setenv("RAY_worker_niceness", "7")
    with Executor(engine="ray", workers=1, object_store_bytes=OBJECT_STORE) as executor:
        assert list(executor.map(os.nice, [0])) == [7]


def test_closing_a_local_instance_leaves_none_of_its_processes(monkeypatch):
    """The engine stops the autoscaler monitor itself before ray.shutdown() (which would wait a second for it):
    after close, no process the instance started is left, the monitor included."""
    if ray.is_initialized():
        ray.shutdown()
    with Executor(engine="ray", workers=1, object_store_bytes=OBJECT_STORE) as executor:
        assert list(executor.map(abs, [-1])) == [1]
        node = ray._private.worker._global_node
        started = [info.process for infos in node.all_processes.values() for info in infos]
        assert "monitor" in node.all_processes and started
    assert not ray.is_initialized()
    assert all(p.poll() is not None for p in started)   # every one exited and was reaped


@pytest.fixture(scope="module")
def cluster():
    """A two-node Ray cluster on this machine (1 CPU each), this process connected as the driver."""
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
        cluster.wait_for_nodes()
        with Executor("ray", ray_address=cluster.address) as ex:
            assert len([n for n in ray.nodes() if n["Alive"]]) == 2 and ex.parallelism == 2
            yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_without_an_address_a_run_starts_its_own_instance_beside_a_running_cluster(cluster):
    """Without --ray-address the engine starts a local instance for the run, even where another Ray cluster runs
    on this machine (ray.init() alone would join the cluster `ray start` left behind, then refuse num_cpus)."""
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "import ray\nfrom data_process.executor import Executor\n"
              f"with Executor('ray', workers=1, object_store_bytes={OBJECT_STORE}) as ex:\n"
              "    print(ray.get_runtime_context().gcs_address, ex.parallelism, len(ray.nodes()))\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    gcs, cpus, nodes = proc.stdout.split()
    assert gcs != cluster and (cpus, nodes) == ("1", "1")


@pytest.mark.slow
def test_a_two_node_cluster_run_is_byte_identical_to_the_local_engine(cluster, reference, tmp_path, samples):
    recipe = make_recipe(tmp_path, samples)
    pipeline.run(recipe, engine="ray", ray_address=cluster, progress=False, chunk_bytes=CHUNK_BYTES)
    assert output_bytes(recipe.data_dir) == reference


def _kill_worker_once_then_run(marker: str, task):
    """A read unit that SIGKILLs its own Ray worker the first time it runs (the marker file says it did)."""
    unit = task[0]
    if unit.corpus == "web" and unit.index == 1 and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return pipeline.run_unit(*task)


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_the_output_is_identical(cluster, reference, tmp_path, samples,
                                                               monkeypatch):
    marker = tmp_path / "killed-once"
    monkeypatch.setattr(pipeline, "_run_unit_task", functools.partial(_kill_worker_once_then_run, str(marker)))
    recipe = make_recipe(tmp_path, samples)
    pipeline.run(recipe, steps=["read"], engine="ray", ray_address=cluster, progress=False,
                 chunk_bytes=CHUNK_BYTES)
    assert marker.exists() and int(marker.read_text()) != os.getpid()   # a worker really died
    got = output_bytes(recipe.data_dir)
    assert got == read_step_outputs(reference, got)


def _fail_on_unit(task):
    if task[0].corpus == "web" and task[0].index == 2:
        raise ValueError("reader exploded")
    return pipeline.run_unit(*task)


@pytest.mark.slow
def test_a_failing_unit_reraises_in_the_driver_naming_the_unit(cluster, tmp_path, samples, monkeypatch):
    monkeypatch.setattr(pipeline, "_run_unit_task", _fail_on_unit)
    recipe = make_recipe(tmp_path, samples)
    with pytest.raises(ValueError, match="reader exploded") as e:
        pipeline.run(recipe, steps=["read"], engine="ray", ray_address=cluster, progress=False,
                     chunk_bytes=CHUNK_BYTES)
    assert any("in work unit web " in note and "web.jsonl bytes" in note for note in e.value.__notes__)
    assert not (recipe.data_dir / "clean/web/manifest.json").exists()


def test_the_stage_step_runs_its_parts_as_ray_tasks(cluster, tmp_path, samples):
    """Each dedup part of an SFT corpus is a stage unit: a part damaged after its manifest was written (same
    size, so only reading it shows it) fails in the Ray task that reads it, and the driver names that unit."""
    recipe = make_recipe(tmp_path, samples)
    pipeline.run(recipe, steps=["read", "dedup", "tokenizer"], engine="local", progress=False,
                 chunk_bytes=CHUNK_BYTES)
    part = sorted((recipe.data_dir / "dedup" / "medical_sft").glob("part-*.jsonl.zst"))[-1]
    data = bytearray(part.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    part.write_bytes(bytes(data))
    with pytest.raises(Exception, match="damaged") as e:
        pipeline.run(recipe, steps=["stage"], engine="ray", ray_address=cluster, progress=False)
    assert any(note == f"in work unit stage sft: medical_sft part {part.name}"
               for note in getattr(e.value, "__notes__", ())), getattr(e.value, "__notes__", None)
    assert not (recipe.data_dir / "sft" / "medical.csv").exists()


def test_the_tokenizer_step_trains_in_a_ray_task(cluster, tmp_path, samples):
    """The tokenizer's training (its sample of the pretraining corpora and SentencePiece) is the step's one unit:
    a damaged part it samples fails in that Ray task, and the driver names the unit."""
    recipe = make_recipe(tmp_path, samples)
    pipeline.run(recipe, steps=["read", "dedup"], engine="local", progress=False, chunk_bytes=CHUNK_BYTES)
    part = sorted((recipe.data_dir / "dedup" / "fever").glob("part-*.jsonl.zst"))[0]
    data = bytearray(part.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    part.write_bytes(bytes(data))
    with pytest.raises(Exception, match="damaged") as e:
        pipeline.run(recipe, steps=["tokenizer"], engine="ray", ray_address=cluster, progress=False)
    assert "in work unit tokenizer training" in getattr(e.value, "__notes__", ()), getattr(e.value, "__notes__", None)
    assert not (recipe.data_dir / "tokenizer" / "tokenizer.model").exists()


KILL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from data_process import pipeline
from data_process.recipe import load_recipe
recipe = load_recipe({recipe!r}, root={tmp!r})
pipeline.run(recipe, steps=["read"], engine="ray", ray_address={address!r}, progress=False, chunk_bytes=60_000)
"""


@pytest.mark.slow
def test_a_killed_driver_resumes_on_rerun_and_the_output_is_identical(cluster, tmp_path, samples):
    # the killed driver joins the cluster: a kill -9'd driver's own local Ray would leave its agents behind
    recipe = make_recipe(tmp_path, samples, copies=2)
    recipe.corpora = [c for c in recipe.corpora if c.name == "web"]
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(root=str(ROOT), recipe=str(tmp_path / "recipe.toml"), tmp=str(tmp_path),
                                         address=cluster))
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    corpus_dir = recipe.data_dir / "clean/web"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(corpus_dir.glob(".staging-*/unit-*.json"))) >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (corpus_dir / "manifest.json").exists()
    staging = next(corpus_dir.glob(".staging-*"))
    finished = {p.name: p.stat().st_mtime_ns for p in staging.glob("unit-*.jsonl.zst")
                if p.with_name(p.name.replace(".jsonl.zst", ".json")).exists()}
    assert len(finished) >= 5

    pipeline.run(recipe, steps=["read"], engine="ray", ray_address=cluster, progress=False,
                 chunk_bytes=60_000)
    assert not list(corpus_dir.glob(".*"))                      # staging and temporaries gone
    for name, mtime in finished.items():                        # finished units were not redone
        assert (corpus_dir / name.replace("unit-", "part-")).stat().st_mtime_ns == mtime
    counts = json.loads((corpus_dir / "manifest.json").read_text())["counts"]
    assert counts["kept"] == sum(1 for _ in iter_records(corpus_dir))

    recipe.data_dir = tmp_path / "reference"
    pipeline.run(recipe, steps=["read"], engine="local", progress=False, chunk_bytes=60_000)
    assert output_bytes(tmp_path / "data") == output_bytes(tmp_path / "reference")


def _kill_node_once_then_run(marker: str, head_node: str, task):
    """A read unit that, the first time it runs on the worker node, SIGKILLs that node's raylet (its parent) and
    itself.
    Units on the head node wait for that first (the head's one CPU stays busy, so Ray must place units on the
    worker node), at most a minute."""
    if ray.get_runtime_context().get_node_id() != head_node:
        if not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getppid()))
            os.kill(os.getppid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)     # the whole node goes: its raylet, then this worker
    else:
        deadline = time.monotonic() + 60
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
    return pipeline.run_unit(*task)


@pytest.mark.slow
def test_a_node_lost_mid_run_does_not_corrupt_the_outputs(cluster, reference, tmp_path, samples, monkeypatch):
    """Last of the cluster tests: the cluster has one node left afterwards."""
    marker = tmp_path / "node-killed"
    head = ray.get_runtime_context().get_node_id()
    monkeypatch.setattr(pipeline, "_run_unit_task", functools.partial(_kill_node_once_then_run, str(marker), head))
    recipe = make_recipe(tmp_path, samples)
    pipeline.run(recipe, steps=["read"], engine="ray", ray_address=cluster, progress=False,
                 chunk_bytes=CHUNK_BYTES)
    raylet = Path(f"/proc/{marker.read_text()}/status")                   # the node's raylet really died
    assert not raylet.exists() or "State:\tZ" in raylet.read_text()
    # Every output is the local engine's. Not pinned: a unit of the lost node that still finishes after the
    # driver finalized its corpus can leave files in a `.staging-*` folder beside the finished outputs (seen
    # on this machine now and then), which nothing reads.
    got = {k: v for k, v in output_bytes(recipe.data_dir).items() if "/.staging-" not in k}
    assert got == read_step_outputs(reference, got)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_ray_address_is_a_one_line_error(tmp_path, capsys):
    port = _free_port()
    t0 = time.time()
    rc = cli.main(["--engine", "ray", "--ray-address", f"127.0.0.1:{port}", "--steps", "read",
                   "--data-dir", str(tmp_path / "data"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and time.time() - t0 < 30
    assert len(err) == 1 and err[0].startswith(f"error: cannot reach a Ray cluster at 127.0.0.1:{port}"), err
    assert cli.main(["--engine", "ray", "--ray-address", "nohost", "--steps", "read"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
    assert cli.main(["--ray-address", "auto", "--steps", "read"]) == 2
    assert "needs --engine ray" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_the_local_engine_never_imports_ray(tmp_path, samples):
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from data_process import pipeline\nfrom data_process.recipe import load_recipe\n"
            f"recipe = load_recipe({str(tmp_path / 'recipe.toml')!r}, root={str(tmp_path)!r})\n"
            "recipe.corpora = [c for c in recipe.corpora if c.name == 'web']\n"
            "pipeline.run(recipe, steps=['read'], progress=False, chunk_bytes=200_000)\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n")
    make_recipe(tmp_path, samples, copies=1)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, timeout=120)
    assert (tmp_path / "data/clean/web/manifest.json").exists()
