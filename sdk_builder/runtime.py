"""Loading and running a `.pte` in the ExecuTorch runtime (the same C++ runtime the phones use).

Used by the client, `verify`, the golden replay and the build-time checks; it knows nothing about
exporting.

The runtime is reached through its C++ extension module (`executorch.extension.pybindings._C`)
directly: the documented wrappers (`executorch.runtime`, `...pybindings.portable_lib`) import
`executorch.exir` for one warning class, and that pulls in the whole export stack (several
seconds of start-up for `rank`, `verify` and `inspect`). The extension links against libtorch's
Python bindings and takes and returns `torch.Tensor`s only (numpy arrays are refused), so torch
itself must be imported first (the wrappers do the same). That import is the floor of `rank` and
`verify`; `runtime_only_process()` lowers it for a process that only runs programs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import importlib.abc
import importlib.machinery
import io
import os
import sys
from pathlib import Path

# torch's Python meta kernels (shapes of ops on "meta"/fake tensors, for export and compile). torch
# imports them last at start-up, together with the decompositions they use: about a third of
# `import torch`. Running a program in the ExecuTorch runtime never dispatches a torch op.
_META_KERNELS = "torch._meta_registrations"
# Importing these means the process is about to export or compile: the meta kernels come first.
_NEEDS_META_KERNELS = ("torch._dynamo", "torch._inductor", "executorch.exir")
_runtime_only = False


def runtime_only_process() -> None:
    """Declare that this process only runs programs (the CLI's `rank`, `verify`, `refresh`): torch,
    when the runtime imports it, skips its meta kernels (~0.5 s of the ~1.8 s `import torch`). They
    are imported as soon as anything imports the exporter or the compiler (`_NEEDS_META_KERNELS`),
    and a direct `import torch._meta_registrations` loads them as usual. No effect once torch is
    imported."""
    global _runtime_only
    _runtime_only = True


class _SkipMetaKernels(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """During `import torch` only: an empty module in place of the meta kernels."""

    def find_spec(self, name, path, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == _META_KERNELS else None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        pass


class _MetaKernelsBeforeExport(importlib.abc.MetaPathFinder):
    """Imports the real meta kernels the first time the exporter or the compiler is imported."""

    def find_spec(self, name, path, target=None):
        if name in _NEEDS_META_KERNELS:
            sys.meta_path.remove(self)
            importlib.import_module(_META_KERNELS)
        return None


def _import_torch() -> None:
    if not _runtime_only or "torch" in sys.modules:
        import torch  # noqa: F401

        return
    skip = _SkipMetaKernels()
    sys.meta_path.insert(0, skip)
    try:
        import torch  # noqa: F401
    finally:
        sys.meta_path.remove(skip)
        placeholder = sys.modules.pop(_META_KERNELS, None)
        torch = sys.modules.get("torch")
        if placeholder is not None and getattr(torch, "_meta_registrations", None) is placeholder:
            del torch._meta_registrations
    sys.meta_path.insert(0, _MetaKernelsBeforeExport())


@functools.cache
def _extension():
    _import_torch()  # loads libtorch_python.so, which the extension links against

    import executorch.extension.pybindings._C as extension

    _register_quantized_kernels(Path(extension.__file__).resolve().parents[2])
    return extension


def _register_quantized_kernels(executorch_root: Path) -> None:
    """The quantized_decomposed kernels (int8 bundles) register themselves with the runtime when
    their library is loaded. `import executorch.kernels.quantized` loads the same library through
    torch.ops (for eager/export use); the runtime needs only the loading, so it is done directly
    (RTLD_GLOBAL, as torch.ops.load_library does) and failures surface when an int8 program is loaded."""
    libs = sorted(executorch_root.glob("kernels/quantized/*quantized_ops_aot_lib.*"))
    if libs:
        ctypes.CDLL(str(libs[0]), mode=ctypes.RTLD_GLOBAL)


@contextlib.contextmanager
def _native_stderr_silenced():
    """Loading a program writes straight to file descriptor 2 from C++: XNNPACK's cpuinfo prints
    five lines about /sys files of ARM CPUs on its first use, and a program that fails to load
    prints its multi-line ExecuTorch log (our callers turn the failure into a one-line error).
    Neither is something a user can act on, so fd 2 points at /dev/null while a program loads."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        with contextlib.redirect_stderr(io.StringIO()):  # the extension also logs through sys.stderr
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class RuntimeMethod:
    """`forward` of a program loaded in the ExecuTorch runtime. Keeps the program's bytes alive:
    the runtime reads them in place, so a temporary buffer would be freed under it."""

    def __init__(self, pte: bytes | str) -> None:
        extension = _extension()
        self._source = pte
        # InternalConsistency, as `executorch.runtime` asks: a bundle's program comes from a file.
        verification = extension.Verification.InternalConsistency
        with _native_stderr_silenced():
            if isinstance(pte, (bytes, bytearray)):
                self._source = bytes(pte)
                self._program = extension._load_program_from_buffer(self._source, program_verification=verification)
            else:
                self._program = extension._load_program(str(pte), program_verification=verification)
            self._method = self._program.load_method("forward")

    def input_shapes(self) -> list[tuple[int, ...]]:
        """The static (upper-bound) shape of each input tensor, as the program declares it."""
        meta = self._method.method_meta()
        return [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]

    def execute(self, inputs: list) -> list:
        return self._method(inputs)


def load_runtime_method(pte: bytes | str) -> RuntimeMethod:
    """Load a program in the ExecuTorch runtime (not eager), with the quantized kernels registered."""
    return RuntimeMethod(pte)
