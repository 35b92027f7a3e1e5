"""
Training speed on a GPU. For a train.py config file: one training step of its model (bf16,
random tokens; forward, backward, clipping, optimizer step, router-bias update) in each torch.compile
mode, timed with CUDA events, next to the summed time of the step's GPU kernels (profiler): kernels /
step is the share of the step the GPU is busy ('regions': each block and the head's loss compiled with
'reduce-overhead', as train.py does on one GPU; the other modes compile the whole model). Then a short
real train.py run of the same config (the whole loop: data, logging, its default compile mode) for the
tokens/s train.py logs once compiled. --fp8 times each step and the loop a second time with train.py's
--fp8=True (fp8.py), side by side with bf16, and gives both loops' losses at step 60. --to_loss L also runs the config and reports the wall time from launching train.py
to the first eval it prints at val loss <= L (start-up, compilation and evaluations included); with
--nanogpt DIR, the same for nanoGPT's own `train.py config/train_shakespeare_char.py` in that checkout
(its data prepared there), run before ours in the same call.

--cold_start instead times whole train.py runs of the config from launch, for each --variants (train.py's
--compile_regions True and False): first with the compile caches cold (new empty TORCHINDUCTOR_CACHE_DIR
and TRITON_CACHE_DIR), then warm (the same directories again). Each run: seconds from launch to the
model built (start-up), the first eval printed, the first optimizer step ('iter 0'), val loss <= --to_loss,
the best val loss, the end; the median seconds from an eval line to the next step's line (the checkpoint
and the plots written after an eval); ms a step from its log.jsonl (--log_interval=10, steps 100 on, past
eval steps). With --nanogpt, nanoGPT's run first, caches cold, stopped at --to_loss. --first_step N
times cold runs only to their Nth step, then stops them (--log_interval=5; ms a step from steps 10 on):
for large configs. The CUDA extension's build (torch's extension cache) is not part of it: this script
builds it, if needed, when it imports the model.
$ python prepare.py shakespeare_char   # the train.py runs read data/<dataset> from the working directory
$ python benchmarks/bench_train.py [config/train_shakespeare_char.py] [--optimizer muon] [--loop_iters 300]
                                   [--to_loss 1.4645 [--nanogpt PATH]] [--batch_size N] [--profile N] [--out PATH]
$ python benchmarks/bench_train.py config/train_shakespeare_char.py --cold_start --to_loss 1.48 [--nanogpt PATH]
$ python benchmarks/bench_train.py config/train_scale.py --first_step 20
$ python benchmarks/bench_train.py config/train_scale.py --fp8 --modes=regions
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's modules
from benchmarks.timing import events_ms, kernel_ms, kernels, markdown_table
from fp8 import use_fp8
from model import ModelConfig, Transformer, padded_vocab
from prepare import write_text

parser = argparse.ArgumentParser()
parser.add_argument('config', nargs='?', default='config/train_shakespeare_char.py')
parser.add_argument('--modes', default='none,default,reduce-overhead,regions',
                    help="'none' is eager, 'regions' train.py's compile_regions with 'reduce-overhead'")
parser.add_argument('--optimizer', default='adamw', choices=('adamw', 'muon'))
parser.add_argument('--loop_iters', type=int, default=300, help='steps of the train.py run; 0 skips it')
parser.add_argument('--to_loss', type=float, default=0.0, help='also time a full run to this val loss')
parser.add_argument('--nanogpt', default=None, help="a nanoGPT checkout to time to --to_loss too")
parser.add_argument('--batch_size', type=int, default=0, help="the step's batch (default: the config's)")
parser.add_argument('--profile', type=int, default=0, help="also print each mode's N costliest kernels")
parser.add_argument('--out', default=None, help='also write the markdown table to this file')
parser.add_argument('--cold_start', action='store_true', help='time train.py runs from launch, caches cold and warm')
parser.add_argument('--first_step', type=int, default=0, help='time cold train.py runs to their Nth step only')
parser.add_argument('--fp8', action='store_true', help='each step and the loop also with fp8 matmuls')
parser.add_argument('--variants', default='regions,whole', help="--cold_start's compile_regions: True, False")
args = parser.parse_args()
if not set(args.variants.split(',')) <= {'regions', 'whole'}:
    parser.error(f"--variants={args.variants!r}: a comma-separated list of 'regions' and 'whole'")
assert torch.cuda.is_available(), 'needs a CUDA GPU'
torch.backends.cuda.matmul.allow_tf32 = True

run = {}  # the config file's globals, as train.py's configurator sets them
exec(open(args.config).read(), {}, run)
meta_path = os.path.join('data', run.get('dataset', 'shakespeare'), 'meta.json')
dataset_vocab = json.load(open(meta_path))['vocab_size'] if os.path.exists(meta_path) else 65
cfg = ModelConfig.from_settings(run, vocab_size=run.get('vocab_size') or padded_vocab(dataset_vocab))
B, T = args.batch_size or run.get('batch_size', 32), cfg.block_size
lr = run.get('learning_rate', 1e-3)


def training_step(mode, fp8=False):
    """train.py's step, on one fixed random batch, with torch.compile(mode) (none: eager) -> (step, model)."""
    torch._dynamo.reset()  # each mode compiles afresh
    torch.manual_seed(1337)
    model = Transformer(cfg).cuda().train()
    if fp8:
        use_fp8(model)
    optimizer = model.configure_optimizers(run.get('weight_decay', 0.1), lr, (0.9, run.get('beta2', 0.95)), 'cuda',
                                           muon_lr=lr if args.optimizer == 'muon' else 0.0)
    if mode == 'regions':
        model.compile_regions('reduce-overhead')
    forward = model if mode in ('none', 'regions') else torch.compile(model, mode=mode)
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


