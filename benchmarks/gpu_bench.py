"""The GPU benchmarks of gpu_check.sh in one driver that writes machine-readable figures.

Sections (each a subcommand, each small enough for a few tens of seconds on an H100/H200):
  attention  B=4, H=16, T=4096, D=64 and 128, causal and not, bf16, fwd and fwd+bwd: slmfast's
             cuda and triton kernels, torch's own path as the dispatch table would run it
             ("native": SDPA with its own backend choice), SDPA forced to flash and to cuDNN;
             packed documents (16 x 1024) against varlen_attn; a causal window of 1024
  layers     rms_norm, layer_norm (with the residual add), swiglu, geglu, rotary, bf16 and fp16
             (--dtypes): cuda, triton, native (F.rms_norm / F.layer_norm, else the plain-PyTorch
             backend) and the Hugging Face style eager code of benchmarks/bench_<op>.py, fwd and
             fwd+bwd, in GB/s against a device-to-device copy measured in the same run;
             --compiled adds torch.compile of the eager code (slow to compile: its own step)
  losses     cross_entropy, linear_cross_entropy, distill_loss: cuda, triton, native (the
             plain-PyTorch backend), the unfused computation and cut-cross-entropy when it is
             importable; fwd+bwd time and peak memory above the inputs
  train      a 125M-class step (benchmarks/bench_train.py's models): transformers Llama with
             SDPA, the same patched by slmfast, slmfast's CausalLM; bf16 autocast; tokens/s

Timing on CUDA: triton.testing.do_bench medians (CUDA events, L2 flushed between runs); on the
CPU (--device cpu, only to check that the code runs) the median wall time. Every measurement is
one record in the section's list of --out (a JSON file that other sections share, merged on
write): {"op", kind keys (dtype, head_dim, layout, causal), "shape", "impl", "pass", "ms", and
"tflops" | "gbps" | "peak_mib", or "error"}. "impl" is "cuda", "triton" or "native" for the
implementations the GPU dispatch table chooses between (benchmarks/gpu_dispatch.py), other names
for the baselines. A failing implementation is recorded with its error, the others go on.

    python benchmarks/gpu_bench.py attention --out results.json [--quick] [--device cuda]
    python benchmarks/gpu_bench.py summary --out results.json      (the short tables, printed)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import commit  # noqa: E402
from slmfast import backends  # noqa: E402

BF16 = torch.bfloat16


# ---- timing and records ----------------------------------------------------------------------

class Bench:
    """Times callables on one device and collects records for one section."""

    def __init__(self, device: str, section: str, quick: bool):
        self.device = torch.device(device)
        self.section = section
        self.quick = quick
        self.records: list[dict] = []

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def ms(self, fn) -> float:
        """Median milliseconds of fn()."""
        if self.device.type == "cuda":
            import triton.testing
            fn()  # compiles, autotunes, allocates: do_bench sizes its loops from the first calls' time
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            if time.perf_counter() - t0 > 0.02:  # a slow step (training): a few calls, timed by events
                return self._event_median(fn, reps=5)
            warmup, rep = (5, 20) if self.quick else (25, 100)
            return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
        fn()
        samples = []
        start = time.perf_counter()
        while len(samples) < 3 or (time.perf_counter() - start < 0.2 and len(samples) < 20):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples)

    @staticmethod
    def _event_median(fn, reps: int) -> float:
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    def record(self, impl: str, pass_: str, fn, *, work=None, unit: str = "", **fields) -> dict:
        """Times fn and appends a record. work: FLOPs (unit "tflops") or bytes (unit "gbps")."""
        row = dict(fields, impl=impl, **{"pass": pass_})
        try:
            ms = self.ms(fn)
            row["ms"] = round(ms, 4)
            if work and unit == "tflops":
                row["tflops"] = round(work / ms / 1e9, 1)
            elif work and unit == "gbps":
                row["gbps"] = round(work / ms / 1e6, 1)
        except Exception as exc:  # noqa: BLE001 - any failure of one implementation is a finding
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        self.records.append(row)
        shown = f"{row['ms']:.3f} ms" if "ms" in row else "ERROR " + row["error"]
        extra = (f" {row['tflops']} TF/s" if "tflops" in row
                 else f" {row['gbps']} GB/s" if "gbps" in row else "")
        label = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("section",))
        print(f"  {label} {impl:<14} {pass_:<8} {shown}{extra}", flush=True)
        return row

    def free(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"date": time.strftime("%Y-%m-%d"), "commit": commit(), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
           "build": backends.build_info(),
           "backends": {s.name: s.available for s in backends.all_status()}}
    if device.type == "cuda":
        env["card"] = torch.cuda.get_device_name(device)
        env["capability"] = list(torch.cuda.get_device_capability(device))
    else:
        env["card"] = f"{platform.machine()} CPU"
    return env


def merge_out(path: Path | None, section: str, records: list[dict], env: dict, extra: dict | None = None):
    """Merges this section into the JSON at `path` (read, update, atomic replace)."""
    if path is None:
        return
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault("env", env)
    data[section] = records
    if extra:
        data.setdefault("extra", {})[section] = extra
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _grad_fn(fn, leaves, grads):
    """fn(*leaves) then the gradients of its output(s) against `grads`, without touching .grad."""
    def run():
        out = fn(*leaves)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        torch.autograd.grad(outs, [t for t in leaves if t.requires_grad], grads)
    return run


def _no_grad_fn(fn, args):
    def run():
        with torch.no_grad():
            fn(*args)
    return run


# ---- attention ---------------------------------------------------------------------------------

def _sdpa_forced(backend_name: str, causal: bool, scale: float):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                  enable_gqa=q.shape[1] != k.shape[1])
    return run


def _slmfast_attention(backend: str, **options):
    from slmfast.functional import attention

    def run(q, k, v):
        return attention(q, k, v, backend=backend, **options)
    return run


def _native_attention(causal: bool, scale: float, *rest):
    from slmfast.ops.attention import attention_native

    def run(q, k, v):
        out = attention_native(q, k, v, causal, scale, *rest)
        if out is None:
            raise RuntimeError("torch's own attention cannot take this call here (varlen_attn missing, "
                               "or not on a GPU)")
        return out
    return run


def _attention_case(b: Bench, kind: dict, shape: str, flops: float, impls: dict, make_inputs) -> None:
    q, k, v = make_inputs()
    dout = torch.randn_like(q)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    for impl, fn in impls.items():
        b.record(impl, "fwd", _no_grad_fn(fn, (q, k, v)), work=flops, unit="tflops", op="attention",
                 shape=shape, **kind)
        b.record(impl, "fwd+bwd", _grad_fn(fn, leaves, (dout,)), work=3.5 * flops, unit="tflops",
                 op="attention", shape=shape, **kind)
    del q, k, v, dout, leaves
    b.free()


def bench_attention(b: Bench) -> dict:
    from slmfast.ops.attention import _VARLEN

    dev, dtype = b.device, BF16
    if b.quick or dev.type != "cuda":
        batch, heads, t, dims, docs, doc_len = 1, 2, 256, (64,), 2, 128
        dtype = torch.float32 if dev.type != "cuda" else BF16
    else:
        batch, heads, t, dims, docs, doc_len = 4, 16, 4096, (64, 128), 16, 1024
    dtype_name = str(dtype).replace("torch.", "")
    kernels = [name for name in ("cuda", "triton") if backends.status(name).available]
    extra = {"varlen_attn": _VARLEN is not None and sorted(_VARLEN[1]),
             "triton_autotune": os.environ.get("SLMFAST_TRITON_AUTOTUNE", "1")}

    def randn(*shape):
        return lambda: [torch.randn(*shape, device=dev, dtype=dtype) for _ in range(3)]

    for d in dims:
        scale = d ** -0.5
        for causal in (False, True):
            kind = dict(dtype=dtype_name, head_dim=d, layout="dense", causal=causal)
            flops = 4.0 * batch * heads * t * t * d * (0.5 if causal else 1.0)
            impls = {name: _slmfast_attention(name, causal=causal, scale=scale) for name in kernels}
            impls["native"] = _native_attention(causal, scale)
            if dev.type == "cuda":
                for forced in ("flash", "cudnn"):
                    impls[f"sdpa-{forced}"] = _sdpa_forced(forced, causal, scale)
            print(f"attention dense B={batch} H={heads} T={t} D={d} causal={causal}", flush=True)
            _attention_case(b, kind, f"{batch}x{heads}x{t}x{d}", flops, impls, randn(batch, heads, t, d))

        # packed documents (causal), as a pretraining batch packs them; varlen_attn is torch's own
        n = docs * doc_len
        cu = torch.arange(0, n + 1, doc_len, device=dev, dtype=torch.int32)
        kind = dict(dtype=dtype_name, head_dim=d, layout="packed", causal=True)
        flops = 4.0 * docs * heads * doc_len * doc_len * d * 0.5
        impls = {name: _slmfast_attention(name, causal=True, scale=scale, cu_seqlens=cu, max_seqlen=doc_len)
                 for name in kernels}
        impls["native"] = _native_attention(True, scale, -1, -1, cu, None, doc_len, doc_len)
        print(f"attention packed {docs} x {doc_len} H={heads} D={d}", flush=True)
        _attention_case(b, kind, f"{docs}docs x{doc_len} H{heads} D{d}", flops, impls, randn(n, heads, d))

    # a causal sliding window (Mistral-style) on the dense layout
    d, left = dims[-1], t // 4
    scale = d ** -0.5
    kind = dict(dtype=dtype_name, head_dim=d, layout="window", causal=True)
    flops = 4.0 * batch * heads * d * sum(min(i, left) + 1 for i in range(t))
    impls = {name: _slmfast_attention(name, causal=True, scale=scale, window=(left, -1)) for name in kernels}
    impls["native"] = _native_attention(True, scale, left, -1)
    print(f"attention window {left} B={batch} H={heads} T={t} D={d}", flush=True)
    _attention_case(b, kind, f"{batch}x{heads}x{t}x{d} window {left}", flops, impls,
                    randn(batch, heads, t, d))
    if dev.type == "cuda":
        extra["fa3"] = _try_fa3(b, batch, heads, t, dims[-1], dtype)
    return extra


def _try_fa3(b: Bench, batch, heads, t, d, dtype) -> str:
    """SDPA's flash backend with FA3 activated, where this torch can (it needs the FA3 package)."""
    try:
        from torch.nn.attention import activate_flash_attention_impl, restore_flash_attention_impl
    except ImportError:
        return "no activate_flash_attention_impl in this torch"
    try:
        activate_flash_attention_impl("FA3")
    except Exception as exc:  # noqa: BLE001
        return f"FA3 not available: {type(exc).__name__}: {str(exc)[:200]}"
    try:
        q, k, v = (torch.randn(batch, heads, t, d, device=b.device, dtype=dtype) for _ in range(3))
        for causal in (False, True):
            flops = 4.0 * batch * heads * t * t * d * (0.5 if causal else 1.0)
            b.record("sdpa-fa3", "fwd", _no_grad_fn(_sdpa_forced("flash", causal, d ** -0.5), (q, k, v)),
                     work=flops, unit="tflops", op="attention", shape=f"{batch}x{heads}x{t}x{d}",
                     dtype="bfloat16", head_dim=d, layout="dense", causal=causal)
        return "activated"
    finally:
        restore_flash_attention_impl()


