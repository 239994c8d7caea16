"""A lab's training route as data: a TOML recipe of steps, each one `train` command in a folder of the run.

    python -m sdipc_lab.toyworld.train recipe sdipc_lab/toyworld/recipe.toml --out runs/route
    python -m sdipc_lab.toyworld.train recipe RECIPE --out runs/route --until unet-one-object   # stop after it
    python -m sdipc_lab.toyworld.train recipe RECIPE --out runs/route --ship                    # ... and ship it

A step names the `stage` it trains (or `export`), the `folder` of the run it works in (default: its name), the
parts it copies into that folder first (`copy`: part -> the folder or lab it comes from, "toy" for the shipped
lab; only parts the folder lacks), and the `train` options it passes (`steps`, `budget_steps`, `stop_at`, `lr`,
`two_objects`, `init_from_lab`, ...; folders relative to `--out`). A finished step leaves `STEP.done` in `--out`,
so the same command goes on where an interrupted run stopped (the step under way resumes from its checkpoint).
Every count is in steps, so a recipe trains the same weights on any machine; only its hours differ.

`[ship]` names the step whose lab becomes the package's teaching lab and the commands that re-measure what quotes
it (benches, notebooks), run in order with `--ship`, each one's printed output kept as `OUT/ship/NAME.txt` (and a
command already kept is not run again). `--size test` runs the route with tiny models, every count divided by
1000 (at least 1): what the tests run.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

from .exporting import LAB_DIR
from .models import STAGES

RECIPE = Path(__file__).parent / "recipe.toml"  # the shipped lab's route
OPTIONS = {"steps": int, "budget_steps": int, "stop_at": int, "lr": float, "batch": int, "two_objects": float,
           "variety": float, "hard_negatives": float, "align": float, "grey_shape": float, "grey_share": float,
           "end_token_only": bool, "fresh_vision": int, "init_from_lab": str, "from_checkpoint": bool, "lab_dir": str}
COUNTS = ("steps", "budget_steps", "stop_at")  # scaled at --size test
FOLDERS = ("init_from_lab", "lab_dir")  # relative to --out ("toy": the shipped lab)
STEP_KEYS = {"name", "stage", "folder", "copy", *OPTIONS}
LAB_ENTRIES = {"sdipc_lab.json", "constants_measured.json", "tokenizer", "text_encoder", "image_encoder",
               "feature_extractor", "unet", "vae", "scheduler"}


class RecipeError(ValueError):
    """A recipe that cannot be run as written: what is wrong, and where."""


def load(path: str | os.PathLike) -> dict:
    """The recipe at `path`, checked whole before anything trains: every step's keys, stage and options, its
    name unique, what it copies from named before it; `[ship]`'s lab a step's."""
    path = Path(path)
    try:
        recipe = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"no recipe at {path}: give a TOML file (the shipped lab's: {RECIPE})") from None
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"{path} is not valid TOML: {error}") from None
    steps = recipe.get("step", [])
    if not steps:
        raise RecipeError(f"{path} has no [[step]]: a recipe is a list of steps")
    seen = set()
    for i, step in enumerate(steps):
        where = f"{path}, step {i + 1} ({step.get('name', 'unnamed')})"
        unknown = set(step) - STEP_KEYS
        if unknown:
            raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)}; a step has {sorted(STEP_KEYS)}")
        if "name" not in step or "stage" not in step:
            raise RecipeError(f"{where}: a step needs a name and a stage")
        if step["name"] in seen:
            raise RecipeError(f"{where}: the name {step['name']!r} is used twice")
        if step["stage"] not in (*STAGES, "export"):
            raise RecipeError(f"{where}: no stage {step['stage']!r}; give one of {', '.join((*STAGES, 'export'))}")
        for key, kind in OPTIONS.items():
            if key in step and not isinstance(step[key], kind if kind is not float else (int, float)):
                raise RecipeError(f"{where}: {key} is a {kind.__name__}, got {step[key]!r}")
        folders = {step.get("folder", s["name"]) for s in steps[:i]} | {s["name"] for s in steps[:i]}
        for part, source in step.get("copy", {}).items():
            if source.split("/")[0] not in folders | {"toy"}:
                raise RecipeError(f"{where}: copies {part} from {source!r}, which no step before it writes")
        seen.add(step["name"])
    ship = recipe.get("ship")
    if ship is not None:
        if ship.get("step") not in seen:
            raise RecipeError(f"{path}: [ship] step {ship.get('step')!r} is not a step of the recipe")
        for name, command in ship.get("commands", {}).items():
            if not isinstance(command, str) or not command.strip():
                raise RecipeError(f"{path}: [ship.commands] {name} is not a command line")
    return recipe


def argv(step: dict, out: Path, size: str) -> list[str]:
    """The `train` command line of one step."""
    folder = out / step.get("folder", step["name"])
    args = [step["stage"], "--size", size, "--out", str(folder)]
    for key in OPTIONS:
        if key not in step:
            continue
        value = step[key]
        if key in COUNTS and size == "test":
            value = max(1, round(value / 1000))
        if key in FOLDERS and value != "toy":
            value = str(out / value)
        if value is True:
            args.append("--" + key.replace("_", "-"))
        elif value is not False:
            args += ["--" + key.replace("_", "-"), str(value)]
    return args


def copy_parts(step: dict, out: Path) -> list[str]:
    """The parts a step copies into its folder, where the folder lacks them; each written whole or not at all."""
    folder = out / step.get("folder", step["name"])
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for part, source in step.get("copy", {}).items():
        origin = (LAB_DIR if source == "toy" else out / source) / part
        target = folder / part
        if target.exists():
            continue
        if not origin.exists():
            raise RecipeError(f"step {step['name']}: {origin} does not exist (the step that writes it has not run)")
        tmp = folder / f".{part}.copying"
        shutil.rmtree(tmp, ignore_errors=True)
        (shutil.copytree if origin.is_dir() else shutil.copy2)(origin, tmp)
        os.replace(tmp, target)
        copied.append(part)
    return copied


def run(path, out: Path, *, size: str = "cpu", until: str | None = None, ship: bool = False,
        package_lab: Path = LAB_DIR, train_main=None) -> None:
    """Run the recipe's steps into `out` (skipping finished ones), up to `until`; with `ship`, then ship."""
    recipe = load(path)
    names = [step["name"] for step in recipe["step"]]
    if until is not None and until not in names:
        raise RecipeError(f"--until {until!r} is not a step of {path}: give one of {', '.join(names)}")
    if ship and "ship" not in recipe:
        raise RecipeError(f"{path} has no [ship] section: nothing to ship")
    if ship and until is not None:
        raise RecipeError("--ship ships the recipe's lab after every step; not with --until")
    if ship:
        check_package_lab(package_lab)  # before hours of training, not after
    out.mkdir(parents=True, exist_ok=True)
    for step in recipe["step"]:
        done = out / f"{step['name']}.done"
        if not done.exists():
            copied = copy_parts(step, out)
            command = argv(step, out, size)
            print(f"=== step {step['name']}: train {shlex.join(command)}" + (f" (copied {copied})" if copied else ""),
                  flush=True)
            start = time.time()
            train_main(command)
            done.write_text(shlex.join(command) + "\n")
            print(f"=== step {step['name']} done in {time.time() - start:.0f} s", flush=True)
        if step["name"] == until:
            print(f"=== stopped after {until} (--until)")
            return
    if ship:
        ship_lab(recipe["ship"], out, package_lab)


