"""
Samples from a model trained by train.py, decoding through the latent KV cache.
$ python sample.py --start="Once upon a time"
$ python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --num_samples=3
Everything it needs (weights, architecture, tokenizer) comes from the checkpoint.
"""
import os
import time

import torch

from checkpoint import CheckpointError, load_model
from flags import (DTYPES, boolean, check_flags, default_device, default_dtype, device_exists, dtype_supported,
                   end_in_one_line, file_prefixed, fraction, non_empty, non_negative, one_of, positive)
from engine import Engine, SamplingParams
from prepare import get_tokenizer

# -----------------------------------------------------------------------------
out_dir = 'out'
ckpt = 'latest'          # 'latest' (ckpt.pt) or 'best' (best.pt)
start = "\n"             # the prompt, or FILE:path to read it from a file
num_samples = 2
max_new_tokens = 500
temperature = 0.8        # 0 = greedy
top_k = 200              # 0 = off
top_p = 1.0              # 1.0 = off
cache_mode = 'latent'    # 'latent' (absorbed MLA) or 'naive' (per-head K/V); MHA models use 'naive'
seed = 1337
device = default_device()
dtype = default_dtype()
cuda_graphs = True     # capture the decode step on CUDA
speculative = True     # draft with the MTP module where the checkpoint has one
compile = False        # torch.compile the decode step before its graph is captured: faster steps, slower start
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------
check_flags('sample.py', globals(), {
    'out_dir': non_empty, 'ckpt': one_of('latest', 'best'), 'start': file_prefixed('FILE:'),
    'num_samples': positive, 'max_new_tokens': positive,
    'temperature': non_negative, 'top_k': non_negative, 'top_p': fraction,
    'cache_mode': one_of('latent', 'naive'), 'seed': non_negative,
    'device': device_exists(), 'dtype': dtype_supported(), 'cuda_graphs': boolean, 'speculative': boolean,
    'compile': boolean,
})
end_in_one_line('sample.py', 'lower --num_samples or --max_new_tokens')
# -----------------------------------------------------------------------------


def fail(msg):
    raise SystemExit(f"sample.py: error: {msg}")


if start.startswith('FILE:'):
    try:
        with open(start[5:], encoding='utf-8') as f:
            start = f.read()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--start={start}: cannot read it ({e})")
try:
    model, checkpoint = load_model(out_dir, ckpt)
    encode, decode = get_tokenizer(checkpoint['tokenizer'])
except (CheckpointError, ValueError) as e:
    fail(e)

torch.manual_seed(seed)
ptdtype = DTYPES[dtype]
# the whole model in the inference dtype: the cache and the decode kernel then share it
model.to(device=device, dtype=ptdtype)

if not start:
    fail("the prompt is empty: give --start some text")
try:
    start_ids = encode(start)
except ValueError as e:
    fail(e)

# the samples decode as one batch; CUDA graphs are captured once, before the clock starts
engine = Engine(model, checkpoint['tokenizer'], max_batch=num_samples, cache_mode=cache_mode,
                cuda_graphs=cuda_graphs and 'cuda' in device, speculative=speculative and model.mtp is not None,
                compile=compile)
params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
t0 = time.time()
samples = engine.generate([start_ids] * num_samples, params)
dt = time.time() - t0
for r in samples:
    print(start + r.text)
    print('---------------')
n_tokens = sum(len(r.tokens) for r in samples)
print(f"{n_tokens} tokens in {dt:.2f}s: {n_tokens / dt:,.0f} tokens/s "
      f"({device}, {dtype}, {cache_mode} cache{', CUDA graphs' if engine.graphs else ''}{', compiled' if compile else ''}"
      f"{f', MTP drafts accepted {engine.acceptance_rate:.0%}' if engine.speculative else ''})")
