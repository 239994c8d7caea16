"""The widget panels as a student meets them: in JupyterLab, in headless Chromium, driven by Selenium.

    pip install selenium    # and Chromium + ChromeDriver from your OS (apt-get install chromium chromium-driver)
    python bench/jupyterlab_panels.py

Starts JupyterLab on a notebook that shows `edit_panel` on the toy lab and runs one experiment-style progress
bar, runs it, then:
- moves the alpha slider and samples the figure every 20 ms while it redraws: its height must not drop (the
  page would jump) and it must become a different image whose title (read from the PNG's metadata, which
  `widgets._show` writes from the same string it draws) names the slider's value;
- checks that the reference dropdown shows its whole label;
- under load (another process looping `S.vary` on the toy lab, 1 thread), moves the slider one step and, while
  that figure is drawn, 3 more; times how long until the figure shows the slider's final value, counting the
  figures drawn meanwhile (the steps that arrived during a draw are drawn once, as the last value);
- saves, shuts the Jupyter server down (its kernels with it), starts a new server and browser, opens the
  notebook again and counts "Error displaying widget" (shown, and anywhere in the page's HTML), checks the
  last figure is there as an image of the last value and that the note stands where the controls were.
Prints a table; screenshots go to build/jupyterlab/, the results to docs/results/jupyterlab_panels.md (replaced on
every run, a run with a CHECK verdict too; `common.record`).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import record, table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "jupyterlab"
CELLS = [
    "import sdipc_lab as S\nfrom sdipc_lab.generate import progress\nfrom sdipc_lab.toyworld import samples\n"
    "from sdipc_lab.widgets import edit_panel\nlab = S.load_lab('toy')\ndata = samples(6, 'test', two_objects=0)",
    "edit_panel(lab, {f'{i}: {s.caption}': s.image for i, s in enumerate(data)}, n=4);",
    "with progress(2, 'experiment'):  # as every experiment in sdipc_lab/experiments.py shows its progress\n"
    "    S.vary(lab, data[0].image, n=1)\n    S.vary(lab, data[1].image, n=1)",
]
LOAD = ("import torch, sdipc_lab as S\nfrom sdipc_lab.toyworld import samples\ntorch.set_num_threads(1)\n"
        "lab = S.load_lab('toy')\nimage = samples(1, 'test', two_objects=0)[0].image\n"
        "while True:\n    S.vary(lab, image, n=4)\n")
FIGURE = ".jp-Notebook .jp-Cell:nth-child(2) .jp-OutputArea-child img"  # the panel's figure: its cell's one <img>
ERROR = "Error displaying widget"


def notebook(folder: Path) -> Path:
    cells = [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None, "outputs": [],
              "source": src} for i, src in enumerate(CELLS)]
    path = folder / "panel.ipynb"
    path.write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {"name": "python3", "language": "python",
                                "display_name": "Python 3"}}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def up(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server(folder: Path) -> tuple[subprocess.Popen, str]:
    """A JupyterLab server on `folder` (no token: it listens on 127.0.0.1 only) and its notebook's URL."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
                                "--ServerApp.ip=127.0.0.1", "--ServerApp.token=", "--ServerApp.password=",
                                f"--ServerApp.root_dir={folder}", "--ServerApp.disable_check_xsrf=True",
                                *(["--allow-root"] if os.geteuid() == 0 else [])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    url = f"http://127.0.0.1:{port}/lab/tree/panel.ipynb"
    wait(lambda: up(url), 180, "JupyterLab")
    return process, url


def shut_down(process: subprocess.Popen) -> float:
    """Stops the server as Ctrl+C does (SIGINT twice: it shuts its kernels down); seconds it took."""
    start = time.time()
    for _ in range(2):
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            time.sleep(0.5)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return time.time() - start


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver = shutil.which("chromedriver")
    if not driver:
        raise SystemExit("needs ChromeDriver: apt-get install chromium chromium-driver (Debian/Ubuntu)")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("google-chrome") or ""
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1100"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver))  # the OS's driver: nothing downloaded


def wait(condition, seconds: float, what: str):
    """`condition()`'s first truthy value within `seconds`; an element JupyterLab redrew meanwhile (stale) is
    looked up again on the next try."""
    from selenium.common.exceptions import StaleElementReferenceException

    end = time.time() + seconds
    while time.time() < end:
        try:
            value = condition()
        except StaleElementReferenceException:
            value = None
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"timed out after {seconds} s waiting for {what}")


