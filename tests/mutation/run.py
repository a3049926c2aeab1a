"""Mutation testing of one core module with mutmut: how many deliberate small bugs the tests catch.

    python tests/mutation/run.py metrics            # one module (see MODULES), a few minutes to ~25 min here
    python tests/mutation/run.py metrics losses     # several
    python tests/mutation/run.py --list             # the modules and their test files

Each module runs in its own scratch copy of the repository (`--work`, default /tmp/dinov3ds-mutation/<name>)
with a `[tool.mutmut]` section written for it: mutate that one file, run only its test files. mutmut
records which tests reach each function and runs only those per mutant. The summary (killed, survived,
kill rate, each survivor's original and mutated line) is printed and written to
tests/mutation/results/<name>.json. A survivor that cannot change behaviour is listed, with the reason, in
tests/mutation/equivalent.json (matched by its mutated line) and left out of the kill rate;
`--summarise` recomputes a summary from the scratch copy after that file changes, without rerunning;
`--retest` runs only the last run's survivors again after tests were added (same source, same test files;
mutmut maps a test to the functions it reaches when it first sees it, so add new test functions rather than
extending old ones).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results"
EQUIVALENT = Path(__file__).resolve().parent / "equivalent.json"  # per module: mutants that cannot change behaviour

SHAPE_TESTS_LEFT_OUT = ("not channels_last and not forward_gives_logits_at_input_resolution and not default_options_run "
                        "and not state_dict_round_trip and not any_number_of_classes")
# Issue 31's value tests of the heads' option ranges and of the slide crop's checks (no fixtures: fast).
R3_HEADS = [f"tests/test_hostile_round3_config.py::test_r3_11_{name}" for name in (
    "every_option_of_every_head_has_a_range", "each_bound_is_where_the_message_says",
    "values_are_checked_as_yaml_gives_them", "the_range_in_words")]  # fmt: skip
R3_INFERENCE = [f"tests/test_hostile_round3_config.py::test_r3_21_{name}" for name in (
    "the_slide_buffers_must_fit_the_free_memory", "the_padded_copy_and_batches_are_counted",
    "a_window_up_to_64_times_the_image_is_still_padded")]  # fmt: skip

# module name → (file under src/dinov3ds, test files that exercise it)
MODULES: dict[str, tuple[str, list[str]]] = {
    "metrics": ("metrics/images.py", ["tests/test_metrics.py"]),
    "inference": ("models/inference.py", ["tests/test_inference.py", *R3_INFERENCE]),
    "checkpoints": ("models/checkpoints.py", ["tests/test_checkpoints.py", "tests/test_engine.py"]),
    "weights": ("models/weights/*.py", ["tests/test_weights.py", "tests/test_weight_sources.py", "tests/test_backbones.py"]),
    "feature_cache": ("training/feature_cache.py", ["tests/test_feature_cache.py", "tests/test_feature_store.py", "tests/test_hostile_round3_store.py"]),
    "transforms": ("data/transforms.py", ["tests/test_data.py"]),
    "losses": ("training/losses.py", ["tests/test_losses.py"]),
    # The heads in three rows (pmt below), each with its own tests. test_heads.py's shape checks run over every
    # head and size (35 forwards, 7 channels_last passes); they take most of the time and every mutant they
    # could catch changes a value or a count the other tests pin, so they are left out here.
    "heads": ("heads/{__init__,base,linear,segdino,dpt,unet,unet_sum,unet_adapter}.py",
              ["tests/test_heads.py", "tests/test_head_values.py", "tests/test_head_references.py", *R3_HEADS, "-k",
               SHAPE_TESTS_LEFT_OUT]),
    "adapter": ("heads/{vit_adapter,deformable_attention,fapm}.py",
                ["tests/test_fapm.py", "tests/test_head_references.py", "tests/test_heads.py", *R3_HEADS, "-k",
                 SHAPE_TESTS_LEFT_OUT]),
    "mask_loss": ("training/mask_classification.py", ["tests/test_pmt.py"]),
    "pmt": ("heads/pmt.py", ["tests/test_pmt.py", *R3_HEADS]),
    "volumes": ("data/volumes.py", ["tests/test_volumes.py", "tests/test_medical.py"]),
    "volume_metrics": ("metrics/volumes.py", ["tests/test_volume_metrics.py"]),
}


# Statements left unmutated: the wording of errors, warnings and log lines (the conditions that raise them
# are mutated; the CLI tests check each message's key words, not its every letter), and type-only imports.
UNMUTATED_LINES = [r"raise (UserError|ValueError|TypeError|KeyError|RuntimeError)\(", r"warnings\.warn\(",
                   r"logger\.(debug|info|warning|error)\(", r"_announce\("]  # fmt: skip


def source_globs(source: str) -> list[str]:
    """`heads/{a,b}.py` → ["src/dinov3ds/heads/a.py", "src/dinov3ds/heads/b.py"] (mutmut takes fnmatch globs)."""
    match = re.fullmatch(r"(.*)\{(.+)\}(.*)", source)
    names = [f"{match.group(1)}{part}{match.group(3)}" for part in match.group(2).split(",")] if match else [source]
    return [f"src/dinov3ds/{name}" for name in names]


def mutmut_section(source: str, tests: list[str]) -> str:
    # forkserver: torch is not fork-safe after its thread pools start (mutmut's own advice for torch).
    return (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {json.dumps(source_globs(source))}\n"
        f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n'
        'process_isolation = "forkserver"\n'
        f"do_not_mutate_patterns = {json.dumps(UNMUTATED_LINES)}\n"
        "use_git_change_detection = false\n"
    )


def prepare(name: str, work: Path) -> Path:
    source, tests = MODULES[name]
    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copytree(ROOT / "src", folder / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "tests", folder / "tests", ignore=shutil.ignore_patterns("__pycache__", "results"))
    pyproject = (ROOT / "pyproject.toml").read_text()
    (folder / "pyproject.toml").write_text(pyproject + mutmut_section(source, tests))
    return folder


def mutant_diff(name: str, folder: Path, environment: dict[str, str]) -> tuple[str, str]:
    """The original and mutated source line of a mutant (`mutmut show`), stripped."""
    shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=folder, capture_output=True,
                           text=True, env=environment).stdout  # fmt: skip
    removed = [line[1:].strip() for line in shown.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:].strip() for line in shown.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return " / ".join(removed), " / ".join(added)


def equivalents(name: str) -> dict[str, str]:
    """Mutated line → why that mutant cannot change behaviour; keyed by text, not by mutmut's numbering,
    which shifts whenever the module changes."""
    return {entry["mutated"]: entry["reason"] for entry in json.loads(EQUIVALENT.read_text()).get(name, [])}


def summarise(name: str, folder: Path, environment: dict[str, str]) -> dict:
    listing = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=folder,
                             capture_output=True, text=True, env=environment).stdout  # fmt: skip
    verdicts: dict[str, str] = {}
    for line in listing.splitlines():
        match = re.match(r"\s*(\S+): (.+)$", line)
        if match:
            verdicts[match.group(1)] = match.group(2).strip()
    killed = sum(v in ("killed", "timeout", "caught by type check") for v in verdicts.values())
    known = equivalents(name)
    survivors, equivalent = [], []
    for mutant in sorted(k for k, v in verdicts.items() if v in ("survived", "no tests")):
        original, mutated = mutant_diff(mutant, folder, environment)
        row = {"mutant": mutant, "verdict": verdicts[mutant], "original": original, "mutated": mutated}
        if mutated in known:
            equivalent.append({**row, "reason": known[mutated]})
        else:
            survivors.append(row)
    counted = killed + len(survivors)  # every mutant that is not equivalent: killed or not
    return {
        "module": MODULES[name][0],
        "tests": MODULES[name][1],
        "mutants": len(verdicts),
        "killed": killed,
        "survived": len(survivors),
        "equivalent": len(equivalent),
        "kill_rate": round(killed / counted, 4) if counted else None,
        "survivors": survivors,
        "equivalent_mutants": equivalent,
    }


def refresh_tests(name: str, folder: Path) -> list[str]:
    """For `--retest`: the scratch copy gets the current tests; returns the last run's survivors. The source
    and the module's test list must be what that run mutated and ran (else every verdict is stale)."""
    source, tests = MODULES[name]
    for pattern in source_globs(source):
        for path in ROOT.glob(pattern):
            if path.read_bytes() != (folder / path.relative_to(ROOT)).read_bytes():
                raise SystemExit(f"{path} changed since the last run of {name}: run it in full")
    if mutmut_section(source, tests) not in (folder / "pyproject.toml").read_text():
        raise SystemExit(f"the tests of {name} changed since its last run: run it in full")
    shutil.rmtree(folder / "tests")
    shutil.copytree(ROOT / "tests", folder / "tests", ignore=shutil.ignore_patterns("__pycache__", "results"))
    return [row["mutant"] for row in json.loads((RESULTS / f"{name}.json").read_text())["survivors"]]


