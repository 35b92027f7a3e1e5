"""Fine-tuning on CPU: instruction data (chat template, loss on responses only, packed examples that
do not see each other), LoRA (only adapters train, merge = base + adapters, exact resume), a new
run from a checkpoint refusing contradicting model fields, and a small end-to-end: pretrain on a
copy task (from scratch,
on instruction data), LoRA-fine-tune to uppercase, held-out exact match before and after.
bench_finetune.py measures the same at a larger size; its CPU smoke run and train_1b.py's size are
checked here too."""
import itertools
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.bench_finetune import answers, chat, exact_match, write_chats  # noqa: E402
from checkpoint import CheckpointError, check_model_args, load_model  # noqa: E402
from lora import add_lora, lora_state_dict, merged_state_dict, num_trainable  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
import prepare  # noqa: E402
from prepare import END, chat_template, get_tokenizer, read_mask, read_shard, sft_window  # noqa: E402
from test_train import SHAKESPEARE, records, run  # noqa: E402

TINY = dict(vocab_size=64, block_size=64, n_layer=2, n_embd=32, n_head=2, kv_lora_rank=16, q_lora_rank=8,
            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, dense_inter_dim=64, moe_inter_dim=16,
            n_routed_experts=4, n_activated_experts=2)
E2E = ['--n_layer=2', '--n_embd=32', '--n_head=2', '--kv_lora_rank=16', '--qk_nope_head_dim=8',
       '--qk_rope_head_dim=8', '--v_head_dim=8', '--dense_inter_dim=64', '--moe_inter_dim=16',
       '--n_routed_experts=4', '--n_activated_experts=2', '--block_size=64', '--batch_size=16',
       '--compile=False', '--eval_iters=2', '--log_interval=1', '--warmup_iters=10', '--learning_rate=1e-2',
       '--min_lr=1e-3']
LETTERS = 'abcdefgh'


# -----------------------------------------------------------------------------
# instruction data

def test_chat_template_ends_with_the_assistant_header():
    prompt = chat_template([{'role': 'system', 'content': 'be brief'}, *chat('hi')])
    assert prompt == '<|system|>\nbe brief<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n'
    full = chat_template(chat('hi', 'yo'))
    assert full.startswith(prompt[len('<|system|>\nbe brief<|end|>\n'):]) and full.endswith('yo<|end|>\n')
    with pytest.raises(ValueError, match='message 0'):
        chat_template([{'role': 'robot', 'content': 'x'}])


def test_prepare_writes_masks_over_responses_only(tmp_path):
    rows = [{'instruction': f'say {w}', 'input': 'now' if i % 2 else '', 'output': w.upper()}
            for i, w in enumerate(['ab', 'cd', 'ef', 'gh'])]
    (tmp_path / 'a.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    prepare.main(['sft', '--input', str(tmp_path / 'a.jsonl'), '--format=alpaca', '--tokenizer=char',
                  '--val_fraction=0.25', '--out_dir', str(tmp_path / 'data')])
    out = tmp_path / 'data' / 'sft'
    _, decode = get_tokenizer(json.loads((out / 'meta.json').read_text())['tokenizer'])
    tokens, flags = read_shard(out / 'train_000.bin'), read_mask(out / 'train_000.mask.bin')
    assert len(tokens) == len(flags)
    text = decode(tokens.tolist())
    assert text == ''.join(chat_template(prepare.alpaca_messages(r)) for r in rows[:3])
    trained = ''.join(c for c, f in zip(text, flags) if f & prepare.LOSS)
    assert trained == f'AB{END}CD{END}EF{END}'
    starts = np.flatnonzero(flags & prepare.DOC_START)
    assert [text[s:s + 8] for s in starts] == ['<|user|>'] * 3 and starts[0] == 0
    # train.py's window: targets are -1 exactly where the next token carries no loss
    x, y, doc_ids = sft_window(tokens[:40], flags[:40])
    assert (y == -1).tolist() == [not f & prepare.LOSS for f in flags[1:40]]
    assert (y[y >= 0] == tokens[1:40][y >= 0]).all() and doc_ids[0] == 1

    (tmp_path / 'bad.jsonl').write_text(json.dumps(rows[0]) + '\n{"instruction": "x"}\n')
    p = run([str(ROOT / 'prepare.py'), 'bad', '--input', str(tmp_path / 'bad.jsonl'), '--format=alpaca'],
            tmp_path, check=False)
    assert p.returncode != 0 and 'bad.jsonl:2:' in p.stderr and 'Traceback' not in p.stderr


