"""
serve.py against real clients: a uvicorn server on a free 127.0.0.1 port, in a thread of the test
process, serving a tiny random-init char model on CPU; the openai package, httpx for the errors,
lm-evaluation-harness's local-completions, and many concurrent streams.
"""
import asyncio
import json
import shutil
import socket
import string
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from checkpoint import load_model, save_checkpoint  # noqa: E402
from engine import Engine  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from serve import Limits, make_app  # noqa: E402

CHARS = ''.join(sorted(set(string.printable) - set('\t\r\x0b\x0c')))  # no 'é': off-vocabulary
TINY = dict(vocab_size=len(CHARS), block_size=64, n_layer=2, n_embd=32, n_head=2, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, dense_inter_dim=64, moe_inter_dim=16,
            n_routed_experts=4, n_activated_experts=2)
LIMITS = Limits(max_batch=8, max_queue=64, max_prompt_tokens=48, max_tokens=40, max_n=4)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    path = tmp_path_factory.mktemp('ckpt') / 'ckpt.pt'
    save_checkpoint({'model': Transformer(cfg).state_dict(), 'model_args': asdict(cfg),
                     'tokenizer': {'kind': 'char', 'chars': CHARS}}, path)
    return path


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
    from bench_serve import stream_completion
    prompts = [CHARS[i:i + 4 + i % 29] for i in range(64)]  # 64 streams, 8 slots: requests join as others leave
    alone = [r.text for r in reference.generate([reference.encode(p) for p in prompts], _greedy(20))]

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*(stream_completion(client, p, 20) for p in prompts))
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
