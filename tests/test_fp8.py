"""fp8.py: the fp8 matmuls against references, and a model trained with them.

Two references each time: the same matmul in float32 on the operands as they are (the rounding fp8
costs: e4m3 keeps 3 mantissa bits, so each element is off by up to 2^-4 relative and a product of
random operands by a few % in norm), and in float32 on the operands quantized and dequantized by
hand (the scaling and layouts: equal up to the bf16 output's rounding). CPU runs torch._scaled_mm's
CPU kernel, the same arithmetic as the GPU's; the GPU tests run the tensor-core paths."""
import pytest
import torch

import fp8
from model import ModelConfig, Transformer
from test_train import records, train, work  # noqa: F401 (work is a fixture)

E4M3_BOUND = 0.06   # |y8 - y| / |y| in norm, random operands (measured ~0.03-0.04)
BF16_BOUND = 1e-2   # bf16 output against the float32 sum of the same fp8 products


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def dequantized(x):
    x8, scale = fp8.quantize(x)
    return x8.float() * scale


def devices():
    return ['cpu'] + (['cuda'] if torch.cuda.is_available() and fp8.supported('cuda') else [])


@pytest.mark.parametrize('device', devices())
@pytest.mark.parametrize('M,K,N', [(1, 16, 16), (37, 48, 80), (256, 384, 1152), (100, 1408, 48)])
def test_mm_against_references(device, M, K, N):
    g = torch.Generator().manual_seed(M * K + N)
    a, b = (torch.randn(*s, generator=g).to(device) for s in ((M, K), (K, N)))
    a[0, :5] *= 50  # an outlier row: its own scale
    y = fp8.mm(a, b)
    assert y.dtype == torch.bfloat16 and y.shape == (M, N)
    assert rel(y, a @ b) < E4M3_BOUND
    assert rel(y, dequantized(a) @ dequantized(b.t()).t()) < BF16_BOUND


def test_quantize_is_exact_on_what_fp8_can_hold():
    """Power-of-two scales: values fp8 holds (times any power of two) come back bit for bit."""
    x = torch.tensor([[1.0, -0.5, 448.0, 0.0], [3.0, 2.0 ** -6, 0.0, -1.75]]) * 2.0 ** 10
    assert torch.equal(dequantized(x), x)
    assert torch.equal(dequantized(torch.zeros(3, 16)), torch.zeros(3, 16))  # no 0/0


@pytest.mark.parametrize('device', devices())
@pytest.mark.parametrize('M', [16, 37])  # 37 tokens: the weight gradient's contraction falls back to bf16
def test_linear_forward_and_gradients(device, M):
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 64, generator=g).to(device).requires_grad_()
    w = (torch.randn(96, 64, generator=g) / 8).to(device).requires_grad_()
    dy = torch.randn(M, 96, generator=g).to(device)
    y = fp8.Linear.apply(x, w)
    y.backward(dy.to(torch.bfloat16))
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    (xr @ wr.t()).backward(dy)
    assert rel(y, xr @ wr.t()) < E4M3_BOUND
    assert rel(x.grad, xr.grad) < E4M3_BOUND and rel(w.grad, wr.grad) < E4M3_BOUND
    dy16 = dy.to(torch.bfloat16).float()
    assert rel(x.grad, dequantized(dy16) @ dequantized(w.detach().t()).t()) < BF16_BOUND
    if M % 16 == 0:
        assert rel(w.grad, dequantized(dy16.t()) @ dequantized(x.detach().t()).t()) < BF16_BOUND


@pytest.mark.parametrize('device', [d for d in devices() if fp8.grouped_supported(d)])
def test_grouped_mm_with_ragged_and_empty_groups(device):
    """5 experts, 2 of them without a token, group sizes that are not multiples of anything."""
    g = torch.Generator().manual_seed(0)
    sizes = [7, 0, 30, 0, 3]
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32).to(device)
    M, K, N = sum(sizes), 48, 80
    x = torch.randn(M, K, generator=g).to(device).requires_grad_()
    w = (torch.randn(5, K, N, generator=g) / 7).to(device).requires_grad_()
    dy = torch.randn(M, N, generator=g).to(device)
    y = fp8.GroupedMM.apply(x, w, offsets)
    y.backward(dy.to(torch.bfloat16))
    ends = [0] + offsets.tolist()
    groups = [slice(s, e) for s, e in zip(ends, ends[1:])]
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.cat([xr[s] @ wr[e] for e, s in enumerate(groups)]).backward(dy)
    yr = torch.cat([x[s].detach() @ w[e].detach() for e, s in enumerate(groups)])
    assert rel(y, yr) < E4M3_BOUND and rel(x.grad, xr.grad) < E4M3_BOUND
    assert rel(w.grad, wr.grad) < BF16_BOUND  # bf16: see fp8.py
    assert torch.equal(w.grad[1], torch.zeros_like(w.grad[1])) and torch.equal(w.grad[3], torch.zeros_like(w.grad[3]))
    fake = torch.cat([dequantized(x.detach()[s]) @ dequantized(w.detach()[e].t()).t() for e, s in enumerate(groups)])
    assert rel(y, fake) < BF16_BOUND