def retry(action, what: str, tries: int = 25):
    """`action()`, again while JupyterLab redraws the element it holds (StaleElementReferenceException)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(tries - 1):
        try:
            return action()
        except StaleElementReferenceException:
            time.sleep(0.2)
    try:
        return action()
    except StaleElementReferenceException as error:
        raise SystemExit(f"{what}: the element kept being redrawn ({tries} tries)") from error


def open_notebook(driver, url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"), 90, "the notebook")
    wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']"), 120,
         "the kernel")


def figure(driver) -> tuple[str, str, int] | None:
    """The panel's figure as shown: (its PNG's title, its src, its height in px), or None before it is there.
    Read in one script, so an <img> that JupyterLab replaces meanwhile cannot go stale in between."""
    from PIL import Image

    found = driver.execute_script("const i = document.querySelector(arguments[0]);"
                                  "return i ? [i.src, Math.round(i.getBoundingClientRect().height)] : null", FIGURE)
    if not found or not found[0].startswith("data:image/png;base64,"):
        return None
    png = Image.open(io.BytesIO(base64.b64decode(found[0].split(",", 1)[1])), formats=["PNG"])
    return png.info.get("Title", ""), found[0], found[1]


def alpha_readout(driver) -> str:
    """The alpha slider's value as the page shows it ("0.80")."""
    value = driver.execute_script(
        "for (const s of document.querySelectorAll('.widget-slider')) {"
        "  if (s.textContent.includes('alpha')) return s.querySelector('.widget-readout').textContent.trim(); }"
        "return null")
    if value is None:
        raise SystemExit("no alpha slider on the page")
    return value


def press(driver, key, times: int = 1) -> None:
    """Focus the alpha slider's handle and press `key`, as a student does with the arrow keys."""
    from selenium.webdriver.common.by import By

    def act():
        handle = next(s for s in driver.find_elements(By.CSS_SELECTOR, ".widget-slider") if "alpha" in s.text) \
            .find_element(By.CSS_SELECTOR, ".noUi-handle")
        handle.click()
        for _ in range(times):
            handle.send_keys(key)
            time.sleep(0.15)

    retry(act, "the alpha slider")


def shows(driver, value: str):
    """The figure, once it shows alpha `value` ("0.80") and the slider reads it too."""
    shown = figure(driver)
    return shown if shown and f"alpha {value}," in shown[0] and alpha_readout(driver) == value else None


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    with record("jupyterlab_panels", "The panels in JupyterLab, reopened after a server restart"):
        rows = measure()
    print(f"screenshots in {OUT}", file=sys.stderr)
    if any(r[2] not in ("", "ok") for r in rows):  # the table is kept all the same: what the check found
        raise SystemExit(1)


