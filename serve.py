"""
An OpenAI-compatible HTTP server for a model trained by train.py, with continuous batching.
$ python serve.py --out_dir=out-shakespeare-char
$ python serve.py --out_dir=out --port=8080 --api_key=secret --max_batch=32

Endpoints: POST /v1/completions, /v1/chat/completions, /v1/embeddings, /generate, /tokenize,
/detokenize; GET /v1/models, /tokenizer_info, /health, /metrics, /docs (OpenAPI).

One background thread owns the engine (engine.py is not thread-safe). HTTP handlers hand it work
through a thread-safe inbox; between two engine steps it adds new requests and aborts those whose
client went away, so sequences join and leave the running batch at every step. Each step's changed
requests go back to their handlers' asyncio queues.

Chat: prepare.chat_template is the one template (the one fine-tuning trains on); generation stops at
its end-of-message marker. Embeddings: the mean over positions of the final hidden state after the
final RMSNorm (engine.embed). Logprobs: token_logprobs are exact (echoed prompt tokens are scored by
engine.score); top_logprobs lists only the token itself, as the engine does not report alternatives.
"""
import asyncio
import base64
import json
import os
import queue
import secrets
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Literal

import swagger_ui
import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from checkpoint import CheckpointError, load_model
from engine import Engine, SamplingParams
from flags import check_flags, in_range, non_negative, one_of, positive
from prepare import END, chat_template

# -----------------------------------------------------------------------------
out_dir = 'out'
ckpt = 'latest'            # 'latest' (ckpt.pt) or 'best' (best.pt)
host = '127.0.0.1'
port = 8000
max_batch = 64             # sequences decoded together (cache slots)
max_queue = 256            # sequences waiting for a slot; past that, 429
max_prompt_tokens = 2048
max_tokens = 1024          # the most a request may ask to generate
max_n = 8                  # the most choices per prompt
api_key = ''               # when set, all but /health, /metrics, /docs need 'Authorization: Bearer <api_key>'
model_name = ''            # the id /v1/models reports; '' = out_dir's name
device = 'cuda' if torch.cuda.is_available() else 'cpu'
dtype = ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if torch.cuda.is_available() else 'float32'
cuda_graphs = True         # capture the decode step on CUDA
speculative = True         # draft with the MTP module where the checkpoint has one
# -----------------------------------------------------------------------------


@dataclass
class Limits:
    max_batch: int = 64
    max_queue: int = 256
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024
    max_n: int = 8


