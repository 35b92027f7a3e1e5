"""Faults and misuse around a training run: Ctrl-C, a full disk, two runs into one out_dir, data that
changes under a run, a log cut by a kill, resuming on other data or with other adapters, running out of
memory. Each ends in one line on stderr and a non-zero exit, and leaves what was good as it was.

How faults are simulated: a full disk with RLIMIT_FSIZE in the child process (CPython ignores SIGXFSZ,
so a write past the limit fails with EFBIG mid-file, as on a full disk); running out of memory with
RLIMIT_AS (the allocator's request fails as on a machine without that much memory)."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train import MICRO, REPO, records, run, train, work  # noqa: F401 (work is a fixture)

from checkpoint import host_copy  # noqa: E402 (test_train puts the repository on the path)


def popen(cwd, *args, limit=None):
    """train.py in a child process; limit: (resource, bytes) applied in the child only."""
    def preexec():
        if limit:
            resource.setrlimit(limit[0], (limit[1], limit[1]))
    return subprocess.Popen([sys.executable, str(REPO / 'train.py'), *MICRO, *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec,
                            env={**os.environ, 'OMP_NUM_THREADS': '1'})


def wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, 'timed out'
        time.sleep(0.05)


def one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in stderr, stderr[-3000:]
    return lines[0]


def no_temporaries(out):
    return not list(out.glob('*.tmp'))


def test_ctrl_c_ends_a_run_in_one_line_and_keeps_its_checkpoint(work):
    p = popen(work, '--out_dir=interrupted', '--max_iters=100000', '--eval_interval=5')
    wait_for(lambda: any(r['iter'] >= 6 for r in logged(work / 'interrupted', 'train')))
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    line = one_line(err)
    assert line.startswith('train.py: interrupted;') and 'ckpt.pt (step' in line and 'is intact' in line
    step = int(line.split('(step ')[1].split(')')[0])
    assert torch.load(work / 'interrupted' / 'ckpt.pt', weights_only=False)['iter_num'] == step
    assert no_temporaries(work / 'interrupted')


def test_a_checkpoint_written_while_training_goes_on_holds_its_own_step(work):
    """Checkpoints are written from a copy in the background while the next steps run: a run
    interrupted mid-way keeps the last one whole (the interrupt waits for a write under way), and
    resuming from it repeats a straight run's losses exactly, dropout's random numbers included."""
    steps = ['--eval_interval=3', '--always_save_checkpoint=True', '--dropout=0.1']
    train(work, '--out_dir=straight_bg', '--max_iters=12', *steps)
    p = popen(work, '--out_dir=background', '--max_iters=100000', *steps)
    wait_for(lambda: any(r['iter'] >= 7 for r in logged(work / 'background', 'train')))
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    step = int(one_line(err).split('(step ')[1].split(')')[0])
    assert p.returncode == 130 and step >= 6 and step % 3 == 0, err
    train(work, '--out_dir=background', '--max_iters=12', '--init_from=resume', *steps)
    straight, resumed = (losses(work / d) for d in ('straight_bg', 'background'))
    assert all(resumed[i] == straight[i] for i in range(step, 12)), (step, straight, resumed)
    assert no_temporaries(work / 'background')


def test_host_copy_is_a_snapshot_and_keeps_ties():
    """What the background writer saves: later changes to the originals do not reach it, and a tensor
    shared by two names (tied embeddings) stays one tensor."""
    tied, moment = torch.ones(3), torch.zeros(2)
    state = {'model': {'embed.weight': tied, 'head.weight': tied}, 'optimizer': [moment, 5], 'tokenizer': 'char'}
    copy = host_copy(state)
    tied.add_(1), moment.add_(1)
    assert torch.equal(copy['model']['embed.weight'], torch.ones(3)) and torch.equal(copy['optimizer'][0], torch.zeros(2))
    assert copy['model']['head.weight'] is copy['model']['embed.weight']
    assert copy['optimizer'][1] == 5 and copy['tokenizer'] == 'char'


def losses(out):
    """Each step's loss, the last record of a step kept (a resumed run logs again from its checkpoint)."""
    return {r['iter']: r['loss'] for r in records(out, 'train')}


def logged(out, kind):
    try:
        return records(out, kind)
    except (FileNotFoundError, ValueError):
        return []


def test_a_second_run_into_a_busy_out_dir_is_refused(work):
    """The same resume twice, and a scratch run over a run under way: the lock names the first process."""
    train(work, '--out_dir=busy', '--max_iters=2', '--eval_interval=2')
    first = popen(work, '--out_dir=busy', '--init_from=resume', '--max_iters=100000', '--eval_interval=1000')
    try:
        wait_for(lambda: any(r['iter'] > 2 for r in logged(work / 'busy', 'train')))
        for extra in (['--init_from=resume'], ['--overwrite=True']):
            p = train(work, '--out_dir=busy', '--max_iters=4', *extra, check=False)
            assert p.returncode == 2 and f'in use by process {first.pid}' in one_line(p.stderr), p.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert first.returncode == 130
    train(work, '--out_dir=busy', '--max_iters=2', '--overwrite=True')  # the lock went with its process


