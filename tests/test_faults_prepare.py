"""prepare.py re-run over an existing dataset under faults: bad input, a failure mid-write, Ctrl-C and
SIGTERM, a full disk, a read-only file system, a file where a directory belongs. Each must end in one
line on stderr, leave every old file byte-identical and no temporary file or directory behind."""
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402

CORPUS = ROOT.parent / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt'


@pytest.fixture
def old(tmp_path):
    """tmp_path/data/ds: a prepared dataset of four train shards, a loss mask each, a tokenizer.json,
    and a file of the user's own; tmp_path/chat.jsonl is its input."""
    rows = [{'messages': [{'role': 'user', 'content': f'say {i}'}, {'role': 'assistant', 'content': str(i) * 20}]}
            for i in range(200)]
    (tmp_path / 'chat.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    prepare.main(['ds', '--input', str(tmp_path / 'chat.jsonl'), '--format=chat', '--tokenizer=bpe',
                  '--bpe_vocab_size=300', '--shard_size=300', '--out_dir', str(tmp_path / 'data')])
    ds = tmp_path / 'data' / 'ds'
    (ds / 'input.txt').write_text('the user keeps this here')
    assert len(list(ds.glob('train_*.mask.bin'))) == len(list(ds.glob('train_*.bin'))) // 2 >= 4
    assert (ds / 'tokenizer.json').exists()
    return ds


def snapshot(d):
    """{path: sha256} of every file under d."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob('*'))
            if p.is_file()}


def leftovers(d):
    """Temporary files or directories (atomic_path's, the staging directory, writable_dir's probe)."""
    return sorted(str(p) for p in Path(d).rglob('*') if p.name.endswith('.tmp') or p.name.startswith('.write-test'))


def run_cli(*args, cwd, **kw):
    return subprocess.run([sys.executable, str(ROOT / 'prepare.py'), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, **kw)


def assert_one_line_error(r, code, message):
    assert r.returncode == code, (r.returncode, r.stderr)
    assert message in r.stderr and 'Traceback' not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# -----------------------------------------------------------------------------
# a re-run that fails keeps the old dataset; one that succeeds leaves nothing of it

def test_rerun_with_bad_input_keeps_old_dataset(tmp_path, old):
    before = snapshot(old)
    (tmp_path / 'bad.jsonl').write_text((tmp_path / 'chat.jsonl').read_text() + '{"messages": [\n')
    (tmp_path / 'bad.json').write_text('{"not": "a tokenizer"}')
    cases = [(('--input', tmp_path / 'bad.jsonl', '--format=chat'), 'bad.jsonl:201: '),
             (('--input', tmp_path / 'chat.jsonl', '--format=chat', f'--tokenizer={tmp_path / "bad.json"}'),
              'not a Hugging Face tokenizer.json')]
    for flags, message in cases:
        assert_one_line_error(run_cli('ds', *flags, cwd=tmp_path), 1, message)
        assert snapshot(old) == before and not leftovers(tmp_path)


def test_rerun_with_a_tokenizer_error_keeps_old_dataset(tmp_path, old):
    """The old dataset's own tokenizer meets a character it lacks."""
    prepare.main(['char', '--input', str(tmp_path / 'chat.jsonl'), '--format=chat', '--tokenizer=char',
                  '--out_dir', str(tmp_path / 'data')])
    before = snapshot(tmp_path / 'data')
    (tmp_path / 'unseen.jsonl').write_text(json.dumps({'messages': [{'role': 'user', 'content': 'say ~'},
                                                                    {'role': 'assistant', 'content': '~'}]}) + '\n'
                                           + (tmp_path / 'chat.jsonl').read_text())
    r = run_cli('char', '--input', tmp_path / 'unseen.jsonl', '--format=chat', '--tokenizer_from=data/char',
                cwd=tmp_path)
    assert_one_line_error(r, 1, "character '~'")
    assert snapshot(tmp_path / 'data') == before and not leftovers(tmp_path)


@pytest.mark.parametrize('fault', [OSError(28, 'No space left on device'), KeyboardInterrupt()],
                         ids=['write-error', 'interrupt'])
def test_failure_mid_write_keeps_old_dataset(tmp_path, old, monkeypatch, fault):
    """The fourth file the re-run writes fails, when three new shards already exist (in the staging
    directory): the old files stay as they were."""
    before, real, written = snapshot(old), prepare.atomic_path, []

    @contextmanager
    def failing(path):
        if len(written) == 3:
            raise fault
        written.append(Path(path))
        with real(path) as tmp:
            yield tmp
    monkeypatch.setattr(prepare, 'atomic_path', failing)
    with pytest.raises(type(fault)):
        prepare.main(['ds', '--input', str(tmp_path / 'chat.jsonl'), '--format=chat', '--tokenizer=char',
                      '--shard_size=200', '--out_dir', str(tmp_path / 'data')])
    assert all(p.parent.name.startswith('ds.') and p.parent.name.endswith('.tmp') for p in written)
    assert snapshot(old) == before and not leftovers(tmp_path)


def test_successful_rerun_leaves_nothing_of_the_old_dataset(tmp_path, old):
    """Fewer shards, no masks and no tokenizer.json this time: the old ones go, the user's file stays."""
    (tmp_path / 'doc.txt').write_text('plain text, ' * 50)
    prepare.main(['ds', '--input', str(tmp_path / 'doc.txt'), '--tokenizer=char', '--out_dir', str(tmp_path / 'data')])
    assert sorted(p.name for p in old.iterdir()) == ['input.txt', 'meta.json', 'train_000.bin', 'val_000.bin']
    assert (old / 'input.txt').read_text() == 'the user keeps this here'
    assert prepare.read_meta(old)['tokenizer']['kind'] == 'char' and not leftovers(tmp_path)


