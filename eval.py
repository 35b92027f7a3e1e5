"""
Evaluates a checkpoint: perplexity and bits per byte over a whole split, multiple-choice accuracy,
parameters, throughput, peak memory and expert load, printed as a table and written to metrics.json.
$ python eval.py --out_dir=out-shakespeare-char --ckpt=best
$ python eval.py --out_dir=out-shakespeare --stride=128 --mc=hellaswag_val.jsonl --out=shakespeare.json
$ python eval.py --out_dir=out-shakespeare --lm_eval_tasks=hellaswag,arc_easy   # lm-evaluation-harness
$ python eval.py --out_dir=out-bpe --dataset=none --mc=items.jsonl   # no data/ directory needed

Scoring. The split (data/DATASET/SPLIT_*.bin, DATASET from the checkpoint's training config unless
--dataset is given) is read as one token stream. Every token but the first (it has no context) is
scored exactly once: by default in non-overlapping windows of block_size tokens; with --stride=S,
windows of block_size tokens advance by S and each scores only its last S tokens, so every token
after the first window sees at least block_size - S tokens of context (slower, lower loss).
Instruction data (prepare.py --format=alpaca|chat) is scored as train.py trains on it: each example
on its own, from its first token, and only the tokens of its responses (the loss mask).
ce is the mean cross-entropy in nats over the scored tokens, ppl = exp(ce), and bits per byte
bpb = (ce summed over the scored tokens) / (UTF-8 bytes of their text) / ln 2, which compares models
with different tokenizers (GPT-2's <|endoftext|> marks a document boundary and counts 0 bytes).
A byte-level BPE from a tokenizer.json (prepare.py --tokenizer=bpe) counts each token's bytes from its
vocabulary entry; for any other tokenizer.json bpb is null. Log-probabilities are over the model's whole
(possibly padded) output, as in train.py's loss. --dataset=none reads no data (the tokenizer is the
checkpoint's): only --mc and --lm_eval_tasks run, and every figure from the split is null in metrics.json
(dataset, split, scoring, ce, ppl, bpb, throughput, expert_load).

Multiple choice (--mc=PATH, llm.c's HellaSwag style): a JSONL file, one item per line,
    {"ctx": "A man is sitting on a roof. he", "endings": ["starts pulling up roofing.", ...], "label": 0}
(HellaSwag's own validation jsonl has these fields). Each ending is scored as " " + ending after
ctx: acc picks the ending with the lowest summed loss, acc_norm the lowest mean loss per token.

lm-evaluation-harness: importing this file registers the model 'nanodeepseek' (loglikelihood,
loglikelihood_rolling, generate_until on the scoring functions below), so --lm_eval_tasks runs
lm_eval's tasks (--lm_eval_include: a folder of your own task YAMLs), and from Python
    import eval, lm_eval; lm_eval.simple_evaluate(model='nanodeepseek', model_args='out_dir=out', tasks=[...])

metrics.json (written atomically):
    checkpoint     {"path", "iter"}: the file evaluated and its training iteration (null if unknown)
    model_config   the checkpoint's model_args (ModelConfig fields)
    dataset, split, tokenizer   what was scored (tokenizer "char", "gpt2" or "hf")
    scoring        {"block_size", "stride", "windows", "targets", "split_tokens", "tokens_scored", "bytes_scored"}:
                   targets "all" for text; "responses" for instruction data (prepare.py --format), which
                   is scored as train.py's loss counts it: each example on its own (windows = examples,
                   at most block_size + 1 tokens each), only its response tokens
    ce, ppl, bpb   nats per token, exp(ce), bits per UTF-8 byte (bpb null where the bytes are unknown)
    params         {"total", "active"}: model.num_params(), active counts k of E routed experts
    throughput     {"prefill_tokens_per_s", "decode_tokens_per_s", "decode_batch", "decode_tokens"}:
                   prefill = forward passes over batch_size full windows; decode = greedy
                   engine.Engine.generate of decode_tokens tokens for decode_batch prompts of
                   block_size // 2 tokens, prefill of the prompts included (null when skipped)
    memory         {"peak_mib", "kind"}: torch.cuda.max_memory_allocated on CUDA, else the process's max RSS
    expert_load    one entry per MoE layer, over every token the scoring windows read (with --stride a
                   context token counts again in each window): {"layer", "tokens" (token copies per
                   expert), "max_over_mean", "entropy_bits", "max_entropy_bits", "unused" (experts with none)}
    mc             {"path", "items", "acc", "acc_norm"} or null
    lm_eval        lm_eval's results per task, or null
    device         {"device", "dtype", "name", "torch"}
    seconds        wall time of the whole evaluation
"""
import math
import os
import platform
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import CheckpointError, load_model
from engine import Engine, SamplingParams, windows
from flags import (DTYPES, check_flags, cross_rule, default_device, default_dtype, device_exists, dtype_supported,
                   end_in_one_line, non_negative, one_line, one_of, positive, usage_error)
