"""Checks on a parsed ``pretrain_moc.py`` command line, the values derived from it, and its :class:`RunConfig`."""

from __future__ import annotations

import argparse

from moc_megatron.errors import MoCError
from moc_megatron.training.config_from_args import build_run_config
from moc_megatron.training.run_config import RunConfig


class ArgumentsError(MoCError, ValueError):
    """A command line whose flags do not fit together; the message says which flags and why."""


def _require(args: argparse.Namespace, *names: str) -> None:
    missing = [n for n in names if getattr(args, n) is None]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise ArgumentsError(f"{flags} required (give the flag, or a --preset that sets it)")


def parse_blend(values: list[str] | None, flag: str) -> tuple[list[str], list[float] | None] | None:
    """``["0.7", "a", "0.3", "b"]`` -> ``(["a", "b"], [0.7, 0.3])``; ``["a", "b"]`` -> ``(["a", "b"], None)``."""
    if not values:
        return None

    def is_number(text: str) -> bool:
        try:
            float(text)
        except ValueError:
            return False
        return True

    if not is_number(values[0]):
        if any(is_number(v) for v in values):
            raise ArgumentsError(f"{flag}: give either only prefixes or weight/prefix pairs, not a mix: {values}")
        return list(values), None
    if len(values) % 2:
        raise ArgumentsError(f"{flag}: weights and prefixes must come in pairs (weight prefix ...): {values}")
    weights, prefixes = values[0::2], values[1::2]
    if not all(is_number(w) for w in weights) or any(is_number(p) for p in prefixes):
        raise ArgumentsError(f"{flag}: expected 'weight prefix' pairs: {values}")
    weights = [float(w) for w in weights]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ArgumentsError(f"{flag}: weights must be non-negative and not all zero: {weights}")
    return prefixes, weights


def _validate_parallel(args: argparse.Namespace) -> None:
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if args.world_size % (tp * pp):
        raise ArgumentsError(
            f"world size {args.world_size} is not divisible by tensor-model-parallel-size {tp} x "
            f"pipeline-model-parallel-size {pp}")
    args.data_parallel_size = args.world_size // (tp * pp)
    if args.data_parallel_size % args.expert_model_parallel_size:
        raise ArgumentsError(
            f"expert-model-parallel-size {args.expert_model_parallel_size} must divide the data-parallel "
            f"size {args.data_parallel_size} (world {args.world_size} / TP {tp} / PP {pp})")
    if args.num_layers % pp:
        raise ArgumentsError(f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    if args.num_layers_per_virtual_pipeline_stage is not None:
        if args.virtual_pipeline_model_parallel_size is not None:
            raise ArgumentsError("give --num-layers-per-virtual-pipeline-stage or "
                                 "--virtual-pipeline-model-parallel-size, not both")
        per_stage = args.num_layers // pp
        if per_stage % args.num_layers_per_virtual_pipeline_stage:
            raise ArgumentsError(
                f"{per_stage} layers per pipeline stage are not divisible by "
                f"--num-layers-per-virtual-pipeline-stage {args.num_layers_per_virtual_pipeline_stage}")
        args.virtual_pipeline_model_parallel_size = per_stage // args.num_layers_per_virtual_pipeline_stage
    vpp = args.virtual_pipeline_model_parallel_size
    if vpp is not None:
        if pp < 2:
            raise ArgumentsError("an interleaved (virtual) pipeline needs --pipeline-model-parallel-size > 1")
        if args.num_layers % (pp * vpp):
            raise ArgumentsError(f"--num-layers {args.num_layers} is not divisible by PP {pp} x virtual stages {vpp}")
        if vpp == 1:
            args.virtual_pipeline_model_parallel_size = None
    if args.sequence_parallel and tp == 1:
        args.sequence_parallel = False  # as Megatron-LM: nothing to parallelise over
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ArgumentsError("--overlap-param-gather needs --use-distributed-optimizer")


def _validate_batch(args: argparse.Namespace) -> None:
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        raise ArgumentsError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size}")
    args.num_microbatches = args.global_batch_size // per_step
    vpp = args.virtual_pipeline_model_parallel_size
    pp = args.pipeline_model_parallel_size
    if vpp is not None and args.num_microbatches % pp:
        raise ArgumentsError(
            f"the interleaved schedule needs the number of micro-batches ({args.num_microbatches} = global batch / "
            f"(micro batch x DP)) to be a multiple of --pipeline-model-parallel-size {pp}")


