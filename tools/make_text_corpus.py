"""Write real English text that ships with CPython (stdlib docstrings, pydoc topics) as jsonl.

LICENSE: the text is part of CPython and is distributed under the PSF License Agreement (Python Software
Foundation License, SPDX PSF-2.0). The tool copies CPython's LICENSE.txt next to the output.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

DESCRIPTION = """\
Write the documentation that ships inside CPython as a jsonl corpus ({"id", "text", "source", "license"}):
the docstrings of the standard library's public modules, classes and functions (one document per
module, read with ast: no module is imported) and the pydoc language-reference topics.

LICENSE: this text is part of CPython and is distributed under the PSF License Agreement
(Python Software Foundation License, SPDX PSF-2.0), Copyright (c) 2001 Python Software Foundation.
CPython's LICENSE.txt is copied beside the output as OUTPUT.LICENSE.txt when the installation has it.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="output .jsonl or .jsonl.gz")
    parser.add_argument("--modules", nargs="+", default=None, help="only these top-level stdlib modules/packages")
    parser.add_argument("--no-topics", action="store_true", help="leave out the pydoc topics")
    parser.add_argument("--min-chars", type=int, default=200, help="drop documents shorter than this")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the tool; returns the exit status."""
    args = build_parser().parse_args(argv)
    from moc_megatron.data.jsonl import write_jsonl
    from moc_megatron.data.text_corpus import cpython_license_path, text_corpus_documents

    start = time.perf_counter()
    size = 0

    def counted(docs):
        nonlocal size
        for doc in docs:
            size += len(doc["text"].encode("utf-8"))
            yield doc

    docs = text_corpus_documents(args.modules, not args.no_topics, args.min_chars)
    count = write_jsonl(args.output, counted(docs))
    license_path = cpython_license_path()
    if license_path:
        shutil.copyfile(license_path, args.output + ".LICENSE.txt")
    print(
        f"wrote {count} documents ({size / 2**20:.2f} MB of text) to {args.output} "
        f"in {time.perf_counter() - start:.1f} s"
        f"; license PSF-2.0{' (LICENSE.txt copied)' if license_path else ''}",
        file=sys.stderr,
    )
    if count == 0:
        print("error: no documents found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
