"""Memory layer forward+backward: our ``MoCMemoryAttention`` against the paper's reference implementation.

Both sides run the same memory read on one process, fp32, CPU: sequence routing over ``C - S`` routed
chapters, top-k, shared chapters always read, paper gating (shared weight 1, routed weights times the
scaling factor, renormalised; shared and routed memory RMS-normalised, weighted, projected to K/V; one
softmax), W_O, and the router losses. The paper side is assembled from the paper's own modules
(``ChapterRouter``, ``ChapteredMemoryBank(StandardMemoryBank)``, ``MemoryTransformer``'s
``_prepend_shared_chapters`` and ``_normalize_shared_routed_memory_vectors``, the chapter weighting of
``MemoryTransformer.forward`` and ``MemoryCrossAttention``), imported from a copy of its repository:

    git clone https://github.com/Tasmay-Tibrewal/Memory /tmp/paper_code
    python bench/bench_memory_layer.py --paper-code /tmp/paper_code

Before timing, both get the same weights and the script checks that they compute the same output and
gradients (to fp32 rounding).
Option differences (stated in the output): the paper's router scores all ``C`` chapters and masks the
shared ones (softmax over the routed ones is the same math); its memory-attention gradient
checkpointing is switched off here (ours does not recompute); its router also computes an MSE
auxiliary loss and the entropy. The pre-memory RMSNorm is outside both modules and not timed.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from _timing import time_interleaved

if TYPE_CHECKING:
    from moc_megatron.memory.memory_attention import MoCMemoryAttention

CLONE_HELP = """\
The paper's code is not at {path}.
Get it with:
    git clone https://github.com/Tasmay-Tibrewal/Memory {path}
(or export a local bare copy of it:
    mkdir -p {path} && git -C <repo.git> archive HEAD memory_transformer | tar -x -C {path})
then run again with --paper-code {path}."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--paper-code", default="/tmp/paper_code", help="folder holding the paper's memory_transformer/")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--chapters", type=int, default=257, help="total chapters C, shared included")
    p.add_argument("--chapter-size", type=int, default=32)
    p.add_argument("--shared", type=int, default=1)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30, help="timed repetitions of each implementation")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of our forward+backward")
    p.add_argument("--only", choices=["ours", "paper"], default=None, help="time one implementation only")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# The paper's implementation
# ----------------------------------------------------------------------------------------------------------


def load_paper_modules(root: Path) -> types.SimpleNamespace:
    """Import the paper's modules from ``root/memory_transformer`` without running its package ``__init__``.

    The package ``__init__`` imports Hugging Face ``transformers`` (for its adapter) and ``config.py``
    imports ``yaml`` and ``omegaconf`` (for YAML loading); none is used here, so stand-ins are registered
    for the latter two when they are not installed.
    """
    package = root / "memory_transformer"
    if not (package / "memory_attention.py").is_file():
        raise FileNotFoundError(CLONE_HELP.format(path=root))
    for name, attribute in (("omegaconf", "OmegaConf"), ("yaml", "safe_load")):
        try:
            importlib.import_module(name)
        except ImportError:  # only the paper's YAML config loading uses them
            stub = types.ModuleType(name)
            setattr(stub, attribute, None)
            sys.modules[name] = stub
    pkg = types.ModuleType("memory_transformer")
    pkg.__path__ = [str(package)]
    sys.modules["memory_transformer"] = pkg
    attention = importlib.import_module("memory_transformer.memory_attention")
    bank = importlib.import_module("memory_transformer.memory_bank")
    router = importlib.import_module("memory_transformer.router")
    model = importlib.import_module("memory_transformer.model")
    return types.SimpleNamespace(
        MemoryCrossAttention=attention.MemoryCrossAttention,
        StandardMemoryBank=bank.StandardMemoryBank,
        ChapteredMemoryBank=bank.ChapteredMemoryBank,
        ChapterRouter=router.ChapterRouter,
        compute_total_router_loss=router.compute_total_router_loss,
        MemoryTransformer=model.MemoryTransformer,
    )


