"""Importance matrix from the user's own queries: in llama.cpp on the f16 GGUF (GGMLCollector, the
eval callback; what the convert pipeline uses), or with forward hooks on a torch reference
(`collect`, the yardstick the tests hold the first one to).

What llama.cpp wants (read from llama-quant.cpp and tools/quantize, llama-cpp-python 0.3.36):
- `llama_model_quantize_params.imatrix` points to an array of `llama_model_imatrix_data
  {name, data, size}` terminated by an entry whose name is NULL;
- `name` is the full GGUF tensor name ("blk.0.attn_q.weight"), looked up exactly;
- `data` holds one float per input column (ne[0]) of that weight: the *mean* of the squared input
  activations over the tokens seen (llama-quantize divides the imatrix tool's sums by the counts
  before handing them over); a size that differs from ne[0] aborts the quantization, non-finite
  values too;
- tensors without an entry are quantized without one.

The torch collector: a forward hook on every nn.Linear of the reference (LoRA's own A/B layers excluded; an unmerged
PEFT layer is hooked at its base layer, which sees the same input) adds up x² per input channel and
counts rows, over the calibration queries rendered in the exact intent prompt and reply prompt of
runtime.profile. HF module names map to GGUF names with gguf-py's Qwen2 tensor map. With tied
embeddings the output projection is token_embd.weight in the GGUF (and output.weight if an exporter
writes the duplicate), so lm_head's statistics are given under both names.

`collect()` also returns the reference's label distributions for the queries, which it computes on
the way: the same forward passes serve the fidelity check.
"""
from __future__ import annotations

import ctypes
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_local.runtime import labels as labels_mod
from qwen_local.runtime.profile import Profile

from qwen_local.convert.fidelity.peft_model import SAMPLE_PRODUCTS


def hf_to_gguf_names(hf_name: str, n_layers: int, tied: bool) -> list[str]:
    """GGUF tensor names fed by the HF linear module `hf_name` (several for a tied lm_head)."""
    import gguf

    name = _normalize(hf_name)
    if name == "lm_head":
        return ["output.weight", "token_embd.weight"] if tied else ["output.weight"]
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, n_layers)
    mapped = tmap.get_name(name + ".weight", try_suffixes=(".weight",))
    if mapped is None:
        raise KeyError(f"no GGUF tensor for HF module {hf_name!r}")
    return [mapped]


def _normalize(name: str) -> str:
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    parts = name.split(".")
    if "modules_to_save" in parts:  # unmerged PEFT: lm_head.modules_to_save.default -> lm_head
        parts = parts[: parts.index("modules_to_save")]
    if parts and parts[-1] == "base_layer":
        parts = parts[:-1]
    return ".".join(parts)


def quantizable_linears(model) -> list[tuple[str, object]]:
    """(name, module) of every nn.Linear whose weight reaches the GGUF (LoRA A/B layers excluded)."""
    import torch

    out = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        parts = name.split(".")
        if any(x.startswith("lora_") for x in parts) or "original_module" in parts:
            continue  # LoRA's own factors, or the inactive copy of a modules_to_save layer
        out.append((name, mod))
    return out


@dataclass
class Imatrix:
    """Per GGUF tensor: summed squared inputs per input channel and the rows that went in."""
    sums: dict[str, np.ndarray]
    counts: dict[str, int]
    n_prompts: int = 0
    ref_probs: list[dict] = field(default_factory=list)   # reference label distributions, per query

    def means(self) -> dict[str, np.ndarray]:
        """What llama_model_quantize reads: float32 mean of x² per input column."""
        return {k: (v / max(self.counts[k], 1)).astype(np.float32) for k, v in self.sums.items()
                if self.counts[k] > 0}

    @property
    def n_tokens(self) -> int:
        return max(self.counts.values(), default=0)

    def save(self, path: str | Path) -> Path:
        """An .npz with the sums and counts (reload with `Imatrix.load`)."""
        path = Path(path)
        arrays = {f"sum:{k}": v for k, v in self.sums.items()}
        arrays["__meta__"] = np.frombuffer(json.dumps(
            {"counts": self.counts, "n_prompts": self.n_prompts}).encode(), dtype=np.uint8)
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Imatrix":
        with np.load(path) as z:
            meta = json.loads(bytes(z["__meta__"]).decode())
            sums = {k[4:]: z[k].astype(np.float64) for k in z.files if k.startswith("sum:")}
        return cls(sums=sums, counts={k: int(v) for k, v in meta["counts"].items()},
                   n_prompts=int(meta["n_prompts"]))


