"""
serve.py against real clients: a uvicorn server on a free 127.0.0.1 port, in a thread of the test
process, serving a tiny random-init char model on CPU, with its engine in a thread or (as python
serve.py runs it) in a process of its own; the openai package, httpx for the errors,
lm-evaluation-harness's local-completions, many concurrent streams, the chat page in headless
Chromium, and bench_serve.py end to end.
"""
import asyncio
import json
import multiprocessing
import os
import re
import select
import shutil
import socket
import string
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from checkpoint import load_model, save_checkpoint  # noqa: E402
from engine import Engine, SamplingParams  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from serve import EngineClient, Limits, Metrics, load_engine, make_app  # noqa: E402

CHARS = ''.join(sorted(set(string.printable) - set('\t\r\x0b\x0c')))  # no 'é': off-vocabulary
TINY = dict(vocab_size=len(CHARS), block_size=64, n_layer=2, n_embd=32, n_head=2, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, dense_inter_dim=64, moe_inter_dim=16,
            n_routed_experts=4, n_activated_experts=2)
LIMITS = Limits(max_batch=8, max_queue=64, max_prompt_tokens=48, max_tokens=40, max_n=4)
PREFILL_CHUNK = 16  # the process-mode server's: longer prompts are prefilled in chunks


def save_tiny(path, chars):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, 'vocab_size': len(chars)})
    save_checkpoint({'model': Transformer(cfg).state_dict(), 'model_args': asdict(cfg),
                     'tokenizer': {'kind': 'char', 'chars': chars}}, path)
    return path


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp('ckpt') / 'ckpt.pt', CHARS)


def new_engine(ckpt, max_batch):
    model, checkpoint = load_model(str(ckpt))
    return Engine(model, checkpoint['tokenizer'], max_batch=max_batch)


class Server:
    """uvicorn in a thread, on a socket bound to a free port first (no race for the port)."""

    def __init__(self, app):
        import uvicorn
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.url = f'http://127.0.0.1:{self.sock.getsockname()[1]}'
        self.server = uvicorn.Server(uvicorn.Config(app, log_level='warning'))
        self.thread = threading.Thread(target=self.server.run, kwargs={'sockets': [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(f'{self.url}/health').status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError('the server did not come up')

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope='module')
def server(ckpt):
    with Server(make_app(lambda: new_engine(ckpt, LIMITS.max_batch), 'tiny', LIMITS)) as s:
        yield s


@pytest.fixture(scope='module')
def process_server(ckpt):
    """The engine in a spawned process of its own, loaded as python serve.py loads it."""
    load = partial(load_engine, str(ckpt), max_batch=LIMITS.max_batch, cuda_graphs=False, speculative=False,
                   prefill_chunk=PREFILL_CHUNK)
    with Server(make_app(load, 'tiny', LIMITS, engine_process=True)) as s:
        yield s


@pytest.fixture(scope='module')
def reference(ckpt):
    """The same weights in an engine of their own, in-process."""
    return new_engine(ckpt, 1)


def metric(url, name):
    text = httpx.get(f'{url}/metrics').text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + ' ')))


def openai_client(url, key='none'):
    import openai
    return openai.OpenAI(base_url=f'{url}/v1', api_key=key, max_retries=0)


# -----------------------------------------------------------------------------