def check_package_lab(package_lab: Path) -> None:
    """Refuse a package folder that shipping would replace with anything of a user's in it."""
    if package_lab.exists():
        strangers = sorted(p.name for p in package_lab.iterdir()) if package_lab.is_dir() else [package_lab.name]
        strangers = [name for name in strangers if name not in LAB_ENTRIES]
        if strangers or not (package_lab / "sdipc_lab.json").exists():
            raise RecipeError(f"{package_lab} is not a lab folder, or holds {strangers}, which no lab writer wrote: "
                              "shipping replaces the folder whole and would lose them; move them out")


def ship_lab(ship: dict, out: Path, package_lab: Path) -> None:
    """The ship step's lab into `package_lab` (swapped in whole; a folder holding anything else is refused),
    then each command that quotes the lab, its output kept in OUT/ship/NAME.txt."""
    lab = out / ship["step"] / "lab"
    if not (lab / "sdipc_lab.json").exists():
        raise RecipeError(f"{lab} is not an exported lab: the recipe's {ship['step']} step must end in export")
    check_package_lab(package_lab)
    logs = out / "ship"
    logs.mkdir(exist_ok=True)
    marker = logs / "lab.txt"
    if not marker.exists():
        with tempfile.TemporaryDirectory(dir=package_lab.parent, prefix=f".{package_lab.name}.") as stage:
            shutil.copytree(lab, Path(stage) / "new")
            if package_lab.exists():
                os.replace(package_lab, Path(stage) / "old")
            os.replace(Path(stage) / "new", package_lab)
        marker.write_text(f"shipped {lab} as {package_lab}\n")
        print(f"=== shipped {lab} as {package_lab}")
    root = Path(__file__).resolve().parents[2]
    for name, command in ship.get("commands", {}).items():
        kept = logs / f"{name}.txt"
        if kept.exists():
            continue
        words = []
        for word in shlex.split(command.replace("{out}", str(out))):
            matches = sorted(glob.glob(word, root_dir=root)) if "*" in word else []
            words += matches or [sys.executable if word == "python" else word]
        print(f"=== {name}: {command}", flush=True)
        result = subprocess.run(words, cwd=root, capture_output=True, text=True)
        print(result.stdout, end="")
        if result.returncode:
            sys.stderr.write(result.stderr)
            raise SystemExit(f"ship: {name} failed (exit {result.returncode}); fix it and run the same command again")
        tmp = kept.with_suffix(".tmp")
        tmp.write_text(result.stdout)
        os.replace(tmp, kept)
