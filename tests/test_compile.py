"""Regional compilation (train.py's compile_regions, Transformer.compile_regions): each kind of block is
compiled once for all the layers of that kind; the compiled run gives eager's losses and resumes exactly; the
flag's rule. On a CUDA GPU also: the CUDA-graph step, block by block and of the whole model, against eager
in bf16, and its resume with dropout."""
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tests'))

import torch._inductor.compile_fx  # noqa: E402

from model import ModelConfig, Transformer  # noqa: E402
from test_train import MICRO, records, run, work  # noqa: E402,F401 (work is a fixture)


@pytest.mark.parametrize('recompute', [False, True])
def test_each_kind_of_block_compiles_once(monkeypatch, recompute):
    """Three layers (one dense, two MoE) and the MTP block (MoE), trained for two steps and evaluated
    twice: dynamo hands the compiler six graphs, whatever the number of layers: the dense block, the MoE
    block and the head's loss, each for training and for eval. With activation checkpointing too: the
    checkpoint is taken inside the compiled block.
    The compiler is the real torch.compile mode's, with inductor replaced by the graph itself (fast);
    bf16 autocast, where the experts' grouped matmul has no graph break."""
    graphs = []

    def compile_fx(gm, inputs, **kwargs):
        graphs.append(gm)
        return gm.forward
    monkeypatch.setattr(torch._inductor.compile_fx, 'compile_fx', compile_fx)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    cfg = ModelConfig(vocab_size=64, block_size=32, n_layer=3, n_embd=32, n_head=2, kv_lora_rank=16, qk_nope_head_dim=8,
                      qk_rope_head_dim=8, v_head_dim=8, dense_inter_dim=64, moe_inter_dim=16, n_routed_experts=4,
                      n_activated_experts=2, mtp_depth=1)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    for block in model.blocks():
        block.recompute = recompute
    model.compile_regions('default')
    batch = torch.randint(0, 64, (2, 33), device=device)
    x, y = batch[:, :-1], batch[:, 1:]  # views of one window, as train.py's batches
    for _ in range(2):
        with torch.autocast(device, torch.bfloat16):
            _, loss, _ = model(x, y, return_logits=False)
        loss.backward()
    model.eval()
    with torch.no_grad(), torch.autocast(device, torch.bfloat16):
        for _ in range(2):
            model(x, y, return_logits=False)  # as train.py's evaluation
    torch._dynamo.reset()
    assert len(model.blocks()) == 4 and len(graphs) == 6


def train(cwd, *args, check=True, env=None):
    return run([str(REPO / 'train.py'), *MICRO, '--mtp_depth=1', *args], cwd, check, env)


def losses(work, out_dir):
    return {r['iter']: r['loss'] for r in records(work / out_dir, 'train')}


def test_regional_compile_gives_eager_losses_and_resumes_exactly(work):
    """The micro model in float32 on CPU (inductor's C++ kernels; the first run compiles for a few
    minutes on two cores, inductor's cache serves the rest): the blocks compiled give eager's losses to
    1e-5 (fused kernels may sum in another order), and a resumed compiled run repeats the straight one
    bit for bit, its checkpoint included."""
    steps = ['--max_iters=6', '--eval_interval=3', '--compile_regions=True']
    train(work, '--out_dir=eager', *steps)  # compile=False (MICRO): the flag changes nothing there
    train(work, '--out_dir=regions', *steps, '--compile=True')
    train(work, '--out_dir=regions_resumed', *steps, '--compile=True', '--max_iters=3')
    train(work, '--out_dir=regions_resumed', *steps, '--compile=True', '--init_from=resume')
    eager, compiled, resumed = (losses(work, d) for d in ('eager', 'regions', 'regions_resumed'))
    assert sorted(compiled) == list(range(6))
    assert all(abs(compiled[i] - eager[i]) <= 1e-5 * eager[i] for i in range(6)), (eager, compiled)
    assert resumed == compiled
    a, b = (torch.load(work / d / 'ckpt.pt', weights_only=False)['model'] for d in ('regions', 'regions_resumed'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
GPU = ['--device=cuda', '--dtype=bfloat16', '--max_iters=8', '--eval_interval=4', '--compile_mode=reduce-overhead']


@cuda
@pytest.mark.parametrize('regions', [True, False])
def test_graph_step_matches_eager_and_resumes_exactly(work, regions):
    """compile_mode='reduce-overhead' with the MTP block, by regions (each block's and the loss's
    forward and backward as CUDA graphs, eager code between) and as the whole model's graphs: bf16
    losses within 2% of eager's; then, with dropout (random numbers drawn inside the graphs), a resumed
    run against the straight one. Embedding backward adds with atomics on a GPU, so the resume is held
    to float noise."""
    graph = [*GPU, '--compile=True', f'--compile_regions={regions}']
    name = 'regions' if regions else 'whole'
    train(work, f'--out_dir=eager_{name}', *GPU, '--compile=False')
    train(work, f'--out_dir=graph_{name}', *graph)
    eager, graphed = losses(work, f'eager_{name}'), losses(work, f'graph_{name}')
    assert sorted(graphed) == list(range(8))
    assert all(abs(graphed[i] - eager[i]) < 2e-2 * eager[i] for i in range(8)), (eager, graphed)
    train(work, f'--out_dir=dropout_{name}', *graph, '--dropout=0.1')
    train(work, f'--out_dir=dropout_resumed_{name}', *graph, '--dropout=0.1', '--max_iters=4')
    train(work, f'--out_dir=dropout_resumed_{name}', *graph, '--dropout=0.1', '--init_from=resume')
    straight, resumed = losses(work, f'dropout_{name}'), losses(work, f'dropout_resumed_{name}')
    assert sorted(resumed) == list(range(8))
    assert all(abs(resumed[i] - straight[i]) < 1e-3 for i in range(8)), (straight, resumed)
