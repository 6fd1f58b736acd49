"""Parameter gradients by the model's own autograd, and their Gram: what the loop method and the
verification use."""

from __future__ import annotations

import torch

from ntkbook.ntk.features import GRAM_CHUNK

# The Gram of gradient vectors streams through blocks of this many entries of each vector (1 MiB in
# float32): a block of every vector fits in cache, and no copy of a whole gradient is ever allocated.
GRAM_BLOCK = 64 * GRAM_CHUNK


def parameter_gradients(
    output: torch.Tensor, params: list[torch.Tensor], cotangent: torch.Tensor | None, retain_graph: bool
) -> list[torch.Tensor]:
    """:math:`\\nabla_\\theta \\langle c, f \\rangle` for the cotangent ``c`` (the shape of ``output``;
    ``None`` for a scalar output), one dense tensor per parameter: an unused parameter gives a zero
    tensor that allocates no memory, sparse gradients (``nn.Embedding(sparse=True)``) are made dense.

    A model with reentrant ``torch.utils.checkpoint`` cannot be differentiated by
    ``torch.autograd.grad``; it gets ``backward()`` instead, with every ``.grad`` restored after."""
    if not output.requires_grad:
        # An output that no trainable parameter reaches (a frozen branch) has a zero gradient.
        grads = [None] * len(params)
    else:
        grads = _autograd_gradients(output, params, cotangent, retain_graph)
    dense = []
    for g, p in zip(grads, params):
        if g is None:
            g = p.new_zeros(()).expand(p.shape)
        elif g.layout != torch.strided:
            g = g.to_dense()
        dense.append(g.detach())
    return dense


def flat_gradient(
    output: torch.Tensor, params: list[torch.Tensor], cotangent: torch.Tensor | None, retain_graph: bool
) -> torch.Tensor:
    """:func:`parameter_gradients` as one flat vector over ``params`` in order."""
    return torch.cat([g.reshape(-1) for g in parameter_gradients(output, params, cotangent, retain_graph)])


def float64_gram(vectors: list[list[torch.Tensor]]) -> torch.Tensor:
    """All inner products of ``c`` gradient vectors, each a list of tensors shaped like the parameters:
    ``(c, c)`` in float64 on the CPU. Partial sums over chunks of ``GRAM_CHUNK`` entries in the
    gradients' dtype (float32 at least, so that half-precision squares cannot overflow), added in
    float64, so the rounding is that of a kernel entry (``ntkbook.ntk.features``). Streamed through
    blocks of ``GRAM_BLOCK`` entries of each vector, so memory beyond the gradients stays about
    ``c * GRAM_BLOCK`` entries and each gradient is read once; consecutive small tensors of one dtype
    are joined first, so that a model of many small tensors costs a few operations per block, not per
    tensor."""
    c = len(vectors)
    total = torch.zeros(c, c, dtype=torch.float64, device=vectors[0][0].device)
    for piece in _pieces(vectors[0]):
        flats = [
            torch.cat([v[i].reshape(-1) for i in piece]) if len(piece) > 1 else v[piece[0]].reshape(-1) for v in vectors
        ]
        dtype = torch.promote_types(flats[0].dtype, torch.float32)
        buffer = torch.empty(c * min(GRAM_BLOCK, flats[0].numel()), dtype=dtype, device=flats[0].device)
        size = flats[0].numel()
        for start in range(0, size, GRAM_BLOCK):
            stop = min(start + GRAM_BLOCK, size)
            block = torch.stack([f[start:stop] for f in flats], out=buffer[: c * (stop - start)].view(c, -1))
            whole = (stop - start) // GRAM_CHUNK * GRAM_CHUNK
            if whole:
                chunks = block[:, :whole].reshape(c, -1, GRAM_CHUNK).transpose(0, 1)
                total += torch.bmm(chunks, chunks.transpose(1, 2)).double().sum(0)
            if whole < stop - start:
                tail = block[:, whole:]
                total += (tail @ tail.T).double()
    return total.cpu()


def _pieces(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` in pieces: a tensor of a block or more alone, consecutive smaller ones of
    one dtype together up to a block."""
    pieces: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i, t in enumerate(tensors):
        if t.numel() >= GRAM_BLOCK:
            pieces.append([i])
            continue
        if current and (filled + t.numel() > GRAM_BLOCK or tensors[current[0]].dtype != t.dtype):
            pieces.append(current)
            current, filled = [], 0
        current.append(i)
        filled += t.numel()
    return pieces + [current] if current else pieces


def _autograd_gradients(
    output: torch.Tensor, params: list[torch.Tensor], cotangent: torch.Tensor | None, retain_graph: bool
) -> list[torch.Tensor | None]:
    """``torch.autograd.grad``, or ``backward()`` for a model with reentrant checkpointing; a clear error
    for a ``torch.compile``'d model whose backward pass cannot run twice on one graph."""
    try:
        # The graph is kept through a failed attempt, so that backward() can still run after it.
        grads = torch.autograd.grad(output, params, cotangent, retain_graph=True, allow_unused=True)
    except RuntimeError as err:
        if "donated buffers" in str(err):
            raise ValueError(
                "the model has a torch.compile'd part whose backward pass can run only once per forward pass (it "
                "donates its saved buffers), while an NTK takes several backward passes of one forward pass: set "
                "torch._functorch.config.donated_buffer = False before the compiled part first runs, or pass the "
                "uncompiled module (compiled._orig_mod)"
            ) from None
        if "checkpoint" not in str(err):
            raise
        saved = [p.grad for p in params]
        try:
            for p in params:
                p.grad = None
            output.backward(cotangent, retain_graph=retain_graph)
            grads = [p.grad for p in params]
        finally:
            for p, g in zip(params, saved):
                p.grad = g
    return list(grads)
