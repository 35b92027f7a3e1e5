"""
Inference for sample.py, serve.py and eval.py: requests with their own prompts, sampling
parameters and ends share one batch of fixed cache slots (continuous batching).

- The caches (model.setup_cache: the latent c_kv and k_pe per layer) are allocated once, one slot
  per running request. Running requests always fill slots 0..n-1; when one finishes, the last one
  moves into its slot, so a decode step reads a prefix of the cache.
- A step is either a prefill of newly admitted requests (right-padded, flash attention over the
  decompressed keys; only the latents are written to the cache) or one decode step of every
  running request. On CUDA the decode step of each batch bucket (1, 2, 4, ..., max_batch) is
  captured once as a CUDA graph and replayed: positions are tensors, so shapes never change.
  So is a prefill of block_size / 2 tokens (padded; where a bucket of them is small): the prefill
  that short prompts need, and that a sequence past block_size needs every block_size / 2 tokens.
- Speculative decoding with the MTP module (DeepSeek-V3 sec. 5.4.3): the MTP block drafts a token,
  the main model verifies it in the same step (two query positions per sequence), and the draft is
  accepted or resampled so that every token is distributed exactly as the model says (greedy:
  the same tokens as plain decoding).
- prefill_chunk=N: whole prompts are prefilled at most N tokens a step. A longer prompt is prefilled
  N tokens at a time in a cache slot of its own (past max_batch, where decode steps never write),
  each chunk attending to the ones before it in the cache (the decode path's attention); its chunks
  alternate with decode steps, so the running batch waits for one chunk at most between two of its
  steps, and it joins the batch with its first token: the same tokens as one prefill would give.
- compile=True: torch.compile fuses each step's small ops before its graph is captured (the step's
  kernels roughly halve; costs a compilation per batch bucket at start-up). buckets= picks the
  batch sizes that get a graph (default: powers of two up to max_batch, and max_batch).
One engine per model at a time: it owns the model's caches.
"""
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from prepare import get_tokenizer, vocab_size_of


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1.0 = off
    stop: tuple = ()                  # stop strings: generation ends, the text is cut before one
    stop_token_ids: tuple = ()        # e.g. GPT-2's <|endoftext|>: ends the sequence, not in the text
    seed: int | None = None           # a generator of the request's own: same seed, same tokens
    logprobs: bool = False            # record log p(token) of each generated token (temperature 1)


@dataclass(eq=False)
class Request:
    prompt: list
    params: SamplingParams
    detokenize: object
    id: int = 0
    tokens: list = field(default_factory=list)     # generated so far
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None               # 'stop' | 'length' | 'abort'
    stop_at: int | None = None                     # where a stop string cut the text
    context: list = field(default_factory=list)    # the tokens in the cache, then the pending one
    cached: int = 0                                # how many of them the cache holds
    generator: torch.Generator | None = None

    @property
    def done(self):
        return self.finish_reason is not None

    @property
    def text(self):
        """The generated text, cut at a stop string; while running, without the tail that may still
        change (the start of a stop string, or half a UTF-8 character)."""
        text = self.detokenize(self.tokens)
        if self.stop_at is not None or self.done:
            return text[:self.stop_at]
        return text[:len(text) - held_back(text, self.params.stop)]


def held_back(text, stops):
    n = len(text) - len(text.rstrip('\ufffd'))
    for s in stops:
        n = max(n, max((k for k in range(1, len(s)) if text.endswith(s[:k])), default=0))
    return n

# -----------------------------------------------------------------------------
# sampling: each row with its request's parameters, as tensor math with the random numbers passed
# in, so that it runs inside a captured decode step (and a seeded request draws its own numbers)

def filtered_probs(logits, params):
    """logits [B, V], params [B, 4] (temperature, top_k, top_p, greedy) -> the distributions
    tokens are drawn from: temperature, then the top_k most likely, then the smallest set holding
    top_p of the probability (the top one always stays)."""
    temperature, top_k, top_p = params[:, 0:1], params[:, 1:2], params[:, 2:3]
    sorted_logits, order = (logits / temperature).sort(-1, descending=True)
    ranks = torch.arange(logits.size(-1), device=logits.device)
    probs = sorted_logits.masked_fill(ranks >= top_k, float('-inf')).softmax(-1)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, probs)