def _validate_schedule(args: argparse.Namespace) -> None:
    if args.min_lr > args.lr:
        raise ArgumentsError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    args.lr_decay_iters_derived = args.lr_decay_iters is None  # a resume may keep the checkpoint's instead
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            raise ArgumentsError("give --lr-warmup-iters or --lr-warmup-fraction, not both")
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.lr_decay_iters)
    decay = (f"--lr-decay-iters {args.lr_decay_iters} (the default: --train-iters)" if args.lr_decay_iters_derived
             else f"--lr-decay-iters {args.lr_decay_iters}")
    if args.lr_warmup_iters >= args.lr_decay_iters:
        raise ArgumentsError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than {decay}: lower it (e.g. "
            f"--lr-warmup-iters {args.lr_decay_iters // 10}), or give --lr-warmup-fraction (e.g. 0.1), which scales "
            "with the run")
    if args.lr_decay_style == "WSD":
        if args.lr_wsd_decay_iters is None:
            raise ArgumentsError("--lr-decay-style WSD needs --lr-wsd-decay-iters")
        after = args.lr_decay_iters - args.lr_warmup_iters
        if args.lr_wsd_decay_iters > after:
            longer = "--train-iters" if args.lr_decay_iters_derived else "--lr-decay-iters"
            raise ArgumentsError(
                f"--lr-wsd-decay-iters {args.lr_wsd_decay_iters} is longer than the {after} iterations after warmup "
                f"({decay} - --lr-warmup-iters {args.lr_warmup_iters}): give --lr-wsd-decay-iters {after} or less "
                f"(e.g. {max(1, after // 5)}, a fifth), or {longer} "
                f"{args.lr_warmup_iters + args.lr_wsd_decay_iters} or more")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ArgumentsError(
            "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other")
    args.start_weight_decay = args.weight_decay if args.start_weight_decay is None else args.start_weight_decay
    args.end_weight_decay = args.weight_decay if args.end_weight_decay is None else args.end_weight_decay
    if args.weight_decay_incr_style == "constant" and args.start_weight_decay != args.end_weight_decay:
        raise ArgumentsError(
            "--start-weight-decay and --end-weight-decay differ but --weight-decay-incr-style is constant")


def _validate_data(args: argparse.Namespace) -> None:
    per_split = [args.train_data_path, args.valid_data_path, args.test_data_path]
    sources = sum([bool(args.data_path), any(p is not None for p in per_split), args.mock_data])
    if sources != 1:
        raise ArgumentsError("give exactly one data source: --data-path, --train/valid/test-data-path, or --mock-data")
    args.data_blend = parse_blend(args.data_path, "--data-path")
    args.data_blend_per_split = None
    if any(p is not None for p in per_split):
        if args.train_data_path is None:
            raise ArgumentsError("--valid-data-path/--test-data-path need --train-data-path")
        args.data_blend_per_split = [
            parse_blend(args.train_data_path, "--train-data-path"),
            parse_blend(args.valid_data_path, "--valid-data-path"),
            parse_blend(args.test_data_path, "--test-data-path"),
        ]
    if (args.tokenizer_type is None) != (args.tokenizer_model is None):
        raise ArgumentsError("--tokenizer-type and --tokenizer-model go together")
    if not args.mock_data and args.tokenizer_type is None:
        raise ArgumentsError(
            "real data needs --tokenizer-type and --tokenizer-model (the tokenizer the data was made with)")
    if args.tokenizer_type is None and args.vocab_size is None:
        raise ArgumentsError("--mock-data without a tokenizer needs --vocab-size (or a --preset)")
    if getattr(args, "reset_position_ids", False) and not getattr(args, "reset_attention_mask", False):
        raise ArgumentsError("--reset-position-ids needs --reset-attention-mask: RoPE positions are relative, so "
                             "they restart per document only where attention stops at document boundaries")


