"""The source distribution carries what its test suite imports."""

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fastxent._options import major_minor

ROOT = Path(__file__).resolve().parents[1]


def test_the_sdist_carries_every_python_file_of_the_tests(tmp_path):
    """setuptools puts only ``tests/test*.py`` in an sdist by itself: conftest.py and the
    helper modules the tests import come from MANIFEST.in, or the sdist's suite cannot start."""
    setuptools = pytest.importorskip("setuptools")
    if major_minor(setuptools.__version__) < (77, 0):
        pytest.skip(f"pyproject.toml's build needs setuptools >= 77, not {setuptools.__version__}")
    if not (ROOT / "pyproject.toml").exists() or not (ROOT / "MANIFEST.in").exists():
        pytest.skip("not run from a source tree")
    # A copy without *.egg-info: setuptools adds the files an earlier build's SOURCES.txt lists.
    source = tmp_path / "source"
    source.mkdir()
    skip = shutil.ignore_patterns("*.egg-info", "__pycache__", ".*")
    for entry in ROOT.iterdir():
        if entry.is_dir() and entry.name in ("src", "tests", "benchmarks", "examples"):
            shutil.copytree(entry, source / entry.name, ignore=skip)
        elif entry.is_file():
            shutil.copy2(entry, source / entry.name)
    subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q", "sdist",
         "--dist-dir", str(tmp_path / "dist")],
        cwd=source, check=True, capture_output=True,
    )  # fmt: skip
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as sdist:
        carried = {Path(name).relative_to(Path(name).parts[0]) for name in sdist.getnames()}
    tests = {path.relative_to(ROOT) for path in (ROOT / "tests").glob("*.py")}
    assert {Path("tests/conftest.py"), Path("tests/versions.py")} <= tests
    assert tests - carried == set()
