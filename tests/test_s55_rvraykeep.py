"""Review of the kept Ray cluster (session 55, ``ray_engine.shutdown_ray``): a Ray client connection
(``address="ray://..."``) the caller makes after shutting salience's down is the caller's, not salience's. Ray keeps
one client context for the process (the same object across ``ray.shutdown()`` and a new ``ray.init("ray://...")``):
taken as the connection's identity, salience's ``shutdown_ray()`` (and its exit hook) disconnected the caller. On a
stand-in Ray (no cluster, milliseconds)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("ray", reason="the ray extra (pip install salience[ray]) is not installed")

from salience.runs import ray_engine  # noqa: E402


class _Client:
    """Ray as ``ray_engine`` sees it joined through a Ray client: no ``Node``; one client context for the process
    (as Ray's ``_default_context``), holding a new client worker at each ``init``, none after ``shutdown``."""

    def __init__(self):
        self.context = SimpleNamespace(client_worker=None)
        client = SimpleNamespace(get_context=lambda: self.context, is_connected=self.is_initialized)
        self.util = SimpleNamespace(client=SimpleNamespace(ray=client))
        self._private = SimpleNamespace(worker=SimpleNamespace(_global_node=None))
        self.shutdowns = 0

    def is_initialized(self) -> bool:
        return self.context.client_worker is not None

    def init(self, **kwargs) -> None:
        self.context.client_worker = object()

    def shutdown(self) -> None:
        self.context.client_worker = None
        self.shutdowns += 1

    def get_runtime_context(self):
        raise RuntimeError("a Ray client connection has no GCS address to give")


def test_shutdown_ray_leaves_the_callers_own_ray_client_connection():
    """Salience connects for a run (``address="ray://..."``) and keeps it; the caller shuts it down and connects
    again on their own: ``shutdown_ray()`` then forgets salience's and leaves the caller's connected; a run on it
    uses it; a second ``shutdown_ray()`` does nothing either."""
    fake = _Client()
    with ray_engine.cluster(fake, "ray://192.0.2.5:10001"):
        pass
    assert fake.is_initialized() and ray_engine._CLUSTER["ours"]
    fake.shutdown(), fake.init()  # the caller's ray.shutdown(), then their own ray.init("ray://...")
    ray_engine._shutdown(fake)
    assert fake.is_initialized() and fake.shutdowns == 1 and not ray_engine._CLUSTER["ours"]
    with ray_engine.cluster(fake):  # a run on the caller's connection: used, not taken over
        pass
    ray_engine._shutdown(fake)
    assert fake.is_initialized() and fake.shutdowns == 1 and ray_engine._CLUSTER["runs"] == 0


def test_salience_s_own_ray_client_connection_is_still_shut_down():
    """The connection salience made (``address="ray://..."``), untouched by the caller, is salience's:
    ``shutdown_ray()`` disconnects it, once."""
    fake = _Client()
    with ray_engine.cluster(fake, "ray://192.0.2.5:10001"):
        pass
    ray_engine._shutdown(fake), ray_engine._shutdown(fake)
    assert not fake.is_initialized() and fake.shutdowns == 1 and not ray_engine._CLUSTER["ours"]
