"""model.py on CPU: MLA and its caches, DeepSeekMoE routing and balancing, MTP, configs."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import ops
from model import ModelConfig, MoE, Transformer, token_loss

SMALL = dict(vocab_size=97, block_size=24, n_layer=3, n_embd=64, n_head=4, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, dense_inter_dim=96,
             n_dense_layers=1, n_routed_experts=8, n_shared_experts=1, n_activated_experts=3,
             moe_inter_dim=24)


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**SMALL, **overrides}))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize('attn,q_lora_rank', [('mla', 0), ('mla', 20), ('mha', 0)])
def test_causal(attn, q_lora_rank):
    m = make(attn=attn, q_lora_rank=q_lora_rank).eval()
    x = torch.randint(0, 97, (2, 24))
    x2 = x.clone()
    x2[:, 15:] = torch.randint(0, 97, (2, 9))
    a, b = m(x, x)[0], m(x2, x2)[0]
    assert torch.allclose(a[:, :15], b[:, :15], atol=1e-6)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize('attn,mode,q_lora_rank', [('mla', 'latent', 0), ('mla', 'latent', 20),
                                                   ('mla', 'naive', 0), ('mha', 'naive', 0)])
def test_cached_decoding_matches_full_forward(attn, mode, q_lora_rank):
    m = make(attn=attn, q_lora_rank=q_lora_rank).eval()
    x = torch.randint(0, 97, (3, 24))
    full = m(x, x)[0]
    m.setup_cache(3, mode)
    steps = [m(x[:, :7])[0][:, -1]] + [m(x[:, t:t + 1], start_pos=t)[0][:, -1] for t in range(7, 24)]
    m.clear_cache()
    assert rel_err(torch.stack(steps, 1), full[:, 6:]) < 1e-5


def test_absorbed_matches_naive_fp32():
    m = make(q_lora_rank=20).eval()
    x = torch.randint(0, 97, (2, 20))
    outs = {}
    for mode in ('latent', 'naive'):
        m.setup_cache(2, mode)
        outs[mode] = torch.cat([m(x[:, :5])[0]] + [m(x[:, t:t + 1], start_pos=t)[0] for t in range(5, 20)], 1)
        m.clear_cache()
    assert rel_err(outs['latent'], outs['naive']) < 1e-5


def test_latent_cache_size():
    m = make()
    c = m.cfg
    m.setup_cache(2, 'latent')
    latent = m.cache_values_per_token()
    assert latent == c.n_layer * (c.kv_lora_rank + c.qk_rope_head_dim)
    assert sum(t.numel() for layer in m.layers for t in layer.attn.cache) == 2 * c.block_size * latent
    m.setup_cache(2, 'naive')
    naive = m.cache_values_per_token()
    assert naive == c.n_layer * c.n_head * (c.qk_head_dim + c.v_head_dim)
    print(f"\nlatent cache {latent} values/token vs per-head K/V {naive}: {naive / latent:.2f}x smaller")
    # DeepSeek-V3's own shape: 512 + 64 per layer against 128 heads of 192 + 128
    v3 = dataclasses.replace(c, n_head=128, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128)
    print(f"at V3's shape: {128 * (192 + 128)} vs {512 + 64} per layer: {128 * 320 / 576:.1f}x smaller")
    assert v3.kv_lora_rank + v3.qk_rope_head_dim < v3.n_head * (v3.qk_head_dim + v3.v_head_dim)


def explicit_moe(moe, x):
    """Slow reference: every token, every chosen expert, one at a time."""
    weights, indices, _, _ = moe.gate(x)
    out = torch.zeros_like(x)
    for t in range(x.size(0)):
        for w, e in zip(weights[t], indices[t]):
            h = F.silu(x[t] @ moe.w1[e]) * (x[t] @ moe.w3[e])
            out[t] += w * (h @ moe.w2[e])
    return out + moe.shared_experts(x)


@pytest.mark.parametrize('score_func,groups', [('softmax', (1, 1)), ('sigmoid', (1, 1)), ('sigmoid', (4, 2)),
                                               ('softmax', (2, 1))])
def test_moe_matches_explicit_loop(score_func, groups):
    torch.manual_seed(1)
    cfg = ModelConfig(**{**SMALL, 'score_func': score_func, 'n_expert_groups': groups[0],
                         'n_limited_groups': groups[1], 'route_scale': 1.5})
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.gate.bias.normal_(std=0.05)
    x = torch.randn(2, 11, cfg.n_embd)
    y, (balance, z), load = moe(x)
    assert rel_err(y.view(22, -1), explicit_moe(moe, x.view(22, -1))) < 1e-5
    assert load.sum().item() == 22 * cfg.n_activated_experts
    assert balance.item() > 0


def test_every_token_gets_k_distinct_experts():
    moe = make().layers[1].ffn
    weights, indices, scores, _ = moe.gate(torch.randn(50, 64))
    assert indices.shape == (50, 3)
    assert all(len(set(row)) == 3 for row in indices.tolist())
    assert torch.equal(weights, scores.gather(1, indices))  # softmax gates: the chosen probabilities
    assert torch.equal(indices.sort(-1)[0], scores.topk(3, -1)[1].sort(-1)[0])


def test_bias_changes_selection_not_weights():
    moe = make(score_func='sigmoid').layers[1].ffn
    x = torch.randn(40, 64)
    w0, i0, scores, _ = moe.gate(x)
    moe.gate.bias[5] = 10.0  # expert 5 now wins every token's selection
    w1, i1, _, _ = moe.gate(x)
    assert (i1 == 5).any(-1).all() and not (i0 == 5).any(-1).all()
    # the weights still come from the unbiased scores of the chosen experts
    expect = scores.gather(1, i1)
    assert torch.allclose(w1, expect / expect.sum(-1, keepdim=True))


def test_overloaded_expert_bias_goes_down():
    m = make()
    load = torch.ones(len(m.moe_layers()), 8)
    load[0, 2] = 30.0
    m.update_router_biases(load)
    bias = m.moe_layers()[0].gate.bias
    assert bias[2] < 0 and (bias[[0, 1, 3]] > 0).all()


def test_group_limited_routing_stays_in_allowed_groups():
    cfg = ModelConfig(**{**SMALL, 'n_routed_experts': 16, 'n_expert_groups': 4, 'n_limited_groups': 2,
                         'n_activated_experts': 4, 'score_func': 'sigmoid'})
    torch.manual_seed(0)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(200, cfg.n_embd)
    _, indices, scores, _ = moe.gate(x)
    groups = indices // 4
    assert all(len(set(row)) <= 2 for row in groups.tolist())
    best_groups = scores.view(200, 4, 4).topk(2, -1)[0].sum(-1).topk(2, -1)[1].sort(-1)[0]
    for row, allowed in zip(groups.tolist(), best_groups.tolist()):
        assert set(row) <= set(allowed)


@pytest.mark.parametrize('score_func,groups', [('softmax', (1, 1)), ('sigmoid', (4, 2)), ('softmax', (4, 1))])
def test_compiled_gate_routes_as_eager(score_func, groups):
    """Under torch.compile the router's top-k is k argmax passes (model.top_k): the same experts, the
    same order and weights as torch.topk's."""
    cfg = ModelConfig(**{**SMALL, 'n_routed_experts': 16, 'n_expert_groups': groups[0], 'n_limited_groups': groups[1],
                         'n_activated_experts': 4, 'score_func': score_func})
    torch.manual_seed(0)
    gate = MoE(cfg).gate
    torch.nn.init.normal_(gate.weight, std=0.5)
    gate.bias.normal_(std=0.05)
    torch._dynamo.reset()
    for n in (1, 37, 200):
        x = torch.randn(n, cfg.n_embd)
        (w0, i0, _, _), (w1, i1, _, _) = gate(x), torch.compile(gate)(x)
        assert torch.equal(i0, i1) and torch.allclose(w0, w1)


