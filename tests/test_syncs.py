"""No host-device synchronization per chunk: a many-pass call checks what the user passed once.

Each ``bool(tensor)``, ``int(tensor)``, ``.item()``, ``.tolist()`` makes the host wait for the device; on a GPU,
whose passes are launch-bound, one per chunk made SmoothGrad and IG run 1.34x / 1.39x the time of a loop of
the same passes. Counted here on the CPU: the calls from salience's code do not grow with the number of chunks.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Iterator

import pytest
import torch

import salience
from salience import SalienceError
from salience.targets import multilabel

_SRC = os.path.dirname(salience.__file__) + os.sep
_READS = ("__bool__", "item", "tolist", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def counted() -> Iterator[list]:
    """The block's reads of tensor values (``_READS``) made from salience's code, as (name, function) pairs."""
    seen: list = []
    originals = {n: getattr(torch.Tensor, n) for n in _READS}

    def wrap(name, f):
        @functools.wraps(f)
        def read(self, *a, **k):
            fr = sys._getframe(1)
            while fr is not None and not fr.f_code.co_filename.startswith(_SRC):
                fr = fr.f_back
            if fr is not None:
                seen.append((name, fr.f_code.co_name))
            return f(self, *a, **k)
        return read

    for n, f in originals.items():
        setattr(torch.Tensor, n, wrap(n, f))
    try:
        yield seen
    finally:
        for n, f in originals.items():
            setattr(torch.Tensor, n, f)


CALLS = {
    "smoothgrad": lambda m, x, c: salience.smoothgrad(m, x, 1, samples=8, chunk=c),
    "smoothgrad per-image classes": lambda m, x, c: salience.smoothgrad(m, x, torch.tensor([1, 3]), samples=8,
                                                                        chunk=c),
    "smoothgrad predicted": lambda m, x, c: salience.smoothgrad(m, x, None, samples=8, chunk=c),
    "smoothgrad multilabel": lambda m, x, c: salience.smoothgrad(m, x, multilabel([0, 2]), samples=8, chunk=c),
    "integrated_gradients": lambda m, x, c: salience.integrated_gradients(m, x, torch.tensor([0, 2]), steps=8,
                                                                          chunk=c),
    "integrated_gradients predicted": lambda m, x, c: salience.integrated_gradients(m, x, None, steps=8, chunk=c),
    "smoothgrad of integrated_gradients": lambda m, x, c: salience.smoothgrad(
        m, x, 1, samples=8, chunk=c, method=salience.integrated_gradients, steps=2),
    "rise": lambda m, x, c: salience.rise(m, x, torch.tensor([0, 2]), masks=8, cell=2, chunk=c),
    "occlusion": lambda m, x, c: salience.occlusion(m, x, 1, window=4, stride=4, chunk=c),
    "scorecam": lambda m, x, c: salience.scorecam(m, x, 1, layer="features.3", chunk=c),
    # chunks of more items than images (c + 1 > 2) share the layers before: its one check per call in each
    "ablationcam": lambda m, x, c: salience.ablationcam(m, x, 1, layer="features.3", chunk=c + 1),
}


@pytest.mark.parametrize("name", list(CALLS))
def test_a_warm_call_reads_no_tensor_per_chunk(small_cnn, name):
    """The same call in 8 chunks and in 2 (16 items; Score-CAM's and Ablation-CAM's 16) reads the same tensor
    values: none per chunk (the finiteness of the chunk's inputs, the targets' range, the probability checks
    were read in every pass)."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8)
    call = CALLS[name]
    counts = {}
    for chunk in (2, 8):
        call(small_cnn, x, chunk)  # warm: the model's structure known, the caches filled
        with counted() as seen:
            call(small_cnn, x, chunk)
        counts[chunk] = seen
    assert len(counts[2]) == len(counts[8]), counts


def test_noisy_copies_that_overflow_are_refused(small_cnn):
    """``x`` finite, its noisy copies not (``x + noise`` overflows float32): still a SalienceError, from the one
    test of the copies at the end of the call (they are not tested one pass at a time)."""
    x = torch.full((1, 3, 8, 8), 3e38)
    x[..., 0, 0] = -3e38  # the range overflows: the noise's sigma is infinite
    with pytest.raises(SalienceError, match="noisy copies contain NaN or infinite values"):
        salience.smoothgrad(small_cnn, x, 0, samples=2, chunk=1)


def test_a_baseline_that_is_not_finite_is_refused(small_cnn):
    """Integrated Gradients' path points are not tested one by one: a NaN baseline number is refused where given."""
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(SalienceError, match="finite number"):
        salience.integrated_gradients(small_cnn, x, 0, baseline=float("nan"), steps=2)


def test_a_class_out_of_range_in_a_later_chunk_is_refused(small_cnn):
    """Per-image classes are checked once per call, all images' at once: the second image's class is
    refused although the first chunk holds only the first image."""
    x = torch.rand(2, 3, 8, 8)
    for method in (salience.smoothgrad, salience.integrated_gradients):
        with pytest.raises(SalienceError, match="target class 7 is out of range"):
            method(small_cnn, x, torch.tensor([1, 7]), chunk=1)


def test_a_softmax_by_a_flag_is_found_by_the_first_pass_of_a_call():
    """A final softmax that appears by a flag (no change of structure) after a call that showed none: the passes
    without gradients look at their output in the first pass of a many-pass call only, which finds it (here the
    first is inside SmoothGrad's chunks: occlusion's clean pass, as SmoothGrad's method)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(60, 6))
    x = torch.rand(2, 3, 5, 4)
    model = _Switchable(m)
    salience.vanilla(model, x, 1)  # no final softmax
    model.probabilities = True
    kw = dict(method=salience.occlusion, samples=3, noise=0.0, window=2, stride=2, chunk=1)
    assert torch.equal(salience.smoothgrad(model, x, 1, **kw), salience.smoothgrad(m, x, 1, **kw))


class _Switchable(torch.nn.Module):
    """Ends in a softmax or not by a plain attribute, which the model's structure does not see."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.probabilities = inner, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inner(x)
        return z.softmax(1) if self.probabilities else z


def test_a_warm_call_does_not_time_its_chunks(small_cnn, monkeypatch):
    """The run's clock waits for the device (``torch.cuda.synchronize``): a call whose run decided its chunks and
    layout (a warm call) reads it in no chunk (it read it twice a chunk, and dropped the time)."""
    from salience._core import perf as _perf

    x = torch.rand(2, 3, 8, 8)
    reads = []
    clock = _perf.Run.clock
    monkeypatch.setattr(_perf.Run, "clock", lambda self: reads.append(1) or clock(self))
    for chunk in (2, 8):
        salience.smoothgrad(small_cnn, x, 1, samples=8, chunk=chunk)
        reads.clear()
        salience.smoothgrad(small_cnn, x, 1, samples=8, chunk=chunk)
        assert not reads, (chunk, len(reads))
