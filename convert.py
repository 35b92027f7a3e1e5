"""
Conversions between the forms a model takes: Hugging Face directories, LoRA runs, sharded runs.

    python convert.py export --out_dir=out --ckpt=best --hf_dir=hf-model [--max_shard_size=500MB] [--overwrite]
    python convert.py import --hf_dir=hf-model --out_dir=out-imported [--block_size=4096] [--overwrite]
    python convert.py random --hf_dir=v2-lite [--preset=deepseek-v2-lite]   # transformers, random bf16 weights
    python convert.py merge --out_dir=out-lora [--ckpt=best] --to=out-merged [--overwrite]
    python convert.py to_plain --out_dir=out-scale [--ckpt=best]

export: a checkpoint -> a DeepSeek-V3/V2 directory that transformers, vLLM and SGLang load (hf.py;
a LoRA run writes its base, and its adapters in PEFT's format in hf-model/adapter).
import: such a directory -> out_dir/ckpt.pt, a checkpoint that sample.py, eval.py and train.py
(--init_from=ckpt:DIR) read. Every script also reads the directory directly.
merge: a LoRA run -> a plain checkpoint with the adapters folded in, which needs no base.
to_plain: a sharded run's DCP checkpoint -> the single-file checkpoint (weights, optimizer, step).
Outputs are written whole or not at all: an export replaces its directory (a non-empty one only with
--overwrite, a training run's never); import and merge refuse to replace a training run without
--overwrite, and merge never writes where its LoRA run or that run's base lives.
Errors are one line on stderr: exit code 2 for a usage error, 1 for a checkpoint or file that fails.
"""
import argparse
import os
import re
import sys

import torch

from checkpoint import FILES, SHARDED_FILES, CheckpointError, checkpoint_file, load_model, lock_dir, \
    read_checkpoint, run_files, save_checkpoint
from flags import UsageError, end_in_one_line
from hf import PRESETS, HFError, adapter_summary, export, missing_root, peft_adapter, random_dir
from model import ModelConfig, Transformer
from parallel import load_sharded, read_sharded_meta, sharded_checkpoint
from prepare import remove_path, writable_dir


def fail(msg, code=1):
    print(f"convert.py: error: {msg}", file=sys.stderr)
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, as every usage error here, not argparse's usage block
        fail(message, 2)


def parse_size(text):
    """'500MB', '5GB', '1024' -> bytes."""
    m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMG]?)B?\s*', text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: expected bytes or a size such as 500MB or 5GB")
    return int(float(m.group(1)) * 1024 ** ' KMG'.index(m.group(2) or ' '))


def context_size(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of tokens") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n}: must be >= 0 (0 = the config's)")
    return n


def check_writable(path):
    """The directory an output goes into, or the nearest existing one above where it is yet to be
    made, must take new files (not read-only, not a file): refused before any work, not after it."""
    made = missing_root(path)
    writable_dir(os.path.dirname(made) if made else path)


def check_hf_target(hf_dir, overwrite):
    """An --hf_dir export (or random) may replace whole: never a training run's directory, which it
    would shadow (every script reads a directory with a config.json as a Hugging Face one), and
    anything else already there only with --overwrite."""
    if os.path.lexists(hf_dir) and not os.path.isdir(hf_dir):
        raise UsageError(f"--hf_dir={hf_dir} is a file, not a directory")
    if os.path.isdir(hf_dir):
        held = run_files(hf_dir)
        if held:
            raise UsageError(f"--hf_dir={hf_dir} holds a training run ({', '.join(held)}): an export there "
                             "would shadow it for every script; pick another --hf_dir")
        if os.listdir(hf_dir) and not overwrite:
            raise UsageError(f"--hf_dir={hf_dir} is not empty: pass --overwrite to replace it whole, "
                             "or pick another --hf_dir")
    check_writable(os.path.dirname(os.path.abspath(hf_dir)))


