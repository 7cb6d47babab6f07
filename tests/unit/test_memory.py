"""The memory read against a naive reference written here, routing, causality, aux losses, init."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker

from moc_megatron.config import MoCConfig
from moc_megatron.memory.aux_losses import pop_chapter_load, set_aux_loss_scale
from moc_megatron.memory.chapter_attention import chapter_attention, merge_partials
from moc_megatron.memory.memory_attention import MoCMemoryAttention
from moc_megatron.memory.router import pool_routing_units

pytestmark = pytest.mark.usefixtures("mcore_world")

HIDDEN, HEADS, T, SEQ, BATCH = 32, 4, 4, 12, 3


def make_config(**overrides) -> MoCConfig:
    base = dict(
        num_layers=2, hidden_size=HIDDEN, num_attention_heads=HEADS, moc_memory_layers=[0],
        moc_num_chapters=9, moc_num_shared_chapters=1, moc_top_k=3, moc_chapter_size=T,
        moc_shared_bank=False, moc_chunk_size=4, use_cpu_initialization=True, params_dtype=torch.float64,
    )
    base.update(overrides)
    return MoCConfig(**base)


def make_module(config: MoCConfig, seed: int = 0) -> MoCMemoryAttention:
    torch.manual_seed(seed)
    module = MoCMemoryAttention(config, layer_number=1).double()
    with torch.no_grad():  # W_O starts at zero; a random one makes the outputs comparable
        module.linear_o.weight.normal_(0, 0.2)
        module.router.bias.normal_(0, 0.5)
        module.shared_norm.weight.uniform_(0.5, 1.5)
        module.routed_norm.weight.uniform_(0.5, 1.5)
    return module


def naive_memory_read(module: MoCMemoryAttention, hidden: torch.Tensor) -> torch.Tensor:
    """Per unit: concatenate the chosen chapters, weight, project, one softmax (or one per chapter)."""
    cfg = module.config
    s, b, h = hidden.shape
    bank = module.bank
    e, heads, groups = cfg.moc_head_dim, cfg.moc_num_heads, cfg.moc_num_query_groups

    def project(mem, weight):  # [m, d] -> [m, heads, e], key/value heads shared by their query group
        return (mem @ weight.t()).view(-1, groups, e).repeat_interleave(heads // groups, dim=1)
    feats = pool_routing_units(hidden, cfg.moc_routing_unit, cfg.moc_chunk_size)
    logits = feats @ module.router.weight.t() + module.router.bias
    probs = torch.softmax(logits, dim=-1)
    top_p, top_c = torch.topk(probs, cfg.moc_top_k, dim=-1)
    routed_w = top_p / top_p.sum(-1, keepdim=True) * cfg.moc_routed_scaling_factor
    shared_w = torch.ones(len(feats), cfg.moc_num_shared_chapters, dtype=hidden.dtype)
    total = routed_w.sum(-1, keepdim=True) + shared_w.sum(-1, keepdim=True)
    routed_w, shared_w = routed_w / total, shared_w / total
    q_all = (hidden @ module.linear_q.weight.t()).view(s, b, heads, e)
    out = torch.zeros(s, b, heads, e, dtype=hidden.dtype)
    per_seq = len(feats) // b
    unit_len = {"sequence": s, "token": 1, "chunk": cfg.moc_chunk_size}[cfg.moc_routing_unit]
    for n in range(len(feats)):
        seq, j = divmod(n, per_seq)
        positions = range(j * unit_len, min((j + 1) * unit_len, s))
        chapters = [module.shared_norm(bank.shared[c]) for c in range(cfg.moc_num_shared_chapters)]
        chapters += [module.routed_norm(bank.routed[c]) for c in top_c[n].tolist()]
        weights = torch.cat([shared_w[n], routed_w[n]])
        for t in positions:
            q = q_all[t, seq]  # [heads, e]
            if cfg.moc_gating == "paper":
                mem = torch.cat([c * w for c, w in zip(chapters, weights)])
                k, v = project(mem, module.linear_k.weight), project(mem, module.linear_v.weight)
                att = torch.softmax(torch.einsum("he,mhe->hm", q, k) / math.sqrt(e), dim=-1)
                out[t, seq] = torch.einsum("hm,mhe->he", att, v)
            else:
                for c, w in zip(chapters, weights):
                    k, v = project(c, module.linear_k.weight), project(c, module.linear_v.weight)
                    att = torch.softmax(torch.einsum("he,mhe->hm", q, k) / math.sqrt(e), dim=-1)
                    out[t, seq] += w * torch.einsum("hm,mhe->he", att, v)
    return out.reshape(s, b, heads * e) @ module.linear_o.weight.t()


CASES = [
    dict(moc_routing_unit="sequence", moc_gating="paper"),
    dict(moc_routing_unit="sequence", moc_gating="mixture"),
    dict(moc_routing_unit="chunk", moc_gating="paper"),
    dict(moc_routing_unit="token", moc_gating="mixture"),
    dict(moc_routing_unit="token", moc_gating="paper", moc_num_shared_chapters=0),
    dict(moc_routing_unit="chunk", moc_gating="mixture", moc_num_shared_chapters=2, moc_chunk_size=5),
    dict(moc_routing_unit="sequence", moc_gating="paper", moc_num_query_groups=2),
]


@pytest.mark.parametrize("overrides", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_matches_naive_reference_forward_and_backward(overrides):
    config = make_config(**overrides)
    module = make_module(config)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64, requires_grad=True)
    module.eval()  # no aux losses: compare the memory read alone
    got, _ = module(hidden)
    want = naive_memory_read(module, hidden)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)

    grad_out = torch.randn_like(got)
    shared = [module.own_bank.shared] if module.own_bank.shared.requires_grad else []  # S = 0: empty buffer
    params = [module.own_bank.routed, *shared, module.router.weight, module.linear_q.weight,
              module.linear_k.weight, module.routed_norm.weight]
    got_grads = torch.autograd.grad(got, [hidden, *params[1:]], grad_out, retain_graph=True,
                                    allow_unused=True, materialize_grads=True)
    module.own_bank.routed.grad = None
    got.backward(grad_out)
    got_bank_grad = module.own_bank.routed.grad.clone()
    want_grads = torch.autograd.grad(want, [hidden, module.own_bank.routed, *params[1:]], grad_out,
                                     allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(got_grads[0], want_grads[0], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(got_bank_grad, want_grads[1], rtol=1e-8, atol=1e-10)
    for g, w in zip(got_grads[1:], want_grads[2:]):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    router_grad = want_grads[2 + len(shared)]
    assert module.router.weight.requires_grad and router_grad.abs().sum() > 0, "router gets no LM gradient"


def test_bank_gradient_only_on_selected_chapters():
    config = make_config(moc_routing_unit="sequence", moc_top_k=2)
    module = make_module(config)
    hidden = torch.randn(SEQ, 1, HIDDEN, dtype=torch.float64)
    out, _ = module.eval()(hidden)
    out.sum().backward()
    feats = pool_routing_units(hidden, "sequence", 4)
    chosen = torch.topk(feats @ module.router.weight.t() + module.router.bias, 2).indices.flatten().tolist()
    rows_with_grad = (module.own_bank.routed.grad.abs().sum(dim=(1, 2)) > 0).nonzero().flatten().tolist()
    assert sorted(rows_with_grad) == sorted(chosen)


def test_gradient_lands_in_main_grad_when_ddp_gave_one():
    module = make_module(make_config())
    bank = module.own_bank.routed
    bank.main_grad = torch.zeros_like(bank)
    bank.grad_added_to_main_grad = False
    hooked = []
    # megatron's DDP hooks the parameter's gradient accumulator; with overlapped reduction it needs it to fire
    accumulator = bank.expand_as(bank).grad_fn.next_functions[0][0]  # kept alive, as DDP does
    accumulator.register_hook(lambda *_: hooked.append(True))
    out, _ = module.eval()(torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64))
    out.sum().backward()
    assert bank.main_grad.abs().sum() > 0 and bank.grad_added_to_main_grad and hooked


def test_top_k_selection_and_shared_chapters_always_read():
    config = make_config(moc_num_shared_chapters=1, moc_routed_scaling_factor=2.5)
    module = make_module(config)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64)
    routing = module.router(pool_routing_units(hidden, "sequence", 4))
    assert routing.chapters.shape == (BATCH, 3)
    # the selected chapters are exactly the 3 most probable ones
    kth = routing.probs.sort(dim=-1, descending=True).values[:, 2:3]
    assert (routing.probs.gather(1, routing.chapters) >= kth).all()
    assert len(set(routing.chapters[0].tolist())) == 3
    from moc_megatron.memory.router import chapter_weights

    shared_w, routed_w = chapter_weights(routing, config)
    torch.testing.assert_close(shared_w, torch.full_like(shared_w, 1 / 3.5))
    torch.testing.assert_close(routed_w.sum(-1), torch.full((BATCH,), 2.5 / 3.5, dtype=routed_w.dtype))
    # the shared chapter is read: changing it changes every unit's output
    module.eval()
    before, _ = module(hidden)
    with torch.no_grad():
        module.own_bank.shared.add_(1.0)
    after, _ = module(hidden)
    assert (before - after).abs().amax(dim=(0, 2)).min() > 1e-6


@pytest.mark.parametrize("unit", ["chunk", "token"])
def test_causal_routing_never_looks_ahead(unit):
    module = make_module(make_config(moc_routing_unit=unit, moc_chunk_size=4)).eval()
    hidden = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64)
    base, _ = module(hidden)
    for t in (1, 5, 9):
        changed = hidden.clone()
        changed[t:] += torch.randn_like(changed[t:]) * 3
        out, _ = module(changed)
        torch.testing.assert_close(out[:t], base[:t], rtol=0, atol=1e-12)
        assert (out[t:] - base[t:]).abs().max() > 1e-6


def test_sequence_routing_sees_future_tokens():
    """Documented behaviour of the paper's routing: a later token can change an earlier output."""
    module = make_module(make_config(moc_routing_unit="sequence", moc_num_chapters=17, moc_top_k=1)).eval()
    hidden = torch.randn(SEQ, 1, HIDDEN, dtype=torch.float64)
    base, _ = module(hidden)
    changed = False
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        other = hidden.clone()
        other[-1] += torch.randn(HIDDEN, generator=g, dtype=torch.float64) * 50
        out, _ = module(other)
        changed |= bool((out[0] - base[0]).abs().max() > 1e-6)
    assert changed


