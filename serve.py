"""
An OpenAI-compatible HTTP server for a model trained by train.py, with continuous batching.
$ python serve.py --out_dir=out-shakespeare-char      # http://127.0.0.1:8000/ is a chat page
$ python serve.py --out_dir=out --port=8080 --api_key=secret --max_batch=32

Endpoints: POST /v1/completions, /v1/chat/completions, /v1/embeddings, /generate, /tokenize,
/detokenize; GET / (the chat page), /v1/models, /tokenizer_info, /health, /metrics, /docs (OpenAPI).

The engine loop runs in a process of its own (a thread of the server where a test asks), so HTTP
work never holds up a step; two pipes, non-blocking at both ends, join them. Handlers send it
commands (new sequences as token ids, aborts of those whose client went away, scoring); it takes all
that have come between two steps, so requests that arrive together are prefilled together, and
reports once per step: each changed sequence's new token ids and finish. The event loop appends the
ids and wakes the handlers; a stream turns ids into text only when it is ready to send more, so an
event carries all the text generated since the last one (incremental detokenization), and with many
streams each sends fewer, larger events (--events_per_s is shared by all).

Chat: prepare.chat_template is the one template (the one fine-tuning trains on); generation stops at
its end-of-message marker. Embeddings: the mean over positions of the final hidden state after the
final RMSNorm (engine.embed). Logprobs: token_logprobs are exact (echoed prompt tokens are scored by
engine.score); top_logprobs lists only the token itself, as the engine does not report alternatives.
"""
import asyncio
import base64
import contextlib
import itertools
import json
import multiprocessing
import os
import pickle
import secrets
import select
import sys
import threading
import time
import uuid
from dataclasses import dataclass, replace
from functools import partial
from typing import Literal

import swagger_ui
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from checkpoint import load_model
from engine import Engine, SamplingParams, held_back
from flags import (DTYPES, check_flags, default_device, default_dtype, device_exists, dtype_supported,
                   end_in_one_line, in_range, non_negative, one_line, one_of, positive)
from prepare import END, chat_template, get_tokenizer

# -----------------------------------------------------------------------------
out_dir = 'out'
ckpt = 'latest'            # 'latest' (ckpt.pt) or 'best' (best.pt)
host = '127.0.0.1'
port = 8000
max_batch = 64             # sequences decoded together (cache slots)
max_queue = 256            # sequences waiting for a slot; past that, 429
max_prompt_tokens = 2048
prefill_chunk = 2048       # prompt tokens prefilled per engine step; a longer prompt goes in chunks
max_tokens = 1024          # the most a request may ask to generate
max_n = 8                  # the most choices per prompt
events_per_s = 4000        # stream events a second, all streams together: many streams send fewer, larger ones
api_key = ''               # when set, all but /, /health, /metrics, /docs need 'Authorization: Bearer <api_key>'
model_name = ''            # the id /v1/models reports; '' = out_dir's name
device = default_device()
dtype = default_dtype()
cuda_graphs = True         # capture the decode step on CUDA
speculative = True         # draft with the MTP module where the checkpoint has one
# -----------------------------------------------------------------------------
CHAT_PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'static', 'chat.html')


@dataclass
class Limits:
    max_batch: int = 64
    max_queue: int = 256
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024
    max_n: int = 8
    events_per_s: int = 4000


class ApiError(Exception):
    """Becomes an OpenAI-style error body: {"error": {"message", "type", "param", "code"}}."""
    def __init__(self, status, message, param=None, code=None, type='invalid_request_error'):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(status, message, type='invalid_request_error', param=None, code=None):
    return JSONResponse({'error': {'message': message, 'type': type, 'param': param, 'code': code}}, status)


# -----------------------------------------------------------------------------
# the engine's side: where the engine lives (a process of its own, or a thread of the server's)


def load_engine(source, which='latest', device='cpu', dtype='float32', max_batch=64, cuda_graphs=True,
                speculative=True, prefill_chunk=2048):
    """The engine python serve.py serves (bench_serve.py loads the same)."""
    model, checkpoint = load_model(source, which, device, DTYPES[dtype])
    return Engine(model, checkpoint['tokenizer'], max_batch=max_batch, cuda_graphs=cuda_graphs and 'cuda' in device,
                  speculative=speculative and model.mtp is not None, prefill_chunk=prefill_chunk)


