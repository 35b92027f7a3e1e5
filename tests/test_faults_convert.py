"""convert.py's outputs under faults and refusals: an export replaces its directory whole or not at
all, import and merge never replace a training run unasked (and merge never its own run or base),
and a full disk mid-write is one line, with the earlier output as it was and no temporary left.

A full disk is simulated with RLIMIT_FSIZE in the child process: CPython ignores SIGXFSZ, so a write
past the limit fails with EFBIG partway through the file, as a full disk fails it (chmod would not
do: the tests may run as root, whom it does not stop)."""
import hashlib
import os
import resource
import subprocess
import sys

import pytest
import torch

import hf
from checkpoint import load_model, save_checkpoint
from test_hf import CHARS, REPO, V2, V3, lora_run, tiny_model


def convert(*args, cwd, file_size_limit=None):
    limit = None if file_size_limit is None else \
        lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.run([sys.executable, str(REPO / 'convert.py'), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit,
                          env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONDONTWRITEBYTECODE': '1'})


def assert_error(p, code, message):
    assert p.returncode == code, (p.returncode, p.stderr)
    assert message in p.stderr and 'Traceback' not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def snapshot(directory):
    """{path: sha256, or 'dir'} of everything under directory."""
    return {str(p.relative_to(directory)): 'dir' if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob('*'))}


def save_run(model, out_dir, *extra):
    """out_dir as train.py leaves it: ckpt.pt and the given other files of a run."""
    out_dir.mkdir()
    save_checkpoint({'model': model.state_dict(), 'model_args': vars(model.cfg), 'tokenizer': CHARS},
                    out_dir / 'ckpt.pt')
    for name in extra:
        (out_dir / name).write_bytes(b'from the earlier run')


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[n], sb[n]) for n in sa)


# -----------------------------------------------------------------------------
# export: the directory is replaced whole

def test_an_export_replaces_an_earlier_one_whole(tmp_path):
    """An earlier sharded export with an adapter directory, then a plain single-file export over it:
    refused without --overwrite; with it, nothing of the earlier one is left to be read."""
    lora_run(tmp_path, tiny_model(**V3), 'wq_a,wo')
    p = convert('export', '--out_dir=lora', '--hf_dir=hfdir', '--max_shard_size=20000', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / 'hfdir' / 'model.safetensors.index.json').exists() and (tmp_path / 'hfdir' / 'adapter').is_dir()
    plain = tiny_model(**V2)
    save_run(plain, tmp_path / 'run')
    before = snapshot(tmp_path)
    assert_error(convert('export', '--out_dir=run', '--hf_dir=hfdir', cwd=tmp_path), 2,
                 '--hf_dir=hfdir is not empty: pass --overwrite')
    assert snapshot(tmp_path) == before
    p = convert('export', '--out_dir=run', '--hf_dir=hfdir', '--overwrite', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(tmp_path / 'hfdir')) == ['config.json', 'generation_config.json', 'model.safetensors',
                                                      'tokenizer.json', 'tokenizer_config.json']
    assert same_weights(load_model(str(tmp_path / 'hfdir'))[0], plain)
    assert sorted(os.listdir(tmp_path)) == ['base.pt', 'hfdir', 'lora', 'run']  # no temporary left beside


@pytest.mark.parametrize('hf_dir, code, message', [
    ('run', 2, '--hf_dir=run holds a training run (ckpt.pt, log.jsonl): an export there would shadow it'),
    ('afile', 2, '--hf_dir=afile is a file, not a directory'),
    ('afile/hf', 1, 'afile is a file, not a directory'),
])
def test_export_refuses_a_run_or_a_file_before_loading(hf_dir, code, message, tmp_path):
    """--out_dir names no checkpoint at all: the refusal of --hf_dir comes first."""
    save_run(tiny_model(**V3), tmp_path / 'run', 'log.jsonl')
    (tmp_path / 'afile').write_text('a file')
    before = snapshot(tmp_path)
    assert_error(convert('export', '--out_dir=missing', f'--hf_dir={hf_dir}', '--overwrite', cwd=tmp_path), code,
                 message)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize('hf_dir', ['hfdir', 'exports/hfdir'], ids=['over an earlier export', 'new'])
