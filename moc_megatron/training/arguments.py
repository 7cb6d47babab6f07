"""Command line of ``pretrain_moc.py``: Megatron-LM's flag names, ``--moc-*`` memory flags, ``--preset``.

Precedence: an explicit flag > the ``--preset`` value > the built-in default. Flags that Megatron-LM
has keep its name, meaning and default; ``--moc-*`` flags are generated from ``MoCConfig``
(``config_flags.py``). :func:`parse_run_config` parses, validates (``validate_args.py``) and returns the
run's :class:`RunConfig`; :func:`parse_args` returns the validated flags themselves.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from moc_megatron.config_flags import add_moc_config_flags, add_moc_training_flags
from moc_megatron.data.tokenizer import TOKENIZER_TYPES
from moc_megatron.presets import PRESETS, Preset, get_preset
from moc_megatron.training.errors import EXIT_ARGUMENTS, exit_with_error
from moc_megatron.training.run_config import RunConfig
from moc_megatron.training.validate_args import ArgumentsError, validate_args


def _add_network_size_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("network size")
    g.add_argument("--num-layers", type=int, default=None, help="Number of transformer layers.")
    g.add_argument("--hidden-size", type=int, default=None, help="Transformer hidden size.")
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="MLP hidden size (default 4*hidden, or 2/3 of that rounded to 64 with --swiglu).")
    g.add_argument("--num-attention-heads", type=int, default=None, help="Number of attention heads.")
    g.add_argument("--group-query-attention", action="store_true",
                   help="Megatron-LM's switch for grouped-query attention; here --num-query-groups alone sets it "
                        "(this flag is accepted so Megatron-LM command lines run, and changes nothing).")
    g.add_argument("--num-query-groups", type=int, default=None, help="Key/value heads (default: attention heads).")
    g.add_argument("--kv-channels", type=int, default=None, help="Head width (default hidden/heads).")
    g.add_argument("--max-position-embeddings", type=int, default=None, help="Default: --seq-length.")
    g.add_argument("--rotary-base", type=int, default=10000, help="RoPE base period.")
    g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help="Epsilon of the norms.")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (gated linear unit with SiLU).")
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear",
                   help="No biases in the linear layers.")
    g.add_argument("--qk-layernorm", action="store_true", help="Norm on queries and keys.")
    g.add_argument("--add-qkv-bias", action="store_true",
                   help="Biases in the query/key/value projection only (Qwen2-style), with --disable-bias-linear.")
    g.add_argument("--use-rope-scaling", action="store_true", help="Llama 3.x RoPE frequency scaling.")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0, help="Factor of --use-rope-scaling.")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="Separate input embedding and output layer weights.")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Pad the vocabulary to a multiple of this times the tensor-parallel size.")
    g.add_argument("--init-method-std", type=float, default=0.02, help="Std of the weight initialisation.")
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--hidden-dropout", type=float, default=0.1)


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="Ranks the routed chapters of the memory bank are split over.")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="Layers per virtual pipeline stage (interleaved 1F1B schedule).")
    g.add_argument("--virtual-pipeline-model-parallel-size", type=int, default=None,
                   help="Virtual pipeline stages per pipeline rank (interleaved 1F1B schedule).")
    g.add_argument("--sequence-parallel", action="store_true", help="Sequence parallelism (with TP > 1).")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Shard optimizer state over data-parallel ranks.")
    g.add_argument("--overlap-grad-reduce", action="store_true", help="Overlap DP gradient reduction with backward.")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="Overlap the distributed optimizer's parameter all-gather with forward.")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--use-cpu-initialization", action="store_true", help="Initialise weights on the CPU.")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None, help="Sequences per micro-batch per DP rank.")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Sequences per step (default micro-batch-size * data-parallel size).")
    g.add_argument("--train-iters", type=int, default=None, help="Optimizer steps to train for.")
    g.add_argument("--seed", type=int, default=1234, help="Random seed (also seeds the memory bank).")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and activations, fp32 main weights.")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="Accumulate and reduce gradients in fp32 (always on with --bf16).")
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    g.add_argument("--recompute-granularity", default=None, choices=["full", "selective"])
    g.add_argument("--recompute-method", default=None, choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--no-check-for-nan-in-loss-and-grad", action="store_false",
                   dest="check_for_nan_in_loss_and_grad",
                   help="Do not check losses and the gradient norm for NaN/Inf (by default a NaN/Inf loss stops "
                        "the run before its optimizer step, naming the iteration).")
    g.add_argument("--skip-nan-loss-iterations", action="store_true",
                   help="On a NaN/Inf loss skip that iteration's optimizer step and go on, instead of stopping.")


def _add_learning_rate_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("learning rate and regularisation")
    g.add_argument("--lr", type=float, default=None, help="Peak learning rate (backbone).")
    g.add_argument("--min-lr", type=float, default=0.0, help="Minimum learning rate (backbone).")
    g.add_argument("--lr-decay-style", default="linear",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"])
    g.add_argument("--lr-decay-iters", type=int, default=None, help="Default: --train-iters.")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="Warmup as a fraction of decay iters.")
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="Learning rate at the start of warmup.")
    g.add_argument("--lr-wsd-decay-style", default="exponential",
                   choices=["exponential", "linear", "cosine", "minus_sqrt"])
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="Iterations of the WSD final decay.")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler",
                   dest="override_opt_param_scheduler", action="store_true",
                   help="Use these flags' schedule, not the checkpoint's.")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   dest="use_checkpoint_opt_param_scheduler", action="store_true",
                   help="Use the checkpoint's schedule values.")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--start-weight-decay", type=float, default=None)
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument("--weight-decay-incr-style", default="constant", choices=["constant", "linear", "cosine"])
    g.add_argument("--clip-grad", type=float, default=1.0, help="Gradient clipping by global norm (0: off).")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)


def _add_checkpointing_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="Directory to save checkpoints to.")
    g.add_argument("--save-interval", type=int, default=None, help="Iterations between checkpoint saves.")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--load", default=None, help="Directory to resume from (latest_checkpointed_iteration.txt).")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true",
                   help="Load only the model weights and start at iteration 0.")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true")
    g.add_argument("--ckpt-format", default="torch_dist", choices=["torch_dist"])
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="Save the distributed optimizer's state so it loads at any parallel layout.")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="Dataset prefixes, optionally weighted: 0.7 a_text_document 0.3 b_text_document.")
    g.add_argument("--train-data-path", nargs="*", default=None)
    g.add_argument("--valid-data-path", nargs="*", default=None)
    g.add_argument("--test-data-path", nargs="*", default=None)
    g.add_argument("--split", default="969, 30, 1", help="Train/valid/test proportions of --data-path.")
    g.add_argument("--mock-data", action="store_true", help="Synthetic data (megatron's MockGPTDataset).")
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--tokenizer-type", default=None, choices=list(TOKENIZER_TYPES))
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="Vocabulary size when there is no tokenizer.")
    g.add_argument("--data-cache-path", default=None, help="Where dataset index caches are written.")
    g.add_argument("--num-workers", type=int, default=2, help="Data-loader worker processes.")
    g.add_argument("--eod-mask-loss", action="store_true", help="No loss on end-of-document tokens.")
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="Separate the documents packed into a window: block-causal attention within each document "
                        "(documents end with the tokenizer's end-of-document token) and --moc-routing-unit chunk "
                        "restarting at every document start.")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="Position ids restart at every document (needs --reset-attention-mask: RoPE positions are "
                        "relative, so within the block-causal mask they already count from each document's start).")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)


# Help texts of the flags defined without one above (Megatron-LM's meanings).
_HELP = {
    "--normalization": "Norm of the transformer layers.",
    "--attention-dropout": "Dropout on the attention probabilities.",
    "--hidden-dropout": "Dropout on the outputs of attention and MLP blocks.",
    "--tensor-model-parallel-size": "Ranks each layer's weights are split over (tensor parallelism).",
    "--pipeline-model-parallel-size": "Pipeline stages the layers are split over.",
    "--distributed-timeout-minutes": "Timeout of collective operations.",
    "--optimizer": "Optimizer of all parameter groups.",
    "--recompute-granularity": "Activation recomputation: whole layers (full) or attention cores (selective).",
    "--recompute-method": "With full recomputation: uniform (groups of layers) or block (first layers per stage).",
    "--recompute-num-layers": "Layers per recomputation group (uniform) or recomputed layers per stage (block).",
    "--lr-decay-style": "Learning-rate decay after warmup.",
    "--lr-warmup-iters": "Iterations of linear warmup from --lr-warmup-init to --lr.",
    "--lr-wsd-decay-style": "Shape of the final decay of the WSD schedule.",
    "--weight-decay": "Weight decay (decoupled, AdamW), unless --start/--end-weight-decay are given.",
    "--start-weight-decay": "Weight decay at the start (default: --weight-decay).",
    "--end-weight-decay": "Weight decay at the end (default: --weight-decay).",
    "--weight-decay-incr-style": "How weight decay goes from its start to its end value.",
    "--adam-beta1": "Adam beta1.",
    "--adam-beta2": "Adam beta2.",
    "--adam-eps": "Adam epsilon.",
    "--sgd-momentum": "SGD momentum.",
    "--no-save-optim": "Save no optimizer or scheduler state.",
    "--no-save-rng": "Save no RNG states.",
    "--no-load-optim": "Do not load the optimizer and scheduler state.",
    "--no-load-rng": "Do not load the RNG states.",
    "--exit-on-missing-checkpoint": "Stop if --load holds no checkpoint, instead of starting from scratch.",
    "--ckpt-format": "Checkpoint format (megatron-core dist_checkpointing).",
    "--train-data-path": "Training dataset prefixes (optionally weighted), instead of --data-path and --split.",
    "--valid-data-path": "Validation dataset prefixes (with --train-data-path).",
    "--test-data-path": "Test dataset prefixes (with --train-data-path).",
    "--seq-length": "Tokens per training sequence.",
    "--tokenizer-type": "Tokenizer of the data (the one it was preprocessed with).",
    "--tokenizer-model": "Sentencepiece .model file, or a local Hugging Face tokenizer folder.",
    "--log-interval": "Iterations between log lines.",
    "--tensorboard-dir": "Where TensorBoard event files are written (none if unset).",
    "--eval-interval": "Iterations between validation passes.",
    "--eval-iters": "Global batches per validation pass (0: no validation).",
}
_REST_MARKUP = re.compile(r":(?:class|func|meth|mod|data|attr):`~?([^`]+)`|``([^`]+)``")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's current default (the preset's with ``--preset``), no reST markup, raw epilogs."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text is None:
            return None
        text = _REST_MARKUP.sub(lambda m: m.group(1) or m.group(2), text).replace("%", "%%")
        default = action.default
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            # An on/off flag has no value to show; say only when a --preset already turns it on.
            on = default is isinstance(action, argparse._StoreTrueAction)
            return f"{text} (on with this --preset)" if on and action.option_strings != ["-h", "--help"] else text
        shows = action.option_strings and default not in (None, False, argparse.SUPPRESS)
        if not shows:
            return text
        return f"{text} (default: {default})" if "default" not in text else f"{text} (current default: {default})"


class MoCArgumentParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, printed once per node, without the usage text."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: error: message`` (and where to find the flags) once, exit with status 2."""
        exit_with_error(self.prog, f"{message}\n  (see {self.prog} --help)", EXIT_ARGUMENTS)


