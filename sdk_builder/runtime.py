"""Loading and running a `.pte` in the ExecuTorch runtime (the same C++ runtime the phones use).

Used by the client, `verify`, the golden replay and the build-time checks; it knows nothing about
exporting.

The runtime is reached through its C++ extension module (`executorch.extension.pybindings._C`)
directly: the documented wrappers (`executorch.runtime`, `...pybindings.portable_lib`) import
`executorch.exir` for one warning class, and that pulls in the whole export stack (several
seconds of start-up for `rank`, `verify` and `inspect`). The extension links against libtorch's
Python bindings, so torch itself must be imported first (the wrappers do the same).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import sys
from pathlib import Path


@functools.cache
def _extension():
    import torch  # noqa: F401  (loads libtorch_python.so, which the extension links against)

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
