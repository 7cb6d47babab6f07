"""Check a ``pretrain_moc.py`` command's flags and input files in one process, before a launcher starts ranks.

    WORLD_SIZE=16 python -m moc_megatron.training.preflight <pretrain_moc.py flags>

Runs what every rank of ``pretrain_moc.py`` runs before its process group exists: parse and validate the
flags for ``WORLD_SIZE`` ranks, build the tokenizer and check every dataset (present, intact, made with
this tokenizer). On bad input it prints ``pretrain_moc.py``'s own one-line error and exits with its status
(2 flags, 1 files); otherwise it prints one line and exits 0. The launchers in ``examples/`` call it so
that a bad input fails a job once, in seconds, instead of once per torchrun restart (torchrun restarts
every failure alike) and in every rank.
"""

from __future__ import annotations

import os
import sys

from moc_megatron.training.arguments import build_parser, parse_run_config
from moc_megatron.training.errors import run_entry_point
from moc_megatron.training.loop import check_inputs

PROG = "pretrain_moc.py"


def main(argv: list[str] | None = None) -> None:
    """Validate ``argv`` as ``pretrain_moc.py`` flags for ``WORLD_SIZE`` ranks and check the input files."""
    parser = build_parser()
    parser.prog = PROG
    run = parse_run_config(argv, parser=parser)
    run_entry_point(PROG, lambda: check_inputs(run.data))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    print(f"{PROG}: flags and inputs checked for {world_size} ranks", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
