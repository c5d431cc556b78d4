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
