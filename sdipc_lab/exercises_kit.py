"""What every exercise is made of: the `Exercise` class (check / hint / solution), the registry the notebooks'
exercises fill, and the checks that turn a malformed answer into a clear "Not yet" instead of a traceback.

The exercises themselves are in exercises_converter.py (notebooks 00-03), exercises_variation_editing.py (04-05)
and exercises_training.py (06-08); `exercises("05")` in exercises.py looks them up.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .bars import in_notebook
from .datasets import judge_for
from .lab import Lab

SOLUTIONS = "notebooks/solutions"


class NotYet(Exception):
    """A wrong or malformed answer; its message says what is wrong and what to try."""


@dataclasses.dataclass(frozen=True)
class Exercise:
    """One exercise: `check(answer, ...)` -> bool, `hint()`, `solution()` (each shows one message)."""

    notebook: str  # "05"
    number: int
    task: str  # what to pass to check, in one sentence
    hints: str
    code: str  # the worked answer, ending in its check
    checker: Callable[..., str]  # returns why the answer is right; raises NotYet

    def check(self, answer=inspect.Parameter.empty, *args, **kwargs) -> bool:
        """True when `answer` is right; shows "Correct: <why>" or "Not yet: <what is wrong and what to try>"."""
        try:
            if answer is inspect.Parameter.empty:
                raise NotYet(f"pass your answer: {self.task}")
            try:
                inspect.signature(self.checker).bind(answer, *args, **kwargs)
            except TypeError as error:
                raise NotYet(f"{error}; call it as {self.task}") from None
            why, ok = self.checker(answer, *args, **kwargs), True
        except NotYet as wrong:
            why, ok = str(wrong), False
        _show(f"{'Correct' if ok else 'Not yet'}: {why}")
        return ok

    def hint(self) -> None:
        _show(f"Hint ({self.notebook}, exercise {self.number}): {self.hints}")

    def solution(self) -> None:
        _show(f"**Solution ({self.notebook}, exercise {self.number})**, worked and measured in "
              f"`{_solutions_notebook(self.notebook)}`, section {self.number}:\n\n```python\n{self.code.strip()}\n```",
              markdown=True)

    def __repr__(self) -> str:
        return f"Exercise({self.notebook}, {self.number}): {self.task}"


REGISTRY: dict[tuple[str, int], Exercise] = {}


def _exercise(notebook: str, number: int, task: str, hint: str, code: str):
    def register(checker: Callable[..., str]) -> Callable[..., str]:
        REGISTRY[(notebook, number)] = Exercise(notebook, number, task, hint, code, checker)
        return checker
    return register


def _show(text: str, markdown: bool = False) -> None:
    """A Markdown (or plain) message in a notebook, print elsewhere; no global setting is changed."""
    if in_notebook():
        from IPython.display import Markdown, display
        display(Markdown(text) if markdown else {"text/plain": text}, raw=not markdown)
    else:
        print(text)


def _solutions_notebook(notebook: str) -> str:
    root = Path(__file__).resolve().parents[1] / SOLUTIONS
    found = sorted(root.glob(f"{notebook}_*_solutions.ipynb"))
    return f"{SOLUTIONS}/{found[0].name}" if found else f"{SOLUTIONS}/{notebook}_*_solutions.ipynb"


# --- validating answers: a clear "Not yet" instead of a traceback from deep inside torch ---------------------

def _tensor(answer, shape: tuple, what: str) -> torch.Tensor:
    """`answer` as a float64 CPU tensor of `shape`; `what` names the shape for the message, e.g. "(B, 77, D)"."""
    if isinstance(answer, np.ndarray):
        answer = torch.from_numpy(answer)
    if not isinstance(answer, torch.Tensor):
        raise NotYet(f"expected a {what} tensor {tuple(shape)}, got {type(answer).__name__}")
    if tuple(answer.shape) != tuple(shape):
        raise NotYet(f"expected a {what} tensor {tuple(shape)}, got shape {tuple(answer.shape)}")
    answer = answer.detach().to("cpu", torch.float64)
    if not torch.isfinite(answer).all():
        raise NotYet(f"your {what} tensor holds NaN or infinite values")
    return answer


def _number(answer, what: str) -> float:
    if isinstance(answer, torch.Tensor) and answer.numel() == 1 or isinstance(answer, (np.ndarray, np.generic)) \
            and answer.size == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real) or not math.isfinite(answer):
        raise NotYet(f"expected {what} (a number), got {answer!r:.80}")
    return float(answer)


def _choice(answer, options: Sequence[str], what: str) -> str:
    name = answer.strip().lower() if isinstance(answer, str) else None
    if name not in options:
        raise NotYet(f"expected {what}: one of {', '.join(map(repr, options))}; got {answer!r:.80}")
    return name


def _names(answer, options: Sequence[str], what: str) -> set[str]:
    """A list (or set) of names among `options`; "none" or [] for none."""
    if isinstance(answer, str):
        answer = [] if answer.strip().lower() == "none" else [answer]
    if not isinstance(answer, (list, tuple, set)):
        raise NotYet(f"expected {what}: a list of names among {', '.join(map(repr, options))}, got {answer!r:.80}")
    return {_choice(a, options, what) for a in answer}


def _close(answer: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4) -> bool:
    return bool(torch.allclose(answer, want.detach().to("cpu", torch.float64), rtol=rtol,
                               atol=rtol * float(want.abs().max())))


def _lab(lab) -> Lab:
    if not isinstance(lab, Lab):
        raise NotYet(f"pass the lab as the second argument: check(answer, lab); got {type(lab).__name__}")
    return lab


def _judge(lab: Lab):
    judge = judge_for(_lab(lab))
    if judge is None:
        raise NotYet(f"this check reruns the toy world's judge, which reads only the teaching lab's images; "
                     f"{lab.source!r} does not draw that world: run it with SOURCE = 'toy'")
    return judge


def _student(fn: Callable, *args):
    """Call the student's function, reporting an error of theirs as Not yet."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 (any error of the student's code is the answer to report)
        raise NotYet(f"your function raised {type(error).__name__}: {str(error)[:200]}") from None


def _frac(x: float) -> str:
    return f"{x:.2f}"
