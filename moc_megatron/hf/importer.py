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
import json
import os
import shutil
from dataclasses import dataclass, field

import torch

from moc_megatron.data.tokenizer_record import CHECKPOINT_KEY, TokenizerRecord, record_for
from moc_megatron.errors import MoCError
from moc_megatron.hf import names
from moc_megatron.hf.export import staging_folder
from moc_megatron.hf.families import UnsupportedSourceError, backbone_from_dense
from moc_megatron.hf.hf_tokenizer import RECORD_FILE


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


def training_flags(config: dict, opts: ImportOptions, vocab_size: int) -> list[str]:
    """The ``pretrain_moc.py`` flags of the model ``config`` describes (memory flags not included)."""
    theta = config["rope_parameters"]["rope_theta"]
    if float(theta) != int(theta):
        raise ImportError_(f"rope_theta {theta} is not an integer (--rotary-base takes integers)")
    flags = [
        "--num-layers", str(config["num_hidden_layers"]), "--hidden-size", str(config["hidden_size"]),
        "--ffn-hidden-size", str(config["intermediate_size"]),
        "--num-attention-heads", str(config["num_attention_heads"]),
        "--num-query-groups", str(config["num_key_value_heads"]), "--kv-channels", str(config["head_dim"]),
        "--swiglu", "--normalization", "RMSNorm", "--disable-bias-linear",
        "--norm-epsilon", repr(float(config["rms_norm_eps"])),
        "--max-position-embeddings", str(config["max_position_embeddings"]),
        "--seq-length", str(min(config["max_position_embeddings"], 4096)),
        "--rotary-base", str(int(theta)), "--vocab-size", str(vocab_size),
        "--make-vocab-size-divisible-by", str(opts.make_vocab_size_divisible_by),
        "--init-method-std", repr(float(config.get("initializer_range", 0.02))),
    ]
    if config["num_key_value_heads"] != config["num_attention_heads"]:
        flags.append("--group-query-attention")
    if config.get("qkv_bias"):
        flags.append("--add-qkv-bias")
    if config.get("qk_norm"):
        flags.append("--qk-layernorm")
    if config["rope_parameters"].get("rope_type", "default") == "llama3":
        flags += ["--use-rope-scaling", "--rope-scaling-factor", repr(float(config["rope_parameters"]["factor"]))]
    if not config["tie_word_embeddings"]:
        flags.append("--untie-embeddings-and-output-weights")
    if config.get("reset_attention_mask"):
        flags.append("--reset-attention-mask")
    return flags


def memory_flags(config: dict) -> list[str]:
    """``--moc-*`` flags of a MoC ``config.json``."""
    if not config.get("memory_layers"):
        return []
    return [
        "--moc-memory-layers", *[str(i) for i in config["memory_layers"]],
        "--moc-num-chapters", str(config["num_chapters"]), "--moc-chapter-size", str(config["chapter_size"]),
        "--moc-num-shared-chapters", str(config["num_shared_chapters"]),
        "--moc-top-k", str(config["memory_top_k"]), "--moc-num-heads", str(config["memory_num_heads"]),
        "--moc-num-query-groups", str(config["memory_num_kv_heads"]), "--moc-bank-dim", str(config["bank_dim"]),
        "--moc-routing-unit", config["routing_unit"], "--moc-chunk-size", str(config["chunk_size"]),
        "--moc-gating", config["gating"], "--moc-routed-scaling-factor", repr(float(config["routed_scaling_factor"])),
        "--moc-shared-bank" if config["shared_bank"] else "--no-moc-shared-bank",
        "--moc-bank-init-std", repr(float(config.get("bank_init_std", 0.02))),
    ]


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