def test_prompt_tokens_carry_no_loss():
    """Only response targets count: the loss is their mean cross-entropy, the logits at prompt
    positions get no gradient, and changing what the prompt targets would be changes nothing."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY))
    tokens = torch.randint(1, 60, (2, 33))
    flags = torch.zeros(2, 33, dtype=torch.long)
    flags[:, 0] = prepare.DOC_START
    flags[:, 20:28] = prepare.LOSS
    x, y, doc_ids = (torch.from_numpy(np.stack(a)) for a in zip(*map(sft_window, tokens, flags)))
    logits, _, stats = model(x, y, doc_ids=doc_ids)
    logits.retain_grad()
    stats['ce'].backward()
    response = y >= 0
    assert response.sum() == 2 * 8
    expected = torch.nn.functional.cross_entropy(logits[response], y[response])
    assert torch.allclose(stats['ce'], expected)
    assert (logits.grad[~response] == 0).all() and (logits.grad[response] != 0).any()
    other = tokens.clone()
    other[:, 1:20] = (other[:, 1:20] + 7) % 60  # other prompt targets, same inputs
    y2 = torch.from_numpy(np.stack([sft_window(t, f)[1] for t, f in zip(other, flags)]))
    assert torch.equal(model(x, y2, doc_ids=doc_ids)[2]['ce'], stats['ce'])


def test_packed_examples_do_not_attend_to_each_other():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY)).eval()
    idx = torch.randint(0, 64, (1, 40))
    doc_ids = torch.tensor([[0] * 15 + [1] * 25])
    changed = idx.clone()
    changed[0, :15] = (changed[0, :15] + 1) % 64  # another first example
    logits = lambda i, d: model(i, torch.zeros_like(i), doc_ids=d)[0][0, 15:]
    assert torch.allclose(logits(idx, doc_ids), logits(changed, doc_ids), atol=1e-6, rtol=0)
    assert not torch.allclose(logits(idx, None), logits(changed, None), atol=1e-3)  # without: it leaks
    alone = model(idx[:, 15:], torch.zeros_like(idx[:, 15:]))[0][0]  # RoPE is relative: same as unpacked
    assert torch.allclose(logits(idx, doc_ids), alone, atol=1e-4)


# -----------------------------------------------------------------------------
# LoRA, in process

def test_lora_trains_only_adapters_and_merges_to_the_same_logits():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**TINY))
    idx = torch.randint(0, 64, (4, 32))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_logits = model(idx, idx)[0]
    adapted = add_lora(model, rank=4, alpha=8.0, dropout=0.0,
                       targets=['wq_a', 'wq_b', 'wkv_a', 'wkv_b', 'wo', 'w1', 'w2', 'w3'])
    assert 'layers.1.ffn.w1' in adapted and 'layers.1.ffn.shared_experts.w2' in adapted  # routed + shared
    assert not any(a.startswith('mtp.') for a in adapted)
    assert torch.equal(model(idx, idx)[0], base_logits)  # B = 0: the start equals the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))
    assert 0 < num_trainable(model) < sum(p.numel() for p in model.parameters())
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), 'cpu')
    for _ in range(3):
        model(idx, idx)[1].backward()
        opt.step()
        opt.zero_grad()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    assert all(not torch.equal(v, 0 * v) for k, v in lora_state_dict(model).items() if k.endswith('.B'))
    model.eval()
    lora_logits = model(idx, idx)[0]
    merged = Transformer(ModelConfig(**TINY)).eval()
    merged.load_state_dict(merged_state_dict(model))
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)
    assert torch.allclose(merged(idx, idx)[0], lora_logits, atol=1e-5, rtol=1e-5)
    with torch.autocast('cpu', torch.bfloat16):  # rank 4 in bf16: 8-byte rows, which grouped matmuls refuse unpadded
        logits, loss, _ = model(idx, idx)
    loss.backward()
    assert (logits.float() - lora_logits).norm() < 0.02 * lora_logits.norm()
    assert model.layers[1].ffn.lora_w1.A.grad is not None


def test_check_model_args():
    ckpt = {'n_layer': 2, 'n_embd': 32, 'dropout': 0.0}
    given = {'n_layer': 3, 'n_embd': 32, 'dropout': 0.1}
    with pytest.raises(CheckpointError, match='n_layer=3 differs'):
        check_model_args(ckpt, given, {'n_layer', 'dropout'})
    assert check_model_args(ckpt, given, {'n_embd', 'dropout'}) == {'n_layer': 2, 'n_embd': 32, 'dropout': 0.1}


# -----------------------------------------------------------------------------
# end to end through prepare.py, train.py, convert.py merge

@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A model trained from scratch to copy mixed-case strings (chats, loss on the answers), and an
    instruction set that asks for the uppercase instead, in the same char vocabulary."""
    d = tmp_path_factory.mktemp('ft')
    rng = random.Random(0)
    copies = [''.join(rng.choice(LETTERS + LETTERS.upper()) for _ in range(3)) for _ in range(3000)]
    write_chats(d / 'copy.jsonl', ((s, s) for s in copies))
    words = [''.join(w) for w in itertools.product(LETTERS, repeat=3)]
    rng.shuffle(words)
    write_chats(d / 'upper.jsonl', ((w, w.upper()) for w in words[:400]))
    run([str(ROOT / 'prepare.py'), 'copy', '--input', str(d / 'copy.jsonl'), '--format=chat', '--tokenizer=char'], d)
    run([str(ROOT / 'prepare.py'), 'upper', '--input', str(d / 'upper.jsonl'), '--format=chat',
         '--tokenizer_from=data/copy'], d)
    t0 = time.time()
    run([str(ROOT / 'train.py'), *E2E, '--dataset=copy', '--out_dir=base', '--max_iters=300',
         '--lr_decay_iters=300', '--eval_interval=300'], d)
    return d, words[400:450], time.time() - t0