def test_compiled_experts_run_w1_w3_as_one_matmul_with_the_same_result(monkeypatch):
    """Training under torch.compile, w1|w3 is one grouped matmul (MoE.gate_up_in_one), on float32
    weights and on bf16 ones: the same output and gradients as the two matmuls of eager, over ragged
    groups with empty experts. Frozen experts (LoRA's) keep the per-weight matmuls."""
    torch.manual_seed(0)
    moe = MoE(ModelConfig(**SMALL))
    for w in (moe.w1, moe.w2, moe.w3):
        torch.nn.init.normal_(w, std=0.2)
    offsets = torch.tensor([5, 0, 13, 1, 7, 0, 9, 4]).cumsum(0).int()
    x = torch.randn(int(offsets[-1]), SMALL['n_embd'], dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn_like(x)
    decisions, decide = [], MoE.gate_up_in_one

    def spy(self):
        decisions.append(decide(self))
        return decisions[-1]
    monkeypatch.setattr(MoE, 'gate_up_in_one', spy)

    def grads(fn):
        for t in (x, moe.w1, moe.w2, moe.w3):
            t.grad = None
        fn(x, offsets).backward(grad_y)
        return [t.grad.float() for t in (x, moe.w1, moe.w2, moe.w3)]
    eager = grads(moe.routed_experts)
    torch._dynamo.reset()
    compiled = grads(torch.compile(moe.routed_experts))
    torch._dynamo.reset()
    moe.to(torch.bfloat16)  # train.py's bf16 working copies of the weights: one matmul too
    on_copies = grads(torch.compile(moe.routed_experts))
    assert decisions == [False, True, True]
    for a, b, c in zip(eager, compiled, on_copies):
        assert (a - b).abs().max() <= 2e-2 * a.abs().max() and (a - c).abs().max() <= 2e-2 * a.abs().max()
    moe.requires_grad_(False)
    torch._dynamo.reset()
    torch.compile(moe.routed_experts)(x, offsets)
    assert decisions[-1] is False


@pytest.mark.parametrize('return_logits', [True, False])
def test_training_forward_without_logits_sends_no_logits_gradient_into_the_compiled_backward(return_logits):
    """A compiled graph gives each differentiable output a tangent in its backward, a zero tensor where
    that output got no gradient: for the logits, a fill and an add over B*T*vocab a micro-step."""
    from torch._dynamo.backends.common import aot_autograd
    tangent_shapes = []

    def record_tangents(gm, _example_inputs):
        tangent_shapes.extend(tuple(n.meta['val'].shape) for n in gm.graph.nodes
                              if n.op == 'placeholder' and n.name.startswith('tangents'))
        return gm
    m, x = make(), torch.randint(0, 97, (2, 24))
    _, eager_loss, _ = m(x, x)
    torch._dynamo.reset()
    logits, loss, _ = torch.compile(m, backend=aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=record_tangents))(
        x, x, return_logits=return_logits)
    loss.backward()
    assert torch.allclose(loss, eager_loss)
    assert (logits is not None) == return_logits
    assert ((2, 24, 97) in tangent_shapes) == return_logits


