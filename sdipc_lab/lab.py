"""`load_lab()`: one bundle of tokenizer, CLIP towers, U-Net, VAE, scheduler and pipeline.

Every source goes through the same `from_pretrained` calls; only *where* each component lives differs:

| source       | CLIP parts (tokenizer, towers, W_t, W_i, image processor) | U-Net, VAE, scheduler          |
|--------------|------------------------------------------------------------|--------------------------------|
| `"sd-v1-4"`  | `openai/clip-vit-large-patch14`                            | `CompVis/stable-diffusion-v1-4` |
| `"sd-v1-5"`  | `openai/clip-vit-large-patch14`                            | `stable-diffusion-v1-5/...`    |
| a folder     | its sub-folders, as written by `save_lab`                  | its sub-folders                |
| `"toy"`      | the teaching-scale lab shipped in the package (a folder)   |                                |
| `"tiny"`     | random, built on the fly, saved to a temporary folder      |                                |

SD v1.x's text encoder *is* the text tower of CLIP ViT-L/14 (same weights, same tokenizer), so
loading `CLIPTextModelWithProjection` once gives both the pipeline's text encoder
(`.text_model`) and the text projection `W_t` the converter inverts.

The hub's repositories and `download` are in `hub.py`; loading and checking one component in `components.py`;
the CPU threads a lab's calls run on in `cpus.py`.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError

from .build import random_components
from .components import CONFIG_FILES, _component_class, _kind_of, _pipeline, check_consistent, check_weights, quiet
from .cpus import usable_cpus
from .hub import CLIP_L14, HUB_SOURCES, WeightsNotFoundError, _hub_cache, hub_reachable

LAB_FILE = "sdipc_lab.json"
COMPONENTS = ("tokenizer", "text_encoder", "image_encoder", "feature_extractor", "unet", "vae", "scheduler")
CLIP_PARTS = ("tokenizer", "text_encoder", "image_encoder", "feature_extractor")
# A lab's constants, saved in its sdipc_lab.json and held as the Lab's fields of the same names (defaults there).
CONSTANTS = ("cutoff", "norm", "norm_t", "steps", "guidance_scale", "guidance_rescale", "finetune_lr")
REQUIRED_CONSTANTS = ("cutoff", "norm", "norm_t")

# Learning rates of sdipc_lab.finetune for SD v1.4: the paper's SD-IPC-FT / -CT (Sec. 4.1) and diffusers'
# Custom Diffusion example. A lab of another scale carries its own, measured (bench/finetune.py --lr-sweep).
PAPER_FINETUNE_LR = {"ft": 1e-5, "ct": 5e-6, "custom-diffusion": 1e-5}
# The paper's constants for CLIP ViT-L/14 (footnote 6, Eq. 6) and the public code's T-space norm (convert.PUBLIC_CODE).
HUB_CONSTANTS = dict(cutoff=0.3, norm=27.0, norm_t=27.5, steps=50, guidance_scale=7.5, finetune_lr=PAPER_FINETUNE_LR)
TOY_FOLDER = Path(__file__).parent / "toyworld" / "lab"
KNOWN_SOURCES = ("toy", "tiny", *HUB_SOURCES, "auto")


@dataclasses.dataclass(eq=False)
class Lab:
    """Everything SD-IPC needs, on one device.

    Symbols follow the paper: `W_t` maps the end-token state (T-space, width D) to C-space (width P);
    `W_i` maps the image tower's class token to C-space.
    """

    tokenizer: object  # CLIPTokenizer, model_max_length 77, pads with the end token
    text_encoder: object  # CLIPTextModelWithProjection: .text_model (T-space) + .text_projection (W_t)
    image_encoder: object  # CLIPVisionModelWithProjection: vision tower + .visual_projection (W_i)
    feature_extractor: object  # CLIPImageProcessorPil: PIL image -> (3, H, W) pixel values
    unet: object  # UNet2DConditionModel, cross-attends to (B, 77, D)
    vae: object  # AutoencoderKL
    scheduler: object
    pipe: object  # a stock StableDiffusionPipeline built from the parts above
    cutoff: float  # singular values of W_t at or below this are treated as zero
    norm: float  # ||f_txt^c||, the C-space text norm of Eq. 6
    norm_t: float  # ||f_txt^{eos}||, the T-space end-token norm (public code's convention)
    steps: int = 50  # default denoising steps
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0  # the pipeline's guidance_rescale (Lin et al. 2024, Eq. 16); 0 turns it off
    finetune_lr: dict = dataclasses.field(default_factory=lambda: dict(PAPER_FINETUNE_LR))  # method -> lr
    source: str = ""
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    threads: int = 1  # CPU threads of the lab's heavy calls (`limit_threads`); `load_lab` picks `usable_cpus()`
    size: int | None = None  # height and width of generated images by default (None: `image_size`, the U-Net's own)
    cache: dict = dataclasses.field(default_factory=dict, repr=False)  # e.g. W_t^+ per cutoff

    @property
    def W_t(self) -> torch.Tensor:  # (P, D)
        return self.text_encoder.text_projection.weight

    @property
    def W_i(self) -> torch.Tensor:  # (P, D_vision)
        return self.image_encoder.visual_projection.weight

    @property
    def max_length(self) -> int:  # 77
        return self.tokenizer.model_max_length

    @property
    def image_size(self) -> int:  # pixels of a generated image
        return self.unet.config.sample_size * self.pipe.vae_scale_factor

    @property
    def constants(self) -> dict:
        """The lab's constants (`CONSTANTS`), as saved in its sdipc_lab.json; a copy."""
        return {k: dict(v) if isinstance(v, dict) else v for k, v in ((k, getattr(self, k)) for k in CONSTANTS)}

    def replace(self, **parts) -> Lab:
        """A new lab with some components swapped, e.g. `lab.replace(text_encoder=other)`: its own stock pipeline
        built from them and an empty cache (W_t^+ and the rest are recomputed for the new parts). The parts not
        named are shared with this lab, not copied; this lab is left as it was."""
        unknown = set(parts) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"lab.replace takes components ({', '.join(COMPONENTS)}), not {sorted(unknown)}")
        for part, component in parts.items():
            model = part in ("text_encoder", "image_encoder", "unet", "vae")
            if component is None or (model and not isinstance(component, torch.nn.Module)):
                raise ValueError(f"lab.replace({part}=...) needs a {part} component (e.g. lab.{part}, or one loaded "
                                 f"with from_pretrained), got {type(component).__name__}; leave {part} out to keep "
                                 "the lab's own")
            kind = _kind_of(component)
            if model and kind != part:
                raise ValueError(f"lab.replace({part}=...) needs a {part} component, got a "
                                 f"{type(component).__name__}" + (f" (a {kind}: pass it as {kind}=...)" if kind else "")
                                 + f"; leave {part} out to keep the lab's own")
        components = {part: getattr(self, part) for part in COMPONENTS} | parts
        check_consistent(components)
        for part in set(parts) & {"text_encoder", "image_encoder", "unet", "vae"}:
            parts[part].to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        return dataclasses.replace(self, **parts, pipe=_pipeline(components), cache={})

    def use_scheduler(self, name: str) -> None:
        """Sample with another scheduler from the same noise schedule: "ddim", or "dpm++" (DPM-Solver++,
        second order, multistep). `save_lab` then saves it as the lab's own."""
        import diffusers

        kinds = {"ddim": (diffusers.DDIMScheduler, {}),
                 "dpm++": (diffusers.DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2))}
        if name not in kinds:
            raise ValueError(f"unknown scheduler {name!r}: use one of {', '.join(map(repr, kinds))}")
        cls, options = kinds[name]
        self.scheduler = self.pipe.scheduler = cls.from_config(self.scheduler.config, **options)

    def __repr__(self) -> str:
        P, D = self.W_t.shape
        return (f"Lab(source={self.source!r}, D={D}, P={P}, image={self.image_size}px, "
                f"device={self.device}, dtype={self.dtype}, {self.constants})")


