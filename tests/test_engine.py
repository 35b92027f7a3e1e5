"""engine.py on CPU (fp32): ragged batches, the static-shape decode path against the full forward,
sampling, ends, scoring, embeddings."""
import pytest
import torch

from engine import Engine, Request, Sampler, SamplingParams, propose, sample, verify
from model import ModelConfig, Transformer

SMALL = dict(vocab_size=96, block_size=24, n_layer=3, n_embd=64, n_head=4, kv_lora_rank=32,
             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, dense_inter_dim=96,
             n_dense_layers=1, n_routed_experts=8, n_shared_experts=1, n_activated_experts=3,
             moe_inter_dim=24)
CHARS = ''.join(chr(33 + i) for i in range(90))  # 90 printable characters: ids 90..95 are padding
TOKENIZER = {'kind': 'char', 'chars': CHARS}
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**SMALL, **overrides})).eval()


def full_forward_greedy(m, prompt, n):
    """No cache: the full forward's argmax, token by token."""
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(m(torch.tensor([ids]))[0][0, -1, :len(CHARS)].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize('attn,mode,q_lora_rank', [('mla', 'latent', 0), ('mla', 'latent', 20),
                                                   ('mla', 'naive', 0), ('mha', 'naive', 0)])
def test_ragged_batch_equals_each_prompt_alone_and_the_full_forward(attn, mode, q_lora_rank):
    m = make(attn=attn, q_lora_rank=q_lora_rank)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 90, (n,), generator=g).tolist() for n in (1, 5, 9, 3, 11)]
    batch = Engine(m, TOKENIZER, max_batch=3, cache_mode=mode).generate(prompts, GREEDY)  # 5 requests, 3 slots
    for p, r in zip(prompts, batch):
        alone = Engine(m, TOKENIZER, max_batch=1, cache_mode=mode).generate([p], GREEDY)[0]
        assert r.tokens == alone.tokens == full_forward_greedy(m, p, 12)
        assert r.finish_reason == 'length' and len(r.tokens) == 12


def test_decode_logits_equal_the_full_forward():
    """The static-shape path (tensor positions, cache writes by index) against the eager forward."""
    m = make()
    e = Engine(m, TOKENIZER, max_batch=4)
    prompts = [[5, 6, 7], [1] * 8, [40, 41]]
    for p in prompts:
        e.add_request(p, SamplingParams(max_tokens=6, temperature=0))
    e.step()  # prefill
    for _ in range(4):
        contexts = [list(r.context) for r in e.active]
        logits, tokens = e.decode_step()
        for r, ctx, lg in zip(e.active, contexts, logits):
            with torch.no_grad(), e.uncached():  # the full forward must not write the engine's caches
                ref = m(torch.tensor([ctx]))[0][0, -1, :e.n_vocab]
            torch.testing.assert_close(lg, ref, atol=1e-5, rtol=1e-5)
        e.emit(list(e.active), tokens, logits)


def test_past_block_size_and_long_prompt():
    m = make()
    r = Engine(m, TOKENIZER, max_batch=2).generate([list(range(40))], SamplingParams(max_tokens=50))[0]
    assert len(r.tokens) == 50 and r.finish_reason == 'length'


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    m = make()
    p = SamplingParams(max_tokens=20, temperature=1.0, top_k=20, seed=7)
    alone = Engine(m, TOKENIZER, max_batch=1).generate([[3, 4]], p)[0].tokens
    mixed = Engine(m, TOKENIZER, max_batch=4).generate([[9], [3, 4], [1, 2, 3]],
                                                        [SamplingParams(max_tokens=9), p, SamplingParams(max_tokens=30)])
    assert mixed[1].tokens == alone
    other = Engine(m, TOKENIZER, max_batch=1).generate([[3, 4]], SamplingParams(max_tokens=20, temperature=1.0, seed=8))
    assert other[0].tokens != alone