def _parse(flags: list[str]) -> argparse.Namespace:
    from moc_megatron.training.arguments import parse_args

    world = 1
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size", "--expert-model-parallel-size"):
        if flag in flags:
            world *= int(flags[flags.index(flag) + 1])
    try:
        extra = ["--mock-data", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-4"]
        return parse_args([*flags, *extra], world_size=world, exit_on_error=False)
    except SystemExit as exc:  # argparse on a bad --moc-* value
        raise ImportError_(f"bad flags for this model: {exc}") from exc


def import_checkpoint(opts: ImportOptions, log=print) -> str:
    """Write the Megatron checkpoint folder ``opts.save`` (``iter_0000000`` + tracker); return it."""
    from moc_megatron import platform
    from moc_megatron.model.builder import build_model
    from moc_megatron.training import checkpoint_meta as meta
    from moc_megatron.training.config_from_args import model_settings_from_args, transformer_config_from_args

    if os.path.exists(opts.save):
        raise ImportError_(f"--save {opts.save} already exists; remove it or choose another folder")
    source = read_hf_config(opts.hf)
    dense = source.get("model_type") != "moc"
    record = hf_tokenizer_record(opts.hf)
    if dense:
        if not any(f.startswith("--moc-memory-layers") for f in opts.moc_flags):
            raise ImportError_(f"--hf {opts.hf} is a dense {source.get('model_type')!r} model: give "
                               "--moc-memory-layers (and the other --moc-* flags) for the memory to add")
        config = _dense_as_moc(source)
        mem = list(opts.moc_flags)
        rows = config["vocab_size"]
        config["vocab_size"] = _dense_vocabulary(rows, record, opts.hf)
        if config["vocab_size"] < rows:
            log(f"[import] {opts.hf}: the tokenizer has {config['vocab_size']} tokens, the model {rows} embedding "
                "rows; the rows no token reaches are dropped (Megatron pads the tokenizer's vocabulary)")
    else:
        if opts.moc_flags:
            raise ImportError_("--moc-* flags are only for a dense model; a MoC folder keeps its own memory")
        config = {k: source[k] for k in source}
        mem = memory_flags(config)
    tensors = _SafetensorsFolder(opts.hf)
    layout = ["--tensor-model-parallel-size", str(opts.tensor_model_parallel_size),
              "--pipeline-model-parallel-size", str(opts.pipeline_model_parallel_size),
              "--expert-model-parallel-size", str(opts.expert_model_parallel_size)]
    try:
        args = _parse([*training_flags(config, opts, config["vocab_size"]), *mem, *layout])
        megatron_config = transformer_config_from_args(args)
    except ValueError as exc:
        raise ImportError_(f"the model does not fit the requested layout or memory: {exc}") from exc
    settings = model_settings_from_args(args)
    # The model is built and saved in this one process (layout-free global tensors).
    local = _parse([*training_flags(config, opts, settings.vocab_size), *mem, "--make-vocab-size-divisible-by", "1"])
    local_config = transformer_config_from_args(local)
    platform.initialize_distributed()
    torch.manual_seed(local.seed)
    model = build_model(local_config, model_settings_from_args(local))
    hf_view = dict(config)
    if dense:
        signature = meta.model_signature(megatron_config, settings)
        hf_view.update(names.hf_config_from_signature(signature, vars(args)), vocab_size=config["vocab_size"])
    plan = names.parameter_plan(hf_view, settings.vocab_size)  # zero rows pad the vocabulary as training will
    sharded = model.sharded_state_dict()
    by_key = {getattr(v, "key", None): v for v in sharded.values()}
    copied = 0
    for key, entries in names.group_by_key(plan):
        target = by_key.get(key)
        if target is None and torch.Size(names.megatron_shape(entries)).numel() == 0:
            continue  # zero-size (no shared chapters): not part of a Megatron checkpoint
        if target is None:
            raise ImportError_(f"internal: the Megatron model has no checkpoint key {key!r}")
        if dense and any(_is_memory(e.hf_name) for e in entries):
            continue  # new memory: keep Megatron's initialisation (W_O = 0)
        value = names.fuse({e.hf_name: _rows(tensors.get(e.hf_name), e) for e in entries}, entries, hf_view)
        data = target.data
        if tuple(value.shape) != tuple(data.shape):
            raise ImportError_(f"{entries[0].hf_name}: shape {list(value.shape)}, the model needs {list(data.shape)}")
        with torch.no_grad():
            data.copy_(value.to(data.dtype))
        copied += 1
    if dense and not source.get("tie_word_embeddings", False) and "lm_head.weight" not in tensors.weight_map:
        raise ImportError_(f"--hf {opts.hf}: untied model without lm_head.weight")
    staging = staging_folder(opts.save)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, meta.checkpoint_name(0)))
    save_weights_checkpoint({"model": sharded}, args, megatron_config, settings,
                            os.path.join(staging, meta.checkpoint_name(0)), record)
    meta.write_tracker(staging, 0)
    os.rename(staging, opts.save)
    log(f"[import] {opts.hf} -> {opts.save}/iter_0000000: {copied} tensors copied"
        + (f", memory layers {config.get('memory_layers') or args.moc_memory_layers} new (W_O = 0)" if dense else ""))
    log("[import] train or finetune it with these model flags:\n  " + " ".join(
        f for f in training_flags(config, opts, config["vocab_size"]) + mem))
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


def save_weights_checkpoint(models: dict, args, config, settings, path: str,
                            tokenizer_record: TokenizerRecord | None = None) -> None:
    """Collective ``dist_checkpointing.save`` of model chunks' sharded state dicts (``{"model": ...}``, or
    ``model0``, ``model1``, ... per virtual stage) as a weights-only iteration-0 checkpoint in ``path``,
    recording ``tokenizer_record`` (checked by runs that load it)."""
    from megatron.core import dist_checkpointing

    from moc_megatron.training import checkpoint_meta as meta
    from moc_megatron.training import checkpointing
    from moc_megatron.training.config_from_args import json_args

    state = {
        **models,
        "checkpoint_version": checkpointing.CHECKPOINT_VERSION,
        "iteration": 0,
        "train_state": {"consumed_train_samples": 0},
        "args": json_args(args),
        "model_signature": meta.model_signature(config, settings),
        "parallel_layout": dict(tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                                dp=1, ep=args.expert_model_parallel_size,
                                vpp=args.virtual_pipeline_model_parallel_size),
        "optimizer_metadata": checkpointing.optimizer_metadata(args.use_distributed_optimizer,
                                                               args.dist_ckpt_optim_fully_reshardable),
        "saved_optimizer": False,
        "saved_rng": False,
    }
    if tokenizer_record is not None:
        state[CHECKPOINT_KEY] = tokenizer_record.to_dict()
    dist_checkpointing.save(state, path)
