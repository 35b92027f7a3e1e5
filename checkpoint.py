"""
Checkpoints: the one place that writes them (atomically) and the one function, load_model, that
every script calls to get a model from wherever it lives: a checkpoint file, an out_dir
(ckpt.pt, or best.pt with which='best') or a Hugging Face directory (config.json + safetensors).
A checkpoint is a dict: 'model' (state dict), 'model_args' (ModelConfig fields), 'tokenizer'
(prepare.py's description), and from train.py also optimizer, scaler, rng, iter_num, config.
A LoRA run's checkpoint holds only the adapters in 'model', plus 'lora': {'config': lora.add_lora's
arguments, 'base': the base's path (a checkpoint or a Hugging Face directory), 'base_sha256': its
checksum}; load_model returns base + adapters folded into plain weights.
"""
import fcntl
import os
import sys

import torch

from flags import one_line
from hf import HFError, load_hf, model_files
from lora import add_lora, load_lora_state, merged_state_dict
from model import TRAINING_FIELDS, ModelConfig, Transformer
from prepare import atomic_path, sha256_files

FILES = {'latest': 'ckpt.pt', 'best': 'best.pt'}
SHARDED_FILES = {'latest': 'ckpt.dcp', 'best': 'best.dcp'}  # a sharded run's DCP directories (parallel.py)
REQUIRED = ('model', 'model_args', 'tokenizer')
RESUMABLE = REQUIRED + ('optimizer', 'scaler', 'rng', 'iter_num', 'best_val_loss', 'config')  # train.py's resume


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or not one of ours; the message is one line."""


RUN_FILES = ('ckpt.pt', 'best.pt', 'ckpt.dcp', 'best.dcp', 'log.jsonl')  # what makes a directory a training run


def run_files(out_dir):
    """The files of a training run (train.py's out_dir) that out_dir holds."""
    return [n for n in RUN_FILES if os.path.lexists(os.path.join(out_dir, n))]


def lock_dir(path):
    """An exclusive lock on the directory path, held while the returned file stays open (so for the
    process's life): a second writer is refused, naming the first one's process. The OS releases it
    when the process ends, however it ends."""
    f = open(os.path.join(path, '.lock'), 'a+')
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or 'another process'
        f.close()
        raise CheckpointError(f"{path} is in use by {holder}: wait for it to end, or pick another directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} ({' '.join(os.path.basename(a) for a in sys.argv[:1])})")
    f.flush()
    return f


def save_checkpoint(obj, path):
    """Write then rename: a crash or a full disk mid-write leaves the previous file intact."""
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's writer wraps the file's own error (a full disk): raise that one
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise


def host_copy(obj, copies=None):
    """obj (dicts, lists, tuples) with each tensor copied to host memory, a tensor that two names share
    (tied embeddings) copied once: what a background writer saves while training changes the originals."""
    copies = {} if copies is None else copies
    if isinstance(obj, torch.Tensor):
        if id(obj) not in copies:
            copies[id(obj)] = obj.detach().to('cpu', copy=True)
        return copies[id(obj)]
    if isinstance(obj, dict):
        return {k: host_copy(v, copies) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v, copies) for v in obj)
    return obj


def checkpoint_file(source, which='latest'):
    """A checkpoint file's path from a file or an out_dir."""
    if which not in FILES:
        raise CheckpointError(f"which checkpoint: {which!r} is not one of {', '.join(map(repr, FILES))}")
    path = os.path.join(source, FILES[which]) if os.path.isdir(source) else source
    sharded = os.path.join(source, SHARDED_FILES[which])
    if not os.path.isfile(path) and os.path.isdir(sharded):
        raise CheckpointError(f"{source} holds a sharded checkpoint ({sharded}): make the single file with "
                              f"`python convert.py to_plain --out_dir={source} --ckpt={which}`")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}: train one first (python train.py config/train_tiny.py)")
    return path


def read_checkpoint(path, map_location='cpu', required=REQUIRED):
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read {path} ({one_line(e)}): truncated or not a checkpoint") from None
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


def base_sha256(path):
    """The checksum of a LoRA run's base: a checkpoint file, or a Hugging Face directory's config.json,
    weight files and tokenizer.json in a fixed order."""
    try:
        return sha256_files(model_files(path) if os.path.isdir(path) else [path])
    except (HFError, OSError) as e:
        raise CheckpointError(f"cannot read the base {path} ({e})") from None


def lora_checkpoint_fields(config, base_path):
    """What a LoRA checkpoint records about its adapters and the base they belong to."""
    return {'config': config, 'base': os.path.abspath(base_path), 'base_sha256': base_sha256(base_path)}


def load_with_adapters(ckpt, path):
    """A LoRA checkpoint's base (its checksum checked) with the adapters added, not folded in:
    base frozen, adapters trainable."""
    base = ckpt['lora']['base']
    if not os.path.exists(base):
        raise CheckpointError(f"{path}: its base {base} is missing: restore it (adapters only fit "
                              "their base; `python convert.py merge` makes a checkpoint that needs none)")
    if base_sha256(base) != ckpt['lora']['base_sha256']:
        raise CheckpointError(f"{path}: its base {base} has changed since the adapters were trained "
                              "(sha256 differs): restore it; adapters only fit the weights they were trained on")
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
    with a config.json is a Hugging Face one (hf.py), refused if it also holds a training run (either
    could be meant); its weights keep their dtype unless dtype is given. block_size caps the context
    the model (and so its caches) is built for. fold_adapters=False keeps a LoRA run's adapters apart
    from its base, at its full context (hf.py exports them apart)."""
    if os.path.isfile(os.path.join(source, 'config.json')):
        held = run_files(source)
        if held:
            raise CheckpointError(f"{source} holds both a Hugging Face model (config.json) and a training run "
                                  f"({', '.join(held)}): move one of them to a directory of its own")
        try:
            return load_hf(source, device, dtype, block_size)
        except (HFError, OSError) as e:
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
        raise CheckpointError(f"{path}: its weights do not fit its model_args ({one_line(e)})") from None
    ckpt['path'] = path
    return model.eval().to(device=device, dtype=dtype), ckpt