from prepare import (DOC_START, EOT, LOSS, eot_of, get_tokenizer, gpt2_encoding, hf_tokenizer, mask_path,
                     read_jsonl, read_mask, read_meta, read_shard, split_shards, vocab_size_of, write_json)

try:  # lm-evaluation-harness is optional: only the adapter needs it
    import lm_eval.models  # noqa: F401  lm_eval's own models first: it only loads them into an empty registry
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:
    LM = None

# -----------------------------------------------------------------------------
out_dir = 'out'
ckpt = 'latest'          # 'latest' (ckpt.pt) or 'best' (best.pt)
dataset = ''             # '' = the dataset the checkpoint was trained on; 'none' = only --mc/--lm_eval_tasks
split = 'val'
stride = 0               # 0 = non-overlapping block_size windows; S = sliding windows scoring S tokens each
batch_size = 8
out = 'metrics.json'
mc = ''                  # multiple-choice JSONL: {"ctx", "endings", "label"} per line
bench_iters = 3          # timed prefill passes; 0 = no throughput measurement
decode_tokens = 64       # greedy tokens per prompt for decode throughput; 0 = skip
lm_eval_tasks = ''       # comma-separated lm-evaluation-harness tasks
lm_eval_include = ''     # a folder of task YAMLs for lm_eval
lm_eval_limit = 0        # items per lm_eval task; 0 = all
device = default_device()
dtype = default_dtype()
if __name__ == '__main__':  # importing this file (tests, lm_eval) must not parse the command line
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------

def fail(msg):
    raise SystemExit(f"eval.py: error: {msg}")


# -----------------------------------------------------------------------------
# data

def read_split(data_dir, split_name):
    """All shards of a split as one token stream (2 bytes a token in memory), and for instruction data
    (prepare.py --format) their loss masks as one stream beside it, else None."""
    paths = split_shards(data_dir, split_name)
    masks = [mask_path(p) for p in paths if os.path.exists(mask_path(p))]
    if masks and len(masks) != len(paths):
        raise ValueError(f"{data_dir}: some shards have a .mask.bin and some do not: prepare the dataset again")
    tokens = np.concatenate([read_shard(p) for p in paths])
    mask = np.concatenate([read_mask(p) for p in masks]) if masks else None
    if mask is not None and len(mask) != len(tokens):
        raise ValueError(f"{data_dir}: a mask's length differs from its shard's: prepare the dataset again")
    return tokens, mask


def load_dataset(data_dir, tokenizer, split_name):
    """The split's tokens and loss mask (None for plain text), after checking that the dataset was
    tokenized like the checkpoint."""
    try:
        meta = read_meta(data_dir)
    except FileNotFoundError as e:
        raise ValueError(f"{e}, or pass --dataset=none to run only --mc/--lm_eval_tasks") from None
    if meta.get('tokenizer') != tokenizer:
        raise ValueError(f"{data_dir} was tokenized with {describe(meta.get('tokenizer'))}, the checkpoint "
                         f"with {describe(tokenizer)}: pass the checkpoint's --dataset")
    tokens, mask = read_split(data_dir, split_name)
    if len(tokens) < 2:
        raise ValueError(f"{data_dir} {split_name}: {len(tokens)} token(s), nothing to score")
    if tokens.max() >= vocab_size_of(tokenizer):
        raise ValueError(f"{data_dir} {split_name}: token id {tokens.max()} is outside the vocabulary")
    return tokens, mask


