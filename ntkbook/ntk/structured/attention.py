"""The rule for ``nn.MultiheadAttention``: its four projections as dense layers on sequences.

Attention computes :math:`q = W_q x_q + b_q`, :math:`k = W_k x_k + b_k`, :math:`v = W_v x_v + b_v`
(the three blocks of the packed ``in_proj_weight``, or ``q/k/v_proj_weight`` when ``kdim``/``vdim``
differ), mixes them per input and head, :math:`o = \\mathrm{attn}(q, k, v)`, and projects,
:math:`z = W_o o + b_o` (``out_proj``, whose ``forward`` it never calls: this rule covers its
parameters). Every parameter sits in one of four dense layers applied at every position, so the
layer's share of the kernel is the sum of four sequence-dense shares (:mod:`.sequence`),

.. math::

    \\Theta^{(l)} = \\sum_{p \\in \\{q, k, v, o\\}} \\sum_{s,t} \\langle g^p_{is}, g^p_{jt} \\rangle
    \\big(\\langle a^p_{is}, a^p_{jt} \\rangle + [b_p\\ \\text{trainable}]\\big),

with inputs :math:`a^q = x_q`, :math:`a^k = x_k`, :math:`a^v = x_v`, :math:`a^o = o`, and output
gradients :math:`g^o = g` (recorded) and :math:`g^{q,k,v}`, obtained by one backward pass per output
through the attention core alone: it is recomputed from detached projections by torch's own
``multi_head_attention_forward`` with identity projections (exact: multiplying by one and adding
zeros rounds nothing) under the call's own masks. Cost: the attention core's forward and ``k``
backward passes, :math:`O(n k (L S E + (L + S) E^2))`, then the four pairs (see :mod:`.sequence`);
memory: the projections and their gradients, :math:`O(n k (L + S) E)`, plus each pair's.

The rule differentiates ``attn_output`` only: a model that also uses the returned attention weights
(``need_weights=True``) is refused by name (``record.check_graph``). A non-batch-first layer is
recorded batch-first (its inputs and output transposed as views, so gradients still reach the
output); the layers around it in ``nn.TransformerEncoderLayer(batch_first=False)`` act on
``(L, n, E)``, not on rows, and are refused by the recording's row check.

Added key/value biases (``add_bias_kv``), active dropout, and hooks are left to an honest fallback:
per-input gradients of all of the layer's parameters, by one ``vmap`` over (input, output) pairs of
the layer called on one input, as the default rule does for other layers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp

from ntkbook.ntk.features import Feature, PerInputGradients
from ntkbook.ntk.structured.dense import plain_forward
from ntkbook.ntk.structured.rules import per_input_gradients, refuse_global_pre_hooks, register
from ntkbook.ntk.structured.sequence import sequence_factors

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


@dataclass
class SumOfFeatures(Feature):
    """Shares of one layer's kernel that add up: parts paired part by part."""

    parts: list[Feature]

    @property
    def n(self) -> int:
        return self.parts[0].n

    @property
    def k(self) -> int:
        return self.parts[0].k

    def rows(self, start: int, stop: int) -> SumOfFeatures:
        return SumOfFeatures([part.rows(start, stop) for part in self.parts])

    def as_gradients(self) -> PerInputGradients:
        return PerInputGradients(torch.cat([part.as_gradients().J for part in self.parts], dim=2))

    def pair(self, other: Feature, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not isinstance(other, SumOfFeatures) or len(other.parts) != len(self.parts):
            return super().pair(other, mode)
        total = None
        for mine, theirs in zip(self.parts, other.parts):
            share, factor = mine.pair(theirs, mode)
            share = share if factor is None else share * factor
            total = share if total is None else total.add_(share)
        return total, None


def record_attention(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: object) -> tuple:
    """``(query, key, value)`` batch-first, the other arguments by name, ``attn_output`` batch-first, how
    to give the network its output back (the attention weights untouched), and the weights, which the
    model must not use (``record.check_graph``)."""
    named = _SIGNATURE.bind(module, *args, **kwargs).arguments
    tensors = tuple(named.pop(key) for key in ("query", "key", "value"))
    named.pop("self")
    z, weights = output
    others = () if weights is None else (weights,)
    if module.batch_first or z.ndim != 3:
        return tensors, named, z, lambda t: (t, weights), others
    return (
        tuple(t.transpose(0, 1) for t in tensors),
        named,
        z.transpose(0, 1),
        lambda t: (t.transpose(0, 1), weights),
        others,
    )


def _structured_applies(module: nn.MultiheadAttention, args: tuple) -> bool:
    return (
        plain_forward(module, ())
        and plain_forward(module.out_proj)
        and module.bias_k is None
        and module.bias_v is None
        and not (module.training and module.dropout > 0)
        and all(t.ndim == 3 and t.is_floating_point() for t in args)
    )


def _call_options(kwargs: dict) -> dict:
    """The call's masks and flags, for ``F.multi_head_attention_forward``."""
    options = {key: kwargs.get(key, parameter.default) for key, parameter in _SIGNATURE.parameters.items()}
    names = ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
    return {key: options[key].detach() if isinstance(options[key], torch.Tensor) else options[key] for key in names}


def _in_projections(module: nn.MultiheadAttention) -> tuple[list, list, list[bool], bool]:
    """The weights and biases of q, k, v (detached), which weights are trainable, and whether the bias is."""
    if module._qkv_same_embed_dim:
        weights = list(module.in_proj_weight.detach().chunk(3))
        trainable = [module.in_proj_weight.requires_grad] * 3
    else:
        own = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        weights, trainable = [w.detach() for w in own], [w.requires_grad for w in own]
    bias = module.in_proj_bias
    biases = [None] * 3 if bias is None else list(bias.detach().chunk(3))
    return weights, biases, trainable, bias is not None and bias.requires_grad


def projection_factors(module: nn.MultiheadAttention, args: tuple, g: torch.Tensor, kwargs: dict) -> SumOfFeatures:
    """The four dense shares, from batch-first ``args`` and the gradients ``g`` (n, k, L, E) of the outputs
    with respect to ``attn_output``."""
    k = g.shape[1]
    embed = module.embed_dim
    weights, biases, trainable, bias_trainable = _in_projections(module)
    eye = torch.eye(embed, dtype=g.dtype, device=g.device)
    with torch.enable_grad():
        projected = [F.linear(a, w, b).requires_grad_() for a, w, b in zip(args, weights, biases)]
        mixed, _ = F.multi_head_attention_forward(
            *(t.transpose(0, 1) for t in projected),
            embed,
            module.num_heads,
            None,
            None,
            None,
            None,
            module.add_zero_attn,
            0.0,
            eye,
            None,
            training=False,
            use_separate_proj_weight=True,
            q_proj_weight=eye,
            k_proj_weight=eye,
            v_proj_weight=eye,
            **_call_options(kwargs),
        )
        mixed = mixed.transpose(0, 1)  # o, (n, L, E)
        g_mixed = g @ module.out_proj.weight.detach()
        # One backward pass per output: batching them with vmap hits attention kernels without batching rules.
        per_output = [torch.autograd.grad(mixed, projected, g_mixed[:, c], retain_graph=c < k - 1) for c in range(k)]
    parts: list[Feature] = []
    sb2 = 1.0 if bias_trainable else 0.0
    for p, (a, is_trainable) in enumerate(zip(args, trainable)):
        if is_trainable or sb2:
            g_p = torch.stack([grads[p] for grads in per_output], dim=1)
            parts.append(sequence_factors(a if is_trainable else None, g_p, 1.0, sb2))
    out_w, out_b = module.out_proj.weight, module.out_proj.bias
    out_sb2 = 1.0 if out_b is not None and out_b.requires_grad else 0.0
    if out_w.requires_grad or out_sb2:
        parts.append(sequence_factors(mixed.detach() if out_w.requires_grad else None, g, 1.0, out_sb2))
    return SumOfFeatures(parts)


def per_input_fallback(
    module: nn.MultiheadAttention, name: str, args: tuple, g: torch.Tensor, kwargs: dict
) -> PerInputGradients:
    """Per-input gradients ``(n, k, p)`` of all the layer's trainable parameters (``out_proj``'s too),
    the layer called on one input at a time under ``vmap``; a per-input key padding mask or a
    ``(n * heads, L, S)`` attention mask is sliced along with the inputs."""
    refuse_global_pre_hooks(module, name)
    params = {key: p.detach() for key, p in module.named_parameters() if p.requires_grad}
    n, k = g.shape[:2]
    options = _call_options(kwargs)
    masks = {"key_padding_mask": options.pop("key_padding_mask"), "attn_mask": options.pop("attn_mask")}
    if masks["attn_mask"] is not None and masks["attn_mask"].ndim == 3:
        masks["attn_mask"] = masks["attn_mask"].reshape(n, -1, *masks["attn_mask"].shape[1:])
    else:
        options["attn_mask"] = masks.pop("attn_mask")
    masks = {key: m for key, m in masks.items() if m is not None}
    batch_dim = 0 if module.batch_first else 1

    def pair(*row: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs = tuple(t.unsqueeze(batch_dim) for t in row[: len(args)])
        # One input's masks: a key padding mask (1, S), an attention mask (heads, L, S).
        given = {key: m.unsqueeze(0) if key == "key_padding_mask" else m for key, m in zip(masks, row[len(args) + 1 :])}
        call = lambda p: functional_call(module, p, inputs, {**options, **given})[0].squeeze(batch_dim)
        return vjp(call, params)[1](row[len(args)])[0]

    repeated = [t.repeat_interleave(k, 0) for t in args] + [g.reshape(n * k, *g.shape[2:])]
    repeated += [m.repeat_interleave(k, 0) for m in masks.values()]
    return per_input_gradients(module, name, params, pair, tuple(repeated), n, k)


@register(nn.MultiheadAttention, recorder=record_attention, whole=True)
def attention_rule(module: nn.MultiheadAttention, name: str, args: tuple, g: torch.Tensor, kwargs: dict) -> Feature:
    """:func:`projection_factors` where it applies, else :func:`per_input_fallback`."""
    if _structured_applies(module, args):
        return projection_factors(module, args, g, kwargs)
    return per_input_fallback(module, name, args, g, kwargs)
