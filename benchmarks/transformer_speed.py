"""Side-by-side timing of the issue-13 transformer workload: ``python benchmarks/transformer_speed.py``.

Embedding(100, 64) -> nn.TransformerEncoderLayer(64, 4 heads, batch_first, eval) -> mean over 16 tokens
-> Linear(64, 1), n = 64 token sequences, float32. Methods, run alternately in one process (one round
runs each once, in order), median of the rounds: ``empirical_ntk`` with method "auto", "structured"
(verified and ``verify=False``) and "jacobian", and ``torch.func.vmap(jacrev)`` done by hand followed by
one Gram. Every kernel is checked first against the same computation in float64 (relative error in
the max norm). Prints a Markdown table, the torch version, the thread count and the load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from ntkbook import empirical_ntk


class TokenTransformer(nn.Module):
    def __init__(self, vocab: int = 100, width: int = 64, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.encoder = nn.TransformerEncoderLayer(width, heads, batch_first=True, dropout=0.0)
        self.readout = nn.Linear(width, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.readout(self.encoder(self.embed(ids)).mean(1))


def by_hand(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``vmap(jacrev)`` over the inputs, then the Gram of the flattened per-input gradients."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def one(p: dict, row: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (row.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(one), (None, 0))(params, ids)
    flat = torch.cat([j.reshape(ids.shape[0], -1) for j in jac.values()], dim=1)
    return flat @ flat.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--n", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # torch's "no batching rule" performance warnings for attention
    torch.manual_seed(0)  # nn modules draw their initial weights from the global generator
    model = TokenTransformer().eval()
    ids = torch.randint(0, 100, (args.n, 16), generator=torch.Generator().manual_seed(1))
    methods = {
        "auto": lambda: empirical_ntk(model, ids),
        "structured": lambda: empirical_ntk(model, ids, method="structured"),
        "structured, verify=False": lambda: empirical_ntk(model, ids, method="structured", verify=False),
        "jacobian": lambda: empirical_ntk(model, ids, method="jacobian"),
        "jacobian, verify=False": lambda: empirical_ntk(model, ids, method="jacobian", verify=False),
        "vmap(jacrev) by hand": lambda: by_hand(model, ids),
    }
    reference = by_hand(model.double(), ids)
    model.float()
    errors = {}
    for name, run in methods.items():
        kernel = run().double()
        errors[name] = float((kernel - reference).abs().max() / reference.abs().max())
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, run in methods.items():
            start = time.perf_counter()
            run()
            times[name].append(1e3 * (time.perf_counter() - start))
    hand = statistics.median(times["vmap(jacrev) by hand"])
    print(f"torch {torch.__version__}, {args.threads} thread(s), n = {args.n}, load average {os.getloadavg()}")
    print("| method | median ms | vmap(jacrev) / method | error vs float64 |")
    print("| --- | --- | --- | --- |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} | {hand / median:.2f} | {errors[name]:.1e} |")


if __name__ == "__main__":
    main()
