"""Ahead-of-time compile check: every kernel configuration, compiled for sm80/sm89/sm90 on a CPU.

Each kernel module lists its launch configurations as ``KernelSpec`` (``compile_spec.py``);
``compile_all`` compiles them with Triton's own compiler for a ``GPUTarget`` (no GPU or driver
needed) and reads what the hardware will care about from the ptxas run Triton makes on the PTX:
registers per thread, spill stores and loads, and shared memory (Triton's allocation plus ptxas's
static shared memory). ``CompileReport.problems`` says what would fail or slow down on the GPU.
The ptxas is the one Triton picks (``get_ptxas``): the wheel's ``ptxas`` (CUDA 12.9) for sm80/sm89,
``ptxas-blackwell`` (CUDA 13.4) for sm90a, whose PTX version the older one rejects.

Why a subprocess: under ``TRITON_INTERPRET=1`` (the test suite sets it process-wide) ``@triton.jit``
builds interpreter wrappers that cannot be compiled. The workers run with it removed, import the
kernel modules afresh and find each kernel by its module and qualified name (a kernel built inside
a zero-argument factory, like ``gemm_w4a16._kernel``, is found by calling the factory). Jobs are
spread over one worker per core, and each report is cached under Triton's cache directory, keyed
by the kernel's source hash (Triton's ``cache_key``, which covers the jit functions it calls), the
spec, the arch, the Triton version and the ptxas version: an unchanged kernel costs nothing.

Pointers are compiled as 16-byte aligned (Triton specializes every torch allocation so);
integers only where the spec says so (``divisible_by_16``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .compile_spec import KernelSpec

KERNEL_MODULES = ("attention", "norm", "rope_kv", "activation", "gemm_w4a16", "gemm_fp8")
MAX_REGISTERS = 255  # per thread, every arch we target
REGISTER_FILE = 65536  # 32-bit registers per SM: one block must fit


@dataclass(frozen=True)
class Arch:
    name: str  # "sm80"
    target: int  # Triton's GPUTarget arch: 80, 89, 90
    max_shared_bytes: int  # per block, with the opt-in carve-out (what Triton may request)


ARCHS = {
    (8, 0): Arch("sm80", 80, 166912),  # A100
    (8, 9): Arch("sm89", 89, 101376),  # L4, L40S, RTX 4090
    (9, 0): Arch("sm90", 90, 232448),  # H100, H200
}


def arch(cc: tuple[int, int]) -> Arch:
    try:
        return ARCHS[tuple(cc)]
    except KeyError:
        known = ", ".join(f"{a}.{b}" for a, b in ARCHS)
        raise ValueError(f"compute capability {cc}: expected one of {known}") from None


@dataclass(frozen=True)
class CompileReport:
    name: str  # the spec's name
    arch: str  # "sm80" | "sm89" | "sm90"
    registers: int  # per thread (ptxas "Used N registers")
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    shared_bytes: int  # per block: Triton's allocation + ptxas's static smem
    max_threads: int  # per block: num_warps * 32
    error: str | None = None  # the compile error, or None

    def problems(self) -> list[str]:
        """What would fail or slow down on the GPU; empty when the configuration is fine."""
        if self.error is not None:
            return [f"does not compile: {self.error}"]
        limits = next(a for a in ARCHS.values() if a.name == self.arch)
        found = []
        if self.spill_stores or self.spill_loads:
            found.append(f"spills {self.spill_stores} B stores / {self.spill_loads} B loads")
        if self.shared_bytes > limits.max_shared_bytes:
            found.append(f"shared memory {self.shared_bytes} B > {limits.max_shared_bytes} B")
        if self.registers > MAX_REGISTERS:
            found.append(f"{self.registers} registers > {MAX_REGISTERS}")
        # Registers are allocated per warp in units of 256 (8 per thread).
        per_warp = -(-self.registers * 32 // 256) * 256
        if per_warp * (self.max_threads // 32) > REGISTER_FILE:
            found.append(f"{self.registers} registers x {self.max_threads} threads > 64k")
        return found


# Gathering specs (in the caller's process; nothing here compiles) ---------------------------


def spec_providers() -> dict[str, Callable[[tuple[int, int]], list[KernelSpec]] | None]:
    """Each of KERNEL_MODULES' ``compile_specs``, or None where the module or function is absent."""
    found = {}
    for module in KERNEL_MODULES:
        full = f"trt_gemma.kernels.{module}"
        try:
            found[module] = getattr(importlib.import_module(full), "compile_specs", None)
        except ModuleNotFoundError as e:
            if e.name != full:
                raise
            found[module] = None
    return found


def collect_specs(cc: tuple[int, int], *, allow_missing: bool = False) -> list[KernelSpec]:
    """Every module's ``compile_specs(cc)``; a module without one raises unless allow_missing."""
    arch(cc)
    providers = spec_providers()
    missing = [f"trt_gemma.kernels.{m}" for m, p in providers.items() if p is None]
    if missing and not allow_missing:
        raise LookupError(f"no compile_specs(cc) in {', '.join(missing)}")
    specs = [s for p in providers.values() if p is not None for s in p(tuple(cc))]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"compile_specs: spec names must be unique, repeated: {duplicates}")
    return specs


