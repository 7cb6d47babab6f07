"""Hugging Face folder -> Megatron ``torch_dist`` checkpoint that ``pretrain_moc.py``/``finetune_moc.py`` load.

Two sources:

- an exported MoC folder (``model_type: moc``): every tensor maps back through the same table as export,
  so export -> import -> export is bit-exact;
- a dense Llama, Mistral, Qwen2 or Qwen3 model (``families.py`` says what maps to what and what is refused),
  given the ``--moc-*`` flags of the memory to add: the backbone is copied, the memory layers are new
  (Megatron's initialisation, ``W_O = 0``), so the model computes what the dense one did until it trains.

The embedding and output layer get zero rows up to Megatron's padded vocabulary; export drops them again.

The checkpoint is written as iteration 0 (weights only, no optimizer or RNG state) by building the
model in this one process and saving its ``sharded_state_dict``. megatron stores global tensors, so the
checkpoint loads at any TP/PP/EP layout; ``--tensor-model-parallel-size`` etc. are checked against the
model here and fix the vocabulary padding (``--make-vocab-size-divisible-by`` x TP) the training run
will expect.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field

import torch

from moc_megatron.checkpoint.layout import checkpoint_name, write_tracker
from moc_megatron.checkpoint.model_config import build_model_config, model_record, saved_flags
from moc_megatron.checkpoint.weights import save_weights_checkpoint
from moc_megatron.config import MoCConfig
from moc_megatron.config_flags import add_moc_config_flags, flag_name, moc_config_kwargs
from moc_megatron.data.tokenizer_record import TokenizerRecord, record_for
from moc_megatron.errors import MoCError
from moc_megatron.hf import names
from moc_megatron.hf.export import staging_folder
from moc_megatron.hf.families import UnsupportedSourceError, backbone_from_dense
from moc_megatron.hf.hf_tokenizer import RECORD_FILE
from moc_megatron.model.builder import ModelSettings, pad_vocab_size

SEED = 1234
"""Seed of the new memory of a dense import (``pretrain_moc.py``'s ``--seed`` default)."""


class ImportError_(MoCError, RuntimeError):
    """The Hugging Face folder cannot be imported as asked."""


@dataclass
class ImportOptions:
    """What ``convert_checkpoint.py import`` was asked to do."""

    hf: str
    save: str
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    moc_flags: list[str] = field(default_factory=list)
    """``--moc-*`` flags (dense import: the memory to add)."""
    make_vocab_size_divisible_by: int = 128


def read_hf_config(folder: str) -> dict:
    """``config.json`` of ``folder``."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ImportError_(f"--hf {folder}: no config.json (not a Hugging Face model folder)")
    with open(path) as f:
        return json.load(f)


def _dense_as_moc(cfg: dict) -> dict:
    """The MoC ``config.json`` fields of a dense source config (memory fields come from flags)."""
    try:
        return backbone_from_dense(cfg)
    except UnsupportedSourceError as exc:
        raise ImportError_(str(exc)) from exc


def _rotary_base(config: dict) -> int:
    theta = config["rope_parameters"]["rope_theta"]
    if float(theta) != int(theta):
        raise ImportError_(f"rope_theta {theta} is not an integer (--rotary-base takes integers)")
    return int(theta)


def model_settings_from_hf(config: dict, vocab_size: int) -> ModelSettings:
    """The ``ModelSettings`` of a MoC ``config.json`` with ``vocab_size`` embedding rows."""
    rope = config["rope_parameters"]
    scaled = rope.get("rope_type", "default") == "llama3"
    return ModelSettings(vocab_size=vocab_size, max_sequence_length=config["max_position_embeddings"],
                         tie_embeddings=bool(config["tie_word_embeddings"]), rotary_base=_rotary_base(config),
                         rope_scaling=scaled, rope_scaling_factor=float(rope["factor"]) if scaled else 8.0)


def _flag(name: str, value) -> list[str]:
    """``--name value`` as the command line spells it (on/off flags: present or not)."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag] if value else []
    if isinstance(value, list):
        return [flag, *(str(v) for v in value)]
    return [flag, repr(value) if isinstance(value, float) else str(value)]


def training_flags(config: dict, opts: ImportOptions, vocab_size: int) -> list[str]:
    """The ``pretrain_moc.py`` flags of the model ``config`` describes (memory flags not included), printed
    after an import so that training continues with the same model."""
    fields = names.model_fields_from_hf({k: v for k, v in config.items() if k != "memory_layers"})
    settings = model_settings_from_hf(config, vocab_size)
    flags = [*_flag("num_layers", fields["num_layers"]), *_flag("hidden_size", fields["hidden_size"]),
             *_flag("ffn_hidden_size", fields["ffn_hidden_size"]),
             *_flag("num_attention_heads", fields["num_attention_heads"]),
             *_flag("num_query_groups", fields["num_query_groups"]), *_flag("kv_channels", fields["kv_channels"]),
             "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
             *_flag("norm_epsilon", fields["layernorm_epsilon"]),
             *_flag("max_position_embeddings", settings.max_sequence_length),
             *_flag("seq_length", min(settings.max_sequence_length, 4096)),
             *_flag("rotary_base", settings.rotary_base), *_flag("vocab_size", vocab_size),
             *_flag("make_vocab_size_divisible_by", opts.make_vocab_size_divisible_by),
             *_flag("init_method_std", fields.get("init_method_std", 0.02))]
    if fields["num_query_groups"] != fields["num_attention_heads"]:
        flags.append("--group-query-attention")
    flags += _flag("add_qkv_bias", bool(fields.get("add_qkv_bias"))) + _flag("qk_layernorm",
                                                                              bool(fields.get("qk_layernorm")))
    if settings.rope_scaling:
        flags += ["--use-rope-scaling", *_flag("rope_scaling_factor", settings.rope_scaling_factor)]
    if not settings.tie_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    if config.get("reset_attention_mask"):
        flags.append("--reset-attention-mask")
    return flags


def memory_flags(fields: dict) -> list[str]:
    """``--moc-*`` flags of a model's memory fields (none without memory layers)."""
    if not fields.get("moc_memory_layers"):
        return []
    flags = []
    for name in names.HF_MEMORY_FIELDS.values():
        if name == "moc_shared_bank":
            flags.append(flag_name(name) if fields[name] else "--no-moc-shared-bank")
        elif name in fields:
            flags += _flag(name, fields[name])
    return [*_flag("moc_memory_layers", list(fields["moc_memory_layers"])), *flags]


class _FlagError(argparse.ArgumentParser):
    def error(self, message: str):
        raise ImportError_(f"bad --moc-* flags for this model: {message}")


def memory_fields_from_flags(flags: list[str]) -> dict:
    """The ``moc_`` fields that ``--moc-*`` command-line flags set (dense import: the memory to add)."""
    parser = _FlagError(prog="convert_checkpoint.py import", add_help=False, allow_abbrev=False)
    add_moc_config_flags(parser)
    parsed, rest = parser.parse_known_args(flags)
    if rest:
        raise ImportError_(f"bad --moc-* flags for this model: unrecognized {' '.join(rest)}")
    return moc_config_kwargs(vars(parsed))


class _SafetensorsFolder:
    """Tensor-by-tensor reads from a (sharded) safetensors folder."""

    def __init__(self, folder: str) -> None:
        from safetensors import safe_open

        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(folder, "model.safetensors")):
            with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ImportError_(f"--hf {folder}: no model.safetensors(.index.json)")
        for file in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(folder, file)):
                raise ImportError_(f"--hf {folder}: shard {file} is missing")
        self.folder, self.weight_map = folder, weight_map
        self._open = safe_open

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ImportError_(f"--hf {self.folder}: no tensor {name!r}")
        try:
            with self._open(os.path.join(self.folder, self.weight_map[name]), "pt") as f:
                return f.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            raise ImportError_(f"--hf {self.folder}: cannot read {name!r} from {self.weight_map[name]}: {exc}") from exc