# ---- layers ------------------------------------------------------------------------------------

def _layer_cases(dtype, dev, rows: int, width: int, inter: int, rot_shape: tuple, kernels: list[str],
                 compiled: bool) -> list[tuple]:
    """(op, shape label, inputs, {impl: fn}, bytes each pass must move, outputs with a gradient)."""
    from benchmarks import bench_glu, bench_layer_norm, bench_rms_norm, bench_rotary
    from slmfast.functional import layer_norm, rms_norm, rotary
    from slmfast.ops import glu as glu_op
    from slmfast.ops import layer_norm as layer_norm_op
    from slmfast.ops.layer_norm import layer_norm_native
    from slmfast.ops.rms_norm import rms_norm_native

    size = torch.finfo(dtype).bits // 8

    def by_backend(call, names):
        return {n: (lambda *a, n_=n: call(*a, backend=n_)) for n in names}

    def glu(activation):
        return lambda g, u, backend: glu_op.glu(g, u, activation, backend=backend,
                                                   op="swiglu" if activation == "silu" else "geglu")

    def with_compiled(impls, fn):
        return dict(impls, compiled=fn) if compiled else impls

    x_bytes, g_bytes = rows * width * size, rows * inter * size
    bsz, t, hq, hkv, hd = rot_shape
    qk_bytes = bsz * t * (hq + hkv) * hd * size
    rms = dict(by_backend(lambda x, w, r, backend: rms_norm(x, w, 1e-6, r, backend=backend), kernels),
               native=lambda x, w, r: rms_norm_native(x, w, 1e-6, r), eager=bench_rms_norm.eager_rms_norm)
    ln_kernels = [n for n in kernels if n in layer_norm_op.IMPLEMENTED]
    ln = dict(by_backend(lambda x, w, bi, r, backend: layer_norm(x, w, bi, 1e-5, r, backend=backend),
                         ln_kernels),
              native=lambda x, w, bi, r: layer_norm_native(x, w, bi, 1e-5, r),
              eager=bench_layer_norm.eager_layer_norm)
    silu = dict(by_backend(glu("silu"), kernels), native=lambda g, u: glu("silu")(g, u, "torch"),
                eager=bench_glu.eager_swiglu)
    gelu = dict(by_backend(glu("gelu_tanh"), kernels), native=lambda g, u: glu("gelu_tanh")(g, u, "torch"),
                eager=lambda g, u: F.gelu(g, approximate="tanh") * u)
    rot = dict(by_backend(lambda q, k, c, s, backend: rotary(q, k, c, s, backend=backend), kernels),
               native=lambda q, k, c, s: rotary(q, k, c, s, backend="torch"), eager=bench_rotary.eager_rotary)
    return [
        ("rms_norm", f"{rows}x{width} +residual", bench_rms_norm.make_inputs((rows, width), dtype, dev),
         with_compiled(rms, bench_rms_norm.compiled_rms_norm), {"fwd": 4 * x_bytes, "fwd+bwd": 8 * x_bytes},
         2),
        ("layer_norm", f"{rows}x{width} +residual", bench_layer_norm.make_inputs((rows, width), dtype, dev),
         with_compiled(ln, bench_layer_norm.compiled_layer_norm),
         {"fwd": 4 * x_bytes, "fwd+bwd": 8 * x_bytes}, 2),
        ("swiglu", f"{rows}x{inter}", bench_glu.make_inputs((rows, inter), dtype, dev),
         with_compiled(silu, bench_glu.compiled_swiglu), {"fwd": 3 * g_bytes, "fwd+bwd": 8 * g_bytes}, 1),
        ("geglu", f"{rows}x{inter} tanh", bench_glu.make_inputs((rows, inter), dtype, dev), gelu,
         {"fwd": 3 * g_bytes, "fwd+bwd": 8 * g_bytes}, 1),
        ("rotary", f"B{bsz} T{t} H{hq}/{hkv} D{hd}", bench_rotary.make_inputs(rot_shape, dtype, dev),
         with_compiled(rot, bench_rotary.compiled_rotary), {"fwd": 2 * qk_bytes, "fwd+bwd": 4 * qk_bytes}, 2),
    ]