class Channel:
    """One direction of a pipe between the server and the engine loop, carrying pickled messages,
    non-blocking at both ends: send() never waits (what the pipe cannot take yet stays in a buffer
    until flush() gets it out), receive() returns the messages complete so far."""

    def __init__(self, connection):
        self.connection, self.fd = connection, connection.fileno()  # the connection keeps the fd open
        os.set_blocking(self.fd, False)
        self.outgoing, self.incoming, self.closed = bytearray(), bytearray(), False

    def send(self, message):
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.outgoing += len(data).to_bytes(4, 'little') + data
        return self.flush()

    def flush(self):
        """Write what the pipe takes -> whether all is out."""
        try:
            while self.outgoing:
                del self.outgoing[:os.write(self.fd, self.outgoing)]
        except BlockingIOError:
            return False
        except BrokenPipeError:  # nobody reads any more
            self.outgoing.clear()
        return True

    def receive(self):
        """The messages complete so far; `closed` tells when the other end has closed the pipe."""
        try:
            while data := os.read(self.fd, 1 << 20):
                self.incoming += data
            self.closed = True
        except BlockingIOError:
            pass
        messages = []
        while len(self.incoming) >= 4 and len(self.incoming) >= 4 + (n := int.from_bytes(self.incoming[:4], 'little')):
            messages.append(pickle.loads(self.incoming[4:4 + n]))
            del self.incoming[:4 + n]
        return messages


def run_engine(load, commands, reports):
    """Load the engine, say so (or why not) on `reports`, and run `commands` until told to stop or
    the server is gone."""
    outbox = Channel(reports)
    try:
        engine = load()
    except Exception as e:
        outbox.send(('failed', one_line(e)))
    else:
        outbox.send(('ready', {'tokenizer': engine.tokenizer, 'n_vocab': engine.n_vocab,
                               'block_size': engine.block_size, 'max_batch': engine.max_batch}))
        EngineLoop(engine, outbox).run(Channel(commands))


class EngineLoop:
    """Runs the server's commands between engine steps and reports each step's changes: per changed
    sequence (id, new token ids, their logprobs, finish_reason, stop_at)."""

    def __init__(self, engine, outbox):
        self.engine, self.outbox = engine, outbox
        self.requests = {}  # sequence id -> engine Request
        self.reported = {}  # engine Request -> (sequence id, tokens reported so far)

    def run(self, inbox):
        while True:
            if not self.engine.has_work():  # idle: wait for a command (or for the pipe to take what waits)
                select.select([inbox.fd], [self.outbox.fd] if self.outbox.outgoing else [], [])
            commands = inbox.receive()
            if inbox.closed:  # the server is gone
                return
            for command in commands:
                if command is None:
                    return
                getattr(self, command[0])(*command[1:])
            changed = self.step() if self.engine.has_work() else []
            if commands or changed:
                self.outbox.send(('step', [self.report(r) for r in changed], self.engine.running, len(self.engine.waiting)))
            else:
                self.outbox.flush()

    def step(self):
        try:
            return self.engine.step()
        except Exception as e:  # a bug or out of memory: end these requests, go on serving
            print(f"serve.py: error: engine step failed ({one_line(e)}); aborting {len(self.reported)} requests",
                  file=sys.stderr)
            changed = list(self.reported)
            for r in changed:
                self.engine.abort(r)
            return changed

    def report(self, r):
        seq, n = self.reported.pop(r)
        if r.done:
            del self.requests[seq]
        else:
            self.reported[r] = (seq, len(r.tokens))
        return seq, r.tokens[n:], r.logprobs[n:], r.finish_reason, r.stop_at

    # the commands

    def add(self, sequences):
        for seq, prompt, params in sequences:
            r = self.engine.add_request(prompt, params)
            self.requests[seq], self.reported[r] = r, (seq, 0)

    def abort(self, sequences):
        for seq in sequences:
            r = self.requests.pop(seq, None)
            if r is not None:
                self.engine.abort(r)
                del self.reported[r]

    def score(self, call, sequences):
        self.answer(call, lambda: self.engine.score(sequences))

    def embed(self, call, sequences):
        self.answer(call, lambda: self.engine.embed(sequences).cpu())

    def answer(self, call, fn):
        try:
            self.outbox.send(('result', call, fn(), None))
        except Exception as e:
            self.outbox.send(('result', call, None, one_line(e)))


