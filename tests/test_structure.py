"""The shape of the code: training does not need the export stack, the command starts without
loading what it does not run, shipped files are found from the package, streams are one table."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import NO_EXPORT_STACK, ROOT, python_without
from vae_dist.rng import Stream


def test_the_vae_dist_package_never_imports_the_export_package():
    code = (
        "import sys, pkgutil, importlib, vae_dist\n"
        "for m in pkgutil.iter_modules(vae_dist.__path__): importlib.import_module('vae_dist.' + m.name)\n"
        "bad = sorted(m for m in sys.modules if m == 'export' or m.startswith(('export.', 'onnx')))\n"
        "print(bad); assert not bad\n"
    )
    proc = python_without((), code)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prepare_runs_where_torch_cannot_be_imported(tmp_path):
    """Preparing a dataset is image decoding and numpy: it works on a machine without torch."""
    from PIL import Image

    (tmp_path / "src").mkdir()
    for i in range(4):
        Image.new("RGB", (5, 5), (i * 60, 0, 0)).save(tmp_path / "src" / f"{i}.png")
    code = "from vae_dist.cli import main\nmain(['prepare', 'src', '--out', 'out', '--test-fraction', '0.25'])\n"
    proc = python_without(("torch", "torchvision", "accelerate"), code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 train + 1 test images of 3x5x5" in proc.stdout


@pytest.mark.slow
def test_training_works_without_onnx_and_onnxruntime(tmp_path):
    """A training machine may lack the export stack: import the trainer and train with it blocked."""
    code = (
        "from vae_dist.config import load_config\n"
        "from vae_dist.training import train\n"
        f"cfg = load_config('linear', ['train.epochs=1', 'data.train_subset=256', 'data.test_subset=100',\n"
        f"    'train.batch_size=64', 'run.output_dir={tmp_path}', 'run.name=r'])\n"
        "print(train(cfg, cpu=True).metrics['test_images'])\n"
    )
    proc = python_without(NO_EXPORT_STACK, code, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "100"
    assert (tmp_path / "r" / "model.safetensors").is_file()
    # ...and the blocker does block: the export commands need what is missing.
    proc = python_without(NO_EXPORT_STACK, "import export.pipeline")
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr


def test_the_cli_lists_every_command_without_importing_them():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from vae_dist.cli import main\n"
        "out = CliRunner().invoke(main, ['--help']).output\n"
        "assert all(c in out for c in ('train', 'data', 'export', 'verify')), out\n"
        "heavy = sorted(m for m in ('torch', 'accelerate', 'onnx', 'onnxruntime', 'export') if m in sys.modules)\n"
        "print(heavy); assert not heavy\n"
    )
    proc = python_without((), code)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_random_streams_are_one_table_of_distinct_numbers():
    assert len({int(s) for s in Stream}) == len(Stream)
    # Training's streams keep their numbers: recorded trajectories and figures depend on them.
    assert (Stream.EPOCH_ORDER, Stream.STEP_NOISE, Stream.EVAL_NOISE, Stream.GRID_NOISE) == (0, 1, 2, 3)
    # Seeding anywhere else is allowed only where the draws are not part of a result.
    allowed = {
        "vae_dist/rng.py": "the table itself",
        "vae_dist/bench.py": "benchmark inputs",
        "export/bench_infer.py": "benchmark inputs",
        "export/bench_web.py": "benchmark inputs",
        "export/spec.py": "example inputs for tracing; only their shapes matter",
        "export/sample.py": "the user's --seed; it cannot import the project",
    }
    offenders = []
    for path in [*(ROOT / "vae_dist").rglob("*.py"), *(ROOT / "export").glob("*.py")]:
        text = path.read_text()
        seeds = any(s in text for s in ("manual_seed(", "default_rng(", "torch.Generator()", "random.seed("))
        if seeds and str(path.relative_to(ROOT)) not in allowed:
            offenders.append(path.name)
    assert not offenders


@pytest.mark.slow
def test_shipped_configs_and_data_folder_work_in_a_regular_install(tmp_path):
    """Installed without -e, from another directory: configs come from the package, data and runs
    go under the current directory (or the folders the environment names)."""
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
    proc = subprocess.run([*pip, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (target / "vae_dist" / "configs" / "conv.yaml").is_file()
    assert (target / "vae_dist" / "configs" / "accelerate" / "cpu_2proc.yaml").is_file()
    for name in ("index.html", "vae.js", "style.css", "package.json", "package-lock.json"):  # vae-dist web
        assert (target / "export" / "site" / name).is_file(), name
    code = (
        "import vae_dist, os\n"
        "from vae_dist import paths\n"
        "from vae_dist.config import load_config\n"
        "assert vae_dist.__file__.startswith(os.environ['PYTHONPATH']), vae_dist.__file__\n"
        "print(load_config('conv').model.kind, paths.data_dir().resolve(), paths.runs_dir().resolve())\n"
    )
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["conv", str(elsewhere / "data"), str(elsewhere / "runs")]
    env.update(VAE_DIST_DATA=str(tmp_path / "d"), VAE_DIST_RUNS=str(tmp_path / "r"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True, env=env)
    assert proc.stdout.split() == ["conv", str(tmp_path / "d"), str(tmp_path / "r")], proc.stderr


def readme_python_example() -> str:
    """The first Python block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("```\n", start)]


