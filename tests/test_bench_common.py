"""bench/common.py's `record`: what a bench prints, kept as its results file, written whole or not at all."""

import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import common


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """A bench run as `python bench/fake.py --n 4 'two words'`, its results going to tmp_path/<name>.md."""
    monkeypatch.setattr(sys, "argv", [str(ROOT / "bench" / "fake.py"), "--n", "4", "two words"])
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__", "A fake bench. It measures nothing."))
    monkeypatch.delenv(common.NO_RESULTS, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    return tmp_path


def test_the_file_holds_the_header_and_what_was_printed(bench, capsys):
    stdout = sys.stdout
    with common.record("fake", "A fake bench, measured") as path:
        print("Some prose before the table.\n")
        print(common.table(["lab", "seconds"], [["toy", 1.25], ["tiny", 250.0]]))
        print("progress 10 %", file=sys.stderr)
        print("drawing 1/2\rdrawing 2/2")
    assert path == bench / "fake.md" and sys.stdout is stdout
    lines = path.read_text().splitlines()
    assert lines[0] == "# A fake bench, measured" and lines[1] == ""
    assert lines[2].startswith("`OMP_NUM_THREADS=1 python bench/fake.py --n 4 'two words'`, 20")
    assert " UTC, " in lines[2] and "CPUs, load average" in lines[2] and lines[2].endswith(".")
    text = path.read_text()
    assert "Some prose before the table.\n\n| lab | seconds |\n|---|---|\n| toy | 1.25 |\n| tiny | 250 |\n" in text
    assert "progress" not in text  # stderr is not kept
    assert "drawing 2/2" in text and "drawing 1/2" not in text  # a redrawn line: its last state
    assert text.endswith("drawing 2/2\n")
    assert "| toy | 1.25 |" in capsys.readouterr().out  # printed as usual too
    assert [p.name for p in bench.iterdir()] == ["fake.md"]  # no temporary file left


def test_the_title_defaults_to_the_scripts_first_sentence(bench):
    with common.record(bench / "other.md") as path:
        print("x")
    assert path.read_text().startswith("# A fake bench\n")


@pytest.mark.parametrize("error", [RuntimeError("failed"), SystemExit(1), KeyboardInterrupt()])
def test_a_failed_run_leaves_the_previous_file(bench, error):
    (bench / "fake.md").write_text("# the previous run\n")
    stdout = sys.stdout
    with pytest.raises(type(error)), common.record("fake"):
        print("half a table")
        raise error
    assert (bench / "fake.md").read_text() == "# the previous run\n"
    assert sys.stdout is stdout
    assert [p.name for p in bench.iterdir()] == ["fake.md"]


def test_no_results_writes_nothing(bench, monkeypatch, capsys):
    monkeypatch.setenv(common.NO_RESULTS, "1")
    with common.record("fake") as path:
        print("a trial run")
    assert path is None and not (bench / "fake.md").exists()
    assert "a trial run" in capsys.readouterr().out
    monkeypatch.delenv(common.NO_RESULTS)
    with common.record(None) as path:  # a mode of a bench that has no results file
        print("a partial run")
    assert path is None and list(bench.iterdir()) == []


def test_a_candidate_lab_leaves_the_shipped_labs_results(bench, capsys):
    (bench / "fake.md").write_text("the shipped lab's numbers\n")
    with common.record("fake", "A fake bench", lab="runs/candidate/lab") as path:
        print("| a candidate's table |")
    assert path is None and (bench / "fake.md").read_text() == "the shipped lab's numbers\n"
    captured = capsys.readouterr()
    assert "a candidate's table" in captured.out and "not the shipped one" in captured.err
