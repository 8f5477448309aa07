"""Repository hygiene: lint configuration and targets, the benchmark target, and the reproduction page the
code cites (docs/reproduction.md)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPRO = ROOT / "docs" / "reproduction.md"
# "docs/reproduction.md §3", "docs/reproduction.md §2, §5, §7", "reproduction §4"
CITATION = re.compile(r"reproduction(?:\.md)? (§\d+(?:, §\d+)*)")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    paths = []
    for name in out.splitlines():
        path = ROOT / name
        if path.suffix in {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt"} and path.is_file() \
                and path != Path(__file__).resolve():
            paths.append(path)
    return paths


def test_every_reproduction_citation_names_an_existing_section():
    assert REPRO.is_file(), "docs/reproduction.md is missing"
    sections = {int(m) for m in re.findall(r"^## (\d+)\. ", REPRO.read_text(encoding="utf-8"), re.MULTILINE)}
    assert sections == set(range(1, 8)), f"docs/reproduction.md sections {sorted(sections)}"
    cited, broken, outside = 0, [], []
    for path in _tracked_text_files():
        for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            where = f"{path.relative_to(ROOT)}:{lineno}"
            if "facts §" in line or "reg2rg-facts" in line:
                outside.append(where)        # the old page outside the repository
            for group in CITATION.findall(line):
                for number in re.findall(r"§(\d+)", group):
                    cited += 1
                    if int(number) not in sections:
                        broken.append(f"{where}: §{number}")
    assert not outside, "citations of the page outside the repository:\n" + "\n".join(outside)
    assert not broken, "citations of sections docs/reproduction.md does not have:\n" + "\n".join(broken)
    assert cited >= 20       # the pre-processing, model, tokens, generation and training code all cite it


def test_ruff_configuration_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed (it is in the `test` extra: scripts/setup.sh installs it)"
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "[tool.ruff.lint]" in text
    proc = subprocess.run([ruff, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def _make_dry_run(target: str) -> str:
    proc = subprocess.run(["make", "-n", target, "VENV=.venv"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_lint_runs_ruff_and_ci_lints_before_testing():
    assert "ruff check" in _make_dry_run("lint")
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
             if line.strip().startswith("make ")]
    assert steps.index("make lint") < steps.index("make test"), steps


def test_make_bench_runs_every_cpu_benchmark():
    assert "scripts/bench.sh" in _make_dry_run("bench")
    script = (ROOT / "scripts" / "bench.sh").read_text(encoding="utf-8")
    # every benchmark script (a file with a __main__ block) except the GPU one runs in both modes
    benchmarks = [p.name for p in (ROOT / "bench").glob("*.py") if "__main__" in p.read_text(encoding="utf-8")]
    assert "gpu.py" in benchmarks and len(benchmarks) >= 6
    runs = [line.split()[1] for line in script.splitlines() if line.strip().startswith("run bench/")]
    full, quick = runs[:len(runs) // 2], runs[len(runs) // 2:]
    assert "bench/gpu.py" not in runs
    for name in benchmarks:
        if name != "gpu.py":
            assert f"bench/{name}" in quick and f"bench/{name}" in full, f"bench/{name} is not run by make bench"
