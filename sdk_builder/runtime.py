"""Loading and running a `.pte` in the ExecuTorch runtime (the same C++ runtime the phones use).

Used by the client, `verify`, the golden replay and the build-time checks; it knows nothing about
exporting.
"""

from __future__ import annotations

import torch


class RuntimeMethod:
    """`forward` of a program loaded in the ExecuTorch runtime. Keeps the program's bytes alive:
    the runtime reads them in place, so a temporary buffer would be freed under it."""

    def __init__(self, pte: bytes | str) -> None:
        import executorch.kernels.quantized  # noqa: F401  (registers quantized_decomposed kernels)
        from executorch.runtime import Runtime

        self._source = pte
        self._program = Runtime.get().load_program(pte)
        self._method = self._program.load_method("forward")

    def execute(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self._method.execute(inputs)


def load_runtime_method(pte: bytes | str) -> RuntimeMethod:
    """Load a program in the ExecuTorch runtime (not eager), with the quantized kernels registered."""
    return RuntimeMethod(pte)
