"""Hugging Face Qwen2 / Qwen3 (dense) checkpoints in and out, without ``transformers``.

A checkpoint directory holds ``config.json``, the weights as ``model.safetensors`` or as shards listed in
``model.safetensors.index.json``, and the tokenizer files. :func:`load_model` checks every tensor name and shape
against the model before reading any weight (so a bad checkpoint fails whole, with nothing half-loaded), then
reads one tensor at a time into a model built on the meta device: peak memory is the model plus one tensor.
:func:`save_model` writes the same format, so a trained checkpoint opens in ``transformers`` and vLLM unchanged.

Every file is written under a temporary name, flushed to the disk and renamed (:func:`atomic_write`). A training
checkpoint is such a directory and more: nanotorl/training_checkpoint.py.
"""
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from nanotorl import dist
from nanotorl.cli import read_json
from nanotorl.model import Qwen2, Qwen2Config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "special_tokens_map.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old exports wrote; we recompute them


@dataclass(frozen=True)
class Family:
    """What a supported ``model_type`` means for :class:`Qwen2Config`: its switches and transformers' class."""
    architecture: str
    qkv_bias: bool
    qk_norm: bool
    head_dim: int | None  # transformers' default when config.json has none (None: hidden_size // heads)


FAMILIES = {"qwen2": Family("Qwen2ForCausalLM", qkv_bias=True, qk_norm=False, head_dim=None),
            "qwen3": Family("Qwen3ForCausalLM", qkv_bias=False, qk_norm=True, head_dim=128)}
SUPPORTED = "model_type 'qwen2' (Qwen2ForCausalLM: Qwen2, Qwen2.5) or 'qwen3' (Qwen3ForCausalLM: Qwen3 dense)"
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads")
HF_DEFAULTS = {"max_position_embeddings": 32768, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": False}  # transformers' own, for keys a config.json leaves out
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def hf_name(name: str) -> str:
    """Our parameter name -> Hugging Face's (``model.`` prefix on everything but the LM head)."""
    return name if name.startswith("lm_head.") else "model." + name


def load_config(path) -> Qwen2Config:
    """Read ``config.json`` of a Qwen2/Qwen2.5 or Qwen3 dense checkpoint; refuse anything else, naming it."""
    file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory; expected a Hugging Face Qwen2/Qwen3 directory "
                                f"(config.json, *.safetensors, tokenizer.json): check --model")
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: a checkpoint directory needs config.json "
                                f"(Hugging Face Qwen2/Qwen3 format)")
    raw = read_json(file)
    family = _family(raw, file)
    _check_supported(raw, file)
    missing = [k for k in SHAPE_KEYS if raw.get(k) is None]
    if missing:
        raise ValueError(f"{file}: config.json lacks {missing}; a Hugging Face Qwen config sets all of "
                         f"{list(SHAPE_KEYS)}")
    fields = {k: raw[k] for k in SHAPE_KEYS} | {k: raw.get(k, v) for k, v in HF_DEFAULTS.items()}
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" not in raw and "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    head_dim = raw.get("head_dim") or family.head_dim
    return Qwen2Config(**fields, head_dim=head_dim, qkv_bias=family.qkv_bias, qk_norm=family.qk_norm)


def _family(raw: dict, file: Path) -> Family:
    """The supported family of a config.json, or an error that says what was found and what is supported."""
    archs, model_type = raw.get("architectures") or [], raw.get("model_type")
    experts = {k: raw[k] for k in EXPERT_KEYS if raw.get(k)}
    if experts or "moe" in str(model_type).lower():
        raise ValueError(f"{file}: mixture-of-experts models are not supported (found model_type={model_type!r}, "
                         f"architectures={archs}, {experts}); nanotorl supports dense models: {SUPPORTED}")
    family = FAMILIES.get(model_type)
    if family is None or (archs and family.architecture not in archs):
        raise ValueError(f"{file}: expected {SUPPORTED}, found model_type={model_type!r}, architectures={archs}")
    return family


