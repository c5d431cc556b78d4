"""The shared on-disk cache: unreadable entries are rebuilt with a warning naming the file, writes are
atomic, orphan temporary files of killed runs are removed, and nothing is ever loaded unsafely."""

import os
import pathlib
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from ofmu.studies.cache import CacheWarning, load_or_build, save_atomic


def _payload():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(7, 3, generator=g, dtype=torch.float64), "n": 3, "name": "x"}


def _builder(calls):
    def build():
        calls.append(1)
        return _payload()
    return build


def _same(a, b):
    assert a["n"] == b["n"] and a["name"] == b["name"]
    assert torch.equal(a["w"], b["w"]) and a["w"].dtype == torch.float64


def test_build_once_then_load(tmp_path):
    path = tmp_path / "sub" / "e.pt"
    calls = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = load_or_build(path, _builder(calls))
        second = load_or_build(path, _builder(calls))
    assert len(calls) == 1  # second call read the file
    _same(first, _payload())
    _same(second, _payload())
    assert sorted(os.listdir(path.parent)) == ["e.pt"]  # no temporary file left behind


def _valid_bytes(tmp_path):
    p = tmp_path / "valid.pt"
    torch.save(_payload(), p)
    return p.read_bytes()


class _Evil:
    """Unpickling it creates ``marker``: proof that code in a cache file ran."""

    def __init__(self, marker="/nonexistent/ofmu-marker"):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("kind", ["truncated", "empty", "garbage", "unsafe_pickle", "plain_pickle"])
def test_unreadable_entry_is_rebuilt_with_warning_naming_it(tmp_path, kind):
    path = tmp_path / "entry.pt"
    marker = tmp_path / "code-ran"
    if kind == "truncated":
        data = _valid_bytes(tmp_path)
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 5)
    elif kind == "unsafe_pickle":
        torch.save({"x": _Evil(marker)}, path)  # needs weights_only=False: must never be executed
    else:
        path.write_bytes(pickle.dumps({"a": _Evil(marker)}, protocol=2))
    calls = []
    with pytest.warns(CacheWarning) as rec:
        out = load_or_build(path, _builder(calls), what="model cache")
    assert len(calls) == 1
    assert not marker.exists()  # the pickled code never ran
    _same(out, _payload())
    msgs = [str(w.message) for w in rec]
    assert any(str(path) in m and "rebuild" in m and "model cache" in m for m in msgs), msgs
    assert not any("weights_only=False" in m for m in msgs)  # never advise the unsafe load
    # replaced on disk with a readable entry: the next call loads without building or warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_or_build(path, _builder(calls))
    assert len(calls) == 1
    _same(again, _payload())


def test_orphan_temporary_files_are_removed(tmp_path):
    path = tmp_path / "entry.pt"
    # a writer pid that cannot exist (exited child), one with no pid, and one of a live process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = tmp_path / f".entry.pt.tmp-{child.pid}-abc123"
    nopid = tmp_path / ".entry.pt.tmp-junk"
    live = tmp_path / f".entry.pt.tmp-{os.getppid()}-xyz"  # our parent is alive: leave it
    other = tmp_path / f".other.pt.tmp-{child.pid}-abc"  # another entry's file: not ours to remove
    for p in (dead, nopid, live, other):
        p.write_bytes(b"partial")
    with pytest.warns(CacheWarning) as rec:
        load_or_build(path, _builder([]))
    assert not dead.exists() and not nopid.exists()
    assert live.exists() and other.exists()
    assert any(str(dead) in str(w.message) for w in rec)
    assert path.is_file()


def test_save_atomic_replaces_and_keeps_old_entry_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "e.pt"
    save_atomic({"v": torch.tensor([1.0])}, path)
    save_atomic({"v": torch.tensor([2.0])}, path)
    assert torch.load(path, weights_only=True)["v"].item() == 2.0

    calls = []
    real_replace = os.replace

    def spy(src, dst):
        calls.append((str(src), str(dst)))
        # at the moment of the rename, the temporary file is complete and readable
        assert torch.load(src, weights_only=True)["v"].item() == 3.0
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    save_atomic({"v": torch.tensor([3.0])}, path)
    assert len(calls) == 1 and calls[0][1] == str(path)
    assert os.path.dirname(calls[0][0]) == str(tmp_path)  # same folder: rename is atomic
    monkeypatch.setattr(os, "replace", real_replace)

    # a write that fails half-way leaves the old entry intact and no temporary file
    def boom(obj, f, *a, **k):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"v": torch.tensor([4.0])}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["v"].item() == 3.0
    assert sorted(os.listdir(tmp_path)) == ["e.pt"]


