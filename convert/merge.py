"""Streaming LoRA merge: W' = W + scaling * B @ A, in float32, one block of rows at a time.

Base weights are read from the memory-mapped safetensors shards (safetensors.safe_open + get_slice), so
only one block of one tensor (<= `block_bytes` of float32) plus that module's small A and B factors are
ever in anonymous memory. A 3B model (151936 x 2048 embedding) merges in a few hundred MB.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Iterator

import numpy as np

from qwen_local.convert.adapter import LoraDelta, MergePlan, TensorSource

BLOCK_BYTES = 64 << 20  # float32 bytes per block


def lora_delta_rows(a, b, scaling: float, r0: int, r1: int, kind: str = "linear", fan_in_fan_out: bool = False):
    """Rows r0:r1 of the LoRA update, as a float32 torch tensor shaped like the base weight.

    linear:        A (r, in), B (out, r); delta = scaling * B @ A, shape (out, in)
    linear + fifo: the base weight is stored (in, out) (GPT-2 Conv1D style); delta = scaling * (B @ A)^T
    embedding:     A (r, vocab), B (hidden, r); delta = scaling * (B @ A)^T, shape (vocab, hidden)
    """
    if kind == "embedding" or fan_in_fan_out:
        return (a[:, r0:r1].t() @ b.t()) * scaling
    return (b[r0:r1] @ a) * scaling


class Merger:
    """Opens the base shards and the adapter once; yields merged float32 row blocks per tensor."""

    def __init__(self, plan: MergePlan, block_bytes: int = BLOCK_BYTES):
        from safetensors import safe_open

        self.plan = plan
        self.block_bytes = block_bytes
        self._stack = ExitStack()
        self._files: dict[Path, object] = {}
        self._safe_open = safe_open

    def _file(self, path: Path):
        f = self._files.get(path)
        if f is None:
            f = self._stack.enter_context(self._safe_open(str(path), framework="pt"))
            self._files[path] = f
        return f

    def close(self) -> None:
        self._stack.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _factor(self, key: str):
        return self._file(self.plan.adapter_file).get_tensor(key).float()

    def blocks(self, src: TensorSource) -> Iterator[np.ndarray]:
        """The merged tensor as consecutive float32 row blocks (C-contiguous numpy arrays)."""
        import torch

        if src.adapter_key is not None:
            sl = self._file(self.plan.adapter_file).get_slice(src.adapter_key)
        else:
            sl = self._file(self.plan.base_shards[src.base_key]).get_slice(src.base_key)
        shape = src.shape
        if len(shape) == 1:
            yield np.ascontiguousarray(sl[:].float().numpy())
            return
        cols = int(np.prod(shape[1:]))
        rows_per_block = max(1, self.block_bytes // (4 * cols))
        d: LoraDelta | None = src.lora
        a = b = None
        if d is not None:
            a, b = self._factor(d.a_key), self._factor(d.b_key)
        with torch.no_grad():
            for r0 in range(0, shape[0], rows_per_block):
                r1 = min(shape[0], r0 + rows_per_block)
                w = sl[r0:r1].float()
                if d is not None:
                    w = w + lora_delta_rows(a, b, d.scaling, r0, r1, d.kind, d.fan_in_fan_out)
                yield np.ascontiguousarray(w.numpy())
                del w


def merge_to_state_dict(plan: MergePlan) -> dict:
    """Whole merged model as float32 torch tensors: for tests on tiny models only (holds everything)."""
    import torch

    out = {}
    with Merger(plan) as m:
        for name, src in plan.tensors.items():
            out[name] = torch.from_numpy(np.concatenate(list(m.blocks(src)), axis=0)).reshape(src.shape)
    return out
