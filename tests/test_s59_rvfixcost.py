"""Review of branch wt-fixcost59 (issue 19, salience's own work per call): what its cuts changed besides the cost.

What failed on the branch before the review's fixes (4 of the 9 cases here, 3 of the 8 tests; all pass on main,
which had none of the cuts; the Ctrl-C, channels-last and uneven-chunks tests pass on both, kept as guards; the CUDA
one is skipped without a GPU):

- ``test_a_chunk_across_points_holds_only_its_items``: integrated gradients' path points of a chunk that starts or ends
  inside a point (items ``3..4`` of 4 images: the engine's first chunk is one item, so every later chunk's edges
  are) were made for the whole points, ``(last - first + 1) B`` items, and the chunk's input was a slice of them:
  its storage held up to ``2 B - 2`` items more than the engine's memory budget gave the chunk, alive through the
  pass (8 items for a chunk of 2).
- ``test_path_points_on_another_device_copy_no_host_tensor_per_chunk``: the points made at once copied the chunk's
  alphas from the host with ``torch.tensor(alphas, device=x.device)``: on a GPU a blocking copy, which waits for the
  device's queue (a host-device synchronization in every chunk, what tests/test_syncs.py rules out for the reads).
  Counted here on the ``meta`` device (no GPU on the machine that runs the suite); the CUDA test beside it, under
  ``torch.cuda.set_sync_debug_mode("error")``, runs where there is one.
- ``test_a_target_s_own_gradient_is_copied_without_modifier_or_reduction``: one target's map with neither a grad
  modifier nor a reduction was returned as ``maps[:, 0]``, a view of the method's gradients, where a target's
  ``modify_gradient`` result is: a tensor the user holds came back as the map (the branch copied a user's
  ``reduce`` result, not this).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import salience
from salience.methods.integrated import PathPoints
from salience.targets import Target


def _by_point(pp: PathPoints, start: int, stop: int) -> torch.Tensor:
    """Items ``start..stop-1`` made point by point and concatenated (what the points made at once must equal)."""
    b = pp.x.shape[0]
    parts = [pp.point(r, max(start, r * b) - r * b, min(stop, (r + 1) * b) - r * b)
             for r in range(start // b, (stop - 1) // b + 1)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_chunk_across_points_holds_only_its_items(dtype):
    g = torch.Generator().manual_seed(0)
    b = 4
    x = torch.randn(b, 3, 6, 6, generator=g, dtype=dtype) * 5
    base = torch.randn(b, 3, 6, 6, generator=g, dtype=dtype)
    pp = PathPoints(x, base, [i / 8 for i in range(1, 9)])
    n = 8 * b
    for start, stop in [(3, 5), (1, n), (3, 13), (5, 30), (4, 12), (0, n), (1, 2 * b + 1), (b - 1, 3 * b + 1)]:
        got = pp(start, stop)[0]
        want = _by_point(pp, start, stop)
        assert torch.equal(got.view(-1).view(torch.uint8), want.contiguous().view(-1).view(torch.uint8)), (start, stop)
        held = got.untyped_storage().nbytes() // got.element_size()
        assert held == got.numel() == (stop - start) * 3 * 6 * 6, (start, stop, held)


def test_channels_last_points_keep_their_layout_and_bits():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 5, 5, generator=g).to(memory_format=torch.channels_last)
    pp = PathPoints(x, torch.zeros_like(x), [0.0, 0.25, 0.5, 1.0])
    for start, stop in [(0, 12), (2, 10), (3, 9)]:
        got, want = pp(start, stop)[0], _by_point(pp, start, stop)
        assert torch.equal(got, want) and got.stride() == want.stride()
    assert torch.equal(pp(9, 12)[0], x)


def test_path_points_on_another_device_copy_no_host_tensor_per_chunk(monkeypatch):
    """No tensor of the host's data is put on the points' device per chunk (``torch.tensor(..., device=d)``, a
    blocking ``.to(d)``): on a GPU each was a synchronization. The ``meta`` device stands in for a GPU."""
    made: list[str] = []
    tensor, to = torch.tensor, torch.Tensor.to

    def tensor_on(*args, **kwargs):
        if kwargs.get("device") is not None and torch.device(kwargs["device"]).type != "cpu":
            made.append(f"torch.tensor(device={kwargs['device']})")
        return tensor(*args, **kwargs)

    def moved(self, *args, **kwargs):
        out = to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type != "cpu" and not kwargs.get("non_blocking", False):
            made.append(f".to({out.device}) from the host")
        return out

    x = torch.empty(2, 3, 4, 4, device="meta")
    pp = PathPoints(x, torch.zeros_like(x), [i / 4 for i in range(1, 5)])
    monkeypatch.setattr(torch, "tensor", tensor_on)
    monkeypatch.setattr(torch.Tensor, "to", moved)
    for start, stop in [(0, 8), (1, 8), (2, 6)]:
        got = pp(start, stop)[0]
        assert got.shape == (stop - start, 3, 4, 4)
    assert made == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_path_points_on_a_gpu_do_not_synchronize():
    x = torch.randn(2, 3, 8, 8, device="cuda")
    base = torch.zeros_like(x)
    pp = PathPoints(x, base, [i / 16 for i in range(1, 17)])
    pp(0, 32), pp(1, 31)  # warm: the pinned-memory allocator's first block
    torch.cuda.synchronize()
    old = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [pp(0, 32)[0], pp(1, 31)[0], pp(4, 20)[0]]
    finally:
        torch.cuda.set_sync_debug_mode(old)
    cpu = PathPoints(x.cpu(), base.cpu(), pp.alphas)
    for (start, stop), g in zip([(0, 32), (1, 31), (4, 20)], got):
        assert torch.equal(g.cpu(), _by_point(cpu, start, stop))


class _Held(Target):
    """Class 0's score; its gradient replaced by a tensor the caller holds (``modify_gradient``)."""

    def __init__(self, held: torch.Tensor) -> None:
        self.held = held

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[:, 0]

    def modify_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        return self.held


