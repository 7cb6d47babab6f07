"""Megatron ``torch_dist`` checkpoint (any TP/PP/EP/VPP layout) -> Hugging Face MoC folder.

Everything is checked before anything is written (model shape, shard files, tokenizer); the folder is
built under a hidden ``.NAME.partial`` sibling and renamed to its final name at the very end, so an
interrupted export leaves nothing that looks complete. Tensors are read one Megatron key at a time
and each safetensors shard is written as soon as it is full: peak memory is about one shard plus the
largest tensor.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import torch

from moc_megatron.checkpoint.model_config import ModelRecordError, read_model_record
from moc_megatron.data.tokenizer_record import record_from_checkpoint_state
from moc_megatron.errors import MoCError
from moc_megatron.hf import names
from moc_megatron.hf.dist_reader import DistCheckpointReader, resolve_checkpoint
from moc_megatron.hf.hf_tokenizer import (
    TokenizerSpec,
    check_tokenizer,
    check_vocab_pads_to,
    end_of_turn_id,
    true_vocabulary,
    write_tokenizer,
)
from moc_megatron.hf.shard_writer import ShardWriter, parse_size, plan_shards

MODEL_FILES = ("configuration_moc.py", "modeling_moc.py")
AUTO_MAP = {
    "AutoConfig": "configuration_moc.MoCConfig",
    "AutoModel": "modeling_moc.MoCModel",
    "AutoModelForCausalLM": "modeling_moc.MoCForCausalLM",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ExportError(MoCError, RuntimeError):
    """The checkpoint cannot be exported as asked (message says what and where)."""


@dataclass
class ExportOptions:
    """What ``convert_checkpoint.py export`` was asked to do."""

    load: str
    output: str
    iteration: int | None = None
    tokenizer_model: str | None = None
    tokenizer_type: str | None = None
    dtype: str = "fp32"
    max_shard_size: str = "5GB"
    vocab_size: int | None = None
    """The true vocabulary (default: the tokenizer's, or the saving run's ``--vocab-size`` without one)."""
    keep_padded_vocab: bool = False
    """Export Megatron's padded vocabulary (``--make-vocab-size-divisible-by`` rows) instead of the true one."""


def staging_folder(output: str) -> str:
    """Hidden sibling of ``output`` that an export or import writes into before renaming it."""
    parent, name = os.path.split(os.path.abspath(output.rstrip("/")))
    return os.path.join(parent, f".{name}.partial")


def _locate(reader: DistCheckpointReader, key: str) -> str | None:
    """``key`` as stored: the local spec's norm key or Transformer Engine's."""
    if reader.shape(key) is not None:
        return key
    for local, te in names.NORM_KEY_ALTERNATIVES.items():
        if key.endswith(local):
            alt = key[: len(key) - len(local)] + te
            if reader.shape(alt) is not None:
                return alt
    return None


def _check_shapes(reader: DistCheckpointReader, groups, config: dict) -> dict[str, str]:
    """Stored key of every planned Megatron tensor (None for a zero-size one, which is never stored); raises
    if one is missing, misshapen or left over."""
    stored, problems = {}, []
    for key, entries in groups:
        where = _locate(reader, key)
        want = names.megatron_shape(entries)
        if where is None and torch.Size(want).numel() == 0:
            stored[key] = None  # zero-size (no shared chapters): never in a Megatron checkpoint
            continue
        if where is None:
            problems.append(f"  {key}: missing (expected shape {list(want)})")
            continue
        if reader.shape(where) != want:
            problems.append(f"  {where}: shape {list(reader.shape(where))}, the model needs {list(want)}")
        stored[key] = where
    used = set(stored.values())
    extra = [k for k in reader.tensors if not k.startswith("optimizer") and k not in used]
    problems += [f"  {k}: in the checkpoint but not part of the model (would be dropped)" for k in sorted(extra)]
    if problems:
        raise ExportError(f"checkpoint {reader.path} does not match the model its signature describes:\n"
                          + "\n".join(problems[:20]))
    return stored