def test_a_full_disk_keeps_the_last_checkpoint(work):
    train(work, '--out_dir=full', '--max_iters=4', '--eval_interval=4')
    good = (work / 'full' / 'ckpt.pt').read_bytes()
    p = popen(work, '--out_dir=full', '--init_from=resume', '--max_iters=8', '--eval_interval=4',
              limit=(resource.RLIMIT_FSIZE, len(good) // 2))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1
    line = one_line(err)
    assert 'cannot write into full (File too large)' in line and 'ckpt.pt (step 4) is intact' in line
    assert (work / 'full' / 'ckpt.pt').read_bytes() == good and no_temporaries(work / 'full')


def test_an_out_dir_that_is_a_file(work):
    (work / 'afile').write_text('not a directory')
    p = train(work, '--out_dir=afile', '--max_iters=2', check=False)
    assert p.returncode == 2 and 'afile is a file, not a directory' in one_line(p.stderr)


def test_resume_after_a_kill_cut_the_log(work):
    train(work, '--out_dir=cut', '--max_iters=6', '--eval_interval=3')
    log = work / 'cut' / 'log.jsonl'
    ckpt = torch.load(work / 'cut' / 'ckpt.pt', weights_only=False)
    assert ckpt['iter_num'] == 6
    # steps past the checkpoint that a killed run logged, its last line cut mid-write, and a stale write
    log.write_text(log.read_text() + json.dumps({'kind': 'train', 'iter': 7, 'loss': 1.0}) + '\n{"kind": "tr')
    (work / 'cut' / 'ckpt.pt.999999.tmp').write_bytes(b'half a checkpoint')
    train(work, '--out_dir=cut', '--init_from=resume', '--max_iters=9', '--eval_interval=3')
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    train_iters = [r['iter'] for r in rows if r['kind'] == 'train']
    assert train_iters == list(range(9)) and [r['iter'] for r in rows if r['kind'] == 'eval'] == [0, 3, 6, 9]
    assert no_temporaries(work / 'cut')


def test_data_that_changes_under_a_run(work):
    shutil.copytree(work / 'data' / 'shakespeare_char', work / 'data' / 'shrinking')
    p = popen(work, '--out_dir=shrinking', '--dataset=shrinking', '--max_iters=100000', '--eval_interval=1000')
    wait_for(lambda: logged(work / 'shrinking', 'train'))
    shard = work / 'data' / 'shrinking' / 'train_000.bin'
    os.truncate(shard, 5000)  # one call: never seen empty; its header now says more than it holds
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and 'changed under the run' in one_line(err) and 'truncated' in err


def test_a_truncated_meta_json(work):
    shutil.copytree(work / 'data' / 'shakespeare_char', work / 'data' / 'badmeta')
    meta = work / 'data' / 'badmeta' / 'meta.json'
    meta.write_text(meta.read_text()[:20])
    p = train(work, '--out_dir=badmeta', '--dataset=badmeta', '--max_iters=2', check=False)
    assert p.returncode == 1 and 'meta.json: unreadable' in one_line(p.stderr)
    assert not (work / 'badmeta').exists()  # refused before anything was written


def test_resume_on_data_of_another_tokenizer(work):
    train(work, '--out_dir=chars', '--max_iters=2', '--eval_interval=2')
    other = work / 'data' / 'otherchars'
    shutil.copytree(work / 'data' / 'shakespeare_char', other)
    meta = json.loads((other / 'meta.json').read_text())
    meta['tokenizer']['chars'] = meta['tokenizer']['chars'][::-1]  # the same ids, other characters
    (other / 'meta.json').write_text(json.dumps(meta))
    before = (work / 'chars' / 'ckpt.pt').read_bytes()
    p = train(work, '--out_dir=chars', '--init_from=resume', '--dataset=otherchars', '--max_iters=4', check=False)
    assert p.returncode == 2 and 'another tokenizer' in one_line(p.stderr)
    assert (work / 'chars' / 'ckpt.pt').read_bytes() == before


def test_resume_with_other_lora_flags(work):
    train(work, '--out_dir=base', '--max_iters=2', '--eval_interval=2')
    train(work, '--out_dir=adapted', '--init_from=ckpt:base', '--lora_rank=2', '--max_iters=2', '--eval_interval=2')
    for flag, message in [('--lora_rank=4', "--lora_rank=4, but adapted/ckpt.pt has its 2"),
                          ('--lora_targets=wq', "--lora_targets='wq'")]:
        p = train(work, '--out_dir=adapted', '--init_from=resume', '--max_iters=4', flag, check=False)
        assert p.returncode == 2 and message in one_line(p.stderr), p.stderr
    p = train(work, '--out_dir=base', '--init_from=resume', '--max_iters=4', '--lora_rank=2', check=False)
    assert p.returncode == 2 and 'has no adapters' in one_line(p.stderr)
    train(work, '--out_dir=adapted', '--init_from=resume', '--max_iters=4', '--lora_rank=2')  # as trained: fine


def test_out_of_memory_names_the_setting(work):
    p = popen(work, '--out_dir=huge', '--batch_size=200000', '--max_iters=2',
              limit=(resource.RLIMIT_AS, 3 * 2**30))
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1
    line = one_line(err)
    assert line.startswith('train.py: out of memory') and 'lower --batch_size' in line


@pytest.mark.skipif(torch.cuda.device_count() != 1, reason='needs a machine with exactly one GPU')
def test_more_processes_than_gpus(work):
    p = run(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(REPO / 'train.py'),
             *MICRO, '--device=cuda', '--backend=nccl', '--out_dir=toomany', '--gradient_accumulation_steps=2'],
            work, check=False)
    assert p.returncode != 0
    assert "2 processes on this node and 1 GPU(s): run torchrun with --nproc_per_node=1" in p.stderr
    assert 'NCCL' not in p.stderr  # stopped before any process group (torchrun adds its own report)
