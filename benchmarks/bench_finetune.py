"""
Fine-tuning and training memory, measured through train.py's own command line: every run
is a train.py process in a scratch directory, and its numbers come from what it prints and its log.jsonl.
A: pretrain a small MoE model from scratch on a copy task (chats whose answer repeats the prompt,
   mixed-case letters), then fine-tune it to answer in uppercase instead, fully and with LoRA:
   trainable parameters, held-out exact match (greedy, through the engine) before and after, wall
   time, peak memory. The runs are eager: at these sizes compiling costs more than it saves.
B: config/train_scale.py for a few steps: full training, with activation checkpointing, and LoRA
   (on a randomly initialised base of that shape): peak memory, tokens/s, MFU.
C: config/train_1b.py (>= 1B parameters) under --memory_limit_gib (CUDA): peak memory, tokens/s, MFU;
   running out of memory under the cap is a row that says so.
B and C train on GPT-2-tokenized Shakespeare: --input prepares it, else ./data/shakespeare is used.
$ python benchmarks/bench_finetune.py --input data/tinyshakespeare/input.txt [--parts A,B,C] [--out PATH]
$ python benchmarks/bench_finetune.py --cpu_smoke --input ...   # the same code at toy sizes on CPU, < 1 minute
"""
import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parents[1]  # the repository
sys.path.insert(0, str(HERE))
from benchmarks.timing import markdown_table
from checkpoint import load_model, save_checkpoint
from engine import Engine, SamplingParams
from model import ModelConfig, Transformer, padded_vocab
from prepare import END, chat_template, write_text

LORA_TARGETS = 'wq,wkv_a,wkv_b,wo,w1,w2,w3'  # attention and every MLP: dense, shared, routed experts
TOY_MODEL = dict(n_layer=2, n_embd=32, n_head=2, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=8, dense_inter_dim=64, moe_inter_dim=16, n_routed_experts=8,
                 n_activated_experts=2)
SIZES = {
    'gpu': dict(
        model=dict(n_layer=4, n_embd=256, n_head=4, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                   v_head_dim=32, dense_inter_dim=768, moe_inter_dim=256, n_routed_experts=8,
                   n_activated_experts=2, block_size=128, batch_size=64),
        lengths=(4, 8), copies=20000, examples=3000, held_out=500, log_interval=50,
        pretrain=dict(max_iters=1000, learning_rate=2e-3, warmup_iters=50),
        full=dict(max_iters=300, learning_rate=1e-3, warmup_iters=20),
        lora=dict(max_iters=300, learning_rate=3e-3, warmup_iters=20), lora_rank=16,
        big_model={}, steps=6, big_steps=10),
    'cpu_smoke': dict(
        model=dict(TOY_MODEL, block_size=64, batch_size=8),
        lengths=(3, 3), copies=300, examples=100, held_out=20, log_interval=5,
        pretrain=dict(max_iters=20, learning_rate=1e-2, warmup_iters=2),
        full=dict(max_iters=5, learning_rate=1e-2, warmup_iters=1),
        lora=dict(max_iters=5, learning_rate=1e-2, warmup_iters=1), lora_rank=4,
        # train_scale.py's and train_1b.py's fields at toy size; the runs otherwise as on the GPU
        big_model=dict(TOY_MODEL, q_lora_rank=16, block_size=32, batch_size=2, gradient_accumulation_steps=2),
        steps=3, big_steps=3),
}


# -----------------------------------------------------------------------------
# the synthetic instruction task (tests/test_finetune.py uses these too)

def chat(user, answer=None):
    return [{'role': 'user', 'content': user}] + ([{'role': 'assistant', 'content': answer}] if answer else [])


def write_chats(path, pairs):
    """(prompt, answer) pairs as prepare.py --format=chat jsonl."""
    Path(path).write_text(''.join(json.dumps({'messages': chat(u, a)}) + '\n' for u, a in pairs))


