"""Run ``certfx verify`` on VNN-COMP benchmark instances and score it against the known answers.

For each instance of a benchmark's instances CSV (``onnx, vnnlib, timeout``) the cascade runs
with the instance's timeout (optionally capped by ``--max-timeout``; every property of a
multi-property file shares it), and its answer is compared with ``ground_truth.csv``:

* *solved*: ``unsat`` on an unsat instance, or ``sat`` with a counterexample that re-checks
  with onnxruntime (the cascade reports none that does not);
* *wrong*: ``unsat`` where the truth is ``sat``, or ``sat`` where it is ``unsat`` — the worst
  failure a verifier can have; the script exits with status 1 if any occurs.

The table gives per benchmark the instances run, solved (unsat/sat), wrong, timeouts and the
time, next to the best published tool's counts from ``reference/vnncomp_scores.md``.

Usage:
    python benchmarks/vnncomp.py [--root ../shared/benchmarks/vnncomp]
        [--benchmarks vnncomp2021/acasxu vnncomp2021/eran …] [--match TEXT] [--every N]
        [--max-timeout S]
        [--methods attack,box,…] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from certfx.frontends.vnnlib import read_vnnlib
from certfx.verify import CascadeOptions, Verdict, Verifier, combined_verdict
from certfx.verify.cascade import DEFAULT_METHODS

DEFAULT_ROOT = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "vnncomp"
_ANSWER = {Verdict.FALSIFIED: "sat", Verdict.VERIFIED: "unsat", Verdict.TIMEOUT: "timeout",
           Verdict.UNKNOWN: "unknown"}


def instances(root: Path, benchmark: str) -> list[tuple[str, str, float]]:
    """``(onnx, vnnlib, timeout)`` paths relative to ``root`` from the benchmark's CSV."""
    folder = root / benchmark
    found = []
    for table in sorted(folder.glob("*instances*.csv")):
        for row in csv.reader(table.open()):
            if len(row) >= 3 and row[0].strip():
                onnx, spec = (str(Path(benchmark) / r.strip()) for r in row[:2])
                found.append((onnx, spec, float(row[2])))
    return found


def published_best(root: Path) -> dict[str, tuple[str, int, int]]:
    """Per benchmark (``vnncomp2021/acasxu``): the first-ranked tool and its verified/falsified
    counts, from ``reference/vnncomp_scores.md``."""
    text = (root / "reference" / "vnncomp_scores.md").read_text()
    best: dict[str, tuple[str, int, int]] = {}
    year = ""
    for line in text.splitlines():
        if line.startswith("## "):
            year = "vnncomp2021" if "2021" in line else "vnncomp2022" if "2022" in line \
                else line[3:].split()[0]
        elif line.startswith("### "):
            bench = f"{year}/{line[4:].strip()}"
        else:
            m = re.match(r"\| 1 \| ([^|]+) \| (\d+) \| (\d+) \|", line)
            if m and bench not in best:
                best[bench] = (m.group(1).strip(), int(m.group(2)), int(m.group(3)))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--benchmarks", nargs="+", default=["vnncomp2021/test"])
    parser.add_argument("--every", type=int, default=1, help="run every N-th instance")
    parser.add_argument("--match", default="",
                        help="only instances whose ONNX or VNN-LIB path contains this text "
                             "(e.g. SIGMOID), before --every")
    parser.add_argument("--max-timeout", type=float, default=None,
                        help="cap each instance's timeout (seconds)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not args.root.is_dir():
        print(f"no VNN-COMP instances at {args.root}", file=sys.stderr)
        return 2
    truth = {(r["onnx"], r["vnnlib"]): r["expected"]
             for r in csv.DictReader((args.root / "ground_truth.csv").open())}
    methods = tuple(m for m in args.methods.split(",") if m)
    records, wrong = [], 0
    for bench in args.benchmarks:
        chosen = [i for i in instances(args.root, bench) if args.match in i[0] + i[1]]
        for onnx, spec, timeout in chosen[::args.every]:
            if args.max_timeout is not None:
                timeout = min(timeout, args.max_timeout)
            start = time.perf_counter()
            try:
                verifier = Verifier(args.root / onnx,
                                    options=CascadeOptions(methods=methods, timeout=timeout))
                props = read_vnnlib(args.root / spec, input_shape=verifier.input_shape)
                deadline = start + timeout
                results = []
                for prop in props:  # the file's properties share the instance's time
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    verifier.options = CascadeOptions(methods=methods, timeout=left)
                    results.append(verifier.verify(prop))
                verdict = combined_verdict(results) if len(results) == len(props) and \
                    results else Verdict.TIMEOUT
                if verdict is not Verdict.FALSIFIED and len(results) < len(props):
                    verdict = Verdict.TIMEOUT
                answer, error = _ANSWER[verdict], ""
            except Exception as err:  # an instance certfx cannot run: counted, not fatal
                answer, error = "error", f"{type(err).__name__}: {str(err).splitlines()[0]}"
            seconds = time.perf_counter() - start
            expected = truth.get((onnx, spec), "unknown")
            bad = {("unsat", "sat"), ("sat", "unsat")}
            is_wrong = (answer, expected) in bad
            wrong += is_wrong
            records.append({"benchmark": bench, "onnx": onnx, "vnnlib": spec,
                            "timeout": timeout, "answer": answer, "expected": expected,
                            "wrong": is_wrong, "seconds": round(seconds, 3), "error": error})
            print(f"{bench:28} {Path(onnx).name[:34]:34} {Path(spec).name[:24]:24} "
                  f"{answer:8} (truth {expected:7}) {seconds:7.1f}s "
                  f"{'WRONG' if is_wrong else ''}{error}", flush=True)
    _summary(records, published_best(args.root))
    if args.json is not None:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 1 if wrong else 0


def _summary(records: list[dict], best: dict[str, tuple[str, int, int]]) -> None:
    by = defaultdict(list)
    for r in records:
        by[r["benchmark"]].append(r)
    print()
    print("| benchmark | run | solved (unsat / sat) | wrong | timeout/unknown/error | time | "
          "best published (tool: unsat / sat of all) |")
    print("|---|---|---|---|---|---|---|")
    for bench, rows in by.items():
        c = Counter((r["answer"], r["expected"]) for r in rows)
        unsat, sat = c[("unsat", "unsat")], c[("sat", "sat")]
        wrong = sum(r["wrong"] for r in rows)
        other = sum(1 for r in rows if r["answer"] in ("timeout", "unknown", "error"))
        tool = best.get(bench)
        ref = f"{tool[0]}: {tool[1]} / {tool[2]}" if tool else "—"
        print(f"| {bench} | {len(rows)} | {unsat + sat} ({unsat} / {sat}) | {wrong} | {other} | "
              f"{sum(r['seconds'] for r in rows):.0f} s | {ref} |")


if __name__ == "__main__":
    sys.exit(main())