class _Hooks:
    def __init__(self, reference):
        self.sums: dict[str, "object"] = {}
        self.counts: dict[str, int] = {}
        self.names: dict[str, list[str]] = {}
        self._handles = []
        for name, mod in quantizable_linears(reference.model):
            self.names[name] = hf_to_gguf_names(name, reference.n_layers, reference.tied)
            self._handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name: str):
        import torch

        def fn(module, inputs, output):  # noqa: ARG001
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            s = (x * x).sum(dim=0)
            if name in self.sums:
                self.sums[name] += s
            else:
                self.sums[name] = s
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]
        return fn

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def result(self) -> tuple[dict, dict]:
        sums, counts = {}, {}
        for name, gnames in self.names.items():
            if name not in self.sums:
                continue
            for g in gnames:
                sums[g] = self.sums[name].numpy().copy()
                counts[g] = self.counts[name]
        return sums, counts


def calibration_prompts(cfg: Profile, query: str, label: str):
    """The two prompts a query produces in serving: the intent prompt and the reply prompt."""

    products = SAMPLE_PRODUCTS if label == "fashion" else None
    return cfg.intent_prompt(query), cfg.reply_prompt(query, label, bool(products), products)


def collect(reference, queries: Sequence[str], cfg: Profile | None = None, *,
            labels: Sequence[str | None] | None = None, reply: bool = True,
            reply_limit: int | None = None, progress: Callable | None = None) -> Imatrix:
    """Run every query through the reference in the intent format and (reply=True) the reply
    format, with hooks summing squared linear inputs. The reply prompt uses the query's gold label
    when given, else the reference's own decision; reply_limit caps how many queries also get the
    (longer, costlier) reply prompt, spread over the whole set. Returns the statistics under GGUF names plus
    the reference's label distributions for the queries (in order)."""
    cfg = cfg or reference.cfg
    labels = list(labels) if labels is not None else [None] * len(queries)
    hooks = _Hooks(reference)
    reference.forget_prefixes()  # a system prefix cached before hooking would go uncounted
    probs_out = []
    n = len(queries)
    n_reply = n if reply_limit is None else max(0, min(int(reply_limit), n))
    with_reply = {int(i * n / n_reply) for i in range(n_reply)} if reply and n_reply else set()
    try:
        items = list(zip(queries, labels))
        it = progress(items) if progress else items
        for i, (q, gold) in enumerate(it):
            p_intent, _ = calibration_prompts(cfg, q, "fashion")
            probs = labels_mod.label_probs(reference.last_logits(p_intent), reference.groups)
            probs_out.append(probs)
            if i in with_reply:
                lab = gold if gold is not None else labels_mod.decide(probs)
                _, p_reply = calibration_prompts(cfg, q, lab)
                reference.last_logits(p_reply)
    finally:
        hooks.remove()
        reference.forget_prefixes()
    sums, counts = hooks.result()
    return Imatrix(sums=sums, counts=counts, n_prompts=len(queries) + len(with_reply),
                   ref_probs=probs_out)


def as_quantize_param(stats: Imatrix | dict[str, np.ndarray],
                      gguf_path: str | Path | None = None) -> dict[str, np.ndarray]:
    """The `imatrix=` argument of convert.quantize.quantize: {GGUF tensor name: float32 means}.

    (convert.quantize builds the NULL-terminated llama_model_imatrix_data array from it and keeps
    the buffers alive during llama_model_quantize.) With gguf_path, only names of tensors in that
    file are kept, and the tied-output alias token_embd.weight is dropped when the file has its
    own output.weight. Rejects non-finite values early, since llama.cpp would abort on them.
    """
    means = stats.means() if isinstance(stats, Imatrix) else {
        k: np.ascontiguousarray(v, dtype=np.float32) for k, v in stats.items()}
    if gguf_path is not None:
        from qwen_local.runtime.gguf_file import read_header

        present = {n for n, *_ in read_header(gguf_path).tensors}
        if "output.weight" in present:
            means.pop("token_embd.weight", None)
        means = {k: v for k, v in means.items() if k in present}
    for k, v in means.items():
        if v.ndim != 1 or not np.all(np.isfinite(v)):
            raise ValueError(f"imatrix entry {k} is not a finite 1-D vector")
    return means


# ---------------------------------------------------------------------- llama.cpp side (cb_eval)

class _GGMLTensor(ctypes.Structure):
    """struct ggml_tensor of the ggml vendored by llama-cpp-python 0.3.36 (ggml/include/ggml.h:
    GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64, GGML_MAX_SRC 10, GGML_MAX_NAME 64)."""


_GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GGMLTensor) * 10),
    ("view_src", ctypes.POINTER(_GGMLTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


def _ggml():
    """libggml-base of llama-cpp-python, with the few functions the collector calls."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_op_name.restype, lib.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    lib.ggml_backend_buffer_is_host.restype = ctypes.c_bool
    lib.ggml_backend_buffer_is_host.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                            ctypes.c_size_t]
    lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    lib.ggml_tensor_overhead.restype = ctypes.c_size_t
    return lib


class GGMLCollector:
    """The importance matrix as llama.cpp's imatrix tool collects it, from a llama.cpp context's
    eval callback: for every matrix multiply whose first operand is a weight (blk.N.*.weight, or
    the output projection: output.weight, or token_embd.weight when tied), add the squares of the
    second operand (the activations) per input column, and count its rows (tokens).

    Unlike the tool, batches of fewer than 16 tokens are kept (every calibration token counts, as
    in the torch collector), and the output projection is always collected. Pass `callback` as
    runtime.engine.Engine(eval_callback=...); set `enabled` to choose which decodes count.
    (MUL_MAT_ID, the experts' multiply, does not occur in Qwen2 and is refused loudly.)"""

    def __init__(self):
        import llama_cpp

        lib = _ggml()
        # the layout above must be this ggml's: ggml_tensor_overhead() is the struct's size plus
        # the 32-byte ggml_object header in front of it
        if lib.ggml_tensor_overhead() != ctypes.sizeof(_GGMLTensor) + 32:
            raise RuntimeError("this llama.cpp's struct ggml_tensor differs from the one mapped here")
        # op numbers move between ggml versions: look them up by name
        ops = {lib.ggml_op_name(i): i for i in range(120) if lib.ggml_op_name(i)}
        self._mul_mat, self._mul_mat_id = ops[b"MUL_MAT"], ops[b"MUL_MAT_ID"]
        self._lib = lib
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.enabled = True
        self.error: BaseException | None = None
        self._names: dict[int, str | None] = {}   # weight tensor address -> GGUF name or None
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_node)

    def _weight_name(self, src0) -> str | None:
        addr = ctypes.addressof(src0.contents)
        if addr not in self._names:
            name = src0.contents.name.decode("utf-8", "replace")
            if "#" in name:  # a copy made for another backend: "<backend>#<name>#<n>"
                name = name.split("#")[1]
            ok = name.startswith("blk.") or name in ("output.weight", "token_embd.weight")
            self._names[addr] = name if ok and name.endswith(".weight") else None
        return self._names[addr]

    def _on_node(self, t_ptr, ask, user_data):  # noqa: ARG002
        try:
            t = _GGMLTensor.from_address(t_ptr)
            if t.op == self._mul_mat_id:
                if ask:
                    return self.enabled
                raise NotImplementedError("MUL_MAT_ID (mixture of experts) is not collected")
            if t.op != self._mul_mat or not t.src[0] or not t.src[1]:
                return False
            name = self._weight_name(t.src[0])
            if name is None or not self.enabled:
                return False
            src1 = t.src[1].contents
            if ask:
                return src1.type == 0  # GGML_TYPE_F32; llama.cpp's activations always are
            self._add(name, src1, ctypes.cast(t.src[1], ctypes.c_void_p).value)
            return True
        except BaseException as e:  # never let an exception cross into C; report after decode
            self.error = self.error or e
            return False

    def _add(self, name: str, src1, src1_ptr: int) -> None:
        ne = tuple(src1.ne)
        nb = tuple(src1.nb)
        if nb[0] != 4:
            raise ValueError(f"{name}: activations with element stride {nb[0]}")
        extent = sum((n - 1) * s for n, s in zip(ne, nb)) + 4
        if self._lib.ggml_backend_buffer_is_host(src1.buffer):
            buf = (ctypes.c_char * extent).from_address(src1.data)
        else:  # device memory (Metal, CUDA): copy the tensor's bytes out first
            buf = ctypes.create_string_buffer(extent)
            self._lib.ggml_backend_tensor_get(src1_ptr, buf, 0, extent)
        raw = np.frombuffer(buf, dtype=np.float32, count=extent // 4)
        x = np.lib.stride_tricks.as_strided(raw, shape=ne[::-1], strides=nb[::-1], writeable=False)
        x = x.reshape(-1, ne[0])  # a copy only when the rows are not evenly strided
        s = np.einsum("ij,ij->j", x, x, dtype=np.float64)
        if name in self.sums:
            self.sums[name] += s
            self.counts[name] += x.shape[0]
        else:
            self.sums[name], self.counts[name] = s, x.shape[0]

    def check(self) -> None:
        """Raise the first error met inside the callback (it cannot raise into llama.cpp)."""
        if self.error is not None:
            raise RuntimeError(f"imatrix collection failed: {self.error}") from self.error

    def result(self, n_prompts: int = 0, ref_probs: list[dict] | None = None) -> Imatrix:
        self.check()
        return Imatrix(sums={k: v.copy() for k, v in self.sums.items()}, counts=dict(self.counts),
                       n_prompts=n_prompts, ref_probs=list(ref_probs or []))

