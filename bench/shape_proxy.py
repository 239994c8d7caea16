"""Can the teaching lab's image tower learn to read shape on a CPU, and which tower learns it fastest?

    python bench/shape_proxy.py [--steps 1500] [--towers shipped,patch8,patch4] [--lr 1e-4] [--lr-fresh 3e-4]

A short proxy before a long run. Each tower (the shipped one, or a fresh one of the lab's width with patch 8 or 4)
gets a linear shape head on its image embedding and is trained for `--steps` steps (the same work on a busy
machine; the table gives each tower's seconds per step, to turn steps into CPU time), supervised, on half
world renderings and half varied drawings (`toyworld.variety`, its train split). It is then scored on the world's
test renderings, on varied drawings of unseen seeds and on 480 drawings of `toyworld.freehand` (the "dev" part
only: the held-out part informs no decision), all of them and the small ones (objects 15-25 % and 25-40 % of the
image wide). Supervised shape is an upper bound for what the contrastive `vision` stage can teach the same tower
in the same time. Progress goes to stderr. Writes docs/results/shape_proxy.md (replaced on every run;
`common.record`).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from common import record, table, threads  # noqa: E402

import sdipc_lab as S  # noqa: E402
from sdipc_lab.toyworld import freehand, samples, variety  # noqa: E402
from sdipc_lab.toyworld.world import SHAPES  # noqa: E402

def pixels(lab, images) -> torch.Tensor:  # (N, 3, 64, 64), the lab's own preprocessing
    return torch.cat([lab.feature_extractor(images=images[i:i + 512], return_tensors="pt").pixel_values
                      for i in range(0, len(images), 512)])


def labelled(lab, items) -> tuple[torch.Tensor, torch.Tensor]:
    images = [getattr(x, "image") for x in items]
    shapes = [x.shape if hasattr(x, "shape") and isinstance(x.shape, str) else x.things[0].shape for x in items]
    return pixels(lab, images), torch.tensor([SHAPES.index(s) for s in shapes])


def tower(lab, name: str):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    if name == "shipped":
        return copy.deepcopy(lab.image_encoder).float()
    config = CLIPVisionConfig(**{**lab.image_encoder.config.to_dict(), "patch_size": int(name.removeprefix("patch"))})
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(config).float()


@torch.no_grad()
def accuracy(model, head, x, y) -> float:
    model.eval()
    hits = [(head(model(pixel_values=x[i:i + 256]).image_embeds).argmax(-1) == y[i:i + 256]).float()
            for i in range(0, len(x), 256)]
    model.train()
    return float(torch.cat(hits).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="training steps per tower")
    parser.add_argument("--towers", default="shipped,patch8,patch4")
    parser.add_argument("--n-train", type=int, default=6000, help="images of each kind (world, varied)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of the shipped tower, fine-tuned")
    parser.add_argument("--lr-fresh", type=float, default=3e-4, help="learning rate of the fresh towers")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with record("shape_proxy", "Shape proxy: which image tower learns to read shape"):
        lab = S.load_lab("toy", dtype=torch.float32)

        start = time.perf_counter()
        world = samples(args.n_train, "train", two_objects=0)
        varied = [variety.sample(i) for i in range(args.n_train)]
        x_train, y_train = (torch.cat(t) for t in zip(labelled(lab, world), labelled(lab, varied)))
        dev = freehand.drawings(480, "dev")
        tests = {"world test": labelled(lab, samples(300, "test", two_objects=0)),
                 "varied, unseen seeds": labelled(lab, [variety.sample(10**6 + i) for i in range(300)]),
                 "drawings (dev)": labelled(lab, dev)}
        for bucket in freehand.BUCKETS[:2]:  # objects smaller than any of the world's, and about its small ones
            name = freehand.bucket(bucket[0])
            tests[f"drawings (dev), {name}"] = labelled(lab, [d for d in dev if d.bucket == name])
        print(f"data: {len(x_train)} training images, built in {time.perf_counter() - start:.0f} s", file=sys.stderr)

        rows = []
        for name in args.towers.split(","):
            model = tower(lab, name)
            head = torch.nn.Linear(model.config.projection_dim, len(SHAPES))
            lr = args.lr if name == "shipped" else args.lr_fresh
            opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=lr, weight_decay=0.01)
            g = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            for steps in range(1, args.steps + 1):
                i = torch.randint(len(x_train), (args.batch,), generator=g)
                loss = F.cross_entropy(head(model(pixel_values=x_train[i]).image_embeds), y_train[i])
                opt.zero_grad()
                loss.backward()
                opt.step()
                if steps % 100 == 0:
                    print(f"{name}: step {steps}, loss {loss.item():.3f}, {time.perf_counter() - t0:.0f} s",
                          file=sys.stderr)
            seconds = (time.perf_counter() - t0) / args.steps
            rows.append([name, f"{lr:g}", f"{seconds:.2f}",
                         *(f"{100 * accuracy(model, head, *t):.0f}" for t in tests.values())])
            shape = ", ".join(f"{k} {v}" for k, v in zip(tests, rows[-1][3:]))
            print(f"{name}: {seconds:.2f} s / step; shape % {shape}", file=sys.stderr)

        print(f"{threads()}, {args.steps} steps of {args.batch} per tower; shape accuracy of the tower and its linear "
              "head after training (chance 17 %).\n")
        print(table(["tower", "lr", "s / step", *(f"{k} shape %" for k in tests)], rows))


if __name__ == "__main__":
    main()
