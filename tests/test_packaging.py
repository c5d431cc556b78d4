"""The release artefacts, made the way a release is made and used outside the checkout.

One end-to-end test, offline and with the torch already installed: build the sdist
(``setup.py sdist``, MANIFEST.in), build the wheel *from that sdist* (``pip wheel <sdist>
--no-build-isolation``: proves the sdist alone compiles the C++ extension), install the wheel into
an empty folder, and from another folder run the ``ofmu`` script it installed (``info`` must find
the C++ backend) and the README's usage example against the installed package. About a minute of
compiling on 2 cores; marked slow, and run by CI like every other test.
"""

from __future__ import annotations

import email
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: int = 900) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _clean_env(**extra: str) -> dict:
    """No PYTHONPATH pointing into the checkout; the interpreter's own site-packages stay (torch and
    the extras), an editable install of ofmu there is shadowed by PYTHONPATH (checked below)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OFMU_BACKEND")}
    env.update(OMP_NUM_THREADS="1", MAX_JOBS=env.get("MAX_JOBS", "2"), **extra)
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    env = _clean_env(OFMU_SKIP_CUDA_BUILD="TRUE")  # the CPU extension: what every machine can build
    _run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp)], cwd=ROOT, env=env)
    (sdist,) = tmp.glob("ofmu-*.tar.gz")
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-cache-dir",
          "--no-index", "-w", str(tmp), str(sdist)], cwd=tmp, env=env)
    (wheel,) = tmp.glob("ofmu-*.whl")
    return {"sdist": sdist, "wheel": wheel, "tmp": tmp}


def test_sdist_holds_what_a_build_needs(built):
    with tarfile.open(built["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for needed in ("setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "CHANGELOG.md", "README.md",
                   "CONTRIBUTING.md", "constraints.txt", "csrc/ofmu.cpp", "csrc/checks.h",
                   "csrc/cpu/ofmu_cpu.cpp", "csrc/cpu/avx512_kernels.h", "csrc/cuda/ofmu_kernels.cu",
                   "csrc/cuda/ofmu_cuda.cpp", "tests/csrc/avx512_simde.cpp",
                   "ofmu_kernels/__init__.py", "python/ofmu/py.typed", "python/ofmu/optimizer.py"):
        assert needed in names, needed
    # every docs/ page the README links to is shipped
    readme = (ROOT / "README.md").read_text()
    for doc in set(re.findall(r"\]\((docs/[^)#]+)", readme)):
        assert doc in names, doc
    assert not [n for n in names if n.endswith((".so", ".pyc", ".o"))], "compiled files in the sdist"


def test_wheel_holds_the_extension_licence_and_typing_marker(built):
    with zipfile.ZipFile(built["wheel"]) as z:
        names = set(z.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = email.message_from_bytes(z.read(meta_name))
    assert [n for n in names if re.fullmatch(r"ofmu/_C\.[^/]*\.so", n)], sorted(names)
    assert "ofmu/py.typed" in names and "ofmu_kernels/launch.py" in names
    (lic,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    with zipfile.ZipFile(built["wheel"]) as z:
        assert b"Apache License" in z.read(lic) and b"Version 2.0, January 2004" in z.read(lic)
    assert meta["License-Expression"] == "Apache-2.0"
    assert "Typing :: Typed" in meta.get_all("Classifier")
    assert meta["Version"] == re.search(r'(?m)^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text())[1]


def test_installed_wheel_works_outside_the_checkout(built):
    site = built["tmp"] / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir", "--target",
          str(site), str(built["wheel"])], cwd=built["tmp"])
    elsewhere = built["tmp"] / "elsewhere"
    elsewhere.mkdir()
    env = _clean_env(PYTHONPATH=str(site))
    where = _run([sys.executable, "-c", "import torch, ofmu, ofmu._C; print(ofmu.__file__)"], elsewhere, env)
    assert Path(where.strip()).is_relative_to(site), where  # the installed copy, not the checkout
    # the console script the wheel installed
    script = site / "bin" / "ofmu"
    assert _run([str(script), "--version"], elsewhere, env).strip().startswith("ofmu ")
    info = _run([str(script), "info"], elsewhere, env)
    assert re.search(r"(?m)^\s+cpp\s+available$", info), info
    assert re.search(r"(?m)^\s+cpu\s+->\s+cpp\b", info), info
    # the README's usage example, against the installed package (needs scikit-learn: the bench extra)
    pytest.importorskip("sklearn")
    block = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    (elsewhere / "usage.py").write_text(block)
    out = _run([sys.executable, "usage.py"], elsewhere, env)
    after = re.search(r"after:  forget accuracy ([\d.]+)%, retain accuracy ([\d.]+)%", out)
    assert after and float(after[1]) <= 2.0 and float(after[2]) >= 95.0, out
