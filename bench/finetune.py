"""SD-IPC-CT vs Custom Diffusion: iterations to a fidelity; seconds per iteration and peak memory of FT and CT.

    python bench/finetune.py [--source toy] [--iterations 0 10 20 30 60 125 250] [--save docs/results/fidelity_curve.json]

The paper: CT needs 30 iterations where Custom Diffusion needs 250. The target here: CT reaches Custom
Diffusion's 250-iteration fidelity (the judge's shape-and-colour agreement) in <= 30 iterations.
Seconds per iteration are steady-state: in a fresh subprocess per method, after a 2-iteration warm-up
run, each method is timed for k and for 2k iterations and the difference is divided by k, so loading,
set-up, checkpoints and the loss plot cancel. Peak memory is the peak resident set *during training* (Linux: VmHWM reset after the lab is
loaded), reported beside the resident set of the loaded lab itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import table  # noqa: E402

CONCEPT = ("heart", "orange")


def _rss_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB (Linux); ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _speed(source: str, method: str, steps: int) -> None:
    """Run in a subprocess: a short warm-up run (imports, caches, first plot), then runs of k and 2k
    iterations; print the steady seconds per iteration, the set-up cost and the peak RSS while training."""
    import sdipc_lab as S
    from sdipc_lab import finetune as FT
    from sdipc_lab.toyworld import concept_samples

    lab = S.load_lab(source)
    images = [x.image for x in concept_samples(*CONCEPT, 5)]
    others = [x.image for x in concept_samples("star", "blue", 5)]

    def run(k: int) -> float:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            if method == "custom-diffusion":
                FT.custom_diffusion(lab, images, class_word=CONCEPT[0], steps=k, out=out)
            else:
                concepts = FT.Concepts({"a": images, "b": others})
                FT.finetune(lab, concepts, mode=method, steps=k, out=out,
                            captions={"a": "an orange heart", "b": "a blue star"} if method == "ft" else None)
            return time.perf_counter() - start

    run(2)
    loaded_mb = _rss_mb("VmRSS")
    _reset_peak()
    short, long = run(steps), run(2 * steps)
    per_it = (long - short) / steps
    print(json.dumps({"s_per_it": per_it, "setup_s": short - steps * per_it, "loaded_mb": loaded_mb,
                      "peak_mb": _rss_mb("VmHWM")}))


def _run_speed(source: str, method: str, steps: int) -> dict:
    res = subprocess.run([sys.executable, __file__, "--source", source, "--_speed", method, str(steps)],
                         capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"timing {method} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def print_curve(rows: list[dict], source: str, n_eval: int) -> None:
    """The fidelity table, and when SD-IPC-CT reaches Custom Diffusion's fidelity at its last iteration count:
    first (any single point, noisy with few judged images) and for good (at that point and every later one)."""
    print(f"## Fidelity to '{CONCEPT[1]} {CONCEPT[0]}' from 5 images ({source} lab, {n_eval} images judged)\n")
    print(table(["method", "iterations", "judge shape", "judge colour", "judge both", "CLIP-I"],
                [[r["method"], r["iterations"], r["judge shape"], r["judge colour"], r["judge both"], r["CLIP-I"]]
                 for r in rows]))
    last = max(r["iterations"] for r in rows)
    cd_best = next(r["judge both"] for r in rows if r["method"] == "Custom Diffusion" and r["iterations"] == last)
    ct = sorted((r["iterations"], r["judge both"]) for r in rows if r["method"] == "SD-IPC-CT")
    first = next((it for it, v in ct if v >= cd_best), None)
    held = next((it for k, (it, _) in enumerate(ct) if all(v >= cd_best for _, v in ct[k:])), None)
    print(f"\nCustom Diffusion at {last} iterations: judge both {cd_best:.2f}. SD-IPC-CT reaches it first at "
          f"{first if first is not None else 'never'} and for good at {held if held is not None else 'never'} "
          f"iterations (target <= 30; one judged image is {1 / n_eval:.2f}).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default="toy")
    parser.add_argument("--iterations", type=int, nargs="+", default=[0, 10, 20, 30, 60, 125, 250])
    parser.add_argument("--n-eval", type=int, default=12)
    parser.add_argument("--save", default=None, help="write the curve as JSON (the notebook reads docs/results/)")
    parser.add_argument("--speed-steps", type=int, default=10, help="k: timed at k and 2k iterations")
    parser.add_argument("--speed-only", action="store_true", help="skip the fidelity curve")
    parser.add_argument("--curve", help="print the fidelity table of a saved run (--save) instead of training")
    parser.add_argument("--_speed", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._speed:
        return _speed(args.source, args._speed[0], int(args._speed[1]))

    import sdipc_lab as S
    from sdipc_lab import experiments as E
    from sdipc_lab.toyworld import concept_samples
    from sdipc_lab.toyworld.judge import Judge

    if args.curve:  # re-read a saved run instead of training again
        saved = json.loads(Path(args.curve).read_text())
        return print_curve(saved["rows"], saved["source"], args.n_eval)
    if not args.speed_only:
        lab = S.load_lab(args.source)
        lab.pipe.set_progress_bar_config(disable=True)
        train_images = [x.image for x in concept_samples(*CONCEPT, 5)]
        with tempfile.TemporaryDirectory() as out:
            rows = E.fidelity_curve(lab, CONCEPT, train_images, args.iterations, out=out, judge=Judge(), n_eval=args.n_eval)
        print_curve(rows, lab.source, args.n_eval)
        if args.save:
            Path(args.save).parent.mkdir(parents=True, exist_ok=True)
            Path(args.save).write_text(json.dumps({"concept": CONCEPT, "source": lab.source, "rows": rows}, indent=1))
    speed = []
    k = args.speed_steps
    for method in ("ft", "ct", "custom-diffusion"):
        r = _run_speed(args.source, method, k)
        speed.append([method, r["s_per_it"], r["setup_s"], r["loaded_mb"], r["peak_mb"], r["peak_mb"] - r["loaded_mb"]])
    print(f"\n## Speed and memory on {os.cpu_count()} CPU cores ({args.source} lab, batch 4)\n")
    print(table(["method", "seconds / iteration (steady)", "set-up + saving (s)", "RSS of the loaded lab (MB)",
                 "peak RSS while training (MB)", "training's extra (MB)"], speed))
    print("\nGPU (random SD v1.4 / ViT-L/14-sized models): not measured, no GPU was lent to this session.")


if __name__ == "__main__":
    main()
