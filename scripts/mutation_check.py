"""Put known biases back into the real per-channel functions and check that the tests fail.

Each mutation edits one line of qkernels (a floor for round half up, a rounding constant or a
shift off by one bit, a threshold that ignores an integer mean, ...) in a throwaway git
worktree of HEAD, runs the L1BN test files there with a fresh Numba cache, and reports how many
tests failed. A mutation that no test catches is a hole in the evidence: the script exits 1.

    python scripts/mutation_check.py            # all mutations (about 30 minutes on 2 cores)
    python scripts/mutation_check.py narrow_floor wide_floor

This is how the claim "the checks fail when the bias is put into the real function"
(tests/qkernels/test_l1bn_exact.py) was verified; it is too slow for CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the L1BN test files (one suite for int8, int16 and mixed widths)
TESTS = ["tests/qkernels/test_l1bn_exact.py", "tests/qkernels/test_l1bn.py"]

#: name -> (file, the exact original text, its biased replacement, tests to run)
MUTATIONS = {
    "narrow_floor": (  # the example: round half up -> floor in the narrow affine offset
        "qkernels/fixedpoint.py", "        b[j] = dy_to_fixed(cm[j], ce[j], sh) + half\n",
        "        b[j] = dy_to_fixed(cm[j], ce[j], sh)\n", TESTS),
    "wide_floor": ("qkernels/fixedpoint.py", "        b[j] = of - kf * b1 + half",
                   "        b[j] = of - kf * b1", TESTS),
    "centred_wide_floor": ("qkernels/fixedpoint.py",
                           "            h, lw = wide_add(h, lw, *wide_from(half))\n",
                           "            h, lw = h, lw\n", TESTS),
    "dy_to_fixed_floor": (
        "qkernels/fixedpoint.py", "    return round_shift(m, -(e + sh))",
        "    return m >> np.int64(-(e + sh)) if e + sh < 0 else m << np.int64(e + sh)", TESTS),
    "recip_shift": ("qkernels/fixedpoint.py",
                    "    r = (np.int64(1) << np.int64(62)) // dm",
                    "    r = (np.int64(1) << np.int64(61)) // dm", TESTS),
    "momentum_floor": (
        "qkernels/l1bn_spec.py",
        "    return saturate(old + round_shift(momentum_q * delta, MOMENTUM_BITS), lim)",
        "    return saturate(old + ((momentum_q * delta) >> MOMENTUM_BITS), lim)", TESTS),
    "thresholds_int_mean": ("qkernels/l1bn_spec.py", "    t_lo = t - 1 if m * t == s else t",
                            "    t_lo = t", TESTS),
    "inference_mu_one_low": (
        "qkernels/l1bn_spec.py",
        "        mu_f = saturate(dy_to_fixed(mum, mue, f), np.int64(1) << np.int64(30))",
        "        mu_f = saturate(dy_to_fixed(mum, mue, f) - 1, np.int64(1) << np.int64(30))",
        TESTS),
}


def _mutated(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise SystemExit(f"mutation target found {text.count(old)} times: {old[:60]!r}")
    return text.replace(old, new)


def run(name: str) -> str:
    """The pytest summary line of the tests run with mutation ``name`` applied."""
    path, old, new, tests = MUTATIONS[name]
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(tree),
                        "HEAD"], check=True)
        try:
            target = tree / path
            target.write_text(_mutated(target.read_text(), old, new))
            out = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                cwd=tree, capture_output=True, text=True,
                env={**os.environ, "PYTHONPATH": str(tree),
                     "NUMBA_CACHE_DIR": str(Path(tmp) / "numba")})
            return out.stdout.strip().splitlines()[-1]
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                           check=False)


def main(names: list[str]) -> int:
    unknown = sorted(set(names) - set(MUTATIONS))
    if unknown:
        print(f"unknown mutation(s) {unknown}; choose from {sorted(MUTATIONS)}", file=sys.stderr)
        return 2
    survived = []
    for name in names or list(MUTATIONS):
        line = run(name)
        print(f"{name}: {line}", flush=True)
        if "failed" not in line:
            survived.append(name)
    if survived:
        print(f"not caught by any test: {survived}", file=sys.stderr)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
