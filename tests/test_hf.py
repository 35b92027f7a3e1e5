"""hf.py: our checkpoints <-> Hugging Face DeepSeek-V3/V2 directories. Round trips, transformers'
own loading, generation and saving, tokenizers, refusals, the command line and train.py's init_from.
(Logit parity over V3/V2, q_lora, YaRN and MTP is tests/test_reference.py.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf
from checkpoint import CheckpointError, load_model, lora_checkpoint_fields, save_checkpoint
from engine import Engine, SamplingParams
from lora import add_lora, lora_state_dict
from model import ModelConfig, Transformer
from prepare import get_tokenizer, train_bpe

transformers = pytest.importorskip('transformers')

REPO = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=96, block_size=32, n_layer=3, n_embd=32, n_head=2, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, n_dense_layers=1, dense_inter_dim=64, n_routed_experts=4,
            n_shared_experts=1, n_activated_experts=2, moe_inter_dim=16, n_expert_groups=2, n_limited_groups=1)
V3 = dict(score_func='sigmoid', mtp_depth=1, q_lora_rank=16, route_scale=2.5)
V2 = dict(score_func='softmax', bias_update_speed=0.0)
YARN = dict(rope_scaling_factor=4.0, rope_original_max_position=8, rope_mscale=0.707, rope_mscale_all_dim=0.707)
# sorted, as prepare.py writes it
CHARS = {'kind': 'char', 'chars': "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"}
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."


def tiny_model(**overrides):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            if model.cfg.score_func == 'sigmoid':
                moe.gate.bias.normal_(0.0, 0.1)
    return model


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('arch', [V3, V2], ids=['v3', 'v2'])
def test_round_trip_is_bitwise(arch, dtype, tmp_path):
    ours = tiny_model(**arch).to(dtype)
    hf.export(ours, CHARS, tmp_path, max_shard_size=20_000)  # several shards and an index
    assert len(list(tmp_path.glob('model-*-of-*.safetensors'))) > 1
    back, ckpt = load_model(str(tmp_path))
    assert ckpt['tokenizer'] == CHARS and ckpt['model_args'] == {**vars(ours.cfg), 'bias_update_speed': 0.001}
    assert all(p.dtype == dtype for p in back.parameters()), "bf16 weights stay bf16"
    theirs = back.state_dict()
    assert set(theirs) == set(ours.state_dict())
    for name, t in ours.state_dict().items():
        assert torch.equal(theirs[name], t), name


def test_mtp_is_dropped_where_v2_has_no_place_for_it(tmp_path):
    notes = hf.export(tiny_model(**V2, mtp_depth=1), CHARS, tmp_path)
    assert any('mtp_depth' in n for n in notes)
    assert load_model(str(tmp_path))[0].mtp is None


@pytest.mark.parametrize('arch', [V3, V2], ids=['v3', 'v2'])
def test_transformers_greedy_generate_matches_ours(arch, tmp_path):
    # no padded ids, so both argmax over the same set; YaRN through the latent cache and decode path
    ours = tiny_model(**arch, **YARN, vocab_size=len(CHARS['chars']))
    hf.export(ours, CHARS, tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, len(CHARS['chars']), (2, 6))
    requests = Engine(ours, CHARS, max_batch=2).generate(prompt.tolist(), SamplingParams(max_tokens=12, temperature=0))
    got = theirs.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert got[:, 6:].tolist() == [r.tokens for r in requests]


@pytest.mark.parametrize('kind', ['deepseek_v3', 'deepseek_v2'])
def test_transformers_save_pretrained_imports(kind, tmp_path):
    """Random weights saved by transformers itself (its per-expert names, its rope_parameters)."""
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                  num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None, kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, n_shared_experts=2,
                  num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, max_position_embeddings=32,
                  rope_parameters={'rope_type': 'yarn', 'rope_theta': 5000.0, 'factor': 4.0, 'beta_fast': 32,
                                   'beta_slow': 1, 'mscale': 0.707, 'mscale_all_dim': 0.707,
                                   'original_max_position_embeddings': 8})
    config = transformers.DeepseekV3Config(**common) if kind == 'deepseek_v3' else \
        transformers.DeepseekV2Config(**common, topk_method='group_limited_greedy')
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config).eval()
    if kind == 'deepseek_v3':  # transformers starts the selection bias at zero: make it matter
        with torch.no_grad():
            for layer in theirs.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.normal_(0.0, 0.1)
    theirs.save_pretrained(tmp_path)
    hf.save_tokenizer(CHARS, tmp_path, 32)
    ours, ckpt = load_model(str(tmp_path))
    if kind == 'deepseek_v3':  # its config says one MTP layer, its files hold none
        assert ours.mtp is None and ckpt['dropped']
    assert ours.cfg.rope_scaling_factor == 4.0 and ours.cfg.n_expert_groups == 2
    idx = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        ref = theirs(idx).logits
        err = ((ours(idx, targets=idx)[0] - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, f"max relative error {err:.2e}"


def test_random_directory_imports(tmp_path):
    """hf.py random's path (meta init, bf16, save_pretrained), with DeepSeek-V2-Lite's config shrunk."""
    tiny = dict(vocab_size=96, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
                n_routed_experts=8, max_position_embeddings=64)
    preset = {**hf.PRESETS['deepseek-v2-lite'], **tiny}
    preset['rope_parameters'] = {**preset['rope_parameters'], 'original_max_position_embeddings': 16, 'factor': 4.0}
    hf.random_dir(tmp_path, preset)
    ours, ckpt = load_model(str(tmp_path), block_size=32)
    assert ours.cfg.block_size == 32 and ours.head.weight.dtype == torch.bfloat16
    assert ckpt['tokenizer'] == {'kind': 'gpt2'}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = torch.randint(0, 96, (1, 32))
    with torch.no_grad():
        ref = theirs(idx).logits
        err = ((ours.float()(idx, targets=idx)[0] - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, f"max relative error {err:.2e}"


@pytest.mark.parametrize('kind', ['char', 'gpt2', 'hf'])
def test_tokenizer_round_trips(kind, tmp_path):
    desc = {'char': CHARS, 'gpt2': {'kind': 'gpt2'}, 'hf': {'kind': 'hf', 'json': train_bpe([TEXT], 300)}}[kind]
    hf.export(tiny_model(**V3, vocab_size=50304 if kind == 'gpt2' else 384, n_layer=1), desc, tmp_path)
    encode, decode = get_tokenizer(desc)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ids = theirs.encode(TEXT, add_special_tokens=False)
    assert ids == encode(TEXT) and theirs.decode(ids) == TEXT == decode(ids)
    assert hf.tokenizer_desc(str(tmp_path / 'tokenizer.json')) == desc


def test_a_foreign_tokenizer_is_used_as_it_is(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({'hello': 0, 'world': 1, '<unk>': 2}, unk_token='<unk>'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / 'tokenizer.json'))
    desc = hf.tokenizer_desc(str(tmp_path / 'tokenizer.json'))
    assert desc['kind'] == 'hf'
    encode, decode = get_tokenizer(desc)
    assert encode('world hello') == [1, 0] and decode([1, 0]) == 'world hello'


@pytest.mark.parametrize('field, value', [
    ('model_type', 'llama'), ('hidden_act', 'gelu'), ('rope_interleave', False), ('norm_topk_prob', False),
    ('topk_method', 'greedy'), ('rms_norm_eps', 1e-5), ('num_nextn_predict_layers', 2),
    ('rope_scaling', {'type': 'linear', 'factor': 2.0}), ('rope_scaling', {'type': 'yarn', 'factor': 2.0, 'foo': 1}),
    ('quantization_config', {'quant_method': 'fp8'}),
])
def test_unrepresentable_config_is_refused_by_name(field, value):
    config, _ = hf.hf_config(tiny_model(**V3).cfg)
    with pytest.raises(hf.HFError, match=field):
        hf.model_config({**config, field: value})


def test_export_refuses_what_the_format_lacks(tmp_path):
    with pytest.raises(hf.HFError, match="attn='mha'"):
        hf.export(Transformer(ModelConfig(**TINY, attn='mha')), CHARS, tmp_path)
    biased = tiny_model(score_func='softmax')
    with torch.no_grad():
        biased.moe_layers()[0].gate.bias[0] = 0.5  # trained with V3's bias under softmax gating
    with pytest.raises(hf.HFError, match='gate.bias is nonzero'):
        hf.export(biased, CHARS, tmp_path)


def run(*args, cwd):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})


def test_command_line(tmp_path):
    ours = tiny_model(**V3)
    (tmp_path / 'run').mkdir()
    save_checkpoint({'model': ours.state_dict(), 'model_args': vars(ours.cfg), 'tokenizer': CHARS},
                    tmp_path / 'run' / 'ckpt.pt')
    p = run(REPO / 'hf.py', 'export', '--out_dir=run', '--hf_dir=hfdir', cwd=tmp_path)
    assert p.returncode == 0 and 'training-only' in p.stdout, p.stderr
    p = run(REPO / 'hf.py', 'import', '--hf_dir=hfdir', '--out_dir=back', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    back = load_model(str(tmp_path / 'back'))[0].state_dict()
    assert all(torch.equal(back[n], t) for n, t in ours.state_dict().items())
    p = run(REPO / 'sample.py', '--out_dir=hfdir', '--max_new_tokens=8', '--start=To be', '--device=cpu', cwd=tmp_path)
    assert p.returncode == 0 and '\nTo be' in p.stdout, p.stderr
    p = run(REPO / 'hf.py', 'export', '--out_dir=run', '--hf_dir=x', '--max_shard_size=lots', cwd=tmp_path)
    assert p.returncode == 2 and 'max_shard_size' in p.stderr


def lora_run(tmp_path, base, targets, dropout=0.0):
    """base.pt and a LoRA run on it (lora/ckpt.pt) whose adapters all matter: B is not zero."""
    save_checkpoint({'model': base.state_dict(), 'model_args': vars(base.cfg), 'tokenizer': CHARS},
                    tmp_path / 'base.pt')
    config = {'rank': 4, 'alpha': 8.0, 'dropout': dropout, 'targets': targets.split(',')}
    add_lora(base, **config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith('.B'):
                p.normal_(0.0, 0.1)
    (tmp_path / 'lora').mkdir()
    save_checkpoint({'model': lora_state_dict(base), 'model_args': vars(base.cfg), 'tokenizer': CHARS,
                     'lora': lora_checkpoint_fields(config, tmp_path / 'base.pt')}, tmp_path / 'lora' / 'ckpt.pt')


@pytest.mark.parametrize('arch, targets, dropout', [
    (V3, 'wq_a,wq_b,wkv_a,wkv_b,wo,w1,w2,w3', 0.1),  # every target; gate_up_proj and down_proj nested
    (V2, 'wq,wkv_a,wo,w3', 0.0),  # up_proj alone in the fused gate_up_proj
], ids=['v3', 'v2'])
def test_lora_exports_its_base_and_a_peft_adapter(arch, targets, dropout, tmp_path):
    peft = pytest.importorskip('peft')
    lora_run(tmp_path, tiny_model(**arch), targets, dropout)
    p = run(REPO / 'hf.py', 'export', '--out_dir=lora', '--hf_dir=hfdir', cwd=tmp_path)
    assert p.returncode == 0 and 'wrote hfdir/adapter: LoRA r=4' in p.stdout, p.stderr
    assert ('lora_dropout=0.1' in p.stdout) == bool(dropout)
    config = json.loads((tmp_path / 'hfdir' / 'adapter' / 'adapter_config.json').read_text())
    assert config['peft_type'] == 'LORA' and config['task_type'] == 'CAUSAL_LM' and config['lora_alpha'] == 8.0
    assert config['base_model_name_or_path'] == str(tmp_path / 'hfdir')
    assert 'o_proj' in config['target_modules'] and 'up_proj.weight' in config['target_parameters']
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hfdir', dtype=torch.float32).eval()
    idx = torch.randint(0, 96, (2, 32))
    error = lambda got, ref: ((got - ref).abs().max() / ref.abs().max()).item()
    with torch.no_grad():
        base = load_model(str(tmp_path / 'base.pt'))[0](idx, targets=idx)[0]
        adapted = load_model(str(tmp_path / 'lora'))[0](idx, targets=idx)[0]  # base + adapters folded
        assert error(theirs(idx).logits, base) < 1e-5, "the directory holds the base, unmerged"
        theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / 'hfdir' / 'adapter').eval()
        assert error(theirs(idx).logits, adapted) < 1e-5
    assert error(base, adapted) > 0.1, error(base, adapted)


def test_a_lora_export_that_cannot_be_written_writes_nothing(tmp_path):
    lora_run(tmp_path, Transformer(ModelConfig(**TINY, attn='mha')), 'wqkv,w1')
    p = run(REPO / 'hf.py', 'export', '--out_dir=lora', '--hf_dir=hfdir', cwd=tmp_path)
    assert p.returncode == 1 and "attn='mha'" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / 'hfdir').exists()


def test_a_broken_directory_is_one_clear_error(tmp_path):
    hf.export(tiny_model(**V3), CHARS, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    (tmp_path / 'config.json').write_text(json.dumps({**config, 'num_hidden_layers': 2}))
    with pytest.raises(CheckpointError, match='unexpected tensor'):
        load_model(str(tmp_path))
    (tmp_path / 'model.safetensors').write_bytes(b'not safetensors')
    with pytest.raises(CheckpointError, match='cannot read') as e:
        load_model(str(tmp_path))
    assert '\n' not in str(e.value)


def test_train_starts_from_an_hf_directory(tmp_path):
    p = run(REPO / 'prepare.py', 'shakespeare_char', '--input', REPO.parent / 'shared/data/tinyshakespeare/input.txt',
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    tokenizer = json.loads((tmp_path / 'data/shakespeare_char/meta.json').read_text())['tokenizer']
    ours = tiny_model(**V3)
    hf.export(ours, tokenizer, tmp_path / 'hfdir')
    p = run(REPO / 'train.py', '--init_from=hf:hfdir', '--dataset=shakespeare_char', '--out_dir=run', '--max_iters=1',
            '--eval_interval=1', '--eval_iters=1', '--batch_size=2', '--block_size=32', '--compile=False',
            '--learning_rate=1e-4',
            '--warmup_iters=0', '--dropout=0.1', '--device=cpu', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    run_model, ckpt = load_model(str(tmp_path / 'run'))
    assert ckpt['model_args'] == {**vars(ours.cfg), 'dropout': 0.1}  # its architecture, our training knobs
    for name, t in ours.state_dict().items():  # one small step (lr 1e-4, bias gamma 1e-3) away
        assert (run_model.state_dict()[name] - t).abs().max() <= 2e-3, name
    p = run(REPO / 'train.py', '--init_from=hf:hfdir', '--dataset=shakespeare', '--device=cpu', cwd=tmp_path)
    assert p.returncode != 0 and 'error' in p.stderr
