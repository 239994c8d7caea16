"""Where a teaching-lab training step spends its time, on this machine: one table per question.

    python bench/train_speed.py                      # every stage at the cpu size, 2 threads vs 1
    python bench/train_speed.py --unet 32,64,64x1 64,128,128x1 --vae 16,32,32 32,64,64 --steps 6
    python bench/train_speed.py --stages unet --unet 64,128,128x1h8 64,128,128x1h2    # attention heads (h)
    python bench/train_speed.py --variants           # + channels_last, bf16 autocast, torch.compile
    python bench/train_speed.py --stages vision --threads 1   # the image tower against the frozen text tower

Each step is split into data (drawing captions, tokenising, indexing images; the vision stage's varied drawings,
half its batch, drawn anew), the frozen text encoder (U-Net and vision stages), forward (with the loss), backward
and the optimizer, timed one after the other (CPU work is synchronous), median over `--steps` steps after one
warm-up step. Compare rows as ratios within one run: timings here swing from run to run. Rows as they come go to
stderr; the table to docs/results/train_speed.md (replaced on every run; `common.record`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import record, table  # noqa: E402

from sdipc_lab.toyworld import data, models  # noqa: E402
from sdipc_lab.toyworld.world import all_captions  # noqa: E402
from sdipc_lab.training import diffusion_loss  # noqa: E402


class _Accel:  # what train.batch_index / contrastive_batch read of an Accelerator
    process_index = 0
    device = torch.device("cpu")


def _timed_steps(parts, params, steps: int, autocast: bool):
    """parts: {name: fn(previous outputs dict) -> value}, run in order; 'loss' must be the last forward part."""
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = {name: [] for name in [*parts, "backward", "optimizer"]}
    for k in range(steps + 1):
        out = {"step": k}
        for name, fn in parts.items():
            start = time.perf_counter()
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast and name == "forward" else contextlib.nullcontext()
            with ctx:
                out[name] = fn(out)
            times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out["forward"].float().backward()
        times["backward"].append(time.perf_counter() - start)
        start = time.perf_counter()
        optimizer.step()
        times["optimizer"].append(time.perf_counter() - start)
    return {name: statistics.median(v[1:]) for name, v in times.items()}  # the first step warms up


def clip_parts(s: models.ModelSizes, world, batch: int):
    tokenizer = models.new_tokenizer()
    trainer = models.ClipTrainer(*models.new_clip(s, tokenizer))
    parts = {"data": lambda o: data.contrastive_batch(world, tokenizer, batch, o["step"], 0, _Accel, "clip"),
             "forward": lambda o: trainer(*o["data"])}
    return parts, list(trainer.parameters())


def vision_parts(s: models.ModelSizes, world, batch: int, text, tokenizer, options: dict):
    """The vision stage's step as `train vision --variety 0.5 --hard-negatives 5 --align 5` takes it, with the
    `ClipTrainer` options in `options` (`grey_shape`, `grey_share`, `end_token_only`: `--grey-shape`,
    `--grey-share`, `--end-token-only`)."""
    vision = models.new_clip(s, tokenizer)[1]
    with torch.no_grad():
        ids, eos = data.tokenize(tokenizer, all_captions(), "cpu")
        captions = models.ClipTrainer(text, vision).text_features(ids, eos, eos)[0]  # (1800, P)
    trainer = models.ClipTrainer(text, vision, captions, hard_negatives=5, align=5, **options)

    def batch_(o):
        *inputs, things, backgrounds = data.contrastive_batch(world, tokenizer, batch, o["step"], 0, _Accel, "vision",
                                                              offset=5, with_things=True)
        return (*inputs, models.caption_variants(things, backgrounds))

    def encode(o):
        ids, eos, pad, _, _ = o["data"]
        with torch.no_grad():
            return trainer.text_features(ids, eos, pad)

    parts = {"data": batch_, "text encoder": encode,
             "forward": lambda o: trainer.loss(o["text encoder"], o["data"][3], o["data"][4])}
    return parts, [p for p in trainer.parameters() if p.requires_grad]  # the image tower and the logit scale


def vae_parts(s: models.ModelSizes, world, batch: int):
    trainer = models.VaeTrainer(models.new_vae(s))
    parts = {"data": lambda o: world.pixels(data.batch_index(len(world.images), batch, o["step"], 0, _Accel), "cpu"),
             "forward": lambda o: trainer(o["data"])}
    return parts, list(trainer.parameters())


def unet_parts(s: models.ModelSizes, world, batch: int, text, tokenizer, channels_last: bool, cached: torch.Tensor | None):
    unet = models.new_unet(s, text.config.hidden_size)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    scheduler = models.toy_scheduler()
    latent = 64 // 2 ** (len(s.vae_channels) - 1)

    def data(o):
        index = data.batch_index(len(world.images), batch, o["step"], 0, _Accel)
        if cached is not None:
            return index
        rng = random.Random(o["step"])
        return data.tokenize(tokenizer, world.captions(index, rng), "cpu")[0]

    def encode(o):
        if cached is not None:
            return cached[o["data"]].float()  # (B, 77, D) looked up
        with torch.no_grad():
            return text.text_model(o["data"]).last_hidden_state  # (B, 77, D)

    def forward(o):
        z0 = torch.randn(batch, 4, latent, latent)
        if channels_last:
            z0 = z0.contiguous(memory_format=torch.channels_last)
        return diffusion_loss(unet, scheduler, z0, o["text encoder"])

    return {"data": data, "text encoder": encode, "forward": forward}, unet


def parse_unet(text: str) -> dict:  # "64,128,128x2" -> channels and layers per block; "64,128,128x1h2": 2 heads
    channels, _, rest = text.partition("x")
    layers, _, heads = rest.partition("h")
    sizes = dict(unet_channels=tuple(int(c) for c in channels.split(",")), unet_layers=int(layers or 1))
    return {**sizes, "unet_heads": int(heads)} if heads else sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="cpu", choices=list(models.MODEL_SIZES))
    parser.add_argument("--unet", nargs="*", default=None, help="U-Net sizes, channels x layers per block [h heads]")
    parser.add_argument("--vae", nargs="*", default=None, help="VAE channel lists")
    parser.add_argument("--stages", default="clip,vae,unet")
    parser.add_argument("--threads", default="2,1")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--variants", action="store_true", help="also channels_last, bf16 autocast, torch.compile")
    args = parser.parse_args()
    with record("train_speed", "Where a teaching-lab training step spends its time"):
        measure(args)


def measure(args) -> None:
    base = models.MODEL_SIZES[args.size]
    world = data.render(2048, "train")
    varied = data.with_variety(world, 0.5)
    tokenizer = models.new_tokenizer()
    text, _ = models.new_clip(base, tokenizer)
    text.eval().requires_grad_(False)
    stages = args.stages.split(",")
    batches = {name: models.BUDGETS[args.size][name][1] for name in ("clip", "vision", "vae", "unet")}
    configs = []  # (stage, label, sizes, options)
    if "clip" in stages:
        configs.append(("clip", f"width {base.width}, patch {base.patch}", base, {}))
    if "vision" in stages:
        name = f"width {base.width}, patch {base.patch}"
        for label, options in (("", {}), (", --end-token-only", {"end_token_only": True}),
                               (", --grey-shape 3", {"grey_shape": 3.0}),
                               (", --grey-shape 3 --grey-share 0.25", {"grey_shape": 3.0, "grey_share": 0.25}),
                               (", --grey-shape 3 --grey-share 0.25 --end-token-only",
                                {"grey_shape": 3.0, "grey_share": 0.25, "end_token_only": True})):
            configs.append(("vision", name + label, base, {"vision": options}))
    for vae in (args.vae or [",".join(map(str, base.vae_channels))]) if "vae" in stages else []:
        channels = tuple(int(c) for c in vae.split(","))
        s = dataclasses.replace(base, vae_channels=channels)
        configs.append(("vae", f"channels {channels}", s, {}))
    for spec in (args.unet or [",".join(map(str, base.unet_channels)) + f"x{base.unet_layers}"]) if "unet" in stages else []:
        s = dataclasses.replace(base, **parse_unet(spec))
        configs.append(("unet", f"{spec}", s, {}))
        configs.append(("unet", f"{spec}, cached text states", s, {"cached": True}))
        if args.variants:
            configs.append(("unet", f"{spec}, channels_last", s, {"channels_last": True}))
            configs.append(("unet", f"{spec}, bf16 autocast", s, {"autocast": True}))
    ids, _ = data.tokenize(tokenizer, world.captions(torch.arange(len(world.images)), random.Random(0)), "cpu")
    with torch.no_grad():
        cache = torch.cat([text.text_model(chunk).last_hidden_state.half() for chunk in ids.split(256)])
    rows = []
    before = torch.get_num_threads()
    try:
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            for stage, label, s, options in configs:
                torch.manual_seed(0)
                batch = batches[stage]
                if stage == "clip":
                    parts, params = clip_parts(s, world, batch)
                elif stage == "vision":
                    parts, params = vision_parts(s, varied, batch, text, tokenizer, options["vision"])
                elif stage == "vae":
                    parts, params = vae_parts(s, world, batch)
                else:
                    parts, unet = unet_parts(s, world, batch, text, tokenizer, options.get("channels_last", False),
                                             cache if options.get("cached") else None)
                    params = list(unet.parameters())
                n_params = sum(p.numel() for p in params)
                t = _timed_steps(parts, params, args.steps, options.get("autocast", False))
                total = sum(t.values())
                rows.append([stage, label, f"{n_params / 1e6:.2f} M", threads, batch,
                             *(f"{1000 * t.get(k, 0):.0f}" for k in ("data", "text encoder", "forward", "backward",
                                                                     "optimizer")),
                             f"{total:.3f}", f"{batch / total:.0f}"])
                print(rows[-1], file=sys.stderr, flush=True)
            if args.variants and "unet" in stages:
                spec = (args.unet or [",".join(map(str, base.unet_channels)) + f"x{base.unet_layers}"])[0]
                s = dataclasses.replace(base, **parse_unet(spec))
                parts, unet = unet_parts(s, world, batches["unet"], text, tokenizer, False, cache)
                params = list(unet.parameters())
                start = time.perf_counter()
                unet.forward = torch.compile(unet.forward)
                _timed_steps(parts, params, 1, False)  # compiles
                compile_s = time.perf_counter() - start
                t = _timed_steps(parts, params, args.steps, False)
                total = sum(t.values())
                rows.append(["unet", f"{spec}, cached, torch.compile (compile {compile_s:.0f} s)",
                             f"{sum(p.numel() for p in params) / 1e6:.2f} M", threads, batches["unet"],
                             *(f"{1000 * t.get(k, 0):.0f}" for k in ("data", "text encoder", "forward", "backward",
                                                                     "optimizer")),
                             f"{total:.3f}", f"{batches['unet'] / total:.0f}"])
                print(rows[-1], file=sys.stderr, flush=True)
    finally:
        torch.set_num_threads(before)
    print(f"\n## One training step, split ({args.size} size, median of {args.steps} steps after a warm-up; ms)\n")
    print(table(["stage", "model", "params", "threads", "batch", "data", "text encoder", "forward", "backward",
                 "optimizer", "s / step", "samples / s"], rows))


if __name__ == "__main__":
    main()
