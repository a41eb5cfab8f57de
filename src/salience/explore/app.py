"""The explorer's web application (Starlette): the page, its static files, and the JSON API.

Every URL is relative to where the app is mounted (the page uses ``api/...`` and
``static/...``), so it works behind the proxies of VS Code, JupyterHub and hosted notebooks.
Requests are checked before anything is queued: a bad one gets a 4xx with ``{"error": "..."}``
and the server goes on. Computations are jobs on the model's worker (:mod:`salience.explore.jobs`):
``POST api/explain`` answers at once, with the map's key when it is cached, else with a job to
poll (``GET api/jobs/ID``: state, queue position, progress) or cancel (``DELETE api/jobs/ID``).
A map done comes with ``warnings``: the texts of the warnings its computation raised (e.g.
integrated gradients' completeness gap: the map cannot be trusted; a map that is one value
everywhere, :func:`salience.render.viz.constant_map_note`), which the page shows under it;
so do the result of its curves and of its sanity check (``result.warnings``: theirs, and the map's
when it was computed again for them), a run described by ``api/runs`` and a page of its rows
(``warnings``), shown under each (the gallery's under its table).

Endpoints: ``GET api/info`` (models, methods and their options, colormaps, limits), ``GET
api/colormaps/NAME``, ``GET/POST api/images``, ``GET api/images/ID/picture.png?slot=``, ``GET
api/models/SLOT/top?image=&k=``, ``GET api/models/SLOT/layers``, ``POST api/explain``, ``GET/DELETE
api/jobs/ID``, ``GET api/maps/KEY.npy`` (raw float32), ``GET api/maps/KEY/display.npy`` (the
``(H, W)`` map drawn), ``GET api/maps/KEY.png``, ``POST api/maps/KEY/curves``, ``POST
api/maps/KEY/sanity``, ``GET api/figure.png?image=&keys=``, ``GET api/status``; dataset runs
(:mod:`salience.explore.runs`): ``GET api/runs``, ``GET api/runs/RUN/rows?sort=&order=&class=&correct=&
min_probability=&max_probability=&metric=&min=&max=&offset=&limit=``, ``GET api/runs/RUN/rows/INDEX``,
``GET api/runs/RUN/rows/INDEX/thumb.jpg?tile=``, ``GET api/runs/RUN/rows/INDEX/maps/METHOD.npy?k=``.
A row's image is the image ``RUN-INDEX`` of every image endpoint.
"""
from __future__ import annotations

import asyncio
import collections
import io
import json
import math
import re
import threading
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Match, Mount, Route
from starlette.staticfiles import StaticFiles

import numpy as np
import torch

from salience._core.errors import SalienceError, user_stacklevel
from salience._core.tensors import model_device
from salience.explore import compute
from salience.explore.cache import ResultCache, key_of
from salience.explore.compute import ExplainRequest, ModelSlot
from salience.explore.images import ImageGone, ImageStore
from salience.explore.jobs import Job, QueueFull, Refused, Ticker
from salience.explore.runs import NotStored, RunSource, row_index
from salience.loading import remote
from salience.methods.gradcam import default_layer
from salience.render import viz
from salience.runs.store import BadIndex

__all__ = ["Hub", "create_app", "STATIC"]

STATIC = Path(__file__).resolve().parent / "static"
_MAX_JOBS = 4096  # finished jobs kept for polling (oldest dropped first)
_WAIT_S = 120.0  # longest a request waits for a quick job (top classes, default layer)


MAX_MAPS = 65536
"""Map keys a server remembers (what request makes each: a few hundred bytes each), the least
recently used forgotten past it; the maps themselves are in the cache, bounded by bytes."""


def stop_workers(slots: Iterable[ModelSlot], timeout: float = 5.0) -> None:
    """Cancel every job of the slots' workers and wait (``timeout`` seconds in all, the workers together) for their
    threads to end at their next forward pass: a hub's close, and a hub whose building failed (a compared model that
    did not load stops the workers started before it)."""
    slots = list(slots)
    for s in slots:
        s.worker.halt()
    end = time.monotonic() + timeout
    for s in slots:
        s.worker.stop(max(0.0, end - time.monotonic()))