def test_stop_string_and_end_token_end_one_sequence_only():
    m = make()
    base = Engine(m, TOKENIZER, max_batch=2).generate([[1, 2], [7]], GREEDY)
    text, first = base[0].text, base[0].tokens[0]
    stop = text[3:5]
    e = Engine(m, TOKENIZER, max_batch=2)
    out = e.generate([[1, 2], [7]], [SamplingParams(max_tokens=12, temperature=0, stop=(stop,)), GREEDY])
    assert out[0].finish_reason == 'stop' and out[0].text == text[:text.find(stop)]
    assert out[1].tokens == base[1].tokens and out[1].finish_reason == 'length'
    out = Engine(m, TOKENIZER, max_batch=2).generate(
        [[1, 2], [7]], [SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(first,)), GREEDY])
    assert out[0].finish_reason == 'stop' and out[0].tokens == [] and out[1].tokens == base[1].tokens


def test_never_samples_padded_vocab_and_rejects_bad_prompts():
    m = make()
    e = Engine(m, TOKENIZER, max_batch=4)
    out = e.generate([[1, 2, 3]] * 4, SamplingParams(max_tokens=40, temperature=2.0))
    assert max(t for r in out for t in r.tokens) < len(CHARS)
    with pytest.raises(ValueError, match='empty'):
        e.add_request([], GREEDY)
    with pytest.raises(ValueError, match='outside the vocabulary'):
        e.add_request([1, 95], GREEDY)


def test_abort_frees_the_slot_and_the_rest_go_on():
    m = make()
    e = Engine(m, TOKENIZER, max_batch=2)
    a, b = e.add_request([1, 2], GREEDY), e.add_request([7], GREEDY)
    e.step()
    e.step()
    e.abort(a)
    assert e.running == 1 and a.finish_reason == 'abort'
    while not b.done:
        e.step()
    alone = Engine(m, TOKENIZER, max_batch=1).generate([[7]], GREEDY)[0]
    assert b.tokens == alone.tokens


def test_top_k_top_p_stay_in_their_sets():
    torch.manual_seed(0)
    logits = torch.randn(2, 50) * 3
    rk = Request([1], SamplingParams(temperature=1.0, top_k=5), detokenize=None)
    rp = Request([1], SamplingParams(temperature=1.0, top_p=0.6), detokenize=None)
    sampler = Sampler([rk, rp], 'cpu')
    drawn = torch.stack([sample(logits, sampler.params, sampler.uniforms()) for _ in range(300)])
    assert set(drawn[:, 0].tolist()) == set(logits[0].topk(5)[1].tolist())  # all five, nothing else
    probs = logits[1].softmax(-1)
    order = probs.argsort(descending=True)
    nucleus = order[:int((probs[order].cumsum(0) < 0.6).sum()) + 1].tolist()
    assert set(drawn[:, 1].tolist()) <= set(nucleus)


@pytest.mark.parametrize('draft_temperature', [1.0, 0.3])
def test_speculative_sampling_draws_each_token_from_the_model(draft_temperature):
    """propose() draws a draft d from q, verify() keeps it with probability min(1, p(d)/q(d)) and
    otherwise draws from max(p - q, 0): the first token's distribution is p whatever q, and drafts
    are kept at the rate sum min(p, q) (20k draws; q near p, then a sharper q)."""
    torch.manual_seed(1)
    V, n = 6, 20000
    logits = torch.randn(1, 2, V).expand(n, 2, V)
    draft_logits = (logits[:, 0] + 0.5 * torch.randn(V)) / draft_temperature
    params = torch.tensor([[1.0, 2.0**31, 1.0, 0.0]]).expand(n, 4)
    u = torch.rand(n, 4)
    draft, q = propose(draft_logits, params, u[:, 3])
    accepted, first, _ = verify(draft, q, logits, params, u)
    p = logits[0, 0].softmax(-1)
    freq = torch.bincount(first, minlength=V).float() / n
    assert (freq - p).abs().max() < 0.015
    assert abs(accepted.float().mean() - torch.minimum(p, q[0]).sum()) < 0.015