def test_w_o_zero_initialised_so_a_new_memory_layer_is_an_identity():
    torch.manual_seed(0)
    module = MoCMemoryAttention(make_config(params_dtype=torch.float32), layer_number=1)
    assert module.linear_o.weight.abs().sum() == 0
    out, bias = module(torch.randn(SEQ, BATCH, HIDDEN))
    assert bias is None and out.abs().sum() == 0


def test_aux_losses_values_and_gradients():
    config = make_config(moc_routing_unit="token", moc_load_balance_coeff=0.01, moc_z_loss_coeff=0.001)
    module = make_module(config).train()
    with torch.no_grad():
        module.linear_o.weight.zero_()  # no LM gradient: whatever reaches the router is the aux losses'
    clear_aux_losses_tracker()
    pop_chapter_load(module)
    set_aux_loss_scale(torch.ones(1))  # a training run earlier in this process may have left another scale
    hidden = torch.randn(SEQ, BATCH, HIDDEN, dtype=torch.float64)
    out, _ = module(hidden)
    out.sum().backward()
    feats = pool_routing_units(hidden, "token", 4)
    logits = feats @ module.router.weight.t() + module.router.bias
    probs = torch.softmax(logits, -1)
    chosen = torch.topk(probs, 3).indices
    routed = config.moc_num_routed_chapters
    f = torch.bincount(chosen.flatten(), minlength=routed).double() / chosen.numel()
    p = probs.mean(0)
    want_lb = routed * (f * p).sum()
    want_z = (torch.logsumexp(logits, -1) ** 2).mean()
    tracker = get_moe_layer_wise_logging_tracker()
    torch.testing.assert_close(tracker["moc_load_balancing_loss"]["values"][0].double(), want_lb.detach())
    torch.testing.assert_close(tracker["moc_z_loss"]["values"][0].double(), want_z.detach())
    want_grad = torch.autograd.grad(0.01 * want_lb + 0.001 * want_z, module.router.weight)[0]
    torch.testing.assert_close(module.router.weight.grad, want_grad)
    loads = pop_chapter_load(module)
    assert loads[1].sum() == chosen.numel()


