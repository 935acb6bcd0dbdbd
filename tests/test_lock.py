"""Installs that cannot drift: the environment the tests run in is exactly a lock written by tools/lock.sh.

requirements/lock.txt for the README's commands and CI; requirements/oldest.txt (every direct dependency at
its declared lower bound) for CI's compatibility job, which names it in AMLLM_LOCK. The lock is read as
text (an independent reference for what pip installed) and pyproject.toml as TOML."""

from __future__ import annotations

import os
import re
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

pytestmark = pytest.mark.compat

LOCK = ROOT / os.environ.get("AMLLM_LOCK", "requirements/lock.txt")
NOT_LOCKED = {"pip", "amllm"}  # the installer the virtualenv came with; this checkout (installed editable)


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        assert m, f"{path.name}: {line!r} is not pinned with =="
        pins[canonicalize_name(m[1])] = m[2]
    return pins


def test_every_installed_distribution_is_the_locked_one():
    pins = _pins(LOCK)
    wrong = []
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name in NOT_LOCKED or Path(dist.locate_file("")).resolve() not in site:
            continue  # not installed: a package's vendored copy on sys.path (setuptools/_vendor)
        if name not in pins:
            wrong.append(f"{name}=={dist.version} is not in {LOCK.name}")
        elif not SpecifierSet(f"=={pins[name]}").contains(dist.version, prereleases=True):  # 2.11.0 pins 2.11.0+cu130
            wrong.append(f"{name}=={dist.version} is installed, {LOCK.name} pins {pins[name]}")
    assert not wrong, (f"this environment is not the lock ({'; '.join(sorted(wrong))}): install into a new "
                       f"virtualenv with PIP_CONSTRAINT={LOCK.relative_to(ROOT)} as the README does, or refresh "
                       f"the lock after changing dependencies (bash tools/lock.sh)")


def test_the_locks_honour_the_declared_ranges_and_the_oldest_sits_on_the_lower_bounds():
    """Each lock satisfies pyproject.toml; requirements/oldest.txt has every direct dependency of the
    smoke extra at exactly its lower bound (what makes the compatibility job test those bounds)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def direct(extra: str) -> list[Requirement]:
        out = [Requirement(r) for r in project["dependencies"]]
        for r in map(Requirement, extras[extra]):
            out += direct(next(iter(r.extras))) if r.name == "amllm" else [r]
        return out

    env = {"python_version": "3.11", "platform_system": "Linux", "platform_machine": "x86_64", "sys_platform": "linux"}
    for lock, extra in (("lock.txt", "test"), ("oldest.txt", "smoke")):
        pins = _pins(ROOT / "requirements" / lock)
        for req in direct(extra):
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            version = pins.get(canonicalize_name(req.name))
            assert version is not None, f"{lock} lacks {req.name}"
            assert req.specifier.contains(Version(version), prereleases=True), f"{lock}: {req.name}=={version} not in {req}"
            if lock == "oldest.txt":
                lower = [s.version for s in req.specifier if s.operator == ">="]
                assert lower and Version(version) == Version(lower[0]), f"oldest.txt: {req.name}=={version}, bound {req}"