def _validate_model(args: argparse.Namespace) -> None:
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.seq_length > args.max_position_embeddings:
        raise ArgumentsError(
            f"--seq-length {args.seq_length} > --max-position-embeddings {args.max_position_embeddings}")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = int(4 * args.hidden_size * 2 / 3 / 64) * 64 if args.swiglu else 4 * args.hidden_size
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    if args.hidden_size % args.num_attention_heads and args.kv_channels is None:
        raise ArgumentsError(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
                             f"{args.num_attention_heads} (or give --kv-channels)")
    if args.bf16:
        args.accumulate_allreduce_grads_in_fp32 = True
    if args.recompute_method is not None and args.recompute_granularity != "full":
        raise ArgumentsError("--recompute-method needs --recompute-granularity full")
    if args.recompute_granularity == "full" and (args.recompute_method is None or args.recompute_num_layers is None):
        raise ArgumentsError("--recompute-granularity full needs --recompute-method and --recompute-num-layers")
    if args.moc_bank_seed is None:
        args.moc_bank_seed = args.seed
    has_memory = bool(args.moc_memory_layers)
    memory_only = {"--moc-memory-lr": args.moc_memory_lr, "--moc-bank-lr": args.moc_bank_lr,
                   "--moc-memory-weight-decay": args.moc_memory_weight_decay,
                   "--moc-bank-weight-decay": args.moc_bank_weight_decay,
                   "--moc-freeze-bank": args.moc_freeze_bank or None}
    given = [flag for flag, value in memory_only.items() if value is not None]
    if given and not has_memory:
        raise ArgumentsError(f"{', '.join(given)} need a memory: set --moc-memory-layers")
    if args.moc_freeze_bank and args.moc_bank_lr is not None:
        raise ArgumentsError("--moc-bank-lr has no effect with --moc-freeze-bank: give one of them")
    if args.moc_freeze_bank and args.moc_bank_weight_decay is not None:
        raise ArgumentsError("--moc-bank-weight-decay has no effect with --moc-freeze-bank: give one of them")
    for flag in ("moc_memory_lr", "moc_bank_lr", "moc_memory_weight_decay", "moc_bank_weight_decay"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise ArgumentsError(f"--{flag.replace('_', '-')} must be non-negative")
    for flag in ("moc_memory_weight_decay", "moc_bank_weight_decay"):
        value = getattr(args, flag)
        if value is not None and value != args.weight_decay and args.weight_decay <= 0:
            raise ArgumentsError(f"--{flag.replace('_', '-')} {value} needs --weight-decay > 0: it is applied as a "
                                 "multiple of --weight-decay")


def _validate_checkpointing(args: argparse.Namespace) -> None:
    if args.save_interval is not None and args.save is None:
        raise ArgumentsError("--save-interval needs --save")
    if args.save_interval is not None and args.save_interval < 1:
        raise ArgumentsError("--save-interval must be positive")
    if args.log_interval < 1 or args.eval_interval < 1:
        raise ArgumentsError("--log-interval and --eval-interval must be positive")


def validate_args(args: argparse.Namespace, data_source_checked: bool = False) -> RunConfig:
    """The :class:`RunConfig` of a parsed command line; :class:`ArgumentsError` for a bad combination.

    Derived values are filled into ``args`` first (the flags a checkpoint stores include them).

    ``data_source_checked``: the caller has checked its own data source (``finetune_moc.py``'s
    ``--sft-data-path``); the ``--data-path``/``--mock-data`` checks are skipped and there is no blend.

    Derived: ``data_parallel_size``, ``num_microbatches``, ``virtual_pipeline_model_parallel_size``
    (from ``--num-layers-per-virtual-pipeline-stage``), ``global_batch_size``, ``lr_decay_iters``,
    ``ffn_hidden_size``, ``num_query_groups``, ``max_position_embeddings``, ``data_blend``,
    ``data_blend_per_split``, ``moc_bank_seed`` (from ``--seed``). Building the model configuration here
    makes its own checks (memory layers, chapters, top-k, head counts) fail before any process group exists.
    """
    _require(args, "num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
             "train_iters", "lr")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "train_iters"):
        if getattr(args, name) < 1:
            raise ArgumentsError(f"--{name.replace('_', '-')} must be positive")
    _validate_model(args)
    _validate_parallel(args)
    _validate_batch(args)
    _validate_schedule(args)
    if data_source_checked:
        args.data_blend = None
        args.data_blend_per_split = None
    else:
        _validate_data(args)
    _validate_checkpointing(args)
    try:
        return build_run_config(args)
    except (ValueError, AssertionError) as exc:
        raise ArgumentsError(f"invalid model configuration: {exc}") from exc
