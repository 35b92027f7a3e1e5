"""
Load test for serve.py, in one command: starts python serve.py on a checkpoint (a subprocess, stopped
at the end), streams greedy completions from C clients at once for each C in --clients, then runs the
same prompts through engine.generate() in this process (batch C, after a warm-up) and prints a
markdown table: time to first token (TTFT), time between events, generated tokens/s through the
server and in the engine alone, and their ratio.
$ python benchmarks/bench_serve.py --out_dir=out-shakespeare-char --ckpt=best --clients=1,16,64 --max_tokens=128
Client i sends prompt + i spaces. Tokens are counted from each stream's usage chunk
(stream_options.include_usage); an event carries all the text generated since the one before, so
the time between events is not the time per token.
"""
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from engine import SamplingParams  # noqa: E402
from flags import default_device, default_dtype  # noqa: E402
from serve import load_engine  # noqa: E402

# -----------------------------------------------------------------------------
out_dir = 'out-shakespeare-char'
ckpt = 'latest'
clients = '1,16,64'        # client counts to run, one after the other
max_tokens = 128           # generated per request
prompt = 'ROMEO:\n'
device = default_device()
dtype = default_dtype()
cuda_graphs = True         # as serve.py
speculative = True
serve_flags = ''           # more flags for serve.py, e.g. '--events_per_s=2000 --prefill_chunk=512'
out = ''                   # also write the table to this file
# -----------------------------------------------------------------------------


@dataclass
class Stream:
    text: str = ''
    n_tokens: int = 0                                  # from the usage chunk
    ttft: float = 0.0                                  # seconds to the first text
    gaps: list = field(default_factory=list)           # seconds between later events with text


async def stream_completion(url, prompt, max_tokens):
    """One greedy streamed completion -> its text, generated tokens and timings. The client is HTTP/1.1
    on asyncio's streams: httpx spends more CPU on a request and an event than the server does, so
    with many clients the benchmark would measure itself."""
    s, t0, last = Stream(), time.perf_counter(), None
    host, port = urlsplit(url).hostname, urlsplit(url).port
    body = json.dumps({'prompt': prompt, 'max_tokens': max_tokens, 'temperature': 0, 'stream': True,
                       'stream_options': {'include_usage': True}}).encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b'POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n'
                     b'Content-Length: %d\r\n\r\n%s' % (host.encode(), len(body), body))
        head = await reader.readuntil(b'\r\n\r\n')
        if not head.startswith(b'HTTP/1.1 200'):
            raise RuntimeError(f"{head.decode().splitlines()[0]}: {(await reader.read(2000)).decode()}")
        data = b''
        while size := int(await reader.readuntil(b'\r\n'), 16):  # the body comes in chunks
            data += (await reader.readexactly(size + 2))[:-2]
            *events, data = data.split(b'\n\n')
            for event in events:
                if event == b'data: [DONE]':
                    continue
                chunk = json.loads(event[6:])
                if chunk['usage']:
                    s.n_tokens = chunk['usage']['completion_tokens']
                if not chunk['choices'] or not chunk['choices'][0]['text']:
                    continue
                now = time.perf_counter()
                if last is None:
                    s.ttft = now - t0
                else:
                    s.gaps.append(now - last)
                s.text, last = s.text + chunk['choices'][0]['text'], now
    finally:
        writer.close()
    return s


def percentile(values, q):
    return statistics.quantiles(values, n=100, method='inclusive')[q - 1] if len(values) > 1 else values[0]


def prompts_for(n):
    return [prompt + ' ' * i for i in range(n)]


async def through_server(url, n):
    """n clients at once -> (their Streams, seconds from the first request to the last token)."""
    await stream_completion(url, prompt, 2)  # warm-up: the first forward passes
    t0 = time.perf_counter()
    streams = await asyncio.gather(*(stream_completion(url, p, max_tokens) for p in prompts_for(n)))
    return streams, time.perf_counter() - t0


def in_engine(engine, n):
    """engine.generate() on the same prompts at batch n -> (generated tokens, seconds)."""
    ids = [engine.encode(p) for p in prompts_for(n)]
    engine.generate(ids, SamplingParams(max_tokens=2, temperature=0))  # warm-up
    t0 = time.perf_counter()
    done = engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0))
    return sum(len(r.tokens) for r in done), time.perf_counter() - t0


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_server(port, max_batch, log):
    """python serve.py on this checkpoint -> the process, once /health answers."""
    server = subprocess.Popen([sys.executable, os.path.join(REPO, 'serve.py'), f'--out_dir={out_dir}', f'--ckpt={ckpt}',
                               f'--port={port}', f'--max_batch={max_batch}', f'--device={device}', f'--dtype={dtype}',
                               f'--cuda_graphs={cuda_graphs}', f'--speculative={speculative}', *serve_flags.split()],
                              stdout=log, stderr=subprocess.STDOUT)
    while server.poll() is None:
        try:
            if httpx.get(f'http://127.0.0.1:{port}/health').status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    log.seek(0)
    raise SystemExit(f"bench_serve.py: error: the server exited ({server.returncode}):\n{log.read().decode()[-3000:]}")


def stop(server):
    server.terminate()
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()


def row(n, streams, wall, engine_tokens, engine_seconds):
    ttft = [s.ttft for s in streams]
    gaps = [g for s in streams for g in s.gaps] or [0.0]
    tokens = sum(s.n_tokens for s in streams)
    served, alone = tokens / wall, engine_tokens / engine_seconds
    return (f"| {n} | {tokens:,} / {engine_tokens:,} | {percentile(ttft, 50) * 1e3:.1f} / {percentile(ttft, 99) * 1e3:.1f} ms"
            f" | {percentile(gaps, 50) * 1e3:.1f} / {percentile(gaps, 99) * 1e3:.1f} ms | {served:,.0f} | {alone:,.0f}"
            f" | {served / alone:.0%} |")


def device_name():
    return torch.cuda.get_device_name() if 'cuda' in device else device


def main():
    counts = [int(c) for c in clients.split(',')]
    port = free_port()
    with tempfile.TemporaryFile() as log:
        server = start_server(port, max(counts), log)
        try:
            served = {n: asyncio.run(through_server(f'http://127.0.0.1:{port}', n)) for n in counts}
        finally:
            stop(server)
    engine = load_engine(out_dir, ckpt, device, dtype, max(counts), cuda_graphs, speculative)
    alone = {n: in_engine(engine, n) for n in counts}
    table = '\n'.join([
        f"{device_name()}, {dtype} · {out_dir} ({ckpt}) · {max_tokens} greedy tokens a client",
        '',
        '| clients | generated tokens (server / engine) | TTFT p50 / p99 | time between events p50 / p99 '
        '| server tokens/s | engine.generate tokens/s | server / engine |',
        '|---|---|---|---|---|---|---|',
        *(row(n, *served[n], *alone[n]) for n in counts)])
    print(table)
    if out:
        with open(out, 'w') as f:
            f.write(table + '\n')


if __name__ == '__main__':
    exec(open(os.path.join(REPO, 'configurator.py')).read())
    main()
