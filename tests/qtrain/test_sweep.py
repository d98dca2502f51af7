"""qtrain sweep and qtrain compare (qtrain.sweep) on tiny data: files, resume, skips, peers."""

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qtrain
from qtrain.config import UserError
from qtrain.peers import brevitas_available
from qtrain.sweep import (GRID, RECORD_FIELDS, Record, add_compare_arguments,
                          add_sweep_arguments, run_compare, run_sweep, shard_of, shard_share)

#: Debian's Fashion-MNIST where installed, else the subset shipped in the package: either has
#: the 10 images per class these sweeps train on, so they never skip.
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
DATA = DEBIAN if DEBIAN.is_dir() else Path(qtrain.__file__).parent / "datasets" / \
    "fashion-mnist-subset"
TINY = ["--set", "per_class=10", "--set", "epochs=1", "--set", f"data_dir={DATA}"]


def sweep(capsys, *argv):
    args = add_sweep_arguments(argparse.ArgumentParser()).parse_args([*argv, *TINY])
    rc = run_sweep(args)
    return rc, capsys.readouterr().out


def records(out: Path) -> list[dict]:
    return json.loads((out / "sweep.json").read_text())


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory):
    """bits 4,8 x norm l1 x 2 seeds, two jobs side by side."""
    out = tmp_path_factory.mktemp("sweep")
    args = add_sweep_arguments(argparse.ArgumentParser()).parse_args(
        ["--bits", "4,8", "--norm", "l1", "--backend", "int", "--seeds", "2", "--jobs", "2",
         "--out", str(out), *TINY])
    rc = run_sweep(args)
    return rc, out