def test_a_target_s_own_gradient_is_copied_without_modifier_or_reduction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).eval()
    x = torch.rand(2, 3, 4, 4)
    held = torch.ones(2, 3, 4, 4)
    got = salience.vanilla(model, x, _Held(held), reduce=None)
    assert torch.equal(got, held) and got.untyped_storage().data_ptr() != held.untyped_storage().data_ptr()
    got.zero_()
    assert bool((held == 1).all())  # the user's tensor untouched by a write to the map
    # a modifier or reduction of salience's own makes a new tensor: returned as it is, the same values as before
    assert torch.equal(salience.vanilla(model, x, _Held(held), reduce="max_abs"), held.abs().amax(1))
    assert torch.equal(salience.vanilla(model, x, _Held(held), reduce=None, grad_modifier="negate"), -held)


def test_integrated_gradients_of_several_images_in_uneven_chunks_equal_one_chunk():
    """End to end: chunks whose edges fall inside points (chunk=8 and 11 on 3 images: whole points between a partial
    first and last one, made at once) give the one-chunk call's map to float rounding (the passes' batches differ)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).eval()
    x = torch.rand(3, 3, 6, 6)
    target = torch.tensor([0, 1, 2])
    whole = salience.integrated_gradients(model, x, target, steps=8, reduce=None)
    for chunk in (5, 8, 11):
        parts = salience.integrated_gradients(model, x, target, steps=8, reduce=None, chunk=chunk)
        assert torch.allclose(whole, parts, rtol=1e-5, atol=1e-7), chunk
    # an x that requires grad, or a call under inference mode: the same points, the same map (no graph through them)
    held = x.clone().requires_grad_(True)
    again = salience.integrated_gradients(model, held, target, steps=8, reduce=None, chunk=11)
    assert torch.equal(again, parts) and not again.requires_grad and held.grad is None
    with torch.inference_mode():
        inside = salience.integrated_gradients(model, x, target, steps=8, reduce=None, chunk=11)
    assert torch.equal(inside, parts)


class _Interrupted(nn.Module):
    """A forward that a Ctrl-C stops (KeyboardInterrupt), after writing the model's buffer in place."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bn.running_mean.data.add_(1.0)
        raise KeyboardInterrupt


@pytest.mark.parametrize("inference", [False, True])
def test_a_ctrl_c_in_the_pass_leaves_every_context_of_backward_exited(inference):
    """``backward``'s five contexts in one ``with``: a KeyboardInterrupt in the pass exits them all (the model as it
    was, no scope of deferred checks left, the grad and inference modes and ``torch.utils.checkpoint`` as before)."""
    import torch.utils.checkpoint as ckpt

    from salience._core import derived

    m = _Interrupted().train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    checkpoint = ckpt.checkpoint
    with torch.inference_mode(inference), torch.no_grad():
        with pytest.raises(KeyboardInterrupt):
            salience.vanilla(m, torch.rand(1, 3, 4, 4), 0)
        assert not torch.is_grad_enabled() and torch.is_inference_mode_enabled() == inference
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert derived.current() is None and ckpt.checkpoint is checkpoint
