"""The widget panels as a student sees them: in JupyterLab, in headless Chromium, driven by Selenium.

    pip install selenium            # and Chromium + ChromeDriver from your OS (apt-get install chromium chromium-driver)
    python bench/jupyterlab_panels.py

Starts JupyterLab on a notebook that shows `edit_panel` on the default lab, runs it, then moves the alpha
slider and samples the panel's height every 20 ms while it redraws (a panel that collapses while it redraws
makes the page jump), checks that the reference dropdown shows its whole label, saves, reloads the page and
looks for "Error displaying widget". Prints a table; screenshots go to build/jupyterlab/.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import table  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "build" / "jupyterlab"
CELLS = [
    "import sdipc_lab as S\nfrom sdipc_lab.toyworld import samples\nfrom sdipc_lab.widgets import edit_panel\n"
    "lab = S.load_lab('toy')\ndata = samples(6, 'test', two_objects=0)",
    "edit_panel(lab, {f'{i}: {s.caption}': s.image for i, s in enumerate(data)}, n=4);",
]


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
    end = time.time() + seconds
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"timed out after {seconds} s waiting for {what}")


def main() -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    OUT.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="sdipc_lab_panels_"))
    notebook(folder)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}",
                               "--ServerApp.token=", "--ServerApp.password=", f"--ServerApp.root_dir={folder}",
                               "--ServerApp.disable_check_xsrf=True", *(["--allow-root"] if os.geteuid() == 0 else [])],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    driver = browser()
    rows = []
    try:
        url = f"http://127.0.0.1:{port}/lab/tree/panel.ipynb"
        wait(lambda: up(url), 180, "JupyterLab")
        driver.get(url)
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"), 90, "the notebook")
        wait(lambda: "Idle" in driver.find_element(By.CSS_SELECTOR, "body").text
             or driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook-ExecutionIndicator[data-status='idle']"), 90,
             "the kernel")
        first = driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")[0]
        first.click()
        for _ in CELLS:  # run each cell, as a student does with Shift+Enter
            driver.switch_to.active_element.send_keys(Keys.SHIFT, Keys.ENTER)
            time.sleep(0.5)
        start = time.time()
        panel_img = "div.widget-vbox .jp-OutputArea-output img, div.widget-vbox img"
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, panel_img), 300, "the panel's first figure")
        rows.append(["first figure in the panel", f"{time.time() - start:.1f} s", ""])
        time.sleep(1)
        output = driver.find_elements(By.CSS_SELECTOR, "div.widget-vbox > .widget-output, div.widget-vbox .jp-OutputArea")[0]
        settled = output.size["height"]
        driver.save_screenshot(str(OUT / "panel.png"))
        slider = driver.find_elements(By.CSS_SELECTOR, ".widget-slider .noUi-handle, .widget-slider input")[0]
        slider.click()
        slider.send_keys(Keys.ARROW_LEFT)  # alpha 0.9 -> 0.8
        heights, t0 = [], time.time()
        while time.time() - t0 < 20:
            heights.append(output.size["height"])
            time.sleep(0.02)
        rows.append(["panel output height, settled", f"{settled} px", ""])
        rows.append(["lowest height while it redraws", f"{min(heights)} px",
                     "ok" if min(heights) >= settled - 5 else f"jumps {settled - min(heights)} px"])
        select = driver.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")[0]
        shown = driver.execute_script(
            "const s = arguments[0]; const c = document.createElement('canvas').getContext('2d');"
            "c.font = getComputedStyle(s).font; return [c.measureText(s.options[s.selectedIndex].text).width, s.clientWidth];",
            select)
        rows.append(["reference dropdown: label / box width", f"{shown[0]:.0f} / {shown[1]} px",
                     "ok" if shown[0] + 20 <= shown[1] else "label cut off"])
        driver.save_screenshot(str(OUT / "panel_after_move.png"))
        driver.find_element(By.CSS_SELECTOR, "body").send_keys(Keys.CONTROL, "s")
        time.sleep(2)
        driver.get(url)  # reopen the saved notebook, as a student does the next day
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-Cell"), 90, "the reopened notebook")
        time.sleep(5)
        text = driver.find_element(By.CSS_SELECTOR, ".jp-Notebook").text
        errors = text.count("Error displaying widget")
        rows.append(["'Error displaying widget' after reopening", str(errors), "ok" if errors == 0 else "CHECK"])
        driver.save_screenshot(str(OUT / "reopened.png"))
    finally:
        driver.quit()
        server.terminate()
    print(f"JupyterLab in headless Chromium; screenshots in {OUT}\n")
    print(table(["check", "measured", "verdict"], rows))
    if any(r[2] not in ("", "ok") for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