@dataclass
class _Source:
    """What the Hugging Face folder holds: its config (as MoC ``config.json`` fields), tensors and tokenizer."""

    config: dict
    dense: bool
    model_type: str | None
    tensors: _SafetensorsFolder
    record: TokenizerRecord | None


@dataclass
class _Target:
    """The Megatron model the checkpoint is written for."""

    fields: dict
    """``MoCConfig`` fields (backbone and memory)."""
    settings: ModelSettings
    """With the vocabulary padded as the training run at the requested layout will pad it."""
    config: MoCConfig
    """At the requested layout (checked here; the signature is layout-free)."""
    hf_view: dict
    """The Hugging Face ``config.json`` of the model (the parameter plan is read from it)."""
    saved_args: dict
    """The flags stored with the checkpoint (the model's, and the true vocabulary)."""


def _read_source(opts: ImportOptions, log) -> _Source:
    """Read the folder's config, tensor index and tokenizer; a dense model's backbone as MoC fields."""
    source = read_hf_config(opts.hf)
    dense = source.get("model_type") != "moc"
    record = hf_tokenizer_record(opts.hf)
    if dense:
        if not any(f.startswith("--moc-memory-layers") for f in opts.moc_flags):
            raise ImportError_(f"--hf {opts.hf} is a dense {source.get('model_type')!r} model: give "
                               "--moc-memory-layers (and the other --moc-* flags) for the memory to add")
        config = _dense_as_moc(source)
        rows = config["vocab_size"]
        config["vocab_size"] = _dense_vocabulary(rows, record, opts.hf)
        if config["vocab_size"] < rows:
            log(f"[import] {opts.hf}: the tokenizer has {config['vocab_size']} tokens, the model {rows} embedding "
                "rows; the rows no token reaches are dropped (Megatron pads the tokenizer's vocabulary)")
    else:
        if opts.moc_flags:
            raise ImportError_("--moc-* flags are only for a dense model; a MoC folder keeps its own memory")
        config = dict(source)
    return _Source(config, dense, source.get("model_type"), _SafetensorsFolder(opts.hf), record)