# -----------------------------------------------------------------------------
# the server's side


class TextStream:
    """The text of a growing list of token ids, decoding the ids new since the last call and those
    of the call before (a token's text may depend on its neighbours: a UTF-8 character split over
    tokens, a leading space some tokenizers drop at the start of a text)."""

    def __init__(self, decode):
        self.decode, self.text = decode, ''
        self.prefix, self.read = 0, 0  # ids [prefix, read) gave the last call's text

    def update(self, tokens):
        before = self.decode(tokens[self.prefix:self.read])
        now = self.decode(tokens[self.prefix:])
        if len(now) > len(before) and not now.endswith('\ufffd'):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(tokens)
        return self.text


class Sequence:
    """One generated sequence: the token ids the engine has sent, turned into text on demand."""

    def __init__(self, id, index, generation, params, decode):
        self.id, self.index, self.generation, self.stops, self.decode = id, index, generation, params.stop, decode
        self.tokens, self.logprobs = [], []
        self.finish_reason, self.stop_at, self.first_time = None, None, None
        self.stream = TextStream(decode)
        self.decoded, self.sent, self.closed = 0, 0, False  # ids decoded, characters given out, finish given out

    @property
    def text(self):
        """All the text, once finished: cut at a stop string."""
        return self.decode(self.tokens)[:self.stop_at]

    def news(self):
        """(index, the text since the last call, finish_reason) if there is any, else None."""
        if self.closed or (self.decoded == len(self.tokens) and self.finish_reason is None):
            return None
        if self.finish_reason is None:
            text, self.decoded = self.stream.update(self.tokens), len(self.tokens)
            text = text[:len(text) - held_back(text, self.stops)]
            if len(text) == self.sent:
                return None
        else:
            text, self.closed = self.text, True
        delta, self.sent = text[self.sent:], len(text)
        return self.index, delta, self.finish_reason


class Generation:
    """One request's sequences; `changed` is set whenever the engine sent any of them something."""

    def __init__(self, arrival, abort):
        self.arrival, self.abort = arrival, abort
        self.sequences, self.changed, self.finished = [], asyncio.Event(), asyncio.Event()

    @property
    def done(self):
        return all(s.finish_reason is not None for s in self.sequences)

    async def news(self, spacing):
        """Each time something changed: [(index, new text, finish_reason)] of the sequences with news,
        everything since the last time (however many steps that was). After news, the next waits
        spacing() seconds, unless all finish meanwhile."""
        while True:
            news = [n for n in map(Sequence.news, self.sequences) if n is not None]
            if news:
                yield news
                await self.pause(spacing())
            if all(s.closed for s in self.sequences):
                return
            await self.changed.wait()
            self.changed.clear()

    async def pause(self, seconds):
        if seconds > 0 and not self.done:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self.finished.wait()

    def close(self):
        """Abort whatever is still running (a client that went away)."""
        self.abort(self.sequences)


