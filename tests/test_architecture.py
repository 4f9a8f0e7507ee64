"""The codebase's shape, checked: the import rules in pyproject.toml (import-linter) and the
packaging that installs exactly one import package, `berth`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = {"cli": "berth.cli", "migrations": "berth.migrations", "registry": "berth.registry", "server": "berth.server"}


def test_the_import_rules_hold() -> None:
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_every_package_folder_is_packaged() -> None:
    """pyproject lists packages one by one (their folders are mapped into `berth`): a new folder
    with an __init__.py that is not listed would be missing from the wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join([PARTS[path.relative_to(ROOT).parts[0]], *path.relative_to(ROOT).parts[1:-1]])
             for part in PARTS for path in (ROOT / part).rglob("__init__.py") if "__pycache__" not in path.parts}
    assert found == listed


@pytest.mark.skipif(sys.platform != "linux", reason="checks a Linux site-packages layout")
def test_a_wheel_installs_one_import_package(tmp_path: Path) -> None:
    """`pip install .` into an empty venv: `berth` and its script, and no `server`, `registry`..."""
    source = tmp_path / "source"  # a copy: setuptools builds in the source folder and keeps what it built
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for part in PARTS:
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    venv.create(tmp_path / "venv", with_pip=True)
    python = tmp_path / "venv" / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(source)],
                             capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-4000:]
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = {entry.name for entry in site.iterdir()} - {"pip", "_distutils_hack", "setuptools", "pkg_resources",
                                                       "distutils-precedence.pth", "__pycache__"}
    assert {name for name in ours if not name.endswith(".dist-info")} == {"berth"}
    assert sorted(p.name for p in (site / "berth").iterdir() if p.name != "__pycache__") == sorted(PARTS)
    assert (tmp_path / "venv" / "bin" / "berth").exists()
    imported = subprocess.run([str(python), "-c", "import server"], capture_output=True, text=True, cwd=tmp_path)
    assert imported.returncode != 0 and "No module named 'server'" in imported.stderr