def kernel_name(fn: Any) -> str:
    """The Python name of a @triton.jit function (compiled or interpreter wrapper)."""
    return getattr(getattr(fn, "fn", fn), "__name__", repr(fn))


def defined_kernels(module: str) -> list[str]:
    """Names of the launchable kernels a kernel module defines: @triton.jit objects named
    ``*kernel`` at module level in it or in its ``<module>_jit`` companion, or returned by a
    zero-argument factory named ``*kernel`` (``gemm_w4a16._kernel``). Device helpers like ``_dot``
    are not launched and need no spec."""
    import inspect

    names = set()
    for full in (f"trt_gemma.kernels.{module}", f"trt_gemma.kernels.{module}_jit"):
        try:
            mod = importlib.import_module(full)
        except ModuleNotFoundError as e:
            if e.name != full:
                raise
            continue
        for attr, obj in vars(mod).items():
            if (
                inspect.isfunction(getattr(obj, "__wrapped__", obj))
                and attr.endswith("kernel")
                and not inspect.signature(obj).parameters
            ):
                obj = obj()  # a factory that builds the kernel on first use
            raw = getattr(obj, "fn", None)
            if hasattr(obj, "arg_names") and getattr(raw, "__name__", "").endswith("kernel"):
                names.add(raw.__name__)
    return sorted(names)


def _job(spec: KernelSpec, cc: tuple[int, int]) -> dict:
    raw = getattr(spec.fn, "fn", None)
    if raw is None or not hasattr(spec.fn, "arg_names"):
        raise TypeError(f"spec {spec.name!r}: fn must be a @triton.jit function, got {spec.fn!r}")
    return {
        "name": spec.name, "module": raw.__module__, "qualname": raw.__qualname__,
        "args": dict(spec.args), "constexprs": dict(spec.constexprs),
        "num_warps": spec.num_warps, "num_stages": spec.num_stages, "arch": arch(cc).target,
        "divisible": sorted(divisible_by_16(spec)),
    }  # fmt: skip


def divisible_by_16(spec: KernelSpec) -> set[str]:
    """The integer arguments compiled as multiples of 16: the spec's ``divisible_by_16`` (names),
    if it has that attribute, else none. Triton specializes each launch on that property of every
    integer argument (pointers: always aligned for torch allocations), and it decides whether
    row loads vectorize: the prefill kernel of 0c4071e at head_dim 256 on sm90 took 255 registers
    and spilled 280 B without it, 196 and no spill with its strides marked. Without the
    attribute the check compiles the general variant (what a launch with odd strides gets): the
    worst case, unless the kernel states alignment itself (attention's ROW_ALIGN). A stride that
    is 1 at runtime belongs in the spec's constexprs (Triton compiles it as the constant 1)."""
    return set(getattr(spec, "divisible_by_16", None) or ())


# Compiling (in worker processes) -------------------------------------------------------------


def compile_spec(spec: KernelSpec, cc: tuple[int, int]) -> CompileReport:
    """Compile one spec for compute capability cc (see ``compile_all``)."""
    return compile_all([(spec, cc)], workers=1)[0]


