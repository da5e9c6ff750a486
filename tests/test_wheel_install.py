"""The package as users install it: a wheel built from the checkout, installed outside it.

An editable install reads files from the source tree, so anything the wheel forgets (the recipes, the C++
kernel sources) only shows up here. The wheel goes into a fresh virtual environment whose other packages come
from this environment (a ``.pth`` file naming its site-packages folders), and the commands run from a folder
outside the checkout, so nothing can be found relative to the source tree.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", "*.egg-info", "__pycache__", ".pytest_cache",
                              ".hypothesis")


def _site_packages() -> list[str]:
    """This environment's package folders (a venv that reuses another's through a .pth lists both)."""
    return [p for p in dict.fromkeys(sys.path) if p.endswith("site-packages") and Path(p).is_dir()
            and not (Path(p) / "moe_export").is_dir()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """-> (venv bin folder, wheel path, work folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)  # builds write build/ and egg-info: keep them out of the checkout
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist)], check=True, cwd=tmp)
    (wheel,) = dist.glob("moe_export-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (purelib,) = Path(venv, "lib").glob("python3*/site-packages")
    (purelib / "_reuse_env.pth").write_text("\n".join(_site_packages()) + "\n")
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "-q", str(wheel)], check=True, cwd=tmp)
    work = tmp / "work"
    work.mkdir()
    return bin_dir, wheel, work


def _run(bin_dir, work, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_wheel_ships_the_recipes_and_kernel_sources(installed):
    _, wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {Path(n).name for n in names if n.startswith("moe_export/recipes/") and n.endswith(".json")}
    assert {p.name for p in (ROOT / "moe_export" / "recipes").glob("*.json")} == shipped and "tiny-demo.json" in shipped
    assert any(n.startswith("moe_export/kernels/") and n.endswith(".cpp") for n in names)
    assert "moe_export/kernels/core/mixed_width.h" in names  # the kernel core the .cpp includes


def test_installed_package_finds_its_recipes_outside_the_checkout(installed):
    bin_dir, _, work = installed
    code = ("import moe_export, moe_export.recipes as r; "
            "print(moe_export.__file__); print(','.join(r.shipped_recipes())); print(r.Recipe.load('tiny-demo').name)")
    res = _run(bin_dir, work, "python", "-c", code)
    assert res.returncode == 0, res.stderr
    where, names, name = res.stdout.split()
    assert not Path(where).is_relative_to(ROOT), f"imported the checkout: {where}"
    assert "tiny-demo" in names.split(",") and name == "tiny-demo"
    res = _run(bin_dir, work, "moe-export", "run", "no-such-recipe")
    assert res.returncode != 0 and "tiny-demo" in res.stderr  # the error lists the shipped recipes


@pytest.mark.slow
def test_tiny_demo_runs_from_the_installed_wheel(installed):
    bin_dir, _, work = installed
    res = _run(bin_dir, work, "moe-export", "run", "tiny-demo", "-q", "-o", str(work / "demo"), timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (work / "demo" / "plan.json").is_file() and list((work / "demo").rglob("*.pte"))