def run(name: str, work: Path, children: int, mutate: bool = True, retest: bool = False) -> dict:
    folder = work / name if retest or not mutate else prepare(name, work)
    environment = {**os.environ, "PYTHONPATH": str(folder)}  # `tests.` imports resolve inside the copy
    if mutate:
        # mutmut keeps the verdicts of functions that did not change and runs the named mutants again.
        names = refresh_tests(name, folder) if retest else []
        with open(folder / "mutmut.log", "w") as log:  # mutmut redraws a progress line per mutant
            subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(children), *names],
                           cwd=folder, env=environment, stdout=log, stderr=subprocess.STDOUT, check=False)  # fmt: skip
    summary = summarise(name, folder, environment)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def results_table() -> str:
    """The committed summaries as the table docs/testing.md shows (tests/test_docs.py keeps them equal)."""
    rows = ["| module | file | mutants | killed | survived | equivalent | kill rate |", "|---|---|---|---|---|---|---|"]
    for name in MODULES:
        path = RESULTS / f"{name}.json"
        if path.is_file():
            r = json.loads(path.read_text())
            rows.append(f"| {name} | `{r['module']}` | {r['mutants']} | {r['killed']} | {r['survived']} | "
                        f"{r['equivalent']} | {100 * r['kill_rate']:.1f} % |")  # fmt: skip
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", help=f"any of: {', '.join(MODULES)}")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dinov3ds-mutation"), help="scratch folder")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2, help="parallel mutant runs")
    parser.add_argument("--list", action="store_true", help="list the modules and their tests")
    parser.add_argument("--summarise", action="store_true", help="summarise the last run again, mutating nothing")
    parser.add_argument("--retest", action="store_true",
                        help="run only the last run's survivors again, against the current tests")  # fmt: skip
    parser.add_argument("--table", action="store_true", help="print the committed results as a Markdown table")
    args = parser.parse_args()
    if args.table:
        print(results_table())
        return 0
    if args.list or not args.modules:
        for name, (source, tests) in MODULES.items():
            print(f"{name:<14} src/dinov3ds/{source:<20} {' '.join(tests)}")
        return 0
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    for name in args.modules:
        summary = run(name, args.work, args.children, mutate=not args.summarise, retest=args.retest)
        print(f"{name}: {summary['mutants']} mutants, {summary['killed']} killed, {summary['survived']} survived, "
              f"{summary['equivalent']} equivalent: kill rate {summary['kill_rate']}")  # fmt: skip
        for row in summary["survivors"]:
            print(f"  survived {row['mutant']}: {row['original']}  →  {row['mutated']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
