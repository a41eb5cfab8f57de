"""Serving the explorer: a uvicorn server on a socket of its own, in a thread, and its handle."""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from typing import Any, Optional, Sequence, Union

from torch import nn

from salience._core.errors import SalienceError
from salience.explore.app import Hub, create_app, stop_workers
from salience.explore.compute import ModelSlot, name_model
from salience.explore.hosts import HostGuard, is_local
from salience.explore.images import FileSource, ImageStore
from salience.explore.runs import RunSource, is_run
from salience.loading.images import DEFAULT_MAX_PIXELS
from salience.loading.keras import is_keras_model, wrap_keras
from salience.loading.models import load_model

__all__ = ["Explorer", "start", "build_hub", "compared", "is_local", "bind_socket", "REMOTE_WARNING", "SLOTS"]

REMOTE_WARNING = ("warning: the explorer listens on {host}: anyone who can reach port {port} can run the model "
                  "on their images and read the images you named. Use the default 127.0.0.1 (with SSH port "
                  "forwarding) unless this is what you want.")

ModelLike = Union[str, nn.Module]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: a free port the system picks)."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise SalienceError(f"port must be 0..65535 (0: a free port), got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise SalienceError(f"cannot resolve host {host!r} ({e}); e.g. 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise SalienceError(f"cannot listen on {host}:{port} ({e.strerror}); use another --port, or 0 for a free one") \
            from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _slot(name: str, model: ModelLike, load: dict[str, Any]) -> ModelSlot:
    m = load_model(model, **load) if isinstance(model, (str, os.PathLike)) else model
    if is_keras_model(m):  # a Keras model itself (as load_model("net.keras") would give it): (B, C, H, W) in
        m = wrap_keras(m)
    if not isinstance(m, nn.Module):
        raise SalienceError(f"expected a model spec such as 'demo:shapes' or a torch.nn.Module, got {type(m).__name__}")
    return ModelSlot(name, name_model(m, type(m).__name__) if not isinstance(model, str) else m)


SLOTS = "abcdefghijklmnopqrstuvwxyz"
"""The models' slot names: ``a`` the model, ``b``, ``c``, ... the compared ones in order."""

CompareLike = Union[None, ModelLike, Sequence[ModelLike]]
CompareLoad = Union[None, dict[str, Any], Sequence[Optional[dict[str, Any]]]]


def compared(compare: CompareLike, compare_load: CompareLoad = None) -> list[tuple[ModelLike, dict[str, Any]]]:
    """The models to compare, each with its loading keywords: ``compare`` one model (a spec or a
    module) or a list of them; ``compare_load`` one dict for all, or a list of as many (``None``
    for none). A :class:`SalienceError` when the counts differ or there are too many."""
    models: list[ModelLike] = [] if compare is None else (list(compare) if isinstance(compare, (list, tuple))
                                                            else [compare])
    if len(models) > len(SLOTS) - 1:
        raise SalienceError(f"at most {len(SLOTS) - 1} models to compare, got {len(models)}")
    if compare_load is None or isinstance(compare_load, dict):
        loads = [dict(compare_load or {})] * len(models)
    else:
        loads = [dict(d or {}) for d in compare_load]
        if len(loads) != len(models):
            raise SalienceError(f"compare_load (--compare-weights) gives {len(loads)} settings for {len(models)} "
                                "compared models: give one for all, or one per model in the same order")
    return list(zip(models, loads))


def build_hub(model: ModelLike, images: Sequence[Any] = (), *, compare: CompareLike = None,
              max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, load: Optional[dict[str, Any]] = None,
              runs: Sequence[Any] = (), compare_load: CompareLoad = None) -> Hub:
    """The server's state: the model (slot ``a``) and each ``compare`` model (``b``, ``c``, ... in
    order; one model or a list), loaded once, and the images. A folder among ``images`` that holds
    a salience run's ``run.json`` (or its lock, or its marked tables: :func:`salience.explore.runs.is_run`) is a
    dataset run, as are ``runs``. ``load``: :func:`load_model`'s keywords for a
    model spec; ``compare_load``: over them for the compared models (e.g. other ``weights``), one
    dict for all or a list of one per model (:func:`compared`)."""
    others = compared(compare, compare_load)
    run_folders = [p for p in images if is_run(p)] + list(runs)
    files = [p for p in images if not is_run(p)]
    run_sources = [RunSource(f, n) for n, f in enumerate(run_folders)]
    load = dict(load or {})
    slots: list[ModelSlot] = []
    try:  # each slot starts a worker thread: one that fails to load stops those started before it
        for name, m, extra in [("a", model, {})] + [(SLOTS[i + 1], m, e) for i, (m, e) in enumerate(others)]:
            slots.append(_slot(name, m, {**load, **extra}))
        sources = ([FileSource(files)] if files else []) + run_sources
        return Hub(slots, ImageStore(sources, max_pixels=max_pixels), runs=run_sources)
    except BaseException:
        stop_workers(slots)
        raise


class Explorer:
    """A running explorer: its ``url``; :meth:`stop` ends the server and the workers."""

    def __init__(self, hub: Hub, sock: socket.socket, host: str,
                 allow_hosts: Optional[Sequence[str]] = None) -> None:
        import uvicorn

        self.hub = hub
        self.app = create_app(hub)
        port = sock.getsockname()[1]
        shown = host if is_local(host) or host not in ("0.0.0.0", "::") else socket.gethostname()
        self.url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}/"
        self.port = port
        self._sock = sock
        # log_config=None: uvicorn leaves the process's logging as it was (no handler bound to this moment's stderr)
        # served behind the Host / Origin checks (salience.explore.hosts: other sites, DNS rebinding)
        guarded = HostGuard(self.app, local=is_local(host), allow_hosts=allow_hosts)
        config = uvicorn.Config(guarded, log_level="warning", lifespan="off", access_log=False, log_config=None)
        self._server = uvicorn.Server(config)
        self._thread: Optional[threading.Thread] = None

    def serve_forever(self) -> None:
        """Serve in this thread until interrupted (the command line)."""
        try:
            self._server.run(sockets=[self._sock])
            if self._server.should_exit:
                # Ctrl-C or SIGTERM, caught by uvicorn, which shuts down and then raises the signal again;
                # but asyncio's runner turns that SIGINT into a KeyboardInterrupt only while its task is
                # still running, so the process could end with 0 instead of 130 (seen under load)
                raise KeyboardInterrupt
        finally:
            self.hub.close()

    def start(self) -> "Explorer":
        """Serve in a background thread; returns once the server answers."""
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="salience-explore-server", daemon=True)
        self._thread.start()
        end = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive() and time.monotonic() < end:
            time.sleep(0.01)
        if not self._server.started:
            raise SalienceError("the explorer's server did not start")
        return self

    def stop(self) -> None:
        """Stop serving, cancel queued computations, and free the socket."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        with contextlib.suppress(OSError):
            self._sock.close()
        self.hub.close()

    def __enter__(self) -> "Explorer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _repr_html_(self) -> str:
        return f'<a href="{self.url}" target="_blank">{self.url}</a>'

    def __repr__(self) -> str:
        return f"Explorer({self.url!r})"


def start(model: ModelLike, images: Sequence[Any] = (), *, compare: CompareLike = None,
          host: str = "127.0.0.1", port: int = 0, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
          load: Optional[dict[str, Any]] = None, background: bool = True, runs: Sequence[Any] = (),
          compare_load: CompareLoad = None, allow_hosts: Optional[Sequence[str]] = None) -> Explorer:
    """Load the models (``compare``: one model or a list, as :func:`build_hub`), bind the socket,
    and (``background``) serve in a thread. A host that is
    not loopback prints :data:`REMOTE_WARNING` on stderr. Requests are answered only for loopback
    host names and from the page itself (:mod:`salience.explore.hosts`); ``allow_hosts`` adds names
    (a proxy's; ``"*"``: any)."""
    _check_deps()
    hub = build_hub(model, images, compare=compare, max_pixels=max_pixels, load=load, runs=runs,
                    compare_load=compare_load)
    sock, explorer = None, None
    try:
        sock = bind_socket(host, port)
        if not is_local(host):
            print("salience: " + REMOTE_WARNING.format(host=host, port=sock.getsockname()[1]), file=sys.stderr)
        explorer = Explorer(hub, sock, host, allow_hosts)
        return explorer.start() if background else explorer
    except BaseException:  # the workers, the uploads and the socket: nothing left behind a failed start
        if explorer is not None:
            explorer.stop()
            raise
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        hub.close()
        raise


def _check_deps() -> None:
    missing = []
    for module in ("starlette", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise SalienceError(f"the explorer needs {' and '.join(missing)}: pip install 'salience[explore]'")