def finetune(d, *args, check=True):
    return run([str(ROOT / 'train.py'), *E2E, '--dataset=upper', '--init_from=ckpt:base', *args], d, check)


def test_contradicting_model_field_refused(pretrained):
    d, _, _ = pretrained
    p = finetune(d, '--out_dir=bad', '--n_layer=3', '--max_iters=1', check=False)
    assert p.returncode != 0 and 'n_layer=3 differs' in p.stderr and 'Traceback' not in p.stderr


def test_lora_resume_is_exact(pretrained):
    d, _, _ = pretrained
    lora = ['--lora_rank=4', '--lora_dropout=0.1', '--eval_interval=4']
    finetune(d, '--out_dir=straight', '--max_iters=8', *lora)
    finetune(d, '--out_dir=resumed', '--max_iters=4', *lora)
    run([str(ROOT / 'train.py'), *E2E, '--dataset=upper', '--out_dir=resumed', '--max_iters=8',
         '--eval_interval=4', '--init_from=resume'], d)
    straight = {r['iter']: r['loss'] for r in records(d / 'straight', 'train')}
    resumed = {r['iter']: r['loss'] for r in records(d / 'resumed', 'train')}
    assert all(straight[i] == resumed[i] for i in range(4, 8))
    a = torch.load(d / 'straight' / 'ckpt.pt', weights_only=False)
    b = torch.load(d / 'resumed' / 'ckpt.pt', weights_only=False)
    assert all(k.endswith(('.A', '.B')) for k in a['model'])  # the adapters alone
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])


def test_lora_finetune_learns_the_task(pretrained):
    d, held_out, pretrain_s = pretrained
    before = exact_match(d / 'base', held_out, str.upper)
    copies = exact_match(d / 'base', held_out, str)
    t0 = time.time()
    finetune(d, '--out_dir=lora', '--lora_rank=8', '--lora_targets=wq,wkv_a,wkv_b,wo,w1,w2,w3',
             '--max_iters=100', '--lr_decay_iters=100', '--eval_interval=100')
    finetune_s = time.time() - t0
    after = exact_match(d / 'lora', held_out, str.upper)
    ckpt = torch.load(d / 'lora' / 'ckpt.pt', weights_only=False)
    n_adapter = sum(v.numel() for v in ckpt['model'].values())
    n_base = sum(v.numel() for v in load_model(d / 'base')[0].parameters())
    print(f"\nheld-out exact match (uppercase): {before:.0%} before, {after:.0%} after LoRA "
          f"(the base copies {copies:.0%}); trainable {n_adapter:,} of {n_base + n_adapter:,} "
          f"({n_adapter / (n_base + n_adapter):.1%}); pretrain {pretrain_s:.0f}s, LoRA {finetune_s:.0f}s")
    assert after >= before + 0.5
    # the merged checkpoint needs no base and answers the same
    run([str(ROOT / 'convert.py'), 'merge', '--out_dir=lora', '--to=merged'], d)
    assert 'lora' not in torch.load(d / 'merged' / 'ckpt.pt', weights_only=False)
    assert answers(d / 'merged', held_out) == answers(d / 'lora', held_out)


