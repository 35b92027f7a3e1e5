"""
Trains the MLA + DeepSeekMoE decoder of model.py. One process:
$ python train.py config/train_tiny.py --batch_size=16
DDP on one node with 4 GPUs:
$ torchrun --standalone --nproc_per_node=4 train.py config/train_shakespeare.py --gradient_accumulation_steps=4
Two nodes (run on each, node_rank 0 and 1):
$ torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_endpoint=HOST:29500 train.py ...
Sharded (parallel.py), for models past one GPU's memory: FSDP2, and the routed experts split 4 ways:
$ torchrun --standalone --nproc_per_node=8 train.py config/train_scale.py --fsdp=True --ep=4
Every global below can be set by a config file or --key=value (configurator.py).
"""
import glob
import json
import math
import os
import shutil
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import fields

# CPU: back large tensors with 2 MB pages; with 4 KB ones, a tiny model's 200 MB of logits cost more
# in page faults each step than in arithmetic. Read once, at torch's first allocation.
os.environ.setdefault('THP_MEM_ALLOC_ENABLE', '1')

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (RESUMABLE, CheckpointError, check_model_args, checkpoint_file, host_copy, load_model,
                        load_with_adapters, lock_dir, lora_checkpoint_fields, read_checkpoint, run_files,
                        save_checkpoint)
from flags import (DTYPES, at_most, below, boolean, check_flags, cross_rule, cuda_for_nccl, default_device,
                   default_dtype, device_exists, divides, divides_world_size, dtype_supported, end_in_one_line,
                   less_than, needs_torchrun, non_empty, non_negative, one_line, one_of, positive, rule)
from fp8 import supported as fp8_supported, use_fp8
from lora import add_lora, lora_state_dict, num_trainable
from model import ModelConfig, Transformer, padded_vocab
from parallel import Sharding, load_sharded, read_sharded_meta, relink, save_sharded, sharded_checkpoint
from prepare import (DOC_START, atomic_path, mask_path, read_mask, read_meta, read_shard, read_windows, remove_path, split_shards,
                     writable_dir, write_text)

# -----------------------------------------------------------------------------
# I/O
out_dir = 'out'
eval_interval = 250
log_interval = 10
eval_iters = 50
eval_only = False
always_save_checkpoint = True  # ckpt.pt at every eval; False: only when val loss improves
init_from = 'scratch'           # 'scratch', 'resume' (from out_dir/ckpt.pt), or a new run (fresh optimizer
                                # and schedule) from trained weights: 'ckpt:PATH' (a checkpoint file or
                                # out_dir) or 'hf:DIR' (a Hugging Face directory)
tensorboard = False             # scalars and expert-load histograms to out_dir/tb
overwrite = False               # scratch into an out_dir that holds a run: True replaces that run
# data
dataset = 'shakespeare'
gradient_accumulation_steps = 1  # per optimizer step, over all processes
batch_size = 32
# model: every ModelConfig field is a global too; vocab_size 0 = the dataset's, padded to 64
globals().update({f.name: f.default for f in fields(ModelConfig)})
vocab_size = 0
# fine-tuning: LoRA trains only low-rank adapters of the lora_targets (model.py's names; see lora.py)
lora_rank = 0  # 0 = off: every weight trains
lora_alpha = 16.0
lora_dropout = 0.0
lora_targets = 'wq,wq_a,wq_b,wkv_a,wkv_b,wo'
# AdamW, cosine decay after a linear warmup
learning_rate = 1e-3
max_iters = 5000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 = off
decay_lr = True
warmup_iters = 100
lr_decay_iters = 5000
min_lr = 1e-4
optimizer = 'adamw'  # 'muon': Muon for the hidden matrices (each expert's apart), AdamW for the rest (muon.py)
muon_lr = 0.0        # 0: learning_rate (Muon's update is scaled to AdamW's size); follows the same schedule
muon_momentum = 0.95
# system: the best device present and what it supports
backend = 'nccl' if torch.cuda.is_available() else 'gloo'
device = default_device()
dtype = default_dtype()
compile = torch.cuda.is_available()
# True: torch.compile each kind of block once (dense, MoE) for all its layers, and the head's loss; the rest
# runs eagerly (Transformer.compile_regions): predicted to start in a fraction of the whole model's compile
# time at a few % more per step, not yet measured on a GPU (notes/training.md 14), so not the default.
# False: the whole model as one graph. Sharded runs always compile by regions.
compile_regions = False
# torch.compile's mode: 'reduce-overhead' replays forward and backward as CUDA graphs (the MoE's shapes
# are static). 'auto': that on one GPU with one micro-step per step (with several, a replay overwrote
# outputs the step still needed, on an H100), else 'default'
compile_mode = 'auto'
activation_checkpointing = False  # recompute each block's activations in the backward: less memory
cast_weights_once = True  # several micro-steps in bf16/fp16 on one process: the matmul weights' copies in
                          # that dtype are made once a step, not in every micro-step (notes/training.md 13)
fp8 = False  # the matmuls in float8 e4m3 with row-wise scales, forward and backward (fp8.py); GPUs of
             # compute capability 9.0+ (Hopper); checkpoints stay ordinary ones
