"""Mutation testing of the modules whose bugs lose or leak data, with mutmut: how many deliberate small bugs the tests
catch. Slow, so it is a benchmark, not part of ``make test``.

    python benchmarks/bench_mutation.py [--full] [--sample 140] [--seed 0] [--max-children 2]

Modules and the tests run against their mutants (mutmut runs, per mutant, only the tests that reach the mutated
function):

- the commit protocol (``pipeline/storage/commit.py``) and the tokenize commit path (``pipeline/tokenize/writer.py``);
- the fetch guard (``pipeline/download/fetch.py``, ``pipeline/download/connections.py``);
- the loaders and resume (``pipeline/prior/loader.py``, ``pipeline/prior/rows.py``);
- config validation (``pipeline/config/root.py``);
- sampling and guidance (``pipeline/prior/transformer.py``).

mutmut works on a scratch copy (pipeline/, tests/, configs/, pyproject.toml with a ``[tool.mutmut]`` section), so
the checkout is never touched. By default a seeded sample of mutants, stratified by module, is run (``--sample``;
about 10 minutes on 2 busy cores); ``--full`` runs every mutant (hours here). The JSON says which.

Score: killed (a test failed, or the mutant hung past mutmut's timeout) over every mutant checked. Survivors are
sorted into ``equivalent`` (no input tells them apart, each named in ``KNOWN`` with why), ``cosmetic``/``logging``
(only the text of a message or log line changes: no data, only words that tests match in part), ``informative`` (a
figure only people read) and ``gap`` (a hole in the tests). The headline leaves the first four out of the
denominator; the raw score is beside it. Every survivor is listed with its diff and its reason.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks._results import machine_state, write_result  # noqa: E402

GOAL = 0.9
MODULES = {
    "pipeline/storage/commit.py": ["tests/storage/test_commit.py", "tests/tokenize/test_writer.py"],
    "pipeline/tokenize/writer.py": ["tests/tokenize/test_writer.py"],
    "pipeline/download/fetch.py": ["tests/download/test_fetch.py", "tests/download/test_fetch_tls.py"],
    "pipeline/download/connections.py": ["tests/download/test_fetch_tls.py"],
    "pipeline/prior/loader.py": ["tests/prior/test_prior_data.py"],
    "pipeline/prior/rows.py": ["tests/prior/test_prior_data.py"],
    "pipeline/config/root.py": ["tests/config/test_config.py"],
    "pipeline/prior/transformer.py": ["tests/prior/test_prior.py"],
}
KILLED = {1, 3, 24, -24, 36, 152, 255, 37}  # a failing test, a pytest error, a timeout (SIGXCPU), the type checker
SURVIVED = {0}
NO_TESTS = {5, 33}
MESSAGE_CALL = re.compile(r"\b(log|logger|logging)\.(debug|info|warning|error|exception)\(|\bprint\(|Error\(|"
                          r"raise \w+\(|_Fail\(|warn\(|_check\(")
# Survivors looked at one by one (matched on their diff): why each is left. "equivalent": no input can tell the
# mutant from the original; "informative": a figure only people read; "gap": a real hole, named.
KNOWN = [
    ('kind="STABLE"', "equivalent", "numpy reads the sort kind case-insensitively: the same stable sort"),
    ("scatter(+1,", "equivalent", "the logits are (B, V): dim +1 is dim -1"),
    ("device=None).to(text.device)", "equivalent", "single-device model code: the generator's device is the default"),
    ("cache[0][1].shape[2]", "equivalent", "keys and values in the cache have the same shape: either gives its length"),
    ("max_idle_s: float = 21.0", "informative", "a tuning default (idle seconds before a pooled connection closes)"),
    ('"seconds": round(seconds, )', "informative", "the marker's timing figure rounded to whole seconds: nobody reads "
                                                   "it back"),
    ('/ seconds, ) if seconds', "informative", "the marker's images/s rounded: a figure for people, read by no code"),
    ("(self.training) and False", "gap", "attention dropout is off in every test (dropout 0): no test trains with it"),
    ("x - self.mlp", "gap", "the block's own arithmetic: cached and uncached sampling and the loss all see the same "
                            "mutated network; pinning it needs a reference forward"),
]
EXCLUDED = ("cosmetic", "logging", "equivalent", "informative")


def mutmut_exe() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "mutmut")
    if not os.path.exists(exe):
        sys.exit("mutmut is not installed: pip install -e '.[dev]'")
    return exe


def scratch_copy(tmp: str) -> str:
    """pipeline/, tests/, configs/ and pyproject.toml (plus the [tool.mutmut] section) in a scratch folder."""
    work = os.path.join(tmp, "work")
    os.makedirs(work)
    for name in ("pipeline", "tests", "configs"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(work, name),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    tests = sorted({t for ts in MODULES.values() for t in ts})
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    text += ("\n[tool.mutmut]\nsource_paths = [\"pipeline\"]\n"
             f"only_mutate = {json.dumps(sorted(MODULES))}\n"
             "also_copy = [\"configs\"]\n"
             f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
             "pytest_add_cli_args = [\"-p\", \"no:cacheprovider\", \"-q\", \"-x\"]\n")
    with open(os.path.join(work, "pyproject.toml"), "w") as f:
        f.write(text)
    return work


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the mutants' copy must be the one imported
    out.update(OMP_NUM_THREADS="1", NO_ALBUMENTATIONS_UPDATE="1", no_proxy="127.0.0.1,localhost",
               NO_PROXY="127.0.0.1,localhost", TERM="dumb")
    return out


def mutmut(work: str, args: list[str], log: str, timeout: float) -> int:
    with open(log, "a") as f:
        proc = subprocess.run([mutmut_exe(), *args], cwd=work, env=env(), stdout=f, stderr=subprocess.STDOUT,
                              timeout=timeout)
    return proc.returncode


def mutants(work: str) -> dict[str, int | None]:
    """Mutant name → mutmut exit code (None: not run), from every ``.meta`` file mutmut wrote."""
    out: dict[str, int | None] = {}
    for meta in glob.glob(os.path.join(work, "mutants", "**", "*.py.meta"), recursive=True):
        with open(meta) as f:
            out.update(json.load(f)["exit_code_by_key"])
    return out


def module_of(name: str) -> str:
    mod = name.split(".x_")[0].split(".xǁ")[0]
    return mod.replace(".", "/") + ".py"


def sample(names: list[str], n: int, seed: int) -> list[str]:
    """``n`` names, stratified: each module gets its share of ``n`` by its mutant count, at least 5."""
    by_mod: dict[str, list[str]] = defaultdict(list)
    for name in sorted(names):
        by_mod[module_of(name)].append(name)
    rng = random.Random(seed)
    picked = []
    for _mod, group in sorted(by_mod.items()):
        k = min(len(group), max(5, round(n * len(group) / len(names))))
        picked += rng.sample(group, k)
    return picked


def diff_of(work: str, name: str) -> str:
    proc = subprocess.run([mutmut_exe(), "show", name], cwd=work, env=env(), capture_output=True, text=True,
                          timeout=120)
    return "\n".join(line for line in proc.stdout.splitlines()
                     if line.startswith(("-", "+")) and not line.startswith(("---", "+++")))


def classify(diff: str) -> tuple[str, str]:
    """(category, reason) of a survivor from its diff."""
    for needle, category, reason in KNOWN:
        if needle in diff:
            return category, reason
    minus = [line[1:] for line in diff.splitlines() if line.startswith("-")]
    plus = [line[1:] for line in diff.splitlines() if line.startswith("+")]
    strip = lambda s: re.sub(r"([\"'])(?:\\.|(?!\1).)*\1", "''", s)  # every string literal emptied
    if minus and len(minus) == len(plus) and all(strip(a) == strip(b) for a, b in zip(minus, plus)) and \
            all(MESSAGE_CALL.search(a) or "f\"" in a or "f'" in a or a.strip().startswith(("f\"", "\"", "'"))
                for a in minus):
        return "cosmetic", "changes only the text of an error or log message; tests match its key words, not all"
    if any(MESSAGE_CALL.search(a) and strip(a) != a for a in minus) and all(strip(a) == strip(b)
                                                                          for a, b in zip(minus, plus)):
        return "cosmetic", "changes only a string inside a message; no data or decision depends on it"
    if any(re.search(r"\b(log|logger)\.\w+\(", a) for a in minus):
        return "logging", "changes only what is logged; no test reads the log line"
    return "gap", "no test pins this behaviour: a real gap to close with a test, or an equivalent mutant"


def summarize(codes: dict[str, int | None]) -> dict[str, Any]:
    by_mod: dict[str, Counter[str]] = defaultdict(Counter)
    for name, code in codes.items():
        status = ("killed" if code in KILLED else "survived" if code in SURVIVED else
                  "no_tests" if code in NO_TESTS else "not_run" if code is None else f"other_{code}")
        by_mod[module_of(name)][status] += 1
    return {m: dict(c) for m, c in sorted(by_mod.items())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="every mutant, not a sample (hours on 2 cores)")
    ap.add_argument("--sample", type=int, default=140, help="mutants in the default (sampled) run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (mutmut show/browse there)")
    args = ap.parse_args()
    machine = machine_state()
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="bench_mutation_")
    log = os.path.join(tmp, "mutmut.log")
    try:
        work = scratch_copy(tmp)
        # Pass 1: generate every mutant and learn which tests reach which function (a filter matching nothing:
        # mutmut stops right after, with its stats saved for pass 2).
        mutmut(work, ["run", "--max-children", str(args.max_children), "no-such-mutant"], log, 3600)
        names = sorted(mutants(work))
        if not names:
            sys.exit(f"mutmut generated no mutants; see {log}")
        chosen = names if args.full else sample(names, args.sample, args.seed)
        rc = mutmut(work, ["run", "--max-children", str(args.max_children), *chosen], log, 6 * 3600)
        codes = {n: c for n, c in mutants(work).items() if n in set(chosen)}
        survivors = []
        for name in sorted(n for n, c in codes.items() if c in SURVIVED | NO_TESTS):
            diff = diff_of(work, name)
            category, reason = classify(diff)
            if codes[name] in NO_TESTS:
                category, reason = "gap", "no selected test reaches this function"
            survivors.append({"mutant": name, "module": module_of(name), "category": category, "reason": reason,
                              "diff": diff})
        result = report(args, machine, names, codes, survivors, rc, time.perf_counter() - t0)
    finally:
        if args.keep:
            print(f"[bench] scratch folder kept: {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    write_result("mutation", result)


def report(args: argparse.Namespace, machine: dict[str, Any], names: list[str], codes: dict[str, int | None],
           survivors: list[dict[str, Any]], rc: int, seconds: float) -> dict[str, Any]:
    checked = [n for n, c in codes.items() if c is not None]
    killed = sum(1 for n in checked if codes[n] in KILLED)
    cosmetic = sum(1 for s in survivors if s["category"] in EXCLUDED)
    behavioural = len(checked) - cosmetic
    score = killed / behavioural if behavioural else None
    return {
        "headline": {"name": "mutation_score_data_modules", "value": round(score, 4) if score is not None else None,
                     "goal": GOAL, "higher_is_better": True, "met": score is not None and score >= GOAL,
                     "basis": "killed / mutants checked, leaving out survivors that are equivalent or change only "
                              "message, log or informative-figure text (each listed with its reason; raw score "
                              "beside it)"},
        "raw_score": round(killed / len(checked), 4) if checked else None,
        "mode": "full" if args.full else f"sample of {len(codes)} (seed {args.seed}, stratified by module)",
        "mutants_total": len(names), "mutants_checked": len(checked), "killed": killed,
        "survived": len(survivors), "excluded_survivors": cosmetic,
        "survivors_by_category": dict(Counter(s["category"] for s in survivors)), "tool": "mutmut " + _version(),
        "by_module": summarize(codes), "modules": MODULES, "survivors": survivors, "mutmut_exit_code": rc,
        "machine": machine, "seconds": round(seconds, 1),
    }


def _version() -> str:
    from importlib.metadata import version

    return version("mutmut")


if __name__ == "__main__":
    main()
