"""train.py and sample.py end to end on CPU: a short run whose loss falls, exact resume, sampling,
the bad-input errors, and DDP under torchrun (gloo) against one process."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt'
MICRO = ['--n_layer=2', '--n_embd=32', '--n_head=2', '--kv_lora_rank=16', '--qk_nope_head_dim=8',
         '--qk_rope_head_dim=8', '--v_head_dim=8', '--dense_inter_dim=64', '--moe_inter_dim=16',
         '--n_routed_experts=4', '--n_activated_experts=2', '--block_size=32', '--batch_size=8',
         '--compile=False', '--eval_iters=2', '--log_interval=1', '--dataset=shakespeare_char',
         '--warmup_iters=2', '--learning_rate=3e-3', '--device=cpu', '--dtype=float32']  # the same on any machine


def run(args, cwd, check=True, env=None):
    p = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1', **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"{args} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def train(cwd, *args, check=True):
    return run([str(REPO / 'train.py'), *MICRO, *args], cwd, check)


def records(out_dir, kind):
    with open(Path(out_dir) / 'log.jsonl') as f:
        return [r for r in map(json.loads, f) if r['kind'] == kind]


@pytest.fixture(scope='module')
def work(tmp_path_factory):
    """A working directory with data/shakespeare_char prepared."""
    d = tmp_path_factory.mktemp('work')
    run([str(REPO / 'prepare.py'), 'shakespeare_char', '--input', str(SHAKESPEARE)], d)
    return d


@pytest.fixture(scope='module')
def trained(work):
    train(work, '--out_dir=run', '--max_iters=60', '--eval_interval=30')
    return work


def test_loss_falls_and_outputs_exist(trained):
    evals = records(trained / 'run', 'eval')
    assert [r['iter'] for r in evals] == [0, 30, 60]
    assert evals[-1]['val'] < evals[0]['val'] - 0.8
    train_rows = records(trained / 'run', 'train')
    assert all(k in train_rows[0] for k in ('ce', 'balance', 'z', 'mtp', 'lr', 'tokens_per_sec', 'load_imbalance'))
    for name in ('ckpt.pt', 'best.pt', 'loss.png'):
        assert (trained / 'run' / name).stat().st_size > 0
    assert not list((trained / 'run').glob('*.tmp'))
    ckpt = torch.load(trained / 'run' / 'ckpt.pt', weights_only=False)
    assert ckpt['iter_num'] == 60 and ckpt['tokenizer']['kind'] == 'char'
    assert not any(k.startswith('_orig_mod') for k in ckpt['model'])
    assert any(k.endswith('gate.bias') for k in ckpt['model'])  # the router biases travel too


def test_resume_is_exact(work):
    train(work, '--out_dir=straight', '--max_iters=8', '--eval_interval=4')
    train(work, '--out_dir=resumed', '--max_iters=4', '--eval_interval=4')
    train(work, '--out_dir=resumed', '--max_iters=8', '--eval_interval=4', '--init_from=resume')
    straight = {r['iter']: r['loss'] for r in records(work / 'straight', 'train')}
    resumed = {r['iter']: r['loss'] for r in records(work / 'resumed', 'train')}
    assert sorted(resumed) == list(range(8)) and all(straight[i] == resumed[i] for i in range(4, 8))
    a = torch.load(work / 'straight' / 'ckpt.pt', weights_only=False)['model']
    b = torch.load(work / 'resumed' / 'ckpt.pt', weights_only=False)['model']
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample(trained):
    p = run([str(REPO / 'sample.py'), '--out_dir=run', '--start=ROMEO:', '--max_new_tokens=40',
             '--num_samples=2', '--temperature=0.8'], trained)
    assert p.stdout.count('ROMEO:') >= 2 and 'tokens/s' in p.stdout
    greedy = [run([str(REPO / 'sample.py'), '--out_dir=run', '--start=KING', '--max_new_tokens=30', '--temperature=0',
                   f'--cache_mode={mode}', '--num_samples=1'], trained).stdout.split('\nKING', 1)[1] for mode in ('latent', 'naive')]
    assert greedy[0].split('---')[0] == greedy[1].split('---')[0]  # the latent cache decodes what the per-head cache decodes


@pytest.mark.parametrize('args,message', [
    (['--start=caf\u00e9'], "'\u00e9' at position 3 is not in the vocabulary"),
    (['--start='], 'prompt is empty'),
    (['--out_dir=nowhere'], 'no checkpoint at nowhere'),
    (['--ckpt=newest'], "--ckpt='newest': must be one of 'latest', 'best'"),
    (['--temprature=0.5'], "unknown config key 'temprature'"),
])
def test_sample_bad_input(trained, args, message):
    p = run([str(REPO / 'sample.py'), '--out_dir=run', *args], trained, check=False)
    assert p.returncode != 0 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_train_bad_input(work, tmp_path):
    p = train(work, '--bacth_size=4', check=False)
    assert p.returncode != 0 and "unknown config key 'bacth_size'" in p.stderr
    p = train(work, '--batch_size=four', check=False)
    assert p.returncode != 0 and 'expects int' in p.stderr
    p = train(work, '--dataset=nothing', check=False)
    assert p.returncode != 0 and 'python prepare.py nothing' in p.stderr
    p = train(work, '--kv_lora_rank=0', check=False)
    assert p.returncode != 0 and 'kv_lora_rank' in p.stderr
    p = train(work, '--out_dir=empty', '--init_from=resume', check=False)
    assert p.returncode != 0 and 'no checkpoint at empty/ckpt.pt' in p.stderr.replace(os.sep, '/')
    # a truncated shard is refused with its path
    bad = tmp_path / 'data' / 'shakespeare_char'
    shutil.copytree(work / 'data' / 'shakespeare_char', bad)
    with open(bad / 'val_000.bin', 'r+b') as f:
        f.truncate(5000)
    p = train(tmp_path, check=False)
    assert p.returncode != 0 and 'val_000.bin' in p.stderr and 'truncated' in p.stderr


def test_corrupt_checkpoint_and_nan_keep_the_last_good_one(work):
    train(work, '--out_dir=guard', '--max_iters=2', '--eval_interval=2')
    ckpt = work / 'guard' / 'ckpt.pt'
    good = ckpt.read_bytes()
    p = train(work, '--out_dir=guard', '--max_iters=6', '--eval_interval=2', '--init_from=resume',
              '--learning_rate=1e30', '--min_lr=1e30', '--grad_clip=0.0', check=False)
    assert p.returncode != 0 and 'nan' in p.stderr and 'checkpoint is untouched' in p.stderr
    assert ckpt.read_bytes() == good
    ckpt.write_bytes(good[:1000])
    p = train(work, '--out_dir=guard', '--init_from=resume', check=False)
    assert p.returncode != 0 and 'cannot read' in p.stderr


# -----------------------------------------------------------------------------
# DDP (gloo) on CPU

DDP_ARGS = ['--max_iters=6', '--eval_interval=3', '--gradient_accumulation_steps=2', '--backend=gloo']


def torchrun(cwd, nproc, *args, extra=(), env=None):
    return run(['-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', *extra,
                str(REPO / 'tests' / 'ddp_check.py'), *MICRO, *DDP_ARGS, *args], cwd, env=env)


def test_ddp_matches_one_process(work):
    torchrun(work, 2, '--out_dir=ddp', extra=['--standalone'])
    run([str(REPO / 'tests' / 'ddp_check.py'), *MICRO, *DDP_ARGS, '--out_dir=single'], work)
    ddp, single = torch.load(work / 'ddp' / 'state.pt'), torch.load(work / 'single' / 'state.pt')
    assert ddp['world_size'] == 2 and ddp['ranks_bitwise_equal'] and single['world_size'] == 1
    for name, value in single['state'].items():
        assert torch.allclose(ddp['state'][name], value, rtol=1e-4, atol=1e-6), name
    evals = [[(r['train'], r['val']) for r in records(work / d, 'eval')] for d in ('ddp', 'single')]
    assert len(evals[0]) == 3 and torch.allclose(torch.tensor(evals[0]), torch.tensor(evals[1]), rtol=1e-5)


def test_ddp_with_every_token_on_one_expert(work):
    torchrun(work, 2, '--out_dir=onexpert', '--n_activated_experts=1', extra=['--standalone'],
             env={'FORCE_ONE_EXPERT': '1'})
    state = torch.load(work / 'onexpert' / 'state.pt')
    assert state['ranks_bitwise_equal'] and state['loads_seen'][:, 1:].sum() == 0
    assert records(work / 'onexpert', 'eval')[-1]['val'] < records(work / 'onexpert', 'eval')[0]['val']


def test_two_nodes_on_one_machine(work):
    port = 29400 + os.getpid() % 500
    launch = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', '--nproc_per_node=1',
              '--rdzv_backend=c10d', f'--rdzv_endpoint=127.0.0.1:{port}', '--rdzv_id=ci',
              str(REPO / 'train.py'), *MICRO, '--max_iters=4', '--eval_interval=4', '--backend=gloo',
              '--gradient_accumulation_steps=2', '--out_dir=twonode']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    nodes = [subprocess.Popen(launch[:4] + [f'--node_rank={i}'] + launch[4:], cwd=work, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    outs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outs
    assert sorted(os.listdir(work / 'twonode')) == ['.lock', 'best.pt', 'ckpt.pt', 'expert_load.png', 'log.jsonl',
                                                    'loss.png']
    assert '(2 processes)' in outs[0] + outs[1]


def test_resume_with_another_world_size(work):
    """3 steps in one process, resumed under torchrun with 2: the same run as 6 steps straight."""
    run([str(REPO / 'tests' / 'ddp_check.py'), *MICRO, *DDP_ARGS, '--out_dir=straight6'], work)
    train(work, *DDP_ARGS, '--out_dir=regrown', '--max_iters=3')
    torchrun(work, 2, '--out_dir=regrown', '--init_from=resume', extra=['--standalone'])
    straight, regrown = torch.load(work / 'straight6' / 'state.pt'), torch.load(work / 'regrown' / 'state.pt')
    assert regrown['world_size'] == 2 and regrown['ranks_bitwise_equal']
    for name, value in straight['state'].items():
        assert torch.allclose(regrown['state'][name], value, rtol=1e-4, atol=1e-6), name
    final_val = [records(work / d, 'eval')[-1]['val'] for d in ('regrown', 'straight6')]
    assert final_val[0] == pytest.approx(final_val[1], rel=1e-5)


@pytest.mark.parametrize('backend,message', [('nccl', "--backend='nccl': needs CUDA GPUs"),
                                             ('mpi', "--backend='mpi': must be one of 'nccl', 'gloo'")])
def test_bad_backend_is_one_line(work, backend, message):
    if backend == 'nccl' and torch.cuda.is_available():
        pytest.skip('nccl is a valid backend where CUDA is present')
    env = {'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '1', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '29999'}
    p = run([str(REPO / 'train.py'), *MICRO, f'--backend={backend}'], work, check=False, env=env)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1
