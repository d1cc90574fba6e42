"""HF checkpoint folders in and out: config.json + model.safetensors (or sharded with model.safetensors.index.json).

``load_hf`` reads Qwen2 (and Llama: no q/k/v bias) folders written by transformers; ``save_hf`` writes folders that
``transformers.AutoModelForCausalLM.from_pretrained`` loads as Qwen2ForCausalLM (LlamaForCausalLM without bias),
with the file modes any new file gets (safetensors itself writes 0600, which a server running as another user
cannot read).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..configtools import ConfigError
from .config import from_hf_config, to_hf_config
from .transformer import Transformer

_LAYER_RENAMES = {  # ours (inside layers.{i}.) -> HF (inside model.layers.{i}.)
    "attn_norm.": "input_layernorm.",
    "mlp_norm.": "post_attention_layernorm.",
    "attn.": "self_attn.",
    "mlp.": "mlp.",
}
_IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")  # older checkpoints saved the RoPE buffer; we rebuild it


def to_hf_name(name: str) -> str:
    """Our parameter name -> the HF Qwen2 tensor name."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return name
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        for ours, theirs in _LAYER_RENAMES.items():
            if m.group(2).startswith(ours):
                return f"model.layers.{m.group(1)}.{theirs}{m.group(2)[len(ours):]}"
    raise KeyError(f"no HF name for parameter {name}")


def _dtype_from_name(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"unknown dtype {name!r}")
    return dtype


def _tensor_files(path: str) -> dict[str, str]:
    """HF tensor name -> safetensors file that holds it."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json "
                            f"(.bin checkpoints are not read: convert them with transformers' save_pretrained)")


def _check_tensor(hf_name: str, file: str, tensor: torch.Tensor, param: torch.Tensor,
                  allow_nonfinite: bool) -> None:
    """Refuse a tensor that is not floating point, and one whose values (as read, or once cast to the model's
    dtype) are not all finite unless ``allow_nonfinite``: either would train or serve garbage without a word."""
    if not tensor.dtype.is_floating_point:
        raise ConfigError(f"tensor {hf_name} in {file} has dtype {tensor.dtype}, not a floating-point dtype: the "
                          f"file is not a model's weights, or was written wrongly; re-export it (save_pretrained)")
    if allow_nonfinite:
        return
    bad = int(param.numel() - torch.isfinite(param).sum())
    if bad:
        read = int(tensor.numel() - torch.isfinite(tensor).sum())
        why = (f"{read} non-finite values (NaN/inf) of {tensor.numel()}" if read else
               f"{bad} values that {param.dtype} cannot hold (they overflow from {tensor.dtype} to inf); load it in "
               f"a wider dtype (dtype=torch.bfloat16 or torch.float32), or")
        raise ConfigError(f"tensor {hf_name} in {file} has {why}{': a diverged or corrupt checkpoint;' if read else ''}"
                          f" pass allow_nonfinite=True (convert --allow-nonfinite) to load it anyway")


def load_hf(path: str, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
            allow_nonfinite: bool = False, **config_overrides) -> Transformer:
    """Build a Transformer from an HF Qwen2/Llama folder. dtype (floating point) defaults to the config's
    torch_dtype (else fp32); ``config_overrides`` replace ModelConfig fields (e.g. ``rope_theta=5e6``). Tensors
    that are not floating point are refused, and so are NaN/inf values unless ``allow_nonfinite``."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: load_hf wants a folder with config.json and safetensors")
    with open(config_path) as f:
        hf_config = json.load(f)
    config = dataclasses.replace(from_hf_config(hf_config), **config_overrides)
    if dtype is None:
        dtype = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    dtype = _dtype_from_name(dtype) if isinstance(dtype, str) else dtype
    if not dtype.is_floating_point:
        raise ConfigError(f"load_hf: dtype {dtype} is not a floating dtype: use float32, bfloat16 or float16")

    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    model.to(dtype)
    params = dict(model.named_parameters())  # tied lm_head appears under embed.weight only
    expected = {to_hf_name(n): n for n in params}
    files = _tensor_files(path)

    tied = config.tie_word_embeddings
    unexpected = [n for n in files if n not in expected and not _IGNORED_HF.match(n)
                  and not (tied and n == "lm_head.weight")]
    missing = [n for n in expected if n not in files]
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not match the config: missing tensors {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}; unexpected tensors {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    by_file: dict[str, list[str]] = {}
    for hf_name in expected:
        by_file.setdefault(files[hf_name], []).append(hf_name)
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as f:
                for hf_name in names:
                    param = params[expected[hf_name]]
                    tensor = f.get_tensor(hf_name)
                    if tensor.shape != param.shape:
                        raise ConfigError(f"tensor {hf_name} in {os.path.basename(file)} has shape "
                                         f"{tuple(tensor.shape)}, the config expects {tuple(param.shape)}")
                    param.copy_(tensor)
                    _check_tensor(hf_name, file, tensor, param, allow_nonfinite)
    return model


def _plain_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 under the usual 022)."""
    mask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return 0o666 & ~mask


def save_hf(model: Transformer, path: str, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 5 * 2**30) -> None:
    """Write ``model`` as an HF folder (config.json + safetensors, sharded above ``max_shard_bytes``); every file
    gets the umask's plain mode (``_plain_mode``), as the other files of the folder."""
    os.makedirs(path, exist_ok=True)
    for old in os.listdir(path):  # a previous save's shards would otherwise mix with this one's
        if old.startswith("model") and (old.endswith(".safetensors") or old.endswith(".safetensors.index.json")):
            os.remove(os.path.join(path, old))
    tensors = {}
    for name, param in model.named_parameters():  # tied weights appear once (embed.weight)
        t = param.detach()
        tensors[to_hf_name(name)] = (t.to(dtype) if dtype is not None else t).contiguous().cpu()
    dtype_name = str(next(iter(tensors.values())).dtype).replace("torch.", "")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    meta = {"format": "pt"}
    mode = _plain_mode()
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata=meta)
        os.chmod(os.path.join(path, "model.safetensors"), mode)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(path, file), metadata=meta)
            os.chmod(os.path.join(path, file), mode)
            weight_map.update({name: file for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(to_hf_config(model.config, dtype_name), f, indent=2)
