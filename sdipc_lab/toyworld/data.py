"""What the stages train on: the world's images drawn once into memory (`World`), and each step's batch drawn
from them deterministically, so that a resumed run sees the same data; the frozen text tower's states cached.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import random
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..convert import token_ids
from ..training import check_batch, processes, shard
from . import variety
from .world import SHAPES, TWO_OBJECTS, caption, sample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601: what `grey` keeps of each channel


@dataclasses.dataclass
class World:
    images: torch.Tensor  # (N, 64, 64, 3) uint8
    things: list
    backgrounds: list

    two_objects: float = TWO_OBJECTS  # the share of samples drawn with a second object
    varied: int = 0  # how many more samples a batch picks from: varied drawings, each drawn anew (`with_variety`)

    def __len__(self) -> int:  # the samples a batch picks from: the images, then the varied drawings
        return len(self.images) + self.varied

    def pixels(self, index: torch.Tensor, device) -> torch.Tensor:  # (B, 3, 64, 64) in [-1, 1]
        return to_pixels(self.images[index], device)

    def captions(self, index: torch.Tensor, rng: random.Random) -> list[str]:
        return [caption(self.things[i], self.backgrounds[i], rng) for i in index.tolist()]


def to_pixels(images: torch.Tensor, device) -> torch.Tensor:  # (B, 64, 64, 3) uint8 -> (B, 3, 64, 64) in [-1, 1]
    return images.to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def _draw(args):
    i, split, two_objects = args
    s = sample(i, split, two_objects=two_objects)
    return np.asarray(s.image), s.things, s.background


def render(n: int, split: str = "train", workers: int | None = None, two_objects: float = TWO_OBJECTS) -> World:
    """Draw samples 0..n-1 of `split` (in parallel), a second object in a `two_objects` share of them;
    deterministic whatever the worker count."""
    jobs = [(i, split, two_objects) for i in range(n)]
    if n >= 2000 and (workers or multiprocessing.cpu_count()) > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            out = pool.map(_draw, jobs, chunksize=256)
    else:
        out = [_draw(job) for job in jobs]
    images = torch.from_numpy(np.stack([o[0] for o in out]))
    return World(images, [o[1] for o in out], [o[2] for o in out], two_objects)


def with_variety(world: World, share: float) -> World:
    """`world` with varied drawings of its objects (`variety.sample`) as a `share` of the samples a batch picks
    from: what the `vision` stage trains the image tower on with `--variety` (the U-Net stages never see them).
    Each is drawn anew whenever a batch picks one (`contrastive_batch`), never from a fixed set: a tower trained on
    20,000 varied drawings drawn once read the shapes of those it had seen at 100 % and of new ones at 75 %."""
    if not 0 <= share < 1:
        raise ValueError(f"the varied share is between 0 and 1 (1 excluded), got {share}")
    n = round(len(world.images) * share / (1 - share))
    return world if n == 0 else dataclasses.replace(world, varied=world.varied + n)


def varied_index(stream: int, step: int, position: int, batch: int) -> int:
    """The `variety.sample` index of the varied drawing at `position` of `step`'s batch: a new one every time."""
    return (stream * 1_000_003 + step) * batch + position


def clip_normalize(pixels: torch.Tensor) -> torch.Tensor:  # [-1, 1] -> CLIP's normalisation
    mean = torch.tensor(CLIP_MEAN, device=pixels.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=pixels.device)[:, None, None]
    return ((pixels + 1) / 2 - mean) / std


def batch_index(n: int, batch: int, step: int, seed: int, accelerator) -> torch.Tensor:
    """The step's global batch of image indices (batch,), the same in every process: each process trains on its
    share of it (`shard(index, processes(accelerator))`). A batch the processes cannot share evenly is refused."""
    check_batch(batch, accelerator)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 101)
    return torch.randint(0, n, (batch,), generator=g)


def tokenize(tokenizer, texts: list[str], device):  # ids (B, 77), end-token positions (B,) on `device`
    ids, eos = token_ids(tokenizer, texts)
    return ids.to(device), eos.to(device)


def contrastive_batch(world: World, tokenizer, batch: int, step: int, seed: int, accelerator, name: str,
                      offset: int = 0, with_things: bool = False):
    """One CLIP batch: token ids (B, 77), end-token positions (B,), a random padding position after each
    end token (B,), and CLIP-normalised pixels (B, 3, 64, 64); with `with_things`, the images' things and
    backgrounds (two lists of B) too. `offset` picks another stream of images. With several processes, B is this
    process's share of the global `batch`, drawn (captions and padding positions too) as one process draws it;
    each process draws only its own share of the batch's varied drawings (`with_variety`)."""
    index = batch_index(len(world), batch, step, seed + offset, accelerator)
    rng = random.Random(f"{name}:{seed}:{step}")
    kept = index < len(world.images)
    texts = iter(world.captions(index[kept], rng))  # the world's captions, in the batch's order
    texts = [next(texts) if k else None for k in kept.tolist()]
    u = torch.rand(batch, device=accelerator.device)  # where each caption's padding position falls
    part = processes(accelerator)
    images, things, backgrounds, varied = batch_samples(world, index, step, seed + offset, part)
    texts = [varied.get(position, text) for position, text in enumerate(texts)]
    ids, eos = tokenize(tokenizer, shard(texts, part), accelerator.device)
    pad = eos + (shard(u, part) * (77 - eos)).long().clamp(max=76 - eos)
    batch_ = (ids, eos, pad, clip_normalize(to_pixels(images, accelerator.device)))
    return (*batch_, things, backgrounds) if with_things else batch_