class Hub:
    """The server's state: the model slots, the images, the cache of results, the jobs."""

    def __init__(self, slots: Sequence[ModelSlot], images: ImageStore, *, cache_bytes: int = 512 * 2**20,
                 runs: Sequence[RunSource] = (), max_maps: int = MAX_MAPS) -> None:
        self.slots = {s.name: s for s in slots}
        self.images = images
        self.cache = ResultCache(cache_bytes)
        self.runs = {r.id: r for r in runs}  # dataset runs (their rows' images are in ``images`` too)
        self.jobs: collections.OrderedDict[str, tuple[Job, ModelSlot]] = collections.OrderedDict()
        # map key -> the request that makes it, the least recently used first (bounded: MAX_MAPS)
        self.maps: collections.OrderedDict[str, ExplainRequest] = collections.OrderedDict()
        self.max_maps = max(1, int(max_maps))
        # map key -> the warnings raised while it was computed (e.g. IG's completeness gap), as many keys
        # as self.maps at most; none for a map that raised none
        self.warned: collections.OrderedDict[str, list[str]] = collections.OrderedDict()
        self.inflight: dict[str, Job] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lookups (404s)

    def slot(self, name: str) -> ModelSlot:
        if name not in self.slots:
            raise HTTPException(404, f"no model {name!r}; the models are {', '.join(self.slots)}")
        return self.slots[name]

    def image(self, image_id: Any) -> Any:
        """Image ``image_id`` and its digest (it may be read from object storage: blocking; the
        endpoints call :meth:`image_async`). A file or object that is gone is 404, storage that
        does not answer (endpoint, credentials, bucket) 502, both naming the path or URL and what
        to check (:func:`_refusal`)."""
        try:
            return self.images.load(str(image_id))
        except KeyError:
            for source in self.runs.values():  # a run's row id: which row and why it opens no image
                if (why := source.missing(str(image_id))) is not None:
                    raise HTTPException(404, why) from None
            raise HTTPException(404, f"no image {image_id!r}; upload it or pick one of GET api/images") from None
        except (ImageGone, remote.StorageError) as e:
            raise _refusal(e) from None

    async def image_async(self, image_id: Any) -> Any:
        """:meth:`image` in a thread: a slow or unreachable storage never blocks the server."""
        return await asyncio.to_thread(self.image, image_id)

    def run(self, run_id: str) -> RunSource:
        if run_id not in self.runs:
            raise HTTPException(404, f"no run {run_id!r}; the runs are GET api/runs")
        return self.runs[run_id]

    def run_row(self, request: Request) -> tuple[RunSource, int]:
        """The run and row index of a ``api/runs/RUN/rows/INDEX/...`` URL (404 when there is none)."""
        source = self.run(request.path_params["run"])
        text = request.path_params["index"]
        index = row_index(text)
        try:
            if index is None:
                raise KeyError(text)
            source.row(index)
        except KeyError:
            unindexed = source.run.index_error() if index is not None else None
            raise HTTPException(404, f"no row {text!r} in run {source.id!r} (it has {source.count()} rows, by index)"
                                + ("" if unindexed is None else f"; it may be one of the rows without an index: "
                                                                f"{unindexed}")) from None
        return source, index

    def request_of(self, key: str) -> ExplainRequest:
        with self._lock:
            if key not in self.maps:
                raise HTTPException(404, f"no map {key!r}; ask for it with POST api/explain")
            self.maps.move_to_end(key)
            return self.maps[key]

    def remember(self, key: str, request: ExplainRequest) -> None:
        """Record what makes map ``key``; past :attr:`max_maps` keys the least recently used is
        forgotten (a key asked for again is recorded again by POST api/explain): one entry per
        distinct request made the server grow for as long as it ran."""
        with self._lock:
            self.maps[key] = request
            self.maps.move_to_end(key)
            while len(self.maps) > self.max_maps:
                self.maps.popitem(last=False)

    def job(self, job_id: str) -> tuple[Job, ModelSlot]:
        with self._lock:
            if job_id not in self.jobs:
                raise HTTPException(404, f"no job {job_id!r}")
            return self.jobs[job_id]

    # ------------------------------------------------------------------ jobs

    def submit(self, slot: ModelSlot, kind: str, run: Callable[[Ticker], Any], key: Optional[str] = None,
               hold: bool = True, **meta: Any) -> Job:
        """A job on ``slot``'s worker; the same ``key`` in flight gives the job already queued.
        ``hold=False``: the ended job keeps no result (a map is in the cache, within its budget of
        bytes; the jobs kept for polling must not hold thousands of maps beside it)."""
        with self._lock:
            joined = self.inflight.get(key) if key is not None else None
            if joined is not None and not joined.ended.is_set() and not joined.cancel_requested.is_set():
                joined.holders += 1
                return joined

        def keep(ticker: Ticker) -> Any:
            try:
                result = run(ticker)
                if key is not None:
                    self.cache.put(key, result)
                return result if hold else None
            except (HTTPException, SalienceError) as e:  # e.g. the image gone: its own status, not a 500
                answer = _refusal(e)
                raise Refused(str(answer.detail), answer.status_code) from None
            finally:
                with self._lock:
                    if key is not None and self.inflight.get(key) is job:
                        del self.inflight[key]

        job = Job(kind, keep, meta={"key": key, **meta})
        try:
            slot.worker.submit(job)
        except QueueFull as e:
            raise HTTPException(503, str(e)) from None
        with self._lock:
            if key is not None:
                self.inflight[key] = job
            self.jobs[job.id] = (job, slot)
            while len(self.jobs) > _MAX_JOBS:
                old = next(iter(self.jobs))
                if not self.jobs[old][0].ended.is_set():
                    break
                del self.jobs[old]
        return job

    def cancel(self, job: Job, slot: ModelSlot) -> None:
        """One of the requests that joined ``job`` gives up: the job is cancelled when none is left
        (another tab's request for the same map goes on)."""
        with self._lock:
            job.holders -= 1
            last = job.holders <= 0
        if last:
            slot.worker.cancel(job)

    def map_raw(self, key: str, ticker: Optional[Ticker] = None, image: Any = None) -> Any:
        """The raw map ``key`` from the cache, or computed again (in the worker) when it was dropped:
        of ``image``, the pixels the request read (else read again, in the worker)."""
        raw = self.cache.get(key)
        if raw is None:
            if ticker is None:
                raise HTTPException(409, f"map {key!r} is not computed yet (or was dropped): POST api/explain again")
            req = self.request_of(key)
            slot = self.slot(req.slot)
            if image is None:
                image, _ = self.image(req.image)
            raw = self.explain_map(key, slot, image, req.method, req.target,
                                   compute.read_options(req.method, req.given()), ticker)
            self.cache.put(key, raw)
        return raw

    def explain_map(self, key: str, slot: ModelSlot, image: Any, method: str, target: int, given: dict[str, Any],
                    ticker: Ticker) -> Any:
        """:func:`compute.explain`, its warnings kept as map ``key``'s (:meth:`warnings_of`); a map that
        is one value everywhere as the page draws it (:func:`viz.constant_map_note` of
        :func:`compute.display_map`, ``max_c |m|`` for a per-channel map: its picture is a flat colour) is one."""
        with compute.caught_warnings() as said:
            raw = compute.explain(slot, image, method, target, given, ticker)
            note = viz.constant_map_note(compute.display_map(raw))
            if note is not None:
                warnings.warn(note, stacklevel=user_stacklevel())
        with self._lock:
            self.warned.pop(key, None)
            if said:
                self.warned[key] = said
                while len(self.warned) > self.max_maps:
                    self.warned.popitem(last=False)
        return raw

    def warnings_of(self, key: Optional[str]) -> list[str]:
        """The warnings raised while map ``key`` was computed (the map may not be trusted: the page
        shows them under it)."""
        with self._lock:
            return list(self.warned.get(key, [])) if key is not None else []

    def job_json(self, job: Job, slot: ModelSlot) -> dict[str, Any]:
        out = {"job": job.id, "kind": job.kind, "state": job.state, "progress": job.progress(),
               "position": slot.worker.position(job) if job.state == "queued" else None,
               "key": job.meta.get("key"), "model": slot.name, "done": job.done_units}
        if job.state == "running" and not job.total:
            out["note"] = job.note or "the amount of work is not known ahead"
        if job.state == "error":
            out.update(error=job.error, code=job.status_code)
        if job.state == "done" and job.kind in ("curves", "sanity", "top"):
            out["result"] = job.result
        if job.state == "done" and job.kind == "explain":
            out["warnings"] = self.warnings_of(job.meta.get("key"))
        return out

    def close(self, timeout: float = 5.0) -> None:
        """Cancel every job, wait (``timeout`` seconds in all, the workers together) for the threads to
        end at their next forward pass, and remove the uploads. :meth:`computing` says whether one is
        still inside a forward pass."""
        stop_workers(self.slots.values(), timeout)
        self.images.close()

    def computing(self) -> bool:
        """Whether a worker still runs (a forward pass that no cancel interrupts)."""
        return any(s.worker.alive for s in self.slots.values())


