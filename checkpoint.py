"""
Checkpoints: the one place that writes them (atomically) and the one function, load_model, that
every script calls to get a model from wherever it lives: a checkpoint file, an out_dir
(ckpt.pt, or best.pt with which='best') or a Hugging Face directory (config.json + safetensors).
A checkpoint is a dict: 'model' (state dict), 'model_args' (ModelConfig fields), 'tokenizer'
(prepare.py's description), and from train.py also optimizer, scaler, rng, iter_num, config.
A LoRA run's checkpoint holds only the adapters in 'model', plus 'lora': {'config': lora.add_lora's
arguments, 'base': the base checkpoint's path, 'base_sha256': its checksum}; load_model returns
base + adapters folded into plain weights.
"""
import os

import torch

from lora import add_lora, load_lora_state, merged_state_dict
from model import TRAINING_FIELDS, ModelConfig, Transformer
from prepare import sha256_files

FILES = {'latest': 'ckpt.pt', 'best': 'best.pt'}
SHARDED_FILES = {'latest': 'ckpt.dcp', 'best': 'best.dcp'}  # a sharded run's DCP directories (parallel.py)
REQUIRED = ('model', 'model_args', 'tokenizer')
RESUMABLE = REQUIRED + ('optimizer', 'scaler', 'rng', 'iter_num', 'best_val_loss', 'config')  # train.py's resume


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not one of ours; the message is one line."""


def save_checkpoint(obj, path):
    """Write then rename: a crash mid-write leaves the previous file intact."""
    tmp = f'{path}.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)


def checkpoint_file(source, which='latest'):
    """A checkpoint file's path from a file or an out_dir."""
    if which not in FILES:
        raise CheckpointError(f"which checkpoint: {which!r} is not one of {', '.join(map(repr, FILES))}")
    path = os.path.join(source, FILES[which]) if os.path.isdir(source) else source
    sharded = os.path.join(source, SHARDED_FILES[which])
    if not os.path.isfile(path) and os.path.isdir(sharded):
        raise CheckpointError(f"{source} holds a sharded checkpoint ({sharded}): make the single file with "
                              f"`python parallel.py to_plain --out_dir={source} --ckpt={which}`")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: train one first (python train.py config/train_tiny.py)")
    return path


def read_checkpoint(path, map_location='cpu', required=REQUIRED):
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [''])[0]
        raise CheckpointError(f"cannot read {path} ({type(e).__name__}: {first}): truncated or not a checkpoint") from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint train.py wrote: it has no {', '.join(missing)}")
    return ckpt


def check_model_args(ckpt_args, given_args, explicitly_set):
    """The architecture comes from the checkpoint: -> ckpt_args with the explicitly set training
    fields (and a shorter block_size: RoPE tables are computed, not stored) applied; a set field
    that contradicts the checkpoint's architecture is refused by name."""
    shorter = 'block_size' in explicitly_set and given_args['block_size'] <= ckpt_args['block_size']
    changeable = TRAINING_FIELDS + (('block_size',) if shorter else ())
    for k in sorted(explicitly_set):
        if k in ckpt_args and k not in changeable and given_args[k] != ckpt_args[k]:
            raise CheckpointError(f"--{k}={given_args[k]!r} differs from the checkpoint's {ckpt_args[k]!r}: "
                                  f"the architecture comes from the checkpoint (drop --{k})")
    return {**ckpt_args, **{k: given_args[k] for k in explicitly_set if k in changeable}}


def lora_checkpoint_fields(config, base_path):
    """What a LoRA checkpoint records about its adapters and the base they belong to."""
    return {'config': config, 'base': os.path.abspath(base_path), 'base_sha256': sha256_files([base_path])}


def load_with_adapters(ckpt, path):
    """A LoRA checkpoint's base (its checksum checked) with the adapters added, not folded in:
    base frozen, adapters trainable."""
    base = ckpt['lora']['base']
    if not os.path.isfile(base):
        raise CheckpointError(f"{path}: its base checkpoint {base} is missing: restore it (adapters only fit "
                              "their base; `python lora.py merge` makes a checkpoint that needs none)")
    if sha256_files([base]) != ckpt['lora']['base_sha256']:
        raise CheckpointError(f"{path}: its base checkpoint {base} has changed since the adapters were trained "
                              "(sha256 differs): restore that file; adapters only fit the weights they were trained on")
    model = Transformer(ModelConfig(**ckpt['model_args']))  # the run's own training fields (dropout)
    model.load_state_dict(load_model(base)[0].state_dict())
    try:
        add_lora(model, **ckpt['lora']['config'])
        load_lora_state(model, ckpt['model'])
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model


def load_model(source, which='latest', device='cpu', dtype=None, block_size=None, fold_adapters=True):
    """-> (model in eval mode on device/dtype, checkpoint dict without its weights). A directory
    with a config.json is a Hugging Face one (hf.py): its weights keep their dtype unless dtype is
    given. block_size caps the context the model (and so its caches) is built for. fold_adapters=False
    keeps a LoRA run's adapters apart from its base, at its full context (hf.py exports them apart)."""
    if os.path.isfile(os.path.join(source, 'config.json')):
        from hf import HFError, load_hf  # hf.py is an entry point above this file: imported on demand
        try:
            return load_hf(source, device, dtype, block_size)
        except HFError as e:
            raise CheckpointError(str(e)) from None
    path = checkpoint_file(source, which)
    ckpt = read_checkpoint(path)
    if 'lora' in ckpt:  # base + adapters: folded into plain weights, or kept apart
        adapted = load_with_adapters(ckpt, path)
        if not fold_adapters:
            del ckpt['model']
            return adapted.eval().to(device=device, dtype=dtype), {**ckpt, 'path': path}
        ckpt['model'] = merged_state_dict(adapted)
    try:
        if block_size:  # RoPE tables are rebuilt, never stored: any shorter context loads
            ckpt['model_args'] = {**ckpt['model_args'], 'block_size': min(block_size, ckpt['model_args']['block_size'])}
        model = Transformer(ModelConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt.pop('model'))
    except (TypeError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [''])[0]
        raise CheckpointError(f"{path}: its weights do not fit its model_args ({type(e).__name__}: {first})") from None
    ckpt['path'] = path
    return model.eval().to(device=device, dtype=dtype), ckpt
