# ruff: noqa: F811  (the fixtures finished and image_root are imported from test_reliability, then requested)
"""Issue 21: the data tools protect the user's files, one run per folder, a real full disk, signals under wrappers.

Failures run the command-line entry point in-process (``fails``: exit 2, one ``error:`` line, no traceback) and
compare ``snapshot``s: nothing of the user's changed. The full-disk tests mount a real tmpfs (skipped where mounting
is not permitted); the lock tests use a second, real process.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import Step1_Pretrain_MoFA as step1
import Step2_UNet_trainset_generation as step2
from tests.test_reliability import FAST, clone, common, csv_rows, fails, finished, image_root, snapshot  # noqa: F401
# (finished, image_root: the module fixtures of test_reliability, shared so the Step-1 run is trained once per module)
from utils import demo_pipeline
from utils.cli import repo_root
from utils.data.image_io import write_image_rgb
from utils.data.unet_trainset import check_unique
from utils.errors import DataError
from utils.landmarks_csv import LandmarkCSVError, read_landmarks_csv
from utils.output_dir import MANIFEST_NAME
from utils.prepare import detect_landmarks as dl
from utils.synthetic import demo_face_model, faces
from utils.training import run_folder
from utils.training.checkpoint import CheckpointWriteError, load_checkpoint, save_training_state
from utils.training.guards import StopFlag

REPO = repo_root()


def siblings(folder: Path) -> list[str]:
    """Temporary folders a build left beside ``folder``."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


# ----- 1. detect_landmarks ------------------------------------------------------------------------------------------

@pytest.fixture
def fake_dlib(monkeypatch):
    """detect_landmarks without dlib: every image has a face with the template's five points at the centre."""
    def landmarks(image, *models):
        h, w = image.shape[:2]
        points = np.tile(np.array([[w / 2, h / 2]], np.float32), (68, 1))
        points[[36, 39]] = [w * 0.35, h * 0.4]
        points[[42, 45]] = [w * 0.65, h * 0.4]
        points[30] = [w * 0.5, h * 0.55]
        points[48], points[54] = [w * 0.38, h * 0.7], [w * 0.62, h * 0.7]
        return points

    monkeypatch.setattr(dl, "load_dlib", lambda: (None, None))
    monkeypatch.setattr(dl, "detect_landmarks68", landmarks)


def _raw(folder: Path, count: int) -> Path:
    for i in range(count):
        write_image_rgb(folder / f"p{i}.png", np.full((40, 40, 3), 40 * i, np.uint8))
    return folder


def interrupted_at_second_call(real):
    """``real``, except that its second call raises KeyboardInterrupt (a Ctrl-C half-way through a build)."""
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return interrupted


def test_detect_landmarks_refuses_an_image_root_it_did_not_write(tmp_path, capsys, fake_dlib):
    raw = _raw(tmp_path / "raw", 1)
    user = tmp_path / "user"
    write_image_rgb(user / "Dataset" / "00000.png", np.zeros((8, 8, 3), np.uint8))
    (user / "train_landmarks_3D.csv").write_text("00000.png," + ",".join(["1"] * 136) + "\n")
    before = snapshot(user)
    for extra in ([], ["--overwrite"]):
        line = fails(capsys, dl.main, ["--images", str(raw), "--out", str(user), "--size", "32", *extra])
        assert "did not write" in line and "00000.png" in line
    assert snapshot(user) == before and siblings(user) == []


def test_detect_landmarks_overwrite_builds_beside_and_swaps_in(tmp_path, capsys, fake_dlib, monkeypatch):
    out = tmp_path / "root"
    assert dl.main(["--images", str(_raw(tmp_path / "raw", 3)), "--out", str(out), "--size", "32"]) == 0
    assert json.loads((out / MANIFEST_NAME).read_text())["tool"] == dl.TOOL
    line = fails(capsys, dl.main, ["--images", str(tmp_path / "raw"), "--out", str(out), "--size", "32"])
    assert "--overwrite" in line
    before = snapshot(out)
    # interrupted half-way through a replacement: the old image root is untouched, nothing is left beside it
    real = dl.process_image
    monkeypatch.setattr(dl, "process_image", interrupted_at_second_call(real))
    with pytest.raises(KeyboardInterrupt):
        dl.main(["--images", str(_raw(tmp_path / "raw2", 2)), "--out", str(out), "--size", "48", "--overwrite"])
    assert snapshot(out) == before and siblings(out) == []
    monkeypatch.setattr(dl, "process_image", real)
    assert dl.main(["--images", str(tmp_path / "raw2"), "--out", str(out), "--size", "48", "--overwrite"]) == 0
    assert len(read_landmarks_csv(out / "all_landmarks_3D.csv")) == 2 and not (out / "Dataset" / "p2.png").exists()


