"""neural-tangents' side of the side-by-side benchmark, run by the JAX environment's own Python.

It imports neither torch nor ntkbook (that environment has neither): ``ntkbook/_bench_peers.py`` writes the
model's weights and inputs to an ``.npz`` file (``ntkbook._bench_workloads.jax_spec``), starts this script,
and drives it over stdin/stdout so its calls alternate with the PyTorch ones in every repeat:

- ``python _nt_runner.py --gemm SIZE``: prints the GFLOP/s of one ``SIZE x SIZE x SIZE`` float32 product
  (median of 7 after a warm-up), jitted by XLA.
- ``python _nt_runner.py SPEC.npz OUT.npz``: rebuilds the model as a pure JAX function of a parameter
  dict keyed by PyTorch's names, jit-compiles ``nt.empirical_ntk_fn(..., implementation=
  STRUCTURED_DERIVATIVES)``, writes the kernel to ``OUT.npz`` and prints ``ready``
  with the compile time; then each ``time`` line read from stdin runs the kernel once and prints seconds.

Every model is the PyTorch one op for op (same layouts, ``NCHW`` images, post-norm encoder layer);
the parent compares the kernel with its float64 oracle.
"""

import json
import sys
import time

import jax
import jax.numpy as jnp
import neural_tangents as nt
import numpy as np


def _dense(h, weight):
    """``h @ weight.T`` for a PyTorch ``(out, in)`` weight, as one ``dot_general`` over ``h``'s last axis.

    Written without a ``transpose``: neural-tangents' structured derivatives have no rule that sees
    through one and fall back to per-input Jacobians (measured: 472 ms against 3.5 ms for the width-256
    MLP, and 34 GB asked for at width 4096). ``stax.Dense`` stores ``(in, out)`` weights for the same reason.
    """
    return jax.lax.dot_general(h, weight, (((h.ndim - 1,), (1,)), ((), ())))


def _mlp(spec, params, x):
    names = sorted(params, key=lambda name: int(name.split(".")[0]))
    h = x
    for i, (name, scale) in enumerate(zip(names, spec["scales"])):
        h = scale * _dense(h, params[name])
        if i < len(names) - 1:
            h = jax.nn.relu(h)
    return h


def _cnn(spec, params, x):
    h = x
    for layer in ("0", "2"):
        h = jax.lax.conv_general_dilated(
            h, params[f"{layer}.weight"], (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
        )
        h = jax.nn.relu(h + params[f"{layer}.bias"][None, :, None, None])
    return _dense(h.reshape(h.shape[0], -1), params["5.weight"]) + params["5.bias"]  # nn.Flatten of NCHW


def _layer_norm(h, weight, bias, eps):
    mean = h.mean(-1, keepdims=True)
    var = ((h - mean) ** 2).mean(-1, keepdims=True)
    return (h - mean) / jnp.sqrt(var + eps) * weight + bias


def _transformer(spec, params, ids):
    p = {name.removeprefix("1."): value for name, value in params.items()}
    heads, eps = int(spec["heads"]), float(spec["eps"])
    h = p["0.weight"][ids]  # (n, s, d)
    n, s, d = h.shape
    q, k, v = jnp.split(_dense(h, p["self_attn.in_proj_weight"]) + p["self_attn.in_proj_bias"], 3, axis=-1)
    q, k, v = (t.reshape(n, s, heads, d // heads).transpose(0, 2, 1, 3) for t in (q, k, v))
    weights = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads), axis=-1)
    attended = (weights @ v).transpose(0, 2, 1, 3).reshape(n, s, d)
    attended = _dense(attended, p["self_attn.out_proj.weight"]) + p["self_attn.out_proj.bias"]
    h = _layer_norm(h + attended, p["norm1.weight"], p["norm1.bias"], eps)
    inner = jax.nn.relu(_dense(h, p["linear1.weight"]) + p["linear1.bias"])
    h = _layer_norm(h + _dense(inner, p["linear2.weight"]) + p["linear2.bias"], p["norm2.weight"], p["norm2.bias"], eps)
    return _dense(h.mean(axis=1), p["3.weight"]) + p["3.bias"]


MODELS = {"mlp": _mlp, "cnn": _cnn, "transformer": _transformer}


def gemm_gflops(size=2048, repeats=7):
    keys = jax.random.split(jax.random.PRNGKey(0))
    a, b = (jax.random.normal(key, (size, size), jnp.float32) for key in keys)
    product = jax.jit(jnp.matmul)
    product(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / float(np.median(times)) / 1e9


def serve(spec_path, out_path):
    spec = dict(np.load(spec_path))
    params = {name[len("param:") :]: jnp.asarray(value) for name, value in spec.items() if name.startswith("param:")}
    model = MODELS[str(spec["family"])]
    x = jnp.asarray(spec["x"])

    def apply_fn(p, inputs):
        return model(spec, p, inputs)

    outputs = apply_fn(params, x)
    # nt's trace_axes averages over the traced outputs; ntkbook's "trace" sums them, so multiply by k.
    trace = str(spec["mode"]) == "trace" or outputs.shape[-1] == 1
    kernel_fn = jax.jit(
        nt.empirical_ntk_fn(
            apply_fn,
            trace_axes=(-1,) if trace else (),
            vmap_axes=0,
            implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES,
        )
    )
    start = time.perf_counter()
    kernel = kernel_fn(x, None, params).block_until_ready()
    compile_s = time.perf_counter() - start
    if trace:
        kernel = kernel * outputs.shape[-1]
    np.savez(out_path, kernel=np.asarray(kernel))
    print(json.dumps({"ready": True, "compile_s": compile_s, "jax": jax.__version__}), flush=True)
    for line in sys.stdin:
        if line.strip() != "time":
            break
        start = time.perf_counter()
        kernel_fn(x, None, params).block_until_ready()
        print(time.perf_counter() - start, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--gemm":
        print(json.dumps({"gflops": gemm_gflops(int(sys.argv[2])), "jax": jax.__version__}))
    else:
        serve(*sys.argv[1:3])