def test_first_run_creates_the_directory_whole(tmp_path):
    (tmp_path / 'doc.txt').write_text('abc ' * 50)
    prepare.main(['new', '--input', str(tmp_path / 'doc.txt'), '--tokenizer=char', '--out_dir', str(tmp_path / 'd')])
    assert sorted(p.name for p in (tmp_path / 'd').iterdir()) == ['new']
    assert sorted(p.name for p in (tmp_path / 'd' / 'new').iterdir()) == ['meta.json', 'train_000.bin', 'val_000.bin']


def test_signals_wait_for_the_swap():
    """A Ctrl-C during the swap of old files for new is handled once the swap is done."""
    handler, done = signal.getsignal(signal.SIGINT), []
    with pytest.raises(KeyboardInterrupt):
        with prepare.signals_deferred():
            signal.raise_signal(signal.SIGINT)
            done.append(True)
    assert done == [True] and signal.getsignal(signal.SIGINT) is handler


# -----------------------------------------------------------------------------
# Ctrl-C and SIGTERM from outside

@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM], ids=['SIGINT', 'SIGTERM'])
def test_signal_during_rerun_is_one_line_and_keeps_old_dataset(tmp_path, old, sig):
    """prepare.py writes thousands of shards of a large corpus into its staging directory; the signal
    comes once that directory exists."""
    if not CORPUS.exists():
        pytest.skip(f"tiny shakespeare not found at {CORPUS}")
    (tmp_path / 'big.txt').write_text(CORPUS.read_text() * 5)
    before = snapshot(old)
    p = subprocess.Popen([sys.executable, str(ROOT / 'prepare.py'), 'ds', '--input', 'big.txt', '--tokenizer=char',
                          '--shard_size=2000'], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not list((tmp_path / 'data').glob('ds.*.tmp')):
        assert p.poll() is None, p.communicate()
        assert time.time() < deadline, 'no staging directory appeared'
        time.sleep(0.01)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip() == 'prepare.py: interrupted', (p.returncode, err)
    assert snapshot(old) == before and not leftovers(tmp_path)


# -----------------------------------------------------------------------------
# the file system refuses

@pytest.mark.parametrize('limit', [2000, 4096], ids=['at-the-first-shard', 'after-the-last-shard'])
def test_full_disk_keeps_old_dataset(tmp_path, old, limit):
    """A full disk, simulated: RLIMIT_FSIZE caps every file the child writes at `limit` bytes, and as
    CPython ignores SIGXFSZ, a write past it fails with OSError EFBIG mid-file, as ENOSPC would. Shards
    of 1000 tokens are 3024 bytes: 2000 fails the first shard, 4096 lets every shard through and fails
    at tokenizer.json or meta.json (the tokenizer's text inside), the last files written."""
    before = snapshot(old)
    r = run_cli('ds', '--input', tmp_path / 'chat.jsonl', '--format=chat', '--tokenizer=bpe',
                '--bpe_vocab_size=300', '--shard_size=1000', cwd=tmp_path,
                env={**os.environ, 'PYTHONDONTWRITEBYTECODE': '1'},
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert_one_line_error(r, 1, 'prepare.py: error: writing data/ds failed (File too large)')
    assert snapshot(old) == before and not leftovers(tmp_path)


def test_file_in_place_of_a_directory(tmp_path, old):
    before = snapshot(old)
    (tmp_path / 'afile').write_text('mine')
    r = run_cli('ds', '--input', tmp_path / 'chat.jsonl', '--format=chat', '--out_dir=afile', cwd=tmp_path)
    assert_one_line_error(r, 1, 'prepare.py: error: afile is a file, not a directory')
    (tmp_path / 'data' / 'other').write_text('mine too')
    r = run_cli('other', '--input', tmp_path / 'chat.jsonl', '--format=chat', cwd=tmp_path)
    assert_one_line_error(r, 1, 'prepare.py: error: data/other is a file, not a directory')
    assert (tmp_path / 'afile').read_text() == 'mine' and (tmp_path / 'data' / 'other').read_text() == 'mine too'
    assert snapshot(old) == before and not leftovers(tmp_path)


def read_only(d, *command, cwd):
    """command run with directory d read-only, for root too: in a private mount namespace (unshare),
    d is bind-mounted over itself and remounted read-only. None where namespaces are not allowed."""
    mount = f'mount --bind "{d}" "{d}" && mount -o remount,bind,ro "{d}"'
    if shutil.which('unshare') is None or subprocess.run(['unshare', '-rm', 'sh', '-c', mount],
                                                         capture_output=True).returncode:
        return None
    return subprocess.run(['unshare', '-rm', 'sh', '-c', f'{mount} && exec "$0" "$@"', *map(str, command)],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('ro', ['data', 'data/ds'])
def test_read_only_file_system(tmp_path, old, ro):
    """Where the staging directory would go (data), or where the new files would move to (data/ds)."""
    before = snapshot(old)
    r = read_only(tmp_path / ro, sys.executable, ROOT / 'prepare.py', 'ds', '--input', tmp_path / 'chat.jsonl',
                  '--format=chat', cwd=tmp_path)
    if r is None:
        pytest.skip('mount namespaces (unshare -rm) not allowed here')
    assert_one_line_error(r, 1, f'prepare.py: error: cannot write into {ro} (Read-only file system)')
    assert snapshot(old) == before and not leftovers(tmp_path)
