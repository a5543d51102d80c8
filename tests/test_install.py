"""The installed environment is the one that was tested: the versions pyproject.toml and constraints.txt admit,
the CPU torch from constraints.txt, no CUDA packages.

The Makefile runs this file right after installing, so a resolver that swaps in a CUDA torch, or a version
outside a tested range, fails the install step itself rather than surfacing later: as a 6.9 GB virtualenv,
or as a scheduler that fails only in the Prefect server's log while no nightly run is ever created.
"""

import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distributions, version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

# Versions measured to break ragindex, which the ranges in pyproject.toml must keep out; the reasons are
# pyproject.toml's comments beside each range.
MEASURED_BROKEN = {
    "sqlalchemy": ["2.1.0", "2.1.9"],  # prefect's scheduler: InvalidRequestError, no scheduled run
    "fastapi": ["0.151.0", "0.155.0"],  # 422 on the client's filter requests; fails at import
}


def _requirements(section: list[str], where: str) -> list[tuple[Requirement, str]]:
    reqs = [(Requirement(r), where) for r in section]
    return [(r, w) for r, w in reqs if r.name != PROJECT["name"] and (r.marker is None or r.marker.evaluate())]


def _runtime() -> list[tuple[Requirement, str]]:
    return _requirements(PROJECT["dependencies"], "pyproject.toml")


def _optional() -> list[tuple[Requirement, str]]:
    extras = PROJECT.get("optional-dependencies", {})
    return [r for name, section in extras.items() for r in _requirements(section, f"pyproject.toml [{name}]")]


def _constraints() -> list[tuple[Requirement, str]]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return _requirements([s for line in lines if (s := line.split("#", 1)[0].strip())], "constraints.txt")


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _outside(reqs: list[tuple[Requirement, str]], required: bool) -> list[str]:
    found = []
    for req, where in reqs:
        got = _installed(req.name)
        if got is None:
            if required:
                found.append(f"{req.name} is not installed; tested {req.specifier} ({where})")
        elif not req.specifier.contains(got, prereleases=True):
            found.append(f"{req.name} {got} is installed; tested {req.specifier} ({where})")
    return found


def test_torch_is_the_cpu_build() -> None:
    assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build"


def test_no_nvidia_packages_installed() -> None:
    nvidia = sorted(d.metadata["Name"] for d in distributions() if d.metadata["Name"].lower().startswith("nvidia"))
    assert nvidia == [], f"CUDA packages installed: {', '.join(nvidia)}"


def test_runtime_dependencies_are_the_tested_versions() -> None:
    outside = _outside(_runtime(), required=True) + _outside(_constraints(), required=True)
    assert not outside, "\n".join(outside)


def test_installed_extras_are_the_tested_versions() -> None:
    # An extra is optional: one not installed is fine, one installed outside its range is not.
    outside = _outside(_optional(), required=False)
    assert not outside, "\n".join(outside)


@pytest.mark.parametrize(("name", "broken"), sorted(MEASURED_BROKEN.items()))
def test_pyproject_keeps_out_the_versions_measured_broken(name: str, broken: list[str]) -> None:
    specifier = next((r.specifier for r, _ in _runtime() if canonicalize_name(r.name) == name), SpecifierSet())
    admitted = [v for v in broken if specifier.contains(v, prereleases=True)]
    assert not admitted, f"pyproject.toml's {name}{specifier} admits {', '.join(admitted)}, measured broken"


def test_installed_packages_agree_with_each_other() -> None:
    # The dependencies' own requirements (sqlalchemy[asyncio] for prefect, starlette for fastapi, ...):
    # pip check reads every installed package's metadata.
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
