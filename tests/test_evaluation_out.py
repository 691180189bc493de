"""The evaluation's --out (issue 21), through the one output-folder rule (`utils.output_dir`): refused when used
unless --overwrite, replaced only when it holds nothing but the evaluation's own results (its manifest says which),
built beside and swapped in, one line on a write failure (a real full tmpfs where the machine allows mounting one)
without a 0-byte per_image.csv; a folder that cannot be renamed is filled in place."""
from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.evaluate_segmentation import main
from tests.test_evaluation import make_checkpoints, make_image_root
from utils import cli
from utils.evaluation import report
from utils.output_dir import MANIFEST_NAME, OutputDirError, build_beside, read_manifest


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bfm_h5) -> dict:
    base = tmp_path_factory.mktemp("evaluation_out")
    face_model, spec = make_checkpoints(base / "save", tiny_bfm_h5)
    make_image_root(base / "root", face_model, spec)
    return {"save_root": base / "save", "img_path": base / "root", "bfm": tiny_bfm_h5}


def argv(setup: dict, out: Path, *extra: str) -> list[str]:
    return ["--img_path", str(setup["img_path"]), "--save_root", str(setup["save_root"]), "--bfm", str(setup["bfm"]),
            "--device", "cpu", "--stage", "step2", "--out", str(out), *extra]


def fails(capsys, args: list[str]) -> str:
    capsys.readouterr()  # what earlier runs printed
    with pytest.raises(SystemExit) as exc:
        cli.cli_main(main, args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err, err[-2000:]
    line = err.strip().split("\r")[-1].splitlines()[-1]  # after the progress bar it erased
    assert line.startswith("error: ") and sum(x.count("error:") for x in err.splitlines()) == 1, err[-2000:]
    return line


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_out_that_is_a_file_is_one_line_before_any_work(setup, tmp_path, capsys):
    (tmp_path / "res").write_text("mine")
    line = fails(capsys, argv({**setup, "save_root": tmp_path / "no_checkpoints"}, tmp_path / "res"))
    assert "is a file" in line  # not the missing checkpoint: --out is checked first
    assert (tmp_path / "res").read_text() == "mine"


def test_used_out_is_refused_and_overwrite_replaces_only_own_results(setup, tmp_path, capsys):
    out = tmp_path / "res"
    main(argv(setup, out, "--save_images"))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert "per_image.csv" in manifest["files"] and "images/a.png_estmask.png" in manifest["files"]
    before = snapshot(out)
    assert "--overwrite" in fails(capsys, argv(setup, out, "--stage", "step4"))
    assert snapshot(out) == before
    main(argv(setup, out, "--stage", "step4", "--overwrite"))  # no --save_images: the old images go too
    assert json.loads((out / "summary.json").read_text())["stage"] == "step4" and not (out / "images").exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "res"]  # no partial or old folder left beside
    (out / "notes.txt").write_text("the user's")
    line = fails(capsys, argv(setup, out, "--overwrite"))
    assert "notes.txt" in line and (out / "notes.txt").read_text() == "the user's"
    user = tmp_path / "user"
    user.mkdir()
    (user / "summary.json").write_text("{}")  # the evaluation's file name, but no manifest: not its file
    assert "did not write" in fails(capsys, argv(setup, user, "--overwrite"))
    assert snapshot(user) == {"summary.json": b"{}"}


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 64 vs 0")])
def test_a_failed_write_is_one_line_and_keeps_the_old_results(setup, tmp_path, capsys, monkeypatch, error):
    """torch raises RuntimeError on a full disk, Python OSError: either is one line; the old results stay whole."""
    out = tmp_path / "res"
    main(argv(setup, out))
    before = snapshot(out)

    def write_results(folder, rows, summary):
        (Path(folder) / "per_image.csv").touch()
        raise error

    monkeypatch.setattr("utils.evaluation.command.write_results", write_results)
    line = fails(capsys, argv(setup, out, "--overwrite"))
    assert line.startswith("error: cannot write") and str(out) in line
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["res"]


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 12 kB tmpfs (three pages): writes fail with ENOSPC as on a full disk."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("extra", [(), ("--save_images",)])
def test_a_full_disk_is_one_line_and_leaves_no_empty_file(setup, tiny_tmpfs, capsys, extra):
    line = fails(capsys, argv(setup, tiny_tmpfs / "res", *extra))
    assert "cannot write" in line and "No space left" in line
    assert list(tiny_tmpfs.iterdir()) == []  # no 0-byte per_image.csv, no partial folder


