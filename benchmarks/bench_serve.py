"""
Load test for serve.py: C concurrent clients stream completions from a running server; reports
p50/p99 time to first token, p50/p99 time per output token and aggregate generated tokens/s.
$ python serve.py --out_dir=out-shakespeare-char &
$ python bench_serve.py --clients=1,16,64 --max_tokens=128
Greedy requests, each client starting with a different prompt, all started at once.
"""
import asyncio
import json
import statistics
import time
from dataclasses import dataclass, field

import httpx

# -----------------------------------------------------------------------------
url = 'http://127.0.0.1:8000'
clients = '1,16,64'        # client counts to run, one after the other
max_tokens = 128           # generated per request
prompt = 'ROMEO:\n'        # client i sends prompt + i spaces (different prompts, same length scale)
api_key = ''
# -----------------------------------------------------------------------------


@dataclass
class Stream:
    text: str = ''
    n_tokens: int = 0
    ttft: float = 0.0                                  # seconds to the first chunk
    gaps: list = field(default_factory=list)           # seconds between later chunks


async def stream_completion(client, prompt, max_tokens, headers=None):
    """One greedy streamed completion -> its text and timings (a chunk carries one token)."""
    s, t0 = Stream(), time.perf_counter()
    body = {'prompt': prompt, 'max_tokens': max_tokens, 'temperature': 0, 'stream': True}
    async with client.stream('POST', '/v1/completions', json=body, headers=headers) as r:
        r.raise_for_status()
        last = t0
        async for line in r.aiter_lines():
            if not line.startswith('data: ') or line == 'data: [DONE]':
                continue
            s.text += json.loads(line[6:])['choices'][0]['text']
            now = time.perf_counter()
            if s.n_tokens == 0:
                s.ttft = now - t0
            else:
                s.gaps.append(now - last)
            s.n_tokens, last = s.n_tokens + 1, now
    return s


def percentile(values, q):
    return statistics.quantiles(values, n=100, method='inclusive')[q - 1] if len(values) > 1 else values[0]


async def run(n_clients):
    headers = {'Authorization': f'Bearer {api_key}'} if api_key else None
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=n_clients)) as client:
        await stream_completion(client, prompt, 2, headers)  # warm-up: the first forward passes are slow
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(stream_completion(client, prompt + ' ' * i, max_tokens, headers)
                                         for i in range(n_clients)))
        wall = time.perf_counter() - t0
    ttft = [s.ttft for s in streams]
    gaps = [g for s in streams for g in s.gaps]
    print(f"{n_clients:4d} clients | TTFT p50 {percentile(ttft, 50) * 1e3:8.1f} ms  p99 {percentile(ttft, 99) * 1e3:8.1f} ms"
          f" | per token p50 {percentile(gaps, 50) * 1e3:7.1f} ms  p99 {percentile(gaps, 99) * 1e3:7.1f} ms"
          f" | {sum(s.n_tokens for s in streams) / wall:8.1f} tokens/s")


if __name__ == '__main__':
    import os
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    for n in map(int, clients.split(',')):
        asyncio.run(run(n))
