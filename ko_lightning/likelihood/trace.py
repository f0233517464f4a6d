"""The divergence of a velocity field, ``div v = tr(dv/dx)``, exactly or by Hutchinson's estimator.

The divergence is the trace of the Jacobian over *all* ``D = prod(x.shape[1:])`` dimensions (for images every
channel and pixel: ``div v = sum_{c,h,w} d v_{chw} / d x_{chw}``), computed

- exactly, with ``D`` backward passes (one per dimension; cost ``D`` x a backward per function evaluation), or
- by Hutchinson's estimator ``eps^T (dv/dx) eps`` with ``E[eps eps^T] = I`` (one backward per probe).

The velocity must treat the samples of a batch independently (no batch statistics: run networks in eval mode),
because the per-dimension derivatives are taken of the batch sum.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["EXACT_DIVERGENCE_MAX_DIM", "divergence"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]
DivergenceMethod = Literal["exact", "hutchinson", "auto"]
ProbeKind = Literal["rademacher", "gaussian"]

#: ``divergence="auto"`` uses the exact trace up to this many dimensions per sample, Hutchinson above.
#: At D = 32 the exact trace costs 32 backward passes per function evaluation, about the price of a modest
#: number of probes, and removes all estimator noise; above it the cost grows linearly while Hutchinson stays at one.
EXACT_DIVERGENCE_MAX_DIM = 32

DIVERGENCES = ("exact", "hutchinson", "auto")
PROBES = ("rademacher", "gaussian")


def check_data(x: Any, name: str) -> None:
    """Raise naming ``name`` unless ``x`` is a non-empty tensor of shape ``(B, ...)`` with a data dimension."""
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, ...), got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (B, ...) with at least one data dimension, got {tuple(x.shape)}")
    if x.shape[0] == 0 or x[0].numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")


def check_velocity_output(f: Any, x: Tensor) -> None:
    """Raise unless the velocity returned a tensor shaped like its input ``x``."""
    if not torch.is_tensor(f) or f.shape != x.shape:
        got = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
        raise ValueError(f"velocity(x, t) must return a tensor shaped like x {tuple(x.shape)}, got {got}")


def resolve_divergence(divergence: str, num_dims: int) -> str:
    """``"exact"`` or ``"hutchinson"``: ``"auto"`` is exact up to :data:`EXACT_DIVERGENCE_MAX_DIM` dimensions."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "auto":
        return "exact" if num_dims <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
    return divergence


def draw_probes(kind: str, num_probes: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """``num_probes`` probes per sample, shape ``(num_probes, *like.shape)``, with ``E[eps eps^T] = I``.

    Rademacher probes are ``±1`` (the lower-variance choice), Gaussian probes ``N(0, I)``.
    """
    shape = (num_probes, *like.shape)
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    device = generator.device if generator is not None else like.device
    if kind == "rademacher":
        eps = torch.randint(0, 2, shape, generator=generator, device=device).to(like.dtype).mul_(2).sub_(1)
    else:
        eps = torch.randn(shape, generator=generator, device=device, dtype=like.dtype)
    return eps.to(like.device)


def divergence_terms(f: Tensor, x: Tensor, estimator: str, probes: Tensor | None, create_graph: bool) -> Tensor:
    """Divergence of ``f(x)`` per sample and per probe, shape ``(B, K)`` (``K = 1`` for the exact trace).

    Exact: ``sum_i d f_i / d x_i``; Hutchinson: ``eps_k^T (df/dx) eps_k`` for each probe ``k``.
    ``f`` must have been computed from ``x`` with autograd recording, sample by sample.
    """
    batch = x.shape[0]
    if not f.requires_grad:
        raise RuntimeError(
            "the velocity output does not depend on x through autograd: the divergence needs gradients "
            "(does the velocity run under torch.no_grad() or detach its input?)"
        )
    if estimator == "exact":
        f_flat = f.reshape(batch, -1)
        num_dims = f_flat.shape[1]
        div = torch.zeros(batch, dtype=f.dtype, device=f.device)
        for i in range(num_dims):
            # d f_i / d x_i for every sample at once: the samples are independent, so the gradient of the batch
            # sum of f[:, i] holds each sample's own row. x and f are flattened the same way (row-major over
            # C, H, W), so column i of both is the same coordinate: the trace covers all D dims.
            (grad,) = torch.autograd.grad(
                f_flat[:, i].sum(),
                x,
                retain_graph=create_graph or i < num_dims - 1,
                create_graph=create_graph,
                allow_unused=True,
            )
            if grad is not None:
                div = div + grad.reshape(batch, -1)[:, i]
        return div.unsqueeze(1)
    assert probes is not None
    terms = []
    num_probes = probes.shape[0]
    for k in range(num_probes):
        eps = probes[k]
        # vector-Jacobian product eps^T J, then (eps^T J) eps = eps^T J eps.
        (vjp,) = torch.autograd.grad(
            f,
            x,
            grad_outputs=eps,
            retain_graph=create_graph or k < num_probes - 1,
            create_graph=create_graph,
            allow_unused=True,
        )
        if vjp is None:
            terms.append(torch.zeros(batch, dtype=f.dtype, device=f.device))
        else:
            terms.append((vjp * eps).reshape(batch, -1).sum(dim=1))
    return torch.stack(terms, dim=1)


def divergence(
    velocity: VelocityFn,
    x: Tensor,
    t: Tensor,
    estimator: Literal["exact", "hutchinson"] = "exact",
    probes: Tensor | None = None,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """Velocity and its divergence ``div v(x, t) = tr(dv/dx) = sum_j d v_j / d x_j`` over all dims of a sample.

    Args:
        velocity: ``velocity(x, t)`` with ``t`` of shape ``(B,)``, returning a tensor shaped like ``x``.
        x: points, shape ``(B, ...)`` (images ``(B, C, H, W)`` are traced over all ``C*H*W`` dims).
        t: times, shape ``(B,)``.
        estimator: ``"exact"`` (D backward passes) or ``"hutchinson"`` (``mean_k eps_k^T J eps_k``).
        probes: Hutchinson probes, shape ``(K, *x.shape)``; required for ``"hutchinson"``.
        create_graph: keep the graph so that the divergence can be differentiated.

    Returns:
        ``(v, div)``: the velocity (shape of ``x``) and the divergence, shape ``(B,)``.

    Example:
        >>> v, div = divergence(lambda x, t: 3 * x, torch.randn(2, 3, 4, 4), torch.zeros(2))
        >>> div.tolist()
        [144.0, 144.0]
    """
    check_data(x, "x")
    if estimator not in ("exact", "hutchinson"):
        raise ValueError(f"estimator must be 'exact' or 'hutchinson', got {estimator!r}")
    if estimator == "hutchinson":
        if probes is None or probes.shape[1:] != x.shape:
            raise ValueError(
                f"probes must have shape (K, *x.shape) = (K, {', '.join(map(str, x.shape))}) "
                f"for estimator='hutchinson', got {None if probes is None else tuple(probes.shape)}"
            )
    with torch.enable_grad():
        x_in = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        f = velocity(x_in, t)
        check_velocity_output(f, x_in)
        div = divergence_terms(f, x_in, estimator, probes, create_graph).mean(dim=1)
    if not create_graph:
        f, div = f.detach(), div.detach()
    return f, div