def test_sweep_writes_files_with_one_record_per_run(first_sweep):
    rc, out = first_sweep
    assert rc == 0
    recs = records(out)
    assert len(recs) == 4
    assert {(r["bits_w"], r["seed"]) for r in recs} == {(4, 0), (4, 1), (8, 0), (8, 1)}
    for r in recs:
        assert set(RECORD_FIELDS) <= set(r)
        assert r["status"] == "trained" and r["norm"] == "l1" and r["backend"] == "int"
        assert r["bits_w"] == r["bits_a"] == r["bits_g"] == r["bits_e"]
        assert 0 <= r["final_test_error"] <= 1 and 0 <= r["best_test_error"] <= 1
        assert r["wall_s"] > 0
        assert (Path(r["run_dir"]) / "summary.json").is_file()
        assert Path(r["run_dir"]).parent == out / "runs"
    csv_lines = (out / "sweep.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == list(RECORD_FIELDS) and len(csv_lines) == 5
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # atomic writes left no temporaries


def test_sweep_json_objects_are_records(first_sweep):
    """sweep.json holds Record.to_dict() objects: every field, in RECORD_FIELDS order."""
    _, out = first_sweep
    for r in records(out):
        assert list(r) == list(RECORD_FIELDS)
        assert Record.from_dict(r).to_dict() == r


def test_sweep_started_again_skips_finished_runs(first_sweep, capsys):
    _, out = first_sweep
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    assert len(before) == 4
    rc, text = sweep(capsys, "--bits", "4,8", "--norm", "l1", "--backend", "int", "--seeds", "2",
                     "--jobs", "2", "--out", str(out))
    assert rc == 0
    assert sum(ln.startswith("skipped") and "finished before" in ln
               for ln in text.splitlines()) == 4
    assert "0 to train" in text
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing retrained
    recs = records(out)
    assert len(recs) == 4 and {r["status"] for r in recs} == {"finished"}
    assert all(r["final_test_error"] is not None for r in recs)


def test_runs_made_before_a_defaulted_field_existed_are_still_the_sweeps(first_sweep, tmp_path,
                                                                        capsys):
    """A run whose config.json lacks a field added later with a default (``scheme``,
    ``weight_decay``) had that default: started again, the sweep skips it (or would resume
    it) instead of calling it another run."""
    import shutil

    _, out = first_sweep
    old = tmp_path / "old"
    shutil.copytree(out, old)
    for cfg in (old / "runs").glob("*/config.json"):
        saved = json.loads(cfg.read_text())
        del saved["scheme"], saved["weight_decay"]
        cfg.write_text(json.dumps(saved))
    rc, text = sweep(capsys, "--bits", "4,8", "--norm", "l1", "--backend", "int", "--seeds", "2",
                     "--jobs", "2", "--out", str(old))
    assert rc == 0 and "0 to train" in text


def test_impossible_combinations_are_skipped_not_crashed(tmp_path, capsys):
    rc, text = sweep(capsys, "--bits", "8,12", "--norm", "l2", "--backend", "int",
                     "--out", str(tmp_path))
    assert rc == 0
    lines = [ln for ln in text.splitlines() if ln.startswith("skipped")]
    assert len(lines) == 2 and all("L1 batch norm only" in ln for ln in lines)
    rc, text = sweep(capsys, "--bits", "8", "--bits-w", "32", "--norm", "l1", "--backend",
                     "int", "--out", str(tmp_path / "b"))
    assert rc == 0 and "needs integer W, A, G and E" in text
    recs = records(tmp_path / "b")
    assert len(recs) == 1 and recs[0]["status"] == "skipped" and recs[0]["reason"]
    assert not list((tmp_path / "b" / "runs").iterdir())  # nothing was trained
    assert (tmp_path / "b" / "sweep.png").is_file()


def test_default_backend_runs_l2_with_emulate(tmp_path, capsys):
    """Without --backend the recipe's int backend runs L1BN and emulate runs L2BN (which the
    int backend cannot), so `--norm l1,l2` compares the two without skipped runs."""
    rc, text = sweep(capsys, "--bits", "6", "--norm", "l1,l2", "--out", str(tmp_path))
    assert rc == 0, text
    assert sorted((r["norm"], r["backend"], r["status"]) for r in records(tmp_path)) == [
        ("l1", "int", "trained"), ("l2", "emulate", "trained")]


def test_per_class_sweep_varies_only_that_class(tmp_path, capsys):
    rc, text = sweep(capsys, "--bits-e", "4,8", "--norm", "l1",
                     "--out", str(tmp_path))
    assert rc == 0, text
    recs = records(tmp_path)
    assert sorted(r["bits_e"] for r in recs) == [4, 8]
    assert {(r["bits_w"], r["bits_a"], r["bits_g"]) for r in recs} == {(8, 8, 8)}  # recipe's
    assert {r["status"] for r in recs} == {"trained"}
    assert text.count("final test error") == 2  # a progress line per finished run


def test_one_at_a_time_varies_each_class_with_the_others_fixed(tmp_path, capsys):
    rc, text = sweep(capsys, "--one-at-a-time", "--bits", "6", "--bits-w", "4",
                     "--bits-e", "4", "--norm", "l1", "--out", str(tmp_path))
    assert rc == 0, text
    recs = records(tmp_path)
    widths = sorted((r["bits_w"], r["bits_a"], r["bits_g"], r["bits_e"], r["varied"])
                    for r in recs)
    # W4 and E4 with the rest at 6, and the all-6 reference run once (shared by both lines)
    assert widths == [(4, 6, 6, 6, "w"), (6, 6, 6, 4, "e"), (6, 6, 6, 6, None)]
    assert {r["status"] for r in recs} == {"trained"}
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "varied" in (tmp_path / "sweep.csv").read_text().splitlines()[0]


def test_bad_lists_are_user_errors(tmp_path):
    parser = add_sweep_arguments(argparse.ArgumentParser())
    for argv in (["--bits", "4,x"], ["--bits", "1"], ["--norm", "l3"], ["--seeds", "0"],
                 ["--jobs", "0"], ["--one-at-a-time", "--bits", "4"],
                 ["--one-at-a-time", "--bits", "4,6", "--bits-w", "2"]):
        with pytest.raises(UserError) as err:
            run_sweep(parser.parse_args([*argv, "--out", str(tmp_path)]))
        assert "\n" not in str(err.value)


# --- shards: one sweep split across machines ----------------------------------------------------

@pytest.mark.parametrize("shards", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("size", [0, 1, 2, 5, 12, 31])
def test_shards_cover_the_grid_once(size, shards):
    """Every grid point is in exactly one of N shards, shares differ in size by at most one, and
    a point's shard depends only on its index and N."""
    points = [f"p{i}" for i in range(size)]
    shares = [shard_share(points, k, shards) for k in range(1, shards + 1)]
    assert sorted(p for share in shares for p in share) == sorted(points)
    assert sum(len(share) for share in shares) == size  # disjoint
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for k, share in enumerate(shares, 1):
        assert all(shard_of(points.index(p), shards) == k for p in share)
        assert share == [p for p in points if p in share]  # canonical order kept


@pytest.mark.parametrize("text", ["0/2", "3/2", "x", "1/0", "1", "2/x", "-1/2", "1/2/3"])
def test_bad_shards_are_user_errors(tmp_path, text):
    parser = add_sweep_arguments(argparse.ArgumentParser())
    with pytest.raises(UserError, match=r"--shard .* is not K/N with K in 1\.\.N") as err:
        run_sweep(parser.parse_args(["--bits", "8", f"--shard={text}", "--out",
                                     str(tmp_path / "s")]))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "s").exists()


def test_shards_train_their_shares_and_the_last_writes_the_summary(tmp_path, capsys):
    """Shard 1/2 trains points 1 and 3 of three and writes no summary (one line says what is
    missing); --collect then refuses, naming the missing point; shard 2/2 trains the rest and
    writes sweep.json, .csv and .png; --collect (with the arguments, or from the saved grid
    alone) writes the same files again, training nothing."""
    out = tmp_path / "sweep"
    grid = ["--bits", "4,6,8", "--norm", "l1", "--backend", "int", "--out", str(out)]
    rc, text = sweep(capsys, *grid, "--shard", "1/2")
    assert rc == 0, text
    assert "sweep: shard 1/2: 2 of 3 combinations, 2 to train" in text
    assert sorted(p.name for p in (out / "runs").iterdir()) == [
        "l1-int-W4A4G4E4-s0", "l1-int-W8A8G8E8-s0"]
    assert not (out / "sweep.json").exists()
    assert text.splitlines()[-1] == (
        f"sweep: 1 of 3 grid points are not finished yet; the shard that finishes the grid "
        f"writes {out / 'sweep.json'}, or write it then with qtrain sweep --out {out} --collect")

    collect = add_sweep_arguments(argparse.ArgumentParser()).parse_args(
        ["--out", str(out), "--collect"])
    with pytest.raises(UserError, match=r"1 of 3 grid points are not finished "
                                        r"\(l1-int-W6A6G6E6-s0\)") as err:
        run_sweep(collect)
    assert "\n" not in str(err.value) and not (out / "sweep.json").exists()

    rc, text = sweep(capsys, *grid, "--shard", "2/2")
    assert rc == 0, text
    assert "1 to train" in text and "sweep complete: all 3 grid points done" in text
    recs = records(out)
    assert [(r["bits_w"], r["status"]) for r in recs] == [(4, "finished"), (6, "finished"),
                                                          (8, "finished")]
    assert all(r["final_test_error"] is not None for r in recs)
    written = {name: (out / name).read_bytes() for name in ("sweep.json", "sweep.csv")}
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    for argv in (collect, None):  # from sweep-grid.json alone, and with the same arguments
        for name in written:
            (out / name).unlink()
        if argv is None:
            rc, text = sweep(capsys, *grid, "--collect")
        else:
            rc, text = run_sweep(argv), capsys.readouterr().out
        assert rc == 0 and "sweep collected: 3 runs finished" in text, text
        assert {name: (out / name).read_bytes() for name in written} == written

    rc, text = sweep(capsys, *grid, "--shard", "1/2")  # again: nothing to train, grid complete
    assert rc == 0 and "0 to train" in text and "sweep complete" in text
    saved = json.loads((out / GRID).read_text())
    assert saved["grid"]["bits"] == "4,6,8" and saved["base"]["per_class"] == 10


def test_collect_without_a_saved_grid_asks_for_the_arguments(tmp_path):
    parser = add_sweep_arguments(argparse.ArgumentParser())
    with pytest.raises(UserError, match="give the sweep's arguments .* with --collect"):
        run_sweep(parser.parse_args(["--out", str(tmp_path), "--collect"]))
    with pytest.raises(UserError, match="takes no --shard"):
        run_sweep(parser.parse_args(["--out", str(tmp_path), "--collect", "--shard", "1/2"]))


def test_compare_writes_table_json_and_curves(tmp_path, capsys):
    args = add_compare_arguments(argparse.ArgumentParser()).parse_args(
        ["--out", str(tmp_path), *TINY])
    rc = run_compare(args)
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads((tmp_path / "compare.json").read_text())
    methods = {m["method"]: m for m in report["methods"]}
    assert {"int8-L1BN", "float-L1BN", "float-L2BN"} <= set(methods)
    expected = ["int8-L1BN", "float-L1BN", "float-L2BN"]
    if brevitas_available():
        expected.append("brevitas-W8A8")
    else:
        assert methods["brevitas-W8A8"]["status"] == "skipped"
        assert "skipped brevitas-W8A8: brevitas is not installed" in text
    for name in expected:
        m = methods[name]
        assert m["status"] == "ok" and m["seeds_done"] == 1
        assert 0 <= m["final_test_error_mean"] <= 1 and m["final_test_error_std"] == 0
        assert m["curve_epochs"] == [1] and len(m["curve_test_error_mean"]) == 1
        assert m["epoch_s_mean"] > 0
        assert name in text  # a table row
    # the runs used the same seed and data subset
    cfgs = [json.loads((Path(m["runs"][0]["run_dir"]) / "config.json").read_text())
            for m in methods.values() if m["runs"]]
    assert {(c["seed"], c["per_class"]) for c in cfgs} == {(0, 10)}
    assert "± " in text and "epoch s" in text
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_methods_selects_and_rerun_adds_the_rest(tmp_path, capsys):
    parser = add_compare_arguments(argparse.ArgumentParser())
    rc = run_compare(parser.parse_args(["--methods", "float-l2", "--out", str(tmp_path), *TINY]))
    text = capsys.readouterr().out
    assert rc == 0, text
    report = json.loads((tmp_path / "compare.json").read_text())
    assert [m["method"] for m in report["methods"]] == ["float-L2BN"]
    assert report["methods_chosen"] == ["float-l2"]
    rc = run_compare(parser.parse_args(["--methods", "float-l1,float-l2", "--out", str(tmp_path),
                                        *TINY]))
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "skipped float-L2BN seed 0: finished before" in text
    assert "1 run(s) to train" in text
    report = json.loads((tmp_path / "compare.json").read_text())
    assert [m["method"] for m in report["methods"]] == ["float-L1BN", "float-L2BN"]


def test_compare_methods_rejects_unknown_names(tmp_path):
    parser = add_compare_arguments(argparse.ArgumentParser())
    with pytest.raises(UserError, match="--methods 'int,l3'.*choose from int, float-l1"):
        run_compare(parser.parse_args(["--methods", "int,l3", "--out", str(tmp_path), *TINY]))


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux-only")
def test_pool_children_stop_when_the_parent_is_killed(tmp_path):
    """A killed sweep/compare leaves no orphan process training on (it would race the next
    sweep for the same run directories)."""
    pid_file = tmp_path / "child.pid"
    script = (
        "import multiprocessing, os, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from qtrain.sweep.jobs import _init_child\n"
        "def job(path):\n"
        "    open(path, 'w').write(str(os.getpid()))\n"
        "    time.sleep(120)\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    with ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_child,\n"
        f"                             initargs=(1,)) as pool:\n"
        f"        pool.submit(job, {str(pid_file)!r}).result()\n")
    (tmp_path / "parent.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], cwd=tmp_path,
                              env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    deadline = time.time() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and parent.poll() is None, "the child never started"
        time.sleep(0.2)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the pool's child outlived its killed parent")


def test_device_goes_to_the_runs_that_can_use_one(tmp_path):
    """--device puts float and emulate runs there; the int backend's quantized runs stay on the
    CPU (so `qtrain compare --device cuda` trains its integer row beside the GPU's)."""
    from qtrain.config import load_recipe
    from qtrain.sweep.args import on_device
    from qtrain.sweep.sweep import plan

    base = load_recipe("lenet5-fmnist")
    assert on_device(base, None) is base
    assert on_device(base, "cuda").device == "cpu"  # int8, int backend
    assert on_device(dataclasses.replace(base, backend="emulate"), "cuda").device == "cuda"
    args = add_sweep_arguments(argparse.ArgumentParser()).parse_args(
        ["--bits", "8,32", "--norm", "l1,l2", "--backend", "int,emulate", "--device", "cuda",
         "--out", str(tmp_path), *TINY])
    import torch

    seen = set()
    for p in plan(base, args, tmp_path / "runs"):
        name = p.record.name
        if name is None:  # int x l2: cannot run anywhere
            continue
        seen.add("int" if "-int-" in name else "other")
        if "-int-" in name:
            assert p.job is not None and p.job.config.device == "cpu", name
        elif torch.cuda.is_available():
            assert p.job is not None and p.job.config.device == "cuda", name
        else:  # planned for cuda, and skipped with the reason
            assert p.job is None and "device cuda is not available" in p.record.reason, name
    assert seen == {"int", "other"}
