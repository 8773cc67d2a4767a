import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from loratools.errors import OutputExistsError
from loratools.io import atomic
from loratools.io.atomic import TEMP_PREFIX, Owner, atomic_output, check_output, me, sweep, temp_name


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(TEMP_PREFIX)]


def test_directory_output_appears_only_on_success(tmp_path):
    target = tmp_path / "out"
    with atomic_output(target) as tmp:
        (tmp / "f.txt").write_text("x")
        assert not target.exists()
    assert (target / "f.txt").read_text() == "x"
    assert _leftovers(tmp_path) == []
    mode = stat.S_IMODE(os.stat(target).st_mode)
    assert mode & 0o755 == 0o755 & ~_umask()


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_failure_leaves_nothing(tmp_path, exc):
    target = tmp_path / "out"
    with pytest.raises(exc):
        with atomic_output(target) as tmp:
            (tmp / "partial").write_text("half")
            raise exc()
    assert not target.exists()
    assert _leftovers(tmp_path) == []


def test_existing_output_refused_without_force(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        check_output(target, force=False)
    with pytest.raises(FileExistsError):
        with atomic_output(target, directory=False):
            pass
    assert target.read_text() == "old"


def test_force_replaces_only_after_success(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_text("old")
    with pytest.raises(ValueError):
        with atomic_output(target, force=True, directory=False) as tmp:
            tmp.write_text("new")
            raise ValueError
    assert target.read_text() == "old"
    with atomic_output(target, force=True, directory=False) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert _leftovers(tmp_path) == []


# --- real processes: racing writers, kill -9, live and dead owners -------------------------------

ROOT = Path(__file__).resolve().parents[2]
WRITER = """
import sys
from pathlib import Path
from loratools.errors import OutputExistsError
from loratools.io import atomic
from loratools.io.atomic import atomic_output
target, tag, directory = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "dir"
if sys.argv[5] == "portable":
    atomic._RENAMEAT2 = None  # the fallback: hard link (file) or directory rename
try:
    with atomic_output(target, directory=directory, force=sys.argv[4] == "force") as tmp:
        (tmp / "who" if directory else tmp).write_text(tag)
        print("ready", flush=True)
        if sys.stdin.readline() != "go\\n":
            raise SystemExit(9)
except OutputExistsError as err:
    print(err, file=sys.stderr)
    raise SystemExit(3)
"""


def _writer(target: Path, tag: str, layout: str, force: str = "", path: str = "renameat2") -> subprocess.Popen:
    """A process that fills an atomic output, says ``ready`` and waits for ``go`` before putting it in place."""
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), tag, layout, force, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n", proc.stderr.read() if proc.stderr else ""
    return proc


def _go(*procs: subprocess.Popen) -> list[int]:
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    return [proc.wait(timeout=30) for proc in procs]


def _content(target: Path, layout: str) -> str:
    return (target / "who" if layout == "dir" else target).read_text()


@pytest.mark.parametrize("path", ["renameat2", "portable"])
@pytest.mark.parametrize("layout", ["dir", "file"])
def test_of_two_racing_writers_exactly_one_wins_with_its_own_output(tmp_path, layout, path):
    """Both pass the existence check at the start, then commit at once (2 trials, 2 processes each):
    one exits 0 with its own output in place, the other is refused and leaves nothing behind."""
    for trial in range(2):
        target = tmp_path / f"out{trial}"
        a, b = _writer(target, "a", layout, path=path), _writer(target, "b", layout, path=path)
        codes = _go(a, b)
        assert sorted(codes) == [0, 3], codes
        assert _content(target, layout) == ("a" if codes[0] == 0 else "b")
        loser = b if codes[0] == 0 else a
        assert "output already exists" in loser.stderr.read()  # type: ignore[union-attr]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("portable", [False, True])
def test_force_replaces_and_restores_the_old_output_when_the_new_cannot_be_placed(tmp_path, monkeypatch, portable):
    """``portable``: without renameat2 (not Linux, old C library), old output moved aside and back."""
    if portable:
        monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    target = tmp_path / "out"
    target.mkdir()
    (target / "who").write_text("old")
    with pytest.raises(FileNotFoundError):
        with atomic_output(target, force=True) as tmp:
            (tmp / "who").write_text("new")
            shutil.rmtree(tmp)  # the new output is gone when its turn comes
    assert (target / "who").read_text() == "old"
    assert _leftovers(tmp_path) == []
    with atomic_output(target, force=True) as tmp:
        (tmp / "who").write_text("new")
    assert (target / "who").read_text() == "new"
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("portable", [False, True])
def test_no_replace_without_renameat2(tmp_path, monkeypatch, portable):
    """A file output created by someone else while ours was built is never replaced, on either path."""
    if portable:
        monkeypatch.setattr(atomic, "_RENAMEAT2", None)
    target = tmp_path / "out.safetensors"
    with pytest.raises(OutputExistsError):
        with atomic_output(target, directory=False) as tmp:
            tmp.write_text("ours")
            target.write_text("theirs")
    assert target.read_text() == "theirs"
    assert _leftovers(tmp_path) == []


def test_kill_9_leftovers_are_removed_by_the_next_run(tmp_path):
    proc = _writer(tmp_path / "out", "a", "dir")
    proc.kill()
    proc.wait(timeout=30)
    assert len(_leftovers(tmp_path)) == 1  # what SIGKILL leaves
    with atomic_output(tmp_path / "other") as tmp:
        (tmp / "f").write_text("x")
    assert _leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_a_live_writers_temporary_is_never_removed(tmp_path):
    proc = _writer(tmp_path / "out", "a", "dir")
    try:
        with atomic_output(tmp_path / "other") as tmp:
            (tmp / "f").write_text("x")
        assert len(_leftovers(tmp_path)) == 1
    finally:
        assert _go(proc) == [0]
    assert (tmp_path / "out" / "who").read_text() == "a"
    assert _leftovers(tmp_path) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_owners_are_told_apart_by_start_time_and_host(tmp_path):
    """Our own pid with another start time is a reused pid (its temporary is stale); another host's is not ours to judge."""
    mine = me()
    reused = tmp_path / temp_name(Owner(mine.host, mine.boot, mine.pid, mine.start + 1), "new")
    live = tmp_path / temp_name(mine, "new")
    foreign = tmp_path / temp_name(Owner("0badf00d", mine.boot, _dead_pid(), 1), "new")
    previous_boot = tmp_path / temp_name(Owner(mine.host, "00000000", mine.pid, mine.start), "new")
    legacy = tmp_path / f"{TEMP_PREFIX}abc123"  # mkdtemp's, from before owners were named
    for path in (reused, live, foreign, previous_boot, legacy):
        path.mkdir()
    sweep(tmp_path)
    assert sorted(_leftovers(tmp_path)) == sorted([live.name, foreign.name, legacy.name])


def test_an_output_a_dead_force_moved_aside_is_put_back(tmp_path):
    """kill -9 between moving the old output aside and putting the new one in place (the portable
    path): the next run puts the old one back; if a new one did get in place, the old one goes."""
    mine = me()
    dead = Owner(mine.host, mine.boot, _dead_pid(), 1)
    aside = tmp_path / temp_name(dead, "old", "model")
    aside.mkdir()
    (aside / "who").write_text("old")
    sweep(tmp_path)
    assert (tmp_path / "model" / "who").read_text() == "old"
    again = tmp_path / temp_name(dead, "old", "model")
    again.mkdir()
    sweep(tmp_path)
    assert not again.exists() and (tmp_path / "model" / "who").read_text() == "old"


class _Interrupted(Exception):
    pass


def test_signals_are_held_until_the_output_is_in_place():
    def interrupt(signum, frame):
        raise _Interrupted

    previous = signal.signal(signal.SIGTERM, interrupt)
    reached = []
    try:
        with pytest.raises(_Interrupted):
            with atomic._signals_held():
                signal.raise_signal(signal.SIGTERM)
                reached.append(True)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert reached == [True]