@pytest.mark.parametrize("extra", [["--seed", "-1"], ["--seed", "100000000000000"], ["--split", "0.5,nan,0.5"]])
def test_detect_landmarks_checks_every_flag_before_any_work(tmp_path, capsys, monkeypatch, extra):
    monkeypatch.setattr(dl, "load_dlib", lambda: pytest.fail("the flags were not checked first"))
    line = fails(capsys, dl.main, ["--images", str(_raw(tmp_path / "raw", 1)), "--out", str(tmp_path / "o"), *extra])
    assert extra[0] in line and not (tmp_path / "o").exists()


# ----- 2. synthetic faces ------------------------------------------------------------------------------------------

def test_faces_overwrite_checks_flags_first_and_swaps_in_a_complete_set(tmp_path, capsys, monkeypatch, demo_bfm_h5):
    out = tmp_path / "set"
    argv = ["--bfm", str(demo_bfm_h5), "--out", str(out), "--num", "3", "--size", "32", "--batch", "1"]
    assert faces.main(argv) == 0
    before = snapshot(out)
    for seed in ("-1", "100000000000000"):
        assert "--seed" in fails(capsys, faces.main, argv + ["--seed", seed, "--overwrite"])
    assert snapshot(out) == before
    monkeypatch.setattr(faces, "generate_batch", interrupted_at_second_call(faces.generate_batch))
    with pytest.raises(KeyboardInterrupt):
        faces.main(argv[:-4] + ["--size", "48", "--batch", "1", "--overwrite"])
    assert snapshot(out) == before and siblings(out) == []


def test_faces_overwrite_never_deletes_images_without_a_manifest(tmp_path, capsys, demo_bfm_h5):
    user = tmp_path / "mine"
    write_image_rgb(user / "Dataset" / "00000.png", np.zeros((8, 8, 3), np.uint8))
    before = snapshot(user)
    line = fails(capsys, faces.main, ["--bfm", str(demo_bfm_h5), "--out", str(user), "--num", "1", "--size", "32",
                                      "--overwrite"])
    assert "did not write" in line and "Dataset/00000.png" in line and snapshot(user) == before


# ----- 3. one run per folder ---------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from utils.training import run_folder
    run_folder.hold_lock(Path(sys.argv[1]), create=True)
    run_folder.write_holder(Path(sys.argv[1]))
    print("locked", flush=True)
    sys.stdin.readline()
""")


@pytest.fixture
def holder():
    """Start a second process that locks a run folder until the test ends: ``holder(folder) -> Popen``."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_live_run_is_refused_even_with_resume_or_overwrite(tmp_path, capsys, holder, finished, image_root,
                                                             demo_bfm_h5):
    save = clone(finished, tmp_path / "save")
    run = save / "pretrain_mofa"
    proc = holder(run)
    before = snapshot(save)
    argv = common(image_root, demo_bfm_h5, save) + FAST + ["--max_iters", "6"]
    for extra in (["--resume"], ["--overwrite"]):
        line = fails(capsys, step1.main, argv + extra)
        assert f"in use by another run (pid {proc.pid} on host " in line and "started" in line, line
    assert snapshot(save) == before
    # a fresh run into a new folder where the other process got first: refused at the claim
    new = tmp_path / "new"
    holder(new / "pretrain_mofa")
    line = fails(capsys, step1.main, common(image_root, demo_bfm_h5, new) + FAST + ["--max_iters", "1"])
    assert "in use by another run" in line
    assert [p.name for p in (new / "pretrain_mofa").iterdir()] == [run_folder.LOCK_NAME]


