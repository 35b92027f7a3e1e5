"""
The one function that checks a script's flags, once, at start-up: every entry point lists its
rules in a table and calls check_flags after the configurator has run. A broken rule ends the run
with one line naming the flag, its value and what is allowed, and exit code 2 (a usage error).

    check_flags('sample.py', globals(), {
        'num_samples': positive,
        'temperature': non_negative,
        'top_p': fraction,
        'ckpt': one_of('latest', 'best'),
    })
"""
import sys


def usage_error(script, msg):
    print(f"{script}: error: {msg}", file=sys.stderr)
    sys.exit(2)


def rule(ok, allowed):
    """A rule: a predicate on the value and the words that say what is allowed."""
    return ok, allowed


positive = rule(lambda v: v > 0, "must be > 0")
non_negative = rule(lambda v: v >= 0, "must be >= 0")
fraction = rule(lambda v: 0 < v <= 1, "must be in (0, 1]")


def one_of(*choices):
    return rule(lambda v: v in choices, f"must be one of {', '.join(map(repr, choices))}")


def in_range(lo, hi):
    return rule(lambda v: lo <= v <= hi, f"must be in [{lo}, {hi}]")


def check_flags(script, values, rules):
    for name, (ok, allowed) in rules.items():
        if not ok(values[name]):
            usage_error(script, f"--{name}={values[name]!r}: {allowed}")