# --------------------------------------------------------------------------------- helpers


MAX_JSON_BYTES = 2**20
"""Largest JSON body read (``POST api/explain``: a few hundred bytes); larger bodies get 413."""


async def _json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object. Over :data:`MAX_JSON_BYTES` is a 413 (it was read whole, however
    large), nested past Python's recursion limit a 400 (it was a 500: ``RecursionError``)."""
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_JSON_BYTES:
            raise HTTPException(413, f"the JSON body is over {MAX_JSON_BYTES // 1024} kB; send "
                                     '{"model", "image", "method", "target", "options"} only')
    try:
        body = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError):
        raise HTTPException(400, "the body must be a JSON object, e.g. "
                                 '{"model": "a", "image": "f0", "method": "vanilla", "target": 0}') from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body


async def _wait(job: Job, timeout: float = _WAIT_S) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not job.ended.is_set():
        if loop.time() > end:
            raise HTTPException(504, "the model is busy; try again")
        await asyncio.sleep(0.01)
    if job.state == "error":
        raise HTTPException(job.status_code, job.error or "failed")
    if job.state == "cancelled":
        raise HTTPException(409, "cancelled")


def _float(request: Request, name: str, default: float, lo: float, hi: float) -> float:
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    try:
        v = float(text)
    except ValueError:
        raise HTTPException(400, f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(v):  # said "must be in [-inf, inf]" of a NaN
        raise HTTPException(400, f"{name} must be a finite number, got {text!r}")
    if not lo <= v <= hi:
        raise HTTPException(400, f"{name} must be in [{lo:g}, {hi:g}], got {text!r}")
    return v


def _int(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    """The whole number ``name`` of the query in ``[lo, hi]`` (``default`` when absent): a fraction
    is refused (``k=2.5`` gave 2 classes, ``offset=0.5`` the first page), and the number is read
    exactly (through a float, ``offset=4611686018427387903`` came back ``...904``)."""
    text = request.query_params.get(name)
    if text is None or text == "":
        return default
    if re.fullmatch(r"[+-]?[0-9]{1,30}", text.strip()) is None:
        raise HTTPException(400, f"{name} must be a whole number from {lo} to {hi}, got {text!r}")
    v = int(text)
    if not lo <= v <= hi:
        raise HTTPException(400, f"{name} must be a whole number from {lo} to {hi}, got {text!r}")
    return v


def _display(request: Request) -> dict[str, Any]:
    """Colormap, percentile and signedness from the query (as the page's display controls)."""
    cmap = request.query_params.get("cmap") or None
    if cmap is not None and cmap not in viz.COLORMAPS:
        raise HTTPException(400, f"unknown colormap {cmap!r}; one of {', '.join(viz.COLORMAPS)}")
    signed_text = request.query_params.get("signed", "auto")
    if signed_text not in ("auto", "signed", "abs"):
        raise HTTPException(400, f"signed must be auto, signed or abs, got {signed_text!r}")
    signed = {"auto": None, "signed": True, "abs": False}[signed_text]
    return {"cmap": cmap, "percentile": _float(request, "percentile", 99.0, 50.0, 100.0), "signed": signed}


def _hub(request: Request) -> Hub:
    return request.app.state.hub


# --------------------------------------------------------------------------------- endpoints


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def info(request: Request) -> Response:
    hub = _hub(request)
    return JSONResponse({
        "models": [s.describe() for s in hub.slots.values()],
        "methods": compute.options_schema(), "colormaps": list(viz.COLORMAPS),
        "limits": {"max_pixels": hub.images.max_pixels, "max_upload_bytes": hub.images.max_upload_bytes},
        "runs": [r.id for r in hub.runs.values()],
    })


async def colormap(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in viz.COLORMAPS:
        raise HTTPException(404, f"unknown colormap {name!r}; one of {', '.join(viz.COLORMAPS)}")
    return JSONResponse({"name": name, "lut": viz.colormap(name).tolist()})


async def list_images(request: Request) -> Response:
    return JSONResponse({"images": [e.public() for e in _hub(request).images.entries()]})


async def upload(request: Request) -> Response:
    hub = _hub(request)
    limit = hub.images.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + 65536:
        raise HTTPException(413, f"the upload is over the limit of {limit / 2**20:g} MB")
    name = request.query_params.get("name", "upload")
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=4)
        except HTTPException as e:  # Starlette's own words ("Missing boundary in multipart.") said nothing to do
            raise HTTPException(400, f"the multipart upload cannot be read ({str(e.detail).rstrip('.')}); send one "
                                     "image file in the field 'file', or the file's bytes as the body with ?name=") \
                from None
        item = form.get("file")
        if item is None or isinstance(item, str):
            raise HTTPException(400, "a multipart upload needs the image in a field named 'file'")
        data, name = await item.read(limit + 1), item.filename or name
    else:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"the upload is over the limit of {limit / 2**20:g} MB")
            chunks.append(chunk)
        data = b"".join(chunks)
    if not data:
        raise HTTPException(400, "the upload is empty; send the image file's bytes")
    if len(data) > limit:
        raise HTTPException(413, f"the upload is over the limit of {limit / 2**20:g} MB")
    entry = await asyncio.to_thread(hub.images.add_upload, data, name)
    image, _ = hub.images.load(entry.id)
    return JSONResponse({**entry.public(), "width": int(image.shape[-1]), "height": int(image.shape[-2])}, 201)


async def picture(request: Request) -> Response:
    hub = _hub(request)
    slot = hub.slot(request.query_params.get("slot", "a"))
    image, _ = await hub.image_async(request.path_params["id"])
    # resizing and encoding take a second for a 50-megapixel image: in a thread, the server answers meanwhile
    png = await asyncio.to_thread(lambda: compute.png_bytes(viz.to_uint8_image(slot.picture(image))))
    return Response(png, media_type="image/png")


async def top(request: Request) -> Response:
    hub = _hub(request)
    slot = hub.slot(request.path_params["slot"])
    image_id = request.query_params.get("image", "")
    image, digest = await hub.image_async(image_id)
    k = _int(request, "k", 5, 1, 1000)
    key = key_of(kind="top", model=slot.info.name, slot=slot.name, image=digest or image_id, k=k)
    cached = hub.cache.get(key)
    if cached is None:
        job = hub.submit(slot, "top", lambda t: compute.top_classes(slot, image, k), key=key)
        await _wait(job)
        cached = job.result
    return JSONResponse({"model": slot.name, "image": image_id, "classes": cached})


async def layers(request: Request) -> Response:
    hub = _hub(request)
    slot = hub.slot(request.path_params["slot"])
    if slot.default_layer is None:
        def find(t: Ticker) -> str:
            x = torch.zeros(1, slot.info.channels, *slot.size, device=model_device(slot.model))
            return default_layer(slot.model, x)
        job = hub.submit(slot, "layers", find)
        try:
            await _wait(job)
            slot.default_layer = job.result
        except HTTPException as e:
            if e.status_code == 504:  # busy: not an answer, the next request asks again
                return JSONResponse({"model": slot.name, "default": None, "default_error": None,
                                     "layers": compute.layer_tree(slot.model)})
            slot.default_layer, slot.default_error = "", str(e.detail)
    return JSONResponse({"model": slot.name, "default": slot.default_layer or None,
                         "default_error": slot.default_error, "layers": compute.layer_tree(slot.model)})


async def explain(request: Request) -> Response:
    hub = _hub(request)
    body = await _json_body(request)
    slot = hub.slot(str(body.get("model", "a")))
    image_id = body.get("image")
    image, digest = await hub.image_async(image_id)
    method = body.get("method")
    if not isinstance(method, str):
        raise HTTPException(400, "method must be a method name, e.g. vanilla")
    raw_options = body.get("options") or {}
    if not isinstance(raw_options, dict):
        raise HTTPException(400, "options must be an object {keyword: value}")
    target = body.get("target")
    # in a thread: a method's dry run (its checks of the values) must not hold the event loop
    given = await asyncio.to_thread(compute.check_request, slot, method, target, raw_options)
    canon = {k: str(v).strip() for k, v in raw_options.items() if k in given}
    key = key_of(kind="map", model=slot.info.name, slot=slot.name, image=digest or image_id, method=method,
                 target=target, options=canon)
    hub.remember(key, ExplainRequest(slot.name, str(image_id), method, int(target),
                                     tuple(sorted((k, v) for k, v in canon.items()))))
    about = {"key": key, "model": slot.name, "method": method, "target": target,
             "target_name": slot.class_name(int(target))}
    if key in hub.cache:
        return JSONResponse({**about, "state": "done", "progress": 1.0, "warnings": hub.warnings_of(key)})
    job = hub.submit(slot, "explain", lambda t: hub.explain_map(key, slot, image, method, int(target), given, t),
                     key=key, hold=False)
    return JSONResponse({**about, **hub.job_json(job, slot)}, 202)


async def job_status(request: Request) -> Response:
    hub = _hub(request)
    job, slot = hub.job(request.path_params["id"])
    return JSONResponse(hub.job_json(job, slot))


async def job_cancel(request: Request) -> Response:
    hub = _hub(request)
    job, slot = hub.job(request.path_params["id"])
    hub.cancel(job, slot)
    return JSONResponse(hub.job_json(job, slot))


async def map_npy(request: Request) -> Response:
    hub = _hub(request)
    key, what = request.path_params["key"], request.path_params.get("what")
    hub.request_of(key)
    if what not in (None, "display"):  # any other name answered the raw map
        raise HTTPException(404, f"no {what!r} map; GET api/maps/KEY.npy (the raw map) or api/maps/KEY/display.npy "
                                 "(the (H, W) map drawn)")
    raw = hub.map_raw(key)
    data = raw if what is None else compute.display_map(raw)
    return Response(compute.npy_bytes(data), media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{_file_name(hub, key)}.npy"'})


def _file_name(hub: Hub, key: str) -> str:
    req = hub.request_of(key)
    return f"{req.method}-class{req.target}-{req.image}-{req.slot}"


async def map_png(request: Request) -> Response:
    hub = _hub(request)
    key = request.path_params["key"]
    hub.request_of(key)
    png = compute.map_png(hub.map_raw(key), **_display(request))
    return Response(png, media_type="image/png",
                    headers={"Content-Disposition": f'inline; filename="{_file_name(hub, key)}.png"'})


async def on_map(request: Request) -> Response:
    """``POST api/maps/KEY/curves`` and ``.../sanity``: a job, or the cached result."""
    hub = _hub(request)
    key, what = request.path_params["key"], request.path_params["what"]
    if what not in ("curves", "sanity"):
        raise HTTPException(404, f"no {what!r} for a map; curves or sanity")
    req = hub.request_of(key)
    slot = hub.slot(req.slot)
    if what == "sanity":
        compute.check_sanity(slot)
    rkey = key_of(kind=what, map=key)
    cached = hub.cache.get(rkey)
    if cached is not None:
        return JSONResponse({"key": key, "state": "done", "kind": what, "result": cached, "progress": 1.0})
    image, _ = await hub.image_async(req.image)
    given = compute.read_options(req.method, req.given())

    def run(t: Ticker) -> Any:
        # the warnings of the curves or the test, and of the map when it is computed again (dropped from
        # the cache), come with the result (the page shows them under it)
        with compute.caught_warnings() as said:
            raw = hub.map_raw(key, t, image)
            if what == "curves":
                result = compute.curves(slot, image, raw, req.target, t)
            else:
                result = compute.sanity(slot, image, req.method, req.target, given, t)
        return {**result, "warnings": said}
    job = hub.submit(slot, what, run, key=rkey)
    return JSONResponse({**hub.job_json(job, slot), "key": key}, 202)


async def figure(request: Request) -> Response:
    hub = _hub(request)
    keys = [k for k in request.query_params.get("keys", "").split(",") if k]
    if not keys:
        raise HTTPException(400, "keys must name one or more maps (from POST api/explain), comma-separated")
    reqs = [hub.request_of(k) for k in keys]
    if len({r.image for r in reqs}) != 1:
        raise HTTPException(400, "a figure shows the maps of one image; these keys are of several")
    image, _ = await hub.image_async(reqs[0].image)
    # each model's maps on the picture that model sees (with --compare, another input size or crop):
    # a row per model, in the order of the keys
    rows: dict[str, dict[str, np.ndarray]] = {}
    for k, r in zip(keys, reqs):
        label = f"{r.method} {hub.slot(r.slot).class_name(r.target)}" + (f" ({r.slot})" if len(hub.slots) > 1 else "")
        rows.setdefault(r.slot, {})[label] = hub.map_raw(k)
    d = _display(request)
    alpha = _float(request, "alpha", 0.5, 0.0, 1.0)
    png = await asyncio.to_thread(lambda: compute.figure_png(
        [(hub.slot(s).picture(image), maps) for s, maps in rows.items()], cmap=d["cmap"],
        percentile=d["percentile"], signed=d["signed"], alpha=alpha))
    return Response(png, media_type="image/png", headers={"Content-Disposition": 'attachment; filename="figure.png"'})


async def status(request: Request) -> Response:
    hub = _hub(request)
    return JSONResponse({"models": {n: {"queue": s.worker.waiting(), "busy": s.worker.current is not None}
                                    for n, s in hub.slots.items()},
                         "jobs": len(hub.jobs), "cache": {"items": len(hub.cache), "bytes": hub.cache.bytes}})


async def runs(request: Request) -> Response:
    hub = _hub(request)
    def describe(source: RunSource) -> dict[str, Any]:
        with compute.caught_warnings() as said:  # e.g. reading its table: shown under the gallery
            about = source.describe()
            notes = source.constant_notes()  # its flat maps (thumbnails, stored maps), said as the CLI says them
        return {**about, "warnings": notes + [w for w in said if w not in notes]}

    described = await asyncio.to_thread(lambda: [describe(r) for r in hub.runs.values()])
    return JSONResponse({"runs": described})


def _bool(request: Request, name: str) -> Optional[bool]:
    text = request.query_params.get(name, "")
    if text in ("", "any"):
        return None
    if text.lower() not in ("true", "false", "1", "0", "right", "wrong"):
        raise HTTPException(400, f"{name} must be true (right) or false (wrong), got {text!r}")
    return text.lower() in ("true", "1", "right")


def _opt_float(request: Request, name: str) -> Optional[float]:
    return None if request.query_params.get(name, "") == "" else _float(request, name, 0.0, -math.inf, math.inf)


async def run_rows(request: Request) -> Response:
    """The run's rows, filtered and sorted, a page of them (``offset``, ``limit`` <= 1000), and the
    texts of the warnings raised while they were read (``warnings``)."""
    source = _hub(request).run(request.path_params["run"])
    q = request.query_params
    order = q.get("order", "asc")
    if order not in ("asc", "desc"):
        raise HTTPException(400, f"order must be asc or desc, got {order!r}")
    def listed(**filters: Any) -> dict[str, Any]:
        with compute.caught_warnings() as said:  # shown under the gallery's table
            found = source.rows(**filters)
        return {**found, "warnings": said}

    pmin, pmax, low, high = _ranges(request)
    found = await asyncio.to_thread(
        listed, sort=q.get("sort") or "index", descending=order == "desc", cls=q.get("class") or None,
        correct=_bool(request, "correct"), min_probability=pmin, max_probability=pmax,
        metric=q.get("metric") or None, low=low, high=high,
        offset=_int(request, "offset", 0, 0, 2**62), limit=_int(request, "limit", 100, 1, 1000))
    return JSONResponse(found)


def _ranges(request: Request) -> tuple[Optional[float], ...]:
    """The gallery's bounds: ``min_probability`` / ``max_probability`` in [0, 1], ``min`` / ``max`` of the
    metric, each min at most its max (a probability of 2, or a min above its max, answered an empty page
    as if no row matched; the page refuses them before asking, other clients were told nothing)."""
    bounds = (_opt_float(request, "min_probability"), _opt_float(request, "max_probability"),
              _opt_float(request, "min"), _opt_float(request, "max"))
    for name, v in zip(("min_probability", "max_probability"), bounds[:2]):
        if v is not None and not 0.0 <= v <= 1.0:
            raise HTTPException(400, f"{name} must be a probability from 0 to 1, got {v:g}")
    for (lo_name, lo), (hi_name, hi) in ((("min_probability", bounds[0]), ("max_probability", bounds[1])),
                                         (("min", bounds[2]), ("max", bounds[3]))):
        if lo is not None and hi is not None and lo > hi:
            raise HTTPException(400, f"{lo_name} {lo:g} is above {hi_name} {hi:g}: swap them, or leave one out")
    return bounds


async def run_row(request: Request) -> Response:
    source, index = _hub(request).run_row(request)
    return JSONResponse(source.row(index))


WARNINGS_HEADER = "X-Salience-Warnings"
"""The header of a binary answer (a run's thumbnail or stored map) that holds the texts of the
warnings raised while it was read, as a JSON list (ASCII: other characters ``\\u`` escaped); absent
when there were none. A JSON answer has them in its ``warnings``."""


def _with_warnings(headers: dict[str, str], said: list[str]) -> dict[str, str]:
    """``headers`` and, when ``said`` has texts, :data:`WARNINGS_HEADER` with them."""
    return {**headers, WARNINGS_HEADER: json.dumps(said)} if said else headers


async def run_thumb(request: Request) -> Response:
    """A row's thumbnail tile (JPEG), with the warnings raised while it was read (:data:`WARNINGS_HEADER`)."""
    source, index = _hub(request).run_row(request)
    tile = _int(request, "tile", 0, 0, 1000)

    def read() -> tuple[bytes, list[str]]:
        with compute.caught_warnings() as said:
            jpg = source.thumbnail(index, tile)
        return jpg, said

    jpg, said = await asyncio.to_thread(read)
    return Response(jpg, media_type="image/jpeg", headers=_with_warnings({"Cache-Control": "max-age=3600"}, said))


async def run_map(request: Request) -> Response:
    """A row's map as stored by the run (float16 in the store, sent as float32), with the warnings
    raised while it was read and, when its picture is one flat colour, what the run's ``.constant``
    column says of it (:meth:`RunSource.stored_map_note`: :func:`viz.constant_map_note`, or that float16
    storage lost a map that is not constant) (:data:`WARNINGS_HEADER`)."""
    source, index = _hub(request).run_row(request)
    method = request.path_params["method"]
    if method not in source.run.methods:
        raise HTTPException(404, f"the run has no method {method!r}; its methods are {', '.join(source.run.methods)}")
    k = _int(request, "k", 0, 0, 10**6)

    def read() -> tuple[np.ndarray, list[str]]:
        with compute.caught_warnings() as said:
            m = source.stored_map(index, method, k)
        note = source.stored_map_note(index, method, k, m)
        return m, said + ([note] if note is not None and note not in said else [])

    m, said = await asyncio.to_thread(read)
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(m, dtype=np.float32))
    return Response(buf.getvalue(), media_type="application/octet-stream", headers=_with_warnings(
        {"Content-Disposition": _attachment(f"{method}-row{index}-k{k}.npy")}, said))


def _attachment(name: str) -> str:
    """A ``Content-Disposition`` saving the answer as ``name`` (RFC 6266): ``filename*`` the name in
    UTF-8, ``filename`` an ASCII stand-in (``_`` for other characters, quotes and backslashes). A run's
    method is named by its user: ``"`` cut the quoted name short, and a character outside Latin-1 made
    the answer a 500 (a header is Latin-1)."""
    plain = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in name)
    return f"attachment; filename=\"{plain}\"; filename*=UTF-8''{urllib.parse.quote(name, safe='')}"


