"""The panels and progress bars as a notebook saves them: a reopened notebook (its kernel gone) shows the last
figures as images and no widget that needs the kernel; a burst of slider moves draws once, the last value."""

import asyncio
import io
import os

from PIL import Image

from sdipc_lab import widgets

PNG = io.BytesIO()
Image.new("RGB", (4, 4)).save(PNG, "png")
PNG = PNG.getvalue()
WIDGET = "application/vnd.jupyter.widget-view+json"


def _control(panel, description: str):
    return next(c for c in panel.children[0].children if getattr(c, "description", None) == description)


def test_a_burst_of_moves_draws_once_for_the_last_value(lab, refs, monkeypatch):
    """Moves that arrive before the panel draws are coalesced: the figure is drawn for the last value only,
    and a move that arrives while a figure is being drawn is drawn after it -- the figure ends on the slider."""
    drawn = []
    monkeypatch.setattr(widgets, "_show", lambda images, title: drawn.append(title) or PNG)
    panel = widgets.edit_panel(lab, {"a": refs[0]}, n=1)
    alpha = _control(panel, "alpha")
    assert alpha.continuous_update is False  # a dragged slider sends one value, where it is let go
    assert drawn == ["'a blue disk', alpha 0.90, seed 0"]

    async def moves():
        alpha.value = 0.7
        alpha.value = 0.4  # before the panel drew 0.7
        await asyncio.sleep(4 * widgets.DEBOUNCE)
        loop = asyncio.get_running_loop()
        slow = widgets._show

        def slow_draw(images, title):  # a move arrives (is queued) while this figure is drawn
            loop.call_soon(setattr, alpha, "value", 1.2)
            monkeypatch.setattr(widgets, "_show", slow)
            return slow(images, title)

        monkeypatch.setattr(widgets, "_show", slow_draw)
        alpha.value = 0.5
        await asyncio.sleep(4 * widgets.DEBOUNCE)
        alpha.value = 0.6
        alpha.value = 1.2  # back to the value shown: nothing to draw
        await asyncio.sleep(4 * widgets.DEBOUNCE)

    asyncio.run(moves())
    assert drawn[1:] == ["'a blue disk', alpha 0.40, seed 0", "'a blue disk', alpha 0.50, seed 0",
                         "'a blue disk', alpha 1.20, seed 0"]
    assert panel.redraw.shown["alpha"] == 1.2


def test_a_failed_redraw_says_so_and_keeps_the_last_figure(lab, refs, monkeypatch):
    panel = widgets.cutoff_slider(lab, refs[0], [0.0, lab.cutoff], n=1)
    shown = dict(panel.redraw.shown)

    def broken(images, title):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(widgets, "_show", broken)
    _control(panel, "cutoff").value = 0.0
    assert panel.redraw.shown == shown
    assert "could not draw {'cutoff': 0.0}: RuntimeError: out of memory" in panel.children[0].children[-1].value


def test_the_figure_keeps_its_size_in_pixels_whatever_its_title(refs):
    titles = ("x", "'a much longer edit text than usual', alpha 1.90, seed 20")
    figures = [Image.open(io.BytesIO(widgets._show(refs[:2], title)), formats=["PNG"]) for title in titles]
    assert {f.size for f in figures} == {(int(2 * widgets.SIZE * widgets.DPI), int((widgets.SIZE + 0.4) * widgets.DPI))}
    assert [f.info["Title"] for f in figures] == list(titles)  # what each figure shows, readable back


KERNEL_CELLS = [
    "import asyncio\nimport sdipc_lab as S\nfrom sdipc_lab.generate import progress\n"
    "from sdipc_lab.toyworld import sample\nfrom sdipc_lab.widgets import cutoff_slider\n"
    "lab = S.load_lab('tiny')\nref = sample(0, 'test', two_objects=0).image",
    "panel = cutoff_slider(lab, ref, [0.0, 0.5], n=1);",
    "panel.children[0].children[0].value = 0.5  # from 0.0, the nearest to the tiny lab's cutoff 0.05\n"
    "await asyncio.sleep(2)",
    "with progress(2, 'experiment') as bar:\n    S.vary(lab, ref, n=1)\n    S.vary(lab, ref, n=1)",
]


def _run_in_a_kernel(cells: list[str]) -> list[list[dict]]:
    """Each cell's outputs as the notebook saves them (display_data, with update_display_data applied by
    display_id, as JupyterLab does), run in a real ipykernel."""
    from jupyter_client.manager import start_new_kernel

    manager, client = start_new_kernel(kernel_name="python3", env={**os.environ, "OMP_NUM_THREADS": "1"})
    outputs, by_id = [], {}
    try:
        for source in cells:
            cell = []
            msg_id = client.execute(source)
            while True:
                msg = client.get_iopub_msg(timeout=300)
                kind, content = msg["msg_type"], msg["content"]
                display_id = content.get("transient", {}).get("display_id")
                if kind == "update_display_data":
                    for output in by_id.get(display_id, []):
                        output["data"] = content["data"]
                        output["versions"].append(content["data"])
                elif kind in ("display_data", "execute_result", "stream", "error"):
                    if kind == "error":
                        raise AssertionError("\n".join(content["traceback"]))
                    output = {"output_type": kind, "data": content.get("data", {}), "text": content.get("text"),
                              "versions": [content.get("data", {})]}
                    cell.append(output)
                    by_id.setdefault(display_id, []).append(output)
                elif (kind == "status" and content["execution_state"] == "idle"
                      and msg["parent_header"].get("msg_id") == msg_id):
                    break
            outputs.append(cell)
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    return outputs


def test_a_saved_notebook_keeps_the_figure_as_an_image_and_no_dead_widgets():
    """In a real kernel: the panel's cell saves its controls (a widget, and the note that stands in for it once
    the kernel is gone) and the figure as image/png, which a slider move replaces with the new value's figure;
    an experiment's progress bar leaves no widget and no text behind."""
    setup, panel, move, experiment = _run_in_a_kernel(KERNEL_CELLS)
    kinds = [sorted(o["data"]) for o in panel]
    assert kinds == [sorted([WIDGET, "text/plain"]), ["text/html", "text/plain"], ["image/png", "text/plain"]]
    widget, note, figure = panel
    assert widget["data"]["text/plain"] == ""  # a viewer without widgets shows the note alone
    assert note["data"]["text/plain"] == widgets.NOTE and widgets.NOTE in note["data"]["text/html"]
    assert move == []  # the redraw goes to the panel's own figure, not to the cell that moved the slider
    assert len(figure["versions"]) == 2, "the figure was not redrawn (once) after the slider moved"
    assert figure["versions"][0]["image/png"] != figure["data"]["image/png"]
    assert not any(WIDGET in o["data"] for o in experiment)
    [bar] = experiment
    assert bar["data"] == {"text/plain": ""} and "experiment: 100%" in bar["versions"][-2]["text/plain"]
    assert not any("Error" in (o.get("text") or "") for o in setup + experiment)
