"""`OnnxProgram`: an exported decoder (`moepass.export_onnx`) run by onnxruntime's CPU provider, with
the same `step`/`generate` interface as the PyTorch program."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from moepass.errors import MoepassError
from moepass.ir.generation import StepGeneration, check_prompt
from moepass.ir.program import ProgramInfo

from .export import LOGITS_TO_KEEP, MANIFEST_FILE, MODEL_FILE

# the oldest onnxruntime that runs every export (pyproject's floor): 1.20-1.23 lack MoE's
# `swiglu_fusion`, QMoE's zero points and int8 MatMulNBits, and fail to load or on the first step
OLDEST_ONNXRUNTIME = (1, 30)
# exports with int8 activations set QMoE's `accuracy_level`, an attribute 1.30 does not know
OLDEST_FOR_INT8_ACTIVATIONS = (1, 31)


class OnnxProgram(StepGeneration):
    """An exported moepass decoder in an onnxruntime session (threads: torch's current setting)."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        path = Path(path)
        if not (path / MODEL_FILE).is_file() or not (path / MANIFEST_FILE).is_file():
            raise MoepassError(
                f"{path} is not an exported moepass ONNX directory (needs {MODEL_FILE} and {MANIFEST_FILE}; "
                "write one with `moepass export-onnx`)"
            )
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
            if manifest.get("format") != "moepass-onnx" or manifest.get("version") != 1:
                raise MoepassError(
                    f"{path / MANIFEST_FILE}: format {manifest.get('format')!r} version "
                    f"{manifest.get('version')!r} is not a moepass ONNX manifest of version 1"
                )
            self.info = ProgramInfo(**manifest["info"])
            self.input_names, self.output_names = manifest["inputs"], manifest["outputs"]
            self._parameters = int(manifest.get("parameters", 0))  # exports before it was recorded: 0
            self.int8_activations = bool(manifest.get("int8_activations", False))
        except (ValueError, TypeError, KeyError, AttributeError) as error:  # JSON errors are ValueErrors
            raise MoepassError(
                f"{path / MANIFEST_FILE} is damaged or from another moepass "
                f"({type(error).__name__}: {error}); export the model again"
            ) from None
        version = tuple(int(part) for part in ort.__version__.split(".")[:2])
        if version < OLDEST_ONNXRUNTIME:
            oldest = ".".join(map(str, OLDEST_ONNXRUNTIME))
            raise MoepassError(
                f"onnxruntime {ort.__version__} is older than {oldest}, the oldest that runs moepass "
                f"exports (their MoE, QMoE and MatMulNBits contrib ops); pip install 'onnxruntime>={oldest}'"
            )
        if self.int8_activations and version < OLDEST_FOR_INT8_ACTIVATIONS:
            oldest = ".".join(map(str, OLDEST_FOR_INT8_ACTIVATIONS))
            raise MoepassError(
                f"{path} was exported with int8 activations, which onnxruntime {ort.__version__} cannot "
                f"run (QMoE's accuracy_level came in {oldest}); pip install 'onnxruntime>={oldest}', or "
                "export again without int8 activations"
            )
        self.path = path
        # exports before this input existed compute every position's logits, cut here instead
        self._keeps_logits = LOGITS_TO_KEEP in manifest.get("optional_inputs", {})
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # errors only while loading: onnxruntime warns on every load that `logits_to_keep` has a
        # default (an initializer), which is what makes that input optional; runs warn as usual
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(path / MODEL_FILE), options, providers=["CPUExecutionProvider"]
            )
        except Exception as error:  # onnxruntime's own error types (InvalidProtobuf, Fail, ...)
            raise MoepassError(
                f"{path / MODEL_FILE} does not load in onnxruntime {ort.__version__} "
                f"({type(error).__name__}: {str(error).strip()[:300]}); export the model again"
            ) from None
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 2
        self._cache_shapes = {
            i.name: (i.shape[1], i.shape[3], i.type)
            for i in self.session.get_inputs()
            if i.name.startswith("past_")
        }
        # ids, mask and positions are int64 in the graph; the PyTorch program also takes int32/bool
        self._feed_dtypes = [np.int64] * 3 + [getattr(np, self.info.dtype)] * len(self.cache_names)

    @property
    def cache_names(self) -> list[str]:
        return self.input_names[3:]

    def empty_cache(self, batch_size: int) -> list[Tensor]:
        dtype = getattr(torch, self.info.dtype)
        return [
            torch.empty(batch_size, self._cache_shapes[n][0], 0, self._cache_shapes[n][1], dtype=dtype)
            for n in self.cache_names
        ]

    def step(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        past: list[Tensor],
        *,
        last_token_only: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """One decoder step in onnxruntime (the contract of `MoEProgram.step`)."""
        self.check_step(input_ids, attention_mask, position_ids, past)
        tensors = (input_ids, attention_mask, position_ids, *past)
        feeds = {
            name: np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=dtype)
            for name, tensor, dtype in zip(self.input_names, tensors, self._feed_dtypes, strict=True)
        }
        if last_token_only and self._keeps_logits:
            feeds[LOGITS_TO_KEEP] = np.array(1, dtype=np.int64)
        outputs = [
            torch.from_numpy(array) for array in self.session.run(self.output_names, feeds, self._run_options)
        ]
        logits = outputs[0][:, -1:] if last_token_only else outputs[0]
        return logits, outputs[1:]

    def weight_sizes(self) -> tuple[int, int]:
        """(parameters, bytes) as `moepass.evaluate.model_size` reports them: the exported program's
        logical parameter count, and the bytes of the ONNX files: the weights as stored, plus the graph."""
        stored = sum(f.stat().st_size for f in self.path.iterdir() if f.suffix in (".onnx", ".data"))
        return self._parameters, stored

    def __call__(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits [batch, seq, vocab] of a full sequence."""
        check_prompt(input_ids, attention_mask)  # the shapes, before unpacking them; step checks the ids
        batch, seq = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = torch.arange(seq).expand(batch, -1)
        return self.step(input_ids, mask, positions, self.empty_cache(batch))[0]
