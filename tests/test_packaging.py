"""ir/ and kernels/ install as moepass.ir / moepass.kernels, never as top-level modules."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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
    bundled = {name for name in names if name.startswith("moepass/assets/")}  # builtin: models need them
    on_disk = {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "moepass" / "assets").rglob("*") if p.is_file()
    }
    assert bundled == on_disk


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


def test_transformers_probing_for_its_kernels_package_leaves_our_ops_intact():
    """`python -m pytest` from the repo root puts the checkout on sys.path, where transformers' probe
    for its hub `kernels` library finds and imports our kernels/ folder; that must not re-register
    moepass's ops (it did, and the next packed-op call segfaulted)."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
        "import torch, moepass; from moepass.ir.quantized import QuantFormat, quantize; "
        "from moepass.kernels import ops, pack_for_cpu; "
        "import transformers.integrations.hub_kernels, kernels; "
        "assert 'kernels.ops' not in sys.modules, 'our ops were registered a second time'; "
        "q = quantize(torch.randn(64, 128), QuantFormat(4, 32)); p = pack_for_cpu(*q, 4, 32); "
        "x = torch.randn(3, 128); "
        "print(ops.PACKED_LINEAR(x, p.weight, p.scales, None, None, 4, p.group_size).shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([3, 64])" in out.stdout


@pytest.mark.parametrize("hub_installed", [True, False])
def test_checkout_root_hands_kernels_imports_to_the_hub_package(tmp_path, hub_installed):
    """From the repo root, `import kernels` (transformers >= 5.25 does it at import) must reach the hub
    package installed behind our kernels/ folder, submodules included; with none installed, it gets a
    module that defines nothing."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("from .layer import Mode\n")
    (site / "kernels" / "layer.py").write_text("Mode = 'hub'\n")
    behind = [str(site)] if hub_installed else []
    code = (
        "import sys; "
        f"sys.path[:] = [''] + {behind!r} + [p for p in sys.path[1:] if 'site-packages' not in p]; "
        "import kernels; "
        "print(kernels.__file__, kernels.Mode if hasattr(kernels, 'Mode') else "
        "[name for name in vars(kernels) if not name.startswith('_')])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True, text=True)
    where, what = out.stdout.split(maxsplit=1)
    if hub_installed:
        assert (Path(where), what.strip()) == (site / "kernels" / "__init__.py", "hub")
    else:
        assert (Path(where), what.strip()) == (ROOT / "kernels" / "__init__.py", "[]")
