"""Bad flags, resume and overwrite rules, kill -9 at any moment, and the end of a torchrun run:
every usage error is one line, exit code 2, no traceback, and leaves out_dir as it was."""
import hashlib
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train import MICRO, REPO, SHAKESPEARE, records, run, train

sys.path.insert(0, str(REPO))
from checkpoint import load_model  # noqa: E402


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """data/shakespeare_char and a finished 2-step run in run/ (ckpt.pt, best.pt, log.jsonl)."""
    d = tmp_path_factory.mktemp('hard')
    run([str(REPO / 'prepare.py'), 'shakespeare_char', '--input', str(SHAKESPEARE)], d)
    train(d, '--out_dir=run', '--max_iters=2', '--eval_interval=2')
    return d


def snapshot(directory):
    """{file: (mtime, sha256)} of everything under directory."""
    return {str(p.relative_to(directory)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(directory.rglob('*')) if p.is_file()}


def assert_usage_error(p, message):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert message in p.stderr and 'Traceback' not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


# -----------------------------------------------------------------------------
# every flag class, checked in-process (the scripts stop before they touch data or a model)

TRAIN_BAD = [
    ('--eval_interval=0', "--eval_interval=0: must be > 0"),
    ('--log_interval=-1', "--log_interval=-1: must be > 0"),
    ('--eval_iters=0', "--eval_iters=0: must be > 0"),
    ('--gradient_accumulation_steps=0', "--gradient_accumulation_steps=0: must be > 0"),
    ('--batch_size=-8', "--batch_size=-8: must be > 0"),
    ('--max_iters=-1', "--max_iters=-1: must be >= 0"),
    ('--learning_rate=0', "--learning_rate=0.0: must be > 0"),
    ('--min_lr=-1e-4', "--min_lr=-0.0001: must be >= 0"),
    ('--min_lr=0.1', "--min_lr=0.1: must be <= learning_rate (0.003)"),
    ('--weight_decay=-0.1', "--weight_decay=-0.1: must be >= 0"),
    ('--beta1=1.0', "--beta1=1.0: must be in [0, 1)"),
    ('--beta2=-0.5', "--beta2=-0.5: must be in [0, 1)"),
    ('--grad_clip=-1', "--grad_clip=-1.0: must be >= 0"),
    ('--warmup_iters=5000', "--warmup_iters=5000: must be < lr_decay_iters (5000)"),
    ('--lr_decay_iters=0', "--lr_decay_iters=0: must be > 0"),
    ('--seed=-1', "--seed=-1: must be >= 0"),
    ('--vocab_size=-1', "--vocab_size=-1: must be >= 0"),
    ('--out_dir=', "--out_dir='': must not be empty"),
    ('--init_from=gpt2', "--init_from='gpt2': must be 'scratch', 'resume', 'ckpt:PATH' or 'hf:DIR'"),
    ('--backend=mpi', "--backend='mpi': must be one of 'nccl', 'gloo'"),
    ('--dtype=float64', "--dtype='float64': must be 'float32', 'bfloat16' or 'float16'"),
    ('--device=tpu', "--device='tpu': no such device on this machine"),
    ('--device=cuda:99', "--device='cuda:99': no such device on this machine"),
    ('--n_layer=0', "ModelConfig.n_layer = 0: must be > 0"),
    ('--dropout=1.0', "ModelConfig.dropout = 1.0: must be in [0, 1)"),
    ('--eval_only=1', "configurator: --eval_only expects bool, got '1'"),
    ('--bacth_size=4', "configurator: unknown config key 'bacth_size' (did you mean 'batch_size'?)"),
    ('--memory_limit_gib=-1', "--memory_limit_gib=-1.0: must be >= 0"),
    ('--memory_limit_gib=big', "configurator: --memory_limit_gib expects float, got 'big'"),
    ('--fp8=True', "--fp8=True: needs --dtype=bfloat16 on a CUDA GPU of compute capability 9.0+"),  # MICRO: CPU
]
SAMPLE_BAD = [
    ('--num_samples=0', "--num_samples=0: must be > 0"),
    ('--max_new_tokens=-5', "--max_new_tokens=-5: must be > 0"),
    ('--temperature=-1', "--temperature=-1.0: must be >= 0"),
    ('--top_k=-1', "--top_k=-1: must be >= 0"),
    ('--top_p=0', "--top_p=0.0: must be in (0, 1]"),
    ('--top_p=1.5', "--top_p=1.5: must be in (0, 1]"),
    ('--cache_mode=paged', "--cache_mode='paged': must be one of 'latent', 'naive'"),
    ('--ckpt=newest', "--ckpt='newest': must be one of 'latest', 'best'"),
    ('--start=FILE:/missing/prompt.txt', "--start='FILE:/missing/prompt.txt': FILE: must name an existing file"),
    ('--dtype=int8', "--dtype='int8': must be"),
    ('--seed=-3', "--seed=-3: must be >= 0"),
    ('--temprature=0.5', "configurator: unknown config key 'temprature'"),
]
# eval.py and serve.py check the device and dtype as train.py and sample.py do (run as processes below)
OTHER_BAD = [(script, [arg], message) for script in ('eval.py', 'serve.py') for arg, message in [
    ('--device=tpu', "--device='tpu': no such device on this machine"),
    ('--device=cuda:99', "--device='cuda:99': no such device on this machine"),
    ('--dtype=float64', "--dtype='float64': must be 'float32', 'bfloat16' or 'float16'")]]
if not torch.cuda.is_available():
    TRAIN_BAD += [('--device=cuda', "--device='cuda': no such device on this machine (present: cpu"),
                  ('--backend=nccl', "--backend='nccl': needs CUDA GPUs; use --backend=gloo"),
                  ('--memory_limit_gib=24', "--memory_limit_gib=24.0: needs a CUDA device")]
    SAMPLE_BAD += [('--device=cuda', "--device='cuda': no such device on this machine")]


@pytest.mark.parametrize('script,arg,message',
                         [('train.py', *c) for c in TRAIN_BAD] + [('sample.py', *c) for c in SAMPLE_BAD])
def test_bad_flag_is_one_line_exit_2(tmp_path, monkeypatch, capsys, script, arg, message):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'ckpt.pt').write_bytes(b'another run')
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', [script, *MICRO, '--out_dir=run', '--overwrite=True', arg] if script == 'train.py'
                        else [script, '--out_dir=run', arg])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO / script), run_name='__main__')
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before


