"""The fp reference without the fp model in memory: peft's own model and forward (unmerged LoRA),
with the base weights left in the memory-mapped safetensors shards and loaded block by block, only
while each block runs. The convert pipeline's parity reference then holds one block and the logits
in anonymous memory instead of the whole model, at any model size.
"""
from __future__ import annotations

import json
from pathlib import Path

class _Weights:
    """Base tensors read on demand from the memory-mapped safetensors shards."""

    def __init__(self, base: Path):
        import contextlib

        from safetensors import safe_open

        index = base / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                 else sorted(p.name for p in base.glob("*.safetensors")))
        self._stack = contextlib.ExitStack()
        self.where: dict[str, object] = {}
        for name in files:
            f = self._stack.enter_context(safe_open(str(base / name), framework="pt"))
            for k in f.keys():
                self.where[k] = f

    def key(self, name: str) -> str:
        if name not in self.where and name == "lm_head.weight":
            return "model.embed_tokens.weight"   # tied: the checkpoint holds the embedding only
        return name

    def get(self, name: str, dtype):
        return self.where[self.key(name)].get_tensor(self.key(name)).to(dtype)

    def rows(self, name: str, start: int, stop: int, dtype):
        return self.where[self.key(name)].get_slice(self.key(name))[start:stop].to(dtype)

    def close(self) -> None:
        self._stack.close()


_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "modules_to_save")
HEAD_ROWS = 8192  # vocabulary rows of the output projection per matmul (64 MB at hidden 2048, f32)


def streamed_peft_model(base: Path, adapter: Path | None, dtype):
    """peft's model (unmerged LoRA, peft's own layers and forward) whose base weights stay in the
    memory-mapped shards: the model is built on the meta device, the adapter's (small) weights
    are loaded by peft, and each top-level block gets its base weights just before it runs and
    drops them right after. An embedding or output projection that the adapter leaves alone is
    computed from the shards directly (rows looked up; the vocabulary projection in slices), so
    the 0.3B-parameter vocabulary matrices of a 3B model are never whole in memory."""
    import torch

    model = _meta_model(base, dtype)
    weights = _Weights(base)
    if adapter is not None:
        model = _with_adapter(model, adapter, weights)
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    prefix = {id(p): n for n, p in model.named_parameters()}
    units = _units(lm)
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    if type(emb) is torch.nn.Embedding:
        _embed_from_shards(emb, weights, _base_key(prefix[id(emb.weight)]))
    elif emb is not None:
        units.append(emb)
    if type(head) is torch.nn.Linear and head.bias is None:
        _project_from_shards(head, weights, _base_key(prefix[id(head.weight)]))
    elif head is not None:
        units.append(head)
    load, drop = _block_hooks(weights, prefix)
    for unit in units:
        unit.register_forward_pre_hook(load)
        unit.register_forward_hook(drop)
    model._qwen_local_weights = weights
    return model


def _meta_model(base: Path, dtype):
    """The base architecture on the meta device (no weights), with its init-time buffers (rotary
    inv_freq) computed for real."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, mod in list(model.named_modules()):
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, type(mod)(config=config))
    return model


def _base_key(full: str) -> str:
    """The checkpoint name of a parameter of the (peft-wrapped) model."""
    parts = [x for x in full.split(".") if x not in ("base_layer", "original_module")]
    if parts[:2] == ["base_model", "model"]:
        parts = parts[2:]
    return ".".join(parts)


def _with_adapter(model, adapter: Path, weights: _Weights):
    """peft's model over the meta base, with the adapter's own weights loaded for real."""
    import torch
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    model = PeftModel(model, LoraConfig.from_pretrained(adapter))
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in _ADAPTER_PARTS:
            mod.to_empty(device="cpu")
    # vectors (biases, norms) are small: load them now, so that trained biases (bias="all")
    # land on real tensors when peft loads the adapter over them
    for name, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta and p.ndim < 2:
                mod._parameters[pname] = torch.nn.Parameter(
                    weights.get(_base_key(f"{name}.{pname}"), p.dtype), requires_grad=False)
    result = set_peft_model_state_dict(model, load_file(str(adapter / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise ValueError(f"adapter tensors peft did not place: {result.unexpected_keys[:3]}")
    return model


def _units(lm) -> list:
    """The blocks that load their base weights around their forward: each decoder layer, and any
    other module holding base weights itself (the final norm)."""
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    covered = set()
    for m in list(lm.model.layers) + [emb, head]:
        covered |= set(m.modules()) if m is not None else set()
    return list(lm.model.layers) + [m for m in lm.modules() if m not in covered
                                    and any(p.is_meta for p in m.parameters(recurse=False))]


def _block_hooks(weights: _Weights, prefix: dict):
    """(pre-hook, hook): give a block its base weights just before it runs, take them back after."""
    import torch

    def load(mod, args):  # noqa: ARG001
        mod._qwen_local_meta = {}
        for sub in mod.modules():
            for pname, p in list(sub._parameters.items()):
                if p is not None and p.is_meta:
                    mod._qwen_local_meta[(sub, pname)] = p
                    sub._parameters[pname] = torch.nn.Parameter(
                        weights.get(_base_key(prefix[id(p)]), p.dtype), requires_grad=False)

    def drop(mod, args, output):  # noqa: ARG001
        for (sub, pname), p in mod._qwen_local_meta.items():
            sub._parameters[pname] = p
        mod._qwen_local_meta = {}

    return load, drop


def _embed_from_shards(emb, weights: _Weights, key: str) -> None:
    """Embedding lookups read only the rows they need from the shards."""
    import types

    import torch

    def embed(self, ids):
        uniq, inv = torch.unique(ids, return_inverse=True)
        table = torch.cat([weights.rows(key, int(t), int(t) + 1, self.weight.dtype) for t in uniq])
        return table[inv]
    emb.forward = types.MethodType(embed, emb)


def _project_from_shards(head, weights: _Weights, key: str) -> None:
    """The vocabulary projection in slices of HEAD_ROWS rows read from the shards."""
    import types

    import torch

    def project(self, x):
        n = self.weight.shape[0]
        return torch.cat([torch.nn.functional.linear(x, weights.rows(key, a, min(a + HEAD_ROWS, n),
                                                                      self.weight.dtype))
                          for a in range(0, n, HEAD_ROWS)], dim=-1)
    head.forward = types.MethodType(project, head)