memory_limit_gib = 0.0  # CUDA only: cap this process's allocations (torch.cuda.set_per_process_memory_fraction),
                        # an out-of-memory error past it, as on a smaller GPU; 0 = off
# sharding under torchrun (parallel.py); neither: DDP, every rank holding the whole model
fsdp = False  # FSDP2: weights, gradients and optimizer state sharded over all ranks
ep = 1        # expert parallelism: each rank holds n_routed_experts / ep routed experts of each MoE layer
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
config = {k: globals()[k] for k in config_keys}
MODEL_FIELDS = [f.name for f in fields(ModelConfig)]  # their ranges are ModelConfig's own checks
check_flags('train.py', globals(), {
    'out_dir': non_empty, 'dataset': non_empty,
    'eval_interval': positive, 'log_interval': positive, 'eval_iters': positive,
    'eval_only': boolean, 'always_save_checkpoint': boolean, 'decay_lr': boolean, 'compile': boolean,
    'compile_regions': boolean,
    'compile_mode': [one_of('auto', 'default', 'reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs'),
                     rule(lambda v: v in ('auto', 'default', 'max-autotune-no-cudagraphs') or 'RANK' not in os.environ,
                          "CUDA graphs take one process: under torchrun 'default' or 'max-autotune-no-cudagraphs'"),
                     cross_rule(lambda v, f: v not in ('reduce-overhead', 'max-autotune')
                                or f['gradient_accumulation_steps'] == 1,
                                "CUDA graphs take one micro-step per step: --gradient_accumulation_steps=1")],
    'overwrite': boolean, 'tensorboard': boolean,
    'init_from': rule(lambda v: v in ('scratch', 'resume') or v.startswith(('ckpt:', 'hf:')),
                      "must be 'scratch', 'resume', 'ckpt:PATH' or 'hf:DIR'"),
    'lora_rank': non_negative, 'lora_alpha': positive, 'lora_dropout': below(1), 'lora_targets': non_empty,
    'activation_checkpointing': boolean, 'cast_weights_once': boolean,
    'fsdp': [boolean, needs_torchrun(off=False), rule(lambda v: not v or not lora_rank, "LoRA runs are not sharded")],
    'ep': [positive, divides('n_routed_experts'), needs_torchrun(off=1), divides_world_size(),
           rule(lambda v: v == 1 or not lora_rank, "LoRA runs are not sharded")],
    'gradient_accumulation_steps': positive, 'batch_size': positive, 'vocab_size': non_negative,
    'max_iters': non_negative, 'learning_rate': positive, 'min_lr': [non_negative, at_most('learning_rate')],
    'weight_decay': non_negative, 'beta1': below(1), 'beta2': below(1), 'grad_clip': non_negative,
    'optimizer': [one_of('adamw', 'muon'), cross_rule(lambda v, f: v == 'adamw' or not f['lora_rank'],
                                                      "LoRA's adapters train with 'adamw'")],
    'muon_lr': non_negative, 'muon_momentum': below(1),
    'lr_decay_iters': positive, 'warmup_iters': [non_negative, less_than('lr_decay_iters', unless='decay_lr')],
    'backend': [one_of('nccl', 'gloo'), cuda_for_nccl], 'device': device_exists(), 'dtype': dtype_supported(),
    'seed': non_negative,
    'fp8': [boolean, cross_rule(lambda v, f: not v or fp8_supported(f['device']) and f['dtype'] == 'bfloat16',
                                "needs --dtype=bfloat16 on a CUDA GPU of compute capability 9.0+ (Hopper or later)")],
    'memory_limit_gib': [non_negative, cross_rule(lambda v, f: not v or f['device'].startswith('cuda'),
                                                  "needs a CUDA device: it caps the CUDA memory allocator (0 = off)")],
})
saved = None  # (path, step) of the newest checkpoint on disk: what a failure or an interrupt leaves
writing = None  # the checkpoint being written in the background: (thread, (path, step), errors)


def kept():
    finish_writing(quietly=True)  # an interrupt lets the checkpoint being written finish first
    return f"; {saved[0]} (step {saved[1]}) is intact" if saved else ''


end_in_one_line('train.py', 'lower --batch_size (more --gradient_accumulation_steps keep the step), --block_size, '
                'or set --activation_checkpointing=True', note=kept)
if compile_mode == 'auto':
    one_gpu_step = 'cuda' in device and 'RANK' not in os.environ and gradient_accumulation_steps == 1
    compile_mode = 'reduce-overhead' if one_gpu_step else 'default'
# -----------------------------------------------------------------------------


def fail(msg, code=1):
    """One line and a non-zero exit (2: a usage error), leaving the process group cleanly."""
    print(f"train.py: error: {msg}", file=sys.stderr)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


try:
    ModelConfig(**{f: globals()[f] for f in MODEL_FIELDS if f != 'vocab_size'})
except ValueError as e:
    fail(e, 2)
