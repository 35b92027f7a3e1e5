"""Sliding-window attention (attn_window): the band in training/prefill, and cached decoding. On CUDA,
flex_attention's kernel against SDPA's masked path: `python -m pytest -q tests/test_window.py -k flex`."""
import pytest
import torch

import model
from engine import Engine, SamplingParams
from model import ModelConfig, Transformer, cached_attention

SMALL = dict(vocab_size=97, block_size=24, n_layer=3, n_embd=64, n_head=4, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, dense_inter_dim=96,
             n_dense_layers=1, n_routed_experts=8, n_shared_experts=1, n_activated_experts=3,
             moe_inter_dim=24)
KINDS = [('mla', 'latent'), ('mla', 'naive'), ('mha', 'naive')]


def make(window, seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**SMALL, **overrides, 'attn_window': window})).eval()


def cached_logits(m, x, mode, prefill):
    """Logits at every position from prefill tokens, then one token at a time through the cache."""
    m.setup_cache(x.size(0), mode)
    try:
        steps = [m(x[:, :prefill], x[:, :prefill])[0]]
        steps += [m(x[:, t:t + 1], start_pos=t)[0] for t in range(prefill, x.size(1))]
    finally:
        m.clear_cache()
    return torch.cat(steps, 1)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize('attn,mode', KINDS)
def test_window_covering_the_sequence_is_full_attention(attn, mode):
    x = torch.randint(0, 97, (2, 24))
    full = make(0, attn=attn)
    for window in (24, 100):
        m = make(window, attn=attn)
        assert torch.equal(m(x, x)[0], full(x, x)[0])
        assert torch.equal(cached_logits(m, x, mode, 9), cached_logits(full, x, mode, 9))


@pytest.mark.parametrize('attn', ['mla', 'mha'])
def test_band_sees_exactly_the_last_window_tokens(attn):
    """With one layer (and RoPE, which is relative), the logits at t under a window w are those of
    full attention over the w tokens ending at t alone."""
    w, x = 5, torch.randint(0, 97, (2, 24))
    windowed, full = make(w, attn=attn, n_layer=1), make(0, attn=attn, n_layer=1)
    logits = windowed(x, x)[0]
    for t in range(w - 1, 24):
        alone = full(x[:, t - w + 1:t + 1], x[:, t - w + 1:t + 1])[0][:, -1]
        assert rel_err(logits[:, t], alone) < 1e-5, t
    assert rel_err(logits, full(x, x)[0]) > 1e-3  # and the window did change something


@pytest.mark.parametrize('attn,mode', KINDS)
@pytest.mark.parametrize('prefill', [3, 9])
def test_cached_decoding_matches_full_forward_past_the_window(attn, mode, prefill):
    m, x = make(5, attn=attn, q_lora_rank=20 if attn == 'mla' else 0), torch.randint(0, 97, (3, 24))
    assert rel_err(cached_logits(m, x, mode, prefill), m(x, x)[0]) < 1e-5


@pytest.mark.parametrize('attn,mode,speculative', [*[(a, m, False) for a, m in KINDS], ('mla', 'latent', True)])
def test_engine_with_window_decodes_what_the_full_forward_does(attn, mode, speculative):
    """Ragged prompts sharing a batch, greedy, well past a window of 4 and past block_size (24): the
    same tokens as the full forward (fp64, so no near-tie can flip an argmax), from a cache that is a
    ring of the window's length whatever the sequence's."""
    m = make(4, attn=attn, mtp_depth=int(speculative)).double()
    chars = ''.join(chr(33 + i) for i in range(90))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 90, (n,), generator=g).tolist() for n in (1, 5, 9, 3)]
    engine = Engine(m, {'kind': 'char', 'chars': chars}, max_batch=3, cache_mode=mode, speculative=speculative)
    assert all(c.size(1) == 4 + speculative for attn_ in m.attentions() for c in attn_.cache)
    out = engine.generate(prompts, SamplingParams(max_tokens=40, temperature=0))
    m.clear_cache()
    for prompt, r in zip(prompts, out):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(40):
                ids.append(int(m(torch.tensor([ids]))[0][0, -1, :90].argmax()))
        assert len(ids) > 24 and r.tokens == ids[len(prompt):]


