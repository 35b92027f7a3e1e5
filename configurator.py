"""
Poor man's configurator, strict edition. train.py and sample.py run it after defining their globals:
    exec(open('configurator.py').read())
so that
    python train.py config/my_run.py --batch_size=32 --compile=False
execs the config file (any argument without --), then overrides single globals (--key=value).
Only existing globals can be set and they must keep their type, so a typo fails loudly.
Errors are one line on stderr and exit code 2 (a usage error).
Everything lives inside _configure so that no helper names leak into the caller's globals; the names
a file or a flag set are left in __flags_given__ (for rules such as resume's, see train.py).
"""
import sys

def _configure(g, argv):
    import ast, builtins, difflib, traceback, types

    def fail(msg):
        print(f"configurator: {msg}", file=sys.stderr)
        sys.exit(2)

    def unknown(key, known):
        close = difflib.get_close_matches(key, [k for k in known if not k.startswith('_')], n=1)
        return f"unknown config key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")

    def typed(key, old, val, where):
        """val in the type of the global's old value, or a usage error."""
        if isinstance(old, str):
            return val if isinstance(val, str) else where[1]  # --out_dir=123 means the string '123'
        if isinstance(old, float) and type(val) is int:
            return float(val)
        if old is not None and type(val) is not type(old):  # None takes anything; a bool is not an int
            fail(f"{where[0]}{key} expects {type(old).__name__}, got {where[1]!r}")
        return val

    given = set()
    for arg in argv:
        if not arg.startswith('--'):  # a config file: plain python that assigns existing globals
            try:
                with open(arg) as f:
                    src = f.read()
            except OSError as e:
                fail(f"cannot read config file {arg!r} ({e.strerror})")
            print(f"Overriding config with {arg}")
            before = dict(g)
            try:
                exec(builtins.compile(src, arg, 'exec'), g)  # train.py has a global named compile
            except Exception as e:
                fail(f"{arg}: {traceback.format_exception_only(e)[-1].strip()}")  # its last line: TypeName: message
            new = [k for k in g if k not in before and not k.startswith('_') and not isinstance(g[k], types.ModuleType)]
            if new:
                fail(f"{arg}: {unknown(new[0], before)}")
            assigned = {n.id for n in ast.walk(ast.parse(src))
                        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            for key in assigned & set(before):
                g[key] = typed(key, before[key], g[key], (f"{arg}: ", repr(g[key])))
                given.add(key)
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
        val = typed(key, g[key], val, ('--', raw))
        print(f"Overriding: {key} = {val}")
        g[key] = val
        given.add(key)
    g['__flags_given__'] = given

_configure(globals(), sys.argv[1:])
del _configure
