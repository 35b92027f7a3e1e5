"""prepare.py's Hugging Face tokenizers (a byte-level BPE trained on the corpus, or a tokenizer.json), and
sample.py and eval.py from a checkpoint that carries one, with no data/ directory."""
import importlib
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from model import ModelConfig, Transformer, padded_vocab  # noqa: E402

CORPUS = ROOT.parent / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt'
NON_ASCII = "Ünïcödé — naïve café, 日本語のテキスト, emoji 🙂🚀, Ελληνικά\n\ttabs  and   spaces"
VOCAB = 600


def script(name, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / name), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'})


def tokens(d, split):
    return np.concatenate([prepare.read_shard(p) for p in sorted(Path(d).glob(f'{split}_*.bin'))]).tolist()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A 600-token BPE trained on the first 200k characters of tiny shakespeare plus some non-ASCII text."""
    if not CORPUS.exists():
        pytest.skip(f"tiny shakespeare not found at {CORPUS}")
    tmp = tmp_path_factory.mktemp('bpe')
    text = CORPUS.read_text()[:200_000] + NON_ASCII
    (tmp / 'corpus.txt').write_text(text, encoding='utf-8')
    prepare.main(['mybpe', '--input', str(tmp / 'corpus.txt'), '--tokenizer=bpe', f'--bpe_vocab_size={VOCAB}',
                  '--out_dir', str(tmp / 'data')])
    out = tmp / 'data' / 'mybpe'
    return tmp, out, json.loads((out / 'meta.json').read_text()), text


def test_trained_bpe_has_the_asked_size_and_round_trips(trained):
    _, out, meta, text = trained
    desc = meta['tokenizer']
    assert desc['kind'] == 'hf' and meta['vocab_size'] == prepare.vocab_size_of(desc) == VOCAB
    assert (out / 'tokenizer.json').read_text(encoding='utf-8') == desc['json']
    encode, decode = prepare.get_tokenizer(desc)
    for s in (NON_ASCII, "never seen: ∮ E⋅da = Q, ⠁⠃⠉ \u0000 \U0001F9EC", "ROMEO:\nBut soft!"):
        assert decode(encode(s)) == s
    # the shards hold the split text, each side behind <|endoftext|>
    eot = prepare.eot_of(desc)
    train, val = tokens(out, 'train'), tokens(out, 'val')
    assert train[0] == val[0] == eot and eot not in train[1:] + val[1:]
    assert (meta['train_tokens'], meta['val_tokens']) == (len(train), len(val))
    assert decode(train[1:]) + decode(val[1:]) == text
    assert len(train) + len(val) < len(text.encode()) / 2  # the merges learnt the corpus


def test_existing_tokenizer_json(trained, tmp_path):
    tmp, out, meta, _ = trained
    (tmp_path / 'doc.txt').write_text(NON_ASCII * 3, encoding='utf-8')
    prepare.main(['reuse', '--input', str(tmp_path / 'doc.txt'), f'--tokenizer={out / "tokenizer.json"}',
                  '--val_fraction=0.3', '--out_dir', str(tmp_path / 'data')])
    reused = json.loads((tmp_path / 'data' / 'reuse' / 'meta.json').read_text())
    assert reused['tokenizer'] == meta['tokenizer'] and reused['vocab_size'] == VOCAB
    _, decode = prepare.get_tokenizer(reused['tokenizer'])
    assert decode(tokens(tmp_path / 'data' / 'reuse', 'train')[1:]) == (NON_ASCII * 3)[:int(len(NON_ASCII) * 3 * 0.7)]


def test_oversized_or_bad_tokenizers_are_refused(tmp_path):
    from tokenizers import Tokenizer, models
    (tmp_path / 'doc.txt').write_text("some text", encoding='utf-8')
    big = Tokenizer(models.WordLevel({f't{i}': i for i in range(70_000)}, unk_token='t0'))
    (tmp_path / 'big.json').write_text(big.to_str(), encoding='utf-8')
    (tmp_path / 'bad.json').write_text('{"not": "a tokenizer"}', encoding='utf-8')
    cases = {'--bpe_vocab_size=70000': ('--tokenizer=bpe', '--bpe_vocab_size=70000'),
             '65536': (f'--tokenizer={tmp_path / "big.json"}',),
             'not a Hugging Face tokenizer.json': (f'--tokenizer={tmp_path / "bad.json"}',),
             'no such file': (f'--tokenizer={tmp_path / "missing.json"}',),
             'must be gpt2, char, bpe': ('--tokenizer=sentencepiece',)}
    for expected, flags in cases.items():
        p = script('prepare.py', 'x', '--input', str(tmp_path / 'doc.txt'), *flags, cwd=tmp_path)
        assert p.returncode != 0 and 'Traceback' not in p.stderr, p.stderr
        assert expected in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / 'data').exists()


def bpe_checkpoint(meta, out_dir):
    """A tiny random MLA+MoE model with the trained BPE's tokenizer, saved as out_dir/ckpt.pt."""
    cfg = ModelConfig(vocab_size=padded_vocab(VOCAB), block_size=32, n_layer=2, n_embd=32, n_head=2,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
                      dense_inter_dim=64, moe_inter_dim=16, n_routed_experts=4)
    torch.manual_seed(0)
    ckpt = {'model': Transformer(cfg).state_dict(), 'model_args': asdict(cfg), 'tokenizer': meta['tokenizer']}
    out_dir.mkdir()
    save_checkpoint(ckpt, out_dir / 'ckpt.pt')


