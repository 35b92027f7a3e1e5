"""Training speed, its CPU-checkable parts: the batched loader reads the very windows that the per-row loader
read; Muon orthogonalizes each expert's matrix, trains, and resumes exactly; the weights' bf16 copies
made once a step give autocast's losses; the new flags. On a CUDA GPU also: the CUDA-graph step
(compile_mode='reduce-overhead') against the eager step, and its resume; the copies under compile."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tests'))

from muon import Muon, orthogonalize  # noqa: E402
from prepare import (DOC_START, LOSS, mask_path, read_mask, read_shard, read_windows, sft_window,  # noqa: E402
                     write_mask, write_shard)
from test_train import MICRO, records, run, work  # noqa: E402,F401 (work is a fixture)

T = 16  # window length: block_size + 1


def per_row_windows(paths, ends, starts, doc_starts):
    """The loader as train.py had it before: a memmap per row, each row sliced on its own."""
    which = np.searchsorted(ends, starts, side='right')
    starts = starts - np.concatenate([[0], ends])[which]
    rows = []
    for s, i in zip(starts, which):
        data = read_shard(paths[i])
        if doc_starts is None:
            rows.append(data[s:s + T].astype(np.int64))
            continue
        k = np.searchsorted(doc_starts[i], s, side='right') - 1
        s = doc_starts[i][k] if k >= 0 else s
        rows.append(np.stack(sft_window(data[s:s + T], read_mask(mask_path(paths[i]))[s:s + T])))
    return np.stack(rows)


@pytest.mark.parametrize('instruction', [False, True])
def test_batched_loader_reads_the_per_row_windows(tmp_path, instruction):
    """Three shards of different lengths (one with no example start, for instruction data), the
    train.py rng scheme over several steps, micro-steps and ranks."""
    gen = np.random.default_rng(0)
    paths = []
    for n, length in enumerate((500, 90, 300)):
        paths.append(str(tmp_path / f'train_{n:03d}.bin'))
        write_shard(paths[-1], gen.integers(0, 65536, length))
        if instruction:
            flags = gen.integers(0, 2, length) * LOSS | (gen.random(length) < (0.05 if n != 1 else 0)) * DOC_START
            write_mask(mask_path(paths[-1]), flags)
    ends = np.cumsum([len(read_shard(p)) - T + 1 for p in paths])
    doc_starts = [np.flatnonzero(read_mask(mask_path(p)) & DOC_START) for p in paths] if instruction else None
    for step in range(4):
        for slot in range(3):  # rank * accumulation + micro_step
            starts = np.random.default_rng([1337, step, slot, 0]).integers(0, ends[-1], size=32)
            got = read_windows(paths, ends, starts, T, doc_starts)
            assert got.dtype == np.int64 and np.array_equal(got, per_row_windows(paths, ends, starts, doc_starts))


def test_muon_orthogonalizes_each_expert_on_its_own():
    g = torch.randn(4, 32, 12) * torch.tensor([1.0, 10.0, 0.1, 3.0])[:, None, None]  # tall, scales apart
    stacked = orthogonalize(g)
    assert torch.allclose(stacked, torch.stack([orthogonalize(m) for m in g]), atol=1e-5)
    singular = torch.linalg.svdvals(stacked)
    assert singular.min() > 0.6 and singular.max() < 1.25  # each expert's update: all directions alike
    w = torch.nn.Parameter(torch.zeros(4, 32, 12))
    opt = Muon([w], lr=0.1, momentum=0.0)
    w.grad = g
    opt.step()  # no momentum, no decay: the step is -lr * 0.2 sqrt(32) * the orthogonalized gradient
    assert torch.allclose(w.detach(), -0.1 * 0.2 * 32 ** 0.5 * stacked, atol=1e-6)


def train(cwd, *args, check=True, env=None):
    return run([str(REPO / 'train.py'), *MICRO, *args], cwd, check, env)


def test_muon_trains_and_resumes_exactly(work):
    muon = ['--optimizer=muon', '--eval_interval=4']
    train(work, '--out_dir=straight', '--max_iters=8', *muon)
    train(work, '--out_dir=resumed', '--max_iters=4', *muon)
    train(work, '--out_dir=resumed', '--max_iters=8', '--init_from=resume', *muon)
    evals = records(work / 'straight', 'eval')
    assert evals[-1]['val'] < evals[0]['val'] - 0.3
    straight = {r['iter']: r['loss'] for r in records(work / 'straight', 'train')}
    resumed = {r['iter']: r['loss'] for r in records(work / 'resumed', 'train')}
    assert all(straight[i] == resumed[i] for i in range(4, 8))
    ckpt = torch.load(work / 'resumed' / 'ckpt.pt', weights_only=False)
    assert set(ckpt['optimizer']) == {'adamw', 'muon'} and ckpt['config']['optimizer'] == 'muon'
    # the experts' stacked weights and the attention matrices are Muon's; embeddings and router AdamW's
    muon_shapes = {tuple(s['momentum_buffer'].shape) for s in ckpt['optimizer']['muon']['state'].values()}
    assert (4, 32, 16) in muon_shapes and (4, 16, 32) in muon_shapes and (4, 32) not in muon_shapes
    p = train(work, '--out_dir=resumed', '--max_iters=12', '--init_from=resume', check=False)
    assert p.returncode == 2 and "trained with 'muon'" in p.stderr


def step_losses(work, out_dir):
    return {r['iter']: r['loss'] for r in records(work / out_dir, 'train')}


def test_weights_cast_once_a_step_give_the_same_losses(work):
    """bf16 autocast with several micro-steps: the matmul weights' bf16 copies made once a step (and
    the micro-steps' bf16 gradients added into the float32 ones) give autocast's losses bit for bit, and
    the checkpoint holds the float32 weights under their own names."""
    bf16 = ['--dtype=bfloat16', '--gradient_accumulation_steps=3', '--max_iters=5', '--eval_interval=5']
    train(work, '--out_dir=cast_each', *bf16, '--cast_weights_once=False')
    train(work, '--out_dir=cast_once', *bf16)
    each, once = step_losses(work, 'cast_each'), step_losses(work, 'cast_once')
    assert sorted(once) == list(range(5)) and once == each
    a = torch.load(work / 'cast_each' / 'ckpt.pt', weights_only=False)['model']
    b = torch.load(work / 'cast_once' / 'ckpt.pt', weights_only=False)['model']
    assert a.keys() == b.keys() and all(b[k].dtype == a[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize('args, env, message', [
    (['--optimizer=sgd'], {}, "--optimizer='sgd': must be one of 'adamw', 'muon'"),
    (['--optimizer=muon', '--lora_rank=4'], {}, "LoRA's adapters train with 'adamw'"),
    (['--muon_momentum=1.0'], {}, "--muon_momentum=1.0: must be in [0, 1)"),
    (['--compile_mode=fast'], {}, "--compile_mode='fast': must be one of"),
    (['--compile_mode=reduce-overhead'], {'RANK': '0'}, "CUDA graphs take one process"),
    (['--compile_mode=reduce-overhead', '--gradient_accumulation_steps=2'], {}, "one micro-step per step"),
])
def test_bad_flags(work, args, env, message):
    p = train(work, '--out_dir=bad', *args, check=False, env=env)
    assert p.returncode == 2 and message in p.stderr and 'Traceback' not in p.stderr


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
GPU = ['--device=cuda', '--dtype=bfloat16', '--max_iters=8', '--eval_interval=4']


@cuda
def test_graph_step_matches_eager_and_resumes_exactly(work):
    """compile_mode='reduce-overhead' (forward and backward as CUDA graphs, one micro-step a step)
    against eager, in bf16; then a resumed graph run against the straight one. Embedding backward adds with atomics on GPU,
    so the resume is held to float noise rather than bit equality."""
    graph = ['--compile=True', '--compile_mode=reduce-overhead']
    train(work, '--out_dir=eager', *GPU)
    train(work, '--out_dir=graph', *GPU, *graph)
    train(work, '--out_dir=graph_resumed', *GPU, *graph, '--max_iters=4')
    train(work, '--out_dir=graph_resumed', *GPU, *graph, '--init_from=resume')
    eager, graphed, resumed = ({r['iter']: r['loss'] for r in records(work / d, 'train')}
                               for d in ('eager', 'graph', 'graph_resumed'))
    assert sorted(graphed) == list(range(8))
    assert all(abs(graphed[i] - eager[i]) < 2e-2 * eager[i] for i in range(8)), (eager, graphed)
    assert all(abs(resumed[i] - graphed[i]) < 1e-3 for i in range(8)), (graphed, resumed)


@cuda
def test_weights_cast_once_under_compile_match_autocast(work):
    """The same on the GPU under torch.compile, where w1|w3 run as one grouped matmul on the bf16
    copies too: inductor fuses the casts differently, so the losses agree to bf16 noise."""
    args = [*GPU, '--compile=True', '--gradient_accumulation_steps=2']
    train(work, '--out_dir=gpu_cast_each', *args, '--cast_weights_once=False')
    train(work, '--out_dir=gpu_cast_once', *args)
    each, once = step_losses(work, 'gpu_cast_each'), step_losses(work, 'gpu_cast_once')
    assert sorted(once) == list(range(8))
    assert all(abs(once[i] - each[i]) < 1e-2 * each[i] for i in range(8)), (each, once)
