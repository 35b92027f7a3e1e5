"""hf.py: our checkpoints <-> Hugging Face DeepSeek-V3/V2 directories. Round trips (tied embeddings
included), transformers' own loading, generation and saving, tokenizers, refusals, the command line,
train.py's init_from and LoRA on such a directory, and directories that are ambiguous, stale or
malformed. (Logit parity over V3/V2, q_lora, YaRN and MTP is tests/test_reference.py; convert.py
under faults is tests/test_faults_convert.py.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf
from checkpoint import CheckpointError, base_sha256, load_model, lora_checkpoint_fields, save_checkpoint
from engine import Engine, SamplingParams
from lora import add_lora, lora_state_dict
from model import ModelConfig, Transformer
from prepare import get_tokenizer, train_bpe

transformers = pytest.importorskip('transformers')

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / 'shared/data/tinyshakespeare/input.txt'
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


def test_an_imported_v3_mtp_layer_drafts_for_speculative_decoding(tmp_path):
    """A V3 directory that carries its MTP layer (decoder layer n_layer, as DeepSeek-V3's files do)
    decodes speculatively with it: the same greedy tokens as plain decoding, and drafts accepted."""
    hf.export(tiny_model(**V3), CHARS, tmp_path)
    model, _ = load_model(str(tmp_path))
    assert model.mtp is not None
    prompts, params = [[5, 6, 7], [9] * 11], SamplingParams(max_tokens=16, temperature=0)
    plain = [r.tokens for r in Engine(model, CHARS, max_batch=2).generate(prompts, params)]
    engine = Engine(model, CHARS, max_batch=2, speculative=True)
    assert [r.tokens for r in engine.generate(prompts, params)] == plain
    assert engine.drafted > 0


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
    """convert.py random's path (meta init, bf16, save_pretrained), with DeepSeek-V2-Lite's config shrunk."""
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
    p = run(REPO / 'convert.py', 'export', '--out_dir=run', '--hf_dir=hfdir', cwd=tmp_path)
    assert p.returncode == 0 and 'training-only' in p.stdout, p.stderr
    p = run(REPO / 'convert.py', 'import', '--hf_dir=hfdir', '--out_dir=back', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    back = load_model(str(tmp_path / 'back'))[0].state_dict()
    assert all(torch.equal(back[n], t) for n, t in ours.state_dict().items())
    p = run(REPO / 'sample.py', '--out_dir=hfdir', '--max_new_tokens=8', '--start=To be', '--device=cpu', cwd=tmp_path)
    assert p.returncode == 0 and '\nTo be' in p.stdout, p.stderr
    p = run(REPO / 'convert.py', 'export', '--out_dir=run', '--hf_dir=x', '--max_shard_size=lots', cwd=tmp_path)
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
    p = run(REPO / 'convert.py', 'export', '--out_dir=lora', '--hf_dir=hfdir', cwd=tmp_path)
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
    p = run(REPO / 'convert.py', 'export', '--out_dir=lora', '--hf_dir=hfdir', cwd=tmp_path)
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


@pytest.fixture(scope='module')
def char_data(tmp_path_factory):
    """A working directory with data/chars, the first 50,000 characters of tiny shakespeare with a
    char tokenizer -> (it, the dataset's tokenizer)."""
    d = tmp_path_factory.mktemp('char')
    (d / 'input.txt').write_text(SHAKESPEARE.read_text()[:50_000])
    p = run(REPO / 'prepare.py', 'chars', '--input', 'input.txt', '--tokenizer=char', cwd=d)
    assert p.returncode == 0, p.stderr
    return d, json.loads((d / 'data/chars/meta.json').read_text())['tokenizer']


def save_run(model, tokenizer, out_dir):
    out_dir.mkdir()
    save_checkpoint({'model': model.state_dict(), 'model_args': vars(model.cfg), 'tokenizer': tokenizer},
                    out_dir / 'ckpt.pt')


TRAIN = ['--dataset=chars', '--batch_size=2', '--block_size=32', '--compile=False', '--warmup_iters=0',
         '--eval_iters=1', '--log_interval=1', '--device=cpu', '--dtype=float32']


def test_train_starts_from_an_hf_directory(char_data):
    d, tokenizer = char_data
    ours = tiny_model(**V3)
    hf.export(ours, tokenizer, d / 'hfdir')
    p = run(REPO / 'train.py', '--init_from=hf:hfdir', *TRAIN, '--out_dir=run', '--max_iters=1', '--eval_interval=1',
            '--learning_rate=1e-4', '--dropout=0.1', cwd=d)
    assert p.returncode == 0, p.stderr
    run_model, ckpt = load_model(str(d / 'run'))
    assert ckpt['model_args'] == {**vars(ours.cfg), 'dropout': 0.1}  # its architecture, our training knobs
    for name, t in ours.state_dict().items():  # one small step (lr 1e-4, bias gamma 1e-3) away
        assert (run_model.state_dict()[name] - t).abs().max() <= 2e-3, name
    p = run(REPO / 'train.py', '--init_from=hf:hfdir', '--dataset=shakespeare', '--device=cpu', cwd=d)
    assert p.returncode != 0 and 'error' in p.stderr


def train_log(out_dir):
    with open(out_dir / 'log.jsonl') as f:
        return {r['iter']: r['loss'] for r in map(json.loads, f) if r['kind'] == 'train'}


def test_lora_on_an_hf_directory_trains_samples_and_resumes(char_data):
    """The base of a LoRA run can be a Hugging Face directory: its checksum covers the directory's
    config.json, weight files and tokenizer.json, and resuming reloads the base from it."""
    d, tokenizer = char_data
    hf.export(tiny_model(**V3, vocab_size=len(tokenizer['chars'])), tokenizer, d / 'lora-base', max_shard_size=20_000)
    lora = ['--init_from=hf:lora-base', '--lora_rank=4', '--eval_interval=2', *TRAIN]
    for out_dir, steps in (('lora-straight', 4), ('lora-resumed', 2)):
        p = run(REPO / 'train.py', *lora, f'--out_dir={out_dir}', f'--max_iters={steps}', cwd=d)
        assert p.returncode == 0, p.stderr
    p = run(REPO / 'train.py', *TRAIN, '--eval_interval=2', '--out_dir=lora-resumed', '--max_iters=4',
            '--init_from=resume', cwd=d)
    assert p.returncode == 0, p.stderr
    straight, resumed = train_log(d / 'lora-straight'), train_log(d / 'lora-resumed')
    assert sorted(resumed) == list(range(4)) and all(straight[i] == resumed[i] for i in range(2, 4))
    ckpt = torch.load(d / 'lora-resumed' / 'ckpt.pt', weights_only=False)
    assert ckpt['lora']['base'] == str(d / 'lora-base') and ckpt['lora']['base_sha256'] == base_sha256(d / 'lora-base')
    p = run(REPO / 'sample.py', '--out_dir=lora-resumed', '--max_new_tokens=8', '--device=cpu', '--dtype=float32',
            cwd=d)
    assert p.returncode == 0, p.stderr
    shard = next((d / 'lora-base').glob('model-00002-*.safetensors'))
    saved = shard.read_bytes()
    shard.write_bytes(saved[:-4] + bytes(4))  # one weight changed
    try:
        p = run(REPO / 'sample.py', '--out_dir=lora-resumed', '--device=cpu', cwd=d)
        assert p.returncode == 1 and 'has changed since the adapters were trained' in p.stderr, p.stderr
    finally:
        shard.write_bytes(saved)


# -----------------------------------------------------------------------------
# tied embeddings: the files hold one tensor for the embedding and the head

def test_tied_embeddings_survive_every_round_trip(tmp_path):
    """export -> load_model(directory), export -> convert.py import -> load_model(ckpt.pt), and
    transformers on the directory: the same logits as the model exported, from a head that is the
    embedding (lm_head.weight is not in the files; a head not tied back is memory never filled)."""
    ours = tiny_model(**V3, tie_embeddings=True)
    save_run(ours, CHARS, tmp_path / 'run')
    p = run(REPO / 'convert.py', 'export', '--out_dir=run', '--hf_dir=hfdir', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    p = run(REPO / 'convert.py', 'import', '--hf_dir=hfdir', '--out_dir=back', cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    idx = torch.randint(0, 96, (2, 32))
    with torch.no_grad():
        ref = ours(idx, targets=idx)[0]
        for source in ('hfdir', 'back'):
            model = load_model(str(tmp_path / source))[0]
            assert model.head.weight is model.embed.weight, source
            assert torch.equal(model(idx, targets=idx)[0], ref), source
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hfdir').eval()
        assert torch.equal(theirs.get_output_embeddings().weight, ours.embed.weight)
        err = ((theirs(idx).logits - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, f"max relative error {err:.2e}"


def test_scripts_read_a_tied_export_as_its_run(char_data):
    """sample.py and eval.py pointed at the exported directory: the greedy text and the validation
    cross-entropy of the run it came from."""
    d, tokenizer = char_data
    ours = tiny_model(**V3, tie_embeddings=True, vocab_size=len(tokenizer['chars']))
    with torch.no_grad():  # far from the init, where a tied model repeats its last token
        for name, p in ours.named_parameters():
            if 'norm' not in name and 'embed' not in name:
                p.normal_(0.0, 0.5)
    save_run(ours, tokenizer, d / 'tied')
    hf.export(ours, tokenizer, d / 'tied-hf')
    cpu = ['--device=cpu', '--dtype=float32']
    texts, ce = [], []
    for source in ('tied', 'tied-hf'):
        p = run(REPO / 'sample.py', f'--out_dir={source}', '--start=ROMEO:', '--max_new_tokens=24', '--temperature=0',
                '--num_samples=1', *cpu, cwd=d)
        assert p.returncode == 0, p.stderr
        text = p.stdout.split('---------------')[0]
        texts.append(text[text.index('\nROMEO:'):])
        p = run(REPO / 'eval.py', f'--out_dir={source}', '--dataset=chars', '--batch_size=64',
                '--bench_iters=0', '--decode_tokens=0', f'--out={source}.json', *cpu, cwd=d)
        assert p.returncode == 0, p.stderr
        ce.append(json.loads((d / f'{source}.json').read_text())['ce'])
    assert texts[0] == texts[1] and len(set(texts[0])) > 10, texts
    assert ce[0] == ce[1], ce


# -----------------------------------------------------------------------------
# directories that are ambiguous, stale or malformed: one line, never a guess

def test_a_directory_that_is_both_hf_and_a_run_is_refused(tmp_path):
    ours = tiny_model(**V3)
    hf.export(ours, CHARS, tmp_path / 'both')
    save_checkpoint({'model': ours.state_dict(), 'model_args': vars(ours.cfg), 'tokenizer': CHARS},
                    tmp_path / 'both' / 'ckpt.pt')
    with pytest.raises(CheckpointError, match=r'both a Hugging Face model \(config.json\) and a training run '
                                              r'\(ckpt.pt\)'):
        load_model(str(tmp_path / 'both'))


@pytest.mark.parametrize('fault, message', [
    ('a shard the index names is missing', 'model.safetensors.index.json names model-00002-of-'),
    ('a shard the index does not name', 'model-00099-of-00099.safetensors is not in model.safetensors.index.json'),
    ('a shard beside model.safetensors', 'model-00001-of-00002.safetensors beside model.safetensors'),
])
def test_shards_and_index_must_agree(fault, message, tmp_path):
    sharded = 'beside' not in message
    hf.export(tiny_model(**V3), CHARS, tmp_path / 'hf', max_shard_size=20_000 if sharded else 5 * 1024 ** 3)
    files = sorted((tmp_path / 'hf').glob('*.safetensors'))
    if 'missing' in fault:
        files[1].unlink()
    else:
        name = 'model-00099-of-00099.safetensors' if sharded else 'model-00001-of-00002.safetensors'
        (tmp_path / 'hf' / name).write_bytes(files[0].read_bytes())
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(str(tmp_path / 'hf'))
    assert '\n' not in str(e.value)


BROKEN = {  # what is written -> what the error says
    'hidden_size "2048"': ('config.json', lambda c: {**c, 'hidden_size': '2048'},
                           "config.json hidden_size='2048': must be an integer"),
    'num_hidden_layers null': ('config.json', lambda c: {**c, 'num_hidden_layers': None},
                               'config.json num_hidden_layers=None: must be an integer'),
    'tie_word_embeddings "false"': ('config.json', lambda c: {**c, 'tie_word_embeddings': 'false'},
                                    "tie_word_embeddings='false': must be true or false"),
    'rope factor "4"': ('config.json', lambda c: {**c, 'rope_scaling': {'type': 'yarn', 'factor': '4'}},
                        "rope_scaling.factor='4': must be a number"),
    'no vocab_size': ('config.json', lambda c: {k: v for k, v in c.items() if k != 'vocab_size'},
                      'config.json has no vocab_size'),
    'config.json a list': ('config.json', lambda c: [c], 'config.json is not a JSON object'),
    'config.json not JSON': ('config.json', lambda c: '{"vocab_size": ', 'cannot read'),
    'tokenizer.json not JSON': ('tokenizer.json', lambda c: '{"model": {"type": "BPE", ', 'cannot read'),
    'tokenizer.json not a tokenizer': ('tokenizer.json', lambda c: {'model': {'type': 'Nothing'}}, 'cannot read'),
}


def broken_dir(path, case):
    hf.export(tiny_model(**V3), CHARS, path)
    name, change, message = BROKEN[case]
    new = change(json.loads((path / 'config.json').read_text()))
    (path / name).write_text(new if isinstance(new, str) else json.dumps(new))
    return message


@pytest.mark.parametrize('case', BROKEN)
def test_a_malformed_directory_is_one_clear_error(case, tmp_path):
    message = broken_dir(tmp_path / 'hf', case)
    with pytest.raises(CheckpointError) as e:
        load_model(str(tmp_path / 'hf'))
    assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


@pytest.mark.parametrize('script', [
    ('sample.py', '--out_dir=hf', '--device=cpu'), ('eval.py', '--out_dir=hf', '--device=cpu'),
    ('serve.py', '--out_dir=hf', '--device=cpu'), ('train.py', '--init_from=hf:hf', *TRAIN),
    ('convert.py', 'export', '--out_dir=hf', '--hf_dir=out'), ('convert.py', 'import', '--hf_dir=hf', '--out_dir=out'),
], ids=lambda s: ' '.join(s[:2]).removesuffix(' --out_dir=hf'))
def test_every_script_reports_a_malformed_directory_in_one_line(script, char_data, tmp_path):
    d, _ = char_data
    message = broken_dir(tmp_path / 'hf', 'hidden_size "2048"')
    (tmp_path / 'data').symlink_to(d / 'data')
    p = run(REPO / script[0], *script[1:], cwd=tmp_path)
    assert p.returncode == 1 and message in p.stderr and 'Traceback' not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / 'out').exists()