ddp = int(os.environ.get('RANK', -1)) != -1
world_size = int(os.environ.get('WORLD_SIZE', 1)) if ddp else 1
if gradient_accumulation_steps % world_size:
    fail(f"--gradient_accumulation_steps={gradient_accumulation_steps} must divide by the {world_size} processes", 2)

# -----------------------------------------------------------------------------
# data and model settings, checked before anything is written: token shards from prepare.py

data_dir = os.path.join('data', dataset)
try:
    meta = read_meta(data_dir)
except (OSError, ValueError) as e:
    fail(e)


def checkpoint_path(name):
    return os.path.join(out_dir, name)


iter_num, best_val_loss = 0, float('inf')
model_args = {f: globals()[f] for f in MODEL_FIELDS}
model_args['vocab_size'] = vocab_size or padded_vocab(meta['vocab_size'])
checkpoint, init_model, lora_run = None, None, None  # lora_run: what a LoRA checkpoint records


def architecture_from(ckpt_args):
    """The checkpoint's architecture: a model field given as a flag or in a config file that
    contradicts it is a usage error; training fields (dropout, loss weights) come from the flags."""
    try:
        return check_model_args(ckpt_args, model_args, __flags_given__ & set(MODEL_FIELDS))
    except CheckpointError as e:
        fail(e, 2)


def check_lora_flags(lora_run):
    """A resumed run keeps its adapters: LoRA flags set to anything else are refused by name."""
    recorded = {} if lora_run is None else {'lora_rank': lora_run['config']['rank'], 'lora_alpha': lora_run['config']['alpha'],
                                            'lora_dropout': lora_run['config']['dropout'],
                                            'lora_targets': ','.join(lora_run['config']['targets'])}
    for flag in sorted(__flags_given__ & {'lora_rank', 'lora_alpha', 'lora_dropout', 'lora_targets'}):
        if globals()[flag] != recorded.get(flag, 0 if flag == 'lora_rank' else globals()[flag]):
            had = f"its {recorded[flag]!r}" if recorded else "no adapters"
            fail(f"--init_from=resume: --{flag}={globals()[flag]!r}, but {checkpoint_path('ckpt.pt')} has {had}: "
                 f"a run resumes as it was trained (drop --{flag})", 2)


sharded = fsdp or ep > 1
sharded_ckpt = sharded_checkpoint(out_dir) if init_from == 'resume' else None  # DCP: any world size
if init_from == 'resume':
    if sharded and not sharded_ckpt:
        fail(f"--init_from=resume with --fsdp/--ep reads a sharded checkpoint ({checkpoint_path('ckpt.dcp')}): "
             f"resume a plain ckpt.pt without them", 2)
    try:
        checkpoint = read_sharded_meta(sharded_ckpt) if sharded_ckpt else \
            read_checkpoint(checkpoint_file(checkpoint_path('ckpt.pt')), required=RESUMABLE)
    except CheckpointError as e:
        fail(f"--init_from=resume: {e}")
    model_args = architecture_from(checkpoint['model_args'])
    iter_num, best_val_loss, lora_run = checkpoint['iter_num'], checkpoint['best_val_loss'], checkpoint.get('lora')
    saved = (sharded_ckpt or checkpoint_path('ckpt.pt'), iter_num)
    if checkpoint['tokenizer'] != meta['tokenizer']:
        fail(f"--init_from=resume: {data_dir} was tokenized with another tokenizer than {out_dir}'s run "
             f"(which trained on --dataset={checkpoint['config'].get('dataset')!r}): resume on that data", 2)
    check_lora_flags(lora_run)
    if max_iters <= iter_num and not eval_only:
        print(f"nothing to do: {checkpoint_path('ckpt.pt')} is at step {iter_num} and --max_iters={max_iters}")
        sys.exit(0)
else:
    held = run_files(out_dir)
    if held and not overwrite:
        fail(f"--out_dir={out_dir!r} already holds a run ({', '.join(held)}): resume it with --init_from=resume, "
             f"pick another out_dir, or pass --overwrite=True to replace it", 2)
if init_from.startswith(('ckpt:', 'hf:')):  # a new run from trained weights
    source = init_from.split(':', 1)[1]
    try:
        init_model, init_ckpt = load_model(source, dtype=torch.float32)
    except CheckpointError as e:
        fail(e)
    model_args = architecture_from(init_ckpt['model_args'])
    if init_ckpt['tokenizer'] != meta['tokenizer']:
        fail(f"{source} was trained with another tokenizer than {data_dir}'s: prepare the data "
             f"with --tokenizer_from=<the model's dataset directory>")
    if lora_rank:
        lora_config = {'rank': lora_rank, 'alpha': lora_alpha, 'dropout': lora_dropout,
                       'targets': lora_targets.split(',')}
        lora_run = lora_checkpoint_fields(lora_config, init_ckpt['path'])
if lora_rank and init_from == 'scratch':
    fail("--lora_rank adapts a trained model: start from it with --init_from=ckpt:PATH", 2)
if model_args['vocab_size'] < meta['vocab_size']:
    fail(f"vocab_size={model_args['vocab_size']} is smaller than the dataset's {meta['vocab_size']}", 2)
try:
    gptconf = ModelConfig(**model_args)