def test_openai_completions_chat_and_stream(server, reference):
    client = openai_client(server.url)
    assert [m.id for m in client.models.list()] == ['tiny']
    alone = reference.generate([reference.encode('ROMEO:')], _greedy(12))[0]
    out = client.completions.create(model='tiny', prompt='ROMEO:', max_tokens=12, temperature=0)
    assert out.choices[0].text == alone.text and out.choices[0].finish_reason == 'length'
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (6, 12)
    streamed = client.completions.create(model='tiny', prompt='ROMEO:', max_tokens=12, temperature=0, stream=True)
    assert ''.join(c.choices[0].text for c in streamed) == alone.text
    texts = ['', '']  # two greedy choices streamed side by side, each with the echoed prompt first
    for c in client.completions.create(model='tiny', prompt='ROMEO:', max_tokens=12, temperature=0, n=2,
                                       echo=True, stream=True):
        texts[c.choices[0].index] += c.choices[0].text
    assert texts == ['ROMEO:' + alone.text] * 2
    # several prompts, n choices each, seeded: choice i of a prompt draws with seed + i
    many = client.completions.create(model='tiny', prompt=['ab', 'cd'], max_tokens=5, n=2, seed=7)
    assert [c.index for c in many.choices] == [0, 1, 2, 3] and many.usage.completion_tokens == 20
    again = client.completions.create(model='tiny', prompt=['ab', 'cd'], max_tokens=5, n=2, seed=7)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    stop = alone.text[3:5]
    cut = client.completions.create(model='tiny', prompt='ROMEO:', max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == alone.text[:alone.text.index(stop)] and cut.choices[0].finish_reason == 'stop'

    messages = [{'role': 'user', 'content': 'hi'}]
    chat = client.chat.completions.create(model='tiny', messages=messages, max_tokens=8, temperature=0)
    from prepare import chat_template
    assert chat.choices[0].message.role == 'assistant'
    assert chat.choices[0].message.content == reference.generate([reference.encode(chat_template(messages))],
                                                                 _greedy(8, stop=('<|end|>',)))[0].text
    chunks = list(client.chat.completions.create(model='tiny', messages=messages, max_tokens=8, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == 'assistant'
    assert ''.join(c.choices[0].delta.content or '' for c in chunks) == chat.choices[0].message.content

    emb = client.embeddings.create(model='tiny', input=['hello', 'world'])  # the client asks for base64
    assert torch.allclose(torch.tensor([d.embedding for d in emb.data]),
                          reference.embed([reference.encode('hello'), reference.encode('world')]), atol=1e-5)
    assert httpx.post(f'{server.url}/generate', json={'prompt': 'ROMEO:', 'max_tokens': 12, 'temperature': 0}
                      ).json() == {'text': alone.text}


def _greedy(n, stop=()):
    from engine import SamplingParams
    return SamplingParams(max_tokens=n, temperature=0, stop=stop)


def test_echo_logprobs_are_the_engines_scores(server, reference):
    ids = reference.encode('To be, or not')
    body = {'prompt': 'To be, or not', 'max_tokens': 1, 'temperature': 0, 'echo': True, 'logprobs': 1}
    choice = httpx.post(f'{server.url}/v1/completions', json=body).json()['choices'][0]
    lp = choice['logprobs']
    assert lp['token_logprobs'][0] is None and len(lp['token_logprobs']) == len(ids) + 1
    assert lp['token_logprobs'][1:-1] == pytest.approx(reference.score([ids])[0], abs=1e-5)
    assert ''.join(lp['tokens']) == choice['text'] and choice['text'].startswith('To be, or not')
    assert lp['text_offset'][:3] == [0, 1, 2]
    body['max_tokens'] = 0  # scoring only: no token generated
    choice = httpx.post(f'{server.url}/v1/completions', json=body).json()['choices'][0]
    assert choice['text'] == 'To be, or not' and choice['logprobs']['token_logprobs'][1:] == lp['token_logprobs'][1:-1]


# every error case: an OpenAI-style body, a 4xx, and the server goes on
ERRORS = [
    ('/v1/completions', b'{"prompt": "ab",', 'json_invalid'),
    ('/v1/completions', {'prompt': 'ab', 'frobnicate': 1}, 'extra_forbidden'),
    ('/v1/completions', {'prompt': 'ab', 'max_tokens': 'many'}, 'int_type'),
    ('/v1/completions', {'prompt': 'ab', 'temperature': '0.5'}, 'float_type'),
    ('/v1/completions', {'prompt': ''}, None),
    ('/v1/completions', {'prompt': []}, None),
    ('/v1/completions', {'prompt': 'caf\u00e9'}, None),
    ('/v1/completions', {'prompt': [1, 10 ** 6]}, None),
    ('/v1/completions', {'prompt': 'x' * 49}, 'context_length_exceeded'),
    ('/v1/completions', {'prompt': 'ab', 'max_tokens': 41}, None),
    ('/v1/completions', {'prompt': 'ab', 'n': 5}, None),
    ('/v1/completions', {'prompt': 'ab', 'top_p': 0}, 'greater_than'),
    ('/v1/completions', {'prompt': 'ab', 'model': 'gpt-4'}, 'model_not_found'),
    ('/v1/completions', {'prompt': 'ab', 'stream': True, 'logprobs': 1}, None),
    ('/v1/completions', {'prompt': 'ab', 'stream_options': {'include_usage': True}}, None),
    ('/v1/completions', {'prompt': 'ab', 'stream': True, 'stream_options': {'include_usage': True, 'x': 1}},
     'extra_forbidden'),
    ('/v1/chat/completions', {'messages': []}, 'too_short'),
    ('/v1/chat/completions', {'messages': [{'role': 'robot', 'content': 'hi'}]}, 'literal_error'),
    ('/v1/embeddings', {'input': ''}, None),
    ('/generate', {}, 'missing'),
    ('/nowhere', {}, '404'),
]


@pytest.mark.parametrize('path,body,code', ERRORS, ids=[f'{p}-{i}' for i, (p, _, _) in enumerate(ERRORS)])
def test_bad_requests_get_openai_errors(server, path, body, code):
    r = (httpx.post(f'{server.url}{path}', content=body, headers={'content-type': 'application/json'})
         if isinstance(body, bytes) else httpx.post(f'{server.url}{path}', json=body))
    assert 400 <= r.status_code < 500, r.text
    error = r.json()['error']
    assert set(error) == {'message', 'type', 'param', 'code'} and error['message']
    if code is not None:
        assert error['code'] == code
    assert httpx.get(f'{server.url}/health').status_code == 200


def test_disconnect_mid_stream_frees_the_slot(server):
    before = metric(server.url, 'serve_generated_tokens_total')
    with httpx.stream('POST', f'{server.url}/v1/completions',
                      json={'prompt': 'ab', 'max_tokens': 40, 'stream': True, 'temperature': 0}) as r:
        next(r.iter_lines())  # the first token has come; then the client goes away
    deadline = time.time() + 10
    while httpx.get(f'{server.url}/health').json()['running'] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(f'{server.url}/health').json()['running'] == 0
    assert metric(server.url, 'serve_cache_slots_used') == 0
    assert metric(server.url, 'serve_generated_tokens_total') - before < 40  # it stopped early
    assert httpx.post(f'{server.url}/generate', json={'prompt': 'ab', 'max_tokens': 3}).status_code == 200


def test_64_concurrent_streams_equal_each_prompt_decoded_alone(server, reference):
    from benchmarks.bench_serve import stream_completion
    prompts = [CHARS[i:i + 4 + i % 29] for i in range(64)]  # 64 streams, 8 slots: requests join as others leave
    alone = [r.text for r in reference.generate([reference.encode(p) for p in prompts], _greedy(20))]

    async def all_at_once():
        return await asyncio.gather(*(stream_completion(server.url, p, 20) for p in prompts))
    results = asyncio.run(all_at_once())
    assert [r.text for r in results] == alone
    assert all(r.n_tokens == 20 for r in results)
    assert metric(server.url, 'serve_time_to_first_token_seconds_count') >= 64


def test_lm_eval_local_completions_matches_in_process_scores(server, reference, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager
    # the spaces open the choices: lm-eval would move a context's trailing spaces into them
    docs = [{'q': q, 'choices': c, 'gold': g} for q, c, g in [
        ('ROMEO:', [' yes', ' no', ' maybe'], 0), ('JULIET:', [' good night', ' farewell'], 1),
        ('To be', [' or not', ' and so', ' is to'], 2), ('What', [' light', ' dark'], 0),
        ('KING:', [' arise', ' kneel', ' go'], 1), ('Alas,', [' poor', ' rich'], 1)]]
    (tmp_path / 'docs.jsonl').write_text(''.join(json.dumps(d) + '\n' for d in docs))
    (tmp_path / 'tiny_mc.yaml').write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / 'docs.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
""")
    out = lm_eval.simple_evaluate(
        model='local-completions', tasks=['tiny_mc'], task_manager=TaskManager(include_path=str(tmp_path)),
        model_args=f'model=tiny,base_url={server.url}/v1/completions,tokenizer_backend=remote,'
                   f'num_concurrent=1,max_retries=1,tokenized_requests=True,max_length=48')
    acc = out['results']['tiny_mc']['acc,none']
    served = [[r[0] for r in sample['filtered_resps']] for sample in out['samples']['tiny_mc']]

    def loglikelihood(context, continuation):
        ids, n = reference.encode(context + continuation), len(continuation)  # a char model: n tokens
        return sum(reference.score([ids])[0][-n:])
    in_process = [[loglikelihood(d['q'], c) for c in d['choices']] for d in docs]
    assert served == [pytest.approx(row, abs=1e-4) for row in in_process]
    picks = [row.index(max(row)) for row in in_process]
    assert acc == pytest.approx(sum(p == d['gold'] for p, d in zip(picks, docs)) / len(docs))


def test_auth_queue_limit_and_health_before_load(ckpt):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return new_engine(ckpt, 1)
    app = make_app(slow_load, 'tiny', Limits(max_batch=1, max_queue=1, max_prompt_tokens=48, max_tokens=40, max_n=2),
                   api_key='sesame')
    server = Server(app)
    server.thread.start()  # not `with`: /health is 503 while the engine loads
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                r = httpx.get(f'{server.url}/health')
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert r.status_code == 503 and r.json()['error']['code'] == 'model_not_ready'
        loaded.set()
        while httpx.get(f'{server.url}/health').status_code != 200:
            time.sleep(0.05)
        assert httpx.post(f'{server.url}/v1/completions', json={'prompt': 'ab'}).status_code == 401
        import openai
        with pytest.raises(openai.AuthenticationError):
            openai_client(server.url, 'wrong').completions.create(model='tiny', prompt='ab')
        # one running, one queued: the third is turned away with a 429
        auth = {'Authorization': 'Bearer sesame'}
        assert openai_client(server.url, 'sesame').completions.create(model='tiny', prompt='ab', max_tokens=2).choices
        with httpx.stream('POST', f'{server.url}/v1/completions', headers=auth,
                          json={'prompt': 'ab', 'max_tokens': 40, 'stream': True, 'n': 2}) as r:
            assert r.status_code == 200
            busy = httpx.post(f'{server.url}/v1/completions', headers=auth, json={'prompt': 'ab'})
            assert busy.status_code == 429 and busy.json()['error']['type'] == 'rate_limit_error'
    finally:
        loaded.set()
        server.__exit__()


CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')


@pytest.mark.skipif(CHROMIUM is None, reason='no chromium: apt-get install -y chromium')
def test_docs_page_renders_in_headless_chromium(server, tmp_path):
    flags = [CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
             '--disable-component-update', '--disable-sync', '--no-first-run', '--virtual-time-budget=10000',
             f'--user-data-dir={tmp_path / "profile"}']
    dom = subprocess.run([*flags, '--dump-dom', f'{server.url}/docs'], capture_output=True, text=True, timeout=60).stdout
    # Swagger UI's script ran and drew the spec: one block per operation
    assert 'opblock' in dom and '/v1/chat/completions' in dom and '/v1/embeddings' in dom
    shot = tmp_path / 'docs.png'
    subprocess.run([*flags, '--window-size=1280,1600', f'--screenshot={shot}', f'{server.url}/docs'],
                   capture_output=True, timeout=60)
    assert shot.stat().st_size > 10_000
    print(f'screenshot of /docs: {shot}')


# -----------------------------------------------------------------------------
# the engine in a process of its own, streams, usage


def greedy_prompts(n):
    return [CHARS[i:i + 3 + 3 * i] for i in range(16)][-n:]  # 3 to 48 tokens: chunked past PREFILL_CHUNK


@pytest.mark.parametrize('n_clients', [1, 16])
@pytest.mark.parametrize('transport', ['server', 'process_server'])
def test_greedy_text_streamed_and_not_equals_engine_generate(transport, n_clients, reference, request):
    from benchmarks.bench_serve import stream_completion
    url = request.getfixturevalue(transport).url
    prompts = greedy_prompts(n_clients)
    alone = [r.text for r in reference.generate([reference.encode(p) for p in prompts], _greedy(20))]

    async def all_at_once():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            plain = [client.post('/v1/completions', json={'prompt': p, 'max_tokens': 20, 'temperature': 0}) for p in prompts]
            return await asyncio.gather(*(stream_completion(url, p, 20) for p in prompts)), await asyncio.gather(*plain)
    streams, answers = asyncio.run(all_at_once())
    assert [s.text for s in streams] == alone and all(s.n_tokens == 20 for s in streams)
    assert [a.json()['choices'][0]['text'] for a in answers] == alone


def test_include_usage_sends_a_last_chunk_with_the_usage(process_server, reference):
    client = openai_client(process_server.url)
    alone = reference.generate([reference.encode('ROMEO:')], _greedy(12))[0]
    chunks = list(client.completions.create(model='tiny', prompt='ROMEO:', max_tokens=12, temperature=0, n=2,
                                            stream=True, stream_options={'include_usage': True}))
    *text_chunks, last = chunks
    assert last.choices == []
    assert last.usage.model_dump(exclude_none=True) == {'prompt_tokens': 6, 'completion_tokens': 24, 'total_tokens': 30}
    assert all(c.usage is None for c in text_chunks)
    assert ''.join(c.choices[0].text for c in text_chunks if c.choices[0].index == 1) == alone.text
    messages = [{'role': 'user', 'content': 'hi'}]
    chat = client.chat.completions.create(model='tiny', messages=messages, max_tokens=8, temperature=0)
    *deltas, last = client.chat.completions.create(model='tiny', messages=messages, max_tokens=8, temperature=0,
                                                   stream=True, stream_options={'include_usage': True})
    assert ''.join(c.choices[0].delta.content or '' for c in deltas) == chat.choices[0].message.content
    assert last.choices == [] and last.usage == chat.usage


def test_a_stream_event_carries_everything_since_the_last_one():
    """Steps that come while the stream is busy go out together; a possible stop string waits."""
    client, sent = EngineClient(None, Metrics()), []
    client.send = sent.append  # the commands, instead of to an engine
    client.on_ready({'tokenizer': {'kind': 'char', 'chars': CHARS}, 'n_vocab': len(CHARS), 'block_size': 64, 'max_batch': 8})
    ids = client.encode('abcxyz')

    async def steps():
        g = client.generate([[1, 2]], [SamplingParams(max_tokens=9, stop=('xyz',))])
        news, seq = g.news(lambda: 0), g.sequences[0].id
        for t in ids[:3]:  # three engine steps before the stream looks
            client.on_step([(seq, [t], [], None, None)], 1, 0)
        first = await anext(news)
        client.on_step([(seq, ids[3:5], [], None, None)], 1, 0)  # 'xy' may begin the stop string: held back
        client.on_step([(seq, ids[5:], [], 'stop', 3)], 0, 0)
        return first, await anext(news), g.sequences[0].text
    assert asyncio.run(steps()) == ([(0, 'abc', None)], [(0, '', 'stop')], 'abc')
    assert [command[0] for command in sent] == ['add']


def test_clients_that_hang_up_free_their_slots_and_take_no_tokens_from_the_rest(process_server, reference):
    from benchmarks.bench_serve import stream_completion
    url = process_server.url
    prompts = [CHARS[i:i + 5] for i in range(12)]  # 12 streams on 8 slots; every other one hangs up
    alone = [r.text for r in reference.generate([reference.encode(p) for p in prompts[1::2]], _greedy(30))]

    async def hang_up(client, p):
        body = {'prompt': p, 'max_tokens': 30, 'temperature': 0, 'stream': True}
        async with client.stream('POST', '/v1/completions', json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith('data: '):
                    return  # the first event came; leaving the block closes the connection

    async def all_at_once():
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(stream_completion(url, p, 30) if i % 2 else hang_up(client, p)
                                          for i, p in enumerate(prompts)))
    kept = asyncio.run(all_at_once())[1::2]
    assert [s.text for s in kept] == alone and all(s.n_tokens == 30 for s in kept)
    deadline = time.time() + 10
    while (httpx.get(f'{url}/health').json()['running'] or metric(url, 'serve_cache_slots_used')) and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(f'{url}/health').json()['running'] == 0 and metric(url, 'serve_cache_slots_used') == 0


def test_an_engine_process_that_dies_ends_its_streams_and_health_says_so(ckpt):
    load = partial(load_engine, str(ckpt), max_batch=2, cuda_graphs=False, speculative=False)
    others = multiprocessing.active_children()  # other servers' engines
    with Server(make_app(load, 'tiny', LIMITS, engine_process=True)) as server:
        engine, = set(multiprocessing.active_children()) - set(others)
        with httpx.stream('POST', f'{server.url}/v1/completions',
                          json={'prompt': 'ab', 'max_tokens': 40, 'stream': True}) as r:
            lines = r.iter_lines()
            next(lines)  # the first event: it is generating
            engine.kill()
            last = [json.loads(line[6:]) for line in lines if line.startswith('data: {')][-1]
        assert last['choices'][0]['finish_reason'] == 'abort'
        health = httpx.get(f'{server.url}/health')
        assert health.status_code == 503 and 'the engine stopped unexpectedly' in health.json()['error']['message']


def test_an_engine_that_does_not_load_says_why(tmp_path):
    server = Server(make_app(partial(load_engine, str(tmp_path / 'nowhere')), 'tiny', LIMITS, engine_process=True))
    server.thread.start()
    try:
        deadline, reason = time.time() + 60, ''
        while 'CheckpointError' not in reason and time.time() < deadline:
            try:
                reason = httpx.get(f'{server.url}/health').json()['error']['message']
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert 'no checkpoint at' in reason
        r = httpx.post(f'{server.url}/v1/completions', json={'prompt': 'ab'})
        assert r.status_code == 503 and r.json()['error']['code'] == 'model_not_ready'
    finally:
        server.__exit__()


def test_python_serve_py_without_an_engine_exits_saying_why(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, str(REPO / 'serve.py'), f'--out_dir={tmp_path / "nowhere"}', f'--port={port}',
                        '--device=cpu'], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith('serve.py: error: no engine (CheckpointError: no checkpoint at')
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


# -----------------------------------------------------------------------------
# chunked prefill


def tiny_model(speculative):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**TINY, 'mtp_depth': int(speculative)})).eval()


@pytest.mark.parametrize('mode,speculative', [('latent', False), ('latent', True), ('naive', True)])
def test_chunked_prefill_generates_what_one_prefill_does(mode, speculative):
    m, tokenizer = tiny_model(speculative), {'kind': 'char', 'chars': CHARS}
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, len(CHARS), (n,), generator=g).tolist() for n in (40, 3, 29, 9, 17, 33)]
    whole = Engine(m, tokenizer, max_batch=3, cache_mode=mode, speculative=speculative).generate(prompts, _greedy(12))
    chunked = Engine(m, tokenizer, max_batch=3, cache_mode=mode, speculative=speculative,
                     prefill_chunk=8).generate(prompts, _greedy(12))
    assert [r.tokens for r in chunked] == [r.tokens for r in whole]


def test_the_running_batch_decodes_between_a_long_prompts_chunks():
    m, tokenizer = tiny_model(True), {'kind': 'char', 'chars': CHARS}
    long = torch.randint(0, len(CHARS), (40,), generator=torch.Generator().manual_seed(1)).tolist()
    e = Engine(m, tokenizer, max_batch=2, speculative=True, prefill_chunk=8)
    short = e.add_request([5, 6, 7], _greedy(30))
    e.step()
    r = e.add_request(long, _greedy(30))
    grown = []
    while not r.tokens:
        e.step()
        grown.append(len(short.tokens))
    assert len(grown) == 9 and all(b > a for a, b in zip(grown[0::2], grown[1::2]))  # 5 chunks, a decode between two
    # it joined the batch holding what one prefill writes, in its caches and the MTP block's
    slot = e.active.index(r)
    chunked = [c[slot, :len(long) - 1].clone() for attn in m.attentions() for c in attn.cache] + [e.mtp_hidden[slot].clone()]
    one = Engine(m, tokenizer, max_batch=1, speculative=True)  # the same model: its caches are set up anew
    one.add_request(long, _greedy(30))
    one.step()
    whole = [c[0, :len(long) - 1] for attn in m.attentions() for c in attn.cache] + [one.mtp_hidden[0]]
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# the chat page, in headless Chromium


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON
    messages ended by a NUL byte, commands in on fd 3, replies and events out on fd 4), one page."""

    def __init__(self, profile):
        commands, self.commands = os.pipe()
        self.replies, replies = os.pipe()
        self.process = subprocess.Popen(
            ['bash', '-c', f'exec "$@" 3<&{commands} 4>&{replies}', 'bash', CHROMIUM, '--headless', '--no-sandbox',
             '--disable-gpu', '--no-first-run', '--disable-background-networking', '--remote-debugging-pipe',
             f'--user-data-dir={profile}'], pass_fds=(commands, replies), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(commands)
        os.close(replies)
        self.buffer, self.last_id = b'', 0
        target = self.send('Target.createTarget', url='about:blank')['targetId']
        self.session = self.send('Target.attachToTarget', targetId=target, flatten=True)['sessionId']

    def send(self, method, session=None, **params):
        self.last_id += 1
        os.write(self.commands, json.dumps({'id': self.last_id, 'method': method, 'params': params,
                                            **({'sessionId': session} if session else {})}).encode() + b'\0')
        while True:
            message = self.read()
            if message.get('id') == self.last_id:
                assert 'error' not in message, message
                return message['result']

    def read(self):
        while b'\0' not in self.buffer:
            assert select.select([self.replies], [], [], 60)[0], 'chromium did not answer'
            data = os.read(self.replies, 1 << 16)
            assert data, 'chromium closed the pipe'
            self.buffer += data
        message, self.buffer = self.buffer.split(b'\0', 1)
        return json.loads(message)

    def on_page(self, method, **params):
        return self.send(method, self.session, **params)

    def evaluate(self, expression):
        return self.on_page('Runtime.evaluate', expression=expression, returnByValue=True)['result'].get('value')

    def wait_for(self, expression, timeout=60):
        deadline = time.time() + timeout
        while not (value := self.evaluate(expression)):
            assert time.time() < deadline, f'waited in vain for {expression}'
            time.sleep(0.05)
        return value

    def type(self, selector, text):
        """Into the field, emptied first, as typed."""
        self.evaluate(f"(e => {{ e.focus(); e.value = ''; }})(document.querySelector({json.dumps(selector)}))")
        self.on_page('Input.insertText', text=text)

    def press_enter(self):
        self.on_page('Input.dispatchKeyEvent', type='keyDown', key='Enter', code='Enter', windowsVirtualKeyCode=13, text='\r')
        self.on_page('Input.dispatchKeyEvent', type='keyUp', key='Enter', code='Enter', windowsVirtualKeyCode=13)

    def close(self):
        self.process.terminate()
        self.process.wait(timeout=30)
        os.close(self.commands)
        os.close(self.replies)


LAST_REPLY = """(m => m && m.dataset.done && {text: m.querySelector('.reply').textContent, events: +m.dataset.events})(
    [...document.querySelectorAll('.assistant')].pop())"""


def ask_the_page(url, profile, prompt, max_tokens, mode=None):
    """Open the chat page, set greedy sampling, type the prompt, press Enter -> the reply as shown,
    once done, with the number of stream events that built it."""
    browser = Browser(profile)
    try:
        browser.on_page('Page.navigate', url=f'{url}/')
        browser.wait_for("document.readyState === 'complete' && document.getElementById('model').textContent === 'tiny'"
                         + (f" && document.getElementById('mode').value === '{mode}'" if mode else ''))
        browser.type('#temperature', '0')
        browser.type('#max_tokens', str(max_tokens))
        browser.type('#prompt', prompt)
        browser.press_enter()
        return browser.wait_for(LAST_REPLY), browser.evaluate("document.getElementById('note').textContent")
    finally:
        browser.close()


@pytest.mark.skipif(CHROMIUM is None, reason='no chromium: apt-get install -y chromium')
def test_chat_page_streams_the_greedy_reply(process_server, tmp_path):
    shown, note = ask_the_page(process_server.url, tmp_path / 'profile', 'To be, or not', 24)
    expected = openai_client(process_server.url).chat.completions.create(
        model='tiny', messages=[{'role': 'user', 'content': 'To be, or not'}], max_tokens=24, temperature=0)
    assert shown['text'] and shown['text'] == expected.choices[0].message.content and note == ''
    assert shown['events'] > 1  # it streamed


@pytest.mark.skipif(CHROMIUM is None, reason='no chromium: apt-get install -y chromium')
def test_chat_page_offers_completion_mode_to_a_model_without_the_chat_template(tmp_path):
    plain = save_tiny(tmp_path / 'ckpt.pt', CHARS.replace('<', '').replace('|', ''))  # '<|user|>' cannot be encoded
    with Server(make_app(lambda: new_engine(plain, 2), 'tiny', LIMITS)) as server:
        shown, note = ask_the_page(server.url, tmp_path / 'profile', 'ROMEO:', 24, mode='completion')
        expected = openai_client(server.url).completions.create(model='tiny', prompt='ROMEO:', max_tokens=24, temperature=0)
    assert shown['text'] and shown['text'] == expected.choices[0].text and shown['events'] > 1
    assert 'Completion mode only' in note and "'<'" in note


# -----------------------------------------------------------------------------


def test_bench_serve_runs_server_and_engine_and_counts_their_tokens(ckpt, tmp_path):
    table = tmp_path / 'table.md'
    subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'bench_serve.py'), f'--out_dir={ckpt.parent}', '--clients=1,4',
                    '--max_tokens=5', '--device=cpu', '--dtype=float32', f'--out={table}'],
                   check=True, capture_output=True, timeout=600)
    rows = [[cell.strip() for cell in line.split('|')[1:-1]] for line in table.read_text().splitlines()
            if re.match(r'\| \d', line)]
    assert [row[:2] for row in rows] == [['1', '5 / 5'], ['4', '20 / 20']]
    assert all(re.fullmatch(r'\d+%', row[-1]) for row in rows)
