"""Only ``OFMU`` touches its own state: no module of the package outside ``optimizer.py`` names
a private attribute of an optimizer (``opt._x``, ``optimizer._x``). Callers use its public
operations (``rebuild``, ``flat_buffers``, ``backend=`` with a Backend record)."""

import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "python" / "ofmu"
PRIVATE = re.compile(r"\b(opt|optimizer)\._\w")


def offenders(root: pathlib.Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        if path.relative_to(root).as_posix() == "optimizer.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE.search(line):
                out.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    return out


def test_no_module_outside_the_optimizer_reaches_into_its_private_state():
    assert PACKAGE.is_dir()
    assert offenders(PACKAGE) == []


def test_the_check_finds_a_private_access(tmp_path):
    (tmp_path / "optimizer.py").write_text("opt._parts = []\n")  # the owner may
    (tmp_path / "sharded.py").write_text("x = 1\nheld = opt._frozen\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "step.py").write_text("optimizer._inner_step = f\nopt.step(c)\n")
    assert offenders(tmp_path) == ["sharded.py:2: held = opt._frozen",
                                   "sub/step.py:1: optimizer._inner_step = f"]