def test_score_and_embed():
    m = make()
    e = Engine(m, TOKENIZER, max_batch=2)
    seq = torch.randint(0, 90, (60,)).tolist()  # longer than block_size: scored in windows
    scores = e.score([seq[:20], seq])
    with torch.no_grad():
        logp = m(torch.tensor([seq[:20]]), torch.tensor([seq[:20]]))[0][0, :-1, :e.n_vocab].log_softmax(-1)
    ref = logp.gather(1, torch.tensor(seq[1:20])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(scores[0]), ref, atol=1e-5, rtol=1e-5)
    assert len(scores[1]) == 59 and scores[1][:19] == pytest.approx(scores[0], abs=1e-5)
    emb = e.embed([seq[:20], seq[:10]])
    assert emb.shape == (2, 64) and emb.dtype == torch.float32
    with torch.no_grad():
        ref = m.norm(m.trunk(torch.tensor([seq[:10]]))[0])[0].mean(0)
    torch.testing.assert_close(emb[1], ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('mode,speculative,window', [('latent', False, 0), ('naive', False, 0), ('latent', True, 0),
                                                     ('latent', False, 6), ('latent', True, 6)])
def test_cuda_graphs_decode_what_eager_decodes(mode, speculative, window):
    m = make(mtp_depth=1, attn_window=window).to('cuda', torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 90, (n,), generator=g).tolist() for n in (1, 7, 3, 12, 5)]
    params = [SamplingParams(max_tokens=30, temperature=0), SamplingParams(max_tokens=30, temperature=0.9, seed=4)] * 3
    outs = []
    for graphs in (True, False):
        e = Engine(m, TOKENIZER, max_batch=4, cache_mode=mode, cuda_graphs=graphs, speculative=speculative)
        assert (e.graphs is not None) == graphs and bool(e.prefill_graphs) == (graphs and not window)
        outs.append([r.tokens for r in e.generate(prompts, params[:5])])
        del e
    assert outs[0] == outs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('speculative', [False, True])
def test_prefill_graphs_prefill_what_eager_prefills(speculative):
    """fp32, dense (capturable in fp32): prompts and the refills past block_size replayed from the
    prefill graphs (padded in length, and in batch with copies of a row) give the eager path's
    greedy tokens and log-probabilities."""
    m = make(mtp_depth=1, n_routed_experts=0).to('cuda')
    prompts = [[5, 6, 7], [9] * 11, [3], list(range(30))]  # the last one is longer than a refill: eager
    params = SamplingParams(max_tokens=40, temperature=0, logprobs=True)
    runs = []
    for graphs in (True, False):
        e = Engine(m, TOKENIZER, max_batch=3, speculative=speculative, cuda_graphs=graphs)
        assert list(e.prefill_graphs) == ([1, 2, 3] if graphs else [])
        runs.append(e.generate(prompts, params))
    assert [r.tokens for r in runs[0]] == [r.tokens for r in runs[1]]
    torch.testing.assert_close(torch.tensor([r.logprobs for r in runs[0]]), torch.tensor([r.logprobs for r in runs[1]]),
                               atol=1e-4, rtol=1e-4)