def draw(probs, u):
    """One token per row by inverting the cumulative distribution at u [B] in [0, 1): the first
    token whose cumulative probability passes u (one of nonzero probability)."""
    cdf = probs.cumsum(-1)
    return (cdf <= u[:, None] * cdf[:, -1:]).sum(-1).clamp(max=probs.size(-1) - 1)


def sample(logits, params, u):
    """logits [B, V] -> token ids [B]: argmax for greedy rows, else drawn with u[:, 0]."""
    return torch.where(params[:, 3] > 0, logits.argmax(-1), draw(filtered_probs(logits, params), u[:, 0]))


def propose(draft_logits, params, u):
    """The draft: drawn with u [B] from q, the MTP module's distribution under the request's own
    sampling parameters (its argmax for greedy rows) -> (draft [B], q [B, V])."""
    q = filtered_probs(draft_logits, params)
    return torch.where(params[:, 3] > 0, draft_logits.argmax(-1), draw(q, u)), q


def verify(draft, q, logits, params, u):
    """Speculative sampling (Leviathan et al., arXiv:2211.17192): a draft d drawn from q is kept with
    probability min(1, p(d) / q(d)), else the token is drawn from max(p - q, 0): each token is
    distributed exactly as p, and the closer q is to p the more drafts are kept. Greedy rows keep d
    when it is the argmax. logits [B, 2, V] are the model's at the pending token and at the draft,
    u [B, >= 3] -> (accepted [B], first token [B], the token after an accepted draft [B])."""
    greedy, argmax = params[:, 3] > 0, logits.argmax(-1)
    p0, p1 = filtered_probs(logits.flatten(0, 1), params.repeat_interleave(2, 0)).unflatten(0, (-1, 2)).unbind(1)
    p_draft, q_draft = p0.gather(1, draft[:, None])[:, 0], q.gather(1, draft[:, None])[:, 0]
    accepted = torch.where(greedy, argmax[:, 0] == draft, u[:, 0] * q_draft < p_draft)
    residual = (p0 - q).clamp(min=0.0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p0)  # q = p: always kept
    first = torch.where(greedy, argmax[:, 0], torch.where(accepted, draft, draw(residual, u[:, 1])))
    bonus = torch.where(greedy, argmax[:, 1], draw(p1, u[:, 2]))
    return accepted, first, bonus


class Sampler:
    """A batch's sampling parameters as one tensor [B, 4], made once per batch composition, and its
    random numbers (4 a row: a token, or a draft, its test, a residual and a bonus token): one
    kernel for the batch, or a draw per row from each seeded request's generator."""
    def __init__(self, requests, device):
        self.requests, self.device = requests, device
        self.params = torch.tensor([[p.temperature or 1.0, p.top_k or 2.0**31, p.top_p, p.temperature == 0]
                                    for p in (r.params for r in requests)]).to(device)
        self.generators = [r.generator for r in requests]

    def uniforms(self, out=None):
        """[B, 4] numbers in [0, 1), written into out when given."""
        if out is None:
            out = torch.empty(len(self.requests), 4, device=self.device)
        if all(g is None for g in self.generators):
            return out.uniform_()
        for row, g in zip(out, self.generators):
            row.copy_(torch.rand(4, device=self.device, generator=g))
        return out


# -----------------------------------------------------------------------------
# scoring: the windows a long sequence is read in (engine.score, eval.py)

def windows(n_tokens, block_size, stride):
    """(start, end, n_scored) per window: the model reads tokens[start:end] and the last n_scored of
    its predictions, for tokens[end - n_scored + 1 : end + 1], are scored. Tokens 1..n_tokens-1 are
    each scored exactly once. stride 0: windows side by side, each scoring all it reads; stride S:
    after the first window, each reads a full block (as far as there is one) and scores its last S."""
    if n_tokens < 2:
        return []
    end = min(block_size, n_tokens - 1)
    out = [(0, end, end)]
    while end < n_tokens - 1:
        new_end = min(end + (stride or block_size), n_tokens - 1)
        out.append((max(0, new_end - block_size) if stride else end, new_end, new_end - end))
        end = new_end
    return out


