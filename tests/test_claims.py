"""Headline figures in README.md and docs/ are pinned to the run (or script) that produced them.

A paragraph that cites ``docs/runs/<name>/summary.json`` must quote that run's final test error
(two decimals, in %) and its wall time (whole seconds); the run's files must agree with each
other and record the command and the clean commit they came from (each segment's, for a run
resumed across commits). So a figure cannot drift
from its artifact, and the artifact names the code and command that reproduce it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CITE = re.compile(r"docs/runs/([\w.-]+(?:/[\w.-]+)*)/summary\.json")


def cited_runs() -> list[tuple[str, str, str]]:
    """(document, run name, the paragraph citing it) for every citation."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for para in re.split(r"\n\s*\n", doc.read_text()):
            for name in CITE.findall(para):
                found.append((doc.name, name, para))
    return found


def test_the_readme_cites_a_run():
    assert any(doc == "README.md" for doc, _, _ in cited_runs()), \
        "README.md's headline run must cite its docs/runs/<name>/summary.json"


@pytest.mark.parametrize("doc, name, para", cited_runs(),
                         ids=[f"{d}:{n}" for d, n, _ in cited_runs()])
def test_cited_figures_equal_the_run(doc, name, para):
    run = ROOT / "docs" / "runs" / name
    summary = json.loads((run / "summary.json").read_text())
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((run / "config.json").read_text())
    assert len(metrics) == summary["epochs_done"] == summary["epochs"] == config["epochs"]
    assert metrics[-1]["test_error"] == summary["final_test_error"]
    error = f"{100 * summary['final_test_error']:.2f}%"
    assert error in para, f"{doc} cites {name} but does not quote its final test error {error}"
    seconds = f"{round(summary['wall_s'])} s"
    assert seconds in para, f"{doc} cites {name} but does not quote its wall time {seconds}"
    assert summary["command"].startswith("qtrain"), "the run must record its command"
    # a run resumed across commits records each segment's commit (summary "commit" is then
    # None): every one must be clean
    commits = [seg["commit"] for seg in summary.get("provenance") or []] or [summary["commit"]]
    assert all(re.fullmatch(r"[0-9a-f]{40}", c or "") for c in commits), \
        f"{name} must come from clean commits, not {commits!r}"
    for c in commits:
        assert c[:7] in para, f"{doc} must name the commit {c[:7]} of {name}"
    if (ROOT / ".git").exists():
        shallow = subprocess.run(["git", "-C", str(ROOT), "rev-parse",
                                  "--is-shallow-repository"], capture_output=True, text=True)
        if shallow.stdout.strip() == "false":
            for c in commits:
                known = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e",
                                        c + "^{commit}"], capture_output=True)
                assert known.returncode == 0, f"{c} is not in this repository"


def test_worked_example_prints_what_the_docs_show():
    """docs/l1bn-integer.md section 11: the script, run as written, prints the output shown."""
    text = (ROOT / "docs" / "l1bn-integer.md").read_text()
    start = text.index("## 11. Worked example")
    end = text.find("\n## ", start + 1)
    section = text[start:] if end < 0 else text[start:end]
    script = re.search(r"<<'EOF'\n(.*?)\nEOF\n", section, re.S).group(1)
    shown = re.search(r"Output:\n\n```\n(.*?)```", section, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == shown