def check_checkpoint_target(out_dir, flag, overwrite):
    """A directory import or merge writes ckpt.pt in: not a Hugging Face directory (it would hold
    both), and a training run only with --overwrite (the run is replaced, not resumable any more)."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"{flag}={out_dir} is a file, not a directory")
    if os.path.isfile(os.path.join(out_dir, 'config.json')):
        raise UsageError(f"{flag}={out_dir} is a Hugging Face directory: a ckpt.pt beside its config.json "
                         f"would make it ambiguous; pick another {flag}")
    held = run_files(out_dir)
    if held and not overwrite:
        raise UsageError(f"{flag}={out_dir} holds a training run ({', '.join(held)}): pass --overwrite to "
                         f"replace it, or pick another {flag}")
    check_writable(out_dir)


def checkpoint_into(out_dir, obj):
    """out_dir/ckpt.pt, written atomically; then the rest of a run it replaces (--overwrite) goes, so
    nothing of that run is mixed with it -> the path. Directories made for it go again if it fails."""
    made = missing_root(out_dir)
    path = os.path.join(out_dir, 'ckpt.pt')
    try:
        with lock_dir(writable_dir(out_dir)):  # not while train.py runs there
            write_checkpoint(obj, path)
            for name in run_files(out_dir):
                if name != 'ckpt.pt':
                    remove_path(os.path.join(out_dir, name))
    except BaseException:
        if made:
            remove_path(made)
        raise
    return path


def write_checkpoint(obj, path):
    """save_checkpoint; a failed write (a full disk) is one line naming path and what is left there."""
    try:
        save_checkpoint(obj, path)
    except OSError as e:
        kept = 'the earlier one is as it was' if os.path.exists(path) else 'nothing was written'
        raise OSError(f"cannot write {path} ({e.strerror or e}): {kept}") from None


def export_main(args):
    check_hf_target(args.hf_dir, args.overwrite)
    model, ckpt = load_model(args.out_dir, args.ckpt, fold_adapters=False)
    adapter = peft_adapter(model, ckpt['lora']['config'], args.hf_dir) if 'lora' in ckpt else None
    notes = export(model, ckpt['tokenizer'], args.hf_dir, args.max_shard_size, adapter)
    print(f"wrote {args.hf_dir}; dropped: {'; '.join(notes)}")
    if adapter:
        adapter_json, _, _ = adapter
        print(adapter_summary(adapter_json, args.hf_dir))


def import_main(args):
    if not os.path.isdir(args.hf_dir):
        raise CheckpointError(f"--hf_dir={args.hf_dir}: no such directory")
    if not os.path.isfile(os.path.join(args.hf_dir, 'config.json')):
        held = run_files(args.hf_dir)
        if held:
            raise CheckpointError(f"--hf_dir={args.hf_dir} is a training run ({', '.join(held)}), not a Hugging "
                                  f"Face directory: every script reads it directly (--out_dir={args.hf_dir})")
        raise CheckpointError(f"--hf_dir={args.hf_dir} is not a Hugging Face directory: it has no config.json")
    check_checkpoint_target(args.out_dir, '--out_dir', args.overwrite)
    model, ckpt = load_model(args.hf_dir, block_size=args.block_size or None)
    path = checkpoint_into(args.out_dir, {'model': model.state_dict(), 'model_args': ckpt['model_args'],
                                          'tokenizer': ckpt['tokenizer']})
    print(f"wrote {path}" + (f"; dropped: {'; '.join(ckpt['dropped'])}" if ckpt['dropped'] else ''))


def merge_main(args):
    path = checkpoint_file(args.out_dir, args.ckpt)
    lora = read_checkpoint(path).get('lora')
    if lora is None:
        raise CheckpointError(f"{path} has no adapters: it is already a plain checkpoint")
    for what, where in (('the LoRA run', path), ('its base', lora['base'])):
        home = where if os.path.isdir(where) else os.path.dirname(os.path.abspath(where))
        if os.path.realpath(args.to) == os.path.realpath(home):
            raise UsageError(f"--to={args.to} is where {what} lives ({where}): the merged ckpt.pt would replace "
                             "what it is made from; pick another --to")
    check_checkpoint_target(args.to, '--to', args.overwrite)
    model, ckpt = load_model(path)
    merged = {'model': model.state_dict(), 'model_args': ckpt['model_args'], 'tokenizer': ckpt['tokenizer'],
              'merged_from': {'adapters': path, **ckpt['lora']}}
    print(f"merged {path} into {checkpoint_into(args.to, merged)}")


def to_plain_main(args):
    path = sharded_checkpoint(args.out_dir, args.ckpt)
    if path is None:
        where = os.path.join(args.out_dir, SHARDED_FILES[args.ckpt])
        raise CheckpointError(f"no sharded checkpoint at {where} (a run with --fsdp or --ep writes one)")
    meta = read_sharded_meta(path)
    model = Transformer(ModelConfig(**meta['model_args']))
    c = meta['config']
    optimizer = model.configure_optimizers(c['weight_decay'], c['learning_rate'], (c['beta1'], c['beta2']), 'cpu')
    load_sharded(path, model, optimizer)
    out = os.path.join(args.out_dir, FILES[args.ckpt])
    write_checkpoint({**meta, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                     'rng': {'cpu': torch.get_rng_state(), 'cuda': None}}, out)
    print(f"wrote {out} from {os.path.realpath(path)}")


def parser():
    ap = Parser(prog='python convert.py', description=__doc__.strip().split('\n\n')[0])
    sub = ap.add_subparsers(dest='command', required=True)
    ex = sub.add_parser('export', help='a checkpoint -> a Hugging Face directory')
    ex.add_argument('--out_dir', required=True, help="train.py's out_dir (or a checkpoint file)")
    ex.add_argument('--ckpt', default='latest', choices=['latest', 'best'])
    ex.add_argument('--hf_dir', required=True)
    ex.add_argument('--max_shard_size', default='5GB', type=parse_size,
                    help='split model.safetensors past this size (e.g. 500MB)')
    ex.add_argument('--overwrite', action='store_true', help='replace what --hf_dir holds, whole')
    im = sub.add_parser('import', help='a Hugging Face directory -> out_dir/ckpt.pt')
    im.add_argument('--hf_dir', required=True)
    im.add_argument('--out_dir', required=True)
    im.add_argument('--block_size', type=context_size, default=0, help="cap the context (0 = the config's)")
    im.add_argument('--overwrite', action='store_true', help='replace the training run --out_dir holds')
    rnd = sub.add_parser('random', help="transformers writes a DeepSeek-shaped model with random weights")
    rnd.add_argument('--hf_dir', required=True)
    rnd.add_argument('--preset', default='deepseek-v2-lite', choices=sorted(PRESETS))
    rnd.add_argument('--overwrite', action='store_true', help='replace what --hf_dir holds, whole')
    mg = sub.add_parser('merge', help="a LoRA run -> a plain checkpoint (base + adapters folded)")
    mg.add_argument('--out_dir', required=True, help='the LoRA run (or its checkpoint file)')
    mg.add_argument('--ckpt', default='latest', choices=['latest', 'best'])
    mg.add_argument('--to', required=True, help='directory for the merged ckpt.pt')
    mg.add_argument('--overwrite', action='store_true', help='replace the training run --to holds (never its own)')
    tp = sub.add_parser('to_plain', help="a sharded run's checkpoint -> out_dir/ckpt.pt (or best.pt)")
    tp.add_argument('--out_dir', required=True, help='the sharded run')
    tp.add_argument('--ckpt', default='latest', choices=['latest', 'best'])
    return ap


def random_main(args):
    check_hf_target(args.hf_dir, args.overwrite)
    random_dir(args.hf_dir, PRESETS[args.preset])


COMMANDS = {'export': export_main, 'import': import_main, 'merge': merge_main, 'to_plain': to_plain_main,
            'random': random_main}

if __name__ == '__main__':
    end_in_one_line('convert.py', 'convert on a machine with more memory')
    args = parser().parse_args()
    try:
        COMMANDS[args.command](args)
    except UsageError as e:
        fail(e, 2)
    except (CheckpointError, HFError, OSError, ValueError) as e:
        fail(e)
