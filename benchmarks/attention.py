"""Attention forward + backward: npformer's numba kernels vs the NumPy reference vs PyTorch.

    python benchmarks/attention.py [--quick] [--repeats N] [--json PATH] [--both-coretypes]

Causal attention in float32 at (B, H, T, D) = (4, 8, 256, 64), (2, 8, 1024, 64),
(1, 8, 2048, 64), (1, 8, 4096, 64), plus a sliding window of 256 and a document mask
(16 packed documents of 256 tokens) at T = 4096. Every contender runs with 2 threads:

- numba:       flash_attention_forward + flash_attention_backward (numba threads = 2);
- numba (ctx): the same, each call started right after a NumPy matmul, as inside a training
               step (OpenBLAS worker threads still spinning from that matmul);
- products:    only the kernels' tile products: as many 64 × 64 × 64 float32 np.dot calls
               as they make for this case (7 per tile that is not skipped: 2 forward, 5
               backward), on 2 numba threads with one BLAS thread each, with none of the
               softmax work — the time the kernels cannot go below with these products;
- numpy:       attention_forward + attention_backward, the reference (BLAS threads = 2);
- torch:       torch.nn.functional.scaled_dot_product_attention and autograd's backward
               (torch.set_num_threads(2)); is_causal=True, or a boolean attn_mask. torch is
               imported before numba starts its threads (see main).

Columns: median wall time of forward + backward over the repeats (run in rounds, one call
of each contender per round, each after a pause that lets the previous contender's threads
go idle), GFLOP/s of the useful work (7 matrix products — 2 forward, 5 backward with
recomputation — of 2·D flops per allowed (query, key) pair and head), the ratio to torch,
and the peak extra memory of one forward + backward, measured in a fresh child process: the
rise of its peak RSS (reset through /proc/self/clear_refs, after malloc_trim) minus the
bytes of the results (o, dq, dk, dv), in MiB and as a percentage of one B·H·T·T float32
matrix. No assertions: this prints figures; the tests check correctness.

The BLAS libraries loaded (threadpoolctl) are printed with the kernel OpenBLAS chose
(``architecture``). ``OPENBLAS_CORETYPE=Haswell`` — set on some machines — makes OpenBLAS use
its AVX2 kernels instead of AVX-512; --both-coretypes re-runs this script in two child
processes, with that variable removed and set, and reports both.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npformer.functional.attention import attention_backward, attention_forward  # noqa: E402
from npformer.functional.attention_mask import attention_mask  # noqa: E402
from npformer.kernels.flash_attention import (  # noqa: E402
    flash_attention_backward,
    flash_attention_forward,
)

THREADS = 2
FULL_CASES = [
    # (label, B, H, T, D, mask)
    ("causal", 4, 8, 256, 64, "causal"),
    ("causal", 2, 8, 1024, 64, "causal"),
    ("causal", 1, 8, 2048, 64, "causal"),
    ("causal", 1, 8, 4096, 64, "causal"),
    ("window-256", 1, 8, 4096, 64, "window"),
    ("documents-256", 1, 8, 4096, 64, "documents"),
]
QUICK_CASES = [
    ("causal", 2, 4, 256, 64, "causal"),
    ("causal", 1, 4, 1024, 64, "causal"),
    ("window-128", 1, 4, 1024, 64, "window"),
    ("documents-128", 1, 4, 1024, 64, "documents"),
]


# ---- memory ---------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_extra_bytes(call):
    """Run call() once; returns (its result, rise of the peak RSS in bytes) or (result, None)."""
    gc.collect()
    try:  # hand freed heap memory back to the system, or the call reuses it unseen
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _status_kib("VmRSS")
    except OSError:
        return call(), None
    result = call()
    return result, (_status_kib("VmHWM") - before) * 1024


# ---- the contenders ---------------------------------------------------------------------


def mask_options(mask: str, T: int, window: int):
    """Keyword options for npformer, and (is_causal, attn_mask) for torch: the (T, T)
    allowed-mask npformer's own attention_mask builds from the same options."""
    if mask == "causal":
        return dict(causal=True), (True, None)
    if mask == "window":
        options = dict(causal=True, window=window)
    else:
        options = dict(causal=True, doc_ids=(np.arange(T) // window)[None])  # documents of `window`
    return options, (False, attention_mask(1, T, T, **options)[0, 0])


def numba_step(q, k, v, do, options):
    o, cache = flash_attention_forward(q, k, v, **options)
    return (o,) + flash_attention_backward(do, cache)


def numpy_step(q, k, v, do, options):
    with threadpool_limits(THREADS, user_api="blas"):
        o, cache = attention_forward(q, k, v, **options)
        grads = attention_backward(do, cache)
    del cache
    return (o,) + grads


def make_torch_step(torch, q, k, v, do, is_causal, allowed):
    F = torch.nn.functional
    mask = None if allowed is None else torch.from_numpy(allowed)
    qt, kt, vt = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    dot = torch.from_numpy(do)

    def step():
        for x in (qt, kt, vt):
            x.grad = None
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=is_causal)
        o.backward(dot)
        return o.detach(), qt.grad, kt.grad, vt.grad

    return step


def context_matmul(B, T):
    """A NumPy matmul the size of a training step's MLP input (B·T, 512) @ (512, 2048)."""
    a = np.random.default_rng(0).standard_normal((B * T, 512)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((512, 2048)).astype(np.float32)
    return lambda: a @ b


def useful_flops(B, H, T, D, allowed_pairs):
    """7 products (2 forward, 5 backward) × 2·D flops per allowed (query, key) pair."""
    return 7 * 2 * D * allowed_pairs * B * H


def allowed_pairs(mask, T, window):
    if mask == "causal":
        return T * (T + 1) // 2
    if mask == "window":
        return int(np.minimum(np.arange(1, T + 1), window).sum())
    n_docs, rest = divmod(T, window)
    return n_docs * window * (window + 1) // 2 + rest * (rest + 1) // 2


def case_inputs(B, H, T, D, mask):
    window = 128 if T <= 1024 else 256
    options, torch_mask = mask_options(mask, T, window)
    rng = np.random.default_rng(0)
    q, k, v, do = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(4))
    return (q, k, v, do), options, torch_mask, window


TILE = 64  # the kernels' BLOCK_Q = BLOCK_K
PRODUCTS_PER_TILE = 7  # 2 forward (z, p v), 5 backward (z, dp, dv, dk, dq)


@numba.njit(parallel=True)
def _tile_products(a, b, out, repeats):
    """Each thread multiplies its own TILE × TILE tiles ``repeats`` times (np.dot → SciPy's
    BLAS, as in the kernels)."""
    for t in numba.prange(a.shape[0]):
        for _ in range(repeats):
            np.dot(a[t], b[t], out[t])


def tiles_computed(B, H, T, options):
    """(query block, key block) tiles with at least one allowed pair: the ones the kernels
    do not skip (exact for causal, window and contiguous documents)."""
    allowed = attention_mask(1, T, T, **options)[0, 0]  # (T, T) bool
    n = -(-T // TILE)
    padded = np.zeros((n * TILE, n * TILE), dtype=bool)
    padded[:T, :T] = allowed
    return B * H * int(padded.reshape(n, TILE, n, TILE).any(axis=(1, 3)).sum())


def make_products_step(B, H, T, options):
    tiles = tiles_computed(B, H, T, options)
    repeats = -(-tiles * PRODUCTS_PER_TILE // THREADS)  # products per thread
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((THREADS, TILE, TILE)).astype(np.float32) for _ in range(2))
    out = np.empty_like(a)

    def step():
        with threadpool_limits(1, user_api="blas"):
            _tile_products(a, b, out, repeats)
        return (out,)

    return step


def contender_steps(names, inputs, options, torch_mask, torch):
    q, k, v, do = inputs
    steps = {}
    for name in names:
        if name == "products":
            B, H, T, _ = q.shape
            steps[name] = make_products_step(B, H, T, options)
        elif name in ("numba", "numba (ctx)"):
            steps[name] = lambda: numba_step(q, k, v, do, options)
        elif name == "numpy":
            steps[name] = lambda: numpy_step(q, k, v, do, options)
        elif name == "torch":
            steps[name] = make_torch_step(torch, q, k, v, do, *torch_mask)
    return steps


def results_bytes(result):
    return sum(x.numel() * x.element_size() if hasattr(x, "numel") else np.asarray(x).nbytes
               for x in result)


def memory_probe(case_index, name, quick):
    """Child process: one forward + backward of one contender; prints its memory as JSON.

    A fresh process, because in a long-lived one the allocator serves a call from memory that
    earlier calls freed, and the peak RSS no longer rises. The warm-up (numba's compile or
    cache load) uses a tiny shape, so it leaves nothing of the measured size behind.
    """
    label, B, H, T, D, mask = (QUICK_CASES if quick else FULL_CASES)[case_index]
    torch = None
    if name == "torch":
        import torch

        torch.set_num_threads(THREADS)
    numba.set_num_threads(THREADS)
    tiny = case_inputs(1, 1, 8, 4, mask if mask == "causal" else "causal")
    contender_steps([name], *tiny[:3], torch)[name]()  # warm-up at a tiny size
    inputs, options, torch_mask, _ = case_inputs(B, H, T, D, mask)
    step = contender_steps([name], inputs, options, torch_mask, torch)[name]
    result, extra = peak_extra_bytes(step)
    print(json.dumps(dict(rss_rise=extra, results=results_bytes(result))))


def measure_memory(case_index, name, quick):
    """Peak extra bytes of one call (RSS rise minus the results), from a child process."""
    command = [sys.executable, __file__, "--memory-probe", str(case_index), name]
    command += ["--quick"] if quick else []
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"memory probe failed for {name}: {done.stderr.strip()[-300:]}", file=sys.stderr)
        return None, None
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if report["rss_rise"] is None:
        return None, None
    return report["rss_rise"] - report["results"], report["results"]


def run_case(case_index, quick, repeats, names, torch, pause=1.0):
    """Round robin: each round runs every contender once, so a slow spell of a shared
    machine (run-to-run swings of ±30% were seen here) lands on all contenders alike rather
    than on whichever ran during it. A pause before each call lets the previous contender's
    threads go idle (OpenBLAS workers spin for up to about a second after a multithreaded
    call, and slow whatever runs next ~2×); "numba (ctx)" starts each call right after a
    NumPy matmul, on purpose."""
    label, B, H, T, D, mask = (QUICK_CASES if quick else FULL_CASES)[case_index]
    inputs, options, torch_mask, window = case_inputs(B, H, T, D, mask)
    steps = contender_steps(names, inputs, options, torch_mask, torch)
    before_matmul = context_matmul(B, T)
    for step in steps.values():
        step()  # warm-up: numba compiles or loads its cache; torch and NumPy allocate
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            time.sleep(pause)
            if name == "numba (ctx)":
                before_matmul()
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    flops = useful_flops(B, H, T, D, allowed_pairs(mask, T, window))
    matrix = B * H * T * T * 4  # one (B, H, T, T) float32 matrix
    torch_ms = 1000 * statistics.median(times["torch"]) if "torch" in times else None
    rows = []
    for name in steps:
        ms = 1000 * statistics.median(times[name])
        extra, results = (None, None) if name in ("numba (ctx)", "products") else measure_memory(
            case_index, name, quick)
        rows.append(dict(
            case=label, B=B, H=H, T=T, D=D, contender=name, median_ms=round(ms, 2),
            min_ms=round(1000 * min(times[name]), 2), gflops=round(flops / ms / 1e6, 1),
            ratio_to_torch=round(ms / torch_ms, 3) if torch_ms else None,
            peak_extra_mib=None if extra is None else round(extra / 2**20, 1),
            peak_extra_pct_of_BHTT=None if extra is None else round(100 * extra / matrix, 2),
            results_mib=None if results is None else round(results / 2**20, 1),
        ))
    return rows


TARGET_RATIO = 0.6  # issue 7: numba forward + backward ≤ 0.6× torch's time at T ≥ 1024


def print_target(rows):
    """For causal T ≥ 1024: the time 0.6× torch allows, next to the products' time alone."""
    by_case = {}
    for r in rows:
        by_case.setdefault((r["case"], r["B"], r["H"], r["T"]), {})[r["contender"]] = r
    lines = []
    for (case, B, H, T), ms in by_case.items():
        if case == "causal" and T >= 1024 and {"torch", "products", "numba"} <= ms.keys():
            allowed = TARGET_RATIO * ms["torch"]["median_ms"]
            lines.append(f"  {B}·{H}·{T}: {TARGET_RATIO}× torch = {allowed:.1f} ms; the tile "
                         f"products alone take {ms['products']['median_ms']:.1f} ms, numba "
                         f"{ms['numba']['median_ms']:.1f} ms")
    if lines:
        print(f"\ntarget {TARGET_RATIO}× torch vs the kernels' products alone:")
        print("\n".join(lines))


def blas_info():
    return [dict(library=os.path.basename(i["filepath"]), api=i["internal_api"],
                 architecture=i.get("architecture"), threads=i["num_threads"],
                 version=i.get("version")) for i in threadpool_info()]


def print_table(rows):
    header = (f"{'case':<14} {'B':>2} {'H':>2} {'T':>5} {'D':>3}  {'contender':<12} "
              f"{'median ms':>10} {'GFLOP/s':>8} {'/ torch':>8} {'extra MiB':>10} {'% BHTT':>7}"
              f" {'results MiB':>12}")
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = "" if r["ratio_to_torch"] is None else f"{r['ratio_to_torch']:.2f}"
        mib = "" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.1f}"
        pct = "" if r["peak_extra_pct_of_BHTT"] is None else f"{r['peak_extra_pct_of_BHTT']:.2f}"
        res = "" if r["results_mib"] is None else f"{r['results_mib']:.1f}"
        print(f"{r['case']:<14} {r['B']:>2} {r['H']:>2} {r['T']:>5} {r['D']:>3}  "
              f"{r['contender']:<12} {r['median_ms']:>10.1f} {r['gflops']:>8.1f} {ratio:>8} "
              f"{mib:>10} {pct:>7} {res:>12}")


