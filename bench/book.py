"""The workbook as a static website — the notebooks, executed, and the guides — opened in a real headless
browser and checked.

    pip install -e '.[book]'            # mkdocs, mkdocs-jupyter, MathJax (and Chromium from your OS for the check)
    python bench/book.py                # execute, build site/, check every page; prints a table
    python bench/book.py --no-execute   # build from notebooks already executed into build/book/
    python bench/book.py --check-only   # check an existing site/ (refused, saying so, when there is none)

Each notebook is executed on the default (teaching) lab with nbconvert into `build/book/`, then mkdocs with
mkdocs-jupyter renders them, with the guides (`docs/guide/`, `docs/public_code.md`) and an index linking
both, into `site/` (open `site/index.html`), in the repository's layout so their links work. The check loads
every page in headless Chromium (`chromium --headless --dump-dom`, JavaScript run) and counts, per page, the
figures drawn, the formulas typeset and any TeX left raw, and any error text a reader would see: "Error displaying
widget", a Python traceback, an "Error" output. Screenshots of each page's top go to `build/book/screenshots/` to
look at. The table also goes to docs/results/book.md, replaced on each run and headed by the command, the date and
the machine (`common.record`; a run whose table has a page to CHECK writes it too, then exits 1).

Formulas (TeX in the notebooks' Markdown cells, `$...$` and `$$...$$`, and in the guides) are typeset in the
browser by MathJax 2.7 from the jupyter-server-mathjax package of the `book` extra, copied into the site at build
time (`site/assets/mathjax/`, with the STIX web fonts it ships): no page loads anything from the network for them, so
the book reads the same on a machine with none. The check proves it: Chromium runs with every host name unresolvable,
and a page with TeX left raw, a TeX error, or math loaded from a CDN fails.

Slider and panel cells appear with their code but are not run: a static page has no kernel to move them (open
the notebook in JupyterLab for that), and nbconvert's client stalls on them now and then (jupyter/nbclient#312:
the kernel idle, the client waiting on). A notebook that still exceeds its time limit is run again, up to
`--tries` times.
"""

from __future__ import annotations

import argparse
import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import record, table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
BUILD = ROOT / "build" / "book"
SITE = ROOT / "site"
ERRORS = ("Error displaying widget", "Traceback (most recent call last)", "model not found", "NameError",
          "ModuleNotFoundError")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND"]  # no host name resolves: a page needing a CDN shows it

# What a reader sees of the formulas, in the DOM after MathJax ran. Raw TeX is looked for in the visible text only:
# not in code, preformatted outputs, scripts (MathJax keeps each formula's source in a <script type="math/tex">) or
# MathML (the copy MathJax adds for screen readers).
HIDDEN = re.compile(r"<(script|style|pre|code|textarea|title|math|noscript)\b.*?</\1\s*>", re.S | re.I)
RAW_TEX = re.compile(r"\$\$.+?\$\$|(?<![\\$])\$(?=\S)[^$]{1,400}?(?<=[^\s\\])\$|\\\(|\\\[|\\begin\{", re.S)
TYPESET = re.compile(r'id="MathJax-Element-\d+-Frame"')  # one per formula MathJax drew
# MathJax's marks on TeX it could not read: the box around a syntax error, an unknown command drawn in red
TEX_ERROR = re.compile(r'class="(?:merror|noError)"|<mtext mathcolor="red">\\')
CDN_MATH = re.compile(r'(?:src|href)="(?:https?:)?//[^"]*(?:mathjax|katex)', re.I)

# MathJax 2.7 as the jupyter-server-mathjax package ships it: the combined TeX config (HTML-CSS output in Chromium,
# the browser's own MathML in Firefox) and STIX web fonts only, which config/offline.js (written by build) selects.
MATHJAX_CONFIG = "TeX-AMS-MML_HTMLorMML-full,Safe,offline"
MATHJAX_OFFLINE = """MathJax.Hub.Config({
  tex2jax: {inlineMath: [["$", "$"], ["\\\\(", "\\\\)"]], displayMath: [["$$", "$$"], ["\\\\[", "\\\\]"]],
            processEscapes: true, processEnvironments: true},
  "HTML-CSS": {availableFonts: [], preferredFont: null, webFont: "STIX-Web", imageFont: null},
  messageStyle: "none"
});
MathJax.Ajax.loadComplete("[MathJax]/config/offline.js");
"""