PRETRAIN_USAGE = ("%(prog)s [--preset NAME] (--data-path [WEIGHT] PREFIX ... | --mock-data)\n"
                  "         [--micro-batch-size N] [--train-iters N] [--lr LR] [--save DIR [--load DIR]] [FLAG ...]")
PRETRAIN_DESCRIPTION = """\
Pretrain a Mixture-of-Chapters language model on megatron-core (plain python, torchrun or srun).

Most used flags (all flags, grouped, below):
  --preset NAME                    a named model (moc-tiny, moc-paper, dense-paper-*): its values are the
                                   defaults; moc-tiny also sets --lr, --micro-batch-size and --train-iters
  --data-path [WEIGHT] PREFIX ...  datasets made by tools/preprocess_data.py (or --mock-data)
  --tokenizer-type T --tokenizer-model PATH   the tokenizer the data were made with
  --micro-batch-size N --global-batch-size N --train-iters N --lr LR --lr-decay-style STYLE
  --save DIR --save-interval N     checkpoints; --load DIR --save DIR resumes (or starts when DIR is empty)
  --tensorboard-dir DIR --log-interval N --eval-interval N
  --tensor-/--pipeline-/--expert-model-parallel-size N   parallel layout (under torchrun)

Example (CPU, no data):  python pretrain_moc.py --preset moc-tiny --mock-data --train-iters 20
"""