def compile_all(
    pairs: Sequence[tuple[KernelSpec, tuple[int, int]]], *, workers: int | None = None
) -> list[CompileReport]:
    """Compile each (spec, cc) in worker subprocesses (default: one per core); reports in order."""
    jobs = [_job(spec, cc) for spec, cc in pairs]
    if not jobs:
        return []
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime's default; silences a warning
    env["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints its ptxas -v log: no second ptxas run
    env["OMP_NUM_THREADS"] = "1"
    results: list[dict | None] = [None] * len(jobs)
    with tempfile.TemporaryDirectory(prefix="trt-gemma-aot-") as tmp:
        procs = []
        for w in range(workers):
            mine = list(range(w, len(jobs), workers))
            src, dst = os.path.join(tmp, f"in{w}.pkl"), os.path.join(tmp, f"out{w}.pkl")
            with open(src, "wb") as f:
                pickle.dump([jobs[i] for i in mine], f)
            code = f"from trt_gemma.kernels.aot import _serve; _serve({src!r}, {dst!r})"
            proc = subprocess.Popen([sys.executable, "-c", code], env=env, text=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
            procs.append((proc, mine, dst))
        for proc, mine, dst in procs:
            stderr = proc.communicate()[1]
            if proc.returncode == 0 and os.path.exists(dst):
                with open(dst, "rb") as f:
                    for i, report in zip(mine, pickle.load(f), strict=True):
                        results[i] = report
            else:
                tail = " ".join(stderr.strip().splitlines()[-3:])[-400:]
                for i in mine:
                    results[i] = _failed(jobs[i], f"worker exited {proc.returncode}: {tail}")
    return [CompileReport(**r) for r in results]


def _failed(job: dict, error: str) -> dict:
    name = next(a.name for a in ARCHS.values() if a.target == job["arch"])
    return dataclasses.asdict(CompileReport(job["name"], name, 0, 0, 0, 0, 0, error))


def _serve(src: str, dst: str) -> None:
    """Worker entry point: compile the pickled jobs in src, pickle their reports to dst."""
    with open(src, "rb") as f:
        jobs = pickle.load(f)
    reports = [_compile_job(job) for job in jobs]
    with open(dst, "wb") as f:
        pickle.dump(reports, f)


def _resolve(module: str, qualname: str) -> Any:
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        if part == "<locals>":  # built by a zero-argument factory: ask it for the kernel
            obj = obj()
            if getattr(getattr(obj, "fn", None), "__qualname__", None) != qualname:
                raise LookupError(f"{module}.{qualname}: the factory returned {obj!r}")
            return obj
        obj = getattr(obj, part)
    return obj


def _signature(fn: Any, job: dict) -> tuple[dict, dict, dict]:
    """Triton's (signature, constexprs, attrs) for ASTSource: every argument in order, constexpr
    ones typed "constexpr"; pointers and the integers in job["divisible"] marked divisible by 16.
    A non-constexpr integer given in constexprs is compiled as that constant, as Triton does when
    a launch passes 1."""
    signature, constexprs, attrs = {}, {}, {}
    given = set(job["args"]) | set(job["constexprs"])
    unknown = sorted(given - set(fn.arg_names))
    if unknown:
        raise ValueError(f"{job['qualname']} has no argument(s) {unknown}")
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            if p.name in job["constexprs"]:
                constexprs[p.name] = job["constexprs"][p.name]
            elif p.has_default:
                constexprs[p.name] = p.default
            else:
                raise ValueError(f"constexpr {p.name} of {job['qualname']} has no value")
            signature[p.name] = "constexpr"
        elif p.name in job["constexprs"]:  # an int the launch always passes as this value
            signature[p.name] = "constexpr"
            constexprs[p.name] = job["constexprs"][p.name]
        elif p.name in job["args"]:
            signature[p.name] = job["args"][p.name]
            if signature[p.name].startswith("*") or p.name in job["divisible"]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"argument {p.name} of {job['qualname']} has no type in args")
    return signature, constexprs, attrs


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, static smem bytes) from ``ptxas -v``."""
    regs = [int(n) for n in _PTXAS_REGS.findall(log)]
    if not regs:
        raise ValueError(f"no 'Used N registers' line in the ptxas log: {log[-300:]!r}")
    spills = [(int(s), int(ld)) for s, ld in _PTXAS_SPILLS.findall(log)]
    smem = [int(n) for n in _PTXAS_SMEM.findall(log)]
    return max(regs), sum(s for s, _ in spills), sum(ld for _, ld in spills), max(smem, default=0)


def _run_ptxas(ptx: str, target: int) -> str:
    """ptxas -v on ptx with the flags Triton uses, for when Triton's own run came from its cache."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(target).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(target)}", path, "-o", path + ".o"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def _cache_path(fn: Any, job: dict, signature: dict, constexprs: dict) -> str:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    key = json.dumps([
        triton.__version__, get_ptxas(job["arch"]).version, fn.cache_key, job["arch"],
        signature, sorted((k, repr(v)) for k, v in constexprs.items()),
        job["num_warps"], job["num_stages"],
        ["aligned-pointers", *job["divisible"]] if job["divisible"] else "aligned-pointers",
    ])  # fmt: skip
    digest = hashlib.sha256(key.encode()).hexdigest()
    return os.path.join(triton.knobs.cache.dir, "trt_gemma_aot", digest + ".json")


def _compile_job(job: dict) -> dict:
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget

    arch_name = next(a.name for a in ARCHS.values() if a.target == job["arch"])
    try:
        fn = _resolve(job["module"], job["qualname"])
        signature, constexprs, attrs = _signature(fn, job)
        cache = _cache_path(fn, job, signature, constexprs)
        if os.path.exists(cache):
            with open(cache) as f:
                return {**json.load(f), "name": job["name"]}
        log = io.StringIO()
        with contextlib.redirect_stdout(log):  # Triton prints its ptxas log (TRITON_DUMP_PTXAS_LOG)
            kernel = triton.compile(
                triton.compiler.ASTSource(fn, signature, constexprs, attrs),
                target=GPUTarget("cuda", job["arch"], 32),
                options={"num_warps": job["num_warps"], "num_stages": job["num_stages"]},
            )
        text = log.getvalue()
        if not _PTXAS_REGS.search(text):
            text = _run_ptxas(kernel.asm["ptx"], job["arch"])
        regs, stores, loads, static_smem = parse_ptxas_log(text)
        report = CompileReport(
            job["name"], arch_name, regs, stores, loads, kernel.metadata.shared + static_smem,
            kernel.metadata.num_warps * 32,
        )
    except Exception as e:  # noqa: BLE001 - any failure is this configuration's report
        message = " ".join(str(e).split()) or type(e).__name__
        return _failed(job, f"{type(e).__name__}: {message[:500]}")
    result = dataclasses.asdict(report)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = f"{cache}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, cache)
    return result
