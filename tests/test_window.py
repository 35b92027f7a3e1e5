"""Sliding-window attention (attn_window): the band in training/prefill, and cached decoding."""
import pytest
import torch

from engine import Engine, SamplingParams
from model import ModelConfig, Transformer

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