class PaperMemoryLayer(torch.nn.Module):
    """The paper's sequence-routed memory read, wired as its ``MemoryTransformer.forward`` wires it."""

    def __init__(self, paper: types.SimpleNamespace, args: argparse.Namespace, eps: float) -> None:
        super().__init__()
        self.paper, self.args, self.eps = paper, args, eps
        self.tokens_per_chapter = args.chapter_size
        self.bank = paper.ChapteredMemoryBank(
            paper.StandardMemoryBank(args.chapters * args.chapter_size, args.hidden), args.chapters
        )
        self.router = paper.ChapterRouter(args.hidden, args.chapters, args.top_k, routing_strategy="sequence")
        self.attn = paper.MemoryCrossAttention(
            hidden_dim=args.hidden, num_heads=args.heads, num_kv_heads=args.heads, wo_init_zero=True,
            use_flash_attention=False, gradient_checkpointing=False,
        )

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Memory read of ``hidden`` ``[b, s, h]``; returns the output and the weighted router losses."""
        mt, args = self.paper.MemoryTransformer, self.args
        indices, weights, losses = self.router(hidden, return_losses=True, exclude_prefix_chapters=args.shared)
        indices, weights = mt._prepend_shared_chapters(
            indices, weights, num_chapters=args.chapters, num_shared_chapters=args.shared,
            routed_scaling_factor=2.5,
        )
        memory, _ = self.bank.get_chapters_batched(indices)
        memory = mt._normalize_shared_routed_memory_vectors(
            memory, num_shared_chapters=args.shared, tokens_per_chapter=self.tokens_per_chapter,
            norm_type="rms", eps=self.eps,
        )
        w = weights.unsqueeze(-1).repeat(1, 1, self.tokens_per_chapter).reshape(memory.shape[0], -1, 1)
        out, _ = self.attn(hidden, memory * w)
        aux = self.paper.compute_total_router_loss(losses, load_balance_coef=0.01, auxiliary_coef=0.0,
                                                   z_loss_coef=0.001)
        return out, aux


# ----------------------------------------------------------------------------------------------------------
# Ours
# ----------------------------------------------------------------------------------------------------------


def build_ours(args: argparse.Namespace) -> MoCMemoryAttention:
    """Our memory layer with its own bank (one process, fp32)."""
    from moc_megatron.config import MoCConfig
    from moc_megatron.memory.memory_attention import MoCMemoryAttention

    config = MoCConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=args.heads, moc_memory_layers=[0],
        moc_num_chapters=args.chapters, moc_chapter_size=args.chapter_size, moc_num_shared_chapters=args.shared,
        moc_top_k=args.top_k, moc_num_heads=args.heads, moc_num_query_groups=args.heads,
        moc_routing_unit="sequence", moc_gating="paper", moc_routed_scaling_factor=2.5, moc_shared_bank=False,
        use_cpu_initialization=True, params_dtype=torch.float32, add_bias_linear=False,
        gradient_accumulation_fusion=False,
    )
    return MoCMemoryAttention(config, layer_number=1).train()


def copy_weights(ours: MoCMemoryAttention, paper_layer: PaperMemoryLayer) -> None:
    """Give the paper's layer our weights (W_O drawn non-zero so every path has a gradient)."""
    s = ours.config.moc_num_shared_chapters
    with torch.no_grad():
        ours.linear_o.weight.normal_(0, 0.02)
        ours.router.bias.normal_(0, 0.1)
        memory = paper_layer.bank.base_bank.memory
        bank = torch.cat([ours.own_bank.shared, ours.own_bank.routed]).reshape_as(memory)
        memory.copy_(bank)
        for name in ("q", "k", "v", "o"):
            getattr(paper_layer.attn, f"{name}_proj").weight.copy_(getattr(ours, f"linear_{name}").weight)
        # The paper scores all C chapters and masks the shared ones: its rows S.. are our routed rows.
        paper_layer.router.router.weight[s:].copy_(ours.router.weight)
        paper_layer.router.router.bias[s:].copy_(ours.router.bias)


def ours_step(ours: MoCMemoryAttention, hidden_sbh: torch.Tensor, probe_sbh: torch.Tensor) -> torch.Tensor:
    """One forward+backward of our layer; the router losses enter through megatron's aux-loss scaler."""
    out, _ = ours(hidden_sbh)
    (out * probe_sbh).sum().backward()
    return out


def paper_step(paper_layer: PaperMemoryLayer, hidden_bsh: torch.Tensor, probe_bsh: torch.Tensor) -> torch.Tensor:
    """One forward+backward of the paper's layer, router losses added to the loss as its trainer does."""
    out, aux = paper_layer(hidden_bsh)
    ((out * probe_bsh).sum() + aux).backward()
    return out


