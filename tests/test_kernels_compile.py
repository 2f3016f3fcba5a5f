"""Every kernel configuration compiles for sm80, sm89 and sm90 without a GPU (kernels/aot.py):
no compile error, no register spill, shared memory and registers within each arch's limits.

The configurations come from each kernel module's ``compile_specs(cc)``, built through the same
config functions its launchers call. The default suite compiles two configurations per kernel and
arch (the largest tiles, and one more); ``-m slow`` compiles all of them.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from trt_gemma.kernels import aot
from trt_gemma.kernels.compile_spec import KernelSpec

CCS = [(8, 0), (8, 9), (9, 0)]
_IDS = [aot.arch(cc).name for cc in CCS]


def _specs(cc) -> list[KernelSpec]:
    """Every module's specs for cc (collect_specs fails naming a module without compile_specs)."""
    return aot.collect_specs(cc)


def _footprint(spec: KernelSpec) -> tuple:
    """Orders a kernel's specs by likely register and shared-memory pressure: tile sizes times
    pipeline stages, then warps, then how many features are switched on."""
    tile = 1
    for k, v in spec.constexprs.items():
        if isinstance(v, int) and not isinstance(v, bool) and (
            k.startswith("BLOCK") or k.endswith("_PAD")
        ):
            tile *= v
    flags = sum(v is True for v in spec.constexprs.values())
    fp8 = any("fp8" in t for t in spec.args.values())
    return tile * spec.num_stages, spec.num_warps, fp8, flags, spec.name


def _default_subset(specs: list[KernelSpec]) -> list[KernelSpec]:
    """Per kernel: its largest spec by _footprint plus one other picked by a stable hash of the
    name, so the default suite compiles every kernel on every arch in a few minutes; the full
    set runs under -m slow."""
    by_kernel: dict[str, list[KernelSpec]] = {}
    for spec in specs:
        by_kernel.setdefault(aot.kernel_name(spec.fn), []).append(spec)
    chosen = []
    for group in by_kernel.values():
        largest = max(group, key=_footprint)
        rest = [s for s in group if s is not largest]
        chosen.append(largest)
        if rest:
            chosen.append(min(rest, key=lambda s: hashlib.sha1(s.name.encode()).hexdigest()))
    return chosen


_COMPILED: dict[str, dict] = {}


def _compiled(selection: str) -> dict:
    """{cc: reports} for "default" (_default_subset) or "all" specs; every arch in one pool of
    workers, each report cached per kernel source under Triton's cache dir."""
    if selection not in _COMPILED:
        per_cc = {}
        for cc in CCS:
            specs = _specs(cc)
            per_cc[cc] = specs if selection == "all" else _default_subset(specs)
        start = time.perf_counter()
        flat = aot.compile_all([(spec, cc) for cc in CCS for spec in per_cc[cc]])
        print(f"\n{selection}: {len(flat)} configurations in {time.perf_counter() - start:.0f} s")
        result, i = {}, 0
        for cc in CCS:
            n = len(per_cc[cc])
            result[cc], i = flat[i:i + n], i + n
        _COMPILED[selection] = result
    return _COMPILED[selection]


@pytest.mark.parametrize("selection", ["default", pytest.param("all", marks=pytest.mark.slow)])
@pytest.mark.parametrize("cc", CCS, ids=_IDS)
def test_every_spec_compiles_without_spills_within_limits(selection, cc):
    reports = _compiled(selection)[cc]
    assert reports, "no kernel configuration to check"
    bad = {r.name: r.problems() for r in reports if r.problems()}
    assert not bad, f"{aot.arch(cc).name}: {bad}"


@pytest.mark.parametrize("module", aot.KERNEL_MODULES)
def test_every_module_lists_every_kernel(module):
    provider = aot.spec_providers()[module]
    assert provider is not None, f"trt_gemma.kernels.{module} has no compile_specs(cc)"
    # Across the archs: a kernel may run on some only (fp8 needs sm89+).
    defined = set(aot.defined_kernels(module))
    listed = {aot.kernel_name(s.fn) for cc in CCS for s in provider(cc)}
    assert defined <= listed, f"{module}: no spec on any arch for {sorted(defined - listed)}"


def test_no_fp8_on_sm80():
    # Triton has no e4m3 (fp8e4nv) before sm89: an sm80 launcher must never pick such a config.
    specs = _specs((8, 0))
    fp8 = [s.name for s in specs if any("fp8" in t for t in s.args.values())
           or any("float8" in str(v) for v in s.constexprs.values())]  # fmt: skip
    assert not fp8, f"sm80 specs use fp8: {fp8}"


def test_report_flags_spills_and_limits():
    # The checker itself, against hand-made reports (no compile).
    ok = aot.CompileReport("k", "sm89", 128, 0, 0, 101376, 256)
    assert ok.problems() == []
    assert "spills" in aot.CompileReport("k", "sm90", 255, 8, 4, 0, 128).problems()[0]
    assert "shared" in aot.CompileReport("k", "sm89", 96, 0, 0, 101377, 128).problems()[0]
    assert "64k" in aot.CompileReport("k", "sm80", 255, 0, 0, 0, 512).problems()[0]
    assert aot.CompileReport("k", "sm80", 0, 0, 0, 0, 0, "boom").problems() == [
        "does not compile: boom"
    ]
    log = ("ptxas info    : Function properties for k\n"
           "    280 bytes stack frame, 280 bytes spill stores, 276 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem\n")  # fmt: skip
    assert aot.parse_ptxas_log(log) == (255, 280, 276, 1024)
