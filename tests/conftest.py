"""Shared test fixtures: a tiny corpus, tiny tokenizers trained on it, and a loader for tools/ scripts."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

# The Triton kernels run under Triton's interpreter on a CPU; the variable must be set before anything
# imports triton. With a GPU the kernels compile for real (tests/gpu/).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM interrupts the session like Ctrl-C, so subprocesses started by tests are ended with it."""
    sys.path.append(str(REPO_ROOT / "tests" / "distributed"))
    from launch import interrupt_on_sigterm

    interrupt_on_sigterm()

# Texts that a lossless tokenizer must give back exactly.
TRICKY_TEXTS = [
    "  leading spaces, double  spaces and a trailing space ",
    "line one\nline two\n\n\tindented with a tab\r\nwindows line end",
    "Unicode: café, naïve, Ærøskøbing, 東京, emoji 😀🚀, math ∑x²",
    "<|user|> markers inside text <|end|> stay text-equal",
    "digits 1234567890 and 3.14159",
]

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def load_tool(name: str) -> ModuleType:
    """Import ``tools/{name}.py`` as a module (tools/ is not a package)."""
    path = REPO_ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def run_tool() -> Callable[..., int]:
    """``run_tool(name, *argv)`` runs ``tools/{name}.py``'s ``main`` in-process and returns its exit status."""
    cache: dict[str, ModuleType] = {}

    def run(name: str, *argv: str) -> int:
        if name not in cache:
            cache[name] = load_tool(name)
        return cache[name].main([str(a) for a in argv])

    return run


@pytest.fixture(scope="session")
def tricky_texts() -> list[str]:
    """Texts that a lossless tokenizer must give back exactly."""
    return list(TRICKY_TEXTS)


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    """About 250 documents: synthetic biographies plus :data:`TRICKY_TEXTS`."""
    from moc_megatron.data.synthetic_corpus import corpus_documents, generate_people

    people = generate_people(120, seed=7)
    return [d["text"] for d in corpus_documents(people, bios_per_person=2, seed=7)] + TRICKY_TEXTS


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory, tiny_texts: list[str]) -> Path:
    """``tiny_texts`` as a jsonl file ``{"id", "text"}``."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(tiny_texts):
            f.write(json.dumps({"id": i, "text": text}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> str:
    """A sentencepiece BPE model (vocab 512, byte fallback) trained on the tiny corpus in well under a second."""
    from moc_megatron.data.tokenizer_training import train_sentencepiece

    prefix = tmp_path_factory.mktemp("sp") / "tiny"
    return train_sentencepiece([str(tiny_corpus)], str(prefix), vocab_size=512, num_threads=1)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, tiny_texts: list[str]) -> str:
    """A local Hugging Face tokenizer folder: byte-level BPE, ChatML chat template, ``<|endoftext|>`` eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("hf_tokenizer")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_texts, trainer)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "pad_token": "<pad>", "chat_template": CHATML_TEMPLATE}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)
