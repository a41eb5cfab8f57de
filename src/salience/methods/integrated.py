"""Integrated Gradients (Sundararajan et al. 2017) and input x gradient.

Integrated Gradients attributes ``f(x) - f(x')`` to the input's features:
``IG_i = (x_i - x'_i) * integral_0^1 df/dx_i(x' + a (x - x')) da``, the integral taken by a
quadrature rule over ``steps`` points of the straight path from the baseline ``x'`` to ``x``.
The points of all images are run together in chunks by :mod:`salience._engine`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salience import reduce as _reduce
from salience._core import engine as _engine
from salience._core.autograd import check_input, gradients
from salience._core.errors import SalienceError
from salience._core.guard import model_guard
from salience.reduce import GradModifier, Reduction
from salience.targets import Predicted
from salience.methods._multi import finish, input_gradient_maps

__all__ = ["integrated_gradients", "input_x_gradient", "quadrature", "RULES", "IGResult"]

RULES = ("trapezoid", "gausslegendre", "left", "right", "middle")
_ALIASES = {"riemann_trapezoid": "trapezoid", "riemann_left": "left", "riemann_right": "right",
            "riemann_middle": "middle", "gauss_legendre": "gausslegendre", "gauss-legendre": "gausslegendre"}


def quadrature(rule: str, steps: int) -> tuple[list[float], list[float]]:
    """Nodes ``a_i`` in ``[0, 1]`` and weights ``w_i`` (summing to 1) of a rule with ``steps`` points.

    ``"trapezoid"``: ``a_i = i / (n - 1)``, weights ``1 / (n - 1)``, halved at both ends (exact for
    a linear integrand). Captum's ``riemann_trapezoid`` uses the same nodes with weights ``1 / n``
    (halved at the ends), which sum to ``(n - 1) / n``: its attributions are ``(n - 1) / n`` times
    these. ``"left"``, ``"right"``, ``"middle"``: Riemann sums with ``n`` intervals of width ``1/n``
    (Captum's). ``"gausslegendre"``: Gauss-Legendre nodes and weights mapped to ``[0, 1]``.
    """
    rule = _ALIASES.get(rule, rule)
    n = steps
    if rule == "trapezoid":
        if n < 2:
            raise SalienceError(f"the trapezoid rule needs steps >= 2 (both ends of the path), got {n}")
        nodes = [i / (n - 1) for i in range(n)]
        w = [1.0 / (n - 1)] * n
        w[0] /= 2
        w[-1] /= 2
        return nodes, w
    if rule == "gausslegendre":
        t, wt = np.polynomial.legendre.leggauss(n)
        return (0.5 * (t + 1)).tolist(), (0.5 * wt).tolist()
    if rule == "left":
        return [i / n for i in range(n)], [1.0 / n] * n
    if rule == "right":
        return [(i + 1) / n for i in range(n)], [1.0 / n] * n
    if rule == "middle":
        return [(i + 0.5) / n for i in range(n)], [1.0 / n] * n
    raise SalienceError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")


@dataclass
class IGResult:
    """Integrated Gradients with its completeness check (``return_gap=True``).

    ``attributions``: the map (reduced as asked); ``gap``: ``sum(attr) - (f(x) - f(x'))`` per image
    ``(B,)`` (``(B, K)`` for several targets), computed on the signed attributions before any
    reduction; ``delta``: ``f(x) - f(x')``. ``relative_gap`` = ``|gap| / |delta|``: if it is more
    than about 1%, use more steps. Unpacks as ``attr, gap = ...``.
    """

    attributions: Tensor
    gap: Tensor
    delta: Tensor

    @property
    def relative_gap(self) -> Tensor:
        return self.gap.abs() / self.delta.abs().clamp_min(1e-12)

    def __iter__(self):
        return iter((self.attributions, self.gap))


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of ``(B, C, H, W)`` per channel, reflect padding (kernel cut at 3 sigma)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    radius = min(radius, x.shape[-1] - 1, x.shape[-2] - 1) if min(x.shape[-2:]) > 1 else 0
    if radius < 1:
        return x.clone()
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return y


def _baseline(x: Tensor, baseline: Any, blur_sigma: Optional[float]) -> Tensor:
    if baseline is None:
        return torch.zeros_like(x)
    if isinstance(baseline, str):
        if baseline == "black" or baseline == "zeros":
            return torch.zeros_like(x)
        if baseline == "blur":
            sigma = blur_sigma if blur_sigma is not None else max(1.0, min(x.shape[-2:]) / 20)
            if not sigma > 0:
                raise SalienceError(f"blur_sigma must be > 0 pixels, got {blur_sigma!r}")
            return _blur(x.detach(), float(sigma))
        raise SalienceError(f"unknown baseline {baseline!r}; expected None/'black' (zeros), 'blur', a number or a tensor")
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if not isinstance(baseline, Tensor):
        raise SalienceError(f"baseline must be None, 'blur', a number or a tensor, got {type(baseline).__name__}")
    bl = baseline.detach().to(device=x.device, dtype=x.dtype)
    if bl.dim() == 3:
        bl = bl.unsqueeze(0)
    if bl.dim() != 4 or bl.shape[0] not in (1, x.shape[0]) or bl.shape[1:] != x.shape[1:]:
        raise SalienceError(
            f"baseline of shape {tuple(baseline.shape)} does not fit x of shape {tuple(x.shape)}; expected "
            f"{tuple(x.shape)}, (1, {', '.join(map(str, x.shape[1:]))}) or ({', '.join(map(str, x.shape[1:]))})"
        )
    if not bool(torch.isfinite(bl).all()):
        raise SalienceError("the baseline contains NaN or infinite values")
    return bl.expand_as(x)


def integrated_gradients(
    model: nn.Module,
    x: Tensor,
    target: Any = None,
    *,
    baseline: Union[None, str, float, Tensor] = None,
    steps: int = 32,
    rule: str = "trapezoid",
    reduce: Union[None, str, Reduction] = "grayscale",
    grad_modifier: Union[None, str, GradModifier] = None,
    return_gap: bool = False,
    blur_sigma: Optional[float] = None,
    strip_softmax: bool = True,
    chunk: Optional[int] = None,
    max_memory: Union[None, int, str] = None,
    progress: bool = False,
) -> Union[Tensor, IGResult]:
    """Integrated Gradients of the target's score along the straight path from a baseline to ``x``.

    ``x``: ``(B, C, H, W)``. ``baseline``: ``None`` (black: zeros), a number, a tensor
    ``(B, C, H, W)`` / ``(1, C, H, W)`` / ``(C, H, W)``, or ``"blur"`` (``x`` blurred with a Gaussian
    of ``blur_sigma`` pixels, default ``min(H, W) / 20``). ``steps`` points, ``rule``:
    ``"trapezoid"`` (default; its end points give ``f(x)`` and ``f(x')`` with no extra pass),
    ``"gausslegendre"``, ``"left"``, ``"right"``, ``"middle"`` (also Captum's names such as
    ``"riemann_trapezoid"``); see :func:`quadrature`.

    Returns the attributions reduced by ``reduce``: default ``"grayscale"`` (``sum_c |IG|``,
    ``(B, H, W)``); ``None`` gives the signed ``(B, C, H, W)`` attributions, whose sum is
    ``f(x) - f(x')``. With ``return_gap=True``, an :class:`IGResult` ``(attributions, gap)`` where
    ``gap = sum(IG) - (f(x) - f(x'))`` per image. ``target`` as in :func:`salience.vanilla`, resolved
    on ``x``; several per image (``(B, K)`` or a list) give ``(B, K, ...)``, one forward and K
    backward passes per chunk. ``chunk``, ``max_memory``, ``progress`` as in :func:`salience.smoothgrad`.
    """
    check_input(x, model)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SalienceError(f"steps must be an int >= 1 (points on the path), got {steps!r}")
    if not isinstance(rule, str):
        raise SalienceError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    nodes, weights = quadrature(rule, steps)
    budget = _engine.check_memory_options(chunk, max_memory)
    _reduce.get_grad_modifier(grad_modifier)
    _reduce.get_reduction(reduce)
    x0 = _baseline(x, baseline, blur_sigma)
    diff = x - x0
    targets, multi = _engine.split_targets(target, x.shape[0])
    b, k = x.shape[0], len(targets)

    # Put the end point a = 1 first (it picks the predicted class and gives f(x)), a = 0 second.
    order = sorted(range(len(nodes)), key=lambda i: (nodes[i] != 1.0, nodes[i] != 0.0, i))
    alphas = [nodes[i] for i in order]
    w = [weights[i] for i in order]
    state: dict[str, Any] = {"targets": targets}

    def point(rep: int, img: slice) -> Tensor:
        a = alphas[rep]
        if a == 1.0:
            return x[img]
        if a == 0.0:
            return x0[img]
        return x0[img] + a * diff[img]

    def compute(start: int, stop: int) -> Tensor:
        if start < b < stop and any(isinstance(t, Predicted) for t in state["targets"]):
            # The a = 1 items pick the classes for the others: run them first.
            return torch.cat([compute(start, b), compute(b, stop)])
        parts, j = [], start
        while j < stop:
            rep, img = divmod(j, b)
            n = min(stop - j, b - img)
            parts.append(point(rep, slice(img, img + n)))
            j += n
        xs = parts[0] if len(parts) == 1 else torch.cat(parts)
        owner = torch.arange(start, stop, device=x.device) % b
        reps = [j // b for j in range(start, stop)]
        tg = state["targets"]
        # Unresolved "predicted" targets only reach here for the a = 1 items (x itself).
        items = [t if isinstance(t, Predicted) else _engine.targets_for(t, owner) for t in tg]
        grads, scores, output = _engine.input_gradients(model, xs, items, strip_softmax=strip_softmax)
        if any(isinstance(t, Predicted) for t in tg):
            state["pred"][owner] = output.reshape(output.shape[0], -1).argmax(dim=1)
            if stop >= b:
                state["targets"] = [_engine.Classes(state["pred"]) if isinstance(t, Predicted) else t for t in tg]
        for a, store in ((1.0, "fx"), (0.0, "f0")):
            m = torch.tensor([alphas[r] == a for r in reps], device=x.device)
            if bool(m.any()):
                state[store][owner[m]] = scores.t()[m].to(torch.float64)
        return grads.transpose(0, 1)  # (n, K, C, H, W)

    with model_guard(model):
        need_pred = any(isinstance(t, Predicted) for t in targets)
        if alphas[0] == 1.0:
            state["pred"] = torch.empty(b, dtype=torch.long, device=x.device)
        elif need_pred or return_gap:
            # No a = 1 point: one forward pass of x (no backward) for the predicted class and f(x).
            out_x = gradients(model, x, _engine._Output(), input_grad=False, strip_softmax=strip_softmax).output
            state["targets"] = _engine.resolve_targets(model, x, targets, output=out_x)
            state["fx"] = _scores(out_x, state["targets"])
        state.setdefault("fx", torch.zeros(b, k, dtype=torch.float64, device=x.device))
        state["f0"] = torch.zeros(b, k, dtype=torch.float64, device=x.device)
        sums = _engine.accumulate(
            compute, len(alphas) * b, b, weights=w, chunk=chunk, max_memory=budget,
            progress=progress, desc="integrated gradients", device=x.device,
        )
        attr = sums.total * diff.unsqueeze(1).to(sums.total.dtype)  # (B, K, C, H, W), float64
        if return_gap:
            if 0.0 not in alphas:
                out_0 = gradients(model, x0, _engine._Output(), input_grad=False, strip_softmax=strip_softmax).output
                state["f0"] = _scores(out_0, state["targets"])
            delta = state["fx"] - state["f0"]
            gap = attr.flatten(2).sum(2) - delta
        attr = attr.to(x.dtype)
    out = finish(attr, grad_modifier, reduce, multi)
    if not return_gap:
        return out
    gap_t = gap.to(x.dtype)
    delta_t = delta.to(x.dtype)
    return IGResult(out, gap_t if multi else gap_t[:, 0], delta_t if multi else delta_t[:, 0])


def _scores(output: Tensor, targets: list) -> Tensor:
    """Target scores ``(B, K)`` (float64) from a model output."""
    cols = []
    for t in targets:
        s = t(output)
        cols.append(s.reshape(-1) if s.dim() else s.expand(output.shape[0]))
    return torch.stack(cols, dim=1).to(torch.float64)


def input_x_gradient(
    model: nn.Module,
    x: Tensor,
    target: Any = None,
    *,
    reduce: Union[None, str, Reduction] = "grayscale",
    grad_modifier: Union[None, str, GradModifier] = None,
    strip_softmax: bool = True,
) -> Tensor:
    """The input times its gradient, ``x * df/dx`` (Shrikumar et al. 2016), one pass.

    ``x``: ``(B, C, H, W)``. For a linear model it is exactly Integrated Gradients with a zero
    baseline. Default ``reduce="grayscale"`` (``sum_c |x * g|``, ``(B, H, W)``); ``None`` gives the
    signed ``(B, C, H, W)``. Several targets per image (``(B, K)`` or a list) give ``(B, K, ...)``
    from one forward pass.
    """
    return input_gradient_maps(model, x, target, grad_modifier=grad_modifier, reduce=reduce,
                               strip_softmax=strip_softmax, times_input=True)