def test_unloadable_object_refused_before_writing(tmp_path):
    path = tmp_path / "e.pt"
    with pytest.raises(TypeError, match=r"obj\['model'\].*Linear"):
        save_atomic({"model": torch.nn.Linear(2, 2)}, path)
    assert not path.exists() and os.listdir(tmp_path) == []
    with pytest.raises(TypeError, match="not weights_only-loadable"):
        load_or_build(path, lambda: [1, _Evil()])


def test_directory_in_place_of_entry_is_a_clear_error(tmp_path):
    (tmp_path / "e.pt").mkdir()
    with pytest.raises(IsADirectoryError, match="e.pt"):
        load_or_build(tmp_path / "e.pt", _builder([]))


def test_sigkill_during_write_keeps_old_entry_and_next_run_cleans_up(tmp_path):
    """A run killed (SIGKILL) in the middle of writing leaves the previous entry intact and only its
    temporary file, which the next load_or_build removes."""
    import signal
    import time

    path = tmp_path / "entry.pt"
    save_atomic({"v": torch.tensor([1.0])}, path)
    ready = tmp_path / "writing"
    script = f"""
import time, torch
from ofmu.studies import cache
def slow_save(obj, f, *a, **k):
    f.write(b"PK partial zip header")
    f.flush()
    open({str(ready)!r}, "w").close()
    time.sleep(120)
torch.save = slow_save
cache.save_atomic({{"v": torch.tensor([2.0])}}, {str(path)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, "writer exited early"
            assert time.monotonic() < deadline, "writer never started writing"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    orphans = [p for p in tmp_path.iterdir() if p.name.startswith(".entry.pt.tmp-")]
    assert len(orphans) == 1 and str(proc.pid) in orphans[0].name
    assert torch.load(path, weights_only=True)["v"].item() == 1.0  # old entry intact
    with pytest.warns(CacheWarning, match="orphan"):
        out = load_or_build(path, _builder([]))
    assert out["v"].item() == 1.0  # read the intact entry, did not rebuild
    assert not orphans[0].exists()


def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path):
    """mkstemp makes 0o600 files; a results file must be readable as a plain open() would leave it."""
    import os
    import stat

    from ofmu.bench.common import write_csv
    from ofmu.studies.cache import write_text_atomic

    old = os.umask(0o022)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        write_text_atomic("x", tmp_path / "a.json")
        save_atomic({"w": torch.zeros(2)}, tmp_path / "c.pt")
        write_csv(tmp_path / "b.csv", [{"x": 1.5}], ["x"])
        want = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
        assert want == 0o644
        for name in ("a.json", "b.csv", "c.pt"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name
        assert (tmp_path / "b.csv").read_text() == "x\n1.5\n"
    finally:
        os.umask(old)


_CONCURRENT = r"""
import pathlib, sys, time
import torch
from ofmu.studies.cache import load_or_build
entry, log, started = (pathlib.Path(a) for a in sys.argv[1:4])
role = sys.argv[4]
def build():
    with open(log, "a") as f:
        f.write(role + "\n")
    started.touch()
    time.sleep(2.0)  # the other process asks for the entry meanwhile
    return {"w": torch.arange(5.0), "by": role}
if role == "second":
    while not started.exists():
        time.sleep(0.01)
print(load_or_build(entry, build, what="test model")["by"])
"""


@pytest.mark.skipif(sys.platform == "win32", reason="builds are serialised with POSIX flock")
def test_a_second_process_waits_for_the_first_build_instead_of_repeating_it(tmp_path):
    """Two processes ask for the same missing entry; the second asks while the first builds. The
    build runs once, both get the first's object, and no lock file is left."""
    entry, log, started = tmp_path / "c" / "m.pt", tmp_path / "log", tmp_path / "started"
    args = [str(entry), str(log), str(started)]
    procs = {role: subprocess.Popen([sys.executable, "-c", _CONCURRENT, *args, role],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for role in ("first", "second")}
    out = {role: p.communicate(timeout=120) for role, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), out
    assert log.read_text().split() == ["first"]  # built once
    assert out["first"][0].split() == out["second"][0].split() == ["first"]
    assert "waiting for another process that is building test model" in out["second"][1]
    assert sorted(os.listdir(entry.parent)) == ["m.pt"]
