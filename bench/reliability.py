"""A battery of users' mistakes, each tried on its own in a temporary folder, and what each one led to.

    python bench/reliability.py                  # every case; prints the tables, writes docs/results/reliability.md
    python bench/reliability.py --only nearest   # the cases whose name holds a word (nothing written)
    python bench/reliability.py --list

Each case makes the mistake once, on the random tiny lab (`load_lab("tiny")`, loaded once) or through a command
line (a subprocess with OMP_NUM_THREADS=1, `--size test` runs, and a time limit), inside a temporary folder of
its own, and its outcome is sorted into one class:

- data-loss: a file the case made as the user's was deleted or changed, or the package's data files were touched;
- hang: it ran past the time limit;
- silent-wrong: no refusal (exit 0, or no exception) where it must refuse, or a wrong result where it must work;
- raw: refused, but not by us: an exception raised inside a library (or by Python's own argument binding), a type
  other than ValueError / TypeError / SystemExit / FileNotFoundError (WeightsNotFoundError) / training's stops,
  or no message;
- handled: refused by sdipc_lab's own code, with a message;
- ok: a call that must work worked, with the right result.

Every case is cheap (seconds); the battery takes a few minutes on two cores. `classify` and `run_case` are what
tests/test_reliability.py checks with a few of the cases.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import io
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

if __name__ == "__main__":  # run as a script, before torch is imported; imported (by the tests), it sets nothing
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sdipc_lab"
REPORT = ROOT / "docs" / "results" / "reliability.md"
HUB_CONFIGS = ROOT / "tests" / "data" / "hub_configs"
CLASSES = ("data-loss", "hang", "silent-wrong", "raw", "handled", "ok")
OURS = ("ValueError", "TypeError", "SystemExit", "FileNotFoundError", "WeightsNotFoundError", "NonFiniteLoss",
        "TrainingStopped")
MIN_MESSAGE = 20  # characters: shorter is no message a user can act on

sys.path.insert(0, str(ROOT / "bench"))


class Wrong(Exception):
    """Raised by a case: the call went through but its result (or what it wrote) is wrong."""


class Hang(BaseException):
    """The case ran past its time limit (raised by the alarm)."""


@dataclasses.dataclass
class Case:
    name: str
    mistake: str
    expect: str  # "refuse" or "work"
    fn: object
    timeout: int


@dataclasses.dataclass
class Outcome:
    name: str
    mistake: str
    expect: str
    cls: str
    message: str
    seconds: float


CASES: list[Case] = []


def case(name: str, mistake: str, expect: str = "refuse", timeout: int = 180):
    def register(fn):
        CASES.append(Case(name, mistake, expect, fn, timeout))
        return fn
    return register


# ------------------------------------------------------------------------------------------- watching files

class Watch:
    """The user's files a case made: each must be there, byte for byte, after the case."""

    def __init__(self):
        self.files: dict[Path, str] = {}

    def user_file(self, path: Path, text: str = "the user's own") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return self.keep(path)

    def keep(self, path: Path) -> Path:
        for p in ([path] if path.is_file() else [q for q in path.rglob("*") if q.is_file()]):
            self.files[p] = hashlib.sha256(p.read_bytes()).hexdigest()
        return path

    def lost(self) -> list[str]:
        out = []
        for p, digest in self.files.items():
            if not p.exists():
                out.append(f"{p.name} deleted")
            elif hashlib.sha256(p.read_bytes()).hexdigest() != digest:
                out.append(f"{p.name} changed")
        return out


def package_state() -> dict:
    """The package's data files (weights, configs, JSON: all but its code), by size and modification time."""
    return {str(p.relative_to(PACKAGE)): (p.stat().st_size, p.stat().st_mtime_ns) for p in PACKAGE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".py", ".pyc")}


def package_changes(before: dict, after: dict) -> list[str]:
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return [f"the package's {k} {'deleted' if k not in after else 'written'}" for k in changed[:5]]


# ------------------------------------------------------------------------------------------- classifying

