"""Set up sdipc_lab in a virtual environment, `.venv/`, with the Python that runs this file (stdlib only).

    python3 bootstrap.py            # then: .venv/bin/python -m sdipc_lab demo

It checks the Python version first (the pinned torch 2.13.0 has wheels for 3.11 and 3.12), and on Linux
without an NVIDIA driver installs PyTorch's CPU build of torch before the package, from PyTorch's CPU index:
a few hundred MB instead of the multi-GB CUDA build PyPI serves on Linux. macOS and Windows wheels from PyPI
are CPU (or MPS) builds already. `--gpu` / `--cpu` override the guess. Nothing outside `.venv/` is changed.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
from pathlib import Path

SUPPORTED = ((3, 11), (3, 12))
TORCH = "torch==2.13.0"  # the pin in pyproject.toml
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
ROOT = Path(__file__).resolve().parent


def version_problem(version: tuple[int, int]) -> str | None:
    """Why this Python cannot run sdipc_lab, with what to do; None when it can."""
    if tuple(version[:2]) in SUPPORTED:
        return None
    have = ".".join(map(str, version[:2]))
    want = " or ".join(".".join(map(str, v)) for v in SUPPORTED)
    return (f"sdipc_lab needs Python {want} (its pinned torch has wheels for those), and this is Python {have}. "
            f"Install Python {SUPPORTED[-1][0]}.{SUPPORTED[-1][1]} (python.org, your package manager, "
            f"`uv python install 3.12`, or `conda create -n sdipc python=3.12`) and run this file with it, "
            f"e.g. `python3.12 bootstrap.py`.")


def wants_cpu_torch(system: str, has_nvidia: bool) -> bool:
    """Linux without an NVIDIA driver: PyPI's torch for Linux is the CUDA build, so take the CPU one."""
    return system == "Linux" and not has_nvidia


def reachable(url: str, seconds: float = 5.0) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=seconds).close()
        return True
    except OSError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cpu", action="store_true", help="install torch's CPU build (Linux)")
    which.add_argument("--gpu", action="store_true", help="install PyPI's torch (the CUDA build on Linux)")
    args = parser.parse_args(argv)
    problem = version_problem(sys.version_info[:2])
    if problem:
        print(problem, file=sys.stderr)
        return 2
    venv = ROOT / ".venv"
    python = venv / ("Scripts/python.exe" if platform.system() == "Windows" else "bin/python")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    cpu = args.cpu or (not args.gpu and wants_cpu_torch(platform.system(), shutil.which("nvidia-smi") is not None))
    if cpu and not reachable(CPU_INDEX):
        print(f"No NVIDIA driver found, but {CPU_INDEX} cannot be reached: torch comes from your default index "
              "(on Linux from PyPI that is the large CUDA build)", file=sys.stderr)
    elif cpu:
        print(f"No NVIDIA driver found: installing {TORCH}'s CPU build from {CPU_INDEX} (use --gpu for the CUDA one)")
        if subprocess.run([*pip, TORCH, "--index-url", CPU_INDEX]).returncode:
            print(f"{CPU_INDEX} could not be used; torch comes from your default index instead", file=sys.stderr)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    print(f"Ready. Run the demo: {python.relative_to(ROOT)} -m sdipc_lab demo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