def measure() -> list[list]:
    """Every step of the module's docstring; prints the table and returns its rows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    import sdipc_lab.widgets as W

    OUT.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="sdipc_lab_panels_"))
    path = notebook(folder)
    rows, load, driver = [], None, None
    jupyter, url = server(folder)
    try:
        driver = browser()
        open_notebook(driver, url)
        retry(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")[0].click(), "the first cell")
        start = time.time()
        for _ in CELLS:  # run each cell, as a student does with Shift+Enter
            retry(lambda: driver.switch_to.active_element.send_keys(Keys.SHIFT, Keys.ENTER), "the active cell")
            time.sleep(0.5)
        first = wait(lambda: figure(driver), 300, "the panel's first figure")
        rows.append(["first figure in the panel", f"{time.time() - start:.1f} s: {first[0]}", ""])
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']"),
             300, "the cells to finish")
        time.sleep(1)
        driver.save_screenshot(str(OUT / "panel.png"))

        # one step: the figure keeps its height while it redraws, then shows the new value
        press(driver, Keys.ARROW_LEFT)  # alpha 0.9 -> 0.8
        value, heights, t0 = alpha_readout(driver), [], time.time()
        while time.time() - t0 < 60 and not shows(driver, value):
            heights.append(figure(driver)[2])
            time.sleep(0.02)
        after = wait(lambda: shows(driver, value), 1, f"the figure of alpha {value}")
        rows.append(["figure after one step: title / slider", f"{after[0]} / alpha {value}",
                     "ok" if after[1] != first[1] else "same image"])
        rows.append(["one step: time until the new figure", f"{time.time() - t0:.1f} s", ""])
        rows.append(["figure height settled / lowest while it redraws", f"{first[2]} / {min(heights + [after[2]])} px",
                     "ok" if min(heights + [after[2]]) >= first[2] else "the page jumps"])
        select = driver.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")[0]
        label = driver.execute_script(
            "const s = arguments[0]; const c = document.createElement('canvas').getContext('2d');"
            "c.font = getComputedStyle(s).font;"
            "return [c.measureText(s.options[s.selectedIndex].text).width, s.clientWidth];", select)
        rows.append(["reference dropdown: label / box width", f"{label[0]:.0f} / {label[1]} px",
                     "ok" if label[0] + 20 <= label[1] else "label cut off"])
        driver.save_screenshot(str(OUT / "panel_after_move.png"))

        # under load: a burst of 4 steps while another process generates images
        load = subprocess.Popen([sys.executable, "-c", LOAD], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(10)  # it has loaded its lab and is generating
        seen, t0 = {first[1], after[1]}, time.time()
        press(driver, Keys.ARROW_LEFT)  # 0.8 -> 0.7: its figure starts drawing...
        time.sleep(0.3 + W.DEBOUNCE)
        press(driver, Keys.ARROW_LEFT, times=3)  # ... while 0.6, 0.5, 0.4 arrive, each sent to the kernel
        last = time.time()
        value = alpha_readout(driver)
        titles = []
        while time.time() - last < 120 and not shows(driver, value):
            shown = figure(driver)
            if shown[1] not in seen:
                seen.add(shown[1])
                titles.append(shown[0].split(", alpha ")[1].split(",")[0])
            time.sleep(0.05)
        final = wait(lambda: shows(driver, value), 1, f"the figure of alpha {value} under load")
        titles.append(final[0].split(", alpha ")[1].split(",")[0])
        lag = time.time() - last
        rows.append(["under load: 1 step, 3 more while it draws; last value shown after", f"{lag:.1f} s",
                     "ok" if lag <= 15 else "slow"])
        rows.append(["under load: figures drawn for the burst (alphas)", f"{len(titles)} ({', '.join(titles)})",
                     "ok" if titles[-1] == value else "CHECK"])
        time.sleep(3)  # nothing drawn after it: the figure stays on the last value
        stays = figure(driver)
        rows.append(["under load: 3 s later, figure / slider", f"alpha {stays[0].split(', alpha ')[1].split(',')[0]}"
                     f" / {alpha_readout(driver)}", "ok" if stays[1] == final[1] else "CHECK"])
        load.terminate()
        load.wait()
        load = None
        driver.save_screenshot(str(OUT / "under_load.png"))

        # save, shut the server down, reopen in a new server and browser
        saved = path.stat().st_mtime
        retry(lambda: driver.find_element(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell .jp-InputPrompt").click(),
              "the first cell's prompt")  # the cell selected, not the slider: Ctrl+S goes to JupyterLab
        driver.find_element(By.CSS_SELECTOR, "body").send_keys(Keys.CONTROL, "s")
        wait(lambda: path.stat().st_mtime > saved, 30, "the notebook to be saved")
        driver.quit()
        driver = None
        rows.append(["server shut down (Ctrl+C)", f"{shut_down(jupyter):.1f} s", ""])
        outputs = [o for c in json.loads(path.read_text())["cells"] for o in c["outputs"]]
        widget_outputs = sum("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
        pngs = sum("image/png" in o.get("data", {}) for o in outputs)
        rows.append(["saved notebook: widget outputs / images", f"{widget_outputs} / {pngs}",
                     "ok" if widget_outputs == 1 and pngs == 1 else "CHECK"])
        jupyter, url = server(folder)
        driver = browser()
        open_notebook(driver, url)
        time.sleep(8)  # the widget manager gives up on missing models after ~2 s; leave it time to draw them
        text = retry(lambda: driver.find_element(By.CSS_SELECTOR, ".jp-Notebook").text, "the notebook")
        html = driver.execute_script("return document.querySelector('.jp-Notebook').innerHTML")
        shown_errors, html_errors = text.count(ERROR), html.count(ERROR)
        rows.append([f"'{ERROR}' shown after reopening", str(shown_errors), "ok" if shown_errors == 0 else "CHECK"])
        rows.append([f"'{ERROR}' in the page's HTML (hidden)", str(html_errors), ""])
        rows.append(["note where the controls were", "shown" if W.NOTE in text else "missing",
                     "ok" if W.NOTE in text else "CHECK"])
        reopened = figure(driver)
        rows.append(["saved figure after reopening", reopened[0] if reopened else "none",
                     "ok" if reopened and reopened[1] == final[1] else "CHECK"])
        bars = driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell:nth-child(3) .jp-OutputArea-child")
        rows.append(["progress bar cell after reopening: outputs / text", f"{len(bars)} / "
                     f"{sum(len(b.text) for b in bars)} chars", "ok" if not any(b.text for b in bars) else "CHECK"])
        driver.save_screenshot(str(OUT / "reopened.png"))
    finally:
        if driver is not None:
            driver.quit()
        if load is not None:
            load.terminate()
        shut_down(jupyter)
        shutil.rmtree(folder, ignore_errors=True)
    print("Edit panel on the toy lab (n=4) and one progress bar, in JupyterLab in headless Chromium; the load is one "
          "more process looping `S.vary(n=4)` on 1 thread. Screenshots: build/jupyterlab/.\n")
    print(table(["check", "measured", "verdict"], rows))
    return rows


if __name__ == "__main__":
    main()
