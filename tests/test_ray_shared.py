"""Runs on Ray in threads of one process (a notebook, a service running two dataset jobs) share the
local cluster salience starts: the first run starts it, the others join it, and it outlives them all,
also when some failed or were interrupted, and the thread that started it (``ray_engine.cluster``):
salience keeps it for the process's later runs until ``salience.runs.shutdown_ray()`` or the exit
(session 55; the last run to leave shut it down before). No cluster runs before this module's test:
salience starts the one it uses (the caller's cluster, which salience leaves running:
tests/test_runs_ray.py); none is left after the module (:func:`no_cluster_left`)."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import salience

ray = pytest.importorskip("ray", reason="the ray extra (pip install salience[ray]) is not installed")
pytest.importorskip("ray.data")

from salience.runs import ray_engine  # noqa: E402

N = 4


@pytest.fixture(scope="module", autouse=True)
def no_cluster_left():
    """The cluster salience keeps shut down after the module, whatever its tests did (the next modules start
    their own)."""
    yield
    salience.runs.shutdown_ray()
KW = dict(methods=["vanilla"], shard_size=2, batch_size=2, workers=0, map_dtype="float32")


def _read_on_ray(log: Path) -> bool:
    """Whether a Ray worker process (not this one) has read an image of ``log``'s dataset."""
    return log.exists() and any(int(ln.split()[0]) != os.getpid() for ln in log.read_text().splitlines())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray Data's own, when its DataContext is made
