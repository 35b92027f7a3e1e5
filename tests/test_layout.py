"""The repository's shape: libraries import only libraries below them (never an entry point or a
benchmark, and never in a circle), and the project's files speak of the project, not of how it was
developed."""
import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# prepare.py is both an entry point and the data layer (tokenizers, shards, atomic writes) below the libraries
LIBRARIES = ['flags', 'prepare', 'muon', 'ops', 'model', 'fp8', 'lora', 'hf', 'checkpoint', 'parallel', 'engine']
ENTRY_POINTS = ['train', 'sample', 'serve', 'eval', 'bench', 'configurator', 'convert']
BENCHMARKS = sorted(p.stem for p in (REPO / 'benchmarks').glob('*.py'))
OURS = set(LIBRARIES) | set(ENTRY_POINTS)


def imports_of(module):
    """The project's modules a file imports anywhere in it (functions included)."""
    tree = ast.parse((REPO / f'{module}.py').read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return names & (OURS | {'benchmarks'})


def test_the_libraries_import_downwards_only():
    """In LIBRARIES' order, each imports only libraries before it: no entry point, no benchmark, no
    circle (an order in which every arrow points back is a proof that there is none)."""
    for i, lib in enumerate(LIBRARIES):
        above = imports_of(lib) - set(LIBRARIES[:i])
        assert not above, f"{lib}.py imports {sorted(above)}, which is not below it"


def test_importing_a_library_loads_no_entry_point():
    """Each library in a fresh interpreter of its own (started together), then what it had loaded."""
    code = "import sys; sys.path.insert(0, {!r}); import {}; print(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    procs = {lib: subprocess.Popen([sys.executable, '-c', code.format(str(REPO), lib)], cwd=REPO, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE) for lib in LIBRARIES}
    for lib, p in procs.items():
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        loaded = set(out.split())
        assert lib in loaded and not loaded & (set(ENTRY_POINTS) | set(BENCHMARKS) | {'benchmarks'}), lib


def test_the_files_speak_of_the_project_only():
    """No numbered work periods, ticket numbers, lent machine kinds or time budgets in what a user reads."""
    history = re.compile(r"\bsessions? \d|this session|\bissues? #?\d+|\(issue|issue's|h100-x\d|h200-x\d|"
                         r"device\stime|time\sbudget|\bticket", re.IGNORECASE)
    files = [p for p in REPO.rglob('*') if p.suffix in ('.py', '.md', '.sh', '.cu', '.cuh', '.cpp', '.html', '.js')
             and p != Path(__file__) and not any(part.startswith('.') or part == 'shared'  # not the project's own
                                                 for part in p.relative_to(REPO).parts)]
    hits = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in files
            for n, line in enumerate(p.read_text(errors='replace').splitlines(), 1) if history.search(line)]
    assert not hits, '\n'.join(hits[:20])
