"""
Decode speed of engine.py on a GPU (bf16, random weights): one decode step of every sequence at a
given cache length (sampling included), replayed from the engine's CUDA graph, next to the same step run eagerly and to
the summed GPU time of the step's kernels (profiler). The graph's step time over the kernel time
says how much host overhead is left (1.0 = none).
$ python bench_decode.py [--layers 4] [--out PATH]
"""
import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from engine import Engine
from model import ModelConfig, Transformer


CHAR = dict(vocab_size=128, block_size=256, n_layer=7, n_embd=384, n_head=6, kv_lora_rank=128,
            qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_dense_layers=1, dense_inter_dim=1024,
            n_routed_experts=16, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=256)
V2_LITE = dict(vocab_size=102400, n_embd=2048, n_head=16, q_lora_rank=0, kv_lora_rank=512,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_dense_layers=1,
               dense_inter_dim=10944, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
               moe_inter_dim=1408)
TOKENIZER = {'kind': 'char', 'chars': ''.join(chr(0x100 + i) for i in range(128))}  # ids only


def events_ms(fn, reps=7, n=20):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / n)
    return statistics.median(times)


def kernel_ms(fn, n=10):
    """Summed GPU time of everything fn launches, per call."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3 / n


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--layers', type=int, default=4, help='layers of the V2-Lite-shaped stack (27 in V2-Lite)')
    parser.add_argument('--out', default=None, help='also write the markdown table to this file')
    args = parser.parse_args()
    assert torch.cuda.is_available(), 'needs a CUDA GPU'
    torch.manual_seed(1337)
    rows = []
    for name, shape, cache_lens in [('char (7 layers)', CHAR, [256]),
                                    (f'V2-Lite-shaped ({args.layers} layers)', {**V2_LITE, 'n_layer': args.layers}, [2048, 8192])]:
        for T in cache_lens:
            model = Transformer(ModelConfig(**{**shape, 'block_size': T})).to('cuda', torch.bfloat16).eval()
            for B in (1, 16, 64):
                engine = Engine(model, TOKENIZER, max_batch=B)
                graph, (ids, params, u), _ = engine.graphs[B]
                ids[:, 0].random_(0, 128)
                ids[:, 1].fill_(T - 1)  # every sequence attends over a full cache
                params[:, 0] = 0.8      # temperature 0.8, top-k 200, top-p 1, not greedy: sampling included
                params[:, 1:] = torch.tensor([200.0, 1.0, 0.0])
                eager = lambda: engine.step_fn(ids, params, u)
                with torch.no_grad():
                    graph_ms, eager_ms, gpu_ms = events_ms(graph.replay), events_ms(eager), kernel_ms(eager)
                row = (name, str(B), str(T), f"{graph_ms:.3f}", f"{eager_ms:.3f}", f"{gpu_ms:.3f}",
                       f"{graph_ms / gpu_ms:.2f}", f"{B / graph_ms * 1e3:,.0f}")
                rows.append(row)
                print(' | '.join(row), flush=True)
                del engine, graph
            del model
            torch.cuda.empty_cache()

    header = ('model', 'batch', 'cache', 'step ms (graph)', 'step ms (eager)', 'GPU kernel ms', 'graph / kernels', 'tokens/s')
    table = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, random weights; medians",
             '', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    table += ['| ' + ' | '.join(row) + ' |' for row in rows]
    print('\n' + '\n'.join(table))
    if args.out:
        with open(args.out, 'w') as f:
            f.write('\n'.join(table) + '\n')


if __name__ == '__main__':
    main()