BOOK_MODULES = {"mkdocs": "mkdocs", "mkdocs_jupyter": "mkdocs-jupyter", "material": "mkdocs-material",
                "jupyter_server_mathjax": "jupyter-server-mathjax"}


def missing_book_packages() -> list[str]:
    """The packages of the `book` extra that this Python cannot import (the site is built with them)."""
    return [name for module, name in BOOK_MODULES.items() if importlib.util.find_spec(module) is None]


WIDGETS = re.compile(r"_slider\(|_panel\(")  # live-kernel cells: a static page cannot move their knobs


def execute(notebook: Path, out: Path, minutes: float, tries: int) -> float:
    """Run `notebook` top to bottom into `out`; returns the seconds of the run that finished. Slider and panel
    cells are shown but not run (tagged skip-execution): a website has no kernel to move them, and running them
    is where nbconvert's client stalls."""
    nb = json.loads(notebook.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code" and WIDGETS.search("".join(cell["source"])):
            cell.setdefault("metadata", {}).setdefault("tags", []).append("skip-execution")
    source = out.with_name(out.stem + ".in.ipynb")
    source.write_text(json.dumps(nb))
    for attempt in range(1, tries + 1):
        start = time.time()
        cmd = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", str(source),
               "--output-dir", str(out.parent), "--output", out.name, "--ExecutePreprocessor.timeout=900"]
        try:
            subprocess.run(cmd, check=True, timeout=60 * minutes, cwd=NOTEBOOKS, capture_output=True, text=True)
            return time.time() - start
        except subprocess.TimeoutExpired:
            print(f"  {notebook.name}: no end after {minutes} min (try {attempt} of {tries})", file=sys.stderr)
        except subprocess.CalledProcessError as error:
            raise SystemExit(f"{notebook.name} failed to execute:\n{error.stderr[-3000:]}") from None
    raise SystemExit(f"{notebook.name} did not finish in {tries} tries of {minutes} min")


def first_heading(notebook: Path) -> str:
    for cell in json.loads(notebook.read_text())["cells"]:
        if cell["cell_type"] == "markdown":
            match = re.search(r"^#\s+(.+)$", "".join(cell["source"]), re.M)
            if match:
                return match.group(1).strip()
    return notebook.stem


GUIDES = ROOT / "docs" / "guide"
RESULTS = ROOT / "docs" / "results"
ORDER = ("installing", "loading", "conventions", "teaching_lab", "finetuning", "latent_clip", "benches",
         "guarantees")  # reading order
PAGES = [*sorted(GUIDES.glob("*.md"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.stem)),
         ROOT / "docs" / "public_code.md"]  # the guides, beside the notebooks


def first_title(page: Path) -> str:
    match = re.search(r"^#\s+(.+)$", page.read_text(), re.M)
    return match.group(1).strip().strip('"') if match else page.stem