def test_sample_from_checkpoint_without_data_dir(trained, tmp_path):
    """The checkpoint carries the tokenizer: sample.py needs no data/ directory."""
    bpe_checkpoint(trained[2], tmp_path / 'out')
    p = script('sample.py', '--out_dir=out', '--start=Ünïcödé ROMEO', '--max_new_tokens=20', '--num_samples=1',
               '--device=cpu', '--dtype=float32', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / 'data').exists()
    assert '\nÜnïcödé ROMEO' in p.stdout and '20 tokens in' in p.stdout


def test_eval_from_checkpoint_without_data_dir(trained, tmp_path):
    """--dataset=none: multiple choice from the checkpoint's tokenizer alone; the split's figures are null."""
    bpe_checkpoint(trained[2], tmp_path / 'out')
    items = [{'ctx': 'ROMEO: Ünïcödé café', 'endings': ['naïve — 日本語', 'But soft!', 'emoji 🙂🚀'], 'label': 0},
             {'ctx': 'Ελληνικά and', 'endings': ['tabs', 'spaces ∮', 'Ünïcödé'], 'label': 2}]
    (tmp_path / 'mc.jsonl').write_text(''.join(json.dumps(it, ensure_ascii=False) + '\n' for it in items),
                                       encoding='utf-8')
    p = script('eval.py', '--out_dir=out', '--dataset=none', '--mc=mc.jsonl', '--out=m.json', '--device=cpu',
               '--dtype=float32', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / 'data').exists()
    m = json.loads((tmp_path / 'm.json').read_text())
    assert m['mc']['items'] == 2 and 0 <= m['mc']['acc'] <= 1 and 0 <= m['mc']['acc_norm'] <= 1
    assert m['tokenizer'] == 'hf' and m['dataset'] is None
    assert m['ce'] is m['ppl'] is m['bpb'] is m['scoring'] is m['throughput'] is m['expert_load'] is None
    assert 'multiple choice' in p.stdout and '--dataset=none' in p.stdout


def test_eval_without_data_is_a_one_line_error(trained, tmp_path):
    """--dataset=none with nothing to evaluate, and a missing dataset that points at --dataset=none."""
    bpe_checkpoint(trained[2], tmp_path / 'out')
    cases = {'--dataset=none': 'nothing to evaluate without data: pass --mc=FILE and/or --lm_eval_tasks',
             '--dataset=other': 'or pass --dataset=none to run only --mc/--lm_eval_tasks'}
    for flag, expected in cases.items():
        p = script('eval.py', '--out_dir=out', flag, '--device=cpu', '--dtype=float32', cwd=tmp_path)
        lines = p.stderr.strip().splitlines()
        assert p.returncode != 0 and 'Traceback' not in p.stderr and len(lines) == 1, p.stderr
        assert lines[0].startswith('eval.py: error:') and expected in lines[0], p.stderr


def test_bits_per_byte_counts_the_bpe_tokens_bytes(trained):
    """eval.py's bytes per token of a byte-level BPE: a text's tokens add up to its UTF-8 length."""
    ev = importlib.import_module('eval')
    _, out, meta, text = trained
    encode, _ = prepare.get_tokenizer(meta['tokenizer'])
    per_token = ev.token_bytes(meta['tokenizer'])
    assert per_token[prepare.eot_of(meta['tokenizer'])] == 0
    for s in (NON_ASCII, "ROMEO:\nBut soft! ∮ ⠁⠃⠉ \U0001F9EC"):
        assert per_token[encode(s)].sum() == len(s.encode('utf-8'))
    assert per_token[tokens(out, 'train') + tokens(out, 'val')].sum() == len(text.encode('utf-8'))