def loop_speed(fp8=False):
    """ms/iter, tokens/s and MFU (against the bf16 peak) of a short train.py run, past its first 100
    steps (compilation), and its training loss at step 60."""
    n = args.loop_iters
    with tempfile.TemporaryDirectory() as out_dir:
        p = subprocess.run(our_train_py(out_dir, f'--max_iters={n}', f'--lr_decay_iters={n}', f'--eval_interval={n}',
                                        '--eval_iters=5', '--log_interval=10', f'--fp8={fp8}'),
                           capture_output=True, text=True)
        if p.returncode:
            sys.exit(f"train.py failed:\n{p.stderr[-3000:]}")
        with open(os.path.join(out_dir, 'log.jsonl')) as f:
            logged = [r for r in map(json.loads, f) if r['kind'] == 'train']
    steady = [r for r in logged if r['iter'] >= 100]
    loss_60 = next((r['loss'] for r in logged if r['iter'] == 60), float('nan'))
    mfu = statistics.median(r['mfu'] or 0.0 for r in steady)
    return (statistics.median(r['ms'] for r in steady), statistics.median(r['tokens_per_sec'] for r in steady),
            mfu, loss_60)


NANOGPT = [sys.executable, 'train.py', 'config/train_shakespeare_char.py']  # run in the checkout
EVAL_LINE = re.compile(r'step (\d+): train loss [\d.]+, val loss ([\d.]+)')  # ours and nanoGPT's alike
STEP_LINE = re.compile(r'iter (\d+): loss')


def reached_loss(line):
    m = EVAL_LINE.match(line)
    return bool(m) and float(m[2]) <= args.to_loss