def test_window_trains_and_is_validated():
    m = make(3, dropout=0.1).train()
    x = torch.randint(0, 97, (2, 24))
    m(x, x)[1].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match='attn_window'):
        ModelConfig(attn_window=-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_ring_cache_through_the_decode_kernel():
    """On CUDA the ring of the window goes through ops.latent_decode (all its entries visible): each
    step's logits equal the full forward's with the band mask, past the window and past block_size."""
    m = make(6).cuda()
    chars = ''.join(chr(33 + i) for i in range(90))
    e = Engine(m, {'kind': 'char', 'chars': chars}, max_batch=2)  # fp32 experts: no graphs
    for prompt in ([3, 4, 5], list(range(10, 30))):
        e.add_request(prompt, SamplingParams(max_tokens=40, temperature=0))
    e.step()
    e.step()  # one prompt a step into the ring
    for _ in range(36):
        contexts = [list(r.context) for r in e.active]
        logits, tokens = e.decode_step()
        with torch.no_grad(), e.uncached():
            for ctx, lg in zip(contexts, logits):
                ref = m(torch.tensor([ctx], device='cuda'))[0][0, -1, :90]
                torch.testing.assert_close(lg, ref, atol=2e-4, rtol=2e-4)
        e.emit(list(e.active), tokens, logits)
    assert max(len(r.context) for r in e.active) > 24


# -----------------------------------------------------------------------------
# flex_attention on CUDA (model.flex_ok): the same as SDPA with the dense band and document masks. Heads
# of n_head 4 and these shapes throughout, so that tests share flex's compiled kernels

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
HEADS = {'mla': dict(qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64),      # q/k 96, v 64
         'mla_v3': dict(qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),  # V3's: 192, 128
         'mha': dict(attn='mha', n_embd=256)}                                        # 64, 64


def flex_calls(monkeypatch):
    """Counts the calls that reach flex_attention (so that a comparison is not SDPA against itself),
    and lets flex compile for every dtype and head shape the tests use."""
    monkeypatch.setattr(torch._dynamo.config, 'recompile_limit', 64)
    calls, fused = [], model.fused_flex_attention
    monkeypatch.setattr(model, 'fused_flex_attention', lambda *args: calls.append(1) or fused(*args))
    return calls


def packed_doc_ids(B, T, g):
    """[B, T] document ids of ragged lengths (about 20 tokens each), numbered from 0 in each row."""
    return (torch.rand(B, T, generator=g, device='cuda') < 0.05).cumsum(1)


def poisoned(fn):
    """fn() right after NaN-filled blocks went back to the caching allocator: an output element a
    kernel forgets to write reads as NaN instead of a stale right answer."""
    junk = [torch.full((n,), float('nan'), device='cuda') for n in (2**16, 2**20, 2**23)]
    del junk
    return fn()


def no_worse(low, sdpa_low, exact):
    """Is low-precision flex's error against the fp32 result at most twice SDPA's own (rms, give or
    take 1e-3 of the result's rms, of at least 1: a gradient may be all zeros)?"""
    def rms(t):
        return t.float().square().mean().sqrt().item()
    return rms(low.float() - exact) <= 2 * rms(sdpa_low.float() - exact) + 1e-3 * max(rms(exact), 1.0)


def attention_and_grads(m, q, k, v, dy, doc_ids, use_flex, monkeypatch):
    """cached_attention from position 0 in m's first layer -> output, d/dq, d/dk, d/dv."""
    monkeypatch.setattr(model, 'USE_FLEX', use_flex)
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    y = poisoned(lambda: cached_attention(m.layers[0].attn, *inputs, attn_mask=m.attention_mask(doc_ids)))
    return (y, *poisoned(lambda: torch.autograd.grad(y, inputs, dy)))


@cuda
@pytest.mark.parametrize('kind,dtype', [('mla', torch.float32), ('mha', torch.float32),
                                        ('mla', torch.bfloat16), ('mha', torch.bfloat16), ('mla_v3', torch.bfloat16)])
def test_flex_kernel_matches_sdpa_band_mask(kind, dtype, monkeypatch):
    """cached_attention from position 0 through flex_attention: the output and the gradients with
    respect to q, k and v equal SDPA's with the dense masks, over packed documents or not, for
    lengths that are and are not multiples of flex's 128-token blocks and windows narrower than, and
    as wide as, the sequence. bf16: no further from SDPA's fp32 result than SDPA's own bf16 one."""
    calls, g, B = flex_calls(monkeypatch), torch.Generator('cuda').manual_seed(0), 2
    for T in (1, 37, 128, 300):
        for window in (1, 17, 64, 300):
            m = Transformer(ModelConfig(**{**SMALL, **HEADS[kind], 'block_size': T, 'attn_window': window,
                                           'n_layer': 1, 'n_routed_experts': 0})).cuda()
            (qk_dim, v_dim), H = m.cfg.attn_head_dims, m.cfg.n_head
            for docs in (False, True):
                case = f"T={T} window={window} docs={docs}"
                q, k, v, dy = (torch.randn(B, T, H, d, generator=g, device='cuda')
                               for d in (qk_dim, qk_dim, v_dim, v_dim))
                doc_ids = packed_doc_ids(B, T, g) if docs else None
                flex = attention_and_grads(m, *(t.to(dtype) for t in (q, k, v, dy)), doc_ids, True, monkeypatch)
                sdpa = attention_and_grads(m, *(t.to(dtype) for t in (q, k, v, dy)), doc_ids, False, monkeypatch)
                assert len(calls) == (window < T or docs), case
                calls.clear()
                exact = attention_and_grads(m, q, k, v, dy, doc_ids, False, monkeypatch) if dtype != torch.float32 else sdpa
                for name, a, b, ref in zip(('out', 'dq', 'dk', 'dv'), flex, sdpa, exact):
                    assert not a.isnan().any(), f"{name} {case}"
                    if dtype == torch.float32:
                        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda e: f"{name} {case}: {e}")
                    else:
                        assert no_worse(a, b, ref), f"{name} {case}"


