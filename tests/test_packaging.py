"""The source distribution and the package metadata, built as ``pip``/``build`` would build them."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import nytorch

ROOT = Path(__file__).resolve().parent.parent
#: tracked files that only serve the repository itself (CI's entry point, git's own)
REPOSITORY_ONLY = {".ci/run", ".gitignore"}


def _checkout_files() -> list[str]:
    """The files of this checkout, tracked or new (what a clean clone plus the change holds)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, cwd=ROOT)
    if listed.returncode != 0:
        pytest.skip("not a git checkout (an unpacked sdist): nothing to build from")
    return [name for name in listed.stdout.splitlines() if (ROOT / name).is_file()]


def _sdist(tmp_path: Path) -> tarfile.TarFile:
    """The sdist setuptools builds (``pyproject.toml``'s backend, as ``python -m build``) from a copy.

    A copy: setuptools also packs what an earlier build's ``nytorch.egg-info/SOURCES.txt`` lists, so
    in a working tree it can hide a file that a clean clone's sdist would leave out.
    """
    setuptools = pytest.importorskip("setuptools")
    # pip builds in an isolated environment with what [build-system] requires; this interpreter's own
    # setuptools may be older (a Python 3.10 venv starts with 65, which cannot read `license = "MIT"`)
    requirement = re.search(r'"setuptools>=(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert requirement is not None, "pyproject.toml's [build-system] names no setuptools floor"
    needed = int(requirement.group(1))
    if int(setuptools.__version__.split(".")[0]) < needed:
        pytest.skip(f"setuptools {setuptools.__version__} here; the build requires >= {needed}")
    source = tmp_path / "source"
    for name in _checkout_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    done = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as backend; "
                           "print(backend.build_sdist(sys.argv[1]))", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=source)
    assert done.returncode == 0, done.stderr[-3000:]
    return tarfile.open(tmp_path / done.stdout.strip().splitlines()[-1])


def test_the_sdist_carries_every_file_the_test_suite_reads(tmp_path: Path) -> None:
    """It held ``tests/test_*.py`` only (setuptools' default): without ``conftest.py``, the examples,
    notebooks and documents, 46 of its test modules failed to collect from an unpacked sdist."""
    with _sdist(tmp_path) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    missing = sorted(set(_checkout_files()) - REPOSITORY_ONLY - names)
    assert not missing, missing
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


def test_the_metadata_names_the_version_and_the_licence(tmp_path: Path) -> None:
    with _sdist(tmp_path) as sdist:
        info = next(member for member in sdist.getmembers() if member.name.count("/") == 1
                    and member.name.endswith("/PKG-INFO"))
        metadata = sdist.extractfile(info).read().decode()  # type: ignore[union-attr]
    headers = dict(line.split(": ", 1) for line in metadata.split("\n\n")[0].splitlines() if ": " in line)
    assert headers["Version"] == nytorch.__version__  # one source: pyproject reads nytorch.__version__
    assert headers["License-Expression"] == "MIT" and headers["License-File"] == "LICENSE"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