def test_bad_config_file_is_one_line(tmp_path, monkeypatch, capsys):
    for src, message in [("batch_size = 'big'\n", "expects int, got \"'big'\""),
                         ("n_layer = 2 +\n", 'SyntaxError'),
                         ("eval_interval = 0\n", "--eval_interval=0: must be > 0")]:
        (tmp_path / 'c.py').write_text(src)
        monkeypatch.setattr(sys, 'argv', ['train.py', str(tmp_path / 'c.py')])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(REPO / 'train.py'), run_name='__main__')
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


# the same, as the user sees it: a real process, exit code 2, no traceback, out_dir untouched
PROCESS_BAD = [
    ('train.py', ['--eval_interval=0'], "train.py: error: --eval_interval=0: must be > 0"),
    ('train.py', ['--fp8=True', '--dtype=float32'], "train.py: error: --fp8=True: needs --dtype=bfloat16"),
    ('train.py', ['--device=cuda:7'], "train.py: error: --device='cuda:7': no such device"),
    ('train.py', ['--n_layr=3'], "configurator: unknown config key 'n_layr'"),
    ('sample.py', ['--start=FILE:/missing'], "sample.py: error: --start='FILE:/missing': FILE: must name an existing"),
    ('sample.py', ['--temperature=-1'], "sample.py: error: --temperature=-1.0: must be >= 0"),
]
if torch.cuda.is_available():  # checked against the GPU's size once the process has its device
    PROCESS_BAD += [('train.py', ['--memory_limit_gib=100000'], "--memory_limit_gib=100000.0: more than the")]


@pytest.mark.parametrize('script,args,message', PROCESS_BAD + OTHER_BAD)
def test_bad_flag_process(work, script, args, message):
    before = snapshot(work / 'run')
    extra = [*MICRO, '--overwrite=True'] if script == 'train.py' else []
    assert_usage_error(run([str(REPO / script), *extra, '--out_dir=run', *args], work, check=False), message)
    assert snapshot(work / 'run') == before


# -----------------------------------------------------------------------------
# resume and overwrite

@pytest.mark.parametrize('args,message', [
    (['--n_layer=3'], "--n_layer=3 differs from the checkpoint's 2"),
    (['--n_embd=64', '--n_head=4'], "--n_embd=64 differs from the checkpoint's 32"),
    (['--block_size=64'], "--block_size=64 differs from the checkpoint's 32"),
])
def test_resume_refuses_another_architecture(work, args, message):
    before = snapshot(work / 'run')
    p = train(work, '--out_dir=run', '--init_from=resume', '--max_iters=4', *args, check=False)
    assert_usage_error(p, message)
    assert snapshot(work / 'run') == before


def test_resume_refuses_another_architecture_from_a_config_file(work, tmp_path):
    (tmp_path / 'bigger.py').write_text('n_layer = 4\n')
    before = snapshot(work / 'run')
    p = run([str(REPO / 'train.py'), str(tmp_path / 'bigger.py'), *MICRO[1:], '--out_dir=run', '--init_from=resume',
             '--max_iters=4'], work, check=False)
    assert_usage_error(p, "--n_layer=4 differs from the checkpoint's 2")
    assert snapshot(work / 'run') == before


@pytest.mark.parametrize('max_iters', [1, 2])
def test_resume_with_nothing_to_do(work, max_iters):
    before = snapshot(work / 'run')
    p = train(work, '--out_dir=run', '--init_from=resume', f'--max_iters={max_iters}')
    assert 'nothing to do' in p.stdout and 'is at step 2' in p.stdout
    assert snapshot(work / 'run') == before