MICRO = dict(n_layer=2, n_embd=32, n_head=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
             dense_inter_dim=64, moe_inter_dim=16, n_routed_experts=4, n_activated_experts=2, block_size=32,
             vocab_size=96, n_dense_layers=1, mtp_depth=1)


def test_use_fp8_swaps_what_fits_and_keeps_the_names():
    model = Transformer(ModelConfig(**MICRO))
    names = list(model.state_dict())
    kept = fp8.use_fp8(model)
    assert list(model.state_dict()) == names
    # wkv_a: 32 -> 16 + 8 outputs; everything else of the micro model is a multiple of 16
    assert kept == ['layers.0.attn.wkv_a.weight', 'layers.1.attn.wkv_a.weight', 'mtp.block.attn.wkv_a.weight']
    assert isinstance(model.head, fp8.FP8Linear) and isinstance(model.layers[0].ffn.w1, fp8.FP8Linear)
    assert model.layers[1].ffn.grouped_mm is fp8.expert_grouped_mm


def test_training_in_fp8_tracks_bf16():
    """20 AdamW steps of the micro model on one batch (a loss that falls fast), under bf16 autocast
    as train.py runs: the fp8 model's losses stay within 1% of the bf16 model's, from the same
    initial weights."""
    torch.manual_seed(0)
    ref = Transformer(ModelConfig(**MICRO))
    model = Transformer(ModelConfig(**MICRO))
    model.load_state_dict(ref.state_dict())
    fp8.use_fp8(model)
    idx = torch.randint(0, 96, (4, 33), generator=torch.Generator().manual_seed(1))
    curves = []
    for m in (ref, model):
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        losses = []
        for _ in range(20):
            with torch.autocast('cpu', torch.bfloat16):
                loss = m(idx[:, :-1], idx[:, 1:])[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    assert curves[0][-1] < 0.8 * curves[0][0]  # it learns
    assert all(abs(a - b) <= 0.01 * b for a, b in zip(curves[1], curves[0])), curves


gpu_fp8 = pytest.mark.skipif(not (torch.cuda.is_available() and fp8.supported('cuda')),
                             reason='needs a CUDA GPU of compute capability 9.0+')
GPU = ['--device=cuda', '--dtype=bfloat16', '--max_iters=20', '--eval_interval=10']


def losses(out_dir):
    return {r['iter']: r['loss'] for r in records(out_dir, 'train')}


@gpu_fp8
def test_train_py_in_fp8_tracks_bf16_compiled(work):
    """train.py as users run it on one GPU (compiled, CUDA graphs): --fp8=True's losses over 20 steps
    within 2% of bf16's from the same initial weights and batches."""
    train(work, '--out_dir=bf16', *GPU, '--compile=True')
    train(work, '--out_dir=fp8', *GPU, '--compile=True', '--fp8=True')
    bf16, low = losses(work / 'bf16'), losses(work / 'fp8')
    assert sorted(low) == list(range(20))
    assert all(abs(low[i] - bf16[i]) <= 0.02 * bf16[i] for i in range(20)), (bf16, low)


@gpu_fp8
def test_resume_in_fp8_is_exact(work):
    """A run cut at step 10 and resumed with --fp8=True repeats the straight run's losses (to the
    GPU's atomics in the embedding's backward), with gradient accumulation; its checkpoint is an
    ordinary one that a bf16 run loads."""
    accum = ['--fp8=True', '--gradient_accumulation_steps=2']
    train(work, '--out_dir=straight', *GPU, *accum)
    train(work, '--out_dir=resumed', *GPU, *accum, '--max_iters=10')
    train(work, '--out_dir=resumed', *GPU, *accum, '--init_from=resume')
    straight, resumed = losses(work / 'straight'), losses(work / 'resumed')
    assert sorted(resumed) == list(range(20))
    assert all(abs(resumed[i] - straight[i]) < 1e-3 for i in range(20)), (straight, resumed)
    train(work, '--out_dir=after', *GPU, '--init_from=ckpt:straight', '--max_iters=2')


def test_lora_on_an_fp8_base():
    """lora.py's adapters on an fp8 base: the base stays frozen (no weight gradient is computed),
    the adapters train in bf16, and the loss is the bf16 model's within 1%."""
    from lora import add_lora
    torch.manual_seed(0)
    plain, low = Transformer(ModelConfig(**MICRO)), Transformer(ModelConfig(**MICRO))
    low.load_state_dict(plain.state_dict())
    fp8.use_fp8(low)
    idx = torch.randint(0, 96, (4, 33), generator=torch.Generator().manual_seed(1))
    results = []
    for m in (plain, low):
        torch.manual_seed(1)  # the same adapters' initial values
        add_lora(m, rank=8, alpha=16, dropout=0.0, targets=['wq', 'wkv_b', 'wo', 'w1', 'w2', 'w3'])
        for name, p in m.named_parameters():
            if 'lora' in name:
                p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))  # B = 0 would hide them
        with torch.autocast('cpu', torch.bfloat16):
            loss = m(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        results.append(loss.item())
        assert all((p.grad is not None) == ('lora' in n) for n, p in m.named_parameters() if not n.startswith('mtp.'))
    assert abs(results[1] - results[0]) <= 0.01 * results[0], results