def _layer_grad_fn(fn, args, leaves, grads):
    def run():
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs[:len(grads)], leaves, grads, allow_unused=True)
    return run


def _layer_case(b: Bench, op: str, dtype_name: str, shape: str, args: tuple, impls: dict, nbytes: dict,
                n_out: int, copy_gbps: float | None) -> None:
    print(f"{op} {dtype_name} {shape}", flush=True)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    with torch.no_grad():
        probe = impls["eager"](*args)
    outs = probe if isinstance(probe, tuple) else (probe,)
    grads = tuple(torch.randn_like(o) for o in outs[:n_out])
    del probe, outs
    for impl, fn in impls.items():
        if impl == "compiled":
            with contextlib.suppress(Exception):
                _layer_grad_fn(fn, args, leaves, grads)()  # compile outside the timing
        for pass_, run in (("fwd", _no_grad_fn(fn, args)),
                           ("fwd+bwd", _layer_grad_fn(fn, args, leaves, grads))):
            row = b.record(impl, pass_, run, work=nbytes[pass_], unit="gbps", op=op, dtype=dtype_name,
                           shape=shape)
            if "gbps" in row and copy_gbps:
                row["of_copy"] = round(row["gbps"] / copy_gbps, 3)


def bench_layers(b: Bench, compiled: bool, dtype_names: list[str]) -> dict:
    dev = b.device
    small = b.quick or dev.type != "cuda"
    rows, width, inter = (256, 512, 768) if small else (8192, 4096, 8192)
    rot_shape = (1, 128, 4, 2, 64) if small else (4, 4096, 32, 8, 128)
    dtypes = [torch.float32] if dev.type != "cuda" else [getattr(torch, name) for name in dtype_names]
    if compiled:
        dtypes = dtypes[:1]
    copy_bytes = 64 * 2**20 if small else 2 * 2**30
    buffers = torch.empty(2, copy_bytes // 4, device=dev)
    copy = b.record("copy", "copy", _copy_fn(buffers), work=2 * copy_bytes, unit="gbps", op="copy",
                    shape=f"{copy_bytes >> 20} MiB")
    del buffers
    kernels = [name for name in ("cuda", "triton") if backends.status(name).available]
    for dtype in dtypes:
        name = str(dtype).replace("torch.", "")
        for op, shape, inputs, impls, nbytes, n_out in _layer_cases(dtype, dev, rows, width, inter, rot_shape,
                                                                    kernels, compiled):
            if compiled:
                impls = {k: v for k, v in impls.items() if k in ("compiled", "eager")}
                if "compiled" not in impls:
                    continue
            _layer_case(b, op, name, shape, tuple(inputs), impls, nbytes, n_out, copy.get("gbps"))
            b.free()
    return {"copy_gbps": copy.get("gbps"), "compiled": compiled}


def _copy_fn(buffers):
    def run():
        buffers[1].copy_(buffers[0])
    return run


# ---- losses ------------------------------------------------------------------------------------

def _cce():
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError:
        return None
    return cce


def bench_losses(b: Bench) -> dict:
    from slmfast.functional import cross_entropy, distill_loss, linear_cross_entropy

    dev = b.device
    n, h, v = (512, 256, 4096) if b.quick or dev.type != "cuda" else (8192, 2048, 32768)
    dtype = BF16 if dev.type == "cuda" else torch.float32
    name = str(dtype).replace("torch.", "")
    shape = f"N{n} H{h} V{v}"
    kernels = [k for k in ("cuda", "triton") if backends.status(k).available]
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(dev, dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dev, dtype).requires_grad_()
    teacher_h = torch.randn(n, h, generator=g).to(dev, dtype)
    teacher_w = (torch.randn(v, h, generator=g) / h ** 0.5).to(dev, dtype)
    target = torch.randint(0, v, (n,), generator=g).to(dev)
    target[::17] = -100
    logits = (hidden.detach() @ weight.detach().t()).requires_grad_()
    flops_lce = 6.0 * n * h * v  # the three GEMMs of a training step

    def measure(op, impl, fn, leaves, work=None, unit=""):
        def step():
            torch.autograd.grad(fn(), leaves)
        peak = None
        if dev.type == "cuda":
            b.free()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                step()
                b.sync()
                peak = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
            except Exception:  # noqa: BLE001 - recorded by b.record below
                pass
        row = b.record(impl, "fwd+bwd", step, work=work, unit=unit, op=op, dtype=name, shape=shape)
        if peak is not None and "ms" in row:
            row["peak_mib"] = peak

    print(f"cross_entropy {name} {n}x{v}", flush=True)
    for impl in kernels + ["native"]:
        backend = "torch" if impl == "native" else impl
        measure("cross_entropy", impl, lambda be=backend: cross_entropy(logits, target, backend=be), [logits])
    measure("cross_entropy", "F.cross_entropy", lambda: F.cross_entropy(logits.float(), target), [logits])

    print(f"linear_cross_entropy {name} {shape}", flush=True)
    for impl in kernels + ["native"]:
        backend = "torch" if impl == "native" else impl
        measure("linear_cross_entropy", impl,
                lambda be=backend: linear_cross_entropy(hidden, weight, target, backend=be), [hidden, weight],
                flops_lce, "tflops")
    measure("linear_cross_entropy", "unfused",
            lambda: F.cross_entropy((hidden @ weight.t()).float(), target), [hidden, weight], flops_lce,
            "tflops")

    print(f"distill_loss {name} {shape} forward KL T=2", flush=True)
    for impl in [k for k in kernels if k == "triton"] + ["native"]:
        backend = "torch" if impl == "native" else impl
        measure("distill_loss", impl,
                lambda be=backend: distill_loss(hidden, weight, teacher_h, teacher_w, target, temperature=2.0,
                                                backend=be), [hidden, weight])

    def unfused_distill():
        s = (hidden @ weight.t()).float() / 2.0
        with torch.no_grad():
            t = (teacher_h @ teacher_w.t()).float() / 2.0
        mask = (target != -100).float()
        kl = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
        return 4.0 * (kl * mask).sum() / mask.sum()

    measure("distill_loss", "unfused", unfused_distill, [hidden, weight])

    cce = _cce()  # last: its Triton kernels compile at the first call
    if cce is not None:
        print(f"linear_cross_entropy {name} {shape}: cut-cross-entropy", flush=True)
        impl_name = "cce" if dev.type == "cuda" else "torch_compile"
        measure("linear_cross_entropy", "cut-cross-entropy",
                lambda: cce(hidden, weight, target, impl=impl_name), [hidden, weight], flops_lce, "tflops")
    return {"cut_cross_entropy": cce is not None}


# ---- a training step ---------------------------------------------------------------------------

def bench_train(b: Bench, batch: int, seq: int) -> dict:
    import copy

    from benchmarks.bench_train import SHAPE, hf_model, slmfast_model
    from slmfast.integrations import hf

    dev = b.device
    if b.quick or dev.type != "cuda":
        batch, seq = 1, 64
    dtype = BF16 if dev.type == "cuda" else torch.float32
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, seq), device=dev)
    data = dict(input_ids=ids, labels=ids)
    tokens = batch * seq

    def step_of(model):
        model = model.to(dev).train()

        def step():
            with torch.autocast(device_type=dev.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = model(**data).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        return model, step

    torch.manual_seed(0)
    base = hf_model("llama")
    models = {"HF (SDPA)": lambda: base, "HF patched by slmfast": lambda: hf.patch(copy.deepcopy(base)),
              "slmfast CausalLM": slmfast_model}
    for label, build in models.items():
        print(f"train {label} batch {batch} x seq {seq}", flush=True)
        try:
            model, step = step_of(build())
        except Exception as exc:  # noqa: BLE001
            b.records.append({"op": "train", "impl": label, "error": f"{type(exc).__name__}: {exc}"})
            continue
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        row = b.record(label, "step", step, op="train", shape=f"125M-class B{batch} T{seq}",
                       dtype="bf16-autocast")
        if "ms" in row:
            row["tokens_per_s"] = round(tokens / row["ms"] * 1e3)
            if dev.type == "cuda":
                row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        if label == "HF patched by slmfast":
            hf.unpatch(model)
        del model, step
        b.free()
    base_row = next((r for r in b.records if r.get("impl") == "HF (SDPA)" and "ms" in r), None)
    for row in b.records:
        if base_row and "ms" in row:
            row["speed_vs_hf"] = round(base_row["ms"] / row["ms"], 3)
    return {"gpu_table": os.environ.get("SLMFAST_GPU_TABLE", "slmfast/gpu_dispatch.json")}


# ---- the short summary gpu_check.sh prints last ------------------------------------------------

def _cell(rows: list[dict], impl: str, pass_: str, figure: str) -> str:
    row = next((r for r in rows if r.get("impl") == impl and r.get("pass") == pass_), None)
    if row is None:
        return "-"
    if "error" in row:
        return "ERR"
    value = f"{row['ms']:.3f}"
    if figure in row:
        value += f"/{row[figure]:g}"
    return value


def summary(path: Path) -> None:
    """Compact tables of the figures in `path` (ms, and TF/s or GB/s after the slash)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    env = data.get("env", {})
    if env:
        sm = "".join(map(str, env.get("capability") or []))
        print(f"{env.get('card')} sm_{sm}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
              f"triton {env.get('triton')}, commit {env.get('commit')}, {env.get('date')}")
    att = data.get("attention", [])
    if att:
        impls = [i for i in ("cuda", "triton", "native", "sdpa-flash", "sdpa-cudnn", "sdpa-fa3")
                 if any(r.get("impl") == i for r in att)]
        print("attention: ms/TF/s   fwd | fwd+bwd")
        print(f"  {'case':<34}" + "".join(f"{i:>24}" for i in impls))
        for shape in dict.fromkeys(r["shape"] + (" causal" if r.get("causal") else "") for r in att):
            rows = [r for r in att if r["shape"] + (" causal" if r.get("causal") else "") == shape]
            cells = [f"{_cell(rows, i, 'fwd', 'tflops')}|{_cell(rows, i, 'fwd+bwd', 'tflops')}"
                     for i in impls]
            print(f"  {shape:<34}" + "".join(f"{c:>24}" for c in cells))
    layers = data.get("layers", []) + data.get("layers_compiled", [])
    if layers:
        copy = next((r for r in layers if r.get("impl") == "copy" and "gbps" in r), None)
        print(f"layers: fwd+bwd ms/GB/s (copy {copy['gbps'] if copy else '?'} GB/s)")
        impls = [i for i in ("cuda", "triton", "native", "eager", "compiled")
                 if any(r.get("impl") == i for r in layers)]
        print(f"  {'op dtype':<22}" + "".join(f"{i:>16}" for i in impls))
        for key in dict.fromkeys((r["op"], r.get("dtype")) for r in layers if r.get("op") != "copy"):
            rows = [r for r in layers if (r["op"], r.get("dtype")) == key]
            print(f"  {' '.join(map(str, key)):<22}" + "".join(f"{_cell(rows, i, 'fwd+bwd', 'gbps'):>16}"
                                                           for i in impls))
    losses = data.get("losses", [])
    if losses:
        print("losses: fwd+bwd ms, peak MiB above the inputs")
        for op in dict.fromkeys(r["op"] for r in losses):
            cells = [f"{r['impl']} {r['ms']:.2f}" + (f" ({r['peak_mib']:.0f} MiB)" if "peak_mib" in r else "")
                     if "ms" in r else f"{r['impl']} ERR" for r in losses if r["op"] == op]
            print(f"  {op:<21} " + "; ".join(cells))
    train = data.get("train", [])
    if train:
        print("train (125M-class, bf16 autocast): " + "; ".join(
            f"{r['impl']} {r['tokens_per_s']} tok/s x{r.get('speed_vs_hf', '?')}" if "tokens_per_s" in r
            else f"{r['impl']} ERR" for r in train))
    probe = data.get("abort_probe")
    if probe:
        works = [f"{r['compiler']}:{r['variant']}" for r in probe["variants"] if r.get("raised")]
        fails = [f"{r['compiler']}:{r['variant']}={r.get('exit', 'no build')}" for r in probe["variants"]
                 if not r.get("raised")]
        print(f"abort probe: raise OK with {works or 'none'}; abort/fail with {fails or 'none'}; "
              f"recommended LDFLAGS {probe.get('recommended_ldflags') or '(none)'}")


# ---- command line ------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=("attention", "layers", "losses", "train", "summary"))
    parser.add_argument("--out", type=Path, help="JSON file to merge the records into")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a check that the code runs)")
    parser.add_argument("--compiled", action="store_true", help="layers: add the torch.compile baseline")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"],
                        choices=["bfloat16", "float16", "float32"], help="layers: dtypes on a GPU")
    parser.add_argument("--batch", type=int, default=8, help="train: batch size")
    parser.add_argument("--seq", type=int, default=1024, help="train: sequence length")
    args = parser.parse_args()
    if args.section == "summary":
        summary(args.out)
        return 0
    torch.manual_seed(0)
    bench = Bench(args.device, args.section, args.quick)
    env = environment(bench.device)
    print(f"{args.section}: {env['card']}, torch {env['torch']}, triton {env['triton']}, "
          f"commit {env['commit']}", flush=True)
    section = args.section + ("_compiled" if args.compiled else "")
    t0 = time.time()
    try:
        if args.section == "attention":
            extra = bench_attention(bench)
        elif args.section == "layers":
            extra = bench_layers(bench, args.compiled, args.dtypes)
        elif args.section == "losses":
            extra = bench_losses(bench)
        else:
            extra = bench_train(bench, args.batch, args.seq)
    except KeyboardInterrupt:  # gpu_check.sh's step limit (SIGINT): keep what was measured
        extra = {"interrupted": True}
        print(f"{args.section}: interrupted, keeping {len(bench.records)} figures", flush=True)
    extra["seconds"] = round(time.time() - t0, 1)
    merge_out(args.out, section, bench.records, env, extra)
    failed = [r for r in bench.records if "error" in r]
    print(f"{args.section}: {len(bench.records)} figures, {len(failed)} failed, {extra['seconds']} s",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