# --------------------------------------------------------------------------------- errors


def _refusal(exc: Exception) -> HTTPException:
    """The answer to an error the server expects: an ``HTTPException`` as it is; an image gone
    from disk or storage 404; storage that does not answer 502; any other ``SalienceError`` (bad
    input) 400. A run's thumbnail or stored map that is not in the run folder
    (:class:`~salience.explore.runs.NotStored`) is 404 too; a row of a run whose table repeats
    its index (:class:`~salience.runs.store.BadIndex`) 409. The same from
    an endpoint and from a job in the worker's thread."""
    if isinstance(exc, HTTPException):
        return exc
    if isinstance(exc, BadIndex):
        return HTTPException(409, str(exc))
    if isinstance(exc, (ImageGone, NotStored, remote.NoSuchObject)):
        return HTTPException(404, str(exc))
    if isinstance(exc, remote.StorageError):
        return HTTPException(502, str(exc))
    return HTTPException(400, str(exc))


async def _salience_error(request: Request, exc: Exception) -> Response:
    return await _http_error(request, _refusal(exc))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"error": _routing_detail(request, exc)}, exc.status_code, headers=getattr(exc, "headers", None))


def _routing_detail(request: Request, exc: HTTPException) -> str:
    """The error's text; for the router's own 404 and 405 (``Not Found``, ``Method Not Allowed``:
    a URL that is no endpoint, an encoded ``/`` in an id (``..%2f``), a GET of a POST endpoint) what
    the API's endpoints are, or which methods the URL takes."""
    path = request.url.path
    if exc.status_code == 404 and exc.detail == "Not Found" and path.startswith("/static/"):
        return f"no file {path!r} among the page's own files (salience/explore/static)"
    if exc.status_code == 404 and exc.detail == "Not Found":
        return (f"no endpoint {path!r}; the API is GET api/info, api/status, api/images, api/runs ... (see "
                "docs/explore.md, 'The API'), and an id in a URL holds no '/'")
    if exc.status_code == 405 and exc.detail == "Method Not Allowed":
        allowed = sorted({m for r in request.app.routes if isinstance(r, Route)  # every route of the URL
                          and r.matches(request.scope)[0] == Match.PARTIAL for m in (r.methods or ())} - {"HEAD"})
        return f"{request.method} is not allowed on {path!r}; it takes {' or '.join(allowed) or 'another method'}"
    return str(exc.detail)


