"""Which kernel computes each matrix product of `ops.linear`, chosen by timing it on this machine.

PyTorch's default CPU GEMM (MKL on x86 builds) runs below the peak of some CPUs, AMD's AVX-512
parts in particular, where oneDNN (also inside PyTorch) reaches it; on others MKL is the faster.
So nothing is assumed: the products of a linear layer are

    "forward"       y  = x W^T (+ b)     x (M, K), W (N, K)
    "grad_input"    dx = g W             g (M, N)
    "grad_weight"   dW = g^T x
    "forward_stacked"  several forward products of one x as one GEMM on the stacked weights
                       (`linear.linear_many`; "mkl" there means separate products)
    "forward_unpacked" y = x W^T for a W that changes at every call (no packed candidate)
    "grad_input_frozen" dx = g W for a frozen W (LoRA's base): W^T may be packed once, as a
                       forward weight ("onednn_packed"; a trainable W would be repacked every step)

and for each product and class of shapes (M rounded up to a power of two, N, K) the candidate
backends run on the real operands at the first product of that class, interleaved, best of three:

    "mkl"            torch's default: F.linear / torch.mm
    "onednn"         oneDNN's linear, torch.ops.mkldnn._linear_pointwise, on the operands as they are
    "onednn_packed"  the same with the weight reordered once into oneDNN's blocked layout (forward
                     only; one copy per weight, re-made when the weight changes, within a budget)
    "mkl_split"      grad_weight only: the reduction over M cut into chunks, one batched torch.bmm
                     and a sum. MKL runs a product with a small output (a LoRA adapter's (r, K) or
                     (N, r) gradient, r = 16) at about one thread's rate; the chunks are parallel work.
                     Measured like the others, never forced (`force` takes the three above).

A backend other than "mkl" is kept only if it is at least `MARGIN` faster, so no machine runs
slower than with F.linear. Choices are kept for the process and in a JSON file per machine and
thread count under `user_cache.cache_dir()`, so that all runs on one machine (a run and its
resume included) use the same kernels; delete the file to measure again.
`GRIFFINLM_GEMM=mkl|onednn|onednn_packed` (read once per process) or `force(...)` overrides
the choice; "auto" is the default.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import platform
import tempfile
import threading
import time
import weakref
from typing import Callable, Iterator

import torch

from ..user_cache import cache_dir

PRODUCTS = ("forward", "forward_unpacked", "grad_input", "grad_input_frozen", "grad_weight", "forward_stacked")
BACKENDS = ("mkl", "onednn", "onednn_packed")
MEASURED_ONLY = ("mkl_split",)  # backends a measurement may choose but `force` does not take
MARGIN = 0.95  # a backend replaces "mkl" only at <= 95% of its time
MIN_MNK = 2 ** 19  # smaller products run F.linear unmeasured: the call overhead dominates them
MAX_ROW_CLASS = 4096  # every M >= 4096 is one class (rates are flat well before)

# Products run by backend, "product:backend" -> count, so a test can assert which kernel ran.
GEMM_CALLS: collections.Counter[str] = collections.Counter()

_forced: list[str] = []
_lock = threading.RLock()  # a measurement may run products that choose their own backend


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """True when this torch build has oneDNN's linear op on CPU."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def native_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated."""
    return onednn_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


@contextlib.contextmanager
def force(backend: str) -> Iterator[None]:
    """Within the block, every product uses `backend` ("auto" restores measuring; a backend
    that does not apply to a product, such as "onednn_packed" for a gradient, means "onednn")."""
    _check_name(backend)
    _forced.append(backend)
    try:
        yield
    finally:
        _forced.pop()


def _check_name(backend: str) -> None:
    if backend not in (*BACKENDS, "auto"):
        raise ValueError(f"unknown GEMM backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")


def override() -> str:
    """The backend every product is forced to now ("auto": the measured choices)."""
    return _forced[-1] if _forced else _env_backend()


def _override() -> str:
    backend = override()
    _check_name(backend)
    return backend


@functools.lru_cache(maxsize=None)
def _env_backend() -> str:
    """GRIFFINLM_GEMM, read once per process."""
    return os.environ.get("GRIFFINLM_GEMM", "auto")