def timed_run(cmd, cwd=None, env=None, stop=None):
    """Runs cmd, noting the seconds from launch at which it prints the lines above; stop(line) True
    ends it there -> {'start-up', 'first eval', 'first step', 'to loss', 'best': (val, step, seconds),
    'after eval': [seconds from each eval line after step 0's to the next step line], 'end', 'stopped',
    'failed': its exit code, if it failed (its stderr's end is printed, and the other runs go on)}."""
    seen, eval_at = {'after eval': [], 'stopped': False}, None
    env = {**os.environ, **(env or {}), 'PYTHONUNBUFFERED': '1'}  # each line as printed, not as a pipe's buffer fills
    with tempfile.TemporaryFile('w+') as err:
        launched = time.time()
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        for line in p.stdout:
            t = time.time() - launched
            if 'parameters' in line:
                seen.setdefault('start-up', t)
            if m := EVAL_LINE.match(line):
                seen.setdefault('first eval', t)
                if args.to_loss and float(m[2]) <= args.to_loss:
                    seen.setdefault('to loss', t)
                if float(m[2]) < seen.get('best', (float('inf'),))[0]:
                    seen['best'] = (float(m[2]), int(m[1]), t)
                eval_at = t if int(m[1]) else None
            if STEP_LINE.match(line):
                seen.setdefault('first step', t)
                if eval_at is not None:
                    seen['after eval'].append(t - eval_at)
                eval_at = None
            if stop and stop(line):
                seen['stopped'] = True
                p.terminate()
                p.stdout.close()
                break
        p.wait()
        seen['end'] = time.time() - launched
        if p.returncode and not seen['stopped']:
            err.seek(0)
            print(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}", flush=True)
            seen['failed'] = p.returncode
    return seen


@contextmanager
def compile_caches():
    """Empty inductor (FX graph, AOT autograd, autotuning) and Triton caches, for as long as the block runs."""
    d = tempfile.mkdtemp(prefix='bench_train_caches_')
    try:
        yield {'TORCHINDUCTOR_CACHE_DIR': d, 'TRITON_CACHE_DIR': os.path.join(d, 'triton')}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def steady_ms(out_dir, first):
    """Median ms a step logged from step `first` on, without the steps logged right after an eval (one step each)."""
    eval_interval = run.get('eval_interval', 250)
    if not os.path.exists(os.path.join(out_dir, 'log.jsonl')):  # a run that failed before its first step
        return None
    with open(os.path.join(out_dir, 'log.jsonl')) as f:  # a stopped run's last line may be cut short
        logged = [json.loads(line) for line in f if line.endswith('\n')]
    ms = [r['ms'] for r in logged if r['kind'] == 'train' and r['iter'] >= first and r['iter'] % eval_interval]
    return statistics.median(ms) if ms else None


def cold_start_columns():
    """The --cold_start table's columns; --first_step's runs stop before the later ones mean anything."""
    return ['run', 'caches', 'start-up s', 'first eval s', 'first step s',
            *([] if args.first_step else [f'val <= {args.to_loss} s'] * bool(args.to_loss) +
              ['best val (step, s)', 'run s', 'after each eval s']), 'ms / step']


def cold_start_row(name, caches, seen, ms=None):
    s = lambda key: f"{seen[key]:.1f}" if key in seen else ''
    best = seen.get('best')
    failed = f" (failed, exit code {seen['failed']})" if 'failed' in seen else ''
    row = {'run': name + failed, 'caches': caches, 'start-up s': s('start-up'), 'first eval s': s('first eval'),
           'first step s': s('first step'),
           f'val <= {args.to_loss} s': s('to loss') or ('' if seen['stopped'] else 'not reached'),
           'best val (step, s)': f"{best[0]:.4f} (step {best[1]}, {best[2]:.1f} s)" if best else '',
           'run s': '' if seen['stopped'] else s('end'),
           'after each eval s': f"{statistics.median(seen['after eval']):.1f}" if seen['after eval'] else '',
           'ms / step': f"{ms:.2f}" if ms else ''}
    return [row[c] for c in cold_start_columns()]


def cold_start():
    """The --cold_start or --first_step table's rows."""
    rows = []
    if args.nanogpt and not args.first_step:
        with compile_caches() as env:
            seen = timed_run(NANOGPT, args.nanogpt, env, stop=reached_loss if args.to_loss else None)
        rows.append(cold_start_row('nanoGPT', 'cold', seen))
        print(' | '.join(rows[-1]), flush=True)
    if args.first_step:
        flags, first = ['--log_interval=5'], 10
        stop = lambda line: bool(m := STEP_LINE.match(line)) and int(m[1]) >= args.first_step
    else:
        flags, first, stop = ['--log_interval=10'], 100, None
    for variant in args.variants.split(','):
        with compile_caches() as env:
            for caches in ('cold',) if args.first_step else ('cold', 'warm'):
                with tempfile.TemporaryDirectory() as out_dir:
                    seen = timed_run(our_train_py(out_dir, f'--compile_regions={variant == "regions"}', *flags),
                                     env=env, stop=stop)
                    rows.append(cold_start_row(f'train.py --compile_regions={variant == "regions"}', caches, seen,
                                               steady_ms(out_dir, first)))
                print(' | '.join(rows[-1]), flush=True)
    return rows