# -----------------------------------------------------------------------------
# CUDA graphs: a step's kernels recorded once and replayed, with no Python between them

PREFILL_GRAPH_TOKENS = 4096


def capture(fn, pool, *inputs):
    """-> (graph, inputs, outputs): fn(*inputs) recorded after two warm-up calls on a side stream
    (first-call work such as cuBLAS's must not land in the graph); replay after writing new values
    into inputs, and read them from outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool), torch.no_grad():
        outputs = fn(*inputs)
    return graph, inputs, outputs


# -----------------------------------------------------------------------------
# the engine: slots, prefill, the decode step (a CUDA graph per batch bucket), speculative decoding

class Engine:
    def __init__(self, model, tokenizer, max_batch=64, cuda_graphs=None, cache_mode='latent', speculative=False,
                 max_positions=None, compile=False, buckets=None, prefill_chunk=0):
        self.model, self.cfg = model, model.cfg
        self.tokenizer = tokenizer
        self.device = model.head.weight.device
        self.encode, self.decode = get_tokenizer(tokenizer)
        self.n_vocab = min(vocab_size_of(tokenizer), self.cfg.vocab_size)
        self.block_size, self.max_batch = self.cfg.block_size, max_batch
        if speculative and model.mtp is None:
            raise ValueError("speculative decoding needs a model trained with mtp_depth=1")
        self.speculative = speculative
        # With a sliding window the cache is a ring of the last window positions (one more for a
        # draft, which must not overwrite what the pending token sees), so memory stays flat and
        # decoding goes on past block_size, up to max_positions (RoPE tables that long).
        window = self.cfg.attn_window
        self.ring = 0 < window < self.block_size
        positions = (max_positions or 16 * self.block_size) if self.ring else self.block_size
        if positions != model.rope_cos.size(0):
            model.set_positions(positions)
        # a draft sits one position past the pending token, so the context must leave room for it;
        # plain decoding leaves it too, so that both go on from the same tokens past it (same output)
        self.max_context = positions - 1
        # a ring's positions wrap around, so its prompts are prefilled whole (and one at a time)
        self.prefill_chunk = 0 if self.ring else prefill_chunk
        slots = max_batch + bool(self.prefill_chunk)  # the last one: the chunked prompt's
        model.setup_cache(slots, cache_mode if self.cfg.attn == 'mla' else 'naive',
                          length=window + speculative if self.ring else self.block_size)
        # the main model's hidden states at the two positions the next draft starts from
        self.mtp_hidden = torch.zeros(slots, 2, self.cfg.n_embd, device=self.device,
                                      dtype=model.head.weight.dtype) if speculative else None
        self.waiting, self.active = deque(), []  # active[i] lives in cache slot i
        self.chunking = None                     # the prompt being prefilled in chunks, in slot max_batch
        self.chunked_last = False                # was the last step a chunk (the next one decodes)
        self.next_id = 0
        self.accepted, self.drafted = 0, 0
        self.sampler = None
        self.step_fn = self.speculative_step if speculative else self.plain_step
        if compile:  # inductor fuses the step's many small ops (norms, RoPE, sampling): fewer kernels per step
            self.step_fn = torch.compile(self.step_fn, dynamic=False)
        # graphs need static shapes all the way down: fp32 experts loop on the host (model.grouped_mm)
        capturable = self.device.type == 'cuda' and (model.head.weight.dtype != torch.float32 or not model.moe_layers())
        use_graphs = capturable if cuda_graphs is None else cuda_graphs
        # batch sizes with a graph of their own: powers of two, and max_batch (always captured)
        buckets = buckets or [2 ** i for i in range(max_batch.bit_length())]
        self.buckets = sorted({b for b in buckets if b < max_batch} | {max_batch})
        # past max_context a sequence goes on from its last refill_length tokens, prefilled again
        self.refill_length = self.block_size // 2
        self.graphs, self.prefill_graphs = self.capture_graphs() if use_graphs else (None, {})
        self.warm_up()

    # -------------------------------------------------------------------------
    # requests

    @property
    def running(self):
        """Requests holding a cache slot."""
        return len(self.active) + (self.chunking is not None)

    def has_work(self):
        return bool(self.waiting or self.active or self.chunking)

    def add_request(self, prompt, params):
        if not prompt:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.n_vocab})")
        r = Request(list(prompt), params, self.decode, id=self.next_id)
        self.next_id += 1
        r.context = r.prompt[-min(self.block_size, self.max_context):]
        if params.seed is not None:
            r.generator = torch.Generator(self.device).manual_seed(params.seed)
        self.waiting.append(r)
        return r

    def abort(self, request):
        if request in self.waiting:
            self.waiting.remove(request)
        if request is self.chunking:
            self.chunking = None
        if request in self.active:
            self.release(request)
        if not request.done:
            request.finish_reason = 'abort'

    def release(self, request):
        """Free a slot: the last running request moves into it, keeping slots 0..n-1 full."""
        i, last = self.active.index(request), len(self.active) - 1
        if i != last:
            self.move_slot(last, i)
            self.active[i] = self.active[last]
        self.active.pop()

    def move_slot(self, src, dst):
        """Copy a slot's caches, and the MTP block's hidden states, into another slot."""
        for attn in self.model.attentions():
            for c in attn.cache:
                c[dst] = c[src]
        if self.speculative:
            self.mtp_hidden[dst] = self.mtp_hidden[src]

    def generate(self, prompts, params, on_token=None):
        """Run prompts (token lists) to their ends; params: one SamplingParams or one per prompt."""
        params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        requests = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while not all(r.done for r in requests):
            for r in self.step():
                if on_token is not None:
                    on_token(r)
        return requests

    def warm_up(self):
        """One short request end to end before any real one: first calls (kernels loaded at their
        first launch, library handles) cost a GPU tens of milliseconds that would otherwise land in
        the first request. The random state and the counters are left as they were."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == 'cuda' else []):
            self.generate([[0, 0]], SamplingParams(max_tokens=3))
        self.next_id, self.accepted, self.drafted = 0, 0, 0

    @property
    def acceptance_rate(self):
        return self.accepted / max(self.drafted, 1)

    # -------------------------------------------------------------------------
    # one step: a prefill of whatever needs one, else one decode step of all

    @torch.no_grad()
    def step(self):
        """-> the requests that changed: new tokens, or finished."""
        self.admit()
        for r in self.active:
            if len(r.context) > self.max_context:  # out of positions: go on from the last half
                r.context, r.cached = r.context[-self.refill_length:], 0
        pending = [r for r in self.active if r.cached == 0]
        if self.ring:  # right-padding would wrap around a ring: one prompt at a time
            pending = pending[:1]
        if pending:
            pending = self.within_budget(pending)
            logits = self.prefill(pending)
            self.sample_first(pending, logits)
            return pending
        if self.chunking is not None and not (self.active and self.chunked_last):
            return self.prefill_chunk_step()
        self.chunked_last = False
        batch = list(self.active)
        if batch:
            (self.speculate if self.speculative else self.decode_plain)(batch)
        return batch

    def admit(self):
        """Waiting requests take free slots in order; a prompt longer than prefill_chunk takes the
        chunk slot when it is free (and keeps a slot to join the batch in)."""
        while self.waiting and self.running < self.max_batch:
            r = self.waiting[0]
            if self.prefill_chunk and len(r.context) > self.prefill_chunk:
                if self.chunking is not None:
                    return
                self.chunking = r
            else:
                self.active.append(r)
            self.waiting.popleft()

    def within_budget(self, pending):
        """The first pending prompts that hold at most prefill_chunk tokens together (at least one)."""
        total = 0
        for n, r in enumerate(pending):
            total += len(r.context)
            if self.prefill_chunk and n and total > self.prefill_chunk:
                return pending[:n]
        return pending

    def sample_first(self, requests, logits):
        """The first token of freshly prefilled requests, from their last positions' logits."""
        sampler = self.sampler_of(requests)
        self.emit(requests, sample(logits, sampler.params, sampler.uniforms()), logits)

    def prefill_chunk_step(self):
        """The next prefill_chunk tokens of the chunked prompt -> [it] once the last chunk is in (it
        moves into the running batch's next slot and gets its first token), else []."""
        r, slot = self.chunking, self.max_batch
        start, end = r.cached, min(r.cached + self.prefill_chunk, len(r.context))
        idx = torch.tensor([r.context[start:end]], device=self.device)
        if start == 0:
            logits = self.prefill_step(idx, torch.tensor([slot], device=self.device),
                                       torch.tensor([end - 1], device=self.device))
        else:
            logits = self.prefill_continued(idx, start, slot)
        r.cached, self.chunked_last = end, True
        if end < len(r.context):
            return []
        self.chunking = None
        self.move_slot(slot, len(self.active))
        self.active.append(r)
        self.sample_first([r], logits)
        return [r]

    def prefill_continued(self, idx, start, slot):
        """A chunk idx [1, C] at positions start.. of the prompt in `slot`, attending to its cached
        earlier chunks (through the decode path, on the slot alone) -> its last logits [1, V]."""
        m, C = self.model, idx.size(1)
        pos = torch.arange(start, start + C, device=self.device)[None]
        with self.slot_view(slot):
            h = m.trunk(idx, pos)[0]
            if self.speculative:  # the MTP block's entries start-1 .. start+C-2: from the state at start-1 on
                m.mtp(torch.cat([self.mtp_hidden[slot, None, 1:], h[:, :-1]], 1), m.embed(idx),
                      *m.rope_at(pos - 1, C), pos=pos - 1)
                self.mtp_hidden[slot] = torch.cat([self.mtp_hidden[slot], h[0]])[-2:]
        return self.logits(h[:, -1])

    def slot_view(self, slot):
        """The caches narrowed to one slot: the decode path reads a batch's first slots."""
        return self.caches_as(lambda cache, latent: (tuple(c[slot:slot + 1] for c in cache), latent))

    def prefill(self, requests):
        """Fill the requests' slots with their contexts (right-padded into one batch: causal
        attention never lets a real token see the padding after it) -> next-token logits [n, V].
        A batch of contexts up to refill_length replays a captured prefill graph where one holds it:
        padded to the graph's length, and to its batch with copies of the first row (a copy writes
        the same values into the same slot)."""
        n, L = len(requests), max(len(r.context) for r in requests)
        bucket = next((b for b in self.prefill_graphs if b >= n), None) if L <= self.refill_length else None
        padded = requests + requests[:1] * ((bucket or n) - n)
        idx = torch.zeros(len(padded), L if bucket is None else self.refill_length, dtype=torch.long)
        for i, r in enumerate(padded):
            idx[i, :len(r.context)] = torch.tensor(r.context)
        inputs = (idx, torch.tensor([self.active.index(r) for r in padded]), torch.tensor([len(r.context) - 1 for r in padded]))
        if bucket is None:
            return self.prefill_step(*(t.to(self.device) for t in inputs))
        graph, static_inputs, logits = self.prefill_graphs[bucket]
        for static, t in zip(static_inputs, inputs):
            static.copy_(t)
        graph.replay()
        return logits[:n]

    def prefill_step(self, idx, rows, last):
        """idx [n, L] into cache slots rows [n], each context ending at last [n] -> logits [n, V]."""
        m, at = self.model, torch.arange(idx.size(0), device=self.device)
        h = m.trunk(idx, rows=rows)[0]
        if self.speculative:  # the MTP block's cache over the prompt, and where its first draft starts
            if idx.size(1) > 1:
                m.mtp(h[:, :-1], m.embed(idx[:, 1:]), *m.rope_at(None, idx.size(1) - 1), rows=rows)
            self.mtp_hidden[rows] = torch.stack([h[at, (last - 1).clamp(min=0)], h[at, last]], 1)
        return self.logits(h[at, last])

    def sampler_of(self, batch):
        if self.sampler is None or self.sampler.requests != batch:
            self.sampler = Sampler(list(batch), self.device)
        return self.sampler

    def logits(self, h):
        return self.model.head(self.model.norm(h)).float()[..., :self.n_vocab]

    def emit(self, requests, tokens, logits):
        """Append one sampled token to each request (logits [B, V] for the log-probabilities)."""
        logprobs = self.logprobs(logits, tokens, requests)
        for r, t, lp in zip(requests, tokens.tolist(), logprobs):
            r.cached = len(r.context)
            self.append(r, t, lp)

    def logprobs(self, logits, tokens, requests):
        if not any(r.params.logprobs for r in requests):
            return [None] * len(requests)
        return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1).tolist()

    # -------------------------------------------------------------------------
    # decoding: one position per sequence, or a draft and its verification

    def run_step(self, ids):
        """The decode step (plain or speculative) of the running batch, from ids [n, k] (its host-side
        numbers: tokens and positions), the sampler's parameters and fresh random numbers. Replayed
        from the smallest captured bucket that holds the batch; rows past n keep an earlier step's
        inputs, which are valid, and write only into free slots."""
        n, sampler = len(self.active), self.sampler_of(self.active)
        ids = torch.tensor(ids)
        if self.graphs is None:
            return self.step_fn(ids.to(self.device), sampler.params, sampler.uniforms())
        bucket = next(b for b in self.graphs if b >= n)
        graph, (static_ids, static_params, static_u), outputs = self.graphs[bucket]
        static_ids[:n].copy_(ids)
        static_params[:n].copy_(sampler.params)
        sampler.uniforms(out=static_u[:n])
        graph.replay()
        return tuple(o[:n] for o in outputs)

    def decode_step(self):
        """One token for every running request -> (logits [n, V], sampled tokens [n])."""
        return self.run_step([[r.context[-1], len(r.context) - 1] for r in self.active])

    def decode_plain(self, batch):
        logits, tokens = self.decode_step()
        self.emit(batch, tokens, logits)

    def plain_step(self, ids, params, u):
        h = self.model.trunk(ids[:, :1], ids[:, 1:])[0]
        logits = self.logits(h[:, -1])
        return logits, sample(logits, params, u)

    def speculate(self, batch):
        ids = []
        for r in batch:  # the pending token at position p = len - 1; the MTP block reruns p - 2, p - 1
            p = len(r.context) - 1
            ids.append([r.context[-1], p, r.context[max(p - 1, 1)], max(p - 2, 0)])
        logits, picks = self.run_step(ids)  # picks [n, 3]: accepted, first token, bonus token
        logprobs = self.logprobs(logits, picks[:, 1:], batch)
        self.drafted += len(batch)
        for r, (ok, t0, t1), lp in zip(batch, picks.tolist(), logprobs):
            self.accepted += ok
            r.cached = len(r.context) + ok  # the pending token, and the draft when it is kept
            self.append(r, t0, lp and lp[0])
            if ok and not r.done:
                self.append(r, t1, lp and lp[1])

    def speculative_step(self, ids, params, u):
        pending, pos, token_mtp, pos_mtp = ids.unbind(1)
        draft, q = propose(self.draft_logits(pending, pos, token_mtp, pos_mtp), params, u[:, 3])
        h = self.model.trunk(torch.stack([pending, draft], 1), torch.stack([pos, pos + 1], 1))[0]
        logits = self.logits(h)
        accepted, first, bonus = verify(draft, q, logits, params, u)
        # the next draft starts from the two verified positions, or from the one before them and the first
        B = ids.size(0)
        self.mtp_hidden[:B] = torch.where(accepted[:, None, None], h, torch.cat([self.mtp_hidden[:B, 1:], h[:, :1]], 1))
        return logits, torch.stack([accepted.long(), first, bonus], 1)

    def draft_logits(self, pending, pos, token_mtp, pos_mtp):
        """The MTP block's logits for the token after the pending one, from the main model's states
        at pos_mtp and pos_mtp + 1 and the tokens after them -> [B, V]."""
        m, B = self.model, pending.size(0)
        mtp_pos = torch.stack([pos_mtp, (pos - 1).clamp(min=0)], 1)
        e = m.embed(torch.stack([token_mtp, pending], 1))
        return self.logits(m.mtp(self.mtp_hidden[:B], e, *m.rope_at(mtp_pos, 2), pos=mtp_pos)[:, -1])

    def capture_graphs(self):
        """CUDA graphs, captured before any request exists (their warm-up runs write into the still
        empty caches), sharing one memory pool: one decode step (sampling included) per batch bucket,
        and a prefill of refill_length tokens per bucket that holds at most PREFILL_GRAPH_TOKENS.
        The refill comes back every refill_length tokens of a long generation, and eagerly a prefill
        costs tens of host milliseconds whatever its size; a prefill past that many tokens keeps
        the GPU busy on its own (and its graph would hold its activations). A sliding window's
        ring or a masked attention stays eager."""
        pool, dev = torch.cuda.graph_pool_handle(), self.device
        graphs = {b: capture(self.step_fn, pool, *self.step_inputs(b)) for b in reversed(self.buckets)}
        small = [] if self.cfg.attn_window else [b for b in self.buckets if b * self.refill_length <= PREFILL_GRAPH_TOKENS]
        prefill_graphs = {b: capture(self.prefill_step, pool, torch.zeros(b, self.refill_length, dtype=torch.long, device=dev),
                                     torch.arange(b, device=dev), torch.zeros(b, dtype=torch.long, device=dev))
                          for b in reversed(small)}
        return dict(sorted(graphs.items())), dict(sorted(prefill_graphs.items()))

    def step_inputs(self, b):
        """Fresh inputs of the decode step for b sequences: ids (token and position; speculative:
        also the MTP block's token and position), sampling parameters and random numbers."""
        return (torch.zeros(b, 4 if self.speculative else 2, dtype=torch.long, device=self.device),
                torch.ones(b, 4, device=self.device), torch.ones(b, 4, device=self.device))

    # -------------------------------------------------------------------------
    # tokens in, ends checked

    def append(self, r, token, logprob):
        p = r.params
        if token in p.stop_token_ids:
            r.finish_reason = 'stop'
        else:
            r.tokens.append(token)
            r.context.append(token)
            if p.logprobs:
                r.logprobs.append(logprob)
            if p.stop:
                text = self.decode(r.tokens)
                cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
                if cut >= 0:
                    r.stop_at, r.finish_reason = cut, 'stop'
            if not r.done and len(r.tokens) >= p.max_tokens:
                r.finish_reason = 'length'
        if r.done:
            self.release(r)

    # -------------------------------------------------------------------------
    # scoring and embeddings: whole sequences, no cache

    def uncached(self):
        return self.caches_as(lambda cache, latent: (None, False))

    @contextmanager
    def caches_as(self, view):
        """Each attention's (cache, latent) replaced by view(cache, latent) inside the block."""
        attns = self.model.attentions()
        saved = [(a.cache, getattr(a, 'latent', False)) for a in attns]
        for a, (cache, latent) in zip(attns, saved):
            a.cache, a.latent = view(cache, latent)
        try:
            yield
        finally:
            for a, (cache, latent) in zip(attns, saved):
                a.cache, a.latent = cache, latent

    @torch.no_grad()
    def score(self, sequences):
        """log p(token_i | tokens before it) for i >= 1 of each sequence."""
        out = []
        with self.uncached():
            for seq in sequences:
                values = []
                for start, end, n in windows(len(seq), self.block_size, self.block_size // 2):
                    idx = torch.tensor(seq[start:end + 1], device=self.device)
                    logp = self.logits(self.model.trunk(idx[None, :-1])[0][0, -n:]).log_softmax(-1)
                    values += logp.gather(1, idx[-n:, None])[:, 0].tolist()
                out.append(values)
        return out

    @torch.no_grad()
    def embed(self, sequences):
        """[N, n_embd] float32: the mean over positions of the final hidden state after the last
        RMSNorm (the last block_size tokens of a longer sequence)."""
        with self.uncached():
            rows = [self.model.norm(self.model.trunk(torch.tensor(s[-self.block_size:], device=self.device)[None])[0])[0]
                    .float().mean(0) for s in sequences]
        return torch.stack(rows)