def export_checkpoint(opts: ExportOptions, log=print) -> str:
    """Write the Hugging Face folder ``opts.output``; return its path."""
    start = time.time()
    if os.path.exists(opts.output):
        raise ExportError(f"--output {opts.output} already exists; remove it or choose another folder")
    if opts.dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, not {opts.dtype!r}")
    max_bytes = parse_size(opts.max_shard_size)
    path = resolve_checkpoint(opts.load, opts.iteration)
    reader = DistCheckpointReader(path)
    args = reader.common.get("args", {})
    try:
        record = read_model_record(reader.common, path)
    except ModelRecordError as exc:
        raise ExportError(str(exc)) from exc
    config = names.hf_config_from_model(record["config"], record["settings"])
    padded = config["vocab_size"]
    recorded = record_from_checkpoint_state(reader.common)
    tokenizer = TokenizerSpec.from_args(args, opts.tokenizer_model, opts.tokenizer_type, recorded)
    layout = reader.common.get("parallel_layout") or {}
    special = check_tokenizer(tokenizer, padded, args, layout, recorded, f"the checkpoint {path}")
    vocab, source = _exported_vocabulary(opts, path, tokenizer, recorded, args, layout, padded)
    config["vocab_size"] = vocab
    plan = names.parameter_plan(config, padded)
    groups = names.group_by_key(plan)
    stored = _check_shapes(reader, groups, config)
    dtype = DTYPES[opts.dtype]
    size = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards([([e.hf_name for e in entries], sum(torch.Size(e.shape).numel() for e in entries) * size)
                          for _, entries in groups], max_bytes)
    log(f"[export] {path}: {len(plan)} tensors -> {len(shards)} shard(s) of at most {opts.max_shard_size}, "
        f"{opts.dtype}; vocabulary {vocab} ({source}; {padded} rows in the checkpoint)")

    staging = staging_folder(opts.output)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    writer = ShardWriter(staging, shards, progress=log)
    _write_tensors(reader, groups, stored, config, dtype, writer, log)
    _write_config(staging, config, special, opts.dtype, end_of_turn_id(tokenizer))
    write_tokenizer(tokenizer, staging, recorded)
    here = os.path.dirname(os.path.abspath(__file__))
    for name in MODEL_FILES:
        shutil.copyfile(os.path.join(here, name), os.path.join(staging, name))
    os.rename(staging, opts.output)
    log(f"[export] wrote {opts.output} ({writer.total_bytes / 1e6:.1f} MB of weights) in {time.time() - start:.1f} s")
    return opts.output


def _exported_vocabulary(opts: ExportOptions, path: str, tokenizer: TokenizerSpec, recorded, args: dict,
                         layout: dict, padded: int) -> tuple[int, str]:
    """The rows the Hugging Face model keeps (the true vocabulary, or ``padded`` with ``--keep-padded-vocab``) and
    where that number comes from; the true vocabulary must pad to ``padded`` as the saving run padded."""
    vocab, source = true_vocabulary(tokenizer, recorded, args, opts.vocab_size)
    if opts.keep_padded_vocab:
        return padded, "--keep-padded-vocab"
    if vocab is None:
        raise ExportError(f"{path}: the true vocabulary is unknown (no tokenizer recorded or given, no --vocab-size "
                          f"in its arguments); give --tokenizer-model or --vocab-size, or --keep-padded-vocab to "
                          f"export all {padded} padded rows")
    check_vocab_pads_to(vocab, padded, args, layout, source)
    return vocab, source


def _write_tensors(reader: DistCheckpointReader, groups, stored: dict, config: dict, dtype: torch.dtype,
                   writer: ShardWriter, log) -> None:
    """Read the checkpoint one Megatron key at a time and hand its Hugging Face tensors to the shard writer."""
    for n, (key, entries) in enumerate(groups, 1):
        tensor = torch.empty(names.megatron_shape(entries)) if stored[key] is None else reader.load(stored[key])
        for entry, part in zip(entries, names.split(tensor, entries, config)):
            writer.add(entry.hf_name, part.to(dtype))
        del tensor
        if n % 50 == 0:
            log(f"  read {n}/{len(groups)} checkpoint tensors")
    writer.finish()


def _write_config(folder: str, config: dict, special: dict, dtype: str, turn_end: int | None = None) -> None:
    """``config.json`` (with ``auto_map``) and ``generation_config.json`` (whose ``eos_token_id`` adds the
    chat's end-of-turn token ``turn_end``, so that ``generate()`` stops at the end of an answer)."""
    from transformers import GenerationConfig

    from moc_megatron.hf.configuration_moc import MoCConfig

    hf = MoCConfig(**config, **special)
    if hf.routing_unit == "document" or hf.reset_attention_mask:
        # Megatron's end-of-document token: the tokenizer's, or id 0 for a run without a tokenizer (the id
        # training's dataset tokenizer then uses).
        eod = special.get("eos_token_id")
        hf.document_separator_id = 0 if eod is None else eod
    hf.auto_map = dict(AUTO_MAP)
    hf.architectures = ["MoCForCausalLM"]
    hf.dtype = "float32" if dtype == "fp32" else "bfloat16"
    hf.save_pretrained(folder)
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    generation = {k: special[k] for k in ids if special.get(k) is not None}
    if turn_end is not None and generation.get("eos_token_id") not in (None, turn_end):
        generation["eos_token_id"] = [generation["eos_token_id"], turn_end]
    GenerationConfig(**generation).save_pretrained(folder)