except (TypeError, ValueError) as e:
    fail(e, 2)
if gptconf.n_routed_experts % ep:  # the checkpoint's architecture, which the flag rules did not see
    fail(f"--ep={ep} must divide the model's n_routed_experts ({gptconf.n_routed_experts})", 2)
globals().update(model_args)  # block_size and friends as the model has them
config.update(model_args)     # the checkpoint records what this run actually used


def shard_paths(split):
    try:
        paths = split_shards(data_dir, split)
        lengths = [len(read_shard(p)) for p in paths]
    except ValueError as e:
        fail(e)
    usable = [n - block_size for n in lengths if n > block_size]
    if not usable:
        fail(f"no {split} shard in {data_dir} holds more than block_size={block_size} tokens")
    paths = [p for p, n in zip(paths, lengths) if n > block_size]
    return paths, np.cumsum(usable), doc_starts(paths)


def doc_starts(paths):
    """Instruction data (prepare.py --format): each shard's example starts, from its mask; None for plain text."""
    masked = [os.path.exists(mask_path(p)) for p in paths]
    if not any(masked):
        return None
    if not all(masked):
        fail(f"{data_dir}: some shards have a .mask.bin and some do not: prepare the dataset again")
    try:
        masks = [read_mask(mask_path(p)) for p in paths]
    except ValueError as e:
        fail(e)
    if any(len(m) != len(read_shard(p)) for m, p in zip(masks, paths)):
        fail(f"{data_dir}: a mask's length differs from its shard's: prepare the dataset again")
    return [np.flatnonzero(m & DOC_START) for m in masks]


shards = {split: shard_paths(split) for split in ('train', 'val')}


def keep_log_until(step):
    """A resumed run's log.jsonl without what it logs again (its checkpoint's step and after, which an
    interrupted run may have logged too) and without a last line cut short by a kill."""
    try:
        with open(checkpoint_path('log.jsonl'), encoding='utf-8') as f:
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            if line.endswith('\n') and json.loads(line)['iter'] < step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    write_text(checkpoint_path('log.jsonl'), ''.join(kept))

# -----------------------------------------------------------------------------
# processes and devices

if ddp and backend == 'nccl' and int(os.environ.get('LOCAL_WORLD_SIZE', 1)) > torch.cuda.device_count():
    if int(os.environ.get('LOCAL_RANK', 0)) == 0:  # every process stops; one says why
        print(f"train.py: error: {os.environ.get('LOCAL_WORLD_SIZE')} processes on this node and "
              f"{torch.cuda.device_count()} GPU(s): run torchrun with --nproc_per_node={torch.cuda.device_count()} "
              f"or fewer, or train on CPUs with --device=cpu --backend=gloo", file=sys.stderr)
    sys.exit(2)
if ddp:
    dist.init_process_group(backend=backend)
    rank = dist.get_rank()
    if backend == 'nccl':
        device = f'cuda:{int(os.environ["LOCAL_RANK"])}'
        torch.cuda.set_device(device)
    else:
        device = 'cpu'
    gradient_accumulation_steps //= world_size
else:
    rank = 0
master = rank == 0
device_type = 'cuda' if 'cuda' in device else 'mps' if 'mps' in device else 'cpu'
if memory_limit_gib:  # before the first allocation, so the cap holds for the whole run
    gpu = torch.device(device).index or 0  # plain 'cuda' is GPU 0 here; under torchrun device has its index
    device_gib = torch.cuda.get_device_properties(gpu).total_memory / 2**30
    if memory_limit_gib > device_gib:
        fail(f"--memory_limit_gib={memory_limit_gib}: more than the {device_gib:.1f} GiB of {device}", 2)
    torch.cuda.set_per_process_memory_fraction(memory_limit_gib / device_gib, gpu)
tokens_per_iter = gradient_accumulation_steps * world_size * batch_size * block_size
if master:
    try:  # one run at a time in an out_dir: the lock is held until this process ends
        out_dir_lock = lock_dir(writable_dir(out_dir))
    except (OSError, CheckpointError) as e:
        fail(f"--out_dir={out_dir!r}: {e}", 2)
    for name in glob.glob(checkpoint_path('*.tmp')):  # left by a process that was killed mid-write
        remove_path(name)
    if init_from != 'resume':  # a new run starts clean: an old log.jsonl or tb/ would be appended to
        for name in ('ckpt.pt', 'best.pt', 'log.jsonl', 'loss.png', 'expert_load.png', 'tb'):  # .dcp: relink
            remove_path(checkpoint_path(name))
        for which in ('latest', 'best'):
            relink(out_dir, which)
    else:
        keep_log_until(iter_num)
    print(f"tokens per iteration: {tokens_per_iter:,} ({world_size} processes)")
torch.manual_seed(seed + rank)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
ptdtype = DTYPES[dtype]
ctx = nullcontext() if dtype == 'float32' else torch.autocast(device_type=device_type, dtype=ptdtype)


