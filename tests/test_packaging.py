"""ir/ and kernels/ install as moepass.ir / moepass.kernels, never as top-level modules."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_the_moepass_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("moepass-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"moepass"}
    assert "moepass/ir/capture.py" in names and "moepass/kernels/__init__.py" in names


def test_source_checkout_imports_without_install(tmp_path):
    """From the repo root with no install at all (editable finders removed), subpackages resolve."""
    code = (
        "import sys; "
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__.lower()]; "
        "sys.path[:] = [p for p in sys.path if 'moepass' not in p and '__editable__' not in p]; "
        f"sys.path.insert(0, {str(ROOT)!r}); "
        "import moepass, moepass.ir, moepass.kernels; "
        "print(moepass.ir.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True
    ).stdout
    assert Path(out.strip()) == ROOT / "ir" / "__init__.py"
