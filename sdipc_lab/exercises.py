"""Self-checking exercises for the notebooks: `check`, `hint` and `solution`, as in Kaggle Learn.

    from sdipc_lab.exercises import exercises
    ex = exercises("05")
    ex[3].check(my_prompt, lab)     # True or False, and one line: "Correct: ..." or "Not yet: ..."
    ex[3].hint(), ex[3].solution()

Every exercise asks for something concrete (a tensor, a function, a number, a choice among named options, a
training run's folder) and `check` compares it with a reference the package computes *at check time*, on the
lab passed in, so the checks stay right when the lab is retrained. Checks that rerun a judged measurement
generate the same images as the solutions notebook (same references, seeds and calls): they take as long as
that measurement. The worked answers stay in notebooks/solutions/, one section per exercise.

The machinery is in exercises_kit.py; the exercises, by notebook, in exercises_converter.py (00-03),
exercises_variation_editing.py (04-05) and exercises_training.py (06-08). Importing them fills the registry.
"""

from __future__ import annotations

from . import exercises_converter, exercises_training, exercises_variation_editing  # noqa: F401 (they register)
from .exercises_kit import REGISTRY, Exercise, NotYet

__all__ = ["REGISTRY", "Exercise", "NotYet", "exercises"]


def exercises(notebook: str | int) -> dict[int, Exercise]:
    """The exercises of a notebook ("05", 5 or "05_editing_alpha"), by number."""
    key = f"{int(str(notebook).split('_')[0]):02d}" if str(notebook).split("_")[0].isdigit() else str(notebook)
    found = {n: ex for (nb, n), ex in sorted(REGISTRY.items()) if nb == key}
    if not found:
        raise ValueError(f"no exercises for notebook {notebook!r}; there are some for "
                         f"{sorted({nb for nb, _ in REGISTRY})}")
    return found