def test_idle_experts_get_zero_gradient():
    m = make()
    moe = m.layers[1].ffn
    moe.gate.bias[:3] = 100.0  # every token picks experts 0, 1, 2: experts 3..7 get no token
    x = torch.randint(0, 97, (2, 8))
    _, loss, stats = m(x, x)
    loss.backward()
    assert stats['load'][0, 3:].sum() == 0
    per_expert = moe.w1.grad.abs().sum((1, 2)) + moe.w2.grad.abs().sum((1, 2))
    assert (per_expert[3:] == 0).all() and (per_expert[:3] > 0).all()


@pytest.mark.parametrize('score_func', ['softmax', 'sigmoid'])
def test_both_gates_train(score_func):
    m = make(score_func=score_func)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (4, 24))
    first = None
    for _ in range(15):
        loss = m(x, x.roll(-1, 1))[1]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5


def test_mtp_loss_only_in_training():
    m = make(mtp_depth=1, mtp_lambda=0.5)
    x = torch.randint(0, 97, (2, 24))
    _, loss, stats = m(x, x)
    assert stats['mtp'] > 0
    assert torch.allclose(loss, stats['ce'] + stats['balance'] + stats['z'] + 0.5 * stats['mtp'])
    plain = make(mtp_depth=0)
    assert m.num_params() == plain.num_params()  # the MTP module is not part of the inference model
    logits, loss, stats = m(x)
    assert loss is None and stats is None and logits.shape == (2, 1, 97)