def test_resume_takes_dropout_from_the_command_line_and_records_what_it_used(work):
    shutil.copytree(work / 'run', work / 'dropout')
    train(work, '--out_dir=dropout', '--init_from=resume', '--max_iters=3', '--eval_interval=3', '--dropout=0.1')
    ckpt = torch.load(work / 'dropout' / 'ckpt.pt', weights_only=False)
    assert ckpt['iter_num'] == 3 and ckpt['model_args']['dropout'] == 0.1
    assert all(ckpt['config'][k] == v for k, v in ckpt['model_args'].items())  # config says what the model is


def test_resume_from_a_checkpoint_train_py_did_not_write(work):
    (work / 'foreign').mkdir()
    ckpt = torch.load(work / 'run' / 'ckpt.pt', weights_only=False)
    torch.save({k: ckpt[k] for k in ('model', 'model_args', 'tokenizer')}, work / 'foreign' / 'ckpt.pt')
    before = snapshot(work / 'foreign')
    p = train(work, '--out_dir=foreign', '--init_from=resume', '--max_iters=4', check=False)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and 'Traceback' not in p.stderr
    assert 'not a checkpoint train.py wrote: it has no optimizer, scaler, rng, iter_num, best_val_loss, config' in p.stderr
    assert snapshot(work / 'foreign') == before


def test_scratch_run_refuses_an_out_dir_that_holds_a_run(work):
    before = snapshot(work / 'run')
    p = train(work, '--out_dir=run', '--max_iters=2', check=False)
    assert_usage_error(p, "--out_dir='run' already holds a run (ckpt.pt, best.pt, log.jsonl)")
    assert '--overwrite=True' in p.stderr and snapshot(work / 'run') == before


def test_overwrite_starts_clean(work):
    shutil.copytree(work / 'run', work / 'again')
    train(work, '--out_dir=again', '--max_iters=1', '--eval_interval=1', '--overwrite=True')
    assert [r['iter'] for r in records(work / 'again', 'eval')] == [0, 1]  # not appended to the old log
    for name in ('ckpt.pt', 'best.pt'):
        assert torch.load(work / 'again' / name, weights_only=False)['iter_num'] == 1


# -----------------------------------------------------------------------------
# kill -9 at any moment, checkpoint writes included, leaves loadable checkpoints


def test_kill_9_never_leaves_an_unloadable_checkpoint(work):
    out = work / 'killed'
    rng = random.Random(0)
    args = [sys.executable, str(REPO / 'train.py'), *MICRO, '--out_dir=killed', '--max_iters=100000',
            '--eval_interval=1', '--always_save_checkpoint=True']
    during_write = 0
    for attempt in range(4):
        resume = ['--init_from=resume'] if (out / 'ckpt.pt').exists() else []
        for stale in out.glob('*.pt.*.tmp'):  # left by the last kill: only a fresh one marks a write under way
            stale.unlink()
        p = subprocess.Popen(args + resume, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, 'OMP_NUM_THREADS': '1'})
        try:
            deadline = time.time() + 60
            while not (out / 'ckpt.pt').exists() and time.time() < deadline:  # a run under way
                time.sleep(0.01)
            if attempt % 2 == 0:  # the moment a checkpoint is being written
                while not list(out.glob('*.pt.*.tmp')) and time.time() < deadline:
                    time.sleep(0.0005)
            else:  # any moment
                time.sleep(rng.uniform(0, 1.5))
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
        during_write += bool(list(out.glob('*.pt.*.tmp')))
        for which in ('latest', 'best') if (out / 'best.pt').exists() else ('latest',):
            model, ckpt = load_model(str(out), which)
            assert ckpt['iter_num'] >= 1 and sum(v.numel() for v in model.state_dict().values()) > 0
    assert during_write >= 1  # at least one kill landed inside a checkpoint write


# -----------------------------------------------------------------------------
# torchrun: every rank leaves only after rank 0's last checkpoint is written

DDP_REPEAT = int(os.environ.get('DDP_REPEAT', 3))  # tests/ddp_repeat.sh runs it 20 times


def test_torchrun_ends_cleanly_repeatedly(work):
    for i in range(DDP_REPEAT):
        out = f'ddp_end_{i}'
        p = run(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(REPO / 'train.py'),
                 str(REPO / 'config' / 'train_tiny.py'), '--device=cpu', '--backend=gloo', '--compile=False',
                 '--max_iters=10', '--eval_interval=5', '--eval_iters=2', '--gradient_accumulation_steps=2',
                 *MICRO, f'--out_dir={out}'], work, check=False)
        assert p.returncode == 0 and 'terminate called' not in p.stderr, (i, p.stderr[-3000:])
        evals = records(work / out, 'eval')
        assert [r['iter'] for r in evals] == [0, 5, 10]
        best = torch.load(work / out / 'best.pt', weights_only=False)
        assert torch.load(work / out / 'ckpt.pt', weights_only=False)['iter_num'] == 10
        assert best['best_val_loss'] == min(r['val'] for r in evals)  # the last improvement was saved
        shutil.rmtree(work / out)
