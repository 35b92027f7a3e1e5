import json
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGURATOR = Path(__file__).resolve().parents[1] / 'configurator.py'

# a stand-in for train.py: globals, then the configurator, then report what they ended up as
SCRIPT = f"""
import json
batch_size = 12
learning_rate = 6e-4
compile = True
dtype = 'bfloat16'
betas = (0.9, 0.95)
exec(open({str(CONFIGURATOR)!r}).read())
print('CONFIG', json.dumps(dict(batch_size=batch_size, learning_rate=learning_rate, compile=compile,
                                dtype=dtype, betas=betas, names=sorted(k for k in globals() if not k.startswith('__')))))
"""


@pytest.fixture
def run(tmp_path):
    script = tmp_path / 'train_like.py'
    script.write_text(SCRIPT)
    def run(*args):
        r = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        config = [json.loads(line[len('CONFIG '):]) for line in r.stdout.splitlines() if line.startswith('CONFIG ')]
        return r, (config[0] if config else None)
    return run


def test_no_args_changes_nothing_and_leaks_no_names(run):
    r, c = run()
    assert r.returncode == 0, r.stderr
    assert c['batch_size'] == 12 and c['learning_rate'] == 6e-4 and c['compile'] is True and c['dtype'] == 'bfloat16'
    assert c['names'] == ['batch_size', 'betas', 'compile', 'dtype', 'json', 'learning_rate', 'sys']


def test_overrides_of_each_type(run):
    r, c = run('--batch_size=32', '--learning_rate=1e-3', '--compile=False', '--dtype=float16', '--betas=(0.8, 0.99)')
    assert r.returncode == 0, r.stderr
    assert (c['batch_size'], c['learning_rate'], c['compile'], c['dtype'], c['betas']) == (32, 1e-3, False, 'float16', [0.8, 0.99])
    assert 'Overriding: batch_size = 32' in r.stdout


def test_int_accepted_for_float_and_string_kept_raw(run):
    r, c = run('--learning_rate=1', '--dtype=123')
    assert r.returncode == 0, r.stderr
    assert c['learning_rate'] == 1.0 and 'Overriding: learning_rate = 1.0' in r.stdout
    assert c['dtype'] == '123'


@pytest.mark.parametrize('arg, message', [
    ('--batch_size=abc', "configurator: --batch_size expects int, got 'abc'"),
    ('--batch_size=1.5', "configurator: --batch_size expects int, got '1.5'"),
    ('--batch_size=True', "configurator: --batch_size expects int, got 'True'"),
    ('--compile=0', "configurator: --compile expects bool, got '0'"),
    ('--learning_rate=fast', "configurator: --learning_rate expects float, got 'fast'"),
    ('--batchsize=3', "configurator: unknown config key 'batchsize' (did you mean 'batch_size'?)"),
    ('--zzz=3', "configurator: unknown config key 'zzz'"),
    ('--compile', "configurator: expected --key=value, got '--compile'"),
])
def test_bad_arguments_fail_with_one_line(run, arg, message):
    r, c = run(arg)
    assert r.returncode != 0 and c is None
    assert r.stderr.strip() == message


def test_config_file(run, tmp_path):
    (tmp_path / 'cfg.py').write_text("import math\nbatch_size = 2 * 3\n_scratch = 1\ndtype = 'float32'\n")
    r, c = run('cfg.py', '--dtype=float16')  # later arguments win
    assert r.returncode == 0, r.stderr
    assert c['batch_size'] == 6 and c['dtype'] == 'float16'
    assert 'Overriding config with cfg.py' in r.stdout


def test_config_file_with_unknown_key_fails(run, tmp_path):
    (tmp_path / 'cfg.py').write_text('batch_size = 4\nlearning_rat = 0.1\n')
    r, c = run('cfg.py')
    assert r.returncode != 0 and c is None
    assert r.stderr.strip() == "configurator: cfg.py: unknown config key 'learning_rat' (did you mean 'learning_rate'?)"


def test_missing_config_file_fails(run):
    r, c = run('nope.py')
    assert r.returncode != 0 and c is None
    assert r.stderr.strip() == "configurator: cannot read config file 'nope.py' (No such file or directory)"
