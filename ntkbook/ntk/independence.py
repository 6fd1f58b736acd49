"""The batch checks of the verification: each input's output depends on that input alone, and the model
is deterministic. Without both, a per-input NTK is not defined.

On the probed rows of a batch: the outputs of the first, the last and one random input run alone must
equal their rows in the batch, the batch run in a random order its own outputs reordered, and a second
run of one input the first, each to :math:`2\\sqrt{\\epsilon}` of the output's scale over the batch
(:math:`\\epsilon` the unit roundoff). A float32 output computed with cancellation (a difference of two
large terms) can differ between two batches by more than that through rounding alone; a float32 failure
is therefore checked again on a float64 copy of the model, and only a failure there is reported.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ntkbook.ntk.request import apply


@dataclass
class BatchCheck:
    """What is compared for one batch ``x``: its probed ``rows``, the picks run alone (positions in
    ``rows``), the random ``order`` and whether one input is run ``again``."""

    name: str
    rows: torch.Tensor
    picks: list[int]
    order: torch.Tensor
    again: bool

    def failure(self, model: nn.Module, x: torch.Tensor, out: torch.Tensor | None, tol: float) -> str | None:
        """The first failed comparison's message, or ``None``; ``out`` is the batch's outputs on the
        probed rows, or ``None`` to compute them here."""
        name, rows, picks = self.name, self.rows, self.picks
        with torch.no_grad():
            if out is None:
                out = apply(model, name, x[rows.to(x.device)])
            scale = out.abs().pow(2).mean(0).sqrt()  # each output's size over the batch
            alone = {p: apply(model, name, x[int(rows[p]) : int(rows[p]) + 1])[0] for p in dict.fromkeys(picks)}
            reordered = apply(model, name, x[rows[self.order].to(x.device)]) if len(rows) > 1 else out
            repeat = apply(model, name, x[int(rows[picks[-1]]) : int(rows[picks[-1]]) + 1])[0] if self.again else None

        def gap(a: torch.Tensor, b: torch.Tensor) -> float:
            """The largest difference of two outputs, relative to each output's scale."""
            return float(((a - b).abs() / torch.maximum(scale, b.abs()).clamp_min(1e-30)).max())

        for p, single in alone.items():
            if gap(single, out[p]) > tol:
                return (
                    f"the model's output for input {int(rows[p])} of {name} run alone differs from its row in the "
                    f"batch by {gap(single, out[p]):.2g} of the output's scale: each input's output must depend on "
                    "that input alone (no mixing across the batch, such as out - out.mean(0), softmax over dim 0 "
                    "or a cumulative sum over inputs), or its NTK is not defined"
                )
        if gap(reordered, out[self.order]) > tol:
            return (
                f"the model's outputs on {name} change by {gap(reordered, out[self.order]):.2g} of their scale when "
                "the batch is reordered: an input's output depends on its position in the batch or on its neighbours "
                "(such as out[i] + out[i + 1], or a table indexed by batch position), so its NTK is not defined"
            )
        if repeat is not None and gap(repeat, alone[picks[-1]]) > tol:
            return (
                f"the model gives input {int(rows[picks[-1]])} of {name} outputs "
                f"{gap(repeat, alone[picks[-1]]):.2g} apart (of their scale) on two runs: it is random (dropout, "
                "RReLU or a noise layer in training mode), so its NTK changes from call to call; call model.eval() "
                "or make it deterministic"
            )
        return None


def check_batch(
    model: nn.Module, x: torch.Tensor, check: BatchCheck, out: torch.Tensor | None, roundoff: float
) -> None:
    """Raise ``ValueError`` if ``check`` fails in the model's dtype and, for a float32 model, again on a
    float64 copy (a model that cannot be copied or run in float64 gets the float32 verdict)."""
    found = check.failure(model, x, out, 2 * math.sqrt(roundoff))
    if found is None:
        return
    if any(p.is_floating_point() and p.dtype != torch.float64 for p in model.parameters()):
        try:
            model64 = copy.deepcopy(model).double()
            x64 = x.double() if x.is_floating_point() else x
            found64 = check.failure(model64, x64, None, 2 * math.sqrt(torch.finfo(torch.float64).eps / 2))
        except (RuntimeError, TypeError, ValueError, copy.Error):
            found64 = found
        if found64 is None:
            return
    raise ValueError(found)
