"""eval.py on CPU with tiny random-init checkpoints: perplexity against the model's own loss, every
token scored once, bits per byte by hand, multiple choice on a model built to know the answer, the
lm-evaluation-harness adapter against the same scorer, and the one-line errors."""
import importlib
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from checkpoint import save_checkpoint  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from prepare import get_tokenizer, gpt2_encoding, write_shard  # noqa: E402

ev = importlib.import_module('eval')
HAVE_LM_EVAL = ev.LM is not None
SHAKESPEARE = REPO.parent / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt'
# multi-byte characters, so that bytes and characters differ
TEXT = SHAKESPEARE.read_text(encoding='utf-8')[:700] + "\ncafé naïve — ✓ Ünïcödé\n"
CHARS = ''.join(sorted(set(TEXT)))
TOKENIZER = {'kind': 'char', 'chars': CHARS}
encode, decode = get_tokenizer(TOKENIZER)
TINY = dict(vocab_size=len(CHARS), block_size=32, n_layer=2, n_embd=32, n_head=2, kv_lora_rank=16,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, dense_inter_dim=64, moe_inter_dim=16,
            n_routed_experts=4, n_activated_experts=2)
SUCCESSOR_ITEMS = 5  # MC items; the first 3 are labelled with the chain the bigram model predicts


def random_model(seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**TINY)).eval()