def describe(tokenizer):
    known = isinstance(tokenizer, dict) and 'kind' in tokenizer
    return f"a {tokenizer['kind']} tokenizer" if known else 'an unknown tokenizer'


def token_bytes(tokenizer):
    """UTF-8 bytes of each token id's text: a token count weighted by it is the text's length in bytes.
    None where they are unknown (a tokenizer.json that is not byte-level)."""
    if tokenizer['kind'] == 'char':
        return np.array([len(c.encode('utf-8')) for c in tokenizer['chars']])
    if tokenizer['kind'] == 'hf':
        return hf_token_bytes(tokenizer)
    enc = gpt2_encoding()  # byte-level BPE: a token may hold part of a character, so count its bytes
    return np.array([0 if i == EOT else len(enc.decode_single_token_bytes(i)) for i in range(vocab_size_of(tokenizer))])


def hf_token_bytes(tokenizer):
    """A byte-level BPE writes each byte as one character of its vocabulary entries, so an entry's
    length is its byte count; added tokens are stored as plain text, and special ones mark no text."""
    from tokenizers import decoders
    tok = hf_tokenizer(tokenizer['json'])
    if not isinstance(tok.decoder, decoders.ByteLevel):
        return None
    added = tok.get_added_tokens_decoder()

    def n_bytes(i):
        if i in added:
            return 0 if added[i].special else len(added[i].content.encode('utf-8'))
        return len(tok.id_to_token(i) or '')
    return np.array([n_bytes(i) for i in range(vocab_size_of(tokenizer))])


def mc_item(row):
    ok = (isinstance(row.get('ctx'), str) and isinstance(row.get('endings'), list) and row['endings']
          and all(isinstance(e, str) for e in row['endings'])
          and type(row.get('label')) is int and 0 <= row['label'] < len(row['endings']))
    if not ok:
        raise ValueError('expected {"ctx": str, "endings": [str, ...], "label": int index into endings}')
    return row


