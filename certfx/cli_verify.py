"""``certfx verify``: the verification cascade from the shell, with the VNN-COMP result format.

Two ways to give properties:

* a VNN-LIB file: ``certfx verify NET.onnx SPEC.vnnlib [--timeout S] [--results FILE]``;
  ``--results`` writes the competition's answer — ``sat`` plus the counterexample
  ``((X_0 v) … (Y_0 v) …)``, ``unsat``, ``timeout`` or ``unknown`` — for the whole file (its
  properties are a disjunction: one counterexample anywhere makes it ``sat``);
* robustness on a data set: ``certfx verify NET.onnx --eps E --data FILE [--limit N]``: one
  property per image, the ℓ∞ ball of radius E clipped to ``[--lower, --upper]``, unsafe when
  another class scores at least as high as the label. ε is in the model's input space: the
  model must contain its normalization (as ONNX exports of normalized models do).

``--methods`` picks the stages (default ``attack,box,deepz,crown,alpha-crown,split,milp``),
``--timeout`` is per property, ``--dtype float64`` computes every bound in double precision,
``--json OUT`` writes one record per property. Nothing is written when an input is bad.
"""

from __future__ import annotations

import argparse
import io
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from certfx.errors import CertfxError, InvalidValueError
from certfx.specs import Property, UnsafeRegion

__all__ = ["add_verify", "cmd_verify", "vnncomp_answer"]

_ANSWER = {"falsified": "sat", "verified": "unsat", "timeout": "timeout", "unknown": "unknown"}


