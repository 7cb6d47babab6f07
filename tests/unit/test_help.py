"""--help reads well: what the command does and its most used flags first, on/off flags without a misleading
"(default: True)", help text on every flag of every command, and a preset that needs no extra flags."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
from pathlib import Path

import pytest

from moc_megatron.training.arguments import build_parser, parse_args
from moc_megatron.training.finetune import build_finetune_parser, parse_finetune_args

TOOLS = sorted((Path(__file__).resolve().parents[2] / "tools").glob("*.py"))


def tool_parser(path: Path) -> argparse.ArgumentParser:
    spec = importlib.util.spec_from_file_location(f"_help_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_parser()


def help_text(parse, *argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse([*argv, "--help"])
    return out.getvalue()


@pytest.mark.parametrize("parse, name", [(parse_args, "pretrain_moc.py"), (parse_finetune_args, "finetune_moc.py")])
def test_help_starts_with_what_the_command_does_and_its_most_used_flags(parse, name, monkeypatch):
    monkeypatch.setattr("sys.argv", [name])  # argparse's program name
    head = help_text(parse).splitlines()[:16]
    assert head[0].startswith(f"usage: {name} [--preset NAME]") and len(head[0]) <= 120
    text = "\n".join(head)
    assert ("Pretrain a Mixture-of-Chapters" if name == "pretrain_moc.py" else "Instruction-tune (SFT)") in text
    assert "Most used flags" in text and "--save DIR" in text and "--train-iters N" in text


def test_on_off_flags_show_no_default_unless_a_preset_turns_them_on():
    plain = help_text(parse_args)
    assert "(default: True)" not in plain and "(current default: True)" not in plain
    assert "(default: False)" not in plain and "(on with this --preset)" not in plain
    tiny = " ".join(help_text(parse_args, "--preset", "moc-tiny").split())
    assert "No biases in the linear layers. (on with this --preset)" in tiny
    assert "SwiGLU MLP (gated linear unit with SiLU). (on with this --preset)" in tiny
    assert "--lr LR Peak learning rate (backbone). (default: 0.002)" in tiny
    assert "Accepted for Megatron-LM compatibility." not in plain


def _flags_without_help(parser: argparse.ArgumentParser, name: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                missing += _flags_without_help(subparser, f"{name} {sub}")
        elif action.option_strings and not (action.help or "").strip():
            missing.append(f"{name} {action.option_strings[-1]}")
    return missing


def test_every_flag_of_every_command_has_help():
    parsers = {"pretrain_moc.py": build_parser(), "finetune_moc.py": build_finetune_parser()}
    parsers.update({f"tools/{t.name}": tool_parser(t) for t in TOOLS})
    assert len(parsers) >= 11
    missing = [flag for name, parser in parsers.items() for flag in _flags_without_help(parser, name)]
    assert missing == []


def test_moc_tiny_needs_only_a_data_source():
    args = parse_args(["--preset", "moc-tiny", "--mock-data"], world_size=1, exit_on_error=False)
    assert (args.lr, args.micro_batch_size, args.train_iters) == (2e-3, 8, 200)
    given = parse_args(["--preset", "moc-tiny", "--mock-data", "--lr", "1e-3", "--train-iters", "5"], world_size=1,
                       exit_on_error=False)
    assert (given.lr, given.train_iters) == (1e-3, 5)  # explicit flags still win
    # the paper presets leave the training flags to the user
    with pytest.raises(Exception, match="--micro-batch-size, --train-iters, --lr required"):
        parse_args(["--preset", "moc-paper", "--mock-data"], world_size=1, exit_on_error=False)
