"""
Decode speed of engine.py on a GPU (bf16, random weights): one decode step of every sequence at a
given cache length (sampling included), replayed from the engine's CUDA graph, next to the same step run eagerly and to
the summed GPU time of the step's kernels (profiler). The graph's step time over the kernel time
says how much host overhead is left (1.0 = none). --speculative: the char model with an MTP block,
plain against speculative steps (a draft and its verification), each also with torch.compile
fusing the step's small ops before the graph is captured, and at batch 1 torch.compile's own
reduce-overhead graphs in place of the engine's. --hf_dir: a Hugging Face directory
(e.g. `python convert.py random --hf_dir=v2-lite`, DeepSeek-V2-Lite's shape) loaded and decoded whole.
--breakdown: where engine.generate's time goes (prefills, steps, host) at batch 1, on random
weights or a trained checkpoint (--out_dir).
$ python benchmarks/bench_decode.py [--layers 4] [--speculative | --breakdown [--out_dir DIR] | --hf_dir DIR [--block_size 4096]] [--out PATH]
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
from benchmarks.timing import events_ms, kernel_ms, kernels, markdown_table
from checkpoint import CheckpointError, load_model
from engine import Engine, SamplingParams
from model import ModelConfig, Transformer
from prepare import get_tokenizer, write_text


CHAR = dict(vocab_size=128, block_size=256, n_layer=7, n_embd=384, n_head=6, kv_lora_rank=128,
            qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_dense_layers=1, dense_inter_dim=1024,
            n_routed_experts=16, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=256)
V2_LITE = dict(vocab_size=102400, n_embd=2048, n_head=16, q_lora_rank=0, kv_lora_rank=512,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_dense_layers=1,
               dense_inter_dim=10944, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
               moe_inter_dim=1408)
TOKENIZER = {'kind': 'char', 'chars': ''.join(chr(0x100 + i) for i in range(128))}  # ids only


def step_inputs(engine, B, T):
    """The step's inputs (the B-bucket graph's own where it has one) set for a full cache of T: tokens
    at random, each sequence's pending token at T - 1 (speculative: T - 2, its draft at T - 1),
    sampling at temperature 0.8, top-k 200."""
    ids, params, u = engine.graphs[B][1] if engine.graphs else engine.step_inputs(B)
    ids.random_(0, 128)
    ids[:, 1] = T - 1 - engine.speculative
    if engine.speculative:
        ids[:, 3] = T - 4  # where the MTP block restarts
    params[:, 0] = 0.8
    params[:, 1:] = torch.tensor([200.0, 1.0, 0.0])
    return ids, params, u


def measure(name, model, B, T, speculative=False, compile=False, tokenizer=TOKENIZER):
    """compile: False, True (inductor, then the engine's CUDA graph) or 'reduce-overhead' (inductor
    and torch.compile's own CUDA graphs in place of the engine's)."""
    own = compile == 'reduce-overhead'
    engine = Engine(model, tokenizer, max_batch=B, speculative=speculative, compile=compile is True, buckets=[B],
                    cuda_graphs=not own)
    inputs = step_inputs(engine, B, T)
    eager = lambda: engine.step_fn(*inputs)
    if own:
        compiled = torch.compile(engine.step_fn, mode='reduce-overhead', dynamic=False)
        replay = lambda: compiled(*inputs)
    else:
        replay = engine.graphs[B][0].replay
    with torch.no_grad():
        graph_ms, eager_ms, (gpu_ms, n_kernels) = events_ms(replay), events_ms(eager), kernel_ms(kernels(replay if own else eager))
    kind = {False: '', True: ' + compile', 'reduce-overhead': ', compile reduce-overhead'}[compile]
    return dict(model=name, step=('speculative' if speculative else 'plain') + kind,
                batch=B, cache=T, graph_ms=graph_ms, eager_ms=eager_ms, gpu_ms=gpu_ms, kernels=n_kernels)


HEADER = ('model', 'step', 'batch', 'cache', 'step ms (graph)', 'step ms (eager)', 'GPU kernel ms', 'kernels',
          'graph / kernels', 'tokens/s')


def show(row):
    tokens = f"{row['batch'] * 1e3 / row['graph_ms']:,.0f}"  # a speculative step yields 1 + acceptance each
    tokens += ' x (1 + acceptance)' if row['step'].startswith('speculative') else ''
    return [row['model'], row['step'], str(row['batch']), str(row['cache']), f"{row['graph_ms']:.3f}",
            f"{row['eager_ms']:.3f}", f"{row['gpu_ms']:.3f}", str(row['kernels']),
            f"{row['graph_ms'] / row['gpu_ms']:.2f}", tokens]


def breakdown(out_dir=None):
    """Where engine.generate's time goes at batch 1 (500 tokens after a one-token prompt, the second
    of two runs): prefills (the prompt's, and every block_size / 2 tokens the last block_size / 2
    again), decode steps (synchronized) and the host around them; plain against speculative, eager
    against compiled steps. out_dir: a trained checkpoint (its own drafts' acceptance), else random
    weights at blocks 256 and 1024."""
    if out_dir:
        model, ckpt = load_model(out_dir, 'best', device='cuda', dtype=torch.bfloat16)
        models = [(model, ckpt['tokenizer'], get_tokenizer(ckpt['tokenizer'])[0]('\n'))]
    else:
        models = [(Transformer(ModelConfig(**{**CHAR, 'block_size': block}, mtp_depth=1)).to('cuda', torch.bfloat16).eval(),
                   TOKENIZER, [1]) for block in (256, 1024)]
    for model, tokenizer, prompt in models:
        for compile in (False, True):
            for speculative in (False, True):
                engine = Engine(model, tokenizer, max_batch=1, speculative=speculative, compile=compile)
                spent = {'prefill': [0.0, 0], 'run_step': [0.0, 0]}
                for name, totals in spent.items():
                    setattr(engine, name, synchronized(getattr(engine, name), totals))
                for _ in range(2):
                    for totals in spent.values():
                        totals[:] = [0.0, 0]
                    t0 = time.perf_counter()
                    r = engine.generate([prompt], SamplingParams(max_tokens=500, temperature=0.8, top_k=200))[0]
                    dt = time.perf_counter() - t0
                (prefill_s, prefills), (steps_s, steps) = spent['prefill'], spent['run_step']
                print(f"block {model.cfg.block_size}, {'speculative' if speculative else 'plain'}{', compiled' if compile else ''}: "
                      f"{len(r.tokens) / dt:,.0f} tokens/s; {prefills} prefills {prefill_s * 1e3:.1f} ms, "
                      f"{steps} steps of {steps_s / steps * 1e3:.3f} ms, host {(dt - prefill_s - steps_s) / steps * 1e3:.3f} ms "
                      f"a step; drafts accepted {engine.acceptance_rate:.0%}", flush=True)
                del engine


def synchronized(fn, totals):
    """fn, timed to the end of its GPU work: totals += [seconds, calls]."""
    def timed(*args):
        t0 = time.perf_counter()
        out = fn(*args)
        torch.cuda.synchronize()
        totals[0] += time.perf_counter() - t0
        totals[1] += 1
        return out
    return timed


def imported(hf_dir, block_size):
    """Load a Hugging Face directory onto the GPU (time, memory), decode 256 tokens after a 32-token
    prompt at batch 1 and 32 through engine.generate (tokens/s), and return its step-timing cases."""
    t0 = time.time()
    model, ckpt = load_model(hf_dir, device='cuda', block_size=block_size)
    torch.cuda.synchronize()
    print(f"loaded {hf_dir} in {time.time() - t0:.1f} s: {model.num_params() / 1e9:.2f}B parameters, "
          f"{model.num_params(active=True) / 1e9:.2f}B active, {torch.cuda.memory_allocated() / 2**30:.1f} GiB on the GPU")
    name = f"{os.path.basename(hf_dir.rstrip('/'))} ({model.cfg.n_layer} layers, imported)"
    for B in (1, 32):
        engine = Engine(model, ckpt['tokenizer'], max_batch=B)
        prompts = torch.randint(0, 50000, (B, 32)).tolist()
        torch.cuda.synchronize()
        t0 = time.time()
        out = engine.generate(prompts, SamplingParams(max_tokens=256, temperature=0.8, top_k=200))
        dt = time.time() - t0
        print(f"{name}: batch {B}, generate(): {sum(len(r.tokens) for r in out) / dt:,.0f} tokens/s "
              f"(256 new tokens each, prefill included), peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        del engine
    return [(name, model, B, block_size, False, False, ckpt['tokenizer']) for B in (1, 32)]


def timing_cases(args):
    """The (name, model, batch, cache, speculative, compile[, tokenizer]) steps to time."""
    if args.hf_dir:
        return imported(args.hf_dir, args.block_size)
    if args.speculative:
        model = Transformer(ModelConfig(**CHAR, mtp_depth=1)).to('cuda', torch.bfloat16).eval()
        cases = [('char (7 layers + MTP)', model, B, 256, spec, comp)
                 for B in (1, 16, 64) for comp in (False, True) for spec in (False, True)]
        cases[2:2] = [('char (7 layers + MTP)', model, 1, 256, spec, 'reduce-overhead') for spec in (False, True)]
        return cases
    cases = []
    for name, shape, cache_lens in [('char (7 layers)', CHAR, [256]),
                                    (f'V2-Lite-shaped ({args.layers} layers)', {**V2_LITE, 'n_layer': args.layers}, [2048, 8192])]:
        for T in cache_lens:
            model = Transformer(ModelConfig(**{**shape, 'block_size': T})).to('cuda', torch.bfloat16).eval()
            cases += [(name, model, B, T, False, False) for B in (1, 16, 64)]
    return cases


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--layers', type=int, default=4, help='layers of the V2-Lite-shaped stack (27 in V2-Lite)')
    parser.add_argument('--speculative', action='store_true',
                        help='the char model with an MTP block: plain vs speculative steps, each also compiled')
    parser.add_argument('--breakdown', action='store_true',
                        help="engine.generate at batch 1: prefills, steps and host time, plain/speculative, eager/compiled")
    parser.add_argument('--out_dir', default=None, help="with --breakdown: a trained checkpoint's directory (best.pt)")
    parser.add_argument('--hf_dir', default=None, help='a Hugging Face directory (convert.py random): load it, decode at batch 1 and 32')
    parser.add_argument('--block_size', type=int, default=4096, help="with --hf_dir: the context (and cache) length")
    parser.add_argument('--out', default=None, help='also write the markdown table to this file')
    args = parser.parse_args()
    assert torch.cuda.is_available(), 'needs a CUDA GPU'
    torch.manual_seed(1337)
    try:
        if args.breakdown:
            return breakdown(args.out_dir)
        cases = timing_cases(args)
    except CheckpointError as e:
        raise SystemExit(f"bench_decode.py: error: {e}")
    rows = []
    for case in cases:
        rows.append(show(measure(*case)))
        print(' | '.join(rows[-1]), flush=True)
        torch.cuda.empty_cache()

    lines = markdown_table(HEADER, rows)
    table = '\n'.join([f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, random weights; medians", '', *lines])
    print('\n' + table)
    if args.out:
        write_text(args.out, table + '\n')


if __name__ == '__main__':
    main()