def test_a_full_disk_mid_export_keeps_what_was_there(hf_dir, tmp_path):
    save_run(tiny_model(**V3), tmp_path / 'run')
    earlier = hf_dir == 'hfdir'
    if earlier:
        hf.export(tiny_model(**V2), CHARS, tmp_path / hf_dir, max_shard_size=20_000)
    before = snapshot(tmp_path)
    p = convert('export', '--out_dir=run', f'--hf_dir={hf_dir}', '--overwrite', cwd=tmp_path, file_size_limit=20_000)
    assert_error(p, 1, f'cannot write {hf_dir} (')
    assert 'File too large' in p.stderr
    assert (f'{hf_dir} is as it was' if earlier else 'nothing was written') in p.stderr
    assert snapshot(tmp_path) == before  # no temporary, and no directory made for it, left either


# -----------------------------------------------------------------------------
# import and merge: a ckpt.pt that replaces no run unasked

@pytest.fixture
def work(tmp_path):
    """hfdir (an export), lora/ (a LoRA run on base.pt, which lies in tmp_path itself), run/ (a
    finished training run) and afile."""
    hf.export(tiny_model(**V3), CHARS, tmp_path / 'hfdir')
    lora_run(tmp_path, tiny_model(**V3), 'wq_a,wo')
    save_run(tiny_model(**V2), tmp_path / 'run', 'best.pt', 'log.jsonl')
    (tmp_path / 'afile').write_text('a file')
    return tmp_path


@pytest.mark.parametrize('args, code, message', [
    (('import', '--hf_dir=run', '--out_dir=new'), 1,
     '--hf_dir=run is a training run (ckpt.pt, best.pt, log.jsonl), not a Hugging Face directory: every script reads '
     'it directly'),
    (('import', '--hf_dir=lora/..', '--out_dir=new'), 1, 'is not a Hugging Face directory: it has no config.json'),
    (('import', '--hf_dir=hfdir', '--out_dir=run'), 2, '--out_dir=run holds a training run (ckpt.pt, best.pt, '
                                                        'log.jsonl): pass --overwrite to replace it'),
    (('import', '--hf_dir=hfdir', '--out_dir=afile', '--overwrite'), 2, '--out_dir=afile is a file'),
    (('import', '--hf_dir=hfdir', '--out_dir=hfdir', '--overwrite'), 2, '--out_dir=hfdir is a Hugging Face directory'),
    (('import', '--hf_dir=hfdir', '--out_dir=new', '--block_size=-1'), 2, '--block_size: -1: must be >= 0'),
    (('merge', '--out_dir=lora', '--to=lora', '--overwrite'), 2, '--to=lora is where the LoRA run lives'),
    (('merge', '--out_dir=lora/ckpt.pt', '--to=.', '--overwrite'), 2, '--to=. is where its base lives'),
    (('merge', '--out_dir=lora', '--to=run'), 2, '--to=run holds a training run'),
    (('merge', '--out_dir=lora', '--to=afile'), 2, '--to=afile is a file'),
], ids=lambda v: ' '.join(v) if isinstance(v, tuple) else None)
def test_import_and_merge_refusals_change_nothing(args, code, message, work):
    before = snapshot(work)
    assert_error(convert(*args, cwd=work), code, message)
    assert snapshot(work) == before


@pytest.mark.parametrize('command', ['import', 'merge'])
def test_overwrite_replaces_a_run_whole(command, work):
    """The run's other files go too: its best.pt and log.jsonl belong to the weights replaced."""
    source = ('--hf_dir=hfdir',) if command == 'import' else ('--out_dir=lora',)
    p = convert(command, *source, '--out_dir=run' if command == 'import' else '--to=run', '--overwrite', cwd=work)
    assert p.returncode == 0, p.stderr
    assert sorted(n for n in os.listdir(work / 'run') if n != '.lock') == ['ckpt.pt']
    expected = load_model(str(work / ('hfdir' if command == 'import' else 'lora')))[0]
    assert same_weights(load_model(str(work / 'run'))[0], expected)


@pytest.mark.parametrize('target', ['run', 'new/run'], ids=['over a run', 'new'])
@pytest.mark.parametrize('command', ['import', 'merge'])
def test_a_full_disk_mid_import_or_merge_keeps_what_was_there(command, target, work):
    source = ('--hf_dir=hfdir',) if command == 'import' else ('--out_dir=lora',)
    before = snapshot(work)
    p = convert(command, *source, f'--out_dir={target}' if command == 'import' else f'--to={target}', '--overwrite',
                cwd=work, file_size_limit=20_000)
    assert_error(p, 1, f'cannot write {target}/ckpt.pt (')
    assert ('the earlier one is as it was' if target == 'run' else 'nothing was written') in p.stderr
    after = snapshot(work)
    assert {n: h for n, h in after.items() if n != 'run/.lock'} == before  # no temporary left either