def _target(source: _Source, opts: ImportOptions) -> _Target:
    """The model's fields and settings, checked against the requested layout."""
    fields = names.model_fields_from_hf(source.config)
    fields.setdefault("moc_bank_seed", SEED)
    if source.dense:
        fields.update(memory_fields_from_flags(opts.moc_flags))
    vocab = source.config["vocab_size"]
    tp, pp, ep = opts.tensor_model_parallel_size, opts.pipeline_model_parallel_size, opts.expert_model_parallel_size
    settings = model_settings_from_hf(source.config, pad_vocab_size(vocab, opts.make_vocab_size_divisible_by, tp))
    try:
        if fields["num_layers"] % pp:
            raise ValueError(f"--num-layers {fields['num_layers']} is not divisible by --pipeline-model-parallel-size "
                             f"{pp}")
        config = build_model_config(fields, dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                                  expert_model_parallel_size=ep))
    except ValueError as exc:
        raise ImportError_(f"the model does not fit the requested layout or memory: {exc}") from exc
    fields = model_record(config, settings)["config"]  # every field, with MoCConfig's defaults and derivations
    hf_view = dict(source.config)
    if source.dense:
        hf_view.update(names.hf_config_from_model(fields, dataclasses.asdict(settings)), vocab_size=vocab)
    saved = saved_flags(fields, settings, vocab_size=vocab, seq_length=min(settings.max_sequence_length, 4096),
                        make_vocab_size_divisible_by=opts.make_vocab_size_divisible_by, seed=SEED,
                        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep)
    return _Target(fields, settings, config, hf_view, saved)


def _build_model(target: _Target) -> torch.nn.Module:
    """The model in this one process (layout-free global tensors), freshly initialised."""
    from moc_megatron import platform
    from moc_megatron.model.builder import build_model

    platform.initialize_distributed()
    torch.manual_seed(SEED)
    return build_model(build_model_config(target.fields), target.settings)