def test_report_names_every_output_file():
    assert (report.PER_IMAGE_NAME, report.SUMMARY_JSON_NAME, report.SUMMARY_MD_NAME) == (
        "per_image.csv", "summary.json", "summary.md")


def test_a_mount_point_out_is_filled_in_place(setup, tmp_path, capsys):
    """A folder that cannot be renamed (a mount point, as a container's volume) still gets its results, and a rerun
    with --overwrite replaces them."""
    mount = tmp_path / "volume"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        main(argv(setup, mount, "--save_images"))
        assert (mount / "images").is_dir() and (mount / MANIFEST_NAME).is_file()
        main(argv(setup, mount, "--stage", "step4", "--overwrite"))
        assert sorted(p.name for p in mount.iterdir()) == sorted([MANIFEST_NAME, "per_image.csv", "summary.json",
                                                                   "summary.md"])
        assert json.loads((mount / "summary.json").read_text())["stage"] == "step4"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_folder_that_cannot_be_renamed_is_checked_again_then_filled_in_place(tmp_path, monkeypatch):
    """As a mount point (EBUSY on rename, faked here so that it runs without root): a user's file that appeared while
    the new output was built stops the in-place fill; without it the old output is replaced, manifest included."""
    out = tmp_path / "out"
    with build_beside(out, "tool", False) as new:
        (new / "a.txt").write_text("1")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src) == out:
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OutputDirError, match="user.txt"):
        with build_beside(out, "tool", True) as new:
            (new / "a.txt").write_text("2")
            (out / "user.txt").write_text("mine")  # appears while the new output is built
    assert (out / "user.txt").read_text() == "mine" and (out / "a.txt").read_text() == "1"
    (out / "user.txt").unlink()
    with build_beside(out, "tool", True) as new:
        (new / "sub").mkdir()
        (new / "sub" / "b.txt").write_text("2")
    assert read_manifest(out) == {"tool": "tool", "files": ["sub/b.txt"]} and not (out / "a.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_linked_out_gets_the_results_where_it_points(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with build_beside(tmp_path / "link", "tool", False) as new:
        (new / "a.txt").write_text("1")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "a.txt").read_text() == "1"


@pytest.mark.parametrize("overwrite", [False, True])
def test_what_arrives_while_a_build_runs_is_refused_not_replaced(tmp_path, overwrite):
    """A second run's output or a user's file that lands in --out while this run builds beside it is checked again
    at the swap: the build is refused and what arrived stays (the check at the start alone deleted both)."""
    from utils.output_dir import OutputDirError, build_beside

    out = tmp_path / "out"
    with pytest.raises(OutputDirError, match="user_notes.txt"):
        with build_beside(out, "tool_a", overwrite) as new:
            (new / "a.txt").write_text("a")
            out.mkdir()
            (out / "user_notes.txt").write_text("mine")
    assert sorted(p.name for p in out.iterdir()) == ["user_notes.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "the partial folder is removed"
    if not overwrite:  # another run's complete output (its manifest) is not replaced without --overwrite either
        (out / "user_notes.txt").unlink()
        with pytest.raises(OutputDirError):
            with build_beside(out, "tool_a", False) as first:
                with build_beside(out, "tool_a", False) as second:
                    (second / "b.txt").write_text("b")
                (first / "a.txt").write_text("a")
        assert sorted(p.name for p in out.iterdir()) == [".mofa_manifest.json", "b.txt"]
