"""README's commands, run as a user would, top to bottom, in one fresh directory on a CPU. Training
runs are cut to a few steps and the larger configs to a tiny model (the flags appended below); the
commands that need a network, a GPU, a server or hours are listed with the reason they are not run
here, and every command README holds is in one list or the other."""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt'
STEPS = ' --max_iters=2 --eval_interval=2 --eval_iters=1 --log_interval=1 --warmup_iters=1 --lr_decay_iters=10'
TINY = (' --n_layer=2 --n_embd=32 --n_head=2 --kv_lora_rank=16 --qk_nope_head_dim=8 --qk_rope_head_dim=8'
        ' --v_head_dim=8 --dense_inter_dim=64 --moe_inter_dim=16 --n_routed_experts=4 --n_activated_experts=2'
        ' --block_size=32 --batch_size=4')
SHORT = ' --max_new_tokens=10'
# what the test appends to a README command, by a pattern the command matches (first match wins)
SHRINK = [
    (r'train\.py config/train_shakespeare(_char)?\.py --init_from=resume', TINY + STEPS.replace('=2 ', '=3 ', 1)),
    (r'train\.py config/train_shakespeare', TINY + STEPS),
    (r'train\.py', STEPS),
    (r'sample\.py', SHORT),
    (r'eval\.py', ' --bench_iters=0 --decode_tokens=0'),  # no throughput figures: seconds each on a CPU
]
NOT_RUN = {  # pattern -> why not here
    r'^pip install': 'the install itself (CI has run it)',
    r'-m pytest': 'this very test suite',
    r'--hf HuggingFaceFW': 'downloads from the Hugging Face hub',
    r'--lm_eval_tasks|^lm_eval ': "lm-eval's tasks download their data (tests/test_eval.py runs a local task)",
    r'--compile=True': 'compiles the decode step: minutes on a CPU (GPU tests cover it)',
    r'^python serve\.py|^curl ': 'a running server (tests/test_serve.py covers every endpoint)',
    r'convert\.py random': 'writes 31 GB (tests/test_hf.py runs the same path at a small size)',
    r'^torchrun ': 'several GPUs (tests/test_train.py and tests/test_parallel.py run DDP, FSDP2 and EP on CPUs)',
    r'convert\.py to_plain': "a sharded run's checkpoint (tests/test_parallel.py)",
}


def readme_commands():
    """Each shell command in README's sh blocks, in order, with `&&` chains split and comments cut."""
    text = (REPO / 'README.md').read_text()
    lines = [line for block in re.findall(r'```sh\n(.*?)```', text, re.S) for line in block.replace('\\\n', ' ').splitlines()]
    commands = [part.strip() for line in lines if line.strip() and not line.startswith('#')
                for part in re.sub(r'\s{2,}#\s.*$', '', line).split(' && ')]
    return [c for c in commands if c]


def not_run(command):
    return next((why for pattern, why in NOT_RUN.items() if re.search(pattern, command)), None)


def shrink(command):
    return next((extra for pattern, extra in SHRINK if re.search(pattern, command)), '')


def test_every_readme_command_is_run_or_says_why_not():
    commands = readme_commands()
    assert len(commands) > 25
    runnable = [c for c in commands if not not_run(c)]
    assert all(re.match(r'(python|printf) ', c) for c in runnable), [c for c in runnable if not c.startswith(('python', 'printf'))]


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason='needs ../shared/data/tinyshakespeare/input.txt')
def test_readme_commands_run_in_order(tmp_path):
    (tmp_path / 'data' / 'tinyshakespeare').mkdir(parents=True)
    shutil.copy(SHAKESPEARE, tmp_path / 'data' / 'tinyshakespeare' / 'input.txt')  # prepare.py's offline cache
    (tmp_path / 'config').symlink_to(REPO / 'config')  # the commands run where a checkout's config/ is
    for command in readme_commands():
        if not_run(command):
            continue
        line = re.sub(r'^python (\S+\.py)', rf'{sys.executable} {REPO}/\1', command) + shrink(command)
        line = re.sub(r'^python -c', f'{sys.executable} -c', line)
        t0 = time.time()
        p = subprocess.run(['bash', '-c', line], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={'PATH': '/usr/bin:/bin', 'HOME': str(tmp_path), 'HF_HUB_OFFLINE': '1',
                                'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '2')})  # conftest.py's
        assert p.returncode == 0, f"{command}\n{p.stdout[-1500:]}\n{p.stderr[-3000:]}"
        print(f"{time.time() - t0:6.1f} s  {command[:100]}")
    assert (tmp_path / 'out-merged' / 'ckpt.pt').exists() and (tmp_path / 'hf-v3' / 'config.json').exists()


def test_readme_test_line_is_the_one_ci_runs():
    line = next(c for c in (REPO / 'README.md').read_text().splitlines() if '-m pytest' in c)
    assert line.startswith('pip install') and line in (REPO / '.ci' / 'run').read_text()