def read_mc(path):
    """Multiple-choice items from a JSONL file; a malformed line is a one-line error naming it."""
    items = read_jsonl(path, mc_item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


# -----------------------------------------------------------------------------
# scoring: every figure below comes from score_batch

@torch.no_grad()
def score_batch(model, seqs, scored, device):
    """Sequences of at most block_size + 1 tokens -> per sequence, the log-probabilities of its scored
    tokens given everything before them, whether each was the model's top choice, and the expert load
    [n_moe_layers, E] of the batch (None for a dense model). scored[i] is a count n (the sequence's
    last n tokens) or a boolean mask over seqs[i][1:]. Shorter sequences are padded on the right,
    which the causal model's earlier positions never see. The head runs on the scored positions only:
    over a 50k vocabulary it costs more than the rest of a small model."""
    T = max(map(len, seqs)) - 1
    x = torch.zeros(len(seqs), T, dtype=torch.long)
    y = torch.full((len(seqs), T), -1, dtype=torch.long)
    for i, (seq, which) in enumerate(zip(seqs, scored)):
        seq = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        pick = np.arange(len(seq) - 1) >= len(seq) - 1 - which if np.isscalar(which) else np.asarray(which, bool)
        x[i, :len(seq) - 1] = seq[:-1]
        y[i, :len(seq) - 1] = torch.where(torch.from_numpy(pick), seq[1:], -1)
    x, y = x.to(device), y.to(device)
    h, _, loads = model.trunk(x)
    at = y >= 0
    logits = model.head(model.norm(h[at])).float()  # [scored tokens, vocab], rows one after another
    logprobs = -F.cross_entropy(logits, y[at], reduction='none')
    greedy = logits.argmax(-1) == y[at]
    logprobs, greedy = logprobs.double().cpu().numpy(), greedy.cpu().numpy()
    ends = np.cumsum(at.sum(1).cpu().numpy())
    rows = [(logprobs[e - n:e], greedy[e - n:e]) for e, n in zip(ends, np.diff(ends, prepend=0))]
    return rows, torch.stack(loads) if loads else None


def add_load(total, batch_load):
    return total if batch_load is None else batch_load.double().cpu() + (0 if total is None else total)


def same_length_batches(plan, batch_size):
    """Consecutive windows, at most batch_size of one length a batch: no padding, so no padding
    token is counted in the expert load."""
    batch = []
    for w in plan:
        if batch and (len(batch) == batch_size or w[1] - w[0] != batch[0][1] - batch[0][0]):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


def score_tokens(model, tokens, stride, batch_size, device):
    """Log-probabilities of tokens[1:] in the windows above -> (their sum, tokens scored, windows,
    expert load [n_moe_layers, E] summed over the windows or None)."""
    plan = windows(len(tokens), model.cfg.block_size, stride)
    total, scored, load = 0.0, 0, None
    for batch in same_length_batches(plan, batch_size):
        rows, batch_load = score_batch(model, [tokens[s:e + 1] for s, e, _ in batch], [n for _, _, n in batch], device)
        total += sum(loglikelihood(lp) for lp, _ in rows)
        scored += sum(len(lp) for lp, _ in rows)
        load = add_load(load, batch_load)
    return total, scored, len(plan), load


def examples(tokens, mask, block_size):
    """Instruction data -> (tokens, scored) per example: the example from its first token, at most
    block_size + 1 tokens of it (a train.py window starts at an example and holds that many), scored
    where the target carries loss (the responses): what train.py trains on and its val loss scores."""
    starts = np.flatnonzero(mask & DOC_START)
    for s, e in zip(starts, np.append(starts[1:], len(tokens))):
        e = min(e, s + block_size + 1)
        scored = (mask[s + 1:e] & LOSS) > 0
        if scored.any():
            yield np.asarray(tokens[s:e]), scored


def score_examples(model, tokens, mask, batch_size, device):
    """score_tokens for instruction data: every response token once, each example on its own, batched
    with examples of its length (no padding, so none counted in the expert load) -> (sum of
    log-probabilities, tokens scored, examples, expert load, the scored tokens' ids)."""
    exs = sorted(examples(tokens, mask, model.cfg.block_size), key=lambda ex: len(ex[0]))
    total, scored, load = 0.0, 0, None
    for batch in same_length_batches([(0, len(ex[0]), ex) for ex in exs], batch_size):
        rows, batch_load = score_batch(model, [ex[0] for *_, ex in batch], [ex[1] for *_, ex in batch], device)
        total += sum(loglikelihood(lp) for lp, _ in rows)
        scored += sum(len(lp) for lp, _ in rows)
        load = add_load(load, batch_load)
    ids = np.concatenate([t[1:][m] for t, m in exs]) if exs else np.zeros(0, np.int64)
    return total, scored, len(exs), load, ids


def score_continuations(model, pairs, batch_size, device):
    """(context ids, continuation ids) pairs -> per pair (log-probabilities of the continuation's tokens,
    whether each was the top choice). A long context keeps its last tokens; a context must be given."""
    block = model.cfg.block_size
    for ctx, cont in pairs:
        if not ctx or not 0 < len(cont) <= block:
            raise ValueError(f"cannot score a continuation of {len(cont)} tokens after {len(ctx)} context tokens "
                             f"(need a context and 1..{block} continuation tokens)")
    seqs = [(ctx + cont)[-(block + 1):] for ctx, cont in pairs]
    rows = []
    for i in range(0, len(pairs), batch_size):
        chunk = range(i, min(i + batch_size, len(pairs)))
        rows += score_batch(model, [seqs[j] for j in chunk], [len(pairs[j][1]) for j in chunk], device)[0]
    return rows


def loglikelihood(logprobs):
    """The one sum behind acc, so that the MC scorer and the lm_eval adapter agree to the bit."""
    return float(np.sum(logprobs))


def multiple_choice(model, encode, items, batch_size, device):
    """llm.c's HellaSwag scoring -> {'items', 'acc', 'acc_norm', 'predictions'}: acc from the summed
    log-likelihood of each ending, acc_norm from its mean per token."""
    pairs = [(encode(it['ctx']), encode(' ' + e)) for it in items for e in it['endings']]
    rows = iter(score_continuations(model, pairs, batch_size, device))
    correct = correct_norm = 0
    predictions = []
    for it in items:
        scores = [next(rows)[0] for _ in it['endings']]
        pred = int(np.argmax([loglikelihood(lp) for lp in scores]))
        pred_norm = int(np.argmax([loglikelihood(lp) / len(lp) for lp in scores]))
        correct += pred == it['label']
        correct_norm += pred_norm == it['label']
        predictions.append(pred)
    return {'items': len(items), 'acc': correct / len(items), 'acc_norm': correct_norm / len(items),
            'predictions': predictions}


# -----------------------------------------------------------------------------
# the other figures

def expert_load(model, load):
    """Per MoE layer: token copies per expert over the split, and how evenly they spread."""
    if load is None:
        return []
    layers = [i for i in range(model.cfg.n_layer) if model.cfg.is_moe_layer(i)]
    rows = []
    for layer, counts in zip(layers, load.tolist()):
        counts = np.array(counts)
        p = counts / counts.sum()
        rows.append({'layer': layer, 'tokens': [int(c) for c in counts],
                     'max_over_mean': float(counts.max() / counts.mean()),
                     'entropy_bits': float(-(p[p > 0] * np.log2(p[p > 0])).sum()),
                     'max_entropy_bits': math.log2(len(counts)),
                     'unused': [e for e, c in enumerate(counts) if c == 0]})
    return rows


def sync(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()


@torch.no_grad()
def prefill_throughput(model, tokens, batch_size, iters, device):
    """Tokens/s of forward passes over batch_size windows of block_size tokens (one warm-up pass)."""
    T = min(model.cfg.block_size, len(tokens))
    n = max(1, min(batch_size, len(tokens) // T))
    x = torch.from_numpy(tokens[:n * T].astype(np.int64)).view(n, T).to(device)
    model(x)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        model(x)
    sync(device)
    return n * T * iters / (time.perf_counter() - t0)


def greedy_generate(model, tokenizer, prompts, params, max_batch):
    """Engine.generate, leaving the model without the engine's caches (scoring runs uncached)."""
    try:
        return Engine(model, tokenizer, max_batch=max_batch).generate(prompts, params)
    finally:
        model.clear_cache()


def decode_throughput(model, tokenizer, tokens, batch_size, max_tokens, device):
    """Generated tokens/s of greedy Engine.generate over batch_size prompts of block_size // 2 tokens
    from the split (the prefill of the prompts included; CUDA graphs captured before the clock starts)."""
    n = min(batch_size, len(tokens))
    L = min(model.cfg.block_size // 2, len(tokens) // n)
    prompts = [tokens[i * L:(i + 1) * L].tolist() for i in range(n)]
    engine = Engine(model, tokenizer, max_batch=batch_size)
    try:
        engine.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0))  # warm-up
        sync(device)
        t0 = time.perf_counter()
        done = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
        sync(device)
        return sum(len(r.tokens) for r in done) / (time.perf_counter() - t0)
    finally:
        model.clear_cache()


def peak_memory(device):
    if torch.device(device).type == 'cuda':
        return {'peak_mib': torch.cuda.max_memory_allocated(device) / 2**20, 'kind': 'cuda_max_memory_allocated'}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {'peak_mib': rss / (2**20 if sys.platform == 'darwin' else 2**10), 'kind': 'max_rss'}


def device_info(device, dtype_name):
    cuda = torch.device(device).type == 'cuda'
    name = torch.cuda.get_device_name(device) if cuda else platform.processor() or platform.machine()
    return {'device': device, 'dtype': dtype_name, 'name': name, 'torch': torch.__version__}


def split_rows(m):
    sc = m['scoring']
    if sc is None:
        return [('data', 'none (--dataset=none): no cross-entropy, throughput or expert load')]
    bpb = f"{m['bpb']:.4f}" if m['bpb'] is not None else \
        'n/a: no text bytes' if sc['bytes_scored'] == 0 else "n/a: the tokenizer's bytes are unknown"
    how = f"windows, stride {sc['stride']}" if sc['stride'] else 'windows side by side'
    if sc['targets'] == 'responses':
        how = "examples, response tokens only (train.py's loss)"
    return [('data', f"{m['dataset']} {m['split']}: {sc['tokens_scored']:,} tokens scored in {sc['windows']:,} {how}"),
            ('cross-entropy', f"{m['ce']:.4f} nats/token"), ('perplexity', f"{m['ppl']:.4f}"),
            ('bits per byte', bpb)]


def throughput_rows(thr):
    if thr is None:  # --dataset=none
        return []
    rows = []
    if thr['prefill_tokens_per_s'] is not None:
        rows.append(('prefill', f"{thr['prefill_tokens_per_s']:,.0f} tokens/s"))
    if thr['decode_tokens_per_s'] is not None:
        rows.append(('decode', f"{thr['decode_tokens_per_s']:,.0f} tokens/s "
                               f"({thr['decode_batch']} x {thr['decode_tokens']} tokens)"))
    return rows


def print_table(m):
    rows = [('checkpoint', f"{m['checkpoint']['path']} (iter {m['checkpoint']['iter']})"), *split_rows(m),
            ('params', f"{m['params']['total']:,} total, {m['params']['active']:,} active"),
            *throughput_rows(m['throughput']),
            ('peak memory', f"{m['memory']['peak_mib']:,.0f} MiB ({m['memory']['kind']})")]
    for r in m['expert_load'] or []:
        rows.append((f"experts, layer {r['layer']}", f"max/mean {r['max_over_mean']:.2f}, entropy "
                     f"{r['entropy_bits']:.2f} of {r['max_entropy_bits']:.2f} bits, unused {r['unused'] or 'none'}"))
    if m['mc']:
        rows.append(('multiple choice', f"acc {m['mc']['acc']:.4f}, acc_norm {m['mc']['acc_norm']:.4f} "
                     f"({m['mc']['items']} items)"))
    for task, res in (m['lm_eval'] or {}).items():
        rows.append((f"lm_eval {task}", ', '.join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float))))
    rows.append(('device', f"{m['device']['name']} ({m['device']['device']}, {m['device']['dtype']})"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


# -----------------------------------------------------------------------------
# lm-evaluation-harness

if LM is not None:
    @register_model('nanodeepseek')
    class NanoDeepSeekLM(LM):
        """lm_eval's three request types on eval.py's scorer. model_args: out_dir, ckpt, dtype;
        lm_eval's own --device and --batch_size apply."""
        def __init__(self, out_dir='out', ckpt='latest', device=device, dtype=dtype, batch_size=batch_size,
                     max_batch_size=None, loaded=None):  # lm_eval passes max_batch_size; unused
            super().__init__()
            self.model, checkpoint = loaded or load_model(out_dir, ckpt, device, DTYPES[dtype])
            self.tokenizer = checkpoint['tokenizer']
            self.encode, self.decode = get_tokenizer(self.tokenizer)
            eot = eot_of(self.tokenizer)  # what training put in front of every document
            self.prefix = [] if eot is None else [eot]  # the context of an empty context
            self._device = device
            self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # 'auto' -> 8

        def pair(self, ctx, cont):
            """Context and continuation encoded apart, as the MC scorer does. An empty context is the
            prefix token; without one (char tokenizer) the continuation's first token is context only."""
            ctx_ids, cont_ids = self.encode(ctx) or self.prefix, self.encode(cont)
            return (ctx_ids, cont_ids) if ctx_ids else (cont_ids[:1], cont_ids[1:])

        def loglikelihood(self, requests):
            pairs = [self.pair(*r.args) for r in requests]
            rows = score_continuations(self.model, pairs, self.batch_size, self._device)
            return [(loglikelihood(lp), bool(greedy.all())) for lp, greedy in rows]

        def loglikelihood_rolling(self, requests):
            """Each text's tokens in block_size windows, every one scored once (without a prefix
            token, as for the char tokenizer, the first one is context only)."""
            return [score_tokens(self.model, np.array(self.prefix + self.encode(text)), 0,
                                 self.batch_size, self._device)[0] for (text,) in (r.args for r in requests)]

        def generate_until(self, requests):
            """Greedy continuations through the engine, cut before the first stop string ('until');
            sampling settings in gen_kwargs are ignored."""
            prompts, params = [], []
            for ctx, kwargs in (r.args for r in requests):
                until = kwargs.get('until') or ()
                prompts.append(self.encode(ctx) or self.prefix)
                params.append(SamplingParams(max_tokens=kwargs.get('max_gen_toks', 256), temperature=0,
                                             stop=(until,) if isinstance(until, str) else tuple(until)))
            return [r.text for r in greedy_generate(self.model, self.tokenizer, prompts, params, self.batch_size)]


def lm_eval_tasks_of(names, include):
    """(task names, lm_eval's TaskManager), checked before any scoring starts."""
    if LM is None:
        raise ValueError("--lm_eval_tasks needs lm-evaluation-harness: pip install lm-eval==0.4.13")
    from lm_eval.tasks import TaskManager
    if include and not os.path.isdir(include):
        raise ValueError(f"--lm_eval_include={include}: no such folder")
    manager = TaskManager(include_path=include or None)
    names = names.split(',')
    unknown = [t for t in names if t not in manager.all_tasks and not os.path.isfile(t)]
    if unknown:
        raise ValueError(f"unknown lm_eval task {unknown[0]!r} (list them with `lm_eval ls tasks`; "
                         f"your own: a folder of task YAMLs in --lm_eval_include)")
    return names, manager


def run_lm_eval(model, checkpoint, tasks, limit, batch, device, dtype_name):
    import lm_eval
    lm = NanoDeepSeekLM(device=device, dtype=dtype_name, batch_size=batch, loaded=(model, checkpoint))
    try:
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks[0], task_manager=tasks[1], limit=limit or None)
    except Exception as e:  # lm_eval and the datasets it loads fail in many ways: one line each
        raise ValueError(f"lm_eval failed ({one_line(e)}); without network, a task whose data is on "
                         f"the Hugging Face hub needs a local copy: a task YAML with dataset_path: json") from None
    return {task: {k: v for k, v in res.items() if isinstance(v, (int, float))}
            for task, res in results['results'].items()}


# -----------------------------------------------------------------------------

NO_SPLIT = dict.fromkeys(('scoring', 'ce', 'ppl', 'bpb', 'throughput', 'expert_load'))  # --dataset=none


def read_eval_split(checkpoint):
    """(dataset name, the split's tokens, its loss mask or None), or Nones with --dataset=none."""
    if dataset == 'none':
        return None, None, None
    name = dataset or checkpoint.get('config', {}).get('dataset')
    if not name:
        fail("the checkpoint does not name its dataset: pass --dataset (--dataset=none: only --mc/--lm_eval_tasks)")
    return name, *load_dataset(os.path.join('data', name), checkpoint['tokenizer'], split)


def split_metrics(model, tokenizer, name, tokens, mask):
    """metrics.json's figures from the split: scoring, ce, ppl, bpb, throughput, expert_load."""
    if mask is None:
        print(f"scoring {len(tokens) - 1:,} of the {len(tokens):,} tokens of {name} {split} "
              f"(the first has no context and is not scored)")
        logprob, scored, n_windows, load = score_tokens(model, tokens, stride, batch_size, device)
        targets = tokens[1:]
    else:
        print(f"scoring the response tokens of {name} {split}, each example on its own: instruction data, "
              f"where train.py's loss (and its val loss) counts only the responses")
        logprob, scored, n_windows, load, targets = score_examples(model, tokens, mask, batch_size, device)
        if not scored:
            raise ValueError(f"{name} {split}: no example has a response token to score")
    per_token = token_bytes(tokenizer)
    n_bytes = None if per_token is None else int(np.bincount(targets, minlength=len(per_token)) @ per_token)
    ce = -logprob / scored
    throughput = {'prefill_tokens_per_s': None, 'decode_tokens_per_s': None, 'decode_batch': batch_size,
                  'decode_tokens': decode_tokens}
    if bench_iters:
        throughput['prefill_tokens_per_s'] = prefill_throughput(model, tokens, batch_size, bench_iters, device)
    if decode_tokens:
        throughput['decode_tokens_per_s'] = decode_throughput(model, tokenizer, tokens, batch_size,
                                                              decode_tokens, device)
    return {'scoring': {'block_size': model.cfg.block_size, 'stride': stride, 'windows': n_windows,
                        'targets': 'all' if mask is None else 'responses', 'split_tokens': len(tokens),
                        'tokens_scored': scored, 'bytes_scored': n_bytes},
            'ce': ce, 'ppl': math.exp(ce), 'bpb': -logprob / n_bytes / math.log(2) if n_bytes else None,
            'throughput': throughput, 'expert_load': expert_load(model, load)}


def main():
    t_start = time.time()
    check_flags('eval.py', globals(), {
        'ckpt': one_of('latest', 'best'), 'split': one_of('train', 'val'), 'stride': non_negative,
        'batch_size': positive, 'bench_iters': non_negative, 'decode_tokens': non_negative,
        'lm_eval_limit': non_negative, 'device': device_exists(), 'dtype': dtype_supported(),
        'dataset': cross_rule(lambda v, flags: v != 'none' or bool(flags['mc'] or flags['lm_eval_tasks']),
                              "nothing to evaluate without data: pass --mc=FILE and/or --lm_eval_tasks=TASKS"),
    })
    end_in_one_line('eval.py', 'lower --batch_size')
    if torch.device(device).type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model, checkpoint = load_model(out_dir, ckpt, device, DTYPES[dtype])
        encode, _ = get_tokenizer(checkpoint['tokenizer'])  # the checkpoint's own: no data/ needed
        if stride > model.cfg.block_size:
            usage_error('eval.py', f"--stride={stride}: must be <= the model's block_size {model.cfg.block_size}")
        name, tokens, mask = read_eval_split(checkpoint)
        if stride and mask is not None:
            usage_error('eval.py', f"--stride={stride}: {name} is instruction data, scored one example at a time")
        items = read_mc(mc) if mc else None
        tasks = lm_eval_tasks_of(lm_eval_tasks, lm_eval_include) if lm_eval_tasks else None
    except (CheckpointError, ValueError, OSError) as e:
        fail(e)
    try:
        from_split = NO_SPLIT if tokens is None else split_metrics(model, checkpoint['tokenizer'], name, tokens, mask)
        mc_result = multiple_choice(model, encode, items, batch_size, device) if items else None
        lm_eval_result = run_lm_eval(model, checkpoint, tasks, lm_eval_limit, batch_size, device, dtype) if tasks else None
    except ValueError as e:
        fail(e)

    metrics = {
        'checkpoint': {'path': checkpoint['path'], 'iter': checkpoint.get('iter_num')},
        'model_config': checkpoint['model_args'],
        'dataset': name, 'split': split if name else None, 'tokenizer': checkpoint['tokenizer']['kind'],
        **from_split,
        'params': {'total': model.num_params(), 'active': model.num_params(active=True)},
        'memory': peak_memory(device),
        'mc': mc_result and {'path': mc, **{k: v for k, v in mc_result.items() if k != 'predictions'}},
        'lm_eval': lm_eval_result,
        'device': device_info(device, dtype),
        'seconds': time.time() - t_start,
    }
    print_table(metrics)
    if out:
        write_json(metrics, out)
        print(f"wrote {out}")


if __name__ == '__main__':
    main()