def get_batch(split, rng):
    """batch_size random windows -> x, y, doc_ids. The rng is shared by all ranks (each takes its
    own rows), so the samples depend on the step, not on how many processes share it, and resume
    exactly. Instruction data: windows start at an example, targets outside responses are -1 (no
    loss), and doc_ids [B, T] keep attention inside each packed example; plain text: doc_ids None."""
    paths, ends, starts_of_docs = shards[split]
    try:
        windows = read_windows(paths, ends, rng.integers(0, ends[-1], size=batch_size), block_size + 1, starts_of_docs)
    except (OSError, ValueError, IndexError) as e:
        fail(f"{data_dir} changed under the run ({one_line(e)}): prepare it again and resume")
    if starts_of_docs is None:  # [B, T + 1] tokens, one copy to the device
        batch = to_device(windows)
        return batch[:, :-1], batch[:, 1:], None
    return to_device(windows).unbind(1)  # [B, 3, T]: x, y, doc_ids


def to_device(array):
    """A host array to the device. CUDA: through pinned memory, asynchronously, so the copy overlaps
    the step in flight; torch's pinned-memory cache hands the buffer out again once the copy is done."""
    if device_type != 'cuda':
        return torch.from_numpy(array).to(device)
    pinned = torch.empty(array.shape, dtype=torch.int64, pin_memory=True)
    pinned.numpy()[:] = array
    return pinned.to(device, non_blocking=True)


def batch_rng(step, micro_step, split='train'):
    """The generator of one global micro-batch slot: rank r takes slots r*accum .. (r+1)*accum - 1."""
    return np.random.default_rng([seed, step, rank * gradient_accumulation_steps + micro_step, split == 'val'])

# -----------------------------------------------------------------------------
# model, optimizer, checkpoint

if lora_run is not None and checkpoint is not None:  # resuming a LoRA run: its base, then its adapters
    try:
        model = load_with_adapters(checkpoint, checkpoint_path('ckpt.pt'))
    except CheckpointError as e:
        fail(e)
else:
    model = Transformer(gptconf)
    weights = checkpoint.get('model') if checkpoint is not None else init_model.state_dict() if init_model else None
    if weights is not None:
        model.load_state_dict(weights)
    if lora_run is not None:
        try:
            adapted = add_lora(model, **lora_run['config'])
        except ValueError as e:
            fail(e)
        if master:
            kinds = sorted({a.rsplit('.', 1)[1] for a in adapted})
            print(f"LoRA rank {lora_rank} on {len(adapted)} weights: {', '.join(kinds)}")
init_model = None
model.train().to(device)
if fp8:
    kept_bf16 = use_fp8(model)
    if master and kept_bf16:
        print(f"fp8: {len(kept_bf16)} weights stay bf16 (sizes not multiples of 16, or experts without fp8 "
              f"grouped matmuls on this GPU), e.g. {kept_bf16[0]}")
if activation_checkpointing:  # keep only each block's input; recompute the rest in the backward
    for block in model.blocks():
        block.recompute = True
if master:
    print(f"parameters: {model.num_params() / 1e6:.2f}M total, {model.num_params(active=True) / 1e6:.2f}M active per token")
    trainable, total = num_trainable(model), sum(p.numel() for p in model.parameters())
    print(f"trainable: {trainable:,} of {total:,} parameters ({trainable / total:.2%})")

sharding = Sharding(model, fsdp, ep, device_type, ptdtype) if sharded else None
scaler = torch.amp.GradScaler(device_type, enabled=(dtype == 'float16'))
if checkpoint is not None and checkpoint['config'].get('optimizer', 'adamw') != config['optimizer']:
    fail(f"--optimizer={config['optimizer']!r}: {checkpoint_path('ckpt.pt')} was trained with "
         f"{checkpoint['config'].get('optimizer', 'adamw')!r}; resume with that", 2)
optimizer = model.configure_optimizers(weight_decay, learning_rate, (beta1, beta2), device_type,
                                       muon_lr=(muon_lr or learning_rate) if optimizer == 'muon' else 0.0,
                                       muon_momentum=muon_momentum)
if checkpoint is not None:
    if sharded_ckpt:
        load_sharded(sharded_ckpt, model, optimizer, sharding)
    else:
        optimizer.load_state_dict(checkpoint['optimizer'])
    scaler.load_state_dict(checkpoint['scaler'])
    if not ddp and not sharded_ckpt:  # each rank's dropout stream is its own; one process continues exactly
        torch.set_rng_state(checkpoint['rng']['cpu'])
        if device_type == 'cuda' and checkpoint['rng']['cuda'] is not None:
            torch.cuda.set_rng_state(checkpoint['rng']['cuda'])
checkpoint = None

raw_model = model
if compile and (compile_regions or sharded):  # sharded: each block inside FSDP2's gathers
    model.compile_regions(compile_mode)
elif compile:
    model = torch.compile(model, mode=compile_mode)
if sharded:
    model = sharding.model
elif ddp:
    # biases are kept equal by all-reducing the loads (below), so no buffer broadcast per step
    model = DDP(model, device_ids=[torch.cuda.current_device()] if backend == 'nccl' else None,
                broadcast_buffers=False)
eval_model = model.module if isinstance(model, DDP) else model  # no DDP hooks for forward-only passes