def _copy_weights(source: _Source, target: _Target, model: torch.nn.Module) -> tuple[dict, int]:
    """Copy every source tensor into the model's sharded state dict (new memory keeps its initialisation);
    returns the state dict and how many Megatron tensors were copied."""
    plan = names.parameter_plan(target.hf_view, target.settings.vocab_size)  # zero rows pad the vocabulary
    sharded = model.sharded_state_dict()
    by_key = {getattr(v, "key", None): v for v in sharded.values()}
    copied = 0
    for key, entries in names.group_by_key(plan):
        data = by_key.get(key)
        if data is None and torch.Size(names.megatron_shape(entries)).numel() == 0:
            continue  # zero-size (no shared chapters): not part of a Megatron checkpoint
        if data is None:
            raise ImportError_(f"internal: the Megatron model has no checkpoint key {key!r}")
        if source.dense and any(_is_memory(e.hf_name) for e in entries):
            continue  # new memory: keep Megatron's initialisation (W_O = 0)
        value = names.fuse({e.hf_name: _rows(source.tensors.get(e.hf_name), e) for e in entries}, entries,
                           target.hf_view)
        if tuple(value.shape) != tuple(data.data.shape):
            raise ImportError_(f"{entries[0].hf_name}: shape {list(value.shape)}, the model needs "
                               f"{list(data.data.shape)}")
        with torch.no_grad():
            data.data.copy_(value.to(data.data.dtype))
        copied += 1
    untied = not source.config.get("tie_word_embeddings", False)
    if source.dense and untied and "lm_head.weight" not in source.tensors.weight_map:
        raise ImportError_(f"--hf {source.tensors.folder}: untied model without lm_head.weight")
    return sharded, copied


def _publish(save: str, sharded: dict, target: _Target, record: TokenizerRecord | None) -> None:
    """Write ``iter_0000000`` and the tracker into a hidden staging folder, then rename it to ``save``."""
    staging = staging_folder(save)
    shutil.rmtree(staging, ignore_errors=True)
    path = os.path.join(staging, checkpoint_name(0))
    os.makedirs(path)
    save_weights_checkpoint({"model": sharded}, target.config, target.settings, path, target.saved_args, record)
    write_tracker(staging, 0)
    os.rename(staging, save)


def import_checkpoint(opts: ImportOptions, log=print) -> str:
    """Write the Megatron checkpoint folder ``opts.save`` (``iter_0000000`` + tracker); return it.

    Read the folder, derive the model's configuration, build the model, copy the weights, publish.
    """
    if os.path.exists(opts.save):
        raise ImportError_(f"--save {opts.save} already exists; remove it or choose another folder")
    source = _read_source(opts, log)
    target = _target(source, opts)
    model = _build_model(target)
    sharded, copied = _copy_weights(source, target, model)
    _publish(opts.save, sharded, target, source.record)
    new = f", memory layers {target.fields['moc_memory_layers']} new (W_O = 0)" if source.dense else ""
    log(f"[import] {opts.hf} -> {opts.save}/iter_0000000: {copied} tensors copied{new}")
    log("[import] train or finetune it with these model flags:\n  " + " ".join(
        training_flags(source.config, opts, source.config["vocab_size"]) + memory_flags(target.fields)))
    return opts.save


def _dense_vocabulary(rows: int, record: TokenizerRecord | None, folder: str) -> int:
    """The vocabulary of a dense model: its tokenizer's (the folder's ``tokenizer.json``) when the model has more
    embedding rows than the tokenizer has tokens (Qwen2.5: 151665 tokens, 151936 rows), else its rows."""
    if record is None or record.vocab_size == rows:
        return rows
    if record.vocab_size > rows:
        raise ImportError_(f"--hf {folder}: the tokenizer has {record.vocab_size} tokens but the model only {rows} "
                           "embedding rows (vocab_size)")
    return record.vocab_size


def _rows(tensor: torch.Tensor, entry: names.Entry) -> torch.Tensor:
    """The first rows of a source embedding or LM head whose model has more rows than its tokenizer has tokens."""
    if entry.hf_name in ("model.embed_tokens.weight", "lm_head.weight") and tensor.shape[0] > entry.shape[0]:
        return tensor[: entry.shape[0]]
    return tensor


def _is_memory(hf_name: str) -> bool:
    return ".memory." in hf_name or ".memory_layernorm." in hf_name or hf_name.startswith("model.memory_bank.")


def hf_tokenizer_record(folder: str) -> TokenizerRecord | None:
    """The tokenizer an imported checkpoint records: the exported checkpoint's own (``tokenizer_record.json``),
    else the folder's ``tokenizer.json`` as a ``HuggingFaceTokenizer``, else none."""
    path = os.path.join(folder, RECORD_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return TokenizerRecord.from_dict(json.load(f))
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return record_for("HuggingFaceTokenizer", folder)
    return None
