"""Build (once, cached) and load the C++ selective-scan kernel.

The kernel in ``csrc/selective_scan.cpp`` includes no torch header, so it is compiled straight
with the system C++ compiler (``$CXX``, else g++/c++/clang++) in about 4 s on 2 cores; ninja and
torch's extension toolchain are not needed (an extension including ``torch/extension.h`` takes
about a minute to compile here).  Flags: ``-O3 -march=native -fopenmp`` first, then without
OpenMP, then without ``-march=native``.  With ``-fopenmp`` the library's ``libgomp.so.1``
resolves to the copy torch has already loaded, so the kernel shares torch's thread pool.

The shared library goes to ``$IUMAD_EXTENSIONS_DIR``, else ``$TORCH_EXTENSIONS_DIR/iumad``, else
``~/.cache/iumad/torch_extensions`` (the system temp dir when that is not writable), under a name
hashed from the source, the compiler, the flags and the CPU, so a stale or foreign build is never
loaded.  Concurrent first uses (pytest workers, data-loader processes) each compile to a private
file and rename it into place atomically.

When no compiler is found or the build fails, :func:`load_library` returns ``None`` after one
warning and callers use the pure-PyTorch scan.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "csrc" / "selective_scan.cpp"
ABI_VERSION = 1
BASE_FLAGS = [
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-pthread",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-fno-trapping-math",
]
NATIVE_FLAGS = ["-march=native"]
OPENMP_FLAGS = ["-fopenmp"]
COMPILE_TIMEOUT_S = 120

_lock = threading.Lock()
_state: dict[str, object] = {}


def cache_dir() -> Path:
    """Where built libraries live (see the module docstring for the order of the variables)."""
    env = os.environ.get("IUMAD_EXTENSIONS_DIR")
    if env:
        return Path(env)
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env) / "iumad"
    return Path.home() / ".cache" / "iumad" / "torch_extensions"


def find_compiler() -> str | None:
    """The C++ compiler to use, or None when there is none on this machine."""
    env = os.environ.get("CXX")
    if env and shutil.which(env):
        return shutil.which(env)
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler_version(cxx: str) -> str:
    try:
        res = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return res.stdout.splitlines()[0] if res.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _writable_cache_dir() -> Path:
    """cache_dir(), or a folder under the system temp dir when that one cannot be created/written."""
    base = cache_dir()
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / "iumad_extensions"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def _library_path(cxx: str, flags: list[str], base: Path | None = None) -> Path:
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cxx.encode(), _compiler_version(cxx).encode(), " ".join(flags).encode(),
                 _cpu_signature().encode(), platform.machine().encode(), sys.platform.encode(),
                 str(ABI_VERSION).encode()):
        h.update(part)
        h.update(b"\0")
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    return (base or cache_dir()) / f"iumad_selective_scan_{h.hexdigest()[:16]}{suffix}"


def _compile(cxx: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cxx, *flags, str(SOURCE), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.iumad_scan_abi_version.restype = ctypes.c_int
    if lib.iumad_scan_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has ABI {lib.iumad_scan_abi_version()}, expected {ABI_VERSION}")
    lib.iumad_scan_tile_width.restype = ctypes.c_int
    lib.iumad_scan_tile_width.argtypes = [ctypes.c_int]
    for name in ("iumad_scan_fwd_f32", "iumad_scan_fwd_f64", "iumad_scan_bwd_f32", "iumad_scan_bwd_f64"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p]
    return lib


def build() -> ctypes.CDLL:
    """Compile if needed and load the library; raises on any failure (use :func:`load_library`)."""
    if not SOURCE.is_file():
        raise RuntimeError(f"kernel source {SOURCE} is missing from the installed package")
    cxx = find_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    errors = []
    base = _writable_cache_dir()
    for flags in (BASE_FLAGS + NATIVE_FLAGS + OPENMP_FLAGS, BASE_FLAGS + NATIVE_FLAGS, BASE_FLAGS):
        path = _library_path(cxx, flags, base)
        try:
            if not path.is_file():
                _compile(cxx, flags, path)
            return _open(path)
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
    raise RuntimeError("; ".join(errors))


def load_library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (with one warning per process) when it cannot be built."""
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = build()
                _state["error"] = None
            except Exception as exc:  # noqa: BLE001 - any build problem means: use the fallback
                _state["lib"] = None
                _state["error"] = str(exc)
                first = (str(exc).splitlines() or [""])[0][:300]
                warnings.warn(
                    f"iumad: C++ selective scan unavailable, using the slower pure-PyTorch scan ({first})",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _state["lib"]  # type: ignore[return-value]


def build_error() -> str | None:
    """Why the last :func:`load_library` call returned None (None when it succeeded or was not tried)."""
    return _state.get("error")  # type: ignore[return-value]
