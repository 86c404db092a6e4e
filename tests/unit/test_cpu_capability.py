"""TANDEM_CPU_CAPABILITY, the C kernels' instruction-set cap (engine/kernels/native.py): each cap
builds its own object, a cap takes away what it names, and the kernels' floats do not depend on
the instruction set they were built for (the GEMM is one FMA chain per output in every variant; the
fused ops never contract or reassociate)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine import linear
from engine.kernels import cpu_fused
from engine.kernels.native import CAPABILITY_ENV, capability, compiler
from engine.rope import RotaryTables
from tests.host import FUSED_EXPECTED

pytestmark = pytest.mark.unit


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


FLAGS = _cpu_flags()
# the GEMM's vector width (bits) this host can build under each cap; 0: not compiled in
WIDTH = {
    "native": 512 if "avx512f" in FLAGS else 256 if {"avx2", "fma"} <= FLAGS else 0,
    "avx2": 256 if {"avx2", "fma"} <= FLAGS else 0,
    "default": 0,
}


def test_the_cap_comes_from_tandem_then_aten_then_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CAPABILITY_ENV, raising=False)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert capability() == "native"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "AVX2")
    assert capability() == "avx2"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "sve256")  # another architecture's value caps nothing
    assert capability() == "native"
    monkeypatch.setenv(CAPABILITY_ENV, "default")
    assert capability() == "default"
    monkeypatch.setenv(CAPABILITY_ENV, "avx9000")
    with pytest.raises(
        ValueError, match="TANDEM_CPU_CAPABILITY must be one of native, avx512, avx2, default"
    ):
        capability()


@pytest.fixture
def fresh_libraries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Kernels built into an empty cache under whatever cap the test sets; the real ones after."""
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    for lib in (linear.GEMM, cpu_fused.LIBRARY):
        lib.reset()
    yield
    monkeypatch.undo()
    for lib in (linear.GEMM, cpu_fused.LIBRARY):
        lib.reset()


def test_an_unknown_cap_is_a_logged_load_error_and_the_torch_path_stays(
    monkeypatch: pytest.MonkeyPatch, fresh_libraries: None
) -> None:
    monkeypatch.setenv(CAPABILITY_ENV, "avx9000")
    assert linear.GEMM.load() is None
    assert "TANDEM_CPU_CAPABILITY" in (linear.GEMM.load_error or "")
    assert linear.resolve("auto", torch.float32, torch.device("cpu")) in ("onednn", "torch")


@pytest.mark.skipif(compiler() is None, reason="no C compiler: the kernel cannot be built here")
def test_each_cap_builds_its_own_gemm_and_every_variant_gives_the_same_floats(
    monkeypatch: pytest.MonkeyPatch, fresh_libraries: None, tmp_path: Path
) -> None:
    g = torch.Generator().manual_seed(11)
    w, b = torch.randn(70, 300, generator=g), torch.randn(70, generator=g)
    x = torch.randn(29, 300, generator=g)  # 2 row blocks of 12 and a tail of 5 (or 4 of 6 and 5)
    built: dict[str, Path] = {}
    results: dict[str, torch.Tensor] = {}
    for cap in ("native", "avx2", "default"):
        monkeypatch.setenv(CAPABILITY_ENV, cap)
        linear.GEMM.reset()
        built[cap] = linear.GEMM.build()
        lib = linear.GEMM.load()
        assert lib is not None, linear.GEMM.load_error
        assert lib.tandem_gemm_supported() == WIDTH[cap], cap
        if WIDTH[cap]:
            results[cap] = linear.make_linear(w, b, "cpu")(x)
            torch.testing.assert_close(results[cap], F.linear(x, w, b), atol=1e-4, rtol=1e-5)
        else:  # no AVX2/FMA in this build: auto takes oneDNN (or F.linear) instead
            assert linear.resolve("auto", torch.float32, torch.device("cpu")) != "cpu"
    assert len(set(built.values())) == 3  # the cap is in the build key
    variants = list(results.values())
    assert all(torch.equal(v, variants[0]) for v in variants[1:])


@pytest.mark.skipif(not FUSED_EXPECTED, reason="no fused ops expected here (compiler, torch capability)")
def test_the_fused_ops_equal_torch_under_every_cap(
    monkeypatch: pytest.MonkeyPatch, fresh_libraries: None
) -> None:
    d = 8
    angles = torch.arange(64).float()[:, None] * torch.rand(d // 2)
    rope = RotaryTables(cos=angles.cos(), sin=angles.sin())
    g = torch.Generator().manual_seed(2)
    x, delta, w = torch.randn(9, 1000, generator=g), torch.randn(9, 1000, generator=g), torch.randn(1000)
    for cap in ("native", "avx2", "default"):
        monkeypatch.setenv(CAPABILITY_ENV, cap)
        cpu_fused.LIBRARY.reset()
        fused = cpu_fused.FusedCpuOps.create(rope, d)
        assert fused is not None, cap
        got_x, got = fused.add_rms_norm(x.clone(), delta, w, 1e-5)
        assert torch.equal(got_x, x + delta) and torch.equal(got, cpu_fused.rms_norm(x + delta, w, 1e-5)), cap