def _innermost_own_frame(error: BaseException) -> str | None:
    """The file of the frame that raised `error`, passing over argparse's (a parser.error of ours exits there)."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if Path(frame.filename).name != "argparse.py":
            return frame.filename
    return None


def _ours(path: str | None) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(PACKAGE)


def classify(expect: str, *, lost=(), hung: bool = False, error: BaseException | None = None,
             proc: subprocess.CompletedProcess | None = None, stderr: str = "") -> tuple[str, str]:
    """The class of one outcome and the message it showed. `error`: what a Python call raised (`stderr`: what it
    printed, where argparse puts its message); `proc`: a command line's result."""
    if lost:
        return "data-loss", "; ".join(lost)
    if hung:
        return "hang", "ran past its time limit"
    if isinstance(error, Wrong):
        return "silent-wrong", str(error)
    if proc is not None:
        return _classify_process(expect, proc)
    if error is None:
        return ("ok", "worked") if expect == "work" else ("silent-wrong", "no exception: the mistake went through")
    name = type(error).__name__
    if isinstance(error, SystemExit):
        if error.code in (0, None):
            return ("ok", "exit 0") if expect == "work" else ("silent-wrong", "exit 0: the mistake went through")
        message = error.code if isinstance(error.code, str) else _last_line(stderr)
    else:
        message = str(error)
    message = f"{name}: {message}"
    ours = (any(cls.__name__ in OURS for cls in type(error).__mro__) and _ours(_innermost_own_frame(error))
            and len(message) - len(name) - 2 >= MIN_MESSAGE)
    note = "" if expect == "refuse" else " (refused a call that must work)"
    return ("handled" if ours else "raw"), message + note


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _classify_process(expect: str, proc: subprocess.CompletedProcess) -> tuple[str, str]:
    err = proc.stderr or ""
    if proc.returncode == 0:
        if expect == "work":
            return "ok", _last_line(proc.stdout) or "exit 0"
        return "silent-wrong", f"exit 0: the mistake went through ({_last_line(proc.stdout)[:100]})"
    if "Traceback (most recent call last)" in err:
        tail = err[err.rindex("Traceback (most recent call last)"):]
        files = [line.split('"')[1] for line in tail.splitlines() if line.strip().startswith('File "')]
        message = _last_line(tail)
        kind = message.split(":", 1)[0].rsplit(".", 1)[-1]
        ours = (files and _ours(files[-1]) and kind in OURS and len(message) - len(kind) - 2 >= MIN_MESSAGE)
        return ("handled" if ours else "raw"), f"traceback, {message}"
    message = _last_line(err) or _last_line(proc.stdout)
    if len(message) < MIN_MESSAGE:
        return "raw", f"exit {proc.returncode} with no message ({message!r})"
    return "handled", f"exit {proc.returncode}: {message}"