def batch_samples(world: World, index: torch.Tensor, step: int, stream: int, part):
    """This process's share of the samples a global batch `index` (B,) picks: images (b, 64, 64, 3) uint8, their
    things and backgrounds (lists of b), and the captions of the varied drawings among them (drawn anew,
    `with_variety`), by their position in the global batch."""
    images, things, backgrounds, varied = [], [], [], {}
    for position in shard(range(len(index)), part):
        i = int(index[position])
        if i < len(world.images):
            images.append(world.images[i])
            things.append(world.things[i])
            backgrounds.append(world.backgrounds[i])
        else:
            s = variety.sample(varied_index(stream, step, position, len(index)), "train")
            varied[position] = s.caption
            images.append(torch.from_numpy(np.array(s.image)))  # (a copy: PIL's buffer is read-only)
            things.append(s.things)
            backgrounds.append(s.background)
    return torch.stack(images), things, backgrounds, varied


def grey(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels with their colour taken out: each channel the luminance (ITU-R 601), same range."""
    luma = torch.tensor(LUMA, device=pixels.device)
    return (pixels * luma[:, None, None]).sum(1, keepdim=True).expand_as(pixels)


def shape_batch(world: World, batch: int, step: int, seed: int, accelerator, offset: int = 7):
    """One batch of the `shape` stage: grey CLIP-normalised pixels (B, 3, 64, 64) and which of `SHAPES` each
    picture holds (B, S), 1 or 0 (a two-object picture can hold two); B is this process's share of `batch`."""
    index = batch_index(len(world), batch, step, seed + offset, accelerator)
    images, things, _, _ = batch_samples(world, index, step, seed + offset, processes(accelerator))
    held = torch.zeros(len(things), len(SHAPES))
    for row, objects in enumerate(things):
        for thing in objects:
            held[row, SHAPES.index(thing.shape)] = 1
    pixels = to_pixels(images, accelerator.device)
    return clip_normalize(grey(pixels)), held.to(accelerator.device)


def caption_states(world: World, tokenizer, text, device, *, wordings: int, seed: int, batch: int = 64,
                   accelerator=None):
    """The frozen text tower's states for `wordings` captions of every image, computed once: (N, K, 77, D) fp16,
    plus the empty caption's states (77, D) for caption dropout. While the U-Net trains the text tower is
    frozen, so this replaces one text-encoder forward per step with a lookup. With several processes
    (`accelerator`) each encodes every N-th chunk of `batch` captions and they exchange them: the chunks one
    process would encode, so the same states."""
    rng = random.Random(f"captions:{seed}")
    n = len(world.images)
    texts = [c for k in range(wordings) for c in world.captions(torch.arange(n), rng)]  # wording-major
    index, count = processes(accelerator)
    starts = list(range(0, len(texts), batch))
    states = []
    with torch.no_grad():
        for i in tqdm(starts[index::count], desc="caption states (once)", leave=False, disable=index > 0):
            ids, _ = tokenize(tokenizer, texts[i:i + batch], device)
            states.append(text.text_model(ids).last_hidden_state.half())
        empty = text.text_model(tokenize(tokenizer, [""], device)[0]).last_hidden_state[0]
    if count > 1:
        states = _exchanged(states, starts, len(texts), batch, count, (77, empty.shape[-1]), device)
    return torch.cat(states).view(wordings, n, 77, -1).transpose(0, 1), empty


def _exchanged(mine: list, starts: list, total: int, batch: int, count: int, shape: tuple, device) -> list:
    """Every process's chunks (process p holds chunks p, p + count, ...), gathered into the list of all chunks in
    order: padded to equal sizes for the exchange, trimmed after it."""
    import torch.distributed as dist

    rows = -(-len(starts) // count)
    local = torch.zeros((rows, batch, *shape), dtype=torch.float16, device=device)
    for k, chunk in enumerate(mine):
        local[k, :len(chunk)] = chunk
    parts = [torch.empty_like(local) for _ in range(count)]
    dist.all_gather(parts, local)
    chunks = [parts[j % count][j // count] for j in range(len(starts))]
    chunks[-1] = chunks[-1][:total - starts[-1]]
    return chunks


def cached_caption_states(out: Path, world: World, tokenizer, text, device, *, wordings: int, seed: int,
                          accelerator=None):
    """`caption_states`, kept in `out/caption_states.safetensors` so that a resumed U-Net stage reads them back
    instead of recomputing them; recomputed whenever the text tower, the images or the wordings differ. With
    several processes they share the computing and the main process writes the file."""
    import hashlib

    from safetensors.torch import load_file, save_file

    key = hashlib.sha256((out / "text_encoder" / "model.safetensors").read_bytes()
                         + world.images.numpy().tobytes()[:: 997] + f"{wordings}:{seed}".encode()).hexdigest()
    path = out / "caption_states.safetensors"
    if path.exists():
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            same = f.metadata().get("key") == key
        if same:
            saved = load_file(str(path))
            return saved["states"], saved["empty"].to(device)
    states, empty = caption_states(world, tokenizer, text, device, wordings=wordings, seed=seed,
                                   accelerator=accelerator)
    if accelerator is None or accelerator.is_main_process:
        tmp = path.with_suffix(".tmp")
        save_file({"states": states.contiguous().cpu(), "empty": empty.contiguous().cpu()}, str(tmp),
                  metadata={"key": key})
        os.replace(tmp, path)
    return states, empty