def successor_model():
    """A bigram model that predicts character i+1 after character i, by a wide margin: every block
    adds nothing (output projections zeroed), and the head points each id at its predecessor's
    embedding."""
    model = random_model(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(('wo.weight', 'w2.weight', 'ffn.w2')):
                p.zero_()
        e = model.embed.weight / model.embed.weight.norm(dim=1, keepdim=True)
        model.head.weight.copy_(5 * e.roll(1, 0))
    return model


def save(model, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    save_checkpoint({'model': model.state_dict(), 'model_args': asdict(model.cfg), 'tokenizer': TOKENIZER,
                     'config': {'dataset': 'tiny'}, 'iter_num': 7}, os.path.join(out_dir, 'ckpt.pt'))


def chain(start, n):
    i = CHARS.index(start)
    return ''.join(CHARS[(i + k) % len(CHARS)] for k in range(1, n + 1))


def mc_items():
    """Endings of equal length after ' ': the successor chain of ' ' and three scrambled others."""
    rng = np.random.default_rng(0)
    right = chain(' ', 5)
    items = []
    for k in range(SUCCESSOR_ITEMS):
        wrong = [''.join(rng.choice(list(CHARS.replace('\n', '')), 5)) for _ in range(3)]
        endings = wrong[:k % 4] + [right] + wrong[k % 4:]
        label = k % 4 if k < 3 else (k % 4 + 1) % 4  # items 3 and 4 name a wrong ending
        items.append({'ctx': TEXT[20 * k:20 * k + 30], 'endings': endings, 'label': label})
    return items


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """data/tiny (val in two shards: the split is their concatenation), the successor model's
    checkpoint and the MC items."""
    d = tmp_path_factory.mktemp('eval')
    ids = encode(TEXT)
    os.makedirs(d / 'data' / 'tiny')
    write_shard(d / 'data' / 'tiny' / 'train_000.bin', ids)
    write_shard(d / 'data' / 'tiny' / 'val_000.bin', ids[:300])
    write_shard(d / 'data' / 'tiny' / 'val_001.bin', ids[300:])
    (d / 'data' / 'tiny' / 'meta.json').write_text(json.dumps({'tokenizer': TOKENIZER, 'vocab_size': len(CHARS)}))
    save(successor_model(), d / 'successor')
    with open(d / 'mc.jsonl', 'w') as f:
        f.writelines(json.dumps(it) + '\n' for it in mc_items())
    return d


def run_eval(cwd, *args):
    return subprocess.run([sys.executable, str(REPO / 'eval.py'), '--device=cpu', '--dtype=float32', *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1', 'HF_DATASETS_OFFLINE': '1',
                                            'HF_HUB_OFFLINE': '1'})


def direct_nll(model, tokens):
    """Summed cross-entropy of tokens[1:] from the model's own loss, block_size chunk by chunk."""
    T, total = model.cfg.block_size, 0.0
    for s in range(0, len(tokens) - 1, T):
        x = torch.tensor(tokens[s:s + T + 1], dtype=torch.long)
        ce = model(x[None, :-1], targets=x[None, 1:])[2]['ce']
        total += ce.item() * (len(x) - 1)
    return total


@pytest.mark.parametrize('n', [2, 3, 31, 32, 33, 34, 65, 200])
@pytest.mark.parametrize('stride', [0, 1, 5, 16, 32])
def test_windows_score_every_token_once(n, stride):
    T = 32
    count = np.zeros(n, dtype=int)
    for start, end, scored in ev.windows(n, T, stride):
        assert 0 < scored <= end - start <= T
        if stride and start:  # after the first window, every window reads a full block
            assert end - start == T
        if not stride:  # side by side
            assert scored == end - start
        count[end - scored + 1:end + 1] += 1
    assert count[0] == 0 and (count[1:] == 1).all()


def test_perplexity_is_exp_of_model_ce():
    model, T = random_model(), TINY['block_size']
    tokens = np.array(encode(TEXT[:4 * T + 1]))
    nll, scored, n_windows, load = ev.score_tokens(model, tokens, 0, 3, 'cpu')  # batches of 3 and 1
    x = torch.from_numpy(tokens.astype(np.int64))
    ce = model(x[:-1].view(4, T), targets=x[1:].view(4, T))[2]['ce'].item()
    assert (scored, n_windows) == (4 * T, 4)
    assert math.exp(-nll / scored) == pytest.approx(math.exp(ce), rel=1e-5)
    # the load: each MoE layer sends every token read to k experts
    assert load.shape == (1, 4) and (load.sum(1) == 2 * 4 * T).all()


def test_stride_scores_every_token_with_more_context():
    model = random_model()
    tokens = np.array(encode(TEXT[:150]))
    plain = ev.score_tokens(model, tokens, 0, 4, 'cpu')
    strided = ev.score_tokens(model, tokens, 8, 4, 'cpu')
    assert plain[1] == strided[1] == len(tokens) - 1 and strided[2] > plain[2]
    # a token scored in a strided window gets the log-prob of the full block before its window's end
    p = 100
    start, end, _ = next(w for w in ev.windows(len(tokens), 32, 8) if w[1] - w[2] < p <= w[1])
    rows, _ = ev.score_batch(model, [tokens[start:p + 1]], [1], 'cpu')
    logits = model(torch.tensor(tokens[start:p][None].astype(np.int64)))[0]
    assert rows[0][0][0] == pytest.approx(logits[0, -1].log_softmax(-1)[tokens[p]].item(), abs=1e-5)


@pytest.fixture(scope='module')
def cli(work):
    """One eval.py run over everything: the split, MC, and (where installed) lm_eval on a local
    task holding the same items -> (metrics, stdout)."""
    (work / 'tasks').mkdir()
    (work / 'tasks' / 'tiny_mc.yaml').write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {work / 'mc.jsonl'}\n"
        "validation_split: validation\noutput_type: multiple_choice\n"
        'doc_to_text: "{{ctx}}"\ndoc_to_choice: endings\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n")
    lm_eval_args = ['--lm_eval_tasks=tiny_mc', f"--lm_eval_include={work / 'tasks'}"] if HAVE_LM_EVAL else []
    p = run_eval(work, '--out_dir=successor', '--out=m.json', '--batch_size=3', '--bench_iters=1',
                 '--decode_tokens=4', '--mc=mc.jsonl', *lm_eval_args)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((work / 'm.json').read_text()), p.stdout


def test_cli_ppl_and_bpb_against_the_model_and_by_hand(cli, work):
    m, stdout = cli
    val = encode(TEXT)  # the two val shards, concatenated
    nll = direct_nll(successor_model(), val)
    n_bytes = len(TEXT[1:].encode('utf-8'))
    assert n_bytes > len(TEXT) - 1  # the text has multi-byte characters
    assert m['scoring']['tokens_scored'] == len(val) - 1 and m['scoring']['split_tokens'] == len(val)
    assert m['scoring']['bytes_scored'] == n_bytes
    assert m['ce'] == pytest.approx(nll / (len(val) - 1), rel=1e-5)
    assert m['ppl'] == pytest.approx(math.exp(nll / (len(val) - 1)), rel=1e-5)
    assert m['bpb'] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)
    assert 'bits per byte' in stdout and 'first has no context' in stdout
    assert not list(work.glob('*.tmp'))


def test_cli_params_throughput_memory_load(cli):
    m, _ = cli
    assert m['checkpoint']['iter'] == 7 and m['dataset'] == 'tiny' and m['split'] == 'val'
    assert m['params']['total'] > m['params']['active'] > 0
    assert m['throughput']['prefill_tokens_per_s'] > 0 and m['throughput']['decode_tokens_per_s'] > 0
    assert m['memory']['peak_mib'] > 0
    [layer] = m['expert_load']  # every token read goes to k = 2 of the 4 experts
    assert layer['layer'] == 1 and sum(layer['tokens']) == 2 * m['scoring']['tokens_scored']
    assert 0 < layer['entropy_bits'] <= layer['max_entropy_bits'] == 2


def test_bytes_per_token_gpt2():
    text = "Ünïcödé — ✓ and plain words"
    ids = gpt2_encoding().encode_ordinary(text)
    per_token = ev.token_bytes({'kind': 'gpt2'})
    assert per_token[ids].sum() == len(text.encode('utf-8')) and per_token[50256] == 0


def test_multiple_choice_picks_the_known_ending():
    items = mc_items()
    result = ev.multiple_choice(successor_model(), encode, items, 5, 'cpu')
    right = [it['endings'].index(chain(' ', 5)) for it in items]
    assert result['predictions'] == right
    assert result['acc'] == result['acc_norm'] == 3 / SUCCESSOR_ITEMS


@pytest.mark.skipif(not HAVE_LM_EVAL, reason='lm-eval is not installed')
def test_lm_eval_adapter_matches_mc_scorer(cli):
    """lm_eval, run by eval.py on a local task with the MC file's items, gets the MC scorer's accuracy."""
    m, _ = cli
    assert m['mc']['acc'] == 3 / SUCCESSOR_ITEMS and m['mc']['items'] == SUCCESSOR_ITEMS
    assert m['lm_eval']['tiny_mc']['acc,none'] == m['mc']['acc']


@pytest.mark.skipif(not HAVE_LM_EVAL, reason='lm-eval is not installed')
def test_lm_eval_rolling_and_generation():
    from lm_eval.api.instance import Instance
    model = successor_model()
    lm = ev.NanoDeepSeekLM(loaded=(model, {'tokenizer': TOKENIZER}), device='cpu', dtype='float32')
    req = lambda kind, args: Instance(request_type=kind, doc={}, arguments=args, idx=0)
    [rolling] = lm.loglikelihood_rolling([req('loglikelihood_rolling', (TEXT[:80],))])
    assert rolling == pytest.approx(-direct_nll(model, encode(TEXT[:80])), rel=1e-5)
    stop = chain('a', 4)[-1]
    [text] = lm.generate_until([req('generate_until', ('a', {'until': [stop], 'max_gen_toks': 8}))])
    assert text == chain('a', 3)  # greedy follows the chain and stops before the stop string
    [(logprob, greedy)] = lm.loglikelihood([req('loglikelihood', ('a', chain('a', 3)))])
    assert greedy and logprob > -0.01


def test_bad_mc_line_names_it(tmp_path):
    path = tmp_path / 'bad.jsonl'
    path.write_text('{"ctx": "a", "endings": ["b"], "label": 0}\n{"ctx": "a", "endings": ["b"], "label": 1}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl:2: expected'):
        ev.read_mc(path)


@pytest.mark.parametrize('case', ['no checkpoint', 'corrupt checkpoint', 'no dataset', 'corrupt shard',
                                  'unknown lm_eval task'])
def test_bad_input_is_one_line(work, case):
    if case == 'unknown lm_eval task' and not HAVE_LM_EVAL:
        pytest.skip('lm-eval is not installed')
    args = {'no checkpoint': ['--out_dir=nowhere'],
            'corrupt checkpoint': ['--out_dir=broken'],
            'no dataset': ['--out_dir=successor', '--dataset=nope'],
            'corrupt shard': ['--out_dir=successor', '--dataset=cut'],
            'unknown lm_eval task': ['--out_dir=successor', '--lm_eval_tasks=no_such_task']}[case]
    if case == 'corrupt checkpoint':
        (work / 'broken').mkdir(exist_ok=True)
        (work / 'broken' / 'ckpt.pt').write_bytes((work / 'successor' / 'ckpt.pt').read_bytes()[:5000])
    if case == 'corrupt shard':
        (work / 'data' / 'cut').mkdir(exist_ok=True)
        (work / 'data' / 'cut' / 'meta.json').write_bytes((work / 'data' / 'tiny' / 'meta.json').read_bytes())
        (work / 'data' / 'cut' / 'val_000.bin').write_bytes((work / 'data' / 'tiny' / 'val_000.bin').read_bytes()[:-3])
    p = run_eval(work, *args)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith('eval.py: error:'), p.stderr
    assert {'no checkpoint': 'no checkpoint', 'corrupt checkpoint': 'cannot read', 'no dataset': 'no dataset',
            'corrupt shard': 'truncated', 'unknown lm_eval task': "unknown lm_eval task 'no_such_task'"}[case] in lines[0]


def test_instruction_data_is_scored_as_train_py_trains_on_it(tmp_path):
    """An alpaca dataset: eval.py scores each example on its own and only its response tokens (the loss
    mask train.py trains on), which it says; the figure equals the model's own loss on those targets."""
    rows = [{'instruction': 'Repeat:', 'input': w * (1 + i % 3), 'output': w.upper()}
            for i, w in enumerate(['rose', 'king', 'night', 'sword', 'crown', 'queen'] * 4)]
    (tmp_path / 'rows.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    p = subprocess.run([sys.executable, str(REPO / 'prepare.py'), 'sft', '--input', 'rows.jsonl', '--format=alpaca',
                        '--tokenizer=char', '--val_fraction=0.25'], cwd=tmp_path, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    meta = json.loads((tmp_path / 'data' / 'sft' / 'meta.json').read_text())
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, 'vocab_size': meta['vocab_size'], 'block_size': 128})).eval()
    os.makedirs(tmp_path / 'run')
    save_checkpoint({'model': model.state_dict(), 'model_args': asdict(model.cfg), 'tokenizer': meta['tokenizer'],
                     'config': {'dataset': 'sft'}}, tmp_path / 'run' / 'ckpt.pt')
    p = run_eval(tmp_path, '--out_dir=run', '--out=m.json', '--bench_iters=0', '--decode_tokens=0')
    assert p.returncode == 0, p.stderr[-3000:]
    m = json.loads((tmp_path / 'm.json').read_text())

    from prepare import DOC_START, LOSS, read_mask, read_shard
    tokens = np.asarray(read_shard(str(tmp_path / 'data' / 'sft' / 'val_000.bin')), dtype=np.int64)
    mask = np.asarray(read_mask(str(tmp_path / 'data' / 'sft' / 'val_000.mask.bin')))
    starts = list(np.flatnonzero(mask & DOC_START)) + [len(tokens)]
    total, count = 0.0, 0
    for s, e in zip(starts, starts[1:]):  # each example alone, its targets outside responses ignored
        x, y = torch.tensor(tokens[s:e - 1]), torch.tensor(np.where(mask[s + 1:e] & LOSS, tokens[s + 1:e], -1))
        n = int((y >= 0).sum())
        total += model(x[None], targets=y[None])[2]['ce'].item() * n
        count += n
    assert len(starts) - 1 == 6 and m['scoring']['windows'] == 6 and m['scoring']['targets'] == 'responses'
    assert m['scoring']['tokens_scored'] == count < m['scoring']['split_tokens']
    assert m['ce'] == pytest.approx(total / count, rel=1e-5)
    assert 'response tokens' in p.stdout
