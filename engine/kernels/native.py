"""C kernels compiled on first use with the machine's C compiler and loaded through ctypes.

Each ``NativeLibrary`` is one C source file next to this module with its compile flags. ``build``
compiles it (~0.3 s) into ``$TANDEM_HOME/kernels/`` under a name that hashes the source, the flags,
the compiler's version and the CPU (``-march=native``), so a changed source, compiler or machine
never loads a stale object; concurrent processes each compile into a temporary file and rename it
into place. ``load`` returns the loaded library or ``None`` with the reason logged once (no
compiler, a failed build), so every caller can fall back to its torch path. Objects built with
``-fopenmp`` link libgomp by its soname: in a process that imported torch they join torch's own
OpenMP runtime and threads.

``TANDEM_CPU_CAPABILITY`` caps the instruction set the kernels are built for, as
``ATEN_CPU_CAPABILITY`` caps torch's: ``native`` (everything ``-march=native`` has), ``avx512``,
``avx2`` (no AVX-512) or ``default`` (no AVX at all: the kernels that need AVX2 report themselves
unsupported and their callers take another path). Unset, it follows ``ATEN_CPU_CAPABILITY``, so one
variable runs the whole process on one machine's "lesser" paths; a cap above what the CPU has
changes nothing. The cap is part of the build key.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


CAPABILITY_ENV = "TANDEM_CPU_CAPABILITY"
# appended after -march=native; GCC and clang drop every feature that implies a disabled one
# (-mno-avx also drops AVX2, FMA and AVX-512)
_CAPABILITY_FLAGS: dict[str, tuple[str, ...]] = {
    "native": (),
    "avx512": (),
    "avx2": ("-mno-avx512f",),
    "default": ("-mno-avx",),
}


def capability() -> str:
    """The C kernels' instruction-set cap: $TANDEM_CPU_CAPABILITY, else $ATEN_CPU_CAPABILITY, else
    ``native``."""
    value = os.environ.get(CAPABILITY_ENV, "").lower()
    if not value:  # torch's own values for other architectures (vsx, sve256, ...) cap nothing here
        aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
        return aten if aten in _CAPABILITY_FLAGS else "native"
    if value not in _CAPABILITY_FLAGS:
        raise ValueError(f"{CAPABILITY_ENV} must be one of {', '.join(_CAPABILITY_FLAGS)}, got {value!r}")
    return value


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


@functools.cache
def _compiler_version(cc: str) -> bytes:
    return subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout.encode()


@functools.cache
def _cpu_signature() -> bytes:
    """What ``-march=native`` compiled for: the CPU's model and feature flags (a home directory
    shared by different machines must not load an object built for another CPU)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.processor().encode()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(dict.fromkeys(keep)).encode()


def describe_host() -> str:
    """The CPU and the instruction sets in use, for benchmark output: e.g. "AMD EPYC, family 25 model
    17 (avx512f avx2 fma; torch AVX512, C kernels native, 2 CPUs)". Figures measured on one CPU say
    little about another."""
    import platform

    import torch

    model, family, flags = platform.processor() or platform.machine(), "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name":
                model = value
            elif key == "cpu family":
                family = f"family {value}"
            elif key == "model" and family and "model" not in family:
                family += f" model {value}"  # a VM often names only the vendor: this tells the core
            elif key == "flags":
                flags = set(value.split())
    except OSError:
        pass
    known = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "avx2", "fma")
    isa = " ".join(f for f in known if f in flags) or "no AVX"
    torch_cap = torch.backends.cpu.get_cpu_capability()
    where = f"{model}, {family}" if family else model
    return f"{where} ({isa}; torch {torch_cap}, C kernels {capability()}, {os.cpu_count()} CPUs)"


def _cache_dir() -> Path:
    from engine.demo import tandem_home

    return tandem_home() / "kernels"


class NativeLibrary:
    """``source`` (a file in this package) compiled with ``flags``; ``declare`` sets the ctypes
    signatures of its functions once it is loaded. ``includes``: the files of this package that
    ``source`` #includes (part of the build key, so a change to one rebuilds it)."""

    def __init__(
        self,
        source: str,
        flags: Sequence[str],
        declare: Callable[[ctypes.CDLL], None],
        includes: Sequence[str] = (),
    ) -> None:
        self.source = Path(__file__).with_name(source)
        self.includes = tuple(Path(__file__).with_name(name) for name in includes)
        self.flags = (*flags, "-shared", "-fPIC")
        self.declare = declare
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self.load_error: str | None = None

    def build(self, cache_dir: Path | None = None) -> Path:
        """Compile (once per source, flags and compiler) and return the shared object's path."""
        cc = compiler()
        if cc is None:
            raise RuntimeError("no C compiler found (looked for $CC, cc, gcc, clang)")
        flags = (*self.flags, *_CAPABILITY_FLAGS[capability()])
        text = self.source.read_bytes() + b"".join(f.read_bytes() for f in self.includes)
        key = hashlib.sha256(text + " ".join(flags).encode() + _compiler_version(cc) + _cpu_signature())
        out_dir = cache_dir or _cache_dir()
        target = out_dir / f"{self.source.stem}-{key.hexdigest()[:16]}.so"
        if target.exists():
            return target
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            proc = subprocess.run(
                [cc, *flags, "-o", tmp, str(self.source), "-lm"],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{cc} failed to compile {self.source.name}:\n{proc.stderr.strip()}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def load(self) -> ctypes.CDLL | None:
        """The loaded library, or None (the reason logged once) where it cannot be built."""
        if self._lib is not None:  # asked on every layer: no lock once loaded
            return self._lib
        with self._lock:
            if self._lib is not None or self.load_error is not None:
                return self._lib
            try:
                lib = ctypes.CDLL(str(self.build()))
                self.declare(lib)
            except (OSError, RuntimeError, ValueError, AttributeError, subprocess.SubprocessError) as e:
                self.load_error = str(e)
                log.warning("C kernel %s unavailable, using the torch path: %s", self.source.name, e)
                return None
            self._lib = lib
            return lib

    def reset(self) -> None:
        """Forget the loaded library and any load error (tests)."""
        with self._lock:
            self._lib, self.load_error = None, None
