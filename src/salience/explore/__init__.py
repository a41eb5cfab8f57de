"""The explorer: a local web page to compare methods, targets and models on your own images.

``salience.explore(model, images)`` (or ``salience explore --model M IMAGES``) starts a server on
127.0.0.1 and a free port: drop an image, see the model's top classes, add methods and classes to
a grid of maps, change each method's settings, and the display (opacity, colormap, signed /
absolute, percentile clip) in the browser without recomputing; insertion / deletion curves and the
randomization sanity check on demand; the figure as PNG and the raw maps as ``.npy``. The page is
plain HTML / JS / CSS shipped in the package (``static/``), with relative URLs only.

Rooms: :mod:`~salience.explore.jobs` (the worker: one computation at a time per model, a queue
with positions, progress and cancel), :mod:`~salience.explore.cache`, :mod:`~salience.explore.images`
(sources of images: files, uploads), :mod:`~salience.explore.compute` (what runs on a model),
:mod:`~salience.explore.app` (the Starlette app) and :mod:`~salience.explore.server` (uvicorn).
Starlette and uvicorn are imported only when a server starts (``pip install 'salience[explore]'``).

``salience.explore`` is this function; the package's modules are reached as
``from salience.explore import server`` or ``import salience.explore.app``.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from torch import nn

from salience.loading.images import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    from salience.runs.store import Run

__all__ = ["explore"]


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def explore(model: Union[str, nn.Module], images: Optional[Sequence[Union[str, "os.PathLike[str]"]]] = None, *,
            compare: Union[None, str, nn.Module, Sequence[Union[str, nn.Module]]] = None,
            run: Union[None, str, "os.PathLike[str]", "Run", Sequence[Union[str, "os.PathLike[str]", "Run"]]] = None,
            host: str = "127.0.0.1", port: int = 0,
            max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, show: Optional[bool] = None,
            height: int = 800, allow_hosts: Optional[Sequence[str]] = None, **load: Any) -> Any:
    """Start the explorer for ``model`` (a module, or any spec :func:`salience.load_model` takes;
    ``load`` keywords go to it) in a background thread and return its handle
    (:class:`salience.explore.server.Explorer`: ``.url``, ``.stop()``).

    ``images``: image files or folders to pick from (only these and uploads are served); a folder
    holding a salience run's ``run.json`` is a dataset run (``salience explain DIR --out RUN``), as is ``run`` (one
    run folder or several, or the :class:`~salience.runs.store.Run` that :func:`salience.explain_dataset`
    and :func:`salience.open_run` return): its rows are a gallery to sort and filter, each opened in the
    explorer. A run folder without its ``run.json`` yet (a run starting, or stopped before it wrote it) raises a
    :class:`~salience.SalienceError` in ``salience explore``'s words (:func:`salience.runs.store.unwritten_run`).
    ``compare``: another model shown side by side, or a list of them (each a column of its own). ``host`` / ``port``: where to listen (default
    loopback and a free port; another host prints a warning). ``show``: display the page inline
    when in a Jupyter notebook (default), else print the URL: an IFrame of the URL, or of
    ``$JUPYTERHUB_SERVICE_PREFIX/proxy/PORT/`` under JupyterHub (jupyter-server-proxy), or Colab's
    ``serve_kernel_port_as_iframe`` in Google Colab. ``allow_hosts``: host names answered besides
    localhost (``"*"``: any; see :mod:`salience.explore.hosts`); shown through Colab's or
    JupyterHub's proxy, the server is on the remote kernel's loopback, out of reach of the pages in
    the user's browser, and the proxy's names are answered (``"*"``) unless given.
    """
    from salience.explore.server import start

    if isinstance(images, (str, os.PathLike)):
        images = [images]
    from salience.runs.store import Run

    # a Run (what explain_dataset / open_run return) is one run, not the rows it iterates
    runs = [] if run is None else [run] if isinstance(run, (str, os.PathLike, Run)) else list(run)
    notebook = _in_notebook() if show is None else show
    proxied = notebook and ("google.colab" in sys.modules or bool(os.environ.get("JUPYTERHUB_SERVICE_PREFIX")))
    if allow_hosts is None and proxied:
        allow_hosts = ["*"]  # the proxy's own names reach the kernel's loopback; the browser's pages cannot
    explorer = start(model, list(images or []), compare=compare, host=host, port=port, max_pixels=max_pixels,
                     load=load, runs=runs, allow_hosts=allow_hosts)
    if notebook and "google.colab" in sys.modules:  # Colab: the kernel's port reached through Colab's proxy
        from google.colab import output

        output.serve_kernel_port_as_iframe(port=explorer.port, path="/", width="100%", height=height)
    elif notebook:
        from IPython.display import IFrame, display

        prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX")  # behind JupyterHub: jupyter-server-proxy's path
        src = f"{prefix.rstrip('/')}/proxy/{explorer.port}/" if prefix else explorer.url
        display(IFrame(src, width="100%", height=height))
    else:
        print(f"salience explore: {explorer.url}")
    return explorer
