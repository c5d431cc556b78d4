"""The README's Python blocks run as printed (extracted and executed in order, in one
namespace), and the usage example does what the README says: the forgotten class drops to the
level of a model that never saw it while the retained data keeps its accuracy."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_a_runnable_usage_example():
    assert len(python_blocks()) >= 1


def test_readme_python_blocks_run_and_the_example_forgets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a block writes lands in the repository
    ns: dict = {"__name__": "__readme__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, block in enumerate(python_blocks()):
            exec(compile(block, f"README.md python block {i}", "exec"), ns)
    printed = out.getvalue()
    before = re.search(r"before: forget accuracy ([\d.]+)%, retain accuracy ([\d.]+)%", printed)
    after = re.search(r"after:  forget accuracy ([\d.]+)%, retain accuracy ([\d.]+)%", printed)
    assert before and after, printed
    f0, r0, f1, r1 = (float(v) for v in before.groups() + after.groups())
    assert f0 > 95.0  # the class was learned
    assert f1 <= 2.0  # a model retrained without the 3s scores 0% on them
    assert r1 >= r0 - 2.0  # retained data within 2 points
    # the printed numbers are the model's (not a stale string): recompute one
    assert abs(100 * ns["accuracy"](ns["forget"]) - f1) < 0.05
    stats = ns["opt"].last_stats()
    assert stats["skipped_steps"] == 0 and stats["capped_steps"] > 0


def test_options_table_lists_every_constructor_argument():
    """Every keyword of OFMU(...) has a row in the README's options table, and no row names a
    keyword that does not exist."""
    import inspect

    from ofmu import OFMU

    head = r"\| option \| values \(default first\) \| meaning \|\n\|---\|---\|---\|\n"
    table = re.search(head + r"((?:\|.*\n)+)", README.read_text())
    assert table, "the options table is missing"
    listed = set()
    for row in table.group(1).splitlines():
        listed |= set(re.findall(r"`(\w+)`", row.split("|")[1]))
    expected = set(inspect.signature(OFMU.__init__).parameters) - {"self", "params"}
    assert listed == expected, (sorted(expected - listed), sorted(listed - expected))  # missing, unknown


def _requirement_names(specs) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", s.strip(), maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_versions_live_in_constraints_txt():
    """The README's install (one line) and CI install with -c constraints.txt, name no version
    themselves, and constraints.txt pins every dependency, extra and build requirement."""
    import tomllib

    root = README.parent
    pins = {}
    for line in (root / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    project = tomllib.loads((root / "pyproject.toml").read_text())
    needed = _requirement_names(project["project"]["dependencies"])
    for extra in project["project"]["optional-dependencies"].values():
        needed |= _requirement_names(extra)
    needed |= _requirement_names(project["build-system"]["requires"])
    assert needed <= set(pins), f"not pinned in constraints.txt: {sorted(needed - set(pins))}"

    readme = README.read_text()
    first = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip()
    assert "\n" not in first and first.endswith("ofmu demo")
    ci = (root / ".ci" / "run").read_text()
    for text, where in ((first, "README"), (ci, ".ci/run")):
        installs = re.findall(r"pip install[^&\n]*", text)
        assert installs, where
        for cmd in installs:
            assert "-c constraints.txt" in cmd, (where, cmd)
            assert "==" not in cmd, (where, cmd)  # the versions are in constraints.txt only


def test_readme_speaks_about_the_users_machine():
    """No wording about the environment the project was built in, and the demo's data is not
    called bundled (Fashion-MNIST comes from a Debian package, the digits with scikit-learn)."""
    text = README.read_text()
    for phrase in ("this project's", "the sessions", "so far", "bundled"):
        assert phrase not in text, phrase
    assert "not on PyPI" in text
