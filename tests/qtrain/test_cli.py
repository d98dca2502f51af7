"""The qtrain command, run as a user would: through a subprocess."""

import json
import subprocess
import sys

import pytest

from qkernels.opcount import table4_counts


def qtrain(*args):
    return subprocess.run([sys.executable, "-m", "qtrain.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_version():
    """qtrain --version names the package version."""
    from qtrain import __version__

    out = qtrain("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"qtrain {__version__}"


def test_ops_json_matches_table4_and_kernel_counts():
    """qtrain ops --json reports Table IV's formulas and the kernels' counted operations."""
    out = qtrain("ops", "16x3x4x4", "32x5", "--json")
    assert out.returncode == 0, out.stderr
    reports = json.loads(out.stdout)
    assert [r["shape"] for r in reports] == [[16, 3, 4, 4], [32, 5]]
    conv = reports[0]
    assert conv["counts"]["l1bn_table4"] == table4_counts("L1BN", 256, 3)
    assert conv["counts"]["l1bn_kernel"]["total"]["DIV"] == 3 + 1  # one per channel, one per call
    assert conv["counts"]["l1bn_kernel"]["total"]["SQRT"] == 0
    saving = conv["asic"]["int8"]["saving"]["table4"]
    assert 0 < saving["time"] < 1 and 0 < saving["energy"] < 1


def test_ops_tables_for_people():
    """Without --json, qtrain ops prints Markdown tables naming every counted source."""
    out = qtrain("ops", "8x2x3x3")
    assert out.returncode == 0, out.stderr
    for label in ("L1BN int8 kernel", "L2BN reference", "L1BN Table IV", "L2BN Table IV"):
        assert label in out.stdout


@pytest.mark.parametrize("args, words", [
    (("ops", "12xfoo"), "shape"),
    (("ops", "0x3"), "shape"),
    (("ops", "1x3x1x1"), "more than 1 value per channel"),
    (("frobnicate",), "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(args, words):
    """A user error prints one line naming the problem, exits with 2, and shows no traceback."""
    out = qtrain(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0]
    assert "Traceback" not in out.stderr


def test_no_command_prints_help_and_exits_2():
    """qtrain with nothing to do shows its usage and fails."""
    out = qtrain()
    assert out.returncode == 2 and "usage: qtrain" in out.stderr