class ApiError(Exception):
    """Becomes an OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""
    def __init__(self, status, message, param=None, code=None, type='invalid_request_error'):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(status, message, type='invalid_request_error', param=None, code=None):
    return JSONResponse({'error': {'message': message, 'type': type, 'param': param, 'code': code}}, status)


# -----------------------------------------------------------------------------
# the engine thread


@dataclass
class Update:
    """A snapshot of one sequence after an engine step (the engine keeps mutating its Request)."""
    index: int
    text: str
    n_tokens: int
    finish_reason: str | None
    tokens: list | None = None       # with the last update only
    logprobs: list | None = None     # with the last update only


class Batcher:
    """The one thread that drives the engine: it runs queued work between steps and delivers each
    step's changes to the handlers waiting for them."""

    def __init__(self, load, metrics):
        self.load, self.metrics = load, metrics
        self.engine, self.error = None, None
        self.inbox = queue.SimpleQueue()   # (fn(engine), concurrent Future) or None to stop
        self.listeners = {}                # engine Request -> (event loop, asyncio.Queue, index)
        self.thread = threading.Thread(target=self.run, name='engine', daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def run(self):
        try:
            engine = self.load()
        except Exception as e:  # /health says why
            self.error = f"{type(e).__name__}: {e}"
            print(f"serve.py: error: the engine did not load ({self.error})", file=sys.stderr)
            return
        self.metrics.slots_total.set(engine.max_batch)
        self.engine = engine
        while True:
            for work in self.arrivals(wait=not engine.has_work()):
                if work is None:
                    return
                fn, future = work
                try:
                    future.set_result(fn(engine))
                except Exception as e:
                    future.set_exception(e)
            if engine.has_work():
                self.step(engine)
            self.metrics.running.set(engine.running)
            self.metrics.slots_used.set(engine.running)  # one cache slot per running sequence
            self.metrics.waiting.set(len(self.listeners) - engine.running)

    def arrivals(self, wait):
        """Everything in the inbox now; when idle, wait for the first."""
        items = [self.inbox.get()] if wait else []
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                return items

    def step(self, engine):
        try:
            changed = engine.step()
        except Exception as e:  # a bug or out of memory: end these requests, go on serving
            print(f"serve.py: error: engine step failed ({type(e).__name__}: {e}); "
                  f"aborting {len(self.listeners)} requests", file=sys.stderr)
            changed = list(self.listeners)
            for r in changed:
                engine.abort(r)
        for r in changed:
            self.deliver(r)

    def deliver(self, r):
        loop, updates, index = self.listeners.pop(r) if r.done else self.listeners[r]
        update = Update(index, r.text, len(r.tokens), r.finish_reason)
        if r.done:
            update.tokens, update.logprobs = list(r.tokens), list(r.logprobs)
        loop.call_soon_threadsafe(updates.put_nowait, update)

    def not_ready(self):
        return ApiError(503, f"the model is not loaded{f' ({self.error})' if self.error else ' yet'}",
                        type='server_error', code='model_not_ready')

    def call(self, fn):
        """Run fn(engine) on the engine thread -> an awaitable of its result."""
        if self.engine is None:
            raise self.not_ready()
        future = Future()
        self.inbox.put((fn, future))
        return asyncio.wrap_future(future)

    async def start_sequences(self, prompts, params, updates):
        """Add the sequences to the engine; their updates go to `updates`, tagged by index."""
        loop = asyncio.get_running_loop()

        def add(engine):
            requests = []
            try:
                for i, (prompt, p) in enumerate(zip(prompts, params)):
                    requests.append(engine.add_request(prompt, p))
                    self.listeners[requests[-1]] = (loop, updates, i)
            except ValueError:
                self.drop(engine, requests)
                raise
            return requests
        return await self.call(add)

    def drop(self, engine, requests):
        for r in requests:
            engine.abort(r)
            self.listeners.pop(r, None)

    def abort(self, requests):
        """Free the slots of sequences nobody waits for any more (fire and forget)."""
        if requests:
            self.call(lambda engine: self.drop(engine, requests))


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter('serve_requests', 'HTTP requests to the model endpoints', ['endpoint'], registry=r)
        self.prompt_tokens = Counter('serve_prompt_tokens', 'prompt tokens received', registry=r)
        self.generated_tokens = Counter('serve_generated_tokens', 'tokens generated', registry=r)
        self.ttft = Histogram('serve_time_to_first_token_seconds', 'arrival to first generated token', registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.per_token = Histogram('serve_time_per_output_token_seconds', 'time between generated tokens', registry=r,
                                   buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        self.running = Gauge('serve_requests_running', 'sequences in the decode batch', registry=r)
        self.waiting = Gauge('serve_requests_waiting', 'sequences waiting for a cache slot', registry=r)
        self.slots_total = Gauge('serve_cache_slots_total', 'cache slots (max_batch)', registry=r)
        self.slots_used = Gauge('serve_cache_slots_used', 'cache slots holding a sequence', registry=r)


# -----------------------------------------------------------------------------
# request bodies: unknown fields and wrong types are 400s, never silently dropped


class Body(BaseModel):
    model_config = ConfigDict(extra='forbid', strict=True)


class Sampling(Body):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False


TokenIds = list[int]


class CompletionRequest(Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=1)


class Message(Body):
    role: Literal['system', 'user', 'assistant']
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class GenerateRequest(Sampling):
    prompt: str


class EmbeddingRequest(Body):
    model: str | None = None
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal['float', 'base64'] = 'float'


class TokenizeRequest(Body):
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(Body):
    tokens: TokenIds


# -----------------------------------------------------------------------------
# the app


def make_app(load, name='model', limits=Limits(), api_key=''):
    """The FastAPI app. load() -> engine.Engine runs on the engine thread when the app starts
    (/health is 503 until it returns)."""
    metrics = Metrics()
    batcher = Batcher(load, metrics)
    outstanding = 0  # sequences admitted and not finished: the running batch plus the queue

    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    def check_key(request: HTTPRequest):
        given = request.headers.get('authorization', '')
        if api_key and not secrets.compare_digest(given.encode(), f'Bearer {api_key}'.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type='authentication_error', code='invalid_api_key')

    # /docs from swagger-ui-py's copy of Swagger UI: FastAPI's default page loads it from a CDN
    app = FastAPI(title='nanoGPT serve', lifespan=lifespan, description=__doc__, docs_url=None, redoc_url=None)
    app.mount('/docs-static', StaticFiles(directory=os.path.join(os.path.dirname(swagger_ui.__file__), 'static')))
    api = APIRouter(dependencies=[Depends(check_key)])  # the model's endpoints; /health and /metrics are open

    @app.exception_handler(ApiError)
    async def api_error(request, e):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, e):
        first = e.errors()[0]
        where = [str(x) for x in first['loc'] if x != 'body']
        return error_response(400, f"{'.'.join(where) or 'body'}: {first['msg']}", param='.'.join(where) or None,
                              code=first['type'])

    @app.exception_handler(HTTPException)
    async def http_error(request, e):
        return error_response(e.status_code, str(e.detail), code=str(e.status_code))

    @app.exception_handler(Exception)
    async def server_error(request, e):
        return error_response(500, f"{type(e).__name__}: {e}", type='server_error')

    def engine():
        if batcher.engine is None:
            raise batcher.not_ready()
        return batcher.engine

    def check_model(model):
        if model is not None and model != name:
            raise ApiError(404, f"model {model!r} does not exist: this server serves {name!r}",
                           param='model', code='model_not_found')

    def encode(prompt, param='prompt'):
        """A prompt (text or token ids) -> token ids, checked against the limits and the vocabulary."""
        if isinstance(prompt, str):
            try:
                ids = engine().encode(prompt)
            except ValueError as e:
                raise ApiError(400, f"{param}: {e}", param=param) from None
        else:
            ids = prompt
            bad = next((t for t in ids if not 0 <= t < engine().n_vocab), None)
            if bad is not None:
                raise ApiError(400, f"{param}: token id {bad} is outside the vocabulary [0, {engine().n_vocab})", param=param)
        if not ids:
            raise ApiError(400, f"{param}: the prompt is empty", param=param)
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"{param}: {len(ids)} tokens, more than this server's limit of {limits.max_prompt_tokens}",
                           param=param, code='context_length_exceeded')
        return ids

    def as_prompt_list(prompt):
        """The four shapes OpenAI allows: str, [str], [int], [[int]] -> a list of prompts."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise ApiError(400, "prompt: the prompt is empty", param='prompt')
        return prompt

    def sampling_params(body, default_max_tokens, logprobs=False, stop=()):
        """One SamplingParams per choice; n > 1 with a seed draws choice i with seed + i."""
        wanted = default_max_tokens if body.max_tokens is None else body.max_tokens
        if wanted > limits.max_tokens:
            raise ApiError(400, f"max_tokens: {wanted} is more than this server's limit of {limits.max_tokens}",
                           param='max_tokens')
        if body.n > limits.max_n:
            raise ApiError(400, f"n: {body.n} is more than this server's limit of {limits.max_n}", param='n')
        stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if '' in stops:
            raise ApiError(400, "stop: an empty stop string", param='stop')
        base = SamplingParams(max_tokens=wanted, temperature=body.temperature, top_k=body.top_k, top_p=body.top_p,
                              stop=stops + tuple(stop), seed=body.seed, logprobs=logprobs)
        return [replace(base, seed=None if body.seed is None else body.seed + i) for i in range(body.n)]

    async def run(prompts, params):
        """Start generating every (prompt, params) pair -> an async iterator of their Updates, in
        step order. Errors (a full queue) come here, before a streamed response has begun."""
        nonlocal outstanding
        if outstanding + len(prompts) > limits.max_batch + limits.max_queue:
            raise ApiError(429, f"the server is busy ({outstanding} sequences running or queued): retry later",
                           type='rate_limit_error', code='queue_full')
        live = [i for i, p in enumerate(params) if p.max_tokens > 0]  # max_tokens=0: echo/score only
        outstanding += len(live)
        arrival = time.perf_counter()
        updates = asyncio.Queue()
        try:
            requests = await batcher.start_sequences([prompts[i] for i in live], [params[i] for i in live], updates)
        except Exception as e:
            outstanding -= len(live)
            if isinstance(e, ValueError):
                raise ApiError(400, f"prompt: {e}", param='prompt') from None
            raise
        metrics.prompt_tokens.inc(sum(map(len, prompts)))
        return follow(len(prompts), live, requests, updates, arrival)

    async def follow(n, live, requests, updates, arrival):
        """Leaving early (a client that went away) aborts whatever is still running."""
        nonlocal outstanding
        try:
            for i in range(n):
                if i not in live:
                    yield Update(i, '', 0, 'length', [], [])
            last_time, last_count, finished = {}, {}, 0
            while finished < len(live):
                u = await updates.get()
                u.index = live[u.index]
                now, before = time.perf_counter(), last_count.get(u.index, 0)
                if u.n_tokens > before:
                    if before == 0:
                        metrics.ttft.observe(now - arrival)
                    else:
                        metrics.per_token.observe((now - last_time[u.index]) / (u.n_tokens - before))
                    metrics.generated_tokens.inc(u.n_tokens - before)
                    last_time[u.index], last_count[u.index] = now, u.n_tokens
                finished += u.finish_reason is not None
                yield u
        finally:
            outstanding -= len(live)
            batcher.abort([r for r in requests if not r.done])

    def check_streamable(body):
        if body.stream and getattr(body, 'logprobs', None) is not None:
            raise ApiError(400, "logprobs: not supported with stream=true", param='logprobs')

    def sse(chunks):
        async def events():
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type='text/event-stream')

    def usage(prompts, n_generated):
        n_prompt = sum(map(len, prompts))
        return {'prompt_tokens': n_prompt, 'completion_tokens': n_generated, 'total_tokens': n_prompt + n_generated}

    def token_logprobs(prompt, generated, scores, logprobs):
        """OpenAI's logprobs object for prompt (echoed, or [] if not) followed by generated."""
        ids, values = prompt + generated, ([None] + scores if prompt else []) + logprobs
        tokens = [engine().decode([t]) for t in ids]
        offsets = [0]  # into the choice's text
        for t in tokens[:-1]:
            offsets.append(offsets[-1] + len(t))
        return {'tokens': tokens, 'token_logprobs': values, 'text_offset': offsets[:len(tokens)],
                'top_logprobs': [None if v is None else {t: v} for t, v in zip(tokens, values)]}

    # -------------------------------------------------------------------------

    @api.post('/v1/completions')
    async def completions(body: CompletionRequest):
        metrics.requests.labels('completions').inc()
        check_model(body.model)
        check_streamable(body)
        prompts = [encode(p) for p in as_prompt_list(body.prompt)]
        per_prompt = sampling_params(body, 16, logprobs=body.logprobs is not None)
        seqs = [p for p in prompts for _ in per_prompt]
        texts = [engine().decode(p) if body.echo else '' for p in seqs]
        rid, created = f'cmpl-{uuid.uuid4().hex}', int(time.time())
        updates = await run(seqs, per_prompt * len(prompts))

        def chunk(choices):
            return {'id': rid, 'object': 'text_completion', 'created': created, 'model': name, 'choices': choices}

        if body.stream:
            async def chunks():
                sent = [None] * len(seqs)  # None: nothing yet, the echoed prompt goes first
                async for u in updates:
                    delta = u.text[sent[u.index] or 0:]
                    if sent[u.index] is None:
                        delta = texts[u.index] + delta
                    sent[u.index] = len(u.text)
                    yield chunk([{'index': u.index, 'text': delta, 'logprobs': None, 'finish_reason': u.finish_reason}])
            return sse(chunks())

        final = {u.index: u async for u in updates if u.finish_reason}
        scores = await batcher.call(lambda e: e.score(prompts)) if body.echo and body.logprobs is not None else None
        choices = []
        for i, u in sorted(final.items()):
            logprobs = None
            if body.logprobs is not None:
                echoed = seqs[i] if body.echo else []
                logprobs = token_logprobs(echoed, u.tokens, scores[i // body.n] if scores else [], u.logprobs)
            choices.append({'index': i, 'text': texts[i] + u.text, 'logprobs': logprobs, 'finish_reason': u.finish_reason})
        return {**chunk(choices), 'usage': usage(prompts, sum(len(u.tokens) for u in final.values()))}

    @api.post('/v1/chat/completions')
    async def chat_completions(body: ChatRequest):
        metrics.requests.labels('chat').inc()
        check_model(body.model)
        try:
            text = chat_template([m.model_dump() for m in body.messages])
        except ValueError as e:
            raise ApiError(400, f"messages: {e}", param='messages') from None
        prompt = encode(text, 'messages')
        params = sampling_params(body, limits.max_tokens, stop=(END,))
        rid, created = f'chatcmpl-{uuid.uuid4().hex}', int(time.time())
        updates = await run([prompt] * body.n, params)

        def chunk(choices, object='chat.completion'):
            return {'id': rid, 'object': object, 'created': created, 'model': name, 'choices': choices}

        if body.stream:
            async def chunks():
                sent = [None] * body.n
                async for u in updates:
                    delta = {} if sent[u.index] is not None else {'role': 'assistant'}
                    delta['content'] = u.text[sent[u.index] or 0:]
                    sent[u.index] = len(u.text)
                    yield chunk([{'index': u.index, 'delta': delta, 'finish_reason': u.finish_reason}], 'chat.completion.chunk')
            return sse(chunks())

        final = {u.index: u async for u in updates if u.finish_reason}
        choices = [{'index': i, 'message': {'role': 'assistant', 'content': u.text}, 'finish_reason': u.finish_reason}
                   for i, u in sorted(final.items())]
        return {**chunk(choices), 'usage': usage([prompt], sum(len(u.tokens) for u in final.values()))}

    @api.post('/generate')
    async def generate(body: GenerateRequest):
        """The simple form: {"prompt": "..."} -> {"text": "..."} (the generated continuation)."""
        metrics.requests.labels('generate').inc()
        if body.n != 1 or body.stream:
            raise ApiError(400, "n and stream: use /v1/completions", param='n' if body.n != 1 else 'stream')
        final = [u async for u in await run([encode(body.prompt)], sampling_params(body, 16)) if u.finish_reason]
        return {'text': final[0].text}

    @api.post('/v1/embeddings')
    async def embeddings(body: EmbeddingRequest):
        metrics.requests.labels('embeddings').inc()
        check_model(body.model)
        inputs = [encode(p, 'input') for p in as_prompt_list(body.input)]
        vectors = await batcher.call(lambda e: e.embed(inputs))
        data = [{'object': 'embedding', 'index': i,
                 'embedding': base64.b64encode(v.numpy().astype('<f4').tobytes()).decode()
                 if body.encoding_format == 'base64' else v.tolist()} for i, v in enumerate(vectors.cpu())]
        n = sum(map(len, inputs))
        return {'object': 'list', 'data': data, 'model': name, 'usage': {'prompt_tokens': n, 'total_tokens': n}}

    @api.get('/v1/models')
    async def models():
        return {'object': 'list', 'data': [{'id': name, 'object': 'model', 'created': 0, 'owned_by': 'nanogpt'}]}

    # vLLM's tokenizer endpoints: lm-evaluation-harness (tokenizer_backend=remote) tokenizes through them
    @api.get('/tokenizer_info')
    async def tokenizer_info():
        return {'eos_token': None, 'bos_token': None, 'pad_token': None, 'model_max_length': engine().block_size}

    @api.post('/tokenize')
    async def tokenize(body: TokenizeRequest):
        ids = encode(body.prompt)
        return {'tokens': ids, 'count': len(ids), 'max_model_len': engine().block_size}

    @api.post('/detokenize')
    async def detokenize(body: DetokenizeRequest):
        return {'prompt': engine().decode(encode(body.tokens, 'tokens'))}

    # -------------------------------------------------------------------------

    app.include_router(api)

    @app.get('/health')
    async def health():
        return {'status': 'ok', 'running': engine().running}

    @app.get('/docs', include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=app.title,
                                   swagger_js_url='/docs-static/swagger-ui-bundle.js',
                                   swagger_css_url='/docs-static/swagger-ui.css',
                                   swagger_favicon_url='/docs-static/favicon-32x32.png')

    @app.get('/metrics')
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# -----------------------------------------------------------------------------

if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    check_flags('serve.py', globals(), {
        'ckpt': one_of('latest', 'best'),
        'port': in_range(1, 65535),
        'max_batch': positive, 'max_queue': non_negative, 'max_prompt_tokens': positive,
        'max_tokens': positive, 'max_n': positive,
        'dtype': one_of('float32', 'bfloat16', 'float16'),
    })
    try:
        model, checkpoint = load_model(out_dir, ckpt, device, getattr(torch, dtype))
    except CheckpointError as e:
        raise SystemExit(f"serve.py: error: {e}")

    def load():
        return Engine(model, checkpoint['tokenizer'], max_batch=max_batch, cuda_graphs=cuda_graphs and 'cuda' in device,
                      speculative=speculative and model.mtp is not None)

    name = model_name or os.path.basename(os.path.abspath(out_dir))
    app = make_app(load, name, Limits(max_batch, max_queue, max_prompt_tokens, max_tokens, max_n), api_key)
    uvicorn.run(app, host=host, port=port)
