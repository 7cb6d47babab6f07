"""Generate text from an exported Hugging Face MoC folder (or a Megatron checkpoint, exported on the fly).

    python tools/generate.py --hf runs/quickstart/hf --prompt "Ada Lovelace was born" --max-new-tokens 40
    python tools/generate.py --load runs/quickstart/checkpoints --prompt "A" --prompt "B" --temperature 0.8 --top-p 0.9

Greedy unless --temperature > 0. Tokens are printed as they are generated, one prompt after another; a
continuation ends at the end-of-document token or at the chat's end-of-turn token (e.g. <|end|>), which is
not printed.
Uses only the folder's own tokenizer files (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", help="Exported Hugging Face folder.")
    src.add_argument("--load", help="Megatron checkpoint root: exported to a temporary folder first.")
    p.add_argument("--tokenizer-model", default=None, help="With --load: tokenizer to export (default: recorded one).")
    p.add_argument("--prompt", action="append", required=True, help="A prompt (repeat for several).")
    p.add_argument("--max-new-tokens", type=int, default=50,
                   help="Most tokens to generate per prompt; generation also stops at the end-of-document token and "
                        "at the chat's end-of-turn token (the export's generation_config.json). Default: 50.")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sampling at this temperature.")
    p.add_argument("--top-k", type=int, default=0, help="Sample from the k most likely tokens (0: all).")
    p.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling threshold.")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed (with --temperature > 0). Default: 0.")
    return p


def generate(folder: str, args: argparse.Namespace) -> list[str]:
    """Generate for every prompt, streaming tokens to stdout; return the completions."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar between the generated texts

    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        raise SystemExit(f"generate.py: error: {folder} has no tokenizer.json (export with --tokenizer-model PATH)")
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    torch.manual_seed(args.seed)
    sample = args.temperature > 0
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=sample,
                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if sample:
        options.update(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)
    outputs = []
    for prompt in args.prompt:
        batch = tok(prompt, return_tensors="pt", add_special_tokens=False)
        print(prompt, end="", flush=True)
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)  # no end-of-turn text
        out = model.generate(**batch, streamer=streamer, **options)
        outputs.append(tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))
        print()
    return outputs


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args.hf:
        generate(args.hf, args)
        return 0
    from moc_megatron.hf.export import ExportOptions, export_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = f"{tmp}/hf"
        export_checkpoint(ExportOptions(load=args.load, output=folder, tokenizer_model=args.tokenizer_model),
                          log=lambda *a: print(*a, file=sys.stderr))
        generate(folder, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