def test_runs_in_threads_share_the_cluster_salience_starts_and_it_outlives_them(tmp_path, monkeypatch):
    """Four runs started together (a Barrier) with no cluster running: two good ones (A, B), one whose
    dataset raises on Ray (C, ``KeyError``), one interrupted in its job (D, ``KeyboardInterrupt``).
    A and B join the cluster C or D starts. C and D end while A and B still run: the cluster stays up
    (also once the thread that started it has ended); A and B then finish with the local engine's
    maps and rows. Ray was started once and not shut down: after the four threads' end the cluster
    still runs, and a fifth run (the main thread's) is explained on it (the same node, no
    ``ray.init``) with the local engine's maps; ``shutdown_ray()`` then shuts it down once, after which
    no cluster is left (before session 55 the last run to leave shut it down). Before session 54, each
    run that saw no cluster called ``ray.init`` (Ray: "Perhaps you called ray.init twice by
    accident?"), the first run to end shut the cluster down under the others, and a cluster started
    from a run's thread was killed when that thread ended (``PR_SET_PDEATHSIG``: the test process then
    died, "Failed to connect to GCS within 60 seconds")."""
    def wait(path: Path, seconds: float = 120) -> None:
        """Until the test creates ``path`` (at most ``seconds``: a failing test never hangs)."""
        until = time.monotonic() + seconds
        while not path.exists() and time.monotonic() < until:
            time.sleep(0.05)

    class Gated(torch.utils.data.Dataset):
        """N seeded images; each read logged (``pid index``) in ``log``; images from 1 on read only once the
        file ``gate`` exists, then raising ``KeyError`` if ``fails``. Defined here: Ray's workers get it by value
        (they cannot import this module)."""

        def __init__(self, log: Path, gate: Path, fails: bool = False):
            self.log, self.gate, self.fails = str(log), str(gate), fails

        def __len__(self) -> int:
            return N

        def __getitem__(self, i: int) -> torch.Tensor:
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()} {i}\n")
            if i >= 1:
                wait(Path(self.gate))
                if self.fails:
                    raise KeyError("label")
            return torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i))

    assert not ray.is_initialized()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval()
    go, fail = tmp_path / "go", tmp_path / "fail"
    (tmp_path / "open").touch()
    local = salience.explain_dataset(model, Gated(tmp_path / "local.log", tmp_path / "open"),
                                     out=tmp_path / "local", **KW)
    inside, inits, shutdowns = [0], [], []
    real_init, real_shutdown, real_explain, real_run = ray.init, ray.shutdown, ray_engine._explain, ray_engine.run

    def init(*args, **kwargs):  # 4 CPUs: the three runs' actors at once on a 2-core machine
        inits.append(kwargs.get("address"))
        return real_init(*args, **{**kwargs, "num_cpus": 4})

    def shutdown(*args, **kwargs):
        shutdowns.append(inside[0])  # the runs in the Ray engine when the cluster goes
        return real_shutdown(*args, **kwargs)

    def explain(ray_, run, *args, **kwargs):  # D: Ctrl-C in its job, once C has begun on the cluster
        if run.store.folder.name == "d":
            (tmp_path / "d-joined").touch()
            wait(fail)
            raise KeyboardInterrupt
        return real_explain(ray_, run, *args, **kwargs)

    def engine(run, *args, **kwargs):  # the runs in the Ray engine (their folder's index and gallery are after)
        until = time.monotonic() + 120
        while run.store.folder.name in "ab" and not inits and time.monotonic() < until:
            time.sleep(0.01)  # A and B join the cluster C or D starts: its thread ends first
        with lock:
            inside[0] += 1
        try:
            return real_run(run, *args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", shutdown)
    monkeypatch.setattr(ray_engine, "_explain", explain)
    monkeypatch.setattr(ray_engine, "run", engine)
    lock, barrier, out = threading.Lock(), threading.Barrier(4), {}

    def job(name: str, dataset: Gated) -> None:
        barrier.wait(30)
        try:
            out[name] = salience.explain_dataset(model, dataset, out=tmp_path / name, engine="ray", actors=1, **KW)
        except BaseException as e:  # noqa: BLE001 - the thread's outcome, asserted below
            out[name] = e

    datasets = {"a": Gated(tmp_path / "a.log", go), "b": Gated(tmp_path / "b.log", go),
                "c": Gated(tmp_path / "c.log", fail, fails=True), "d": Gated(tmp_path / "d.log", go)}
    threads = {n: threading.Thread(target=job, args=(n, d)) for n, d in datasets.items()}
    try:
        for t in threads.values():
            t.start()
        until = time.monotonic() + 120  # every run on the cluster: A, B and C's first images read there
        while not (all(_read_on_ray(tmp_path / f"{n}.log") for n in "abc") and (tmp_path / "d-joined").exists()):
            assert time.monotonic() < until and all(n not in out for n in "abc"), out
            time.sleep(0.1)
        fail.touch()
        threads["c"].join(120), threads["d"].join(120)
        assert isinstance(out.get("c"), KeyError) and isinstance(out.get("d"), KeyboardInterrupt), out
        assert ray.is_initialized() and "a" not in out and "b" not in out, out  # A and B still run
    finally:
        go.touch(), fail.touch()
        for t in threads.values():
            t.join(120)
    assert ray.is_initialized() and len(inits) == 1 and shutdowns == [], (inits, shutdowns)
    node = ray.get_runtime_context().get_node_id()
    out["e"] = salience.explain_dataset(model, Gated(tmp_path / "e.log", go), out=tmp_path / "e", engine="ray", **KW)
    assert _read_on_ray(tmp_path / "e.log") and ray.get_runtime_context().get_node_id() == node
    assert len(inits) == 1 and shutdowns == [] and ray_engine._CLUSTER["ours"], (inits, shutdowns)
    cols = [c for c in local.table.column_names if c != "shard"]
    for name in "abe":
        assert out[name].complete and out[name].table.select(cols).equals(local.table.select(cols)), out[name]
        for i in range(N):
            np.testing.assert_array_equal(out[name].map(i, "vanilla"), local.map(i, "vanilla"))
    salience.runs.shutdown_ray()
    assert not ray.is_initialized() and shutdowns == [0], shutdowns
    assert ray_engine._CLUSTER["runs"] == 0 and not ray_engine._CLUSTER["ours"]


# ----------------------------------------------------------------- cluster() on a stand-in Ray (no cluster)

class _Ray:
    """Ray as :func:`ray_engine.cluster` sees it, without a cluster: ``init`` / ``shutdown`` / ``is_initialized``,
    the GCS address of the cluster joined, and the Ray client connection (``ray://``) if ``client`` is given."""

    def __init__(self, gcs: str = "192.0.2.5:6379", client: "str | None" = None, joined: bool = False):
        from types import SimpleNamespace

        self.joined, self.gcs = joined, gcs
        context = SimpleNamespace(client_worker=SimpleNamespace(_conn_str=client))
        stub = SimpleNamespace(get_context=lambda: context, is_connected=lambda: client is not None and self.joined)
        self.util = SimpleNamespace(client=SimpleNamespace(ray=stub))
        self._private = SimpleNamespace(worker=SimpleNamespace(_global_node=None))  # head: not this process's

    def is_initialized(self) -> bool:
        return self.joined

    def init(self, **kwargs) -> None:
        self.joined = True

    def shutdown(self) -> None:
        self.joined = False

    def get_runtime_context(self):
        from types import SimpleNamespace

        return SimpleNamespace(gcs_address=self.gcs)


def test_a_ray_client_address_of_the_cluster_this_process_is_connected_to_is_that_cluster():
    """The caller connected to a remote cluster through the Ray client (``ray.init("ray://HEAD:10001")``; the GCS
    is at ``HEAD:6379``): a run given that same ``ray://`` address runs there (it was refused, "already joined to
    the Ray cluster at HEAD:6379": the client server's port is not the GCS's), so does its GCS address; a
    ``ray://`` address of another host or port is refused, the caller's connection left as it was."""
    fake = _Ray(gcs="192.0.2.5:6379", client="192.0.2.5:10001", joined=True)
    for address in ("ray://192.0.2.5:10001", "192.0.2.5:6379", None, "auto"):
        with ray_engine.cluster(fake, address):
            assert ray_engine._CLUSTER["runs"] == 1
    for other in ("ray://192.0.2.6:10001", "ray://192.0.2.5:10002"):
        with pytest.raises(salience.SalienceError, match=r"already joined to the Ray cluster at 192\.0\.2\.5:6379"):
            with ray_engine.cluster(fake, other):
                pass
    assert fake.joined and ray_engine._CLUSTER["runs"] == 0 and not ray_engine._CLUSTER["ours"]
    fake = _Ray(gcs="192.0.2.5:6379")  # joined directly (no client): a ray:// address is another connection
    fake.joined = True
    with pytest.raises(salience.SalienceError):
        with ray_engine.cluster(fake, "ray://192.0.2.5:10001"):
            pass


def test_the_thread_of_a_cluster_shut_down_under_its_runs_ends():
    """A run in a thread starts the cluster (from salience's thread that lives until it is shut down); the caller
    shuts it down (``ray.shutdown()``) while the run goes; a second run then starts another. Once both end, the
    second cluster's thread is left (salience keeps that cluster), the first's is not: it waited for ever (one
    leaked per such restart); ``shutdown_ray()`` lets the second's end."""
    fake, entered, leave = _Ray(), threading.Barrier(2), threading.Event()

    def keepers() -> int:
        return sum(t.name == "salience-ray-cluster" and t.is_alive() for t in threading.enumerate())

    before = keepers()

    def first() -> None:
        with ray_engine.cluster(fake):
            entered.wait(10)
            leave.wait(10)

    t = threading.Thread(target=first)
    t.start()
    entered.wait(10)
    fake.shutdown()  # the caller's ray.shutdown() under the run

    def second() -> None:
        with ray_engine.cluster(fake):
            assert fake.joined and ray_engine._CLUSTER["runs"] == 2
            leave.set()

    s = threading.Thread(target=second)
    s.start()
    s.join(10), t.join(10)

    def settled(n: int) -> int:
        until = time.monotonic() + 5
        while keepers() > n and time.monotonic() < until:
            time.sleep(0.01)
        return keepers()

    assert settled(before + 1) == before + 1 and fake.joined and ray_engine._CLUSTER["ours"]
    ray_engine._shutdown(fake)
    assert settled(before) == before and not fake.joined
    assert ray_engine._CLUSTER["runs"] == 0 and not ray_engine._CLUSTER["ours"]


def test_an_ipv6_address_of_the_joined_cluster_written_otherwise_is_that_cluster():
    """Ray writes an IPv6 node's GCS as ``[IP]:port`` (``ray._common.network_utils.build_address``): the same
    address written otherwise (another case, zeros spelt out) is the joined cluster (it was refused: ``[`` is
    no host name), another IPv6 host or port is not; IPv4 as before."""
    same = ray_engine._same_cluster
    assert same("[2001:DB8:0::5]:6379", "[2001:db8::5]:6379", None)
    assert same("[0:0:0:0:0:0:0:1]:6379", "[::1]:6379", None)
    assert not same("[2001:db8::6]:6379", "[2001:db8::5]:6379", None)
    assert not same("[2001:db8::5]:6380", "[2001:db8::5]:6379", None)
    assert same("localhost:6379", "127.0.0.1:6379", None) and not same("192.0.2.6:6379", "192.0.2.5:6379", None)
    assert not same("ray://192.0.2.5:6379", "192.0.2.5:6379", None)