def test_the_lock_is_released_when_the_run_ends(tmp_path, image_root, demo_bfm_h5):
    save = tmp_path / "save"
    assert step1.main(common(image_root, demo_bfm_h5, save) + FAST + ["--max_iters", "1"]) == 0
    probe = subprocess.run([sys.executable, "-c", HOLDER, str(save / "pretrain_mofa")], cwd=REPO, input="\n",
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0 and probe.stdout.strip() == "locked", probe.stderr[-2000:]


# ----- 4. a real full disk -----------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(bytes) -> folder`` on a real tmpfs of that size (skipped where mount is not permitted)."""
    mounted = []

    def mount(size: int) -> Path:
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 4096 * 4096}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, small_disk, finished, image_root,
                                                               demo_bfm_h5):
    """torch.save reports a full disk as RuntimeError ('unexpected pos'), not OSError: still one line, and the
    checkpoint that fitted stays loadable."""
    size = (finished / "pretrain_mofa" / "ckpt_000002.pt").stat().st_size
    disk = small_disk(int(size * 1.6))
    line = fails(capsys, step1.main, common(image_root, demo_bfm_h5, disk / "save") + FAST +
                 ["--max_iters", "4", "--ckpt_every", "2"])
    run = disk / "save" / "pretrain_mofa"
    assert "cannot write checkpoint" in line and "ckpt_000004.pt" in line and "MiB free" in line, line
    assert load_checkpoint(run / "latest.pt")["step"] == 2 and not (run / "ckpt_000004.pt").exists()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_while_writing_latest_or_config_names_what_was_written(tmp_path, small_disk):
    disk = small_disk(64 * 1024)
    net = torch.nn.Linear(100, 100)  # 40 kB of weights: fits once
    save_training_state(disk, 1, {"net": net})
    with pytest.raises(CheckpointWriteError) as info:
        save_training_state(disk, 2, {"net": net})
    assert "ckpt_000002.pt" in str(info.value) and "\n" not in str(info.value)
    assert load_checkpoint(disk / "latest.pt")["step"] == 1 and not (disk / "ckpt_000002.pt").exists()


# ----- 5. seeds ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", ["100000000000000", "-1"])
def test_a_seed_out_of_range_is_refused_before_the_folder_is_claimed(tmp_path, capsys, seed, finished, image_root,
                                                                     demo_bfm_h5):
    save = clone(finished, tmp_path / "save")
    before = snapshot(save)
    line = fails(capsys, step1.main, common(image_root, demo_bfm_h5, save) + FAST + ["--seed", seed, "--overwrite",
                                                                                   "--max_iters", "1"])
    assert "--seed" in line and snapshot(save) == before


def test_demo_face_model_checks_its_seed_and_refuses_an_existing_file(tmp_path, capsys, monkeypatch):
    licensed = tmp_path / "basel_3DMM" / "model2017-1_bfm_nomouth.h5"
    licensed.parent.mkdir()
    licensed.write_bytes(b"the licensed model")
    argv = ["--out", str(licensed), "--target_vertices", "600"]
    assert "--seed" in fails(capsys, demo_face_model.main, argv + ["--seed", "-1", "--overwrite"])
    line = fails(capsys, demo_face_model.main, argv)
    assert "exists" in line and "--overwrite" in line and licensed.read_bytes() == b"the licensed model"
    # written atomically: an interrupted --overwrite leaves the old file and no temporary file
    real = demo_face_model.build_demo_face_model

    class Interrupting(dict):
        def items(self):
            yield from list(super().items())[:2]
            raise KeyboardInterrupt

    monkeypatch.setattr(demo_face_model, "build_demo_face_model", lambda *a, **k: Interrupting(real(*a, **k)))
    with pytest.raises(KeyboardInterrupt):
        demo_face_model.main(argv + ["--overwrite"])
    assert licensed.read_bytes() == b"the licensed model" and os.listdir(licensed.parent) == [licensed.name]
    monkeypatch.setattr(demo_face_model, "build_demo_face_model", real)
    assert demo_face_model.main(argv + ["--overwrite"]) == 0 and licensed.read_bytes()[:4] == b"\x89HDF"


