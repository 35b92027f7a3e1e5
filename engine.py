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
- Speculative decoding with the MTP module (DeepSeek-V3 sec. 5.4.3): the MTP block drafts one token,
  the next step verifies it with two query positions per sequence, and the draft is accepted or
  resampled so that the output distribution is exactly the model's (greedy: identical tokens).
"""
import math
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

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
    id: int = 0
    tokens: list = field(default_factory=list)     # generated so far
    logprobs: list = field(default_factory=list)
    text: str = ''                                 # final text so far: cut at a stop string
    finish_reason: str | None = None               # 'stop' | 'length' | 'abort'
    context: list = field(default_factory=list)    # the tokens in the cache, then the pending one
    cached: int = 0                                # how many of them the cache holds
    generator: torch.Generator | None = None

    @property
    def done(self):
        return self.finish_reason is not None


def sample_tokens(logits, requests, device):
    """logits [B, V] float -> token ids [B] on the host, each row with its request's temperature,
    top-k and top-p; seeded requests draw from their own generator."""
    B, V = logits.shape
    params = [r.params for r in requests]
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)
    top_k = torch.tensor([p.top_k or V for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    sorted_logits, order = (logits / temperature[:, None]).sort(-1, descending=True)
    sorted_logits = sorted_logits.masked_fill(torch.arange(V, device=device) >= top_k[:, None], float('-inf'))
    probs = sorted_logits.softmax(-1)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p[:, None], 0.0)  # the top one stays
    choice = torch.empty(B, 1, dtype=torch.long, device=device)
    shared = [i for i, r in enumerate(requests) if r.generator is None]
    if shared:
        choice[shared] = torch.multinomial(probs[shared], 1)
    for i, r in enumerate(requests):
        if r.generator is not None:
            choice[i] = torch.multinomial(probs[i], 1, generator=r.generator)
    sampled = order.gather(1, choice)[:, 0]
    greedy = torch.tensor([p.temperature == 0 for p in params], device=device)
    return torch.where(greedy, logits.argmax(-1), sampled).tolist()


class Engine:
    def __init__(self, model, tokenizer, max_batch=64, cuda_graphs=None, cache_mode='latent'):
        cache_mode = cache_mode if model.cfg.attn == 'mla' else 'naive'
        self.model, self.cfg = model, model.cfg
        self.device = model.head.weight.device
        self.encode, self.decode = get_tokenizer(tokenizer)
        self.n_vocab = min(vocab_size_of(tokenizer), self.cfg.vocab_size)
        self.block_size, self.max_batch = self.cfg.block_size, max_batch
        model.setup_cache(max_batch, cache_mode)
        self.waiting, self.active = deque(), []  # active[i] lives in cache slot i
        self.next_id = 0
        use_graphs = self.device.type == 'cuda' if cuda_graphs is None else cuda_graphs
        self.graphs = self.capture_graphs() if use_graphs else None

    # -------------------------------------------------------------------------
    # requests

    @property
    def running(self):
        return len(self.active)

    def has_work(self):
        return bool(self.waiting or self.active)

    def add_request(self, prompt, params):
        if not prompt:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.n_vocab})")
        r = Request(list(prompt), params, id=self.next_id)
        self.next_id += 1
        r.context = r.prompt[-self.block_size:]
        if params.seed is not None:
            r.generator = torch.Generator(self.device).manual_seed(params.seed)
        self.waiting.append(r)
        return r

    def abort(self, request):
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.active:
            self.release(request)
        if not request.done:
            request.finish_reason = 'abort'

    def release(self, request):
        """Free a slot: the last running request moves into it, keeping slots 0..n-1 full."""
        i, last = self.active.index(request), len(self.active) - 1
        if i != last:
            for attn in self.model.attentions():
                for c in attn.cache:
                    c[i] = c[last]
            self.active[i] = self.active[last]
        self.active.pop()

    def generate(self, prompts, params, on_token=None):
        """Run prompts (token lists) to their ends; params: one SamplingParams or one per prompt."""
        params = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        requests = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while not all(r.done for r in requests):
            for r in self.step():
                if on_token is not None:
                    on_token(r)
        return requests

    # -------------------------------------------------------------------------
    # one step: a prefill of whatever needs one, else one decode step for all

    @torch.no_grad()
    def step(self):
        """-> the requests that changed: a new token, or finished."""
        while self.waiting and len(self.active) < self.max_batch:
            self.active.append(self.waiting.popleft())
        for r in self.active:
            if len(r.context) > self.block_size:  # out of positions: go on from the last half
                r.context, r.cached = r.context[-(self.block_size // 2):], 0
        pending = [r for r in self.active if r.cached == 0]
        if pending:
            logits = self.prefill(pending)
        elif self.active:
            pending, logits = list(self.active), self.decode_step()
        for r in pending:
            r.cached = len(r.context)
        return self.advance(pending, logits) if pending else []

    def prefill(self, requests):
        """Fill the requests' slots with their contexts (right-padded into one batch: causal
        attention never lets a real token see the padding after it) -> next-token logits [n, V]."""
        lengths = [len(r.context) for r in requests]
        idx = torch.zeros(len(requests), max(lengths), dtype=torch.long)
        for i, r in enumerate(requests):
            idx[i, :lengths[i]] = torch.tensor(r.context)
        rows = torch.tensor([self.active.index(r) for r in requests], device=self.device)
        h = self.model.trunk(idx.to(self.device), rows=rows)[0]
        last = h[torch.arange(len(requests)), torch.tensor(lengths) - 1]
        return self.logits(last)

    def logits(self, h):
        return self.model.head(self.model.norm(h)).float()[..., :self.n_vocab]

    def decode_inputs(self):
        tokens = torch.tensor([r.context[-1] for r in self.active], device=self.device)
        pos = torch.tensor([len(r.context) - 1 for r in self.active], device=self.device)
        return tokens, pos

    def decode_step(self):
        """One token for every running request -> logits [n, V]."""
        tokens, pos = self.decode_inputs()
        n = len(tokens)
        if self.graphs is None:
            return self.decode_logits(tokens, pos)
        bucket = next(b for b in self.graphs if b >= n)
        graph, static_tokens, static_pos, static_logits = self.graphs[bucket]
        static_tokens[:n], static_pos[:n] = tokens, pos
        static_tokens[n:], static_pos[n:] = 0, 0  # free slots: harmless writes at position 0
        graph.replay()
        return static_logits[:n]

    def decode_logits(self, tokens, pos):
        h = self.model.trunk(tokens[:, None], pos[:, None])[0]
        return self.logits(h[:, -1])

    def capture_graphs(self):
        """A CUDA graph of one decode step per batch bucket, captured before any request exists:
        the warm-up writes into the (still empty) caches. Buckets share one memory pool."""
        buckets = [b for b in (2 ** i for i in range(int(math.log2(self.max_batch)) + 1))]
        if buckets[-1] != self.max_batch:
            buckets.append(self.max_batch)
        graphs, pool = {}, torch.cuda.graph_pool_handle()
        for b in reversed(buckets):
            tokens = torch.zeros(b, dtype=torch.long, device=self.device)
            pos = torch.zeros(b, dtype=torch.long, device=self.device)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):
                    self.decode_logits(tokens, pos)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.no_grad():
                logits = self.decode_logits(tokens, pos)
            graphs[b] = (graph, tokens, pos, logits)
        return dict(sorted(graphs.items()))

    # -------------------------------------------------------------------------
    # tokens in, ends checked

    def advance(self, requests, logits):
        tokens = sample_tokens(logits, requests, self.device)
        logprobs = None
        if any(r.params.logprobs for r in requests):
            logprobs = logits.log_softmax(-1).gather(1, torch.tensor(tokens, device=self.device)[:, None])[:, 0].tolist()
        for i, (r, t) in enumerate(zip(requests, tokens)):
            self.append(r, t, logprobs[i] if logprobs is not None else None)
            if r.done:
                self.release(r)
        return requests

    def append(self, r, token, logprob):
        p = r.params
        if token in p.stop_token_ids:
            r.finish_reason = 'stop'
            r.text = self.decode(r.tokens)
            return
        r.tokens.append(token)
        r.context.append(token)
        if p.logprobs:
            r.logprobs.append(logprob)
        text = self.decode(r.tokens)
        cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
        if cut >= 0:
            r.text, r.finish_reason = text[:cut], 'stop'
        elif len(r.tokens) >= p.max_tokens:
            r.text, r.finish_reason = text, 'length'
        else:
            r.text = text[:len(text) - self.held_back(text, p.stop)]

    @staticmethod
    def held_back(text, stops):
        """How many trailing characters may still change: the start of a stop string, or an
        incomplete UTF-8 character that the next token completes."""
        n = len(text) - len(text.rstrip('\ufffd'))
        for s in stops:
            n = max(n, max((k for k in range(1, len(s)) if text.endswith(s[:k])), default=0))
        return n

    # -------------------------------------------------------------------------
    # scoring and embeddings: whole sequences, no cache

    @contextmanager
    def uncached(self):
        attns = self.model.attentions()
        saved = [(a.cache, getattr(a, 'latent', False)) for a in attns]
        for a in attns:
            a.cache, a.latent = None, False
        try:
            yield
        finally:
            for a, (cache, latent) in zip(attns, saved):
                a.cache, a.latent = cache, latent

    def windows(self, n):
        """(start, end, first scored) windows of at most block_size tokens over a sequence of n:
        each token past the first is scored once, with at least block_size/2 tokens of context."""
        L, stride, start, scored = self.block_size, self.block_size // 2, 0, 1
        while True:
            end = min(start + L, n)
            yield start, end, scored
            if end == n:
                return
            start, scored = start + stride, end

    @torch.no_grad()
    def score(self, sequences):
        """log p(token_i | tokens before it) for i >= 1 of each sequence."""
        out = []
        with self.uncached():
            for seq in sequences:
                values = []
                for start, end, first in self.windows(len(seq)):
                    idx = torch.tensor(seq[start:end], device=self.device)[None]
                    logp = self.logits(self.model.trunk(idx)[0][0, :-1]).log_softmax(-1)
                    targets = idx[0, 1:]
                    values += logp.gather(1, targets[:, None])[first - start - 1:, 0].tolist()
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
