"""The Hugging Face hub: which repositories the hub sources are, whether the hub answers, `download`, and the
error that says weights are not on this machine.

`load_lab("sd-v1-4")` reads these repositories from the local Hugging Face cache; `download` (or
`python -m sdipc_lab download sd-v1-4`) fetches them into it once, on a machine with internet access.
"""

from __future__ import annotations

CLIP_L14 = "openai/clip-vit-large-patch14"
HUB_SOURCES = {
    "sd-v1-4": "CompVis/stable-diffusion-v1-4",
    "sd-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
}


class WeightsNotFoundError(FileNotFoundError):
    """Model weights are not on this machine (and the hub was not, or could not be, asked)."""


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers from here (and HF_HUB_OFFLINE is not set): one request, `timeout`
    seconds at most, instead of the hub client's minutes of retries when there is no network."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout).close()
        return True
    except urllib.error.HTTPError:  # it answered, if not with 200
        return True
    except (OSError, ValueError):
        return False


def download(source: str) -> None:
    """Fetch a hub source's weights (safetensors and configs only) into the Hugging Face cache."""
    from huggingface_hub import constants, snapshot_download

    if source not in HUB_SOURCES:
        raise ValueError(f"only hub sources can be downloaded: {', '.join(HUB_SOURCES)}")
    if not hub_reachable():
        raise WeightsNotFoundError(
            f"cannot download {CLIP_L14} and {HUB_SOURCES[source]}: {constants.ENDPOINT} cannot be reached from this "
            "machine (no network, a proxy that needs HTTPS_PROXY, or HF_HUB_OFFLINE=1). Run this where the hub can "
            f"be reached, then copy the Hugging Face cache ({_hub_cache()}) here or point HF_HUB_CACHE at it.")
    weights = [f"{part}/diffusion_pytorch_model.safetensors" for part in ("unet", "vae")]
    configs = ["unet/config.json", "vae/config.json", "scheduler/scheduler_config.json"]
    for repo, patterns in ((CLIP_L14, ["*.json", "*.txt", "model.safetensors"]), (HUB_SOURCES[source], weights + configs)):
        try:
            snapshot_download(repo, allow_patterns=patterns)
        except Exception as error:  # the hub client's errors vary by version; all mean the same here
            raise WeightsNotFoundError(
                f"could not download {repo} into the Hugging Face cache at {_hub_cache()}: {type(error).__name__}: "
                f"{str(error)[:300]}\nThis needs internet access to huggingface.co (and, for some repositories, "
                "`huggingface-cli login` after accepting their licence).") from None


def _hub_cache() -> str:
    """Where the hub client keeps repositories: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)
