"""Both sides of the probe identity of :mod:`ntkbook.ntk.verify`, and what a failed check says."""

from __future__ import annotations

import torch

# Where a model's gradient is not finite, so is its NTK.
NOT_FINITE = (
    "where the model's gradient is NaN or infinite the NTK is not defined (a square root or logarithm at 0, or "
    "torch.where(h > 0, h.sqrt(), h), whose unused branch still sends NaN * 0 back)"
)


def identity_terms(
    block: torch.Tensor,
    probes1: torch.Tensor,
    probes2: torch.Tensor,
    dots: torch.Tensor,
    norms1: torch.Tensor,
    norms2: torch.Tensor,
) -> tuple:
    """Both sides of the identity for every probe pair ``(a, b)`` and output identity ``c``, each
    ``(m1, m2, c)``: :math:`u_a^\\top \\hat\\Theta v_b`, :math:`\\langle J_1^\\top u_a, J_2^\\top v_b\\rangle`, the
    Cauchy–Schwarz scale, :math:`\\|u_a\\| \\|v_b\\|` and the kernel's rms. ``block`` is ``(r1, r2, k, k)`` in
    full mode, ``(r1, r2, k)`` diagonal (one identity per output), ``(r1, r2)`` trace (the outputs' identities
    summed, one probe per input); ``dots`` and the norms as :meth:`Verifier.sides` gives them."""
    if block.ndim == 4:
        lhs = torch.einsum("aio,ijop,bjp->ab", probes1, block, probes2)[..., None]
        rhs = dots
        grad_scale = (norms1.pow(2).sum(1).sqrt()[:, None] * norms2.pow(2).sum(1).sqrt()[None, :])[..., None]
        probe_scale = (probes1.norm(dim=(1, 2))[:, None] * probes2.norm(dim=(1, 2))[None, :])[..., None]
        return lhs, rhs, grad_scale, probe_scale, block.pow(2).mean().sqrt()
    if block.ndim == 3:
        lhs = torch.einsum("aio,ijo,bjo->abo", probes1, block, probes2)
        rhs = dots
        grad_scale = norms1[:, None] * norms2[None, :]
        probe_scale = probes1.norm(dim=1)[:, None] * probes2.norm(dim=1)[None, :]
        return lhs, rhs, grad_scale, probe_scale, block.pow(2).mean(dim=(0, 1)).sqrt()
    u, v = probes1[:, :, 0], probes2[:, :, 0]
    lhs = (u @ block @ v.T)[..., None]
    rhs = dots.sum(-1, keepdim=True)
    grad_scale = (norms1[:, None] * norms2[None, :]).sum(-1)[..., None]
    probe_scale = (u.norm(dim=1)[:, None] * v.norm(dim=1)[None, :])[..., None]
    return lhs, rhs, grad_scale, probe_scale, block.pow(2).mean().sqrt()


def failure_message(method: str, ratio: float, dtype: torch.dtype) -> str:
    """The message of a failed check: the discrepancy, and what it means where that is known."""
    message = (
        f"method={method!r} gave a kernel that disagrees with the model's own autograd: on the probe identity "
        f"u^T K v = <J1^T u, J2^T v> it is off by {ratio:.3g} times the rounding tolerance"
    )
    if method == "loop":
        # The loop differentiates the batch by the model's own autograd too: the two differ only in the batch.
        message += (
            ": the loop's gradients and the check's differ only in which other inputs share the batch, so the "
            "model's gradients mix inputs across the batch (a batch statistic detached in the forward pass, say) "
            "and the per-input NTK is not defined"
        )
    if dtype != torch.float64:
        message += (
            "; a float32 model whose gradients are ill-conditioned (large inputs into saturated units, say) has "
            "no kernel accurate to rounding in float32: compute it in float64 (model.double())"
        )
    return message