def pick_device() -> torch.device:
    """CUDA, then Apple MPS, then CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_lab(source: str | os.PathLike = "toy", *, device=None, dtype=None, download: bool = False,
             threads: int | None = None, steps: int | None = None, size: int | None = None) -> Lab:
    """Load a lab: `"toy"` (default, shipped), `"tiny"` (random), `"sd-v1-4"`, `"sd-v1-5"`, a folder, or `"auto"`:
    SD v1.4 where a CUDA GPU is present (downloaded into the Hugging Face cache if missing), else the teaching lab;
    the choice is printed.

    Hub sources are read from the local Hugging Face cache only, unless `download=True`.
    The device defaults to CUDA, then MPS, then CPU; the dtype to fp16 on a GPU, fp32 on CPU.
    `threads`: CPU threads for the lab's generation and training calls (default: torch's own count, capped by
    what this process may really use, `usable_cpus()`); the process's setting is put back after each call.
    `steps`, `size`: this session's default denoising steps and image size in pixels (None: the lab's; on SD v1.4,
    50 steps at 512 px; 256 px is ~4x cheaper). Every call can still pass its own.
    """
    lab = _load_source(source, *_device_and_dtype(device, dtype), download=download)
    for name, value in (("threads", threads), ("steps", steps), ("size", size)):
        if value is not None:
            setattr(lab, name, whole(name, value))
    if lab.size is not None and lab.size % 8:
        raise ValueError(f"size must be a multiple of 8 pixels (the VAE's downsampling), got {lab.size}")
    return lab


def _load_source(source, device, dtype, *, download: bool) -> Lab:
    name = os.fspath(source)
    if name == "auto":
        name, why = ("sd-v1-4", "a CUDA GPU is present") if device.type == "cuda" else ("toy", f"no CUDA GPU ({device})")
        print(f"SOURCE 'auto' -> {name!r}: {why}")
        download = download or name in HUB_SOURCES
    if name == "tiny":
        return _load_tiny(device, dtype)
    if name == "toy":
        if not (TOY_FOLDER / LAB_FILE).exists():
            _warn_once("The teaching-scale 'toy' lab is not in this installation yet; using the random 'tiny' "
                       "lab instead. Its images are noise until the toy world is trained.")
            return _load_tiny(device, dtype, name="toy (tiny fallback)")
        return _load(_folder_places(TOY_FOLDER), _read_constants(TOY_FOLDER), "toy", device, dtype, local_only=True)
    if name in HUB_SOURCES:
        places = {part: (CLIP_L14, None) for part in CLIP_PARTS}
        places.update({part: (HUB_SOURCES[name], part) for part in ("unet", "vae", "scheduler")})
        if download and not hub_reachable():  # offline: the cache may hold them, and no minutes of retries
            return _load(places, HUB_CONSTANTS, name, device, dtype, local_only=True, unreachable=True)
        return _load(places, HUB_CONSTANTS, name, device, dtype, local_only=not download)
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / LAB_FILE).exists():
            raise ValueError(f"{folder} is a folder but not a lab: it has no {LAB_FILE}. "
                             "Write labs with sdipc_lab.save_lab(lab, folder).")
        return _load(_folder_places(folder), _read_constants(folder), str(folder), device, dtype, local_only=True)
    raise ValueError(f"unknown lab source {name!r}: use one of {', '.join(map(repr, KNOWN_SOURCES))}, "
                     "or the path of a folder written by sdipc_lab.save_lab")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def whole(name: str, value) -> int:
    """`value` as an int if it is a whole number >= 1 (NumPy integers too), else a ValueError naming `name` (None
    keeps the lab's own)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        hint = f"this process may use {usable_cpus()} CPUs" if name == "threads" else "or None for the lab's own"
        raise ValueError(f"{name} must be a whole number >= 1 ({hint}), got {value!r}")
    return int(value)


def _device_and_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    """The device asked for (default: CUDA, then MPS, then CPU) if this machine has it, and the dtype (a torch dtype
    or its name; default fp16 on a GPU, fp32 on CPU); anything else is refused with what to pass instead."""
    if device is None:
        device = pick_device()
    else:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {device!r} is not a device: use 'cpu', 'cuda', 'cuda:1' or 'mps' "
                             f"(or None: {pick_device()} here)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but this machine has no CUDA GPU (or torch is the CPU "
                             f"build): use device='cpu', or None for the best device here ({pick_device()})")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError("device 'mps' was asked for, but Apple's MPS is not available here: use device='cpu'")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} (or a torch dtype)")
        dtype = DTYPES[dtype]
    if dtype is not None and dtype not in set(DTYPES.values()):
        raise ValueError(f"dtype {dtype!r}: use torch.float32, torch.float16 or torch.bfloat16")
    return device, dtype or (torch.float16 if device.type in ("cuda", "mps") else torch.float32)


