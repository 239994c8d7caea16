"""The set-up files agree with each other: pyproject.toml, environment.yml, the README and CI."""

import fnmatch
import re
import tomllib
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]


def _pip_section(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    return [line.strip()[2:] for line in lines[start + 1:] if line.strip().startswith("- ")]


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = (ROOT / "environment.yml").read_text()
    pip = set(_pip_section(env)) - {"-e ."}
    assert pip == wanted, f"only in environment.yml: {pip - wanted}; only in pyproject.toml: {wanted - pip}"
    assert "-e ." in _pip_section(env) and "python=3.11" in env and "conda-forge" in env


def test_torch_is_pinned_and_torchvision_is_not_used():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps and not any(d.startswith("torchvision") for d in deps)
    for path in (ROOT / "sdipc_lab").rglob("*.py"):
        assert "torchvision" not in path.read_text(), path


def _readme_commands() -> list[str]:
    return re.findall(r"```(?:bash|sh)\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_ci_runs_the_readme_test_command():
    setup, test = (block.strip() for block in _readme_commands()[:2])
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines(), f"CI must run the README's test command {test!r}"
    assert "pytest" in test and "python -m sdipc_lab demo" in setup


def test_notebooks_are_stripped_and_parameterised():
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"
        assert "parameters" in code[0].metadata.get("tags", []), f"{path.name}: first code cell must be tagged"
        installs = [c.source for c in code if "pip install" in c.source]  # only where the package is missing
        assert all('find_spec("sdipc_lab") is None' in src for src in installs), f"{path.name} installs unguarded"
        assert path.name in (ROOT / "README.md").read_text(), f"README must list {path.name}"


def test_no_pickles_and_no_remote_code():
    for path in (ROOT / "sdipc_lab").rglob("*"):
        assert path.suffix not in (".bin", ".pt", ".pth", ".ckpt", ".pkl"), path
        if path.suffix == ".py":
            text = path.read_text()
            assert "trust_remote_code=True" not in text and "torch.load(" not in text, path


def test_package_data_ships_every_weight_and_config():
    """A non-editable install gets only what package-data names: every shipped weight, config and tokenizer
    file under sdipc_lab/toyworld must match one of its patterns."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    base = ROOT / "sdipc_lab" / "toyworld"
    shipped = [p for p in base.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".json", ".txt"}]
    assert any(p.name == "judge.safetensors" for p in shipped)

    def matches(path: Path, glob: str) -> bool:  # setuptools' globs: "*" never crosses a "/"
        parts, globs = path.parts, glob.split("/")
        return len(parts) == len(globs) and all(fnmatch.fnmatchcase(p, g) for p, g in zip(parts, globs))

    missing = [str(p.relative_to(base)) for p in shipped
               if not any(matches(p.relative_to(base), g) for g in patterns["sdipc_lab.toyworld"])]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"


def _rendered_checks():
    import importlib.util

    spec = importlib.util.spec_from_file_location("notebook_checks", ROOT / "tests" / "notebook_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rendered_output_checks_catch_what_a_reader_would_see():
    checks = _rendered_checks()
    good = "| claim | value |\n|---|---|\n| \\|\\|z\\|\\| | 1.5 |"
    bad = "| claim | value |\n|---|---|\n| ||z|| | 1.5 |"
    assert checks.broken_table_rows(good) == [] and len(checks.broken_table_rows(bad)) == 1
    png = {"output_type": "display_data", "data": {"image/png": "..."}}
    assert checks.check_rendered("S.show_images(grid);", [png]) == []
    assert checks.check_rendered("S.show_images(grid);", []) == ["the cell draws but produced no image"]
    assert checks.check_rendered("cutoff_slider(lab, ref, cutoffs);", []) == []  # draws inside its widget
    dead = {"output_type": "display_data", "data": {"text/plain": "Error displaying widget: model not found"}}
    assert checks.check_rendered("x = 1", [dead]) == ["an output holds 'Error displaying widget'"]
    assert checks.check_rendered("t", [{"data": {"text/markdown": bad}}])[0].startswith("broken Markdown")


# The package as a stack: a module imports only from layers below its own. Read it bottom-up.
LAYERS = [
    {"bars"},                                                     # progress bars a saved notebook shows as text
    {"cpus", "hub", "components", "checkpoints"},                 # nothing of the package: CPU threads, the hub,
                                                                  # one component at a time, training checkpoints
    {"images", "plots", "training", "build", "toyworld.world"},  # nothing of the package but the bars
    {"lab", "toyworld", "toyworld.freehand"},                     # load_lab(); the world's public names; drawings
                                                                  # by other code than the world's
    {"convert"},                                                  # the paper's Eq. 5-8
    {"latents", "attention", "metrics", "measure", "toyworld.judge"},
    {"adapters", "toyworld.variety"},                             # what fine-tuning trains, and `applied`; the
                                                                  # image tower's varied drawings (the judge's sizes)
    {"generate", "toyworld.data"},                                # vary / edit / generate; the stages' data
    {"finetune", "probing", "toyworld.evaluate", "toyworld.models"},
    {"toyworld.stages", "toyworld.exporting"},                    # export judges the cutoff (toyworld.evaluate)
    {"toyworld.recipe"},                                          # a route of steps, as data
    {"toyworld.train"},                                           # the command line
    {"latent_clip", "datasets"},                                  # what each lab is shown: the world or photos
    {"experiments", "widgets", ""},                               # "" is the package's __init__
    {"exercises_kit"},                                            # Exercise, the registry, checks of an answer's form
    {"exercises_converter", "exercises_variation_editing", "exercises_training"},  # each notebook's exercises
    {"exercises"},                                                # self-checking exercises: check / hint / solution
    {"__main__"},
]


def _internal_imports():
    """(module, imported module, line, at top level?) for every import of the package's own modules."""
    import ast

    package = ROOT / "sdipc_lab"
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package).with_suffix("").parts)
        module = ".".join(p for p in parts if p != "__init__")
        anchor = parts[:-1]  # the package the module is in
        tree = ast.parse(path.read_text())
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = anchor[:len(anchor) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [".".join(base + [a.name]) if a.name in _MODULES else target
                                                      for a in node.names]
                for name in names:
                    yield module, name, node.lineno, id(node) in top_level
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sdipc_lab"):
                yield module, node.module.removeprefix("sdipc_lab").lstrip("."), node.lineno, id(node) in top_level


_MODULES = {".".join(p for p in path.relative_to(ROOT / "sdipc_lab").with_suffix("").parts if p != "__init__")
            for path in (ROOT / "sdipc_lab").rglob("*.py")}


def test_every_import_points_down_the_stack():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    assert _MODULES <= set(layer), f"modules not placed in LAYERS: {sorted(_MODULES - set(layer))}"
    up, hidden = [], []
    for module, target, line, top in _internal_imports():
        if layer[target] >= layer[module]:
            up.append(f"{module}:{line} imports {target or 'sdipc_lab'}")
        if not top:
            hidden.append(f"{module}:{line} imports {target or 'sdipc_lab'} inside a function")
    assert not up, "imports that point up or sideways: " + "; ".join(up)
    assert not hidden, "package imports belong at the top of the file: " + "; ".join(hidden)


def test_bootstrap_checks_the_python_version_and_picks_the_cpu_build_where_there_is_no_gpu():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bootstrap", ROOT / "bootstrap.py")
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    assert bootstrap.version_problem((3, 11)) is None and bootstrap.version_problem((3, 12)) is None
    message = bootstrap.version_problem((3, 13))
    assert "3.11 or 3.12" in message and "this is Python 3.13" in message and "python3.12 bootstrap.py" in message
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires == ">=3.11,<3.13"  # the versions bootstrap.py names
    assert f'"{bootstrap.TORCH}"' in (ROOT / "pyproject.toml").read_text()  # the same pin
    assert bootstrap.wants_cpu_torch("Linux", has_nvidia=False)
    assert not bootstrap.wants_cpu_torch("Linux", has_nvidia=True) and not bootstrap.wants_cpu_torch("Darwin", False)


def test_every_module_is_at_most_450_lines():
    """Rooms with one job: a module past 450 lines is doing two (split it along its seam)."""
    long = {str(path.relative_to(ROOT)): n for path in sorted((ROOT / "sdipc_lab").rglob("*.py"))
            if (n := len(path.read_text().splitlines())) > 450}
    assert not long, f"modules over 450 lines: {long}"