async def _internal_error(request: Request, exc: Exception) -> Response:
    first = (str(exc).strip().splitlines() or [""])[0]
    return JSONResponse({"error": f"unexpected {type(exc).__name__}: {first}"}, 500)


class _StaticRevalidated(StaticFiles):
    """The page's scripts and styles, revalidated on every load (``Cache-Control: no-cache``; an
    unchanged file answers 304 by its ETag): a browser's heuristic cache kept the old ``app.js``
    after salience was upgraded, and an old script against a new API fails in odd ways."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def create_app(hub: Hub) -> Starlette:
    """The Starlette app serving ``hub``."""
    api = [
        Route("/api/info", info), Route("/api/status", status), Route("/api/runs", runs),
        Route("/api/colormaps/{name}", colormap),
        Route("/api/images", list_images, methods=["GET"]), Route("/api/images", upload, methods=["POST"]),
        Route("/api/images/{id}/picture.png", picture),
        Route("/api/models/{slot}/top", top), Route("/api/models/{slot}/layers", layers),
        Route("/api/explain", explain, methods=["POST"]),
        Route("/api/jobs/{id}", job_status, methods=["GET"]), Route("/api/jobs/{id}", job_cancel, methods=["DELETE"]),
        Route("/api/maps/{key}.npy", map_npy), Route("/api/maps/{key}/{what:str}.npy", map_npy),
        Route("/api/maps/{key}.png", map_png), Route("/api/maps/{key}/{what}", on_map, methods=["POST"]),
        Route("/api/figure.png", figure),
        Route("/api/runs/{run}/rows", run_rows), Route("/api/runs/{run}/rows/{index}", run_row),
        Route("/api/runs/{run}/rows/{index}/thumb.jpg", run_thumb),
        Route("/api/runs/{run}/rows/{index}/maps/{method}.npy", run_map),
    ]
    app = Starlette(routes=[Route("/", index), *api, Mount("/static", _StaticRevalidated(directory=STATIC), name="static")],
                    exception_handlers={SalienceError: _salience_error, HTTPException: _http_error,
                                        Exception: _internal_error})
    app.state.hub = hub
    return app