@pytest.mark.slow
def test_the_readme_example_runs_in_a_fresh_venv_with_the_package_installed(tmp_path):
    """A notebook's view: a new virtual environment, the package installed into it (not editable),
    the README's example run as written from another folder, where the data and runs folders are
    the ones the environment names."""
    import venv

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies (torch and the rest) come from the test environment's site-packages, added
    # as a plain path: its .pth files, the editable install's finder among them, are not run.
    (Path(site) / "dependencies.pth").write_text(deps + "\n")
    pip = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(ROOT)]
    proc = subprocess.run(pip, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "notebook"
    work.mkdir()
    environment = {"PATH": "/usr/bin:/bin", "VAE_DIST_DATA": str(ROOT / "data"), "VAE_DIST_RUNS": str(work / "runs"),
                   "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    check = "import vae_dist; print(vae_dist.__file__)\n"
    proc = subprocess.run([python, "-c", check + readme_python_example()], cwd=work, capture_output=True, text=True,
                          env=environment, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, printed = proc.stdout.strip().splitlines()[0], proc.stdout.strip().splitlines()[-1]
    assert where.startswith(site), where  # the installed copy, not the checkout
    name, *rest = printed.split(" ", 1)
    assert (work / "runs" / name / "model.safetensors").is_file()
    assert "(16, 1, 28, 28) (8, 1, 28, 28)" in rest[0] and float(rest[0].split()[-1]) > 0


def _module_names(package: str) -> dict[str, Path]:
    """Every module of `package` (sub-packages included) by dotted name."""
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports anywhere, inside functions too (a lazy import for speed
    is fine, one that hides a cycle is not); only `if TYPE_CHECKING:` blocks are left out. `from
    package import name` counts as an import of the module package.name when there is one."""
    import ast

    found = set()
    hidden = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden |= {id(sub) for sub in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
    return {m for m in found if m in modules}


def test_the_import_graph_has_no_cycle_and_points_one_way():
    paths = {**_module_names("vae_dist"), **_module_names("export")}
    assert {"vae_dist.data.splits", "vae_dist.files", "export.pipeline"} <= set(paths)  # the walk sees them
    edges = {m: _imports_of(path, set(paths)) - {m} for m, path in paths.items()}
    assert not any(d.startswith("export") for m, deps in edges.items() if m.startswith("vae_dist") for d in deps)
    # Depth-first search for a cycle.
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*path, m, d])}"
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    # The sampler runs on devices without the project: it imports none of it.
    assert edges["export.sample"] == set()


def test_no_function_is_longer_than_a_screen():
    """Each function does one thing: at most 60 lines from `def` to its end (decorators, such as
    click's option blocks, do not count). The one-file sampler's argument parser is a table."""
    import ast

    allowed = {("export.sample", "build_parser")}
    long = []
    for module, path in {**_module_names("vae_dist"), **_module_names("export")}.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (module, node.name) not in allowed:
                if node.end_lineno - node.lineno + 1 > 60:
                    long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not long


def test_the_cycle_check_sees_imports_inside_functions(tmp_path):
    """The check above is only as good as its reading of a module: a cycle hidden in a function
    body is found."""
    (tmp_path / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "b.py").write_text("import pkg.a\n")
    modules = {"pkg.a", "pkg.b"}
    assert _imports_of(tmp_path / "a.py", modules) == {"pkg.b"}
    assert _imports_of(tmp_path / "b.py", modules) == {"pkg.a"}


def test_torch_free_modules_load_without_torch():
    """What prepare, the configuration and the model record need runs where torch is missing."""
    code = (
        "import vae_dist.data.prepare, vae_dist.data.prepared, vae_dist.data.builtin, vae_dist.data.images\n"
        "import vae_dist.files, vae_dist.kinds, vae_dist.config, vae_dist.record, vae_dist.listing, vae_dist\n"
    )
    proc = python_without(("torch", "torchvision", "accelerate"), code)
    assert proc.returncode == 0, proc.stderr


def test_an_export_command_without_the_export_stack_says_what_is_missing():
    code = "from vae_dist.cli import main\nmain(['export', '--help'])\n"
    proc = python_without(NO_EXPORT_STACK, code)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "`vae-dist export` needs onnx" in proc.stderr and "not installed here" in proc.stderr