def test_batch_buckets():
    """A graph per power of two up to max_batch and for max_batch itself, or for the sizes asked
    (past max_batch dropped, max_batch always there: every batch has a bucket that holds it)."""
    m = make()
    assert Engine(m, TOKENIZER, max_batch=64).buckets == [1, 2, 4, 8, 16, 32, 64]
    assert Engine(m, TOKENIZER, max_batch=5).buckets == [1, 2, 4, 5]
    assert Engine(m, TOKENIZER, max_batch=16, buckets=[3, 8, 40]).buckets == [3, 8, 16]


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('speculative', [False, True])
def test_compiled_step_decodes_what_the_plain_step_decodes(speculative):
    """compile=True fuses the step's ops: fp32 (no graphs) gives the same greedy tokens and
    log-probabilities; bf16 with graphs captures the compiled step and decodes within the vocabulary."""
    m = make(mtp_depth=1).to('cuda')
    prompts = [[5, 6, 7], [9] * 11, [3]]
    params = SamplingParams(max_tokens=20, temperature=0, logprobs=True)
    plain, compiled = (Engine(m, TOKENIZER, max_batch=2, speculative=speculative, compile=c).generate(prompts, params)
                       for c in (False, True))
    assert [r.tokens for r in compiled] == [r.tokens for r in plain]
    torch.testing.assert_close(torch.tensor([r.logprobs for r in compiled]), torch.tensor([r.logprobs for r in plain]))
    e = Engine(m.to(torch.bfloat16), TOKENIZER, max_batch=2, speculative=speculative, compile=True)
    out = e.generate(prompts, SamplingParams(max_tokens=20, temperature=0.9, seed=3))
    assert e.graphs is not None and all(len(r.tokens) == 20 and max(r.tokens) < len(CHARS) for r in out)


@pytest.mark.parametrize('mode', ['latent', 'naive'])
def test_speculative_greedy_equals_plain_greedy(mode):
    """MTP drafts, the model verifies two positions at once: greedy tokens stay exactly the plain
    ones, ragged batch, slots reused and refills past block_size included (random weights: many
    drafts are rejected)."""
    m = make(mtp_depth=1, block_size=48)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 90, (n,), generator=g).tolist() for n in (1, 2, 9, 4, 15)]
    params = SamplingParams(max_tokens=45, temperature=0)
    plain = Engine(m, TOKENIZER, max_batch=3, cache_mode=mode).generate(prompts, params)
    spec_engine = Engine(m, TOKENIZER, max_batch=3, cache_mode=mode, speculative=True)
    spec = spec_engine.generate(prompts, params)
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    one = Engine(m, TOKENIZER, max_batch=1, cache_mode=mode, speculative=True).generate([prompts[0]], params)[0]
    assert one.tokens == plain[0].tokens  # a one-token prompt: nothing for the MTP block to prefill
    assert spec_engine.drafted > 0 and 0 <= spec_engine.accepted <= spec_engine.drafted


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA GPU'))])
@pytest.mark.parametrize('temperature', [0, 1.0])
def test_speculative_accepts_every_draft_that_agrees(device, temperature):
    """A zero head makes every prediction token 0 (greedy) or uniform (sampled), the MTP module's
    too: each draft is accepted, and every step but those after a prefill yields two tokens (on a
    GPU: bf16, steps replayed from CUDA graphs)."""
    m = make(mtp_depth=1, block_size=48).to(device, torch.bfloat16 if device == 'cuda' else torch.float32)
    with torch.no_grad():
        m.head.weight.zero_()
    e = Engine(m, TOKENIZER, max_batch=2, speculative=True)
    assert (e.graphs is not None) == (device == 'cuda')
    out = e.generate([[1, 2, 3], [4]], SamplingParams(max_tokens=21, temperature=temperature))
    assert all(len(r.tokens) == 21 for r in out) and (temperature or all(r.tokens == [0] * 21 for r in out))
    assert e.acceptance_rate == 1.0 and e.drafted == 2 * 10  # 1 token from the prefill, then 2 a step


def test_speculative_sampling_is_seeded_and_stays_in_the_vocabulary():
    m = make(mtp_depth=1, block_size=48)
    p = SamplingParams(max_tokens=30, temperature=1.0, top_k=30, seed=11)
    a = Engine(m, TOKENIZER, max_batch=2, speculative=True).generate([[5, 6]], p)[0].tokens
    b = Engine(m, TOKENIZER, max_batch=2, speculative=True).generate([[5, 6]], p)[0].tokens
    assert a == b and len(a) == 30 and max(a) < len(CHARS)
