"""
Poor man's configurator, strict edition. train.py and sample.py run it after defining their globals:
    exec(open('configurator.py').read())
so that
    python train.py config/my_run.py --batch_size=32 --compile=False
execs the config file (any argument without --), then overrides single globals (--key=value).
Only existing globals can be set and --key=value must keep their type, so a typo fails loudly.
Everything lives inside _configure so that no helper names leak into the caller's globals.
"""
import sys

def _configure(g, argv):
    import ast, builtins, difflib, types

    def fail(msg):
        sys.exit(f"configurator: {msg}")

    def unknown(key, known):
        close = difflib.get_close_matches(key, [k for k in known if not k.startswith('_')], n=1)
        return f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")

    for arg in argv:
        if not arg.startswith('--'):  # a config file: plain python that assigns existing globals
            try:
                with open(arg) as f:
                    src = f.read()
            except OSError as e:
                fail(f"cannot read config file {arg!r} ({e.strerror})")
            print(f"Overriding config with {arg}")
            before = set(g)
            exec(builtins.compile(src, arg, 'exec'), g)  # train.py has a global named compile
            new = [k for k in g if k not in before and not k.startswith('_') and not isinstance(g[k], types.ModuleType)]
            if new:
                fail(f"{arg}: {unknown(new[0], before)}")
            continue
        key, eq, raw = arg[2:].partition('=')
        if not eq:
            fail(f"expected --key=value, got {arg!r}")
        if key.startswith('_') or key not in g:
            fail(unknown(key, g))
        try:
            val = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            val = raw  # a bare word such as --dtype=bfloat16
        old = g[key]
        if isinstance(old, str):
            val = val if isinstance(val, str) else raw  # --out_dir=123 means the string '123'
        elif isinstance(old, float) and type(val) is int:
            val = float(val)
        elif old is not None and type(val) is not type(old):  # None takes anything; a bool is not an int
            fail(f"--{key} expects {type(old).__name__}, got {raw!r}")
        print(f"Overriding: {key} = {val}")
        g[key] = val

_configure(globals(), sys.argv[1:])
del _configure
