"""`edgeformer translate`: a corpus in, a line out for each line in, in order; resumable after a crash without
redoing what was written; on Ray Data the same output as in this process."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeformer.runtime.bundle import write_file
from edgeformer.runtime.errors import InputError
from edgeformer.runtime.session import Runtime
from edgeformer.serve.corpus import translate
from tests.helpers import edgeformer, texts


@pytest.fixture(scope="module")
def demo(exported) -> Path:
    return exported("demo")[1]


def corpus(path: Path, n: int, seed: int = 0, blanks: tuple[int, ...] = ()) -> list[str]:
    lines = texts(n, seed)
    for i in blanks:
        lines[i] = "  " if i % 2 else ""
    path.write_text("".join(line + "\n" for line in lines))
    return lines


def test_every_line_is_translated_in_its_place_and_blank_lines_stay_blank(demo: Path, tmp_path: Path) -> None:
    lines = corpus(tmp_path / "in.txt", 150, blanks=(0, 7, 149))
    summary = translate(demo, tmp_path / "in.txt", tmp_path / "out.txt", batch_size=16, engine="local",
                        log=lambda _: None)
    rt = Runtime(demo)
    expected = ["" if not line.strip() else rt.translate([line])[0] for line in lines]
    assert (tmp_path / "out.txt").read_text().split("\n")[:-1] == expected
    assert summary.lines == 147 and summary.batches == 10 and not (tmp_path / "out.txt.parts").exists()


def test_a_bad_line_stops_the_run_by_its_number_before_anything_is_written(demo: Path, tmp_path: Path) -> None:
    lines = corpus(tmp_path / "in.txt", 20)
    lines[12] = "7" * 2000  # above the runtime's 1024 source tokens
    (tmp_path / "in.txt").write_text("\n".join(lines))
    with pytest.raises(InputError, match="line 13: input 0 has 2001 tokens"):
        translate(demo, tmp_path / "in.txt", tmp_path / "out.txt", engine="local", log=lambda _: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]
    result = edgeformer("translate", str(demo), "--input", str(tmp_path / "in.txt"), "--output",
                        str(tmp_path / "out.txt"), "--engine", "local")
    assert result.returncode != 0 and "error: line 13:" in result.stderr and "Traceback" not in result.stderr


def test_a_run_killed_midway_resumes_from_its_parts_without_redoing_them(demo: Path, tmp_path: Path) -> None:
    corpus(tmp_path / "in.txt", 3000, seed=1)
    args = [sys.executable, "-m", "edgeformer.cli", "translate", str(demo), "--input", str(tmp_path / "in.txt"),
            "--output", str(tmp_path / "out.txt"), "--engine", "local", "--batch-size", "8", "--strategy", "beam"]
    parts = tmp_path / "out.txt.parts"
    run = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(parts.glob("0*.json"))) < 5 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    run.wait()
    written = sorted(parts.glob("0*.json"))
    total = json.loads((parts / "job.json").read_text())["batches"]
    assert 5 <= len(written) < total and not (tmp_path / "out.txt").exists()
    marked = json.loads(written[2].read_text())
    marked[0] = "MARK"  # what a part holds is taken as it is, not translated again
    written[2].write_text(json.dumps(marked))

    resumed = subprocess.run([*args, "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(resumed.stdout)
    assert summary["resumed"] >= len(written) and f"resuming: {summary['resumed']:,} already done" in resumed.stderr
    translate(demo, tmp_path / "in.txt", tmp_path / "clean.txt", batch_size=8, engine="local",
              gen=dataclasses.replace(Runtime(demo).generation, strategy="beam"), log=lambda _: None)
    out, clean = ((tmp_path / name).read_text().split("\n") for name in ("out.txt", "clean.txt"))
    assert [i for i, (a, b) in enumerate(zip(out, clean, strict=True)) if a != b] == [out.index("MARK")]
    assert not parts.exists()


def test_parts_of_a_run_on_another_input_are_refused(demo: Path, tmp_path: Path) -> None:
    corpus(tmp_path / "in.txt", 10)
    parts = tmp_path / "out.txt.parts"
    parts.mkdir()
    (parts / "job.json").write_text(json.dumps({"key": "another run"}))
    with pytest.raises(InputError, match="holds a run of another input, bundle or settings; remove it"):
        translate(demo, tmp_path / "in.txt", tmp_path / "out.txt", engine="local", log=lambda _: None)
    assert sorted(p.name for p in parts.iterdir()) == ["job.json"]


def test_without_ray_installed_it_runs_in_this_process(demo: Path, tmp_path: Path) -> None:
    corpus(tmp_path / "in.txt", 10)
    code = ("import sys; sys.modules['ray'] = None; from edgeformer.cli import main; "
            f"main(['translate', {str(demo)!r}, '--input', {str(tmp_path / 'in.txt')!r}, '--output', "
            f"{str(tmp_path / 'out.txt')!r}, '--json'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "RAY_ADDRESS": ""})
    assert json.loads(result.stdout)["engine"] == "local" and "in this process" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed: pip install "
                                                                     "'edgeformer[serve]'")
def test_on_ray_data_the_output_is_the_one_this_process_writes(demo: Path, tmp_path: Path) -> None:
    corpus(tmp_path / "in.txt", 300, seed=2, blanks=(5,))
    translate(demo, tmp_path / "in.txt", tmp_path / "local.txt", batch_size=16, engine="local", log=lambda _: None)
    result = edgeformer("translate", str(demo), "--input", str(tmp_path / "in.txt"), "--output",
                        str(tmp_path / "ray.txt"), "--engine", "ray", "--replicas", "2", "--batch-size", "16",
                        "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["engine"] == "ray"
    assert (tmp_path / "ray.txt").read_text() == (tmp_path / "local.txt").read_text()


def test_a_part_cut_short_is_done_again_and_lines_split_at_newlines_alone(demo: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    lines = corpus(tmp_path / "in.txt", 40, seed=3)
    lines[4] = lines[4] + "\x0c" + lines[5]  # a form feed inside a line: str.splitlines would make it two
    (tmp_path / "in.txt").write_text("\r\n".join(lines) + "\r\n")
    translate(demo, tmp_path / "in.txt", tmp_path / "clean.txt", batch_size=8, engine="local", log=lambda _: None)
    assert len((tmp_path / "clean.txt").read_text().split("\n")) == 41
    parts = tmp_path / "out.txt.parts"
    logged: list[str] = []
    calls = 0

    def stop_after_two(path: Path, text: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 4:  # the job record, two parts, then a crash
            raise KeyboardInterrupt
        write_file(path, text)

    with monkeypatch.context() as patched:
        patched.setattr("edgeformer.serve.corpus.write_file", stop_after_two)
        with pytest.raises(KeyboardInterrupt):
            translate(demo, tmp_path / "in.txt", tmp_path / "out.txt", batch_size=8, engine="local",
                      log=lambda _: None)
    written = sorted(parts.glob("0*.json"))
    assert len(written) == 2
    written[1].write_text(written[1].read_text()[:10])  # cut short, as a power cut might leave it without fsync
    translate(demo, tmp_path / "in.txt", tmp_path / "out.txt", batch_size=8, engine="local", log=logged.append)
    assert "resuming: 1 already done" in logged[0]
    assert (tmp_path / "out.txt").read_text() == (tmp_path / "clean.txt").read_text()


def test_a_second_run_of_the_same_output_is_refused_while_the_first_holds_it(demo: Path, tmp_path: Path) -> None:
    from edgeformer.runtime.bundle import writer_lock
    from edgeformer.runtime.errors import WriteError

    corpus(tmp_path / "in.txt", 10)
    with writer_lock(tmp_path / "out.txt"), pytest.raises(WriteError, match="another process is writing it now"):
        translate(demo, tmp_path / "in.txt", tmp_path / "out.txt", engine="local", log=lambda _: None)
    assert not (tmp_path / "out.txt").exists() and not (tmp_path / "out.txt.parts").exists()