def mathjax_files() -> Path:
    """MathJax's static files, as installed by the jupyter-server-mathjax package (found, not imported: importing it
    would load a Jupyter server)."""
    spec = importlib.util.find_spec("jupyter_server_mathjax")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def build(executed: list[Path]) -> None:
    """The site's sources keep the repository's layout (notebooks/, docs/guide/, docs/), so the links between
    notebooks and guides work unchanged; the images a guide shows are copied beside it, and MathJax into
    assets/mathjax/. Every page loads that copy: the notebooks through mkdocs-jupyter's own MathJax tag (they all
    sit in notebooks/, hence the ../), every page through extra_javascript (MathJax.js does nothing when loaded a
    second time); the guides' TeX is kept whole for it by the arithmatex Markdown extension."""
    src = BUILD / "src"
    shutil.rmtree(src, ignore_errors=True)
    (src / "notebooks").mkdir(parents=True)
    shutil.copytree(mathjax_files(), src / "assets" / "mathjax")
    (src / "assets" / "mathjax" / "config" / "offline.js").write_text(MATHJAX_OFFLINE)
    mathjax = f"assets/mathjax/MathJax.js?config={MATHJAX_CONFIG}"
    intro = ("Each notebook page is a notebook run top to bottom on the teaching-scale lab (`load_lab(\"toy\")`) on "
             "a CPU. Sliders and panels need a live kernel: open the notebook in JupyterLab to move them. The guides "
             "are the repository's `docs/guide/` pages.")
    notebooks, guides = [], []
    lines = ["# sdipc_lab — the workbook", "", intro, "", "## Notebooks", ""]
    for nb in executed:
        shutil.copy(nb, src / "notebooks" / nb.name)
        notebooks.append({first_heading(nb): f"notebooks/{nb.name}"})
        lines.append(f"- [{first_heading(nb)}](notebooks/{nb.name})")
    lines += ["", "## Guides", ""]
    for page in PAGES:
        where = src / page.relative_to(ROOT)
        where.parent.mkdir(parents=True, exist_ok=True)
        text = page.read_text()
        shutil.copy(page, where)
        for image in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text):  # the images it shows, at the same place
            found = (page.parent / image).resolve()
            if found.is_file() and ROOT in found.parents:
                (src / found.relative_to(ROOT)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(found, src / found.relative_to(ROOT))
        name = str(page.relative_to(ROOT))
        guides.append({first_title(page): name})
        lines.append(f"- [{first_title(page)}]({name})")
    results = []  # the benches' results files, as the benches guide links them
    for page in sorted(RESULTS.glob("*.md")) + sorted(RESULTS.glob("*.png")):
        where = src / page.relative_to(ROOT)
        where.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, where)
        if page.suffix == ".md":
            results.append({page.stem: str(page.relative_to(ROOT))})
    lines += ["", "## Results", "", "Each bench's latest results file: see the guide "
              "[Benches: what is measured, and where the numbers are](docs/guide/benches.md)."]
    (src / "index.md").write_text("\n".join(lines) + "\n")
    nav = [{"Home": "index.md"}, {"Notebooks": notebooks}, {"Guides": guides}, {"Results": results}]
    config = {"site_name": "sdipc_lab", "docs_dir": str(src), "site_dir": str(SITE),
              "use_directory_urls": False, "theme": {"name": "material", "font": False}, "nav": nav,
              "markdown_extensions": [{"pymdownx.arithmatex": {"generic": True}}], "extra_javascript": [mathjax],
              "plugins": [{"mkdocs-jupyter": {"execute": False, "include_source": True, "ignore_h1_titles": True,
                                              "custom_mathjax_url": f"../{mathjax}"}}]}
    (BUILD / "mkdocs.yml").write_text(json.dumps(config, indent=1))  # JSON is YAML
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--quiet", "-f", str(BUILD / "mkdocs.yml")],
                           env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, cwd=BUILD,  # its .cache/ goes there too
                           capture_output=True, text=True)
    if built.returncode:
        raise SystemExit(f"mkdocs could not build the site from {BUILD / 'mkdocs.yml'}:\n{built.stderr[-3000:]}")


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("the check needs Chromium: apt-get install chromium (Debian/Ubuntu), or brew install chromium")


def check(pages: list[Path]) -> list[list]:
    exe, rows = browser(), []
    shots = BUILD / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    for page in pages:
        url = page.resolve().as_uri()
        with_profile = [*BROWSER_FLAGS, f"--user-data-dir={BUILD / 'chromium-profile'}", "--virtual-time-budget=5000"]
        dom = subprocess.run([exe, *with_profile, "--dump-dom", url], capture_output=True, text=True,
                             timeout=120).stdout
        subprocess.run([exe, *with_profile, f"--screenshot={shots / (page.stem + '.png')}", "--window-size=1280,2400",
                        url], capture_output=True, timeout=120)
        text = html.unescape(re.sub(r"<[^>]+>", " ", dom))
        figures = len(re.findall(r'<img[^>]+src="data:image/(?:png|jpeg|svg)', dom))
        formulas = len(TYPESET.findall(dom)) or len(re.findall(r"<math\b", dom))  # MathJax's, else the browser's
        raw = RAW_TEX.findall(html.unescape(re.sub(r"<[^>]+>", " ", HIDDEN.sub(" ", dom))))
        errors = [e for e in ERRORS if e in text]
        errors += [f"raw TeX: {' '.join(raw[0].split())[:40]}"] if raw else []
        errors += ["a TeX error"] if TEX_ERROR.search(dom) else []
        errors += ["math from a CDN"] if CDN_MATH.search(dom) else []
        needs_figures = page.parent.name == "notebooks"  # a guide or the index may have none
        rows.append([str(page.relative_to(SITE)), len(dom) // 1000, figures, formulas, len(raw),
                     ", ".join(errors) or "none", "ok" if dom and not errors and (figures or not needs_figures)
                     else "CHECK"])
    return rows