# ----- 7. the demo's data ------------------------------------------------------------------------------------------

def test_the_demo_refuses_data_of_another_profile(tmp_path, capsys, demo_bfm_h5):
    data = tmp_path / "data"
    data.mkdir()
    (data / "synthetic_config.json").write_text(json.dumps({"num": 24, "size": 64, "seed": 0, "occlusion": "mixed",
                                                            "appearance": "mixed"}))
    (data / "ground_truth.csv").write_text("filename\n")
    argv = ["--profile", "quick", "--out", str(tmp_path / "out"), "--data", str(data), "--bfm", str(demo_bfm_h5),
            "--device", "cpu"]
    line = fails(capsys, demo_pipeline.main, argv)
    assert "num 24 (needs 60)" in line and "size 64 (needs 32)" in line and not (tmp_path / "out" / "MoFA_UNet_Save"
                                                                                 ).exists()
    (data / "synthetic_config.json").unlink()
    assert "synthetic_config.json" in fails(capsys, demo_pipeline.main, argv)
    with pytest.raises(SystemExit):
        demo_pipeline.parse_args(["--quick"])  # the duplicate of --profile quick is gone
    assert demo_pipeline.parse_args(["--profile", "full"]).data == str(REPO / "demo_data_full")


# ----- 8. signals --------------------------------------------------------------------------------------------------

def test_a_second_signal_repeats_the_notice_and_a_third_aborts(caplog):
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert caplog.text.count("interrupt received") == 2


CHILD = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    out = Path(sys.argv[1])
    got = []
    signal.signal(signal.SIGINT, lambda *a: got.append(1))
    out.with_suffix(".ready").write_text("")
    while not got:
        time.sleep(0.01)
    time.sleep(0.5)  # 'writing a checkpoint': the demo must wait for it
    out.write_text(str(len(got)))
    sys.exit(130)