def speed():
    """The table's rows without --cold_start or --first_step: each mode's step, the loop, time to loss."""
    rows = []
    precisions = (False, True) if args.fp8 else (False,)
    for mode in filter(None, args.modes.split(',')):  # --modes='' times only the runs below
        for fp8 in precisions:
            step, model = training_step(mode, fp8)
            for _ in range(5):  # compile, then CUDA graphs' warm-up and recording
                step()
            torch.cuda.synchronize()
            step_ms, launched = events_ms(step), kernels(step)
            gpu_ms, _ = kernel_ms(launched)
            for name, us, count in launched[:args.profile]:  # the MoE and MLA paths' costs, by kernel
                print(f"  {us:9.1f} us {count:4d}x  {name[:110]}")
            mfu = model.estimate_mfu(B * T / step_ms * 1e3, 'cuda')  # against the bf16 peak either way
            rows.append((f"step, {mode}{', fp8' if fp8 else ''}", f"{step_ms:.2f}", f"{gpu_ms:.2f}",
                         f"{gpu_ms / step_ms:.0%}", f"{B * T / step_ms * 1e3:,.0f}", '' if mfu is None else f"{mfu:.1%}"))
            print(' | '.join(rows[-1]), flush=True)
            del step, model
            torch.cuda.empty_cache()
    for fp8 in precisions if args.loop_iters else ():
        loop_ms, loop_tps, mfu, loss_60 = loop_speed(fp8)
        rows.append((f"train.py loop{', --fp8=True' if fp8 else ''} (its default mode; loss at step 60 {loss_60:.4f})",
                     f"{loop_ms:.2f}", '', '', f"{loop_tps:,.0f}", f"{mfu:.1%}" if mfu else ''))
        print(' | '.join(rows[-1]), flush=True)
    if args.to_loss:
        with tempfile.TemporaryDirectory() as out_dir:
            runs = [('this train.py', our_train_py(out_dir), None)]
            if args.nanogpt:
                runs.insert(0, ('nanoGPT', NANOGPT, args.nanogpt))
            for name, cmd, cwd in runs:
                seen = timed_run(cmd, cwd, stop=reached_loss)
                if 'failed' in seen:
                    reached = f"failed (exit code {seen['failed']})"
                elif seen['stopped']:
                    reached = f"{seen['end']:.1f} s"
                else:
                    reached = f"never (best val {seen['best'][0]:.4f}, ended after {seen['end']:.1f} s)"
                rows.append((f'{name}: wall time from launch to val loss <= {args.to_loss}: {reached}', *[''] * 5))
                print(' | '.join(rows[-1]), flush=True)
    return rows


if (args.loop_iters or args.to_loss or args.cold_start or args.first_step) and not os.path.exists(meta_path):
    sys.exit(f"no {meta_path}: run `python prepare.py {run.get('dataset')}` here first, or pass --loop_iters=0")
if args.cold_start or args.first_step:
    header, rows = cold_start_columns(), cold_start()
else:
    header, rows = ('what', 'ms / step', 'GPU kernel ms', 'GPU busy', 'tokens/s', 'MFU'), speed()
table = [f"`python {' '.join(sys.argv)}` ({time.strftime('%Y-%m-%d')}): {args.config}, batch {B} x {T}, "
         f"{args.optimizer}; {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16; medians", '',
         *markdown_table(header, rows)]
print('\n' + '\n'.join(table))
if args.out:
    write_text(args.out, '\n'.join(table) + '\n')
