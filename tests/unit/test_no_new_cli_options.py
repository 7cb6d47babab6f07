"""pretrain_moc.py's and finetune_moc.py's command-line flags are frozen (as torchtitan's test_no_new_cli_options).

Each script's sorted option strings are stored in ``tests/unit/cli_options/<script>.txt``; a flag added or
removed by accident (a renamed argument, a dropped argument group) fails here. After a deliberate change
regenerate the files with ``python tests/unit/test_no_new_cli_options.py --update`` and commit them.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
STORED = HERE / "cli_options"
UPDATE = f"python {Path(__file__).relative_to(HERE.parents[1])} --update"


def _pretrain_parser() -> argparse.ArgumentParser:
    from moc_megatron.training.arguments import build_parser

    return build_parser()


def _finetune_parser() -> argparse.ArgumentParser:
    from moc_megatron.training.finetune import build_finetune_parser

    return build_finetune_parser()


PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "pretrain_moc.py": _pretrain_parser,
    "finetune_moc.py": _finetune_parser,
}


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string the parser accepts (aliases and ``--no-*`` forms included), sorted."""
    return sorted({s for action in parser._actions for s in action.option_strings})


def stored_path(script: str) -> Path:
    return STORED / f"{Path(script).stem}.txt"


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_no_new_or_removed_cli_options(script: str) -> None:
    current = option_strings(PARSERS[script]())
    stored = stored_path(script).read_text().split()
    added, removed = sorted(set(current) - set(stored)), sorted(set(stored) - set(current))
    assert not added and not removed, (
        f"the command line of {script} changed: added {added or 'none'}, removed {removed or 'none'}. "
        f"If that is intended, run `{UPDATE}` and commit {stored_path(script).relative_to(HERE.parents[1])}.")
    assert stored == sorted(stored), f"{stored_path(script)} is not sorted; run `{UPDATE}`"


def test_finetune_keeps_every_pretrain_option() -> None:
    """finetune_moc.py takes pretrain_moc.py's flags and adds its own."""
    pretrain, finetune = set(option_strings(_pretrain_parser())), set(option_strings(_finetune_parser()))
    assert pretrain <= finetune, sorted(pretrain - finetune)
    assert finetune - pretrain == {"--sft-data-path", "--pretrained-checkpoint"}


def _update() -> None:
    STORED.mkdir(exist_ok=True)
    for script, parser in PARSERS.items():
        stored_path(script).write_text("\n".join(option_strings(parser())) + "\n")
        print(f"wrote {stored_path(script)}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--update"]:
        sys.exit(f"usage: {UPDATE}")
    _update()