def _check_supported(raw: dict, file: Path) -> None:
    """Refuse the options of a supported family that the model does not implement."""
    sliding = [t for t in raw.get("layer_types") or [] if t != "full_attention"]
    if raw.get("use_sliding_window") or sliding:
        raise ValueError(f"{file}: sliding-window attention is not supported (found use_sliding_window="
                         f"{raw.get('use_sliding_window')}, sliding_window={raw.get('sliding_window')}, layer types "
                         f"{sorted(set(sliding))}); nanotorl attends over the whole context: set use_sliding_window "
                         f"to false if the model was trained with full attention")
    for key in ("rope_scaling", "rope_parameters"):
        rope = raw.get(key) or {}
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind != "default":
            raise ValueError(f"{file}: {key} of type {kind!r} ({rope}) is not supported; supported: the default "
                             f"RoPE (rope_scaling null, or rope_type 'default')")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{file}: hidden_act {raw['hidden_act']!r} is not supported; supported: 'silu'")
    if raw.get("attention_bias"):
        raise ValueError(f"{file}: attention_bias true (biased q/k/v/o projections in Qwen3) is not supported; "
                         f"supported: Qwen3 dense without attention biases, as released")


def checkpoint_dtype(path) -> torch.dtype | None:
    """The dtype a checkpoint declares in config.json (``torch_dtype`` or ``dtype``), if any."""
    raw = read_json(Path(path) / "config.json")
    return DTYPES.get(raw.get("torch_dtype") or raw.get("dtype"))


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: expected {{\"weight_map\": {{tensor name: shard file}}}}, found no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json")


def _listing(names, limit=10) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_model(path, dtype: torch.dtype | None = None, device="cpu", vocab: int | None = None) -> Qwen2:
    """Build a :class:`Qwen2` from a Hugging Face checkpoint directory.

    ``dtype`` defaults to the checkpoint's own. ``vocab``: the tokenizer's size; ids past it get no logit
    (:attr:`Qwen2.vocab`), and a tokenizer with more ids than the embedding has rows is refused. Raises
    ``FileNotFoundError`` for missing files and ``ValueError`` naming the offending tensors for missing, unexpected
    or wrongly shaped weights.
    """
    path = Path(path)
    cfg = load_config(path)
    if vocab is not None and vocab > cfg.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {vocab} ids but the model's embedding has {cfg.vocab_size} rows "
                         f"(config.json vocab_size); use the tokenizer that belongs to this checkpoint")
    dtype = dtype or checkpoint_dtype(path) or torch.float32
    with torch.device("meta"):
        model = Qwen2(cfg)
    expected = {hf_name(n): (n, tuple(p.shape)) for n, p in model.named_parameters()}

    files, found = _weight_files(path), {}
    for file in files:
        with _open_weights(file) as f:
            for key in f.keys():
                if not key.endswith(IGNORED_SUFFIXES):
                    found[key] = (file, tuple(f.get_slice(key).get_shape()))
    if cfg.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # tied: the head is the embedding, as transformers does
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match its config: missing tensors [{_listing(missing)}]; "
                         f"unexpected tensors [{_listing(unexpected)}]")
    for key, (_, shape) in expected.items():
        if found[key][1] != shape:
            raise ValueError(f"checkpoint {path}: tensor {key} has shape {list(found[key][1])}, "
                             f"the config implies {list(shape)}")

    for file in files:
        with _open_weights(file) as f:
            for key in f.keys():
                if key in expected:
                    name = expected[key][0]
                    module, _, attr = name.rpartition(".")
                    try:
                        tensor = f.get_tensor(key).to(device=device, dtype=dtype)
                    except SafetensorError as e:
                        raise ValueError(f"{file}: tensor {key} cannot be read ({e}); the file is damaged") from None
                    model.get_submodule(module)._parameters[attr] = nn.Parameter(tensor)
    model.vocab = vocab or cfg.vocab_size
    return model


