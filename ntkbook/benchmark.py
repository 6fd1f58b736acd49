"""Time and memory of each :func:`~ntkbook.ntk.empirical_ntk` method against the forward + backward floor.

``python -m ntkbook.benchmark`` builds the MLP ``20 -> w -> w -> 1`` (NTK parameterisation, ReLU) for
each width ``w``, draws ``n`` Gaussian inputs and measures, for every method, the median wall time of
``empirical_ntk(model, x, method=...)`` over repeats after one warm-up call, and the peak memory it
needed beyond the model and inputs. Each case runs in its own subprocess, so the peak is that case's
own: ``ru_maxrss`` minus the resident size before the call on the CPU, ``torch.cuda.max_memory_allocated``
minus what was allocated before it on a GPU. The floor is one forward plus one backward pass of the same
batch with parameter gradients, ``model(x).sum().backward()``: any method that needs per-input
gradients pays at least for a pass like it. A case whose :func:`~ntkbook.ntk.memory_estimate` exceeds
the free memory is reported as not fitting rather than run.

``python -m ntkbook.benchmark --workloads all --peers all [--jax-python .venv-jax/bin/python]`` instead
prints ntkbook beside other NTK libraries on the issue's workloads, each kernel checked against a float64
oracle (``ntkbook._bench_peers``; the environments come from ``.ci/bench-setup``).

Introduced in chapter 6 (:doc:`/chapters/06_torch_func`).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from ntkbook._checks import positive_int
from ntkbook.models import mlp
from ntkbook.ntk import METHODS, empirical_ntk, memory_estimate
from ntkbook.ntk.budget import available_memory

INPUT_DIM = 20
FLOOR = "fwd+bwd"
# A method name with this suffix is timed with verify=False: the cost of the verification is the difference.
UNVERIFIED = "-unverified"


def build_case(
    width: int, n: int, device: torch.device, outputs: int = 1, input_dim: int = INPUT_DIM
) -> tuple[torch.nn.Module, torch.Tensor]:
    """The benchmark's model ``input_dim -> width -> width -> outputs`` and its ``(n, input_dim)`` inputs,
    seeded, float32."""
    n = positive_int("n", n)
    model = mlp(input_dim, width, 2, outputs, generator=torch.Generator().manual_seed(0)).to(device)
    x = torch.randn(n, input_dim, generator=torch.Generator().manual_seed(1)).to(device)
    return model, x


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def run_case(
    method: str, width: int, n: int, device: torch.device, repeats: int, outputs: int = 1, mode: str = "full"
) -> dict[str, object]:
    """Time one method (or the floor, ``"fwd+bwd"``; a method ending in ``"-unverified"`` with
    ``verify=False``) in this process; returns a row of the table."""
    repeats = positive_int("repeats", repeats)
    name, verify = (method.removesuffix(UNVERIFIED), False) if method.endswith(UNVERIFIED) else (method, True)
    if method != FLOOR and name not in METHODS:
        raise ValueError(
            f"method must be one of {METHODS}, optionally with {UNVERIFIED!r}, or {FLOOR!r}; got {method!r}"
        )
    model, x = build_case(width, n, device, outputs)

    def call() -> None:
        if method == FLOOR:
            for p in model.parameters():
                p.grad = None
            model(x).sum().backward()
        else:
            empirical_ntk(model, x, method=name, mode=mode, verify=verify)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = _resident_bytes()
    call()
    # Repeat until `repeats` calls or 30 s, whichever comes first, but at least 3 calls.
    times: list[float] = []
    while len(times) < 3 or (len(times) < repeats and sum(times) < 30):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    return {
        "method": method,
        "outputs": outputs,
        "mode": mode,
        "width": width,
        "n": n,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "peak_bytes": max(peak, 0),
    }


def _measure(
    method: str, width: int, n: int, device: str, repeats: int, threads: int | None, outputs: int, mode: str
) -> dict[str, object]:
    """Run :func:`run_case` in a fresh interpreter, so its peak memory is its own."""
    command = [
        sys.executable,
        "-m",
        "ntkbook.benchmark",
        "--case",
        method,
        "--widths",
        str(width),
        "--n",
        str(n),
        "--device",
        device,
        "--repeats",
        str(repeats),
        "--outputs",
        str(outputs),
        "--mode",
        mode,
    ]
    if threads is not None:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        return {
            "method": method,
            "width": width,
            "n": n,
            "device": device,
            "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}",
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def benchmark(
    widths: list[int],
    n: int,
    methods: list[str],
    device: str,
    repeats: int,
    threads: int | None = None,
    outputs: int = 1,
    mode: str = "full",
) -> list[dict[str, object]]:
    """One row per (method, width), plus the floor, with speed-ups over ``"jacobian"`` and ratios to the floor."""
    if not widths:
        raise ValueError("widths must name at least one hidden width")
    rows = []
    free = available_memory(torch.device(device))
    for width in widths:
        model, x = build_case(width, n, torch.device(device), outputs)
        group = [_measure(FLOOR, width, n, device, repeats, threads, outputs, mode)]
        for method in methods:
            needed = memory_estimate(model, x, method=method.removesuffix(UNVERIFIED), mode=mode)
            if needed > free:
                group.append(
                    {
                        "method": method,
                        "width": width,
                        "n": n,
                        "device": device,
                        "does_not_fit": f"needs about {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free",
                    }
                )
            else:
                group.append(_measure(method, width, n, device, repeats, threads, outputs, mode))
        floor = group[0].get("median_s")
        jacobian = next((r.get("median_s") for r in group if r["method"] == "jacobian"), None)
        for row in group:
            if "median_s" in row:
                row["x_floor"] = row["median_s"] / floor if floor else None
                row["speedup_vs_jacobian"] = jacobian / row["median_s"] if jacobian else None
        rows += group
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    """The rows as a Markdown table."""
    if not all(isinstance(r, dict) and {"width", "method"} <= r.keys() for r in rows):
        raise ValueError("rows must be the dicts that benchmark() returns, each with a 'width' and a 'method'")
    lines = [
        "| width | method | median ms | min-max ms | repeats | peak MiB | vs jacobian | x floor |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "median_s" not in r:
            reason = r.get("does_not_fit") or f"failed: {r.get('error')}"
            lines.append(f"| {r['width']} | {r['method']} | {reason} | | | | | |")
            continue
        ratio = r.get("speedup_vs_jacobian")
        speedup = "-" if ratio is None else f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2f}x"
        lines.append(
            f"| {r['width']} | {r['method']} | {r['median_s'] * 1e3:.1f} | "
            f"{r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f} | {r['repeats']} | {r['peak_bytes'] / 2**20:.0f} | "
            f"{speedup} | {r['x_floor']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point: ``python -m ntkbook.benchmark --help``."""
    parser = argparse.ArgumentParser(
        prog="python -m ntkbook.benchmark",
        description="Time and peak memory of each empirical_ntk method against one forward + backward pass.",
    )
    parser.add_argument("--widths", type=int, nargs="+", default=None, help="hidden widths w (default 256 1024 4096)")
    parser.add_argument("--n", type=int, default=None, help="number of inputs (default 256; 40,000 with --large)")
    named = [m for m in METHODS if m != "auto"]
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["jacobian", "implicit", "structured", "structured" + UNVERIFIED],
        choices=named + [m + UNVERIFIED for m in named],
        help="methods to time",
    )
    parser.add_argument("--outputs", type=int, default=1, help="outputs of the model (default 1)")
    parser.add_argument("--mode", default="full", choices=["full", "trace", "diagonal"], help="kernel mode")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per case after one warm-up")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads for every case (--threads 1: JAX too)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    parser.add_argument(
        "--large", action="store_true", help="the 40,000-input NTK of a width-1024 MLP to disk with blocked_kernel"
    )
    parser.add_argument("--block-size", type=int, default=None, help="inputs per block side with --large (4096)")
    parser.add_argument("--folder", default=None, help="where --large writes its file (a temporary folder)")
    parser.add_argument("--cnn", action="store_true", help="the CNN of issue 13 side by side (trace mode, n=64)")
    parser.add_argument("--implicit", action="store_true", help="with --cnn, also time method='implicit' (slow)")
    parser.add_argument(
        "--workloads", nargs="+", default=None, help="side-by-side table of these workloads ('all', or names)"
    )
    parser.add_argument("--peers", nargs="+", default=None, help="libraries beside ntkbook ('all', or names)")
    parser.add_argument("--jax-python", default=None, help="the Python of neural-tangents' own environment")
    parser.add_argument("--small", action="store_true", help="tiny versions of the workloads (a smoke test)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cnn:
        from ntkbook.benchmark_cnn import format_cnn, run_cnn

        rows = run_cnn(args.n or 64, args.repeats, args.implicit)
        print(json.dumps(rows, indent=1) if args.json else format_cnn(rows))
        return
    if args.large:
        # Imported here: ntkbook.benchmark_large builds its case with this module's build_case.
        from ntkbook.benchmark_large import LARGE_BLOCK, LARGE_N, LARGE_WIDTH, format_large, run_large

        width = args.widths[0] if args.widths else LARGE_WIDTH
        row = run_large(args.n or LARGE_N, width, args.block_size or LARGE_BLOCK, args.folder)
        print(json.dumps(row) if args.json else format_large(row))
        return
    if args.workloads or args.peers:
        # Imported here: the side-by-side table is its own module (ntkbook._bench_peers).
        from ntkbook._bench_peers import main_table

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        workloads, peers = args.workloads or ["all"], args.peers or ["all"]
        main_table(workloads, peers, args.repeats, args.jax_python, args.json, args.small, args.threads)
        return
    args.widths, args.n = args.widths or [256, 1024, 4096], args.n or 256
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda needs a visible GPU")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.case is not None:
        row = run_case(
            args.case, args.widths[0], args.n, torch.device(args.device), args.repeats, args.outputs, args.mode
        )
        print(json.dumps(row))
        return
    rows = benchmark(
        args.widths, args.n, args.methods, args.device, args.repeats, args.threads, args.outputs, args.mode
    )
    print(json.dumps(rows, indent=1) if args.json else format_table(rows))


if __name__ == "__main__":
    main()
