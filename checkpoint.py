"""
Checkpoints: the one place that writes them (atomically) and the one function, load_model, that
every script calls to get a model from wherever it lives: a checkpoint file or an out_dir
(ckpt.pt, or best.pt with which='best').
A checkpoint is a dict: 'model' (state dict), 'model_args' (ModelConfig fields), 'tokenizer'
(prepare.py's description), and from train.py also optimizer, scaler, rng, iter_num, config.
"""
import os

import torch

from model import ModelConfig, Transformer

FILES = {'latest': 'ckpt.pt', 'best': 'best.pt'}
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


def load_model(source, which='latest', device='cpu', dtype=None):
    """-> (model in eval mode on device/dtype, checkpoint dict without its weights)."""
    path = checkpoint_file(source, which)
    ckpt = read_checkpoint(path)
    try:
        model = Transformer(ModelConfig(**ckpt['model_args']))
        model.load_state_dict(ckpt.pop('model'))
    except (TypeError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [''])[0]
        raise CheckpointError(f"{path}: its weights do not fit its model_args ({type(e).__name__}: {first})") from None
    ckpt['path'] = path
    return model.eval().to(device=device, dtype=dtype), ckpt