def compare(ours: MoCMemoryAttention, paper_layer: PaperMemoryLayer, hidden_sbh: torch.Tensor, hidden_bsh: torch.Tensor,
            probe_sbh: torch.Tensor, probe_bsh: torch.Tensor) -> dict[str, float]:
    """Relative differences of the output and the gradients, the router losses left out (they differ)."""
    zero_grads(ours, hidden_sbh)
    zero_grads(paper_layer, hidden_bsh)
    ours.eval()  # no router losses
    out_ours, _ = ours(hidden_sbh)
    (out_ours * probe_sbh).sum().backward()
    ours.train()
    out_paper, _ = paper_layer(hidden_bsh)
    (out_paper * probe_bsh).sum().backward()
    s = ours.config.moc_num_shared_chapters
    pairs = {
        "output": (out_ours.detach().transpose(0, 1), out_paper.detach()),
        "input grad": (hidden_sbh.grad.transpose(0, 1), hidden_bsh.grad),
        "bank grad": (torch.cat([ours.own_bank.shared.grad, ours.own_bank.routed.grad]).flatten(),
                      paper_layer.bank.base_bank.memory.grad.flatten()),
        "router grad": (ours.router.weight.grad, paper_layer.router.router.weight.grad[s:]),
        "W_Q grad": (ours.linear_q.weight.grad, paper_layer.attn.q_proj.weight.grad),
        "W_K grad": (ours.linear_k.weight.grad, paper_layer.attn.k_proj.weight.grad),
    }
    out = {name: ((a - b).abs().max() / b.abs().max()).item() for name, (a, b) in pairs.items()}
    zero_grads(ours, hidden_sbh)
    zero_grads(paper_layer, hidden_bsh)
    return out


def zero_grads(module: torch.nn.Module, *tensors: torch.Tensor) -> None:
    """Drop every gradient (each step then allocates its own, as a training step would after zero_grad)."""
    for p in module.parameters():
        p.grad = None
    for t in tensors:
        t.grad = None


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit status."""
    args = parse_args(argv)
    root = Path(args.paper_code)
    try:
        paper = load_paper_modules(root)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from moc_megatron.memory.aux_losses import pop_chapter_load
    from moc_megatron.platform import initialize_distributed

    initialize_distributed()
    torch.manual_seed(0)
    ours = build_ours(args)
    paper_layer = PaperMemoryLayer(paper, args, eps=ours.config.layernorm_epsilon).train()
    copy_weights(ours, paper_layer)

    b, s, h = args.batch, args.seq, args.hidden
    hidden_bsh = torch.randn(b, s, h, requires_grad=True)
    hidden_sbh = hidden_bsh.detach().transpose(0, 1).contiguous().requires_grad_(True)
    probe_bsh = torch.randn(b, s, h)
    probe_sbh = probe_bsh.transpose(0, 1).contiguous()

    diffs = compare(ours, paper_layer, hidden_sbh, hidden_bsh, probe_sbh, probe_bsh)

    def run_ours() -> None:
        zero_grads(ours, hidden_sbh)
        ours_step(ours, hidden_sbh, probe_sbh)
        pop_chapter_load(ours)
        clear_aux_losses_tracker()

    def run_paper() -> None:
        zero_grads(paper_layer, hidden_bsh)
        paper_step(paper_layer, hidden_bsh, probe_bsh)

    steps = {"ours": run_ours, "paper": run_paper}
    if args.only:
        steps = {args.only: steps[args.only]}
    times = time_interleaved(steps, args.warmup, args.iters)

    n_sel = (args.shared + args.top_k) * args.chapter_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU")
    print(f"config: hidden {h}, {args.heads} heads, {args.chapters} chapters x {args.chapter_size} tokens "
          f"({args.shared} shared), top-{args.top_k}, batch {b}, seq {s}, sequence routing, paper gating "
          f"(N_sel = {n_sel})")
    print("same math (router losses left out of this check; max |ours - paper| / max |paper|): "
          + ", ".join(f"{name} {value:.1e}" for name, value in diffs.items()))
    print("differences kept: the paper's router also scores the shared chapter (masked) and computes an MSE "
          "auxiliary loss and the entropy; its memory gradient checkpointing is off here")
    wall = {name: statistics.median(t["wall"]) for name, t in times.items()}
    cpu = {name: statistics.median(t["cpu"]) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:>6}: median {wall[name]:8.2f} ms wall (min {min(t['wall']):.2f}, max {max(t['wall']):.2f}), "
              f"median {cpu[name]:8.2f} ms process CPU; {args.iters} runs after {args.warmup} warmup")
    if len(wall) == 2:
        print(f"speedup (paper / ours): {wall['paper'] / wall['ours']:.2f}x wall-clock, "
              f"{cpu['paper'] / cpu['ours']:.2f}x CPU time")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for _ in range(5):
                run_ours()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    return 0


if __name__ == "__main__":
    sys.exit(main())