""")


def test_the_demo_forwards_one_sigint_and_waits_for_the_step(tmp_path):
    marker = tmp_path / "child.txt"

    def interrupt_when_ready():
        deadline = time.time() + 60
        while not marker.with_suffix(".ready").exists() and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_when_ready, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        demo_pipeline.run(["-c", CHILD, str(marker)])
    assert marker.read_text() == "1"  # it got one SIGINT and was not killed before it finished


@pytest.mark.parametrize("script", ["Step2_UNet_trainset_generation.py", "reconstruct.py",
                                    "tests/evaluate_segmentation.py"])
def test_ctrl_c_while_a_command_imports_is_one_line(tmp_path, script):
    proc = subprocess.Popen([sys.executable, script, "--help"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # python is up, torch (seconds) is being imported
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip() == "error: interrupted", err[-2000:]


# ----- 9. smaller defects ------------------------------------------------------------------------------------------

def test_backslash_and_slash_names_are_not_merged():
    check_unique([("a.csv", "./x.png"), ("b.csv", "x.png")])  # the same file twice is fine
    with pytest.raises(DataError, match="different files"):
        check_unique([("a.csv", "sub\\x.png"), ("a.csv", "sub/x.png")])


def test_a_non_utf8_csv_names_the_line_and_spaces_in_names_are_kept(tmp_path):
    row = ",".join(["1"] * 136)
    bad = tmp_path / "bad.csv"
    bad.write_bytes(f"a.png,{row}\nb.png,{row}\nc.png,{row}\n".encode() + b"d\xff.png," + row.encode() + b"\n")
    with pytest.raises(LandmarkCSVError, match="bad.csv line 4: not UTF-8"):
        read_landmarks_csv(bad)
    (tmp_path / "Dataset").mkdir()
    (tmp_path / "Dataset" / " a.png").write_bytes(b"x")
    (tmp_path / "Dataset" / "b.png").write_bytes(b"x")
    good = tmp_path / "good.csv"
    good.write_text(f" a.png,{row}\nb.png ,{row}\n")
    assert [name for name, _ in read_landmarks_csv(good, tmp_path / "Dataset")] == [" a.png", "b.png"]
    good.write_text(f"c.png ,{row}\n")
    with pytest.raises(LandmarkCSVError, match="'c.png '"):
        read_landmarks_csv(good, tmp_path / "Dataset")


@pytest.mark.parametrize("name", ["ABS", "../x.png"])
def test_step1_refuses_image_paths_that_leave_the_image_root(tmp_path, capsys, image_root, demo_bfm_h5, name):
    root = tmp_path / "root"
    shutil.copytree(image_root, root)
    rows = csv_rows(root / "train_landmarks_3D.csv")
    rows[2][0] = str(root / "Dataset" / rows[2][0]) if name == "ABS" else name
    with open(root / "train_landmarks_3D.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    line = fails(capsys, step1.main, common(root, demo_bfm_h5, tmp_path / "save") + FAST + ["--max_iters", "1"])
    assert "train_landmarks_3D.csv line 3" in line and ("absolute" if name == "ABS" else "'..'") in line, line


def test_a_corrupt_latest_names_the_intact_checkpoint_and_text_is_no_checkpoint(tmp_path, capsys, finished,
                                                                                 image_root, demo_bfm_h5):
    save = clone(finished, tmp_path / "save")
    latest = save / "pretrain_mofa" / "latest.pt"
    data = latest.read_bytes()
    latest.unlink()  # a new file: ckpt_000004.pt (its hard link before) stays intact
    latest.write_bytes(data[: len(data) // 2])
    line = fails(capsys, step1.main, common(image_root, demo_bfm_h5, save) + FAST + ["--resume", "--max_iters", "6"])
    assert "ckpt_000004.pt beside it (step 4) is intact" in line and "copy it to latest.pt" in line, line
    text = tmp_path / "notes.pt"
    text.write_text("just some notes\n")
    line = fails(capsys, step2.main, common(image_root, demo_bfm_h5, tmp_path / "s2") + ["--pretrained_MoFA",
                                                                                          str(text)])
    assert "not a PyTorch checkpoint" in line and "weights_only" not in line, line


def test_step2_overwrite_removes_only_what_its_manifest_lists(tmp_path, capsys, finished, image_root, demo_bfm_h5):
    save = clone(finished, tmp_path / "save")
    argv = common(image_root, demo_bfm_h5, save) + ["--batch_size", "16"]
    assert step2.main(argv) == 0
    out = save / "UNet_trainset"
    mine = [out / "notes_mask.png", out / "old" / "x.png_org.png", out / "holiday_list.csv"]
    for path in mine:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"the user's")
    listed = [row[0] for row in csv_rows(out / "train_list.csv")[1:]]
    assert step2.main(argv + ["--overwrite", "--splits", "train"]) == 0
    assert all(path.read_bytes() == b"the user's" for path in mine)
    assert not (out / "val_list.csv").exists() and [row[0] for row in csv_rows(out / "train_list.csv")[1:]] == listed
    # a user's file where this run would write is refused, not replaced
    (out / MANIFEST_NAME).unlink()
    before = snapshot(save)
    line = fails(capsys, step2.main, argv + ["--overwrite"])
    assert "did not record writing" in line and snapshot(save) == before


WORKER = textwrap.dedent("""
    import signal, sys, time
    from pathlib import Path
    got = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *a: got.append(1))
    Path(sys.argv[1]).write_text("")
    while not got:
        time.sleep(0.01)
    time.sleep(0.3)  # 'writing a checkpoint'
    print("worker stopped", file=sys.stderr)
    sys.exit(130)
""")


def test_one_sigint_to_the_torchrun_launcher_is_exit_130_and_one_line(tmp_path):
    script, ready = tmp_path / "worker.py", tmp_path / "ready"
    script.write_text(WORKER)
    proc = subprocess.Popen([sys.executable, "-m", "utils.training.distributed", "--standalone", "--nproc_per_node=1",
                             str(script), str(ready)], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while not ready.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # what a Ctrl-C at the terminal does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines() == ["worker stopped", "error: interrupted"], err[-3000:]