def build_parser() -> argparse.ArgumentParser:
    """The full ``pretrain_moc.py`` parser (no preset applied)."""
    parser = MoCArgumentParser(
        usage=PRETRAIN_USAGE, description=PRETRAIN_DESCRIPTION,
        allow_abbrev=False, add_help=False, formatter_class=_HelpFormatter,
    )
    parser.add_argument("-h", "--help", action="store_true",
                        help="Show this help (with --preset NAME: the defaults that preset gives) and exit.")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="Named model whose settings are the defaults; explicit flags override them.")
    for add in (_add_network_size_args, _add_parallel_args, _add_training_args, _add_learning_rate_args,
                _add_checkpointing_args, _add_data_args, _add_logging_args):
        add(parser)
    add_moc_config_flags(parser)
    add_moc_training_flags(parser)
    for action in parser._actions:
        if action.help is None and action.option_strings:
            action.help = _HELP.get(action.option_strings[-1])
    return parser


def preset_defaults(preset: Preset, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Argument defaults (dest -> value) that a preset supplies."""
    dests = {action.dest for action in parser._actions}
    defaults: dict[str, Any] = {}
    for key, value in preset.config.items():
        if key == "gated_linear_unit":
            defaults["swiglu"] = bool(value)  # the presets' gated MLPs are SwiGLU (presets.Backbone)
        elif key == "activation_func":
            continue  # SiLU is what --swiglu selects
        elif key == "layernorm_epsilon":
            defaults["norm_epsilon"] = value
        else:
            defaults[key] = value
    defaults.update(
        vocab_size=preset.vocab_size,
        seq_length=preset.seq_length,
        untie_embeddings_and_output_weights=not preset.tie_embeddings,
        rotary_base=preset.rotary_base,
        **preset.training.defaults(),
    )
    unknown = sorted(set(defaults) - dests)
    if unknown:
        raise ArgumentsError(f"preset {preset.name!r} sets {unknown}, which no command-line flag takes")
    return defaults


def parse_command_line(argv: Sequence[str] | None = None, world_size: int | None = None,
                       exit_on_error: bool = True, parser: argparse.ArgumentParser | None = None,
                       validate: Callable[[argparse.Namespace], RunConfig] = validate_args,
                       ) -> tuple[argparse.Namespace, RunConfig]:
    """Parse, apply ``--preset``, validate: the flags (with their derived values) and the run's :class:`RunConfig`.

    ``world_size`` defaults to torchrun's ``WORLD_SIZE`` (1 without it). With ``exit_on_error`` a bad
    combination prints the message and exits with status 2; otherwise :class:`ArgumentsError` is raised.
    ``parser`` and ``validate`` default to ``pretrain_moc.py``'s (``finetune_moc.py`` passes its own).
    """
    parser = parser or build_parser()
    try:
        known, _ = parser.parse_known_args(argv)
        if known.preset is not None:
            parser.set_defaults(**preset_defaults(get_preset(known.preset), parser))
        if known.help:
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                parser.print_help()
            raise SystemExit(0)
        args = parser.parse_args(argv)
        args.world_size = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
        run = validate(args)
    except ArgumentsError as exc:
        if exit_on_error:
            parser.error(str(exc))
        raise
    return args, run


def parse_run_config(argv: Sequence[str] | None = None, world_size: int | None = None, exit_on_error: bool = True,
                     parser: argparse.ArgumentParser | None = None,
                     validate: Callable[[argparse.Namespace], RunConfig] = validate_args) -> RunConfig:
    """The :class:`RunConfig` of a command line (what the entry scripts run); see :func:`parse_command_line`."""
    return parse_command_line(argv, world_size, exit_on_error, parser, validate)[1]


def parse_args(argv: Sequence[str] | None = None, world_size: int | None = None, exit_on_error: bool = True,
               parser: argparse.ArgumentParser | None = None,
               validate: Callable[[argparse.Namespace], RunConfig] = validate_args) -> argparse.Namespace:
    """The validated flags with their derived values (``data_parallel_size``, ``num_microbatches``, ...), as
    Megatron-LM's ``parse_args``; see :func:`parse_command_line`."""
    return parse_command_line(argv, world_size, exit_on_error, parser, validate)[0]