def add_verify(sub: Any, common: argparse.ArgumentParser, formatter: type) -> None:
    """Register the ``verify`` subcommand."""
    from certfx.verify.cascade import DEFAULT_METHODS

    p = sub.add_parser(
        "verify", parents=[common], formatter_class=formatter,
        help="verify properties: attack, bounds, input splitting and MILP",
        description=__doc__.split("\n\n", 1)[1],
        epilog="examples:\n"
               "  certfx verify examples/models/demo_cnn.onnx --eps 0.01 \\\n"
               "      --data examples/models/demo_data.csv --limit 5\n"
               "  certfx verify net.onnx prop.vnnlib --timeout 60 --results out.txt")
    p.add_argument("model", type=Path, metavar="MODEL", help="the network (.onnx)")
    p.add_argument("spec", type=Path, nargs="?", metavar="SPEC",
                   help="a VNN-LIB property file (or use --eps with --data)")
    p.add_argument("--eps", type=float, help="L-inf radius of the robustness properties")
    p.add_argument("--data", type=Path, help="CSV of images with labels (label first or last, "
                                             "pixels 0..255)")
    p.add_argument("--label-column", default="auto", choices=["auto", "first", "last"],
                   help="where the label is in each --data row (default: auto)")
    p.add_argument("--limit", type=int, help="verify only the first N images of --data")
    p.add_argument("--lower", type=float, default=0.0, help="smallest valid input (default 0)")
    p.add_argument("--upper", type=float, default=1.0, help="largest valid input (default 1)")
    p.add_argument("--mean", help="comma-separated per-channel mean the network expects its "
                                  "inputs normalized by (x − mean)/std; certfx puts that "
                                  "normalization in front, so --eps stays in pixel space")
    p.add_argument("--std", help="comma-separated per-channel std (with --mean)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds per property, all stages together (default 60)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help="comma-separated stages in order (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="precision of every bound computation (default float32)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="a bound must exceed this to prove a row (default 1e-5 in float32, "
                        "1e-9 in float64)")
    p.add_argument("--json", type=Path, help="write one record per property to this file")
    p.add_argument("--results", type=Path,
                   help="write the VNN-COMP answer (sat + counterexample/unsat/timeout/unknown)")
    p.set_defaults(run=cmd_verify)


def _channels(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidValueError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise InvalidValueError(f"{flag} is empty")
    return values


def _with_normalization(args: argparse.Namespace) -> tuple[Any, torch.Tensor | None]:
    """The model (and an example input), or ``Normalize(mean, std)`` followed by it when
    ``--mean``/``--std`` are given (the onnxruntime re-check of counterexamples is then
    replaced by the float64 re-check of the graph)."""
    if (args.mean is None) != (args.std is None):
        raise InvalidValueError("--mean and --std go together")
    if args.mean is None:
        return args.model, None
    import certfx
    from certfx.models import Normalize

    mean, std = _channels(args.mean, "--mean"), _channels(args.std, "--std")
    if len(mean) != len(std) or any(v <= 0 for v in std):
        raise InvalidValueError("--mean and --std need the same number of values, std > 0")
    graph = certfx.load(args.model)
    shape = tuple(graph.meta["certfx.input_shape"])
    channels = shape[0] if len(shape) >= 3 else 1
    if len(mean) not in (1, channels):
        raise InvalidValueError(f"--mean has {len(mean)} values; the model's input {shape} has "
                                f"{channels} channel(s)")
    norm = Normalize(mean, std)
    if len(shape) < 3:  # flat inputs: one value broadcast over all features
        norm.mean, norm.std = norm.mean.view(1, -1), norm.std.view(1, -1)
    return torch.nn.Sequential(norm, graph).eval(), torch.zeros(1, *shape)


def _properties(args: argparse.Namespace, input_shape: tuple[int, ...],
                num_outputs: int) -> list[Property]:
    if (args.spec is None) == (args.eps is None and args.data is None):
        raise CertfxError("give either a VNN-LIB SPEC file or --eps with --data, not both")
    if args.spec is not None:
        from certfx.frontends.vnnlib import read_vnnlib

        return read_vnnlib(args.spec, input_shape=input_shape)
    if args.eps is None or args.data is None:
        raise CertfxError("dataset robustness needs both --eps and --data")
    if not args.eps >= 0:
        raise InvalidValueError(f"--eps must be >= 0, got {args.eps}")
    if args.limit is not None and args.limit < 1:
        raise CertfxError("--limit must be >= 1")
    from certfx.data import read_image_csv

    x, y = read_image_csv(args.data, input_shape, args.label_column, args.limit,
                          dtype=torch.float64)
    if int(y.max()) >= num_outputs:
        raise InvalidValueError(f"{args.data.name}: label {int(y.max())} but the model has "
                                f"{num_outputs} outputs")
    lo = (x - args.eps).clamp(args.lower, args.upper)
    hi = (x + args.eps).clamp(args.lower, args.upper)
    return [Property(lo[i], hi[i], UnsafeRegion.misclassified(int(y[i]), num_outputs),
                     f"{args.data.name}#{i}") for i in range(x.shape[0])]


def vnncomp_answer(results: list[Any]) -> str:
    """The VNN-COMP results text for a file's properties (see the module docstring)."""
    from certfx.frontends.vnnlib import write_counterexample
    from certfx.verify.cascade import combined_verdict

    verdict = combined_verdict(results)
    answer = _ANSWER[verdict.value]
    if answer != "sat":
        return answer + "\n"
    hit = next(r for r in results if r.counterexample is not None)
    out = io.StringIO()
    out.write("sat\n")
    write_counterexample(out, hit.counterexample, hit.output)
    return out.getvalue()


def cmd_verify(args: argparse.Namespace, console: Console) -> int:
    """``certfx verify`` (see the module docstring)."""
    from certfx.inputs import write_json_atomic, write_text_atomic
    from certfx.verify.cascade import CascadeOptions, Verifier

    if args.model.suffix.lower() != ".onnx":
        raise CertfxError(f"MODEL must be an .onnx file, got '{args.model}'")
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    options = CascadeOptions(methods=methods, timeout=args.timeout,
                             dtype=getattr(torch, args.dtype), tolerance=args.tolerance)
    for target in (args.json, args.results):
        if target is not None and not target.parent.is_dir():
            raise CertfxError(f"cannot write '{target}': folder '{target.parent}' does not exist")
    model, example = _with_normalization(args)
    verifier = Verifier(model, example_input=example, options=options)
    props = _properties(args, verifier.input_shape, verifier.num_outputs)
    for prop in props:
        verifier.check(prop)  # every property fits before any work
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("verifying", total=len(props))
        for prop in props:
            def stage(name: str, prop: Property = prop) -> None:
                progress.update(task, description=f"{prop.name}: {name}")
            results.append(verifier.verify(prop, stage))
            progress.advance(task)
    console.print(summary_table(results, options))
    if len(props) <= 20 or args.spec is not None:
        console.print(property_table(results))
    if args.json is not None:
        write_json_atomic(args.json, {"model": str(args.model), "dtype": args.dtype,
                                      "tolerance": options.margin_tolerance,
                                      "timeout": args.timeout, "methods": list(methods),
                                      "properties": [r.to_json() for r in results]})
        console.print(Text(f"wrote {args.json}"))
    if args.results is not None:
        write_text_atomic(args.results, vnncomp_answer(results))
        console.print(Text(f"wrote {args.results}"))
    return 0


def summary_table(results: list[Any], options: Any) -> Table:
    """Per stage: the properties it decided, and the time spent in it."""
    decided: dict[str, Counter[str]] = defaultdict(Counter)
    seconds: dict[str, float] = defaultdict(float)
    for r in results:
        for stage, s in r.stage_seconds.items():
            seconds[stage] += s
        decided[r.stage or "—"][r.verdict.value] += 1
    table = Table(title=f"{len(results)} properties ({str(options.dtype)[6:]}, tolerance "
                        f"{options.margin_tolerance:g}, timeout {options.timeout:g} s each)",
                  title_justify="left")
    for column in ("stage", "verified", "falsified", "unknown", "timeout", "time"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    stages = [s for s in dict.fromkeys([*seconds, *decided]) if s != "—"] + ["—"]
    for stage in stages:
        c = decided.get(stage, Counter())
        if stage == "—" and not c:
            continue
        table.add_row(stage if stage != "—" else "(undecided)",
                      *(str(c[v]) for v in ("verified", "falsified", "unknown", "timeout")),
                      f"{seconds.get(stage, 0.0):.2f} s")
    total = Counter(r.verdict.value for r in results)
    table.add_row(Text("total", style="bold"),
                  *(str(total[v]) for v in ("verified", "falsified", "unknown", "timeout")),
                  f"{sum(r.seconds for r in results):.2f} s")
    return table


def property_table(results: list[Any]) -> Table:
    """One row per property: verdict, deciding stage, time."""
    table = Table(title="properties", title_justify="left")
    for column in ("property", "verdict", "stage", "time"):
        table.add_column(column, justify="right" if column == "time" else "left")
    style = {"verified": "green", "falsified": "red"}
    for r in results:
        table.add_row(Text(r.name), Text(r.verdict.value, style=style.get(r.verdict.value, "")),
                      r.stage or "—", f"{r.seconds:.2f} s")
    return table