def save_lab(lab: Lab, folder: str | os.PathLike, *, extra: dict | None = None, into_package: bool = False) -> Path:
    """Write every component with `save_pretrained` (safetensors) plus the lab's constants (and `extra`, a dict of
    file name -> text), atomically: into a new folder beside `folder`, then swapped in whole, so an interruption
    leaves the old lab or the new one, never a mix. An existing folder that is not a lab (nor empty) is refused;
    so is the package's own 'toy' lab unless `into_package=True`."""
    import shutil

    folder = check_save_target(folder, extra=extra or {}, into_package=into_package)
    tmp = folder.with_name(f"{folder.name}.saving-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by this very process, interrupted
    tmp.mkdir(parents=True)
    try:
        with quiet():
            for part in COMPONENTS:
                component = getattr(lab, part)
                if isinstance(component, torch.nn.Module):
                    component.save_pretrained(tmp / part, safe_serialization=True)
                else:
                    component.save_pretrained(tmp / part)
                _forget_origin(tmp / part / "config.json")
        if folder.exists():  # inside the components: only the files this save writes again may go
            _refuse_strangers(folder, [p for part in COMPONENTS if (folder / part).is_dir()
                                       for p in (folder / part).rglob("*")
                                       if p.is_file() and not (tmp / p.relative_to(folder)).exists()])
    except ValueError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for name, text in (extra or {}).items():
        (tmp / name).write_text(text)
    (tmp / LAB_FILE).write_text(json.dumps(lab.constants, indent=2) + "\n")  # last: a lab only once complete
    old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


# Files a lab's writers put beside the components: `toyworld.train export` records the constants it measured.
LAB_EXTRAS = ("constants_measured.json",)


def check_save_target(folder: str | os.PathLike, *, extra=(), into_package: bool = False) -> Path:
    """The folder `save_lab` may write a lab into, resolved: new, empty, or a lab holding only what lab writers
    write (`extra`: names of the other files this save writes); never the package's own lab unless
    `into_package=True`. A ValueError says why not, before anything is written."""
    folder = Path(folder).expanduser().resolve()
    if folder == TOY_FOLDER.resolve() and not into_package:
        raise ValueError(f"{folder} is the teaching lab shipped in the package: save elsewhere, or pass "
                         "into_package=True to replace it.")
    if folder.exists() and not (folder.is_dir() and ((folder / LAB_FILE).exists() or not any(folder.iterdir()))):
        raise ValueError(f"{folder} exists and is not a lab folder (no {LAB_FILE}); it is left alone. "
                         "Name a new or empty folder.")
    ours = {*COMPONENTS, LAB_FILE, *LAB_EXTRAS, *extra}
    _refuse_strangers(folder, [p for p in folder.iterdir() if p.name not in ours] if folder.exists() else [])
    return folder


def _refuse_strangers(folder: Path, strangers: list) -> None:
    """Saving over a lab replaces the whole folder: refuse when it holds files no lab writer wrote (the user's)."""
    if strangers:
        names = ", ".join(str(p.relative_to(folder)) for p in strangers[:5]) + (" ..." if len(strangers) > 5 else "")
        raise ValueError(f"{folder} is a lab folder but also holds files save_lab did not write ({names}); saving "
                         "would replace the whole folder and lose them. Move them out of it, or save to another "
                         "folder. Nothing was written.")


def _forget_origin(config: Path) -> None:
    """Drop the `_name_or_path` diffusers records on load from a saved config: it is the folder the weights came
    from on the machine that saved them (e.g. a training run's), meaningless, even misleading, anywhere else."""
    if config.exists():
        saved = json.loads(config.read_text())
        if saved.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def _folder_places(folder: Path) -> dict:
    return {part: (str(folder / part), None) for part in COMPONENTS}


def _read_constants(folder: Path) -> dict:
    try:
        constants = json.loads((folder / LAB_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{folder / LAB_FILE} is not valid JSON ({error}); re-save the lab with "
                         "sdipc_lab.save_lab, or restore the file") from None
    if not isinstance(constants, dict):
        raise ValueError(f"{folder / LAB_FILE} must hold a JSON object of the lab's constants")
    missing = set(REQUIRED_CONSTANTS) - set(constants)
    if missing:
        raise ValueError(f"{folder / LAB_FILE} lacks {sorted(missing)}; re-save the lab with save_lab")
    unknown = set(constants) - set(CONSTANTS)
    if unknown:  # a typo ("guidance" for "guidance_scale") would otherwise be dropped without a word
        raise ValueError(f"{folder / LAB_FILE} has keys a lab does not know: {sorted(unknown)}; a lab's constants "
                         f"are {', '.join(CONSTANTS)}")
    return constants


def _load(places: dict, constants: dict, source: str, device, dtype, *, local_only: bool,
          unreachable: bool = False) -> Lab:
    parts = {}
    with quiet():
        for part, (where, subfolder) in places.items():
            local = Path(where) if subfolder is None and Path(where).is_dir() else None  # a lab folder's component
            if local is not None and part in CONFIG_FILES and not (local / CONFIG_FILES[part]).exists():
                raise WeightsNotFoundError(
                    f"the lab's {part} in {local} has no {CONFIG_FILES[part]} (the description of its architecture), "
                    "so it cannot be loaded: restore the file, or re-save the lab with sdipc_lab.save_lab.")
            kwargs = dict(local_files_only=local_only)
            if subfolder:
                kwargs["subfolder"] = subfolder
            try:
                cls = _component_class(part, where, subfolder, local_only)
                if part in ("text_encoder", "image_encoder", "unet", "vae"):
                    kwargs["use_safetensors"] = True  # never unpickle
                parts[part] = cls.from_pretrained(where, **kwargs)
                if part == "tokenizer" and len(parts[part]) <= 2:
                    # transformers 5 builds an empty tokenizer when its files are missing, silently.
                    raise OSError("no tokenizer files (vocabulary and merges) there")
            except (OSError, ValueError, SafetensorError) as error:  # hub/cache misses are OSErrors; cut files
                raise _missing(part, where, subfolder, source, local_only, error, unreachable) from None
            if local is not None and isinstance(parts[part], torch.nn.Module):
                check_weights(part, parts[part], local)
        return assemble(parts, constants, source=source, device=device, dtype=dtype)


def _missing(part, where, subfolder, source, local_only, error, unreachable: bool = False) -> Exception:
    place = f"{where}" + (f" (sub-folder {subfolder!r})" if subfolder else "")
    if Path(where).is_absolute() or os.path.exists(where) or source not in HUB_SOURCES:
        return WeightsNotFoundError(
            f"cannot load the lab's {part} from {place}: {type(error).__name__}: {str(error)[:300]}\n"
            "A lab folder needs tokenizer/, text_encoder/, image_encoder/, feature_extractor/, unet/, vae/, "
            "scheduler/ and sdipc_lab.json, as written by sdipc_lab.save_lab(lab, folder).")
    cache = _hub_cache()
    how = ("download=True was asked, but the hub cannot be reached from this machine (no network, or "
           "HF_HUB_OFFLINE=1), so only the cache was read." if unreachable else
           "The hub was not asked (load_lab reads the local cache only unless download=True)."
           if local_only else "Downloading failed (no network, or the repository needs you to log in).")
    return WeightsNotFoundError(
        f"The weights for {source!r} are not on this machine: {part} from {place} is missing from the "
        f"Hugging Face cache at {cache}. {how}\n"
        f"To get them, on a machine with internet run once:\n"
        f"    python -m sdipc_lab download {source}\n"
        f"(or load_lab({source!r}, download=True)), or set HF_HUB_CACHE (or HF_HOME) to a cache that holds "
        f"{CLIP_L14} and {HUB_SOURCES[source]}. Offline, use load_lab('toy').")


def assemble(parts: dict, constants: dict, *, source: str = "", device=None, dtype=None) -> Lab:
    """Put loaded (or freshly built) components together into a `Lab` with a stock pipeline."""
    device = torch.device(device) if device is not None else pick_device()
    dtype = dtype or torch.float32
    check_consistent(parts)
    for part in ("text_encoder", "image_encoder", "unet", "vae"):
        parts[part].to(device=device, dtype=dtype).eval().requires_grad_(False)
    pipe = _pipeline(parts)
    unknown = set(constants) - set(CONSTANTS)
    if unknown:
        raise ValueError(f"unknown lab constants {sorted(unknown)}: a lab's constants are {', '.join(CONSTANTS)}")
    own = {k: dict(v) if isinstance(v, dict) else v for k, v in constants.items()}  # never shared
    threads = min(torch.get_num_threads(), usable_cpus())
    return Lab(**parts, pipe=pipe, source=source, device=device, dtype=dtype, threads=threads, **own)


def _load_tiny(device, dtype, name: str = "tiny") -> Lab:
    constants = dict(cutoff=0.05, norm=10.0, norm_t=5.0, steps=4, guidance_scale=3.0,
                     finetune_lr={"ft": 1e-4, "ct": 1e-3, "custom-diffusion": 1e-3})
    with quiet():
        lab = assemble(random_components(), constants, source=name, device="cpu")
    # Round-trip through a folder so that "tiny" exercises the very loader the other sources use.
    with tempfile.TemporaryDirectory(prefix="sdipc_tiny_") as folder:
        save_lab(lab, folder)
        return _load(_folder_places(Path(folder)), constants, name, device, dtype, local_only=True)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