def test_merged_partials_equal_one_softmax_over_all_chapters():
    """What expert parallelism relies on: attention split over chapter owners merges exactly."""
    torch.manual_seed(0)
    n, u, h, e, c, k = 5, 3, 4, 8, 6, 4
    q = torch.randn(n, u, h, e, dtype=torch.float64)
    keys, values = torch.randn(c, T, h, e, dtype=torch.float64), torch.randn(c, T, h, e, dtype=torch.float64)
    sel = torch.stack([torch.randperm(c)[:k] for _ in range(n)])
    w = torch.rand(n, k, dtype=torch.float64)
    for gating in ("paper", "mixture"):
        full, _ = chapter_attention(q, keys, values, sel, w, gating, 0.3)
        owner = sel % 2
        parts = [chapter_attention(q, keys, values, torch.where(owner == r, sel, -1), w, gating, 0.3)
                 for r in range(2)]
        outs = torch.cat([p[0] for p in parts])
        lses = None if gating == "mixture" else torch.cat([p[1] for p in parts])
        merged = merge_partials(outs, lses, torch.arange(n).repeat(2), n)
        torch.testing.assert_close(merged, full)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(moc_num_chapters=10, expert_model_parallel_size=2), "do not divide evenly"),
        (dict(moc_top_k=9), "moc_top_k"),
        (dict(moc_memory_layers=[5]), "outside"),
        (dict(moc_routing_unit="page"), "moc_routing_unit"),
    ],
)
def test_bad_memory_config_is_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        make_config(**overrides)
