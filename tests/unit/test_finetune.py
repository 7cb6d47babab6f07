"""finetune_moc.py: instruction tuning from a pretrained checkpoint on packed chat SFT data (CPU, one process).

A tiny model (token routing, no dropout) is pretrained for a few steps on mock data with the SFT
tokenizer, then finetuned on synthetic chats packed by tools/preprocess_sft.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from moc_megatron.data.synthetic_corpus import generate_people, synthetic_chats
from moc_megatron.parallel.bank_group import destroy_bank_groups
from moc_megatron.training.arguments import parse_run_config
from moc_megatron.training.checkpointing import load_training_state
from moc_megatron.training.config_from_args import run_model_settings
from moc_megatron.training.data import data_iterators
from moc_megatron.training.finetune import (
    build_sft_datasets,
    finetune,
    parse_finetune_args,
    parse_finetune_run_config,
    sft_batch,
    sft_loss_func,
    start_run,
)
from moc_megatron.training.loop import _tokenizer, pretrain
from moc_megatron.training.setup import build_training_stack, initialize
from moc_megatron.training.validate_args import ArgumentsError

SEQ = 128
FT_ITERS = 10


def model_args(sp_model: str) -> list[str]:
    return [
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "2", "--swiglu",
        "--normalization", "RMSNorm", "--disable-bias-linear", "--seq-length", str(SEQ),
        "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--moc-memory-layers", "1", "--moc-num-chapters", "5", "--moc-chapter-size", "4", "--moc-top-k", "2",
        "--moc-routing-unit", "token", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--log-interval", "5", "--eval-iters", "1", "--num-workers", "0",
    ]


def ft_argv(sp_model: str, sft: str, pretrained: str, *extra: str) -> list[str]:
    return [*model_args(sp_model), "--sft-data-path", sft, "--pretrained-checkpoint", pretrained,
            "--split", "90,10,0", "--train-iters", str(FT_ITERS), "--lr", "5e-3", "--min-lr", "5e-4",
            "--moc-memory-lr", "2.5e-3", "--moc-bank-lr", "1e-3", "--lr-decay-style", "cosine",
            "--lr-warmup-iters", "1", "--eval-interval", "5", *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, sp_model, run_tool):
    root = tmp_path_factory.mktemp("ft")
    chats = root / "chats.jsonl"
    with open(chats, "w") as f:
        for conv in synthetic_chats(generate_people(30, seed=5), 120, seed=5):
            f.write(json.dumps(conv) + "\n")
    assert run_tool("preprocess_sft", "--input", chats, "--output-prefix", root / "sft",
                    "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                    "--pack-length", SEQ, "--no-progress") == 0
    pre = pretrain(parse_run_config([*model_args(sp_model), "--mock-data", "--train-iters", "3", "--lr", "1e-3",
                                     "--eval-interval", "3", "--save", str(root / "pre")],
                                    world_size=1, exit_on_error=False))
    assert pre.iteration == 3
    sft, pretrained = str(root / "sft"), str(root / "pre")
    result = finetune(parse_finetune_run_config(ft_argv(sp_model, sft, pretrained, "--save", str(root / "ft")),
                                                world_size=1, exit_on_error=False))
    return root, sft, pretrained, result


@pytest.fixture(scope="module")
def pretrained_model(setup, sp_model):
    """The pretrained weights loaded as finetune_moc.py loads them, and the finetune run."""
    _, sft, pretrained, _ = setup
    start, run = start_run(parse_finetune_run_config(ft_argv(sp_model, sft, pretrained), world_size=1,
                                                     exit_on_error=False))
    assert start == "pretrained"
    initialize(run)
    _, vocab = _tokenizer(run)
    config = run.model
    settings = run_model_settings(run, vocab)
    stack = build_training_stack(run, config, settings)
    loaded = load_training_state(run, stack.model, stack.optimizer, stack.scheduler, config, settings)
    assert (loaded.iteration, loaded.consumed_train_samples) == (0, 0)
    model = stack.model[0]
    model.eval()
    yield run, model
    destroy_bank_groups()


def _masked_loss(model, batch, labels=None, attention_mask="block"):
    mask = batch["attention_mask"] if attention_mask == "block" else attention_mask
    with torch.no_grad():
        losses = model(batch["tokens"], batch["position_ids"], mask,
                       labels=batch["labels"] if labels is None else labels)
    loss_sum, tokens, _ = sft_loss_func(batch["loss_mask"], losses)
    return loss_sum, tokens


def test_starts_from_the_pretrained_weights(setup, pretrained_model):
    """The first finetuning step's loss (forward before any update) is the pretrained model's on that batch."""
    args, model = pretrained_model
    result = setup[3]
    assert result.start_iteration == 0
    train_ds, _, _ = build_sft_datasets(args)
    it = data_iterators(train_ds, 0, args, 1)[0]
    total, tokens = 0.0, 0
    for _ in range(args.schedule.num_microbatches):
        s, n = _masked_loss(model, sft_batch(it))
        total, tokens = total + s.item(), tokens + n.item()
    assert result.lm_losses[1] == pytest.approx(total / tokens, rel=1e-5)


def test_assistant_loss_falls(setup):
    losses = setup[3].lm_losses
    assert sorted(losses) == list(range(1, FT_ITERS + 1))
    first, last = sum(losses[i] for i in (1, 2)) / 2, sum(losses[i] for i in (FT_ITERS - 1, FT_ITERS)) / 2
    assert last < first - 0.2, losses
    assert FT_ITERS in setup[3].validation_losses


def test_only_assistant_tokens_count(pretrained_model):
    args, model = pretrained_model
    train_ds, _, _ = build_sft_datasets(args)
    batch = sft_batch(data_iterators(train_ds, 0, args, 1)[0])
    mask = batch["loss_mask"]
    assert 0 < mask.sum() < mask.numel()
    base, tokens = _masked_loss(model, batch)
    assert tokens == mask.sum()
    # change the labels of every non-assistant token (user/system turns, template, padding)
    labels = torch.where(mask == 0, (batch["labels"] + 7) % 300, batch["labels"])
    assert not torch.equal(labels, batch["labels"])
    assert torch.equal(_masked_loss(model, batch, labels)[0], base)
    # ... while changing one assistant label does change it
    pos = mask.nonzero()[0]
    labels = batch["labels"].clone()
    labels[pos[0], pos[1]] = (labels[pos[0], pos[1]] + 7) % 300
    assert not torch.equal(_masked_loss(model, batch, labels)[0], base)


def test_packed_conversations_do_not_see_each_other(pretrained_model):
    args, model = pretrained_model
    train_ds, _, _ = build_sft_datasets(args)
    sample = next(i for i in range(len(train_ds)) if train_ds[i]["segment_ids"].max() >= 1)
    item = train_ds[sample]
    batch = sft_batch(iter([{k: v.unsqueeze(0) for k, v in item.items()}]))
    seg = batch["segment_ids"][0]
    second = (seg == 1).nonzero().view(-1)
    first = (seg == 0).nonzero().view(-1)
    assert batch["position_ids"][0, second[0]] == 0  # positions restart per conversation
    changed = batch["tokens"].clone()
    changed[0, first[1]] = (changed[0, first[1]] + 5) % 300

    def logits(tokens, mask):
        with torch.no_grad():
            return model(tokens, batch["position_ids"], mask)[0]

    a, b = logits(batch["tokens"], batch["attention_mask"]), logits(changed, batch["attention_mask"])
    torch.testing.assert_close(a[second], b[second], rtol=0, atol=1e-6)
    assert not torch.allclose(a[first[1]:first[-1] + 1], b[first[1]:first[-1] + 1])
    # without the block mask (plain causal) the second conversation would see the first
    a, b = logits(batch["tokens"], None), logits(changed, None)
    assert not torch.allclose(a[second], b[second])


def test_resume_and_bad_arguments(setup, sp_model):
    root, sft, pretrained, _ = setup
    start, run = start_run(parse_finetune_run_config(ft_argv(sp_model, sft, pretrained, "--load", str(root / "ft")),
                                                     world_size=1, exit_on_error=False))
    assert start == "resume" and run.checkpointing.load == str(root / "ft") and not run.checkpointing.finetune
    with pytest.raises(ArgumentsError, match="--sft-data-path replaces --mock-data"):
        parse_finetune_args([*ft_argv(sp_model, sft, pretrained), "--mock-data"], world_size=1, exit_on_error=False)
    with pytest.raises(ArgumentsError, match="--pretrained-checkpoint"):
        argv = ft_argv(sp_model, sft, pretrained)
        i = argv.index("--pretrained-checkpoint")
        parse_finetune_args(argv[:i] + argv[i + 2:], world_size=1, exit_on_error=False)