def _open_weights(file: Path):
    """``safe_open`` of a weights file, or a ValueError naming it when it is not a safetensors file."""
    try:
        return safe_open(file, framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def config_to_hf(cfg: Qwen2Config, dtype: torch.dtype) -> dict:
    """``config.json`` content that transformers (v4 and v5) and vLLM read as Qwen2 or Qwen3 (after the switches)."""
    model_type = next((name for name, f in FAMILIES.items() if (f.qkv_bias, f.qk_norm) == (cfg.qkv_bias, cfg.qk_norm)),
                      None)
    if model_type is None:
        raise ValueError(f"qkv_bias={cfg.qkv_bias} with qk_norm={cfg.qk_norm} is neither Qwen2 (biases, no q/k norm) "
                         f"nor Qwen3 (q/k norm, no biases): no Hugging Face class could load it")
    name = {v: k for k, v in DTYPES.items()}[dtype]
    raw = {"architectures": [FAMILIES[model_type].architecture], "model_type": model_type, "hidden_act": "silu",
           "torch_dtype": name, "dtype": name, "use_sliding_window": False, "attention_dropout": 0.0,
           "rope_scaling": None}
    raw.update({k: getattr(cfg, k) for k in SHAPE_KEYS + tuple(HF_DEFAULTS)})
    if model_type == "qwen3" or cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        raw["head_dim"] = cfg.head_dim
    if model_type == "qwen3":
        raw["attention_bias"] = False
    return raw


def atomic_write(file: Path, write) -> None:
    tmp = file.with_name(file.name + ".tmp")
    write(tmp)
    fsync(tmp)
    os.replace(tmp, file)


def fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory: its entries) to the disk, so a power loss cannot undo it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_safetensors(file: Path, tensors: dict, rank: int) -> None:
    """One safetensors file, streamed: the header from the tensors' (global) shapes, then each tensor's bytes as
    :func:`nanotorl.dist.full_tensor` gathers it, so only one whole tensor exists at a time. Every rank calls it
    (the gathers are collective, and go on when rank 0's write fails, so no rank waits forever); rank 0 writes
    ``<file>.tmp``, flushes it to the disk and renames it, or raises what failed once every tensor went by."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset,
                                                                                                      offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    tmp = file.with_name(file.name + ".tmp")
    out, failed = (open(tmp, "wb") if rank == 0 else None), None
    for t in [None, *tensors.values()]:
        whole = None if t is None else dist.full_tensor(t)
        if out is not None and failed is None:
            try:
                out.write(len(raw).to_bytes(8, "little") + raw if t is None else
                          whole.contiguous().reshape(-1).view(torch.uint8).numpy())
            except OSError as e:
                failed = e
    if out is not None:
        try:
            out.close()
        except OSError as e:
            failed = failed or e
    if failed:
        raise failed
    if rank == 0:
        fsync(tmp)
        os.replace(tmp, file)


def save_state_dict(state_dict: dict, cfg: Qwen2Config, path, tokenizer_dir=None,
                    shard_bytes: int = 4 << 30, eos_ids: list[int] | None = None, rank: int = 0) -> None:
    """Write our ``state_dict`` (model names) as a Hugging Face checkpoint in ``path``.

    Tensors are grouped into shards of at most ``shard_bytes`` (one ``model.safetensors`` when it all fits).
    Each file is written to a temporary name and renamed, so a crash never leaves a torn file behind.
    ``eos_ids`` (the tokenizer's) become config.json's ``eos_token_id``: one id, or the list when there are several.
    A sharded model's ``state_dict`` (DTensors) is streamed tensor by tensor: every rank calls this, rank 0 writes.
    """
    path = Path(path)
    tensors = {hf_name(n): t.detach() for n, t in state_dict.items()}
    dtype = next(iter(tensors.values())).dtype
    shards, size = [{}], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        for stale in ("model.safetensors", "model.safetensors.index.json"):
            (path / stale).unlink(missing_ok=True)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _write_safetensors(path / name, shard, rank)
    if rank != 0:
        return
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write(path / "model.safetensors.index.json", lambda f: f.write_text(json.dumps(index, indent=2)))
    raw = config_to_hf(cfg, dtype)
    if eos_ids:
        raw["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else list(eos_ids)
    atomic_write(path / "config.json", lambda f: f.write_text(json.dumps(raw, indent=2)))
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != path.resolve():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                atomic_write(path / name, lambda f, n=name: shutil.copyfile(Path(tokenizer_dir) / n, f))


def save_model(model: Qwen2, path, tokenizer_dir=None, **kwargs) -> None:
    """Save a (non-sharded) model; see :func:`save_state_dict`."""
    save_state_dict(model.state_dict(), model.cfg, path, tokenizer_dir=tokenizer_dir, **kwargs)
