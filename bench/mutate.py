"""Mutation testing of attnscan's core with mutmut: how many small planted bugs the tests catch, module by module.

mutmut rewrites each function of a module into many *mutants* (a ``<`` becomes ``<=``, a constant changes, an
argument is dropped, ...) and runs the tests that cover the function against each one. A mutant is *killed* when a
test fails; one that *survives* is a change no test noticed: either a missing test or an equivalent mutant (a change
that does not alter behaviour, e.g. a different chunk size). The score printed here is killed / (killed + survived),
timeouts counted as killed; mutants of functions that no selected test calls are counted apart ("no tests").

Each module runs in its own scratch copy of the repository (``.mutate/<module>/``, ignored by git): ``src/``,
``tests/`` and ``pyproject.toml`` with a ``[tool.mutmut]`` section naming only that module and only the test files
that exercise it (``CORE`` below), so a run mutates one module and runs a narrow, fast selection. mutmut keeps its
work in ``.mutate/<module>/mutants/``; a rerun keeps the result of every variant whose function did not change, so it
resumes a capped run, but it does not retry survivors against new tests: run with ``--fresh`` after changing tests.

Usage (``make mutate`` runs every module of ``CORE``; ``make mutate MODULE=analysis/inference.py`` one of them)::

    python bench/mutate.py                                  # every core module, one after the other
    python bench/mutate.py analysis/inference.py            # one module (src/attnscan/analysis/inference.py also)
    python bench/mutate.py analysis/inference.py --max-children 2 --timeout 1800
    python bench/mutate.py views/page.py --fresh            # forget earlier results (after the tests changed)
    python bench/mutate.py engine/capture.py --survivors    # retry only the survivors (after new tests), then stop
    python bench/mutate.py --list                           # the modules and their test selections

Afterwards ``cd .mutate/<module> && mutmut results`` lists the survivors and ``mutmut show <name>`` shows one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "src/attnscan"

#: Core module (under src/attnscan/) -> the test files that exercise it.
CORE: dict[str, tuple[str, ...]] = {
    "analysis/inference.py": (
        "tests/analysis/test_inference.py",
        "tests/analysis/test_references.py",
        "tests/analysis/test_inference_references.py",
        "tests/detect/test_rates.py",  # the Wilson interval
    ),
    "analysis/statistics.py": (
        "tests/analysis/test_statistics.py",
        "tests/analysis/test_references.py",
        "tests/analysis/test_table_references.py",
    ),
    "detect/metrics.py": (
        "tests/detect/test_metrics.py",
        "tests/detect/test_metrics_mutants.py",
        "tests/detect/test_bootstrap.py",  # cross_validate with grouped folds
    ),
    "detect/bootstrap.py": ("tests/detect/test_bootstrap.py", "tests/detect/test_interval_references.py"),
    "engine/accumulate.py": ("tests/engine/test_block_reference.py", "tests/engine/test_alignment.py"),
    "engine/capture.py": ("tests/engine/test_capture.py", "tests/engine/test_chunked.py"),
    # not tests/engine/test_scale.py: its checkpoint tests scan in subprocesses, out of mutmut's reach, and it is slow
    "engine/checkpoint.py": (
        "tests/engine/test_checkpoint.py",
        "tests/test_write_faults.py",  # full disks and kills around checkpoint saves, through the CLI in process
    ),
    "views/page.py": ("tests/views/test_page.py", "tests/views/test_report.py", "tests/views/test_report_markup.py"),
    "views/formatting.py": (
        "tests/views/test_formatting.py",
        "tests/views/test_page.py",
        "tests/views/test_report.py",
        "tests/views/test_report_markup.py",
    ),
    "prompts/loaders.py": (
        "tests/prompts/test_loaders.py",
        "tests/prompts/test_columns.py",
        "tests/prompts/test_sets.py",  # plain text files and bad input through load_prompts
        "tests/prompts/test_loader_edges.py",
    ),
}


def mutmut_section(module: str, tests: tuple[str, ...]) -> str:
    """The ``[tool.mutmut]`` section of a scratch copy: mutate ``module`` only, run ``tests`` only."""
    selection = ", ".join(json.dumps(t) for t in tests)
    return (
        "[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = [{json.dumps(f'{PACKAGE}/{module}')}]\n"
        f"pytest_add_cli_args_test_selection = [{selection}]\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]\n'
        # torch is not fork-safe after it has started threads: fork the mutants from a clean server process
        'process_isolation = "forkserver"\n'
        "timeout_multiplier = 5.0\n"
        "timeout_constant = 10.0\n"
    )


def scratch_copy(module: str, tests: tuple[str, ...]) -> Path:
    """A scratch copy of the repository for ``module`` (refreshed; mutmut's own ``mutants/`` is kept)."""
    work = ROOT / ".mutate" / module.replace("/", "__").removesuffix(".py")
    work.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("src", "tests"):
        shutil.rmtree(work / name, ignore_errors=True)
        shutil.copytree(ROOT / name, work / name, ignore=ignore)
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    text = re.sub(r"\n\[tool\.mutmut\]\n(?:[^\[].*\n|\n)*", "\n", text)  # drop a checked-in section
    (work / "pyproject.toml").write_text(text.rstrip() + "\n\n" + mutmut_section(module, tests), encoding="utf-8")
    return work


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """End whatever is left in ``proc``'s process group (mutmut, its fork server, a test run): SIGTERM, then
    SIGKILL 2 s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is empty
            break
        if sig == signal.SIGTERM:
            time.sleep(2)
    proc.wait()


def survivors(work: Path, mutmut: str, env: dict[str, str]) -> list[str]:
    """The names of the variants that survived the last run in the scratch copy ``work``."""
    out = subprocess.run([mutmut, "results"], cwd=work, env=env, check=True, capture_output=True, text=True).stdout
    return [line.strip().rsplit(":", 1)[0] for line in out.splitlines() if line.strip().endswith(": survived")]


def run_module(
    module: str, max_children: int, timeout: float, fresh: bool = False, retry: bool = False
) -> dict[str, object]:
    """Mutate one module and return mutmut's counts, the score and the wall time."""
    module = module.removeprefix(f"{PACKAGE}/")  # src/attnscan/analysis/inference.py works too
    tests = CORE.get(module)
    if tests is None:
        raise SystemExit(f"unknown module {module}: choose one of {', '.join(CORE)} (see --list)")
    work = scratch_copy(module, tests)
    if fresh:
        shutil.rmtree(work / "mutants", ignore_errors=True)
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or "mutmut"
    # mutmut puts its mutated copy first on sys.path in the test processes; PYTHONPATH only keeps the scratch copy
    # ahead of an editable install elsewhere. Subprocesses that tests start (torchrun, a CLI run) import the unmutated
    # copy, so mutants only tests of that kind reach survive: choose in-process tests for CORE.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(work / "src")}
    start = time.monotonic()
    # in its own process group, stopped whole at the time limit (or Ctrl-C): mutmut's fork server and the test run
    # it forked would otherwise outlive it
    command = [mutmut, "run", "--max-children", str(max_children)]
    if retry:  # mutmut retries the variants it is given by name, whatever their last result
        names = survivors(work, mutmut, env) if (work / "mutants").exists() else []
        print(f"{module}: retrying {len(names)} survivors")
        command += names
    if not retry or names:  # (a run without names would run every variant)
        proc = subprocess.Popen(command, cwd=work, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"{module}: stopped after {timeout:.0f} s; the counts below cover the mutants run so far")
        finally:
            _stop_group(proc)
    wall = time.monotonic() - start
    subprocess.run([mutmut, "export-cicd-stats"], cwd=work, env=env, check=False, capture_output=True)
    stats_file = work / "mutants" / "mutmut-cicd-stats.json"
    stats: dict[str, object] = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    killed = int(str(stats.get("killed", 0))) + int(str(stats.get("timeout", 0)))
    survived = int(str(stats.get("survived", 0)))
    tested = killed + survived
    stats.update(module=module, wall_s=round(wall), score=round(100 * killed / tested, 1) if tested else None)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="paths under src/attnscan/ (default: every core module)")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--timeout", type=float, default=3600, help="wall-clock cap per module in seconds")
    parser.add_argument(
        "--fresh", action="store_true", help="forget earlier results: retry every variant (after the tests changed)"
    )
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="retry only the variants that survived the last run (after new tests); the unchecked ones stay unchecked",
    )
    parser.add_argument("--list", action="store_true", help="print the modules and their tests, then stop")
    args = parser.parse_args()
    # a SIGTERM (kill, a CI cancel) unwinds like Ctrl-C, so the finally above stops mutmut's process group too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.list:
        for module, tests in CORE.items():
            print(f"{module}: {' '.join(tests)}")
        return
    if args.fresh and args.survivors:
        parser.error("--fresh forgets the survivors that --survivors retries: choose one")
    rows = [
        run_module(m, args.max_children, args.timeout, args.fresh, args.survivors) for m in (args.modules or list(CORE))
    ]
    print("\nmodule                         killed  survived  no tests  score   wall")
    for r in rows:
        score = "—" if r["score"] is None else f"{r['score']:.1f} %"
        print(
            f"{r['module']:<30} {r.get('killed', 0)!s:>6}  {r.get('survived', 0)!s:>8}  {r.get('no_tests', 0)!s:>8}"
            f"  {score:>7}  {r['wall_s']} s"
        )


if __name__ == "__main__":
    main()