class EngineClient:
    """Starts the engine loop (in a thread, or with process=True in a spawned process: load must then
    pickle), sends it commands and applies its reports, as the event loop finds them in the pipe, to
    the sequences handlers wait on. on_failure() is called when there is no engine: it failed to load,
    or it stopped."""

    def __init__(self, load, metrics, process=False, on_failure=None):
        self.load, self.metrics, self.process, self.on_failure = load, metrics, process, on_failure
        self.info, self.error, self.running, self.stopping = None, None, 0, False
        self.encode = self.decode = None
        self.sequences = {}  # id -> Sequence the engine is working on
        self.calls = {}      # id -> asyncio.Future of a score or embed call
        self.ids = itertools.count()
        self.worker = None

    def launch(self):
        """Start the engine loop, if not yet."""
        if self.worker is not None:
            return
        context = multiprocessing.get_context('spawn')  # a fresh interpreter: CUDA works in it
        (engine_reads, server_writes), (server_reads, engine_writes) = context.Pipe(False), context.Pipe(False)
        Worker = context.Process if self.process else threading.Thread
        self.worker = Worker(target=run_engine, args=(self.load, engine_reads, engine_writes), name='engine', daemon=True)
        self.worker.start()
        if self.process:  # the child holds these ends now: its exit closes the pipes
            engine_reads.close()
            engine_writes.close()
        self.commands, self.reports = Channel(server_writes), Channel(server_reads)

    def wait_until_loaded(self):
        """Before serving: block until the engine has loaded (-> True) or failed to (-> False)."""
        while self.info is None and self.error is None:
            select.select([self.reports.fd], [], [])
            self.read_reports()
        return self.info is not None

    def start(self):
        """In the event loop: launch the engine loop, if not yet, and follow its reports."""
        self.loop = asyncio.get_running_loop()
        self.launch()
        self.loop.add_reader(self.reports.fd, self.on_reports)

    def stop(self):
        self.stopping, self.info = True, None
        self.send(None)
        self.worker.join(timeout=10)
        if self.process and self.worker.is_alive():
            self.worker.terminate()
        self.loop.remove_reader(self.reports.fd)

    def send(self, command):
        if not self.commands.send(command):  # the pipe is full: the rest goes when it can
            self.loop.add_writer(self.commands.fd, self.flush_commands)

    def flush_commands(self):
        if self.commands.flush():
            self.loop.remove_writer(self.commands.fd)

    def on_reports(self):
        if self.read_reports():
            self.loop.remove_reader(self.reports.fd)

    def read_reports(self):
        """Apply the reports in the pipe -> whether the engine is gone (asked to, failed to load,
        crashed or was killed)."""
        self.dispatch(self.reports.receive())
        if self.reports.closed and not (self.stopping or self.error):
            self.on_failed('the engine stopped unexpectedly')
        return self.reports.closed

    def dispatch(self, messages):
        for kind, *body in messages:
            getattr(self, 'on_' + kind)(*body)

    # the engine's messages

    def on_ready(self, info):
        self.encode, self.decode = get_tokenizer(info['tokenizer'])
        self.info = info
        self.metrics.slots_total.set(info['max_batch'])

    def on_failed(self, why):
        """No engine (it did not load, or it stopped): end every sequence and call."""
        self.error, self.info = why, None
        print(f"serve.py: error: no engine ({why})", file=sys.stderr)
        self.on_step([(seq, [], [], 'abort', None) for seq in self.sequences], 0, 0)
        for call in self.calls.values():
            if not call.done():
                call.set_exception(self.not_ready())
        self.calls.clear()
        if self.on_failure is not None:
            self.on_failure()

    def on_step(self, updates, running, waiting):
        now, generated = time.perf_counter(), 0
        for seq, tokens, logprobs, finish_reason, stop_at in updates:
            s = self.sequences.get(seq)
            if s is None:  # aborted meanwhile
                continue
            s.tokens += tokens
            s.logprobs += logprobs
            generated += len(tokens)
            if tokens and s.first_time is None:
                s.first_time = now
                self.metrics.ttft.observe(now - s.generation.arrival)
            if finish_reason is not None:
                self.finish(s, finish_reason, stop_at, now)
            s.generation.changed.set()
        self.metrics.generated_tokens.inc(generated)
        self.running = running
        self.metrics.running.set(running)
        self.metrics.slots_used.set(running)  # one cache slot per running sequence
        self.metrics.waiting.set(waiting)

    def finish(self, s, finish_reason, stop_at, now):
        del self.sequences[s.id]
        s.finish_reason, s.stop_at = finish_reason, stop_at
        if len(s.tokens) > 1:
            self.metrics.per_token.observe((now - s.first_time) / (len(s.tokens) - 1))
        if s.generation.done:
            s.generation.finished.set()

    def on_result(self, call, value, error):
        future = self.calls.pop(call)
        if not future.done():
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(ApiError(500, error, type='server_error'))

    # the handlers' side

    def not_ready(self):
        return ApiError(503, f"the model is not loaded{f' ({self.error})' if self.error else ' yet'}",
                        type='server_error', code='model_not_ready')

    def check_ready(self):
        if self.info is None:
            raise self.not_ready()

    def generate(self, prompts, params):
        """A Generation of one sequence per (prompt, params), sent to the engine in one message;
        max_tokens=0 (echo and score only) finishes at once."""
        self.check_ready()
        g = Generation(time.perf_counter(), self.abort)
        work = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            s = Sequence(next(self.ids), i, g, p, self.decode)
            g.sequences.append(s)
            if p.max_tokens == 0:
                s.finish_reason = 'length'
            else:
                self.sequences[s.id] = s
                work.append((s.id, prompt, p))
        if work:
            self.send(('add', work))
        if g.done:
            g.finished.set()
        return g

    def abort(self, sequences):
        ids = [s.id for s in sequences if self.sequences.pop(s.id, None) is not None]
        if ids:
            self.send(('abort', ids))

    async def call(self, name, *args):
        """The engine's score or embed, between two steps."""
        self.check_ready()
        call, future = next(self.ids), self.loop.create_future()
        self.calls[call] = future
        self.send((name, call, *args))
        return await future


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter('serve_requests', 'HTTP requests to the model endpoints', ['endpoint'], registry=r)
        self.prompt_tokens = Counter('serve_prompt_tokens', 'prompt tokens received', registry=r)
        self.generated_tokens = Counter('serve_generated_tokens', 'tokens generated', registry=r)
        self.ttft = Histogram('serve_time_to_first_token_seconds', 'arrival to first generated token', registry=r,
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.per_token = Histogram('serve_time_per_output_token_seconds', "a sequence's mean time between generated tokens",
                                   registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        self.running = Gauge('serve_requests_running', 'sequences in the decode batch', registry=r)
        self.waiting = Gauge('serve_requests_waiting', 'sequences waiting for a cache slot', registry=r)
        self.slots_total = Gauge('serve_cache_slots_total', 'cache slots (max_batch)', registry=r)
        self.slots_used = Gauge('serve_cache_slots_used', 'cache slots holding a sequence', registry=r)


# -----------------------------------------------------------------------------
# request bodies: unknown fields and wrong types are 400s, never silently dropped


class Body(BaseModel):
    model_config = ConfigDict(extra='forbid', strict=True)


class StreamOptions(Body):
    include_usage: bool = False  # a last chunk with the usage and no choices, as OpenAI sends


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
    stream_options: StreamOptions | None = None


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


def make_app(load, name='model', limits=Limits(), api_key='', engine_process=False, on_engine_failure=None):
    """The FastAPI app. load() -> engine.Engine runs when the app starts (or before, through
    app.state.engine.launch()), in a thread of this process or, with engine_process=True, in a
    spawned process of its own (load must then pickle, e.g. functools.partial(load_engine, ...));
    /health is 503 until it returns, and says why if it fails (on_engine_failure() is called then,
    and if the engine stops later)."""
    metrics = Metrics()
    engine = EngineClient(load, metrics, engine_process, on_engine_failure)
    streams = 0  # streamed responses open

    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    async def check_key(request: HTTPRequest):  # async: FastAPI would run a plain function in a thread
        given = request.headers.get('authorization', '')
        if api_key and not secrets.compare_digest(given.encode(), f'Bearer {api_key}'.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type='authentication_error', code='invalid_api_key')

    # /docs from swagger-ui-py's copy of Swagger UI: FastAPI's default page loads it from a CDN
    app = FastAPI(title='nanoGPT serve', lifespan=lifespan, description=__doc__, docs_url=None, redoc_url=None)
    app.state.engine = engine  # python serve.py launches it before serving
    app.mount('/docs-static', StaticFiles(directory=os.path.join(os.path.dirname(swagger_ui.__file__), 'static')))
    api = APIRouter(dependencies=[Depends(check_key)])  # the model's endpoints; /, /health, /metrics are open

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

    def check_model(model):
        if model is not None and model != name:
            raise ApiError(404, f"model {model!r} does not exist: this server serves {name!r}",
                           param='model', code='model_not_found')

    def encode(prompt, param='prompt'):
        """A prompt (text or token ids) -> token ids, checked against the limits and the vocabulary."""
        engine.check_ready()
        if isinstance(prompt, str):
            try:
                ids = engine.encode(prompt)
            except ValueError as e:
                raise ApiError(400, f"{param}: {e}", param=param) from None
        else:
            ids, n_vocab = prompt, engine.info['n_vocab']
            bad = next((t for t in ids if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise ApiError(400, f"{param}: token id {bad} is outside the vocabulary [0, {n_vocab})", param=param)
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
        if body.stream_options is not None and not body.stream:
            raise ApiError(400, "stream_options: only allowed with stream=true", param='stream_options')
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

    def start_generation(prompts, params):
        """Start generating every (prompt, params) pair -> their Generation, to close() when done
        with it. A full queue is a 429 here, before a streamed response has begun."""
        busy = len(engine.sequences)  # running or queued
        if busy + len(prompts) > limits.max_batch + limits.max_queue:
            raise ApiError(429, f"the server is busy ({busy} sequences running or queued): retry later",
                           type='rate_limit_error', code='queue_full')
        metrics.prompt_tokens.inc(sum(map(len, prompts)))
        return engine.generate(prompts, params)

    async def finished(g):
        """The Generation's sequences once all are done (aborted if the client goes away first)."""
        try:
            await g.finished.wait()
            return g.sequences
        finally:
            g.close()

    def check_streamable(body):
        if body.stream and getattr(body, 'logprobs', None) is not None:
            raise ApiError(400, "logprobs: not supported with stream=true", param='logprobs')

    def streamed(body, envelope, prompts, g, choice):
        """The streamed response: whenever there is news, one write of one event per choice with news
        (all its text since its last event); with include_usage, then a chunk with the usage and no
        choices; then [DONE]. choice(index, text, finish_reason) -> a choice, envelope(choices) -> a
        chunk. Streams share limits.events_per_s: with many, each sends fewer, larger events, so that
        neither this process nor the clients spend a step's time on every token of every stream."""
        with_usage = body.stream_options is not None and body.stream_options.include_usage
        no_usage_yet = {'usage': None} if with_usage else {}

        def event(choices, **usage_field):
            return f"data: {json.dumps({**envelope(choices), **usage_field}, ensure_ascii=False)}\n\n"

        async def events():
            nonlocal streams
            streams += 1
            try:
                async for news in g.news(lambda: streams / limits.events_per_s):
                    yield ''.join(event([choice(*n)], **no_usage_yet) for n in news)
                if with_usage:
                    yield event([], usage=usage(prompts, g.sequences))
                yield "data: [DONE]\n\n"
            finally:
                streams -= 1
                g.close()
        return StreamingResponse(events(), media_type='text/event-stream')

    def usage(prompts, sequences):
        n_prompt, n_generated = sum(map(len, prompts)), sum(len(s.tokens) for s in sequences)
        return {'prompt_tokens': n_prompt, 'completion_tokens': n_generated, 'total_tokens': n_prompt + n_generated}

    def token_logprobs(prompt, generated, scores, logprobs):
        """OpenAI's logprobs object for prompt (echoed, or [] if not) followed by generated."""
        ids, values = prompt + generated, ([None] + scores if prompt else []) + logprobs
        tokens = [engine.decode([t]) for t in ids]
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
        texts = [engine.decode(p) if body.echo else '' for p in seqs]
        rid, created = f'cmpl-{uuid.uuid4().hex}', int(time.time())
        g = start_generation(seqs, per_prompt * len(prompts))

        def envelope(choices):
            return {'id': rid, 'object': 'text_completion', 'created': created, 'model': name, 'choices': choices}

        if body.stream:
            started = set()  # the echoed prompt goes out with a choice's first event

            def choice(index, text, finish_reason):
                if index not in started:
                    started.add(index)
                    text = texts[index] + text
                return {'index': index, 'text': text, 'logprobs': None, 'finish_reason': finish_reason}
            return streamed(body, envelope, prompts, g, choice)

        done = await finished(g)
        scores = await engine.call('score', prompts) if body.echo and body.logprobs is not None else None
        choices = []
        for i, s in enumerate(done):
            logprobs = None
            if body.logprobs is not None:
                echoed = seqs[i] if body.echo else []
                logprobs = token_logprobs(echoed, s.tokens, scores[i // body.n] if scores else [], s.logprobs)
            choices.append({'index': i, 'text': texts[i] + s.text, 'logprobs': logprobs, 'finish_reason': s.finish_reason})
        return {**envelope(choices), 'usage': usage(prompts, done)}

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
        g = start_generation([prompt] * body.n, params)

        def envelope(choices, object='chat.completion'):
            return {'id': rid, 'object': object, 'created': created, 'model': name, 'choices': choices}

        if body.stream:
            started = set()  # the role goes out with a choice's first event

            def choice(index, text, finish_reason):
                delta = {'content': text} if index in started else {'role': 'assistant', 'content': text}
                started.add(index)
                return {'index': index, 'delta': delta, 'finish_reason': finish_reason}
            return streamed(body, partial(envelope, object='chat.completion.chunk'), [prompt], g, choice)

        done = await finished(g)
        choices = [{'index': s.index, 'message': {'role': 'assistant', 'content': s.text}, 'finish_reason': s.finish_reason}
                   for s in done]
        return {**envelope(choices), 'usage': usage([prompt], done)}

    @api.post('/generate')
    async def generate(body: GenerateRequest):
        """The simple form: {"prompt": "..."} -> {"text": "..."} (the generated continuation)."""
        metrics.requests.labels('generate').inc()
        if body.n != 1 or body.stream:
            raise ApiError(400, "n and stream: use /v1/completions", param='n' if body.n != 1 else 'stream')
        done = await finished(start_generation([encode(body.prompt)], sampling_params(body, 16)))
        return {'text': done[0].text}

    @api.post('/v1/embeddings')
    async def embeddings(body: EmbeddingRequest):
        metrics.requests.labels('embeddings').inc()
        check_model(body.model)
        inputs = [encode(p, 'input') for p in as_prompt_list(body.input)]
        vectors = await engine.call('embed', inputs)
        data = [{'object': 'embedding', 'index': i,
                 'embedding': base64.b64encode(v.numpy().astype('<f4').tobytes()).decode()
                 if body.encoding_format == 'base64' else v.tolist()} for i, v in enumerate(vectors)]
        n = sum(map(len, inputs))
        return {'object': 'list', 'data': data, 'model': name, 'usage': {'prompt_tokens': n, 'total_tokens': n}}

    @api.get('/v1/models')
    async def models():
        return {'object': 'list', 'data': [{'id': name, 'object': 'model', 'created': 0, 'owned_by': 'nanogpt'}]}

    # vLLM's tokenizer endpoints: lm-evaluation-harness (tokenizer_backend=remote) tokenizes through them
    @api.get('/tokenizer_info')
    async def tokenizer_info():
        engine.check_ready()
        return {'eos_token': None, 'bos_token': None, 'pad_token': None, 'model_max_length': engine.info['block_size']}

    @api.post('/tokenize')
    async def tokenize(body: TokenizeRequest):
        ids = encode(body.prompt)
        return {'tokens': ids, 'count': len(ids), 'max_model_len': engine.info['block_size']}

    @api.post('/detokenize')
    async def detokenize(body: DetokenizeRequest):
        return {'prompt': engine.decode(encode(body.tokens, 'tokens'))}

    # -------------------------------------------------------------------------

    app.include_router(api)

    @app.get('/', include_in_schema=False)
    async def chat_page():
        return FileResponse(CHAT_PAGE, media_type='text/html')

    @app.get('/health')
    async def health():
        engine.check_ready()
        return {'status': 'ok', 'running': engine.running}

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
        'max_tokens': positive, 'max_n': positive, 'events_per_s': positive, 'prefill_chunk': positive,
        'device': device_exists(), 'dtype': dtype_supported(),
    })
    end_in_one_line('serve.py', '--max_batch')
    load = partial(load_engine, out_dir, ckpt, device, dtype, max_batch, cuda_graphs, speculative, prefill_chunk)
    name = model_name or os.path.basename(os.path.abspath(out_dir))
    limits = Limits(max_batch, max_queue, max_prompt_tokens, max_tokens, max_n, events_per_s)

    engine_failed = threading.Event()

    def give_up():  # no engine: nothing to serve (stderr says why)
        engine_failed.set()
        server.should_exit = True
    app = make_app(load, name, limits, api_key, True, give_up)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port))
    app.state.engine.launch()  # the model loads before the port opens: a checkpoint's error is one line
    if app.state.engine.wait_until_loaded():
        server.run()
    sys.exit(1 if engine_failed.is_set() or not server.started else 0)
