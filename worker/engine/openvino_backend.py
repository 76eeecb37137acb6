"""The OpenVINO backend (the ``embedfleet[openvino]`` extra): the bundle's FP32 graph compiled by
the ``openvino`` runtime, which reads the ONNX file itself, in BF16 where the CPU computes BF16
natively (AVX-512 BF16 or AMX) and in FP32 elsewhere.

It serves as the variant ``openvino``. Its vectors differ from ONNX Runtime's FP32 ones (BF16
matmuls; other kernels), so it has a serving fingerprint of its own, which names the precision:
a BF16 worker and an FP32 one never share cached vectors (and a fleet serves one of them). The
runtime works on AMD CPUs too, unlike ONNX Runtime's OpenVINO execution provider, which lists no
device there.

``OpenVinoSession`` offers the three calls of ``onnxruntime.InferenceSession`` that the engine
makes (``get_inputs``, ``get_outputs``, ``run``), so ``worker.engine.embedder`` runs it as it
runs an ONNX Runtime session. A compiled model is shared by threads; an infer request is not,
so each thread has its own.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from worker.engine.cpu import CpuInfo
from worker.engine.errors import EngineError

OPENVINO_VARIANT = "openvino"
Precision = Literal["bf16", "f32"]
# Where OpenVINO's CPU plugin computes BF16 in hardware; elsewhere it would run FP32 anyway.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_precision(cpu: CpuInfo) -> Precision:
    return "bf16" if any(flag in cpu.flags for flag in BF16_FLAGS) else "f32"


@dataclass(frozen=True, slots=True)
class Port:
    name: str


class OpenVinoSession:
    """An ONNX file compiled for the CPU by OpenVINO, run like an ONNX Runtime session."""

    def __init__(self, model_path: Path, *, threads: int, precision: Precision, streams: int = 1) -> None:
        try:
            import openvino
        except ImportError:
            raise EngineError(
                "variant openvino needs the openvino runtime: pip install 'embedfleet[openvino]'"
            ) from None
        self.precision = precision
        self.version = openvino.__version__.split("-")[0]
        core = openvino.Core()
        self._compiled = core.compile_model(
            str(model_path),
            "CPU",
            {
                # ``threads`` per call and one stream per call made side by side (the worker's
                # inference threads), as ONNX Runtime's sessions are shared by those threads.
                "INFERENCE_NUM_THREADS": threads * streams,
                "NUM_STREAMS": streams,
                "INFERENCE_PRECISION_HINT": precision,
            },
        )
        self._inputs = [Port(port.any_name) for port in self._compiled.inputs]
        self._outputs = [Port(port.any_name) for port in self._compiled.outputs]
        self._local = threading.local()

    def get_inputs(self) -> list[Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[Port]:
        return list(self._outputs)

    def run(
        self, output_names: Sequence[str], feeds: Mapping[str, np.ndarray], run_options: Any = None
    ) -> list[np.ndarray]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        results = request.infer(dict(feeds))
        by_name = {port.any_name: value for port, value in results.items()}
        # The request's output buffers are reused by its next call: copy what is returned.
        return [np.array(by_name[name], dtype=np.float32, copy=True) for name in output_names]