def row_class(m: int) -> int:
    """M rounded up to a power of two, at most MAX_ROW_CLASS."""
    return min(1 << max(0, m - 1).bit_length(), MAX_ROW_CLASS)


# --- choices --------------------------------------------------------------------------------
def machine_key() -> str:
    """The CPU, its torch capability, the thread count and the torch version: what the
    measured choices depend on."""
    return _machine_key(torch.get_num_threads())


@functools.lru_cache(maxsize=None)
def _machine_key(threads: int) -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(ln.split(":", 1) for ln in f.read().split("\n\n")[0].splitlines() if ":" in ln)
        info = {k.strip(): v.strip() for k, v in info.items()}
        model = f"{info.get('model name', model)} (family {info.get('cpu family')}, model {info.get('model')})"
    except (OSError, ValueError):
        pass
    return f"{model} | {torch.backends.cpu.get_cpu_capability()} | threads {threads} | torch {torch.__version__}"


def choices_path() -> str:
    return os.path.join(cache_dir(), "gemm_backends.json")


class Choices:
    """Measured backend per (product, dtype, row class, N, K), for this process and on disk."""

    def __init__(self) -> None:
        self.table: dict[str, dict[str, str]] = {}  # machine key -> {shape key -> backend}
        self.loaded = False
        self.memo: dict[tuple, str] = {}  # (product, dtype, row class, N, K, threads) -> backend

    def _load(self) -> None:
        self.loaded = True
        try:
            with open(choices_path()) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return
        if isinstance(data, dict):
            self.table = {k: v for k, v in data.items() if isinstance(v, dict)}

    def get(self, key: str) -> str | None:
        if not self.loaded:
            self._load()
        got = self.table.get(machine_key(), {}).get(key)
        return got if got in BACKENDS or got in MEASURED_ONLY else None

    def put(self, key: str, backend: str) -> None:
        self.table.setdefault(machine_key(), {})[key] = backend
        path = choices_path()
        try:  # atomic: a reader never sees half a file; a failed write loses only the cache
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".gemm_backends.")
            with os.fdopen(fd, "w") as f:
                json.dump(self.table, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError:
            pass

    def current(self) -> dict[str, str]:
        """This machine's choices so far ({"forward float32 M16 N1536 K512": "onednn_packed", ...})."""
        if not self.loaded:
            self._load()
        return dict(self.table.get(machine_key(), {}))


CHOICES = Choices()


def fastest(times: dict[str, float]) -> str:
    """The backend to keep from best-of-rounds seconds per backend ("mkl" among them): the
    fastest, unless it does not beat "mkl" by the margin."""
    best = min(times, key=times.get)
    if best != "mkl" and "mkl" in times and times[best] > MARGIN * times["mkl"]:
        return "mkl"
    return best


def _time(fn: Callable[[], object], reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def measure(candidates: dict[str, Callable[[], object]], rounds: int = 3) -> dict[str, float]:
    """Best-of-rounds seconds per call of each candidate, interleaved (each round in the
    opposite order of the previous one), every timing at least ~0.2 ms of repeats."""
    reps = {}
    for name, fn in candidates.items():
        reps[name] = max(1, min(50, int(2e-4 / max(_time(fn, 1), 1e-7))))  # the first call warms up
    best = {name: float("inf") for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            best[name] = min(best[name], _time(candidates[name], reps[name]))
    return best


def choose(product: str, dtype: torch.dtype, m: int, n: int, k: int,
           candidates: Callable[[], dict[str, Callable[[], object]]]) -> str:
    """The backend for one product: forced, else remembered, else measured now on `candidates()`
    (name -> zero-argument call computing the product) and remembered."""
    forced = _override()
    if forced != "auto":
        packs = product.startswith("forward") or product == "grad_input_frozen"
        return forced if forced != "onednn_packed" or packs else "onednn"
    if m * n * k < MIN_MNK:
        return "mkl"
    memo_key = (product, dtype, row_class(m), n, k, torch.get_num_threads())
    got = CHOICES.memo.get(memo_key)
    if got is not None:  # the per-call path: no string keys, no file
        return got
    if not onednn_available():
        return "mkl"
    key = f"{product} {str(dtype).removeprefix('torch.')} M{row_class(m)} N{n} K{k}"
    with _lock:
        got = CHOICES.get(key)
        if got is None:
            with torch.no_grad():
                runnable = {}
                for name, fn in candidates().items():
                    try:
                        fn()
                        runnable[name] = fn
                    except RuntimeError:  # a backend this build or layout cannot run
                        continue
                got = fastest(measure(runnable))
            CHOICES.put(key, got)
        CHOICES.memo[memo_key] = got
    return got


# --- per-weight copies ------------------------------------------------------------------------
class WeightCopies:
    """Derived copies of weights (oneDNN-packed, bf16, several weights stacked), each re-made when
    one of its weights changes: in place (an optimizer step bumps the version counter) or by a new
    storage. The copies of one kind together stay within `budget` bytes; past it `get` returns None."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.enabled = True  # `disable_weight_copies` turns copies off for the process
        # (kind, weight ids) -> (weakrefs, (version, data_ptr) per weight, copy, bytes)
        self.entries: dict[tuple, tuple[list[weakref.ref], list[tuple[int, int]], torch.Tensor, int]] = {}
        self.used: collections.Counter[str] = collections.Counter()

    def get(self, kind: str, weights: torch.Tensor | tuple[torch.Tensor, ...],
            make: Callable) -> torch.Tensor | None:
        """The copy `make(weights)` (detached weights, a tensor or a tuple as given), cached; None
        past the budget or once copies are disabled (callers then use the weights themselves)."""
        if not self.enabled:
            return None
        ws = weights if isinstance(weights, tuple) else (weights,)
        key = (kind, *map(id, ws))
        stamps = [(w._version, w.data_ptr()) for w in ws]
        entry = self.entries.get(key)
        if entry is not None and all(r() is w for r, w in zip(entry[0], ws)):
            if entry[1] == stamps:
                return entry[2]
            self._drop(key)
        nbytes = sum(w.numel() * w.element_size() for w in ws)  # the copy's size, near enough
        if self.used[kind] + nbytes > self.budget:
            return None
        with torch.no_grad(), torch.inference_mode(False):
            detached = tuple(w.detach() for w in ws)
            copy = make(detached if isinstance(weights, tuple) else detached[0])
        refs = [weakref.ref(w, lambda _, key=key: self._drop(key)) for w in ws]
        self.entries[key] = (refs, stamps, copy, nbytes)
        self.used[kind] += nbytes
        return copy

    def _drop(self, key: tuple) -> None:
        entry = self.entries.pop(key, None)
        if entry is not None:
            self.used[key[0]] -= entry[3]

    def clear(self) -> None:
        self.entries.clear()
        self.used.clear()


COPIES = WeightCopies(int(float(os.environ.get("GRIFFINLM_GEMM_COPIES_MB", "4096")) * 2**20))


def disable_weight_copies() -> None:
    """No derived weight copies (packed, stacked, bf16) from now on in this process. A copy is
    re-made when its weight's version counter or storage changes; FSDP2 refills its unsharded
    parameters in place through collectives, which bump no version counter, so a cached copy
    would go stale unseen (wrong products after the first optimizer step). `parallelize` calls
    this when it applies FSDP2 (`fully_shard` or `replicate`)."""
    COPIES.enabled = False
    COPIES.clear()


def packed(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` (N, K) fp32 in oneDNN's blocked layout (cached), or None past the budget."""
    return COPIES.get("packed", weight, lambda w: torch.ops.mkldnn._reorder_linear_weight(w, MAX_ROW_CLASS))


def packed_transposed(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` (N, K) transposed to (K, N) in oneDNN's blocked layout (cached), or None past the
    budget: the input gradient g @ W as a forward product on a packed weight."""
    return COPIES.get("packed_t", weight,
                      lambda w: torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), MAX_ROW_CLASS))


def packed_concat(weights: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """The weights (N_i, K) stacked along N in oneDNN's blocked layout (cached while every one of
    them is unchanged), or None past the budget: one GEMM for several projections of one input."""
    return COPIES.get("concat", weights,
                      lambda ws: torch.ops.mkldnn._reorder_linear_weight(torch.cat(ws), MAX_ROW_CLASS))


def bf16_copy(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in bf16 (cached per version; made afresh, uncached, past the budget)."""
    got = COPIES.get("bf16", weight, lambda w: w.to(torch.bfloat16))
    return weight.detach().to(torch.bfloat16) if got is None else got
