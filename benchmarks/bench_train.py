"""
Training speed on a GPU. For a train.py config file: one training step of its model (bf16,
random tokens; forward, backward, clipping, optimizer step, router-bias update) in each torch.compile
mode, timed with CUDA events, next to the summed time of the step's GPU kernels (profiler): kernels /
step is the share of the step the GPU is busy. Then a short real train.py run of the same config (the
whole loop: data, logging, its default compile mode) for the tokens/s train.py logs once compiled.
--to_loss L also runs the config and reports the wall time from launching train.py to the first eval
it prints at val loss <= L (start-up, compilation and evaluations included); with --nanogpt DIR, the
same for nanoGPT's own `train.py config/train_shakespeare_char.py` in that checkout (its data
prepared there), run before ours in the same call.
$ python prepare.py shakespeare_char   # the train.py runs read data/<dataset> from the working directory
$ python benchmarks/bench_train.py [config/train_shakespeare_char.py] [--optimizer muon] [--loop_iters 300]
                                   [--to_loss 1.4645 [--nanogpt PATH]] [--batch_size N] [--profile N] [--out PATH]
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's modules
from benchmarks.timing import events_ms, kernel_ms, kernels, markdown_table
from model import ModelConfig, Transformer, padded_vocab
from prepare import write_text

parser = argparse.ArgumentParser()
parser.add_argument('config', nargs='?', default='config/train_shakespeare_char.py')
parser.add_argument('--modes', default='none,default,reduce-overhead', help="'none' is eager")
parser.add_argument('--optimizer', default='adamw', choices=('adamw', 'muon'))
parser.add_argument('--loop_iters', type=int, default=300, help='steps of the train.py run; 0 skips it')
parser.add_argument('--to_loss', type=float, default=0.0, help='also time a full run to this val loss')
parser.add_argument('--nanogpt', default=None, help="a nanoGPT checkout to time to --to_loss too")
parser.add_argument('--batch_size', type=int, default=0, help="the step's batch (default: the config's)")
parser.add_argument('--profile', type=int, default=0, help="also print each mode's N costliest kernels")
parser.add_argument('--out', default=None, help='also write the markdown table to this file')
args = parser.parse_args()
assert torch.cuda.is_available(), 'needs a CUDA GPU'
torch.backends.cuda.matmul.allow_tf32 = True

run = {}  # the config file's globals, as train.py's configurator sets them
exec(open(args.config).read(), {}, run)
meta_path = os.path.join('data', run.get('dataset', 'shakespeare'), 'meta.json')
dataset_vocab = json.load(open(meta_path))['vocab_size'] if os.path.exists(meta_path) else 65
cfg = ModelConfig.from_settings(run, vocab_size=run.get('vocab_size') or padded_vocab(dataset_vocab))
B, T = args.batch_size or run.get('batch_size', 32), cfg.block_size
lr = run.get('learning_rate', 1e-3)


def training_step(mode):
    """train.py's step, on one fixed random batch, with torch.compile(mode) (none: eager) -> (step, model)."""
    torch._dynamo.reset()  # each mode compiles afresh
    torch.manual_seed(1337)
    model = Transformer(cfg).cuda().train()
    optimizer = model.configure_optimizers(run.get('weight_decay', 0.1), lr, (0.9, run.get('beta2', 0.95)), 'cuda',
                                           muon_lr=lr if args.optimizer == 'muon' else 0.0)
    forward = model if mode == 'none' else torch.compile(model, mode=mode)
    x, y = torch.randint(0, dataset_vocab, (2, B, T), device='cuda')

    def step():
        with torch.autocast('cuda', torch.bfloat16):
            _, loss, stats = forward(x, y, return_logits=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if stats['load'] is not None:
            model.update_router_biases(stats['load'])
    return step, model


def our_train_py(out_dir, *flags):
    return [sys.executable, os.path.join(REPO, 'train.py'), args.config,
            f'--out_dir={out_dir}', f'--optimizer={args.optimizer}', f'--batch_size={B}', *flags]


def loop_speed():
    """ms/iter and tokens/s of a short train.py run, past its first 100 steps (compilation)."""
    n = args.loop_iters
    with tempfile.TemporaryDirectory() as out_dir:
        p = subprocess.run(our_train_py(out_dir, f'--max_iters={n}', f'--lr_decay_iters={n}', f'--eval_interval={n}',
                                        '--eval_iters=5', '--log_interval=25'), capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"train.py failed:\n{p.stderr[-3000:]}")
        with open(os.path.join(out_dir, 'log.jsonl')) as f:
            logged = [r for r in map(json.loads, f) if r['kind'] == 'train' and r['iter'] >= 100]
    return statistics.median(r['ms'] for r in logged), statistics.median(r['tokens_per_sec'] for r in logged)


def time_to_loss(cmd, cwd=None):
    """Seconds from launching cmd to the first 'step N: train loss X, val loss V' line it prints (ours
    and nanoGPT's alike) with V <= args.to_loss, then stops it -> (seconds, None); if it ends first,
    (its whole wall time, the best val loss it printed)."""
    launched, best = time.time(), float('inf')
    p = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in p.stdout:
        m = re.match(r'step \d+: train loss [\d.]+, val loss ([\d.]+)', line)
        if m:
            best = min(best, float(m[1]))
        if best <= args.to_loss:
            p.terminate()
            p.wait()
            return time.time() - launched, None
    p.wait()
    return time.time() - launched, best


rows = []
for mode in filter(None, args.modes.split(',')):  # --modes='' times only the runs below
    step, model = training_step(mode)
    for _ in range(5):  # compile, then CUDA graphs' warm-up and recording
        step()
    torch.cuda.synchronize()
    step_ms, launched = events_ms(step), kernels(step)
    gpu_ms, _ = kernel_ms(launched)
    for name, us, count in launched[:args.profile]:  # the MoE and MLA paths' costs, by kernel
        print(f"  {us:9.1f} us {count:4d}x  {name[:110]}")
    mfu = model.estimate_mfu(B * T / step_ms * 1e3, 'cuda')
    rows.append((f'step, {mode}', f"{step_ms:.2f}", f"{gpu_ms:.2f}", f"{gpu_ms / step_ms:.0%}",
                 f"{B * T / step_ms * 1e3:,.0f}", '' if mfu is None else f"{mfu:.1%}"))
    print(' | '.join(rows[-1]), flush=True)
    del step, model
    torch.cuda.empty_cache()
if (args.loop_iters or args.to_loss) and not os.path.exists(meta_path):
    sys.exit(f"no {meta_path}: run `python prepare.py {run.get('dataset')}` here first, or pass --loop_iters=0")
if args.loop_iters:
    loop_ms, loop_tps = loop_speed()
    rows.append(('train.py loop (its default mode)', f"{loop_ms:.2f}", '', '', f"{loop_tps:,.0f}", ''))
    print(' | '.join(rows[-1]), flush=True)
if args.to_loss:
    with tempfile.TemporaryDirectory() as out_dir:
        runs = [('this train.py', our_train_py(out_dir), None)]
        if args.nanogpt:
            runs.insert(0, ('nanoGPT', [sys.executable, 'train.py', 'config/train_shakespeare_char.py'], args.nanogpt))
        for name, cmd, cwd in runs:
            seconds, best = time_to_loss(cmd, cwd)
            reached = f"{seconds:.1f} s" if best is None else f"never (best val {best:.4f}, ended after {seconds:.1f} s)"
            rows.append((f'{name}: wall time from launch to val loss <= {args.to_loss}: {reached}', '', '', '', '', ''))
            print(' | '.join(rows[-1]), flush=True)

header = ('what', 'ms / step', 'GPU kernel ms', 'GPU busy', 'tokens/s', 'MFU')
table = [f"{args.config}: batch {B} x {T}, {args.optimizer}; {torch.cuda.get_device_name()}, torch "
         f"{torch.__version__}, bf16; medians", '', *markdown_table(header, rows)]
print('\n' + '\n'.join(table))
if args.out:
    write_text(args.out, '\n'.join(table) + '\n')