@contextlib.contextmanager
def alarm(seconds: int):
    """Raise `Hang` in this (the main) thread after `seconds`; a no-op where there is no SIGALRM."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def ring(signum, frame):
        raise Hang()

    before = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def run_case(c: Case, lab) -> Outcome:
    """Make the mistake in a new temporary folder and classify what came of it."""
    before, watch, start = package_state(), Watch(), time.time()
    result = error = None
    hung = False
    printed = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="sdipc_reliability_") as tmp:
        try:
            with alarm(c.timeout), contextlib.redirect_stderr(printed):
                result = c.fn(lab, Path(tmp), watch)
        except (Hang, subprocess.TimeoutExpired):
            hung = True
        except KeyboardInterrupt as interrupt:
            if type(interrupt) is KeyboardInterrupt:
                raise
            error = interrupt
        except BaseException as raised:  # noqa: BLE001 (SystemExit too: it is one of the outcomes)
            error = raised
        lost = watch.lost()
    lost += package_changes(before, package_state())
    proc = result if isinstance(result, subprocess.CompletedProcess) else None
    cls, message = classify(c.expect, lost=lost, hung=hung, error=error, proc=proc, stderr=printed.getvalue())
    message = message.replace(tmp, "TMP").replace(str(ROOT), "REPO")  # the case's folder; the checkout
    return Outcome(c.name, c.mistake, c.expect, cls, message, time.time() - start)


# ------------------------------------------------------------------------------------------- helpers

def cli(tmp: Path, *args, env=None, timeout: int = 150) -> subprocess.CompletedProcess:
    """A command line of the project, run from `tmp` (relative defaults such as runs/ land there)."""
    command = [str(a) for a in args]
    if command[0] not in ("bash",):
        command = [sys.executable, *command]
    return subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg", **(env or {})})


def ref(i: int = 0):
    from sdipc_lab.toyworld import sample

    return sample(i, "test", two_objects=0).image


def saved_lab(lab, folder: Path) -> Path:
    import sdipc_lab as S

    return S.save_lab(lab, folder)


def finetuned_file(lab, out: Path, mode: str = "ct") -> Path:
    from sdipc_lab import finetune as FT

    FT.finetune(lab, FT.Concepts({"c": [ref(0), ref(1)]}), mode=mode, out=out, steps=1, batch=2)
    return out / "finetuned.safetensors"


def image_folder(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        ref(i).save(folder / f"{i}.png")
    return folder


def broken_lab(lab, tmp: Path, part: str, keep) -> Path:
    from safetensors.torch import load_file, save_file

    folder = saved_lab(lab, tmp / "lab")
    weights = next((folder / part).glob("*.safetensors"))
    tensors = load_file(str(weights))
    save_file({k: v for i, (k, v) in enumerate(sorted(tensors.items())) if keep(i, k)}, str(weights))
    return folder


TRAIN = ("-m", "sdipc_lab.toyworld.train")


# ------------------------------------------------------------------------------------------- the cases

@case("save_lab over a lab holding notes.md", "S.save_lab(lab, folder) where folder is a lab with the user's notes.md")
def _(lab, tmp, watch):
    import sdipc_lab as S

    folder = saved_lab(lab, tmp / "lab")
    watch.user_file(folder / "notes.md")
    S.save_lab(lab, folder)


@case("save_lab over a folder of notes", "S.save_lab(lab, folder) where folder holds only the user's notes.md")
def _(lab, tmp, watch):
    import sdipc_lab as S

    watch.user_file(tmp / "mine" / "notes.md")
    S.save_lab(lab, tmp / "mine")


@case("train all --lab-dir DIR of user files", "toyworld.train all --size test --lab-dir DIR, DIR holding thesis.txt: "
      "must be refused before any stage trains")
def _(lab, tmp, watch):
    watch.user_file(tmp / "mine" / "thesis.txt")
    return cli(tmp, *TRAIN, "all", "--size", "test", "--out", tmp / "run", "--lab-dir", tmp / "mine", timeout=120)


@case("train export --lab-dir LAB with notes.md",
      "toyworld.train export --lab-dir LAB, a lab holding the user's notes.md")
def _(lab, tmp, watch):
    run = saved_lab(lab, tmp / "run")  # a run folder with every part export reads
    target = saved_lab(lab, tmp / "target")
    watch.user_file(target / "notes.md")
    return cli(tmp, *TRAIN, "export", "--size", "test", "--out", run, "--lab-dir", target)


@case("train export into the package lab by path",
      "toyworld.train export --lab-dir /abs/path/to/sdipc_lab/toyworld/lab")
def _(lab, tmp, watch):
    from sdipc_lab.toyworld.exporting import LAB_DIR

    run = saved_lab(lab, tmp / "run")
    return cli(tmp, *TRAIN, "export", "--size", "test", "--out", run, "--lab-dir", LAB_DIR.resolve())


@case("finetune ft into a ct run's folder", "finetune(mode='ft', out=R) where R holds a 'ct' run on other images")
def _(lab, tmp, watch):
    from sdipc_lab import finetune as FT

    watch.keep(finetuned_file(lab, tmp / "run", "ct"))
    FT.finetune(lab, FT.Concepts({"other": [ref(2), ref(1)]}), mode="ft", out=tmp / "run", steps=1, batch=2)


@case("hub_cache over a real cache", "build.hub_cache(folder) where folder is a Hugging Face cache with a model")
def _(lab, tmp, watch):
    from sdipc_lab.build import hub_cache

    repo = tmp / "hub" / "models--openai--clip-vit-large-patch14"
    watch.user_file(repo / "refs" / "main", "abc123")
    watch.user_file(repo / "snapshots" / "abc123" / "config.json", "{}")
    hub_cache(tmp / "hub", HUB_CONFIGS)


@case("hub_cache in a missing folder", "build.hub_cache('nope/hub') where nope/ does not exist")
def _(lab, tmp, watch):
    from sdipc_lab.build import hub_cache

    hub_cache(tmp / "nope" / "hub", HUB_CONFIGS)
    raise Wrong("wrote a cache into a folder it had to create")


@case("lab without text_projection", "load_lab(folder) whose text_encoder weights lack text_projection.weight")
def _(lab, tmp, watch):
    import sdipc_lab as S

    S.load_lab(broken_lab(lab, tmp, "text_encoder", lambda i, k: k != "text_projection.weight"))
    raise Wrong("loaded: the missing W_t was filled with random numbers")


@case("lab with half the image encoder", "load_lab(folder) whose image_encoder file holds half its tensors")
def _(lab, tmp, watch):
    import sdipc_lab as S

    S.load_lab(broken_lab(lab, tmp, "image_encoder", lambda i, k: i % 2 == 0))
    raise Wrong("loaded: half the image tower random")


@case("lab with a deleted config", "load_lab(folder) whose unet/config.json was deleted")
def _(lab, tmp, watch):
    import sdipc_lab as S

    folder = saved_lab(lab, tmp / "lab")
    (folder / "unet" / "config.json").unlink()
    S.load_lab(folder)
    raise Wrong("loaded a U-Net without its config")


@case("vary with another lab's fine-tuned file", "vary(other_lab, img, finetuned=F), F trained on a lab of the same "
      "sizes but another W_t")
def _(lab, tmp, watch):
    import copy

    import torch

    import sdipc_lab as S

    path = finetuned_file(lab, tmp / "run")
    text = copy.deepcopy(lab.text_encoder)
    with torch.no_grad():
        text.text_projection.weight.mul_(-1.0)
    S.vary(lab.replace(text_encoder=text), ref(), n=1, steps=1, finetuned=path)
    raise Wrong("generated with prompts and k/v from another C-space")


@case("vary with a truncated fine-tuned file", "vary(lab, img, finetuned=F), F cut short (a copy interrupted)")
def _(lab, tmp, watch):
    import sdipc_lab as S

    path = finetuned_file(lab, tmp / "run")
    cut = tmp / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:300])
    S.vary(lab, ref(), n=1, steps=1, finetuned=cut)


@case("finetune CLI --lr 1e30", "python -m sdipc_lab.finetune IMAGES --lr 1e30")
def _(lab, tmp, watch):
    return cli(tmp, "-m", "sdipc_lab.finetune", image_folder(tmp / "imgs"), "--lab", "tiny", "--out", tmp / "run",
               "--steps", "2", "--batch", "2", "--lr", "1e30")


@case("finetune CLI --batch 0", "python -m sdipc_lab.finetune IMAGES --batch 0")
def _(lab, tmp, watch):
    return cli(tmp, "-m", "sdipc_lab.finetune", image_folder(tmp / "imgs"), "--lab", "tiny", "--out", tmp / "run",
               "--steps", "2", "--batch", "0")


@case("finetune seed 2**64", "finetune(lab, concepts, seed=2**64)")
def _(lab, tmp, watch):
    from sdipc_lab import finetune as FT

    FT.finetune(lab, FT.Concepts({"c": [ref(0), ref(1)]}), mode="ct", out=tmp / "run", steps=1, batch=2, seed=2**64)


@case("train CLI --lr 1e30", "python -m sdipc_lab.toyworld.train clip --size test --lr 1e30")
def _(lab, tmp, watch):
    return cli(tmp, *TRAIN, "clip", "--size", "test", "--out", tmp / "run", "--steps", "2", "--lr", "1e30")


@case("train CLI --lr 1e39", "python -m sdipc_lab.toyworld.train clip --size test --lr 1e39 (inf in float32)")
def _(lab, tmp, watch):
    return cli(tmp, *TRAIN, "clip", "--size", "test", "--out", tmp / "run", "--steps", "2", "--lr", "1e39")


@case("train CLI --seed 2**64", "python -m sdipc_lab.toyworld.train clip --size test --seed 18446744073709551616")
def _(lab, tmp, watch):
    return cli(tmp, *TRAIN, "clip", "--size", "test", "--out", tmp / "run", "--steps", "2", "--seed", str(2**64))


def _export_sampler(lab, tmp, setting):
    run = saved_lab(lab, tmp / "run")
    proc = cli(tmp, *TRAIN, "export", "--size", "test", "--out", run, "--sampler", setting)
    if proc.returncode and (run / "lab").exists():
        raise Wrong(f"refused after writing {run / 'lab'}")
    return proc


@case("export --sampler steps=0", "toyworld.train export --sampler steps=0")
def _(lab, tmp, watch):
    return _export_sampler(lab, tmp, "steps=0")


@case("export --sampler guidance_scale=-3", "toyworld.train export --sampler guidance_scale=-3")
def _(lab, tmp, watch):
    return _export_sampler(lab, tmp, "guidance_scale=-3")


@case("export --sampler scheduler=euler", "toyworld.train export --sampler scheduler=euler (no such scheduler)")
def _(lab, tmp, watch):
    return _export_sampler(lab, tmp, "scheduler=euler")


@case("nearest_texts with one str", "nearest_texts(lab, f_cnvrt, 'a red circle')", expect="work")
def _(lab, tmp, watch):
    import sdipc_lab as S
    from sdipc_lab.measure import nearest_texts

    rows = nearest_texts(lab, S.convert(lab, S.image_embeds(lab, [ref()]))[0], "a red circle")
    if [r["text"] for r in rows] != ["a red circle"]:
        raise Wrong(f"read the str as characters: {[r['text'] for r in rows]}")


@case("nearest_texts with []", "nearest_texts(lab, f_cnvrt, [])")
def _(lab, tmp, watch):
    import sdipc_lab as S
    from sdipc_lab.measure import nearest_texts

    nearest_texts(lab, S.convert(lab, S.image_embeds(lab, [ref()]))[0], [])


@case("nearest_texts k=-1", "nearest_texts(lab, f_cnvrt, texts, k=-1)")
def _(lab, tmp, watch):
    import sdipc_lab as S
    from sdipc_lab.measure import nearest_texts

    rows = nearest_texts(lab, S.convert(lab, S.image_embeds(lab, [ref()]))[0], ["a red star", "a blue disk"], k=-1)
    raise Wrong(f"answered {len(rows)} rows for k=-1")


@case("book.py --check-only without a site", "python bench/book.py --check-only, no site built")
def _(lab, tmp, watch):
    return cli(tmp, ROOT / "bench" / "book.py", "--check-only", "--site", tmp / "site", timeout=60)


@case("references 1001 by seed", "references(lab, 1001, seed=1): more than the 1000 it draws from")
def _(lab, tmp, watch):
    from sdipc_lab.datasets import references

    references(lab, 1001, seed=1)


@case("NumPy ints as threads", "load_lab('tiny', threads=np.int64(1))", expect="work")
def _(lab, tmp, watch):
    import numpy as np

    import sdipc_lab as S

    loaded = S.load_lab("tiny", device="cpu", threads=np.int64(1))
    if loaded.threads != 1:
        raise Wrong(f"threads became {loaded.threads!r}")


@case("NumPy ints as n and seed", "vary(lab, img, n=np.int64(1), seed=np.int64(3)); references(lab, np.int64(2), "
      "seed=np.int64(5))", expect="work")
def _(lab, tmp, watch):
    import numpy as np

    import sdipc_lab as S
    from sdipc_lab.datasets import references

    images = S.vary(lab, ref(), n=np.int64(1), seed=np.int64(3), steps=1)
    again = S.vary(lab, ref(), n=1, seed=3, steps=1)
    if len(images) != 1 or images[0].tobytes() != again[0].tobytes():
        raise Wrong("NumPy seed 3 gave other images than seed 3")
    if len(references(lab, np.int64(2), seed=np.int64(5), kind="world")) != 2:
        raise Wrong("references did not give 2 images")


@case("edit with text None", "edit(lab, img, None)")
def _(lab, tmp, watch):
    import sdipc_lab as S

    S.edit(lab, ref(), None, n=1, steps=1)


@case("Lab.replace(vae=None)", "lab.replace(vae=None)")
def _(lab, tmp, watch):
    lab.replace(vae=None)


@case("Lab.replace(vae=unet)", "lab.replace(vae=lab.unet): a component of another kind")
def _(lab, tmp, watch):
    import sdipc_lab as S

    S.vary(lab.replace(vae=lab.unet), ref(), n=1, steps=1)


@case("cutoff_slider(lab, 0.3)", "cutoff_slider(lab, 0.3): the cutoff where the image goes")
def _(lab, tmp, watch):
    from sdipc_lab.widgets import cutoff_slider

    cutoff_slider(lab, 0.3)


@case("edit_panel(lab, {})", "edit_panel(lab, {}): no references")
def _(lab, tmp, watch):
    from sdipc_lab.widgets import edit_panel

    edit_panel(lab, {})


@case("edit_panel(lab, [img])", "edit_panel(lab, [img]): a list where a dict of name -> image goes")
def _(lab, tmp, watch):
    from sdipc_lab.widgets import edit_panel

    edit_panel(lab, [ref()])


# ------------------------------------------------------------------------------------------- the report

def tables(outcomes: list[Outcome]) -> str:
    from common import table

    counts = Counter(o.cls for o in outcomes)
    summary = table(["class", "cases"], [[cls, counts.get(cls, 0)] for cls in CLASSES])
    rows = [[o.name, o.expect, o.cls, f"{o.seconds:.1f}", o.message.replace("|", "/").replace("\n", " ")[:160]]
            for o in outcomes]
    return summary + "\n\n" + table(["case", "must", "outcome", "s", "what the user saw"], rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run the cases whose name holds one of these words (no report)")
    parser.add_argument("--list", action="store_true", help="list the cases")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if not args.only or any(w.lower() in c.name.lower() for w in args.only)]
    if args.list:
        for c in cases:
            print(f"{c.name}: {c.mistake} (must {c.expect})")
        return 0
    if not cases:
        parser.error(f"no case's name holds {args.only}; --list shows them")

    import torch

    import sdipc_lab as S

    torch.set_num_threads(1)
    lab = S.load_lab("tiny", device="cpu")
    outcomes = []
    for c in cases:
        outcome = run_case(c, lab)
        print(f"{outcome.cls:>12}  {c.name}  ({outcome.seconds:.0f} s)", file=sys.stderr)
        outcomes.append(outcome)
    text = tables(outcomes)
    print(text)
    if not args.only:
        python = os.path.relpath(sys.executable, ROOT) if Path(sys.executable).is_relative_to(ROOT) else sys.executable
        command = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} {python} {shlex.join(sys.argv)}"
        machine = (f"{platform.node()}, {platform.platform()}, {os.cpu_count()} CPUs, Python "
                   f"{platform.python_version()}, torch {torch.__version__}")
        head = (f"# Users' mistakes, and what came of each\n\n`{command}` on "
                f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} ({machine}).\n\n"
                "Each case makes one mistake in a temporary folder of its own, on the random tiny lab or through "
                "a command line (`--size test`). Classes, worst first: data-loss (a user's file or the package "
                "touched), hang, silent-wrong (no refusal where one is due, or a wrong result), raw (refused by a "
                "library's error, not ours), handled (refused by sdipc_lab with a message), ok (a valid call that "
                "worked). The definitions are in bench/reliability.py.\n\n")
        tmp = REPORT.with_suffix(".md.tmp")
        tmp.write_text(head + text + "\n")
        tmp.replace(REPORT)
        print(f"\nwrote {REPORT.relative_to(ROOT)}", file=sys.stderr)
    return int(any(o.cls not in ("handled", "ok") for o in outcomes))


if __name__ == "__main__":
    sys.exit(main())
