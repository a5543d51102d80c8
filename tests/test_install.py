"""The installed environment is CPU-only: the CPU torch from constraints.txt, no CUDA packages.

The Makefile runs this file right after installing, so a resolver that swaps in a CUDA torch fails the
install step itself rather than surfacing later as a 6.9 GB virtualenv.
"""

from importlib.metadata import distributions

import torch


def test_torch_is_the_cpu_build() -> None:
    assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"


def test_no_nvidia_packages_installed() -> None:
    nvidia = sorted(d.metadata["Name"] for d in distributions() if d.metadata["Name"].lower().startswith("nvidia"))
    assert nvidia == [], f"CUDA packages installed: {', '.join(nvidia)}"