@cuda
@pytest.mark.parametrize('attn,compiled', [('mla', False), ('mha', False), ('mla', True)])
def test_model_through_flex_trains_as_with_sdpa(attn, compiled, monkeypatch):
    """A tiny model with a window (and MTP), eager and compiled, with and without packed documents:
    the loss and every gradient through flex_attention equal those of the eager model through SDPA."""
    calls, g = flex_calls(monkeypatch), torch.Generator('cuda').manual_seed(0)
    m = make(40, **{**HEADS[attn], 'block_size': 160, 'n_routed_experts': 0, 'mtp_depth': 1}).cuda().train()
    x, y = torch.randint(0, 97, (2, 2, 150), generator=g, device='cuda').unbind(0)
    for doc_ids in (None, packed_doc_ids(2, 150, g)):
        results = {}
        for use_flex in (True, False):
            monkeypatch.setattr(model, 'USE_FLEX', use_flex)
            run = torch.compile(m) if compiled and use_flex else m
            loss = poisoned(lambda: run(x, y, doc_ids=doc_ids)[1])
            results[use_flex] = (loss, *torch.autograd.grad(loss, list(m.parameters())))
        assert calls and (compiled or len(calls) == m.cfg.n_layer + 1)  # each layer's attention and MTP's
        calls.clear()
        for flex, sdpa in zip(results[True], results[False]):
            assert not flex.isnan().any()
            torch.testing.assert_close(flex, sdpa, atol=1e-5, rtol=1e-5)


@cuda
@pytest.mark.parametrize('attn,mode', KINDS)
def test_prefill_through_flex_then_decoding(attn, mode, monkeypatch):
    """A prefill longer than the window goes through flex_attention, then tokens through the cache:
    the logits at every position equal SDPA's band-masked full forward."""
    calls = flex_calls(monkeypatch)
    m = make(8, **{**HEADS[attn], 'block_size': 48}).cuda()
    x = torch.randint(0, 97, (3, 48), device='cuda')
    with torch.no_grad():
        cached = cached_logits(m, x, mode, 30)
        assert len(calls) == m.cfg.n_layer
        monkeypatch.setattr(model, 'USE_FLEX', False)
        torch.testing.assert_close(cached, m(x, x)[0], atol=1e-4, rtol=1e-4)