# Autocast casts each float32 matmul weight to bf16/fp16 in every micro-step's forward, and casts its
# gradient back in the backward for autograd to add. With several micro-steps, the forward runs instead on
# working copies made once a step, and each micro-step's gradients are added into the float32 ones: the
# same sums of the same low-precision gradients, with fewer bytes moved. Embeddings are not autocast (their
# lookup stays float32); DDP and FSDP reduce the parameters' own gradients, and activation checkpointing
# would recompute on the parameters, so those runs keep autocast's casts.
working, masters = {}, []  # parameter name -> its working copy; the float32 parameters, in that order
if (cast_weights_once and gradient_accumulation_steps > 1 and ptdtype != torch.float32
        and not (ddp or sharded or activation_checkpointing)):
    embeddings = {id(m.weight) for m in raw_model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if p.dim() >= 2 and id(p) not in embeddings:
            working[name] = p.detach().to(ptdtype).requires_grad_(p.requires_grad)
            masters.append(p)
copies = list(working.values())


def train_forward(*args, **kwargs):
    """The training forward: on the working copies where there are any."""
    return torch.func.functional_call(model, working, args, kwargs) if working else model(*args, **kwargs)


def add_copy_gradients():
    """A micro-step's gradients of the working copies, added into the float32 weights' own."""
    for p, c in zip(masters, copies):
        if c.grad is not None:
            p.grad = c.grad.float() if p.grad is None else p.grad.add_(c.grad)
            c.grad = None


def on_disk(write, *args):
    """write(*args); a write that fails (a full disk, a read-only place) ends the run in one line."""
    try:
        write(*args)
    except OSError as e:
        write_failed(e)


def write_failed(e):
    fail(f"cannot write into {out_dir} ({e.strerror or one_line(e)}){kept()}")


def write_in_background(write, done=None):
    """write() in a thread while training goes on, one at a time; done = (path, step) of the checkpoint
    it writes becomes `saved` once that is on disk. An eval's checkpoint and figures cost the loop
    ~0.1 s (the host copy) instead of ~0.9 s (35M parameters with their AdamW state, on a CPU core;
    notes/training.md 14)."""
    global writing
    finish_writing()
    errors = []

    def run():
        try:
            write()
        except BaseException as e:  # raised in the main thread by finish_writing
            errors.append(e)
    thread = threading.Thread(target=run, name='checkpoint writer')
    thread.start()
    writing = (thread, done, errors)


def finish_writing(quietly=False):
    """Waits for the checkpoint being written; its error (a full disk) ends the run in one line, as a
    write in the loop itself would, unless quietly (the run is ending anyway)."""
    global writing, saved
    if writing is None:
        return
    thread, done, errors = writing
    thread.join()
    writing = None
    if errors and not quietly:
        if not isinstance(errors[0], OSError):
            raise errors[0]
        write_failed(errors[0])
    elif not errors and done:
        saved = done


def write_eval_files(save, improved):
    """What an eval leaves in out_dir, written in the background: ckpt.pt (and best.pt if improved)
    from a host copy of the run's state taken now, if save; the figures, from the log as it is now."""
    ckpt = host_copy(run_state()) if save else None
    records = read_log()

    def write():
        if ckpt is not None:
            relink(out_dir, 'latest')  # a sharded run's ckpt.dcp, if this out_dir had one, is older
            save_checkpoint(ckpt, checkpoint_path('ckpt.pt'))
            if improved:
                link_best()
        plot_losses(records)
        plot_expert_load(records)
    write_in_background(write, (checkpoint_path('ckpt.pt'), iter_num) if save else None)


def save_sharded_checkpoints(improved):
    """Every rank writes its part of ckpt.dcp (and best.dcp if improved), together, now."""
    global saved
    info = {'model_args': model_args, 'iter_num': iter_num, 'best_val_loss': best_val_loss, 'config': config,
            'tokenizer': meta['tokenizer'], 'scaler': scaler.state_dict()}
    for which, name in [('latest', 'ckpt.pt'), ('best', 'best.pt')][:1 + improved]:
        save_sharded(out_dir, which, iter_num, raw_model, optimizer, sharding, info)
        if master and os.path.exists(checkpoint_path(name)):  # a stale plain copy would shadow it
            os.remove(checkpoint_path(name))
    saved = (sharded_checkpoint(out_dir), iter_num)


def run_state():
    """What ckpt.pt holds: self-contained (LoRA: the adapters alone, beside their base's path)."""
    weights = lora_state_dict(raw_model) if lora_run else raw_model.state_dict()
    return {'model': weights, 'optimizer': optimizer.state_dict(), 'scaler': scaler.state_dict(),
            'model_args': model_args, 'iter_num': iter_num, 'best_val_loss': best_val_loss, 'config': config,
            'tokenizer': meta['tokenizer'], **({'lora': lora_run} if lora_run else {}),
            'rng': {'cpu': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state() if device_type == 'cuda' else None}}


def link_best():
    """best.pt: the ckpt.pt just written under a second name (a hard link, so not written twice; a
    later ckpt.pt is renamed over that name and leaves best.pt's file as it was), or a copy of it
    where the file system has no hard links."""
    relink(out_dir, 'best')  # a sharded run's best.dcp, if this out_dir had one, is older
    with atomic_path(checkpoint_path('best.pt')) as tmp:
        try:
            os.link(checkpoint_path('ckpt.pt'), tmp)
        except OSError:
            shutil.copyfile(checkpoint_path('ckpt.pt'), tmp)


@torch.no_grad()
def estimate_loss():
    """Mean cross-entropy over the same eval_iters batches every time, split across ranks."""
    out = {}
    model.eval()
    for split in ('train', 'val'):
        total = torch.zeros(2, device=device)
        # as many passes on every rank (a sharded model gathers in each), the extra ones weighing 0
        for k in range(rank, -(-eval_iters // world_size) * world_size, world_size):
            X, Y, D = get_batch(split, np.random.default_rng([seed, k, 7]))
            weight = torch.tensor(float(k < eval_iters), device=device)
            with ctx:
                ce = eval_model(X, Y, doc_ids=D, return_logits=False)[2]['ce']
                total += torch.stack([ce.float() * weight, weight])
        if ddp:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


def get_lr(it):
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def log(record):
    with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')


def figure(**kwargs):
    """A matplotlib figure of its own (no pyplot state), drawn by whichever thread writes it."""
    from matplotlib.figure import Figure
    return Figure(**kwargs)


def read_log():
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f]


def plot_losses(records):
    """out_dir/loss.png from the log's records, for a person to look at."""
    fig = figure(figsize=(7, 4))
    ax = fig.subplots()
    train = [r for r in records if r['kind'] == 'train']
    ax.plot([r['iter'] for r in train], [r['ce'] for r in train], lw=0.8, alpha=0.6, label='train (batch)')
    for split in ('train', 'val'):
        evals = [r for r in records if r['kind'] == 'eval']
        ax.plot([r['iter'] for r in evals], [r[split] for r in evals], marker='o', label=f'{split} (eval)')
    ax.set(xlabel='iteration', ylabel='cross-entropy', title=f'{dataset}: {out_dir}')
    ax.legend()
    with atomic_path(os.path.join(out_dir, 'loss.png')) as tmp:
        fig.savefig(tmp, format='png', dpi=100, bbox_inches='tight')


def plot_expert_load(records):
    """out_dir/expert_load.png: each MoE layer's load (1 = a fair share) per expert over training."""
    train = [r for r in records if r['kind'] == 'train' and r.get('load')]
    if not train:
        return
    load = np.array([r['load'] for r in train])  # [logs, layers, experts]
    n_layers, n_experts = load.shape[1:]
    fig = figure(figsize=(8, 1.2 + 0.12 * n_experts * n_layers))
    axes = fig.subplots(n_layers, 1, squeeze=False, sharex=True)
    half = log_interval / 2  # each log's column centred on its step (and a width when there is one log)
    extent = (train[0]['iter'] - half, train[-1]['iter'] + half, n_experts - 0.5, -0.5)
    for i, ax in enumerate(axes[:, 0]):
        im = ax.imshow(load[:, i].T * n_experts, aspect='auto', extent=extent, interpolation='nearest')
        ax.set(ylabel=f'MoE layer {i}\nexpert')
    axes[-1, 0].set(xlabel='iteration')
    fig.colorbar(im, ax=axes[:, 0], label='load / fair share')
    with atomic_path(os.path.join(out_dir, 'expert_load.png')) as tmp:
        fig.savefig(tmp, format='png', dpi=100, bbox_inches='tight')


def tensorboard_writer():
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(os.path.join(out_dir, 'tb'))


def tensorboard_expert_load(tb, shares, step):
    """One histogram per MoE layer whose buckets are the experts, filled with their load."""
    experts = np.arange(shares.shape[1])
    for i, s in enumerate(shares):
        tb.add_histogram_raw(f'expert_load/layer{i}', min=0, max=len(s) - 1, num=1.0, sum=float(experts @ s),
                             sum_squares=float(experts ** 2 @ s), bucket_limits=(experts + 0.5).tolist(),
                             bucket_counts=s.tolist(), global_step=step)

# -----------------------------------------------------------------------------
# training loop


X, Y, D = get_batch('train', batch_rng(iter_num, 0))
start_iter = iter_num  # a resumed run does not rewrite the checkpoint it started from
# Nothing in a step reads the GPU back to the host: the host queues steps ahead of the GPU (and reads
# the next batch meanwhile) until a log line's .item() waits for them; step times are averages over that.
t0, timed_steps = time.time(), 0  # since the last log line or eval
local_iter_num, running_mfu = 0, -1.0
tb = tensorboard_writer() if tensorboard and master else None
shares = None  # the last logged expert load, each layer's fractions of its tokens [n_moe_layers, E]
while True:
    lr = get_lr(iter_num) if decay_lr else learning_rate
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)

    if iter_num % eval_interval == 0 or iter_num == max_iters:
        losses = estimate_loss()
        if not all(map(math.isfinite, losses.values())):
            fail(f"eval loss is {losses} at step {iter_num}: stopping; the last good checkpoint is untouched")
        if master:
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            on_disk(log, {'kind': 'eval', 'iter': iter_num, **losses, 'lr': lr})
            if tb:
                for split, value in losses.items():
                    tb.add_scalar(f'eval/{split}', value, iter_num)
                if shares is not None:
                    tensorboard_expert_load(tb, shares, iter_num)
                tb.flush()
        improved = losses['val'] < best_val_loss  # the same on every rank: the losses are all-reduced
        best_val_loss = min(best_val_loss, losses['val'])
        save = iter_num > start_iter and (improved or always_save_checkpoint)
        if save and sharded:  # every rank writes its part, together, now
            on_disk(save_sharded_checkpoints, improved)
        if iter_num > start_iter and master:
            write_eval_files(save and not sharded, improved)
            if save:
                print(f"saved checkpoint to {out_dir}")
        t0, timed_steps = time.time(), 0
    if iter_num == max_iters or eval_only:
        break

    load = 0.0
    if copies:
        with torch.no_grad():
            torch._foreach_copy_(copies, masters)
    for micro_step in range(gradient_accumulation_steps):
        if sharded:  # sync gradients only on the last micro-step
            sharding.set_gradient_sync(micro_step == gradient_accumulation_steps - 1)
        elif ddp:
            model.require_backward_grad_sync = micro_step == gradient_accumulation_steps - 1
        with ctx:
            _, loss, stats = train_forward(X, Y, doc_ids=D, return_logits=False)
            loss = loss / gradient_accumulation_steps
        load = load + (stats['load'] if stats['load'] is not None else 0.0)
        last = micro_step == gradient_accumulation_steps - 1
        X, Y, D = get_batch('train', batch_rng(iter_num + last, 0 if last else micro_step + 1))
        scaler.scale(loss).backward()
        add_copy_gradients()
    if sharded:
        sharding.sync_expert_grads()
    grad_norm = None
    if grad_clip != 0.0 or iter_num % log_interval == 0:  # without clipping, the norm only for the log
        scaler.unscale_(optimizer)
        clip = sharding.clip_grad_norm if sharded else torch.nn.utils.clip_grad_norm_
        grad_norm = clip(list(raw_model.parameters()), grad_clip or float('inf'))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    # the auxiliary-loss-free bias update, same on every rank; a LoRA run leaves the base (biases too) as it is
    if isinstance(load, torch.Tensor) and lora_run is None:
        if ddp:
            dist.all_reduce(load)
        raw_model.update_router_biases(load)

    timed_steps += 1
    if iter_num % log_interval == 0 and master:
        lossf = loss.item() * gradient_accumulation_steps  # waits for every step queued so far
        t1 = time.time()
        dt, t0, timed_steps = (t1 - t0) / timed_steps, t1, 0
        if not math.isfinite(lossf):
            fail(f"loss is {lossf} at step {iter_num}: stopping; the last good checkpoint is untouched")
        parts = {k: v.item() for k, v in stats.items() if k != 'load'}
        tokens_per_sec = tokens_per_iter / dt
        mfu = raw_model.estimate_mfu(tokens_per_sec / world_size, device)
        if local_iter_num >= 5 and mfu is not None:
            running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
        imbalance = (load.max(-1).values / load.mean(-1)).mean().item() if isinstance(load, torch.Tensor) else 1.0
        shares = (load / load.sum(-1, keepdim=True)).cpu().numpy() if isinstance(load, torch.Tensor) else None
        peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device_type == 'cuda' else None
        print(f"iter {iter_num}: loss {lossf:.4f} (ce {parts['ce']:.4f} bal {parts['balance']:.4f} "
              f"z {parts['z']:.4f} mtp {parts['mtp']:.4f}), lr {lr:.2e}, {dt * 1000:.0f}ms, "
              f"{tokens_per_sec:,.0f} tok/s, mfu {f'{running_mfu:.1%}' if running_mfu >= 0 else 'n/a'}, "
              f"load max/mean {imbalance:.2f}" + (f", peak mem {peak_gib:.2f} GiB" if peak_gib else ''))
        record = {'loss': lossf, **parts, 'lr': lr, 'ms': dt * 1000, 'tokens_per_sec': tokens_per_sec, 'mfu': mfu,
                  'grad_norm': grad_norm.item(), 'load_imbalance': imbalance, 'peak_gib': peak_gib}
        on_disk(log, {'kind': 'train', 'iter': iter_num, **record,
             'load': None if shares is None else shares.round(5).tolist()})
        if tb:
            for name, value in record.items():
                if value is not None:
                    tb.add_scalar(f'train/{name}', value, iter_num)
    iter_num += 1
    local_iter_num += 1

finish_writing()
if tb:
    tb.close()
if ddp:
    # No rank leaves before rank 0's last checkpoint is on disk (a rank that exits early can abort in
    # teardown, and torchrun then kills rank 0 mid-write); the DDP wrapper holds the process group, so
    # it goes first: gloo's threads then stop here, not during interpreter shutdown.
    dist.barrier()
    model = eval_model = sharding = None
    dist.destroy_process_group()
