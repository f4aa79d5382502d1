"""The output directory holds exactly one compile's files, written whole or not at all: a
second compile replaces the first as a whole (no stale atc.sh next to a cpu model), a
folder with other files is refused before any work, two compiles into one -o cannot race,
and Ctrl-C / SIGTERM leave nothing behind and exit with their documented codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qcompile.errors import EXIT_CODES, EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_TERMINATED
from qcompile.output import StagedOutput

ROOT = Path(__file__).resolve().parents[1]


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _compile(run_cli, files, out, *extra):
    return run_cli([files["model"], "--calib", files["calib"], "-o", out, "-q", "--verify-samples", "2", *extra])


def test_a_cpu_compile_after_an_ascend_one_leaves_no_ascend_files(run_cli, small_cnn_files, tmp_path):
    out = tmp_path / "out"
    assert _compile(run_cli, small_cnn_files, out, "--target", "ascend310b").code == 0
    assert {"atc.sh", "model.qdq.onnx"} <= {p.name for p in out.iterdir()}
    assert _compile(run_cli, small_cnn_files, out, "--target", "cpu").code == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "recipe.resolved.yaml", "report.html",
                                                             "report.json"]
    assert _leftovers(out) == []


def test_a_failed_compile_leaves_the_previous_output_byte_identical(run_cli, small_cnn_files, tmp_path):
    out = tmp_path / "out"
    assert _compile(run_cli, small_cnn_files, out).code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = _compile(run_cli, small_cnn_files, out, "--recipe", "no-such-recipe")
    assert res.code != 0 and "Traceback" not in res.err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert _leftovers(out) == []


def test_a_folder_with_other_files_is_refused_before_any_work(run_cli, small_cnn_files, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    res = _compile(run_cli, small_cnn_files, out)
    assert res.code == EXIT_OUTPUT and res.err.startswith("error:"), res.err
    assert "notes.txt" in " ".join(res.err.split()) and "not a qcompile output" in " ".join(res.err.split())
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    assert _leftovers(out) == []


def test_the_current_directory_is_refused_as_output(run_cli, small_cnn_files):
    res = _compile(run_cli, small_cnn_files, ".")
    assert res.code == EXIT_OUTPUT and "current directory" in " ".join(res.err.split()), res.err
    assert list(res.cwd.iterdir()) == []


def test_a_second_compile_into_a_locked_output_fails_at_once(run_cli, small_cnn_files, tmp_path):
    out = tmp_path / "out"
    first = StagedOutput(out)  # a compile in progress
    try:
        res = _compile(run_cli, small_cnn_files, out)
        assert res.code == EXIT_OUTPUT and "another qcompile is writing" in " ".join(res.err.split()), res.err
        assert not out.exists()
    finally:
        first.discard()
    assert _leftovers(out) == []  # lock file and staging gone
    assert _compile(run_cli, small_cnn_files, out).code == 0  # free again


def test_output_directory_gets_the_umask_mode_not_mkdtemps(run_cli, small_cnn_files, tmp_path):
    out = tmp_path / "out"
    assert _compile(run_cli, small_cnn_files, out).code == 0
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask


def test_exit_codes_table_lists_interrupt_and_terminate():
    assert EXIT_CODES[EXIT_INTERRUPTED].startswith("interrupted") and EXIT_CODES[EXIT_TERMINATED].startswith("terminated")
    readme = (ROOT / "README.md").read_text()
    assert f"| {EXIT_INTERRUPTED} |" in readme and f"| {EXIT_TERMINATED} |" in readme


# a compile that holds its staged output (a file already written into it) until signalled
_SLOW_COMPILE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qcompile import driver
    def slow(plan, folder):
        (Path(folder) / "model.onnx").write_bytes(b"partial")
        Path(sys.argv[2]).write_text("staged")
        time.sleep(60)
    driver.compile_plan = slow
    from qcompile.cli import main
    sys.exit(main([sys.argv[1], "--calib", sys.argv[3], "-o", sys.argv[4], "-q"]))
""")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, EXIT_TERMINATED, "terminated"),
                                             (signal.SIGINT, EXIT_INTERRUPTED, "interrupted")])
def test_a_signal_mid_compile_leaves_nothing_and_says_so(small_cnn_files, tmp_path, sig, code, word):
    out, ready = tmp_path / "out", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_COMPILE, str(small_cnn_files["model"]), str(ready),
                             str(small_cnn_files["calib"]), str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.communicate(timeout=10)
    assert _leftovers(out)  # staging and lock exist while it runs
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert word in err and "nothing was written" in err and "Traceback" not in err
    assert not out.exists() and _leftovers(out) == []
