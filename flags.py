"""
The one function that checks a script's flags, once, at start-up: every entry point lists its
rules in a table and calls check_flags after the configurator has run. A broken rule ends the run
with one line naming the flag, its value and what is allowed, and exit code 2 (a usage error).

    check_flags('sample.py', globals(), {
        'num_samples': positive,
        'temperature': non_negative,
        'top_p': fraction,
        'ckpt': one_of('latest', 'best'),
        'min_lr': [non_negative, at_most('learning_rate')],   # several rules: all must hold
    })

A rule is (ok, allowed): ok(value, flags) -> bool sees every flag, so a rule may compare flags;
allowed is the words for the error, or a function of the flags that returns them. Rules run in the
table's order: list a flag before the rules that compare other flags with it.

Also here, as every script needs them: the dtype names and the machine's defaults (the best device
present, the best dtype it computes in), and one_line, an exception as one line of text.
"""
import os
import signal
import sys

import torch

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def default_device():
    return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'


def default_dtype():
    if not torch.cuda.is_available():
        return 'float32'
    return 'bfloat16' if torch.cuda.is_bf16_supported() else 'float16'


def one_line(e):
    """An exception as 'TypeName: first line of its message'."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def out_of_memory(e):
    """A CUDA or host allocation that failed."""
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("can't allocate memory", 'not enough memory')))


def interrupt(signum, frame):
    raise KeyboardInterrupt


def end_in_one_line(script, memory_advice, note=lambda: ''):
    """Ctrl-C or SIGTERM, and running out of memory, end the script with one line on stderr instead
    of a traceback: exit code 130 after an interrupt (note() may add what was kept), 1 out of memory,
    with memory_advice (the settings that need less). Files being written are removed as the interrupt unwinds
    (prepare.atomic_path), so nothing half-written is left. Under torchrun only rank 0 speaks."""
    signal.signal(signal.SIGTERM, interrupt)

    def hook(kind, e, tb):
        if issubclass(kind, KeyboardInterrupt):
            msg, code = f"interrupted{note()}", 130
        elif out_of_memory(e):
            msg, code = f"out of memory ({one_line(e)}): {memory_advice}", 1
        else:
            return sys.__excepthook__(kind, e, tb)
        if os.environ.get('RANK', '0') == '0':
            print(f"{script}: {msg}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # an excepthook cannot end the process with a code of its own choosing otherwise
    sys.excepthook = hook


class UsageError(ValueError):
    """A bad or contradictory flag, found before anything is read or written: exit code 2 (bad data
    or a file that fails is 1)."""


def usage_error(script, msg):
    print(f"{script}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def rule(ok, allowed):
    """A rule on the value alone."""
    return lambda v, flags: ok(v), allowed


def cross_rule(ok, allowed):
    """A rule on the value and the other flags: ok(value, flags)."""
    return ok, allowed


positive = rule(lambda v: v > 0, "must be > 0")
non_negative = rule(lambda v: v >= 0, "must be >= 0")
fraction = rule(lambda v: 0 < v <= 1, "must be in (0, 1]")
non_empty = rule(lambda v: len(v) > 0, "must not be empty")
boolean = rule(lambda v: v is True or v is False, "must be True or False")


def one_of(*choices):
    return rule(lambda v: v in choices, f"must be one of {', '.join(map(repr, choices))}")


def in_range(lo, hi):
    return rule(lambda v: lo <= v <= hi, f"must be in [{lo}, {hi}]")


def below(hi):
    return rule(lambda v: 0 <= v < hi, f"must be in [0, {hi})")


def at_most(other):
    return cross_rule(lambda v, flags: v <= flags[other], lambda flags: f"must be <= {other} ({flags[other]!r})")


def less_than(other, unless=None):
    """v < flags[other], unless the flag named by `unless` is False (the rule then does not apply)."""
    return cross_rule(lambda v, flags: (unless is not None and not flags[unless]) or v < flags[other],
                      lambda flags: f"must be < {other} ({flags[other]!r})")


def divides(other):
    return cross_rule(lambda v, flags: flags[other] % v == 0, lambda flags: f"must divide {other} ({flags[other]!r})")


def needs_torchrun(off):
    """A flag that shards over processes: any value but `off` needs torchrun."""
    return rule(lambda v: v == off or 'WORLD_SIZE' in os.environ,
                "needs torchrun (torchrun --standalone --nproc_per_node=N train.py ...)")


def divides_world_size():
    world = int(os.environ.get('WORLD_SIZE', 1))
    return rule(lambda v: world % v == 0, f"must divide the number of processes ({world})")


def file_prefixed(prefix):
    """A value that is either text, or prefix + the path of a file that exists."""
    return rule(lambda v: not v.startswith(prefix) or os.path.isfile(v[len(prefix):]),
                f"{prefix} must name an existing file")


def device_exists():
    def ok(v):
        kind, _, index = v.partition(':')
        if kind == 'cpu':
            return not index
        if kind == 'cuda':
            in_range = not index or (index.isdigit() and int(index) < torch.cuda.device_count())
            return torch.cuda.is_available() and in_range
        if kind == 'mps':
            return not index and torch.backends.mps.is_available()
        return False

    def allowed(flags):
        present = ['cpu'] + ([f'cuda:0..{torch.cuda.device_count() - 1}'] if torch.cuda.is_available() else []) \
            + (['mps'] if torch.backends.mps.is_available() else [])
        return f"no such device on this machine (present: {', '.join(present)})"
    return cross_rule(lambda v, flags: ok(v), allowed)


cuda_for_nccl = rule(lambda v: v != 'nccl' or torch.cuda.is_available(), "needs CUDA GPUs; use --backend=gloo to train on CPUs")


def dtype_supported(device_flag='device'):
    """float32, bfloat16 or float16, where the device of flags[device_flag] computes in it."""
    def ok(v, flags):
        if v not in ('float32', 'bfloat16', 'float16'):
            return False
        return not (v == 'bfloat16' and flags[device_flag].startswith('cuda') and torch.cuda.is_available()
                    and not torch.cuda.is_bf16_supported())
    return cross_rule(ok, lambda flags: f"must be 'float32', 'bfloat16' or 'float16', and supported on "
                                        f"--{device_flag}={flags[device_flag]} (bfloat16 needs an Ampere or newer GPU)")


def check_flags(script, values, rules):
    for name, rules_of_flag in rules.items():
        for ok, allowed in rules_of_flag if isinstance(rules_of_flag, list) else [rules_of_flag]:
            try:
                good = ok(values[name], values)
            except TypeError:  # a config file may assign any type: '4' < 0 is a usage error too
                good = False
            if not good:
                words = allowed(values) if callable(allowed) else allowed
                usage_error(script, f"--{name}={values[name]!r}: {words}")