def test_full_finetune_with_activation_checkpointing_matches(pretrained):
    """A full fine-tune from the checkpoint; recomputing each block in the backward changes the
    memory, not the numbers."""
    d, _, _ = pretrained
    finetune(d, '--out_dir=full', '--max_iters=3', '--eval_interval=3', '--dropout=0.1')
    finetune(d, '--out_dir=full_ac', '--max_iters=3', '--eval_interval=3', '--dropout=0.1',
             '--activation_checkpointing=True')
    plain, recomputed = records(d / 'full', 'train'), records(d / 'full_ac', 'train')
    assert [r['loss'] for r in plain] == [r['loss'] for r in recomputed] and len(plain) == 3
    a = torch.load(d / 'full' / 'ckpt.pt', weights_only=False)
    assert 'lora' not in a and a['model_args']['dropout'] == 0.1  # a training field may change


def test_adapters_refuse_a_changed_base(pretrained):
    d, _, _ = pretrained
    finetune(d, '--out_dir=tiny_lora', '--lora_rank=2', '--max_iters=1', '--eval_interval=1')
    base = d / 'base' / 'ckpt.pt'
    saved = base.read_bytes()
    torch.save({**torch.load(base, weights_only=False), 'iter_num': -1}, base)
    try:
        with pytest.raises(CheckpointError, match='has changed since the adapters were trained'):
            load_model(d / 'tiny_lora')
    finally:
        base.write_bytes(saved)
    assert load_model(d / 'tiny_lora')[1]['lora']['config']['rank'] == 2


# -----------------------------------------------------------------------------
# bench_finetune.py (the H100 measurements) and config/train_1b.py

def test_bench_finetune_cpu_smoke(tmp_path):
    """Every part of the bench at toy sizes: the same train.py runs, stops, scoring and tables."""
    run([str(ROOT / 'benchmarks' / 'bench_finetune.py'), '--cpu_smoke', '--input', str(SHAKESPEARE), '--out=bench.md',
         '--work=runs'], tmp_path)
    table = (tmp_path / 'bench.md').read_text()
    rows = [[cell.strip() for cell in line.strip('|').split('|')] for line in table.splitlines()
            if line.startswith('| ') and not line.startswith('| run ')]
    assert len(rows) == 7 and 'failed' not in table and 'OOM' not in table, table
    assert all(row[1] for row in rows)  # trainable parameters, or the parameter counts
    lora = next(row for row in rows if row[0].startswith('LoRA'))
    assert ' -> ' in lora[2] and float(lora[1].split('(')[1].split('%')[0]) < 100
    for name in ('scale_full', 'scale_ac', 'scale_lora', 'big'):  # stopped at step 3's line, before any checkpoint
        assert [r['iter'] for r in records(tmp_path / 'runs' / name, 'train')] in ([0, 1, 2], [0, 1, 2, 3])
        assert not (tmp_path / 'runs' / name / 'ckpt.pt').exists()
    assert load_model(tmp_path / 'runs' / 'lora')[1]['lora']['config']['rank'] == 4


def test_train_1b_config_has_a_billion_parameters():
    settings = {}
    exec((ROOT / 'config' / 'train_1b.py').read_text(), {}, settings)
    with torch.device('meta'):  # no memory, no initialisation
        model = Transformer(ModelConfig.from_settings(settings, vocab_size=50304))
    assert model.num_params() >= 1.0e9 and model.num_params(active=True) < 0.2e9
    assert settings['activation_checkpointing']