def main() -> None:
    global SITE  # --site: where build writes and check reads
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-execute", action="store_true", help="use the notebooks already in build/book/")
    parser.add_argument("--check-only", action="store_true", help="only check the pages of an existing site/")
    parser.add_argument("--minutes", type=float, default=20, help="time limit per notebook run")
    parser.add_argument("--tries", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 00 05")
    parser.add_argument("--site", type=Path, default=SITE, help=f"the site's folder (default {SITE})")
    args = parser.parse_args()
    SITE = args.site.resolve()
    if args.check_only and not (SITE / "index.html").exists():
        raise SystemExit(f"--check-only checks a built site, and there is none in {SITE} (no index.html): build it "
                         "first with python bench/book.py (pip install -e '.[book]' for its packages)")
    if not args.check_only and missing_book_packages():
        raise SystemExit(f"building the book needs {', '.join(missing_book_packages())}, not installed in "
                         f"{sys.executable}: pip install -e '.[book]' (then run this again)")
    notebooks = sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    if args.only:
        notebooks = [nb for nb in notebooks if nb.name.startswith(tuple(args.only))]
    with record("book", "The workbook as a website, checked in headless Chromium"):
        rows = build_and_check(args, notebooks)
    print(f"site: {SITE / 'index.html'}; screenshots: {BUILD / 'screenshots'}", file=sys.stderr)
    if any(row[-1] != "ok" for row in rows):  # the table is kept all the same: what the check found
        raise SystemExit(1)


def build_and_check(args, notebooks: list[Path]) -> list[list]:
    """Execute, build, check (as the options say); prints what was checked and the table; returns its rows."""
    executed, timing = [BUILD / "executed" / nb.name for nb in notebooks], {}
    if not args.check_only:
        if not args.no_execute:
            for nb, out in zip(notebooks, executed):
                out.parent.mkdir(parents=True, exist_ok=True)
                timing[nb.name] = execute(nb, out, args.minutes, args.tries)
                print(f"  {nb.name}: executed in {timing[nb.name]:.0f} s", file=sys.stderr)
        missing = [str(p) for p in executed if not p.exists()]
        if missing:
            raise SystemExit(f"not executed yet: {missing}; run without --no-execute")
        build(executed)
    pages = [SITE / "index.html", *(SITE / "notebooks" / (nb.stem + ".html") for nb in notebooks),
             *(SITE / page.relative_to(ROOT).with_suffix(".html") for page in PAGES)]
    rows = check([p for p in pages if p.exists()])
    rows += [[str(p.relative_to(SITE)), 0, 0, 0, 0, "the page is missing", "MISSING"] for p in pages if not p.exists()]
    for row in rows:
        name = Path(row[0]).name.replace(".html", ".ipynb")
        row.insert(1, f"{timing[name]:.0f}" if name in timing else "-")
    every = len(sorted(NOTEBOOKS.glob("[0-9]*.ipynb")))
    scope = (f"{len(notebooks)} of the {every} notebooks ({', '.join(nb.stem for nb in notebooks)}: `--only`)"
             if len(notebooks) < every else f"all {every} notebooks")
    how = ("the site as it was built before (`--check-only`)" if args.check_only else
           "notebooks executed before (`--no-execute`)" if args.no_execute else
           "each notebook executed by nbconvert (slider and panel cells shown, not run)")
    print(f"Pages: the index, {scope} and the {len(PAGES)} guides; {how}. Chromium runs with no host name "
          "resolvable, so nothing comes from the network. Formulas: the ones MathJax typeset (from the copy in "
          "site/assets/mathjax/); raw TeX: `$...$`, `\\(` or `\\[` left in the text a reader sees. Screenshots: "
          "build/book/screenshots/.\n")
    print(table(["page", "executed in s", "DOM kB", "figures", "formulas", "raw TeX", "error text", "verdict"], rows))
    return rows


if __name__ == "__main__":
    main()
