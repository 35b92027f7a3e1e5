"""Sharded training on CPU (gloo, 2 processes under torchrun): FSDP2, expert parallelism and both
give one process's losses and weights on the same global batch; their DCP checkpoints resume
exactly, also in one plain process, and convert to the single file that sample.py reads."""
import os
import shutil

import pytest
import torch

from parallel import relink
from test_train import MICRO, REPO, records, run, train, work  # noqa: F401 (work is a fixture)

ARGS = ['--max_iters=6', '--eval_interval=3', '--gradient_accumulation_steps=2', '--backend=gloo']
SAVED_AT_6 = ['best.0000006.dcp', 'best.dcp', 'ckpt.0000006.dcp', 'ckpt.dcp']  # the links and what they point at


def torchrun(cwd, *args, check=True):
    return run(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(REPO / 'train.py'),
                *MICRO, *ARGS, *args], cwd, check=check)


def to_plain(cwd, out_dir):
    run([str(REPO / 'convert.py'), 'to_plain', f'--out_dir={out_dir}'], cwd)
    return torch.load(cwd / out_dir / 'ckpt.pt', weights_only=False)


def assert_same_run(cwd, sharded, plain, exact=False):
    """The same eval losses and final weights and AdamW moments (float tolerance unless exact)."""
    a, b = (torch.load(cwd / d / 'ckpt.pt', weights_only=False) for d in (sharded, plain))
    same = torch.equal if exact else lambda x, y: torch.allclose(x, y, rtol=1e-4, atol=1e-6)
    assert a['iter_num'] == b['iter_num'] == 6 and a['model'].keys() == b['model'].keys()
    for name, value in b['model'].items():
        assert same(a['model'][name], value), name
    for i, state in b['optimizer']['state'].items():
        assert same(a['optimizer']['state'][i]['exp_avg_sq'], state['exp_avg_sq']), i
    evals = [{r['iter']: (r['train'], r['val']) for r in records(cwd / d, 'eval')} for d in (sharded, plain)]
    assert sorted(evals[0]) == [0, 3, 6] and torch.allclose(*(torch.tensor([e[i] for i in (0, 3, 6)]) for e in evals))


@pytest.fixture(scope='module')
def single(work):
    train(work, *ARGS, '--out_dir=single')
    return work


@pytest.mark.parametrize('name,flags', [('fsdp', ['--fsdp=True']), ('ep', ['--ep=2']),
                                        ('fsdp_ep', ['--fsdp=True', '--ep=2'])])
def test_sharded_matches_one_process(single, name, flags):
    torchrun(single, f'--out_dir={name}', *flags)
    run_dir = single / name
    assert sorted(p.name for p in run_dir.glob('*.dcp')) == SAVED_AT_6
    assert not (run_dir / 'ckpt.pt').exists()
    to_plain(single, name)
    assert_same_run(single, name, 'single')
    assert records(run_dir, 'train')[-1]['load_imbalance'] == pytest.approx(
        records(single / 'single', 'train')[-1]['load_imbalance'])  # the loads are all-reduced


def test_sharded_checkpoint_resumes_and_samples(single):
    """3 steps with FSDP + EP, resumed to 6 by the same 2 processes (exactly the straight run) and by
    one plain process (one process's run); sample.py reads the plain file made from it."""
    torchrun(single, '--out_dir=half', '--fsdp=True', '--ep=2', '--max_iters=3')
    shutil.copytree(single / 'half', single / 'half_one', symlinks=True)
    p = run([str(REPO / 'sample.py'), '--out_dir=half', '--max_new_tokens=5'], single, check=False)
    assert p.returncode != 0 and 'python convert.py to_plain --out_dir=half' in p.stderr
    torchrun(single, '--out_dir=half', '--fsdp=True', '--ep=2', '--init_from=resume')
    assert sorted(p.name for p in (single / 'half').glob('*.dcp')) == SAVED_AT_6  # step 3's went
    if not (single / 'fsdp_ep' / 'ckpt.pt').exists():
        pytest.skip('needs the fsdp_ep run of test_sharded_matches_one_process')
    to_plain(single, 'half')
    assert_same_run(single, 'half', 'fsdp_ep', exact=True)
    train(single, *ARGS, '--out_dir=half_one', '--init_from=resume')
    assert not list((single / 'half_one').glob('*.dcp'))  # the plain checkpoint replaced the sharded one
    assert_same_run(single, 'half_one', 'single')
    p = run([str(REPO / 'sample.py'), '--out_dir=half', '--start=ROMEO:', '--max_new_tokens=20'], single)
    assert 'ROMEO:' in p.stdout


def test_ep_with_every_token_on_one_expert(work):
    """Rank 1 owns experts 2 and 3 and receives no token at all: it still steps with everyone."""
    run(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(REPO / 'tests' / 'ddp_check.py'),
         *MICRO, *ARGS, '--max_iters=2', '--eval_interval=2', '--n_activated_experts=1', '--ep=2',
         '--out_dir=onexpert'],
        work, env={'FORCE_ONE_EXPERT': '1'})
    state = torch.load(work / 'onexpert' / 'state.pt')
    assert state['world_size'] == 2 and state['loads_seen'][:, 1:].sum() == 0
    assert records(work / 'onexpert', 'eval')[-1]['val'] < records(work / 'onexpert', 'eval')[0]['val']


@pytest.mark.parametrize('args,message', [
    (['--fsdp=True'], '--fsdp=True: needs torchrun'),
    (['--ep=3'], '--ep=3: must divide n_routed_experts (4)'),
    (['--ep=2'], '--ep=2: needs torchrun'),
])
def test_sharding_flags_without_torchrun(work, args, message):
    p = train(work, *args, check=False)
    assert p.returncode == 2 and message in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_to_plain_without_a_sharded_checkpoint(work):
    p = run([str(REPO / 'convert.py'), 'to_plain', '--out_dir=nowhere'], work, check=False)
    assert p.returncode == 1 and 'no sharded checkpoint at nowhere' in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_ep_must_divide_the_processes(work):
    p = torchrun(work, '--out_dir=ep4', '--ep=4', check=False)
    assert p.returncode != 0 and '--ep=4: must divide the number of processes (2)' in p.stderr


def test_plain_resume_into_a_sharded_run_is_refused(single):
    env = {'RANK': '0', 'LOCAL_RANK': '0', 'WORLD_SIZE': '1', 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '29998'}
    p = run([str(REPO / 'train.py'), *MICRO, *ARGS, '--out_dir=single', '--init_from=resume', '--fsdp=True'],
            single, check=False, env=env)
    assert p.returncode == 2 and 'reads a sharded checkpoint' in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_relink_moves_links_atomically_and_drops_what_no_link_holds(tmp_path):
    for name in ('ckpt.0000003.dcp', 'ckpt.0000006.dcp', 'best.0000003.dcp', 'ckpt.0000009.dcp'):
        (tmp_path / name).mkdir()
    relink(tmp_path, 'latest', 'ckpt.0000003.dcp')
    relink(tmp_path, 'best', 'ckpt.0000003.dcp')
    relink(tmp_path, 'latest', 'ckpt.0000006.dcp')
    assert os.readlink(tmp_path / 'ckpt.dcp') == 'ckpt.0000006.dcp' and (tmp_path / 'ckpt.0000003.dcp').is_dir()
    relink(tmp_path, 'best', 'best.0000003.dcp')  # ckpt.0000003 is held by no link now
    relink(tmp_path, 'latest')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['best.0000003.dcp', 'best.dcp', 'ckpt.0000009.dcp']
