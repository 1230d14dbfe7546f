"""What `pip install .` gives a user: a wheel of the package alone (no tests, benchmarks or dev files), with the
`fedcustom` command, whose --version is the distribution's."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_the_package_alone_and_its_command(tmp_path: Path) -> None:
    source = tmp_path / "source"  # setuptools builds in the source tree: a copy keeps the checkout clean
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("fedcustom-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"fedcustom", wheel.name.split("-py3")[0] + ".dist-info"}
    assert not [n for n in names if "/tests/" in n or "conftest" in n or n.endswith((".pyc", ".ipynb"))]
    assert "fedcustom/bench/sweeps/converge.toml" in names  # package data a preset needs
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fedcustom = fedcustom.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    done = subprocess.run([sys.executable, "-m", "fedcustom.cli", "--version"], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == f"fedcustom {version('fedcustom')}"