def random_words(rng, n, lengths, letters, exclude=()):
    """n distinct strings of lengths[0]..lengths[1] letters, none of them in exclude, in drawn order."""
    words, seen = [], set(exclude)
    while len(words) < n:
        w = ''.join(rng.choice(letters) for _ in range(rng.randint(*lengths)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def answers(source, words):
    """A checkpoint's greedy answers to the words as chat prompts, up to the template's END (CPU, fp32)."""
    model, ckpt = load_model(source)
    engine = Engine(model, ckpt['tokenizer'], max_batch=len(words), cuda_graphs=False)
    params = SamplingParams(max_tokens=max(map(len, words)) + len(END), temperature=0.0, stop=(END,))
    return [r.text for r in engine.generate([engine.encode(chat_template(chat(w))) for w in words], params)]


def exact_match(source, words, want):
    """The share of held-out prompts whose greedy answer is exactly want(word)."""
    return sum(a == want(w) for a, w in zip(answers(source, words), words)) / len(words)


# -----------------------------------------------------------------------------
# train.py runs


def flags(settings):
    return [f'--{k}={v}' for k, v in settings.items()]


def train(work, name, args, stop_at=None):
    """python train.py ARGS --out_dir=NAME in work; with stop_at, stopped once it logs step stop_at
    (before the last eval and checkpoint, which would cost more than the steps measured). -> wall
    seconds, log.jsonl's train records, the parameter counts it printed, and error: None, 'OOM' or
    the last line on stderr."""
    t0 = time.time()
    stdout, stopped = [], False
    with open(work / f'{name}.stderr', 'w+') as err:
        p = subprocess.Popen([sys.executable, str(HERE / 'train.py'), *args, f'--out_dir={name}'], cwd=work,
                             stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, 'PYTHONUNBUFFERED': '1'})
        for line in p.stdout:
            stdout.append(line)
            step = re.match(r'iter (\d+):', line)
            if stop_at is not None and step and int(step[1]) >= stop_at:
                p.terminate()
                stopped = True
                break
        p.stdout.close()
        p.wait()
        err.seek(0)
        stderr = err.read()
    run = {'name': name, 'seconds': time.time() - t0, 'error': None, 'records': []}
    if p.returncode and not stopped:
        run['error'] = 'OOM' if 'out of memory' in stderr.lower() else (stderr.strip().splitlines() or ['?'])[-1]
        print(f"{name}: train.py failed:\n{stderr[-3000:]}", file=sys.stderr)
    log = work / name / 'log.jsonl'
    if log.exists():
        run['records'] = [r for r in map(json.loads, log.read_text().splitlines()) if r['kind'] == 'train']
    text = ''.join(stdout)
    if m := re.search(r'parameters: ([\d.]+)M total, ([\d.]+)M active', text):
        run['total_m'], run['active_m'] = float(m[1]), float(m[2])
    if m := re.search(r'trainable: ([\d,]+) of ([\d,]+) parameters', text):
        run['trainable'], run['all'] = (int(g.replace(',', '')) for g in m.groups())
    return run


def peak(run):
    values = [r['peak_gib'] for r in run['records'] if r['peak_gib'] is not None]
    return f"{max(values):.2f}" if values else 'n/a (no CUDA)'


def trainable(run):
    if 'trainable' not in run:
        return ''
    return f"{run['trainable']:,} ({run['trainable'] / run['all']:.2%} of {run['all']:,})"


def steady(run, key):
    """The median of a logged figure past the first step (which pays for first-call set-up)."""
    values = [r[key] for r in run['records'][1:] or run['records'] if r[key] is not None]
    return statistics.median(values) if values else None


# -----------------------------------------------------------------------------
# A: fine-tuning on a task whose answers are checked exactly


def part_a(work, size, device):
    rng = random.Random(0)
    copies = random_words(rng, size['copies'], size['lengths'], string.ascii_letters)
    words = random_words(rng, size['examples'] + size['held_out'], size['lengths'], string.ascii_lowercase,
                         exclude=copies)
    examples, held_out = words[:size['examples']], words[size['examples']:]
    write_chats(work / 'copy.jsonl', ((s, s) for s in copies))
    write_chats(work / 'upper.jsonl', ((w, w.upper()) for w in examples))
    prepare(work, 'copy', '--input', 'copy.jsonl', '--format=chat', '--tokenizer=char')
    prepare(work, 'upper', '--input', 'upper.jsonl', '--format=chat', '--tokenizer_from=data/copy')

    def run(name, dataset, schedule, *extra):
        n = schedule['max_iters']
        settings = {**size['model'], **schedule, 'dataset': dataset, 'compile': False, 'eval_iters': 2,
                    'eval_interval': n, 'lr_decay_iters': n, 'min_lr': schedule['learning_rate'] / 10,
                    'log_interval': size['log_interval']}
        return train(work, name, [*flags(settings), *device, *extra])

    def described(what, schedule):
        return f"{what}, lr {schedule['learning_rate']:g}, {schedule['max_iters']} steps"

    def score(run):
        return exact_match(work / run['name'], held_out, str.upper) if not run['error'] else None

    base = run('base', 'copy', size['pretrain'])
    before = score(base)
    copied = exact_match(work / 'base', held_out, str) if not base['error'] else None
    full = run('full', 'upper', size['full'], '--init_from=ckpt:base')
    rank = size['lora_rank']
    lora = run('lora', 'upper', size['lora'], '--init_from=ckpt:base', f'--lora_rank={rank}',
               f'--lora_alpha={2 * rank}', f'--lora_targets={LORA_TARGETS}')
    rows = [(described('pretrain from scratch on the copy task', size['pretrain']), base,
             f"{pct(before)} (it copies {pct(copied)})")]
    rows += [(described(what, size[kind]), r, f"{pct(before)} -> {pct(score(r))}")
             for what, kind, r in [('full fine-tune', 'full', full),
                                   (f'LoRA rank {rank}, alpha {2 * rank}, on {LORA_TARGETS}', 'lora', lora)]]
    header = ('run', 'trainable parameters', 'held-out exact match (uppercase)', 'train.py wall', 'peak GiB')
    table = [(what, trainable(r), match, f"{r['seconds']:.1f} s", peak(r)) if not r['error']
             else (what, '', '', f"failed: {r['error']}", '') for what, r, match in rows]
    letters = '-'.join(map(str, sorted(set(size['lengths']))))
    note = (f"A. {letters}-letter strings; pretraining: {len(copies):,} mixed-case copy chats; fine-tuning: "
            f"{len(examples):,} lowercase -> uppercase chats; exact match on {len(held_out)} held-out "
            f"lowercase prompts (greedy, engine on CPU); every run eager (--compile=False), wall time "
            f"of the whole train.py process")
    return note, header, table, [base, full, lora]


def pct(share):
    return 'n/a' if share is None else f"{share:.0%}"


def prepare(work, name, *args):
    p = subprocess.run([sys.executable, str(HERE / 'prepare.py'), name, *args], cwd=work, capture_output=True,
                       text=True)
    if p.returncode:
        sys.exit(f"prepare.py {name} failed:\n{p.stderr[-3000:]}")


# -----------------------------------------------------------------------------
# B and C: peak memory and speed of the large configs


def random_base(work, name, config, overrides):
    """A checkpoint of config's architecture with random weights, as train.py derives it (the
    dataset's vocabulary, padded to 64): the base a LoRA run needs; its speed and memory do not
    depend on the weights."""
    settings = {}
    exec(open(config).read(), {}, settings)
    settings.update(overrides)
    meta = json.loads((work / 'data' / settings['dataset'] / 'meta.json').read_text())
    cfg = ModelConfig.from_settings(settings, vocab_size=padded_vocab(meta['vocab_size']))
    torch.manual_seed(0)
    model = Transformer(cfg)
    os.makedirs(work / name)
    save_checkpoint({'model': model.state_dict(), 'model_args': dataclasses.asdict(cfg),
                     'tokenizer': meta['tokenizer']}, work / name / 'ckpt.pt')


def part_bc(work, size, device, args, parts):
    common = ['--log_interval=1', f'--compile={args.compile}', *flags(size['big_model']), *device]
    scale, big = str(HERE / 'config' / 'train_scale.py'), str(HERE / 'config' / 'train_1b.py')
    rows = []
    if 'B' in parts:
        rank = 16
        rows.append(('config/train_scale.py, full', train(work, 'scale_full', [scale, *common], size['steps'])))
        rows.append(('config/train_scale.py, full + activation checkpointing',
                     train(work, 'scale_ac', [scale, *common, '--activation_checkpointing=True'], size['steps'])))
        random_base(work, 'scale_base', scale, size['big_model'])
        rows.append((f'config/train_scale.py, LoRA rank {rank} on {LORA_TARGETS} (random base)',
                     train(work, 'scale_lora', [scale, *common, '--init_from=ckpt:scale_base', f'--lora_rank={rank}',
                                                f'--lora_targets={LORA_TARGETS}'], size['steps'])))
    if 'C' in parts:
        cap = [] if args.cpu_smoke else [f'--memory_limit_gib={args.memory_limit_gib}']  # the cap needs CUDA
        where = "(no cap: no CUDA)" if args.cpu_smoke else f"under --memory_limit_gib={args.memory_limit_gib:g}"
        rows.append((f'config/train_1b.py (activation checkpointing) {where}',
                     train(work, 'big', [big, *common, *cap], size['big_steps'])))
    header = ('run', 'parameters total / active', 'trainable', 'peak GiB', 'tokens/s', 'MFU')
    table = []
    for what, r in rows:
        params = f"{r['total_m']:,.2f}M / {r['active_m']:,.2f}M" if 'total_m' in r else ''
        if r['error'] == 'OOM':
            table.append((what, params, trainable(r), f"OOM (over {args.memory_limit_gib:g} GiB)", '', ''))
        elif r['error']:
            table.append((what, params, trainable(r), f"failed: {r['error']}", '', ''))
        else:
            tokens, mfu = steady(r, 'tokens_per_sec'), steady(r, 'mfu')
            table.append((what, params, trainable(r), peak(r), 'n/a' if tokens is None else f"{tokens:,.0f}",
                          'n/a' if mfu is None else f"{mfu:.1%}"))
    note = (f"B/C. {'torch.compile' if args.compile else 'eager (--compile=False)'}, --log_interval=1, stopped "
            f"after {size['steps']} (B) / {size['big_steps']} (C) steps; peak = torch.cuda.max_memory_allocated "
            f"over the run; tokens/s and MFU: medians past the first step")
    return note, header, table, [r for _, r in rows]


def shakespeare(work, args):
    """data/shakespeare in work: prepared from --input, else linked from ./data/shakespeare."""
    (work / 'data').mkdir(exist_ok=True)
    if args.input:
        prepare(work, 'shakespeare', '--input', str(Path(args.input).resolve()))
    elif os.path.exists('data/shakespeare/meta.json'):
        os.symlink(os.path.abspath('data/shakespeare'), work / 'data' / 'shakespeare')
    else:
        sys.exit("parts B and C train on data/shakespeare: pass --input path/to/input.txt (tiny shakespeare) "
                 "or run `python prepare.py shakespeare` here first")


def markdown(note, header, table):
    return [note, '', *markdown_table(header, table), '']


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--parts', default='A,B,C')
    parser.add_argument('--input', default=None, help="tiny shakespeare's input.txt, for parts B and C")
    parser.add_argument('--cpu_smoke', action='store_true', help='every part at toy sizes on CPU')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the B and C runs (each then pays its compilation)')
    parser.add_argument('--memory_limit_gib', type=float, default=24.0, help="part C's cap")
    parser.add_argument('--work', default=None, help='keep the runs in this directory (default: a temporary one)')
    parser.add_argument('--out', default=None, help='also write the markdown tables to this file')
    args = parser.parse_args()
    parts = args.parts.split(',')
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU; --cpu_smoke runs every part at toy sizes on CPU")
    if args.work and os.path.exists(args.work) and os.listdir(args.work):
        sys.exit(f"--work {args.work}: not empty; the runs need a new directory")
    size = SIZES['cpu_smoke' if args.cpu_smoke else 'gpu']
    device = ['--device=cpu', '--dtype=float32'] if args.cpu_smoke else []  # train.py's default: the GPU, bf16
    work = Path(args.work or tempfile.mkdtemp(prefix='bench_finetune_')).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if 'B' in parts or 'C' in parts:
        shakespeare(work, args)
    where = 'CPU (--cpu_smoke: toy sizes)' if args.cpu_smoke else torch.cuda.get_device_name()
    lines = [f"bench_finetune.py on {where}, torch {torch.__version__}", '']
    runs = []
    if 'A' in parts:
        note, header, table, done = part_a(work, size, device)
        lines += markdown(note, header, table)
        runs += done
        print('\n'.join(lines), flush=True)
    if 'B' in parts or 'C' in parts:
        note, header, table, done = part_bc(work, size, device, args, parts)
        lines += markdown(note, header, table)
        runs += done
    lines.append(f"whole bench: {time.time() - t0:.0f} s")
    print('\n' + '\n'.join(lines))
    if args.out:
        write_text(args.out, '\n'.join(lines) + '\n')
    if not args.work:
        shutil.rmtree(work)
    failed = [r['name'] for r in runs if r['error'] and r['error'] != 'OOM']
    if failed:
        sys.exit(f"failed runs: {', '.join(failed)} (their stderr is above)")


if __name__ == '__main__':
    main()