@pytest.mark.parametrize('packed', [False, True])
def test_mtp_loss_is_the_next_next_token_loss_over_t_minus_1_positions(packed):
    """The MTP block runs over all T positions with the last one unscored: the same loss, and the same
    gradients, as over the T-1 positions that have a token i+1 (ignored targets and packed documents too)."""
    m = make(mtp_depth=1).double().eval()
    x = torch.randint(0, 97, (2, 24))
    y = x.roll(-1, 1)
    y[0, 5] = -1
    doc_ids = torch.tensor([[0] * 10 + [1] * 14, [0] * 24]) if packed else None
    h = m.trunk(x, attn_mask=m.attention_mask(doc_ids))[0]
    ours = m.mtp_loss(h, x, y, m.attention_mask(doc_ids))
    short_mask = m.attention_mask(None if doc_ids is None else doc_ids[:, :-1])
    short = m.mtp(h[:, :-1], m.embed(x[:, 1:]), *m.rope_at(None, 23), attn_mask=short_mask)
    reference = token_loss(m.head(short), y[:, 1:])
    assert torch.allclose(ours, reference, rtol=1e-6)
    grads = [torch.autograd.grad(loss, m.mtp.proj.weight, retain_graph=True)[0] for loss in (ours, reference)]
    assert torch.allclose(*grads, rtol=1e-6, atol=1e-9)


def test_router_z_loss():
    m = make(router_z_loss=1e-3)
    x = torch.randint(0, 97, (2, 24))
    assert m(x, x)[2]['z'] > 0
    assert make()(x, x)[2]['z'] == 0


@pytest.mark.parametrize('field,value', [('kv_lora_rank', 0), ('n_activated_experts', 9), ('n_expert_groups', 3),
                                         ('qk_rope_head_dim', 7), ('score_func', 'relu'), ('n_limited_groups', 2),
                                         ('n_dense_layers', 4)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**SMALL, field: value})


def test_param_counts_and_optimizer_groups():
    m = make()
    c = m.cfg
    routed = 3 * c.n_embd * c.moe_inter_dim * c.n_routed_experts * (c.n_layer - c.n_dense_layers)
    assert m.num_params() - m.num_params(active=True) == routed * (8 - 3) // 8
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), 'cpu')
    no_decay = {id(p) for p in opt.param_groups[1]['params']}
    assert all(p.dim() < 2 for p in opt.param_groups[1]['params']) and no_decay
    assert id(m.norm.weight) in no_decay
    assert all(not n.endswith('gate.bias') for n, _ in m.named_parameters())  # a buffer, not trained
    assert m.estimate_mfu(1e5, 'cpu') is None and m.flops_per_token() > 6 * m.num_params(active=True)


def test_dense_baseline():
    m = make(attn='mha', n_routed_experts=0)
    assert not m.moe_layers()
    x = torch.randint(0, 97, (2, 24))
    _, loss, stats = m(x, x)
    assert stats['load'] is None and loss.item() > 0


def test_references_agree_with_definitions():
    """The CPU references behind the seams, on ragged shapes with idle experts."""
    torch.manual_seed(0)
    x, ids = torch.randn(13, 7), torch.randint(0, 3, (13, 2))  # experts 3..5 get nothing
    xs, offsets, row_map = ops.moe_permute(x, ids, 6)
    assert offsets.tolist()[-3:] == [26, 26, 26] and offsets.dtype == torch.int32
    assert torch.equal(xs[row_map.long()], x.repeat_interleave(2, 0))
    ends = offsets.tolist()
    for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)):
        assert (ids.flatten()[torch.argsort(row_map)[s:t]] == e).all()
    q, qp = torch.randn(2, 3, 8), torch.randn(2, 3, 4)
    ck, kp = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
    out = ops.latent_decode(q, qp, ck, kp, torch.tensor([1, 5], dtype=torch.int32), 0.5)
    assert torch.allclose(out[0], ck[0, :1].expand(3, 8))  # a single cached token: its value
    p = ((q[1] @ ck[1].T + qp[1] @ kp[1].T) * 0.5).softmax(-1)
    assert torch.allclose(out[1], p @ ck[1], atol=1e-6)