def both_coretypes(argv):
    """Re-run this script twice: OPENBLAS_CORETYPE removed (OpenBLAS picks) and =Haswell."""
    for setting in ("auto", "Haswell"):
        env = dict(os.environ)
        env.pop("OPENBLAS_CORETYPE", None)
        if setting != "auto":
            env["OPENBLAS_CORETYPE"] = setting
        args = [a for a in argv if a != "--both-coretypes"]
        if "--json" in args:  # one file per setting: NAME.auto.json, NAME.Haswell.json
            where = args.index("--json") + 1
            stem, dot, suffix = args[where].rpartition(".")
            args[where] = f"{stem}.{setting}.{suffix}" if dot else f"{args[where]}.{setting}"
        print(f"\n==== OPENBLAS_CORETYPE={'(unset)' if setting == 'auto' else setting} ====",
              flush=True)
        subprocess.run([sys.executable, __file__, *args], env=env, check=True)
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per contender")
    parser.add_argument("--json", default=None, help="write the rows and settings here")
    parser.add_argument("--no-numpy", action="store_true", help="skip the NumPy reference")
    parser.add_argument("--no-torch", action="store_true", help="skip torch")
    parser.add_argument("--both-coretypes", action="store_true",
                        help="run twice, OPENBLAS_CORETYPE unset and =Haswell (child processes)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("CASE", "CONTENDER"),
                        help=argparse.SUPPRESS)  # internal: one measurement in a child process
    args = parser.parse_args(argv)
    if args.memory_probe:
        return memory_probe(int(args.memory_probe[0]), args.memory_probe[1], args.quick)
    if args.both_coretypes:
        return both_coretypes(argv)
    torch = None
    if not args.no_torch:
        # torch first: if numba's OpenMP thread pool starts before torch is imported, both
        # share one libgomp and torch's SDPA ran ~30× slower here (3.7 ms → 110 ms)
        import torch

        torch.set_num_threads(THREADS)
    numba.set_num_threads(THREADS)
    # load numba's BLAS (SciPy's) before listing the libraries: one small call
    numba_step(*(np.ones((1, 1, 2, 2), np.float32) for _ in range(4)), dict(causal=True))
    info = blas_info()
    print(f"python {platform.python_version()}, numpy {np.__version__}, numba "
          f"{numba.__version__}" + (f", torch {torch.__version__}" if torch else "")
          + f"; threads {THREADS}; OPENBLAS_CORETYPE="
          f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', '(unset)')} (npformer.kernels sets PASSIVE "
          "unless given; it applies to torch's OpenMP threads too)")
    for lib in info:
        if lib["api"] == "openmp":
            print(f"  OpenMP {lib['library']}: {lib['threads']} threads")
        else:
            print(f"  BLAS {lib['library']}: {lib['api']} {lib['version']}, kernel "
                  f"{lib['architecture']}, {lib['threads']} threads (1 inside the kernels)")
    names = ["numba", "numba (ctx)", "products"] + ([] if args.no_numpy else ["numpy"])
    names += [] if torch is None else ["torch"]
    rows = []
    for case_index in range(len(QUICK_CASES if args.quick else FULL_CASES)):
        case_rows = run_case(case_index, args.quick, args.repeats, names, torch)
        print_table(case_rows)
        print(flush=True)
        rows += case_rows
    print("all cases:")
    print_table(rows)
    print_target(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            settings=dict(threads=THREADS, openblas_coretype=os.environ.get("OPENBLAS_CORETYPE"),
                          omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                          blas=info, repeats=args.repeats, quick=args.quick,
                          numpy=np.__version__, numba=numba.__version__,
                          torch=torch.__version__ if torch else None),
            rows=rows), indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
