"""The verified path of a conversion, step by step, each timed: the peft reference computes the
logit-parity prompts and is freed; llama.cpp runs the reference passes on the float file
(labels, imatrix, teacher); the fidelity step quantizes (the default search, or the type asked
for); the written file's logit parity against peft decides whether it is published."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from qwen_local.convert.floats import short_of_disk, write_lora_pair, write_merged
from qwen_local.runtime.errors import UserError


class Verified:
    def __init__(self, plan, profile, threads: int, log, progress: bool, timings: dict):
        self.plan, self.profile, self.threads = plan, profile, threads
        self.log, self.progress, self.timings = log, progress, timings

    def run(self, first: Path, dst: Path, out: Path, reference_dtype: str | None, data,
            use_imatrix: bool, quantize: dict) -> tuple[dict, dict]:
        """(task fidelity, logit parity): the peft reference is loaded, serves the parity prompts
        and is freed before llama.cpp runs the reference passes and the candidates."""
        reference, parity_ref = self.reference(reference_dtype)
        prep = self.reference_passes(reference, first, data, use_imatrix)
        del reference
        fid = self.quantize(prep, first, dst, use_imatrix=use_imatrix, **quantize)
        lora = Path(fid["lora"]["file"]) if fid.get("lora") else None
        return fid, self.parity(parity_ref, dst, fid["quant"], out, lora)

    def reference(self, reference_dtype: str | None):
        """(the peft reference, its logit-parity side): peft in torch serves only the parity
        prompts, then is freed; its tokenizer stays."""
        from qwen_local.convert.fidelity.parity import reference_side

        t = time.perf_counter()
        # streamed from the shards: one block in memory at a time, so float32 fits at any size
        dtype = reference_dtype or "float32"
        reference = load_reference(self.plan, dtype, self.threads, self.log, self.profile)
        self.timings["reference_load"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        try:
            parity_ref = reference_side(reference, self.log)
        finally:
            reference.release()
        self.timings["parity_reference"] = round(time.perf_counter() - t, 2)
        return reference, parity_ref

    def reference_passes(self, reference, first: Path, data, use_imatrix: bool):
        """Labels, imatrix and teacher: llama.cpp on the f16 intermediate (or the float output)."""
        from qwen_local.convert.fidelity.calibration import prepare

        t = time.perf_counter()
        prep = prepare(reference, first, data=data, imatrix=use_imatrix, log=self.log,
                       progress=self.progress, cfg=self.profile, threads=self.threads)
        self.timings["reference_passes"] = round(time.perf_counter() - t, 2)
        return prep

    def quantize(self, prep, first: Path, dst: Path, *, quant: str, inter, auto: bool, mix,
                 use_imatrix: bool, min_agreement: float, max_size: float | None,
                 frontier: bool) -> dict:
        from qwen_local.convert import lora_file
        from qwen_local.convert.fidelity.check import finish
        from qwen_local.convert.fidelity.search import Sources
        from qwen_local.convert.quantize import split_lora

        t = time.perf_counter()
        if inter and not auto:
            self.log(f"quantizing to {quant}{' with the imatrix' if use_imatrix else ''}"
                     f"{' and --keep types' if mix else ''} ({self.threads} threads) ...")
        folder = first.parent
        apart = split_lora(quant)[1]
        carried = (auto or apart) and bool(lora_file.split(self.plan)[1])
        sources = Sources(
            first, f32=(lambda: self.f32_intermediate(folder / "model-f32.gguf")) if auto else None,
            lora=(lambda: self.lora_pair(folder, inter if apart else "f16")) if carried else None)
        fid = finish(prep, sources, dst, quant, min_agreement=min_agreement, max_size=max_size,
                     threads=self.threads, use_imatrix=use_imatrix, keep=mix, log=self.log,
                     progress=self.progress, frontier=frontier)
        if inter:
            for name in (first.name, "model-f32.gguf", "base-f16.gguf", "base-f32.gguf",
                         "base.lora.gguf"):
                (folder / name).unlink(missing_ok=True)
        self.timings["quantize_fidelity"] = round(time.perf_counter() - t, 2)
        return fid

    def f32_intermediate(self, path: Path) -> Path | None:
        """auto's q8_0-based candidates are quantized from f32, as --quant q8_0 is: the merge runs
        again into `path`, once the search gets that far. Without the disk for it (the f32 next to
        the f16, the provisional choice and a q8_0 candidate) they come from the f16, and the log
        says so."""
        short = short_of_disk(self.plan, path.parent, "f32", "q8_0")
        if short:
            self.log(f"not enough free disk for an f32 intermediate ({short}): q8_0 and the mix "
                     "are quantized from the f16")
            return None
        self.log("merging again into an f32 intermediate: q8_0 and the mix are quantized from it")
        write_merged(self.plan, path, "f32", "auto", self.profile, self.threads, self.progress,
                     self.timings, timing="merge_export_f32")
        return path

    def lora_pair(self, folder: Path, base_type: str) -> tuple[Path, Path]:
        """The LoRA kept apart: the base in base_type (every change but the blocks' LoRA merged)
        and the LoRA file, written when first wanted."""
        self.log(f"writing the base without the blocks' LoRA ({base_type}) and the LoRA file, to "
                 "keep the LoRA apart ...")
        return write_lora_pair(self.plan, folder, self.profile, self.threads, self.progress,
                               self.timings, base_type)

    def parity(self, parity_ref, gguf: Path, quant: str, out: Path, lora: Path | None) -> dict:
        """The logit parity of the written file (with its LoRA file); a failure publishes nothing."""
        from qwen_local.convert.fidelity.parity import check_gguf

        t = time.perf_counter()
        figures = check_gguf(parity_ref, gguf, quant, self.threads, self.log, lora=lora)
        self.timings["verify"] = round(time.perf_counter() - t, 2)
        if not figures["passed"]:
            raise UserError(f"verification failed ({'; '.join(figures['failures'])}): "
                            f"{out.name} was not written")
        return figures


def load_reference(plan, dtype: str, threads: int, log: Callable[[str], None], profile=None):
    """The fp reference (peft, unmerged LoRA: it follows the trained forward and shares no code
    with our merge), quietly."""
    import warnings

    from transformers.utils import logging as hf_logging

    from qwen_local.convert.fidelity.peft_model import Reference

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    log(f"reference: peft {dtype} (base + unmerged adapter), streamed from the base's shards ...")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Reference(plan.base_dir, plan.adapter_dir, cfg=profile, dtype=dtype, merge=False,
                             threads=threads, stream=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load the fp reference: {e}") from None
