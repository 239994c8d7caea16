"""Notebook 01's masking experiment on any lab, as one table: which of shape, colour, size and position survive when
the word tokens are masked (after the softmax, as in the paper, or before it) and when the end and padding tokens
are (the control), judged by the independent judge, with the pixel change against the full prompt.

    python bench/masking.py runs/toy/lab               # a lab folder, or "toy"
    python bench/masking.py toy --n 64 --seed 1

It tells whether a U-Net reads the end token (SD v1.4's habit, the paper's Fig. 2) or the words: a U-Net
trained from the start under a fully trained text tower reads the words, one started under a briefly trained
tower reads the end token (docs/guide/teaching_lab.md, "Why a route in phases").

With --padding, three more conditions tell whether it reads the padding states, which SD-IPC's pseudo-prompt
replaces by copies of one state: the caption with its padding states replaced by copies of its end
state; the same with the words masked too (after the softmax); and [sos, EOS x 76] (the oracle's layout).

    python bench/masking.py toy --n 96 --padding

Writes docs/results/masking.md (replaced on every run; `common.record`).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import record, table, threads  # noqa: E402

import sdipc_lab as S  # noqa: E402
from sdipc_lab import experiments as E  # noqa: E402
from sdipc_lab.attention import installed, token_mask  # noqa: E402
from sdipc_lab.convert import encode_text, end_padded, eos_prompt_embeds  # noqa: E402

KEYS = ["condition", "judge shape", "judge colour", "judge size", "judge position", "pixel change vs full"]


def padding_conditions(lab, data, full, *, seed: int) -> list[dict]:
    """The padding-state conditions (see the module's docstring), judged against the captions, with the pixel
    change against `full`, the full prompt's images."""
    captions = [s.caption for s in data]
    padded = end_padded(*encode_text(lab, captions))  # (B, 77, D)
    words_masked = token_mask(lab, captions, "sos+eos")  # (B, 77)
    images = {"padding -> copies of the end state": S.sample(lab, padded, n=1, seed=seed)}
    with installed(lab):
        images["words masked, padding -> end-state copies"] = S.sample(
            lab, padded, n=1, seed=seed, cross_attention_kwargs={"token_mask": words_masked, "mask_mode": "post"})
    images["[sos, EOS x 76]"] = S.sample(lab, eos_prompt_embeds(lab, captions), n=1, seed=seed)
    judge, truths = S.judge_for(lab), [s.attributes for s in data]
    return [{"condition": name, **{f"judge {k}": v for k, v in E.agreement(judge(imgs), truths).items()},
             "pixel change vs full": E.pixel_change(imgs, full)} for name, imgs in images.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("lab", help='a lab folder, or "toy"')
    parser.add_argument("--n", type=int, default=32, help="test captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--padding", action="store_true", help="also the padding-state conditions")
    args = parser.parse_args()
    with record("masking", "The masking experiment: which tokens a U-Net reads", lab=args.lab):
        lab = S.load_lab(args.lab)
        data = S.references(lab, args.n)
        rows, images = E.masking_experiment(lab, data, seeds=(args.seed,), judge=S.judge_for(lab))
        if args.padding:
            rows += padding_conditions(lab, data, images["full prompt"], seed=args.seed)
        print(f"## Masking experiment ({lab.source}, {args.n} test captions, seed {args.seed}, {threads()}; "
              "the judge's agreement with the captions, 0-1)\n")
        print(table(KEYS, [[row.get(k) for k in KEYS] for row in rows]))


if __name__ == "__main__":
    main()
