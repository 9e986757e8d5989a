"""The ``certfx`` command: inspect, compile and bound ONNX models from the shell.

Subcommands (``certfx SUBCOMMAND --help`` shows each one's options and an example):

* ``inspect MODEL``: the canonical graph as a table (op, per-example shape, perturbed, source);
  ``--check`` compares it with onnxruntime on random inputs.
* ``compile MODEL -o DIR``: the generated bound module, written as an importable folder.
* ``bounds MODEL --eps E --input FILE``: bounds on every logit (and, with labels, certified
  margins) for each input of a ``.npy``/``.pt`` file.
* ``verify MODEL (SPEC.vnnlib | --eps E --data FILE)``: the verification cascade (attack,
  bounds, input splitting, MILP), with the VNN-COMP result format (:mod:`certfx.cli_verify`).
* ``train --dataset D --model M --method X``: certified training (:mod:`certfx.cli_train`).
* ``ace compose|train|certify|sweep``: certify-or-predict compositions (:mod:`certfx.cli_ace`).

Exit status: 0 on success; 1 when ``inspect --check`` finds a difference above the tolerance;
2 for bad usage or input (any :class:`~certfx.errors.CertfxError`, missing files), printed as
one ``certfx: error: …`` line (``--debug`` shows the traceback); 3 for an internal error.

Example:
    >>> main(["--version"])
    certfx 0.1.0
    0
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.fx as fx
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

import certfx
from certfx.cli_ace import add_ace
from certfx.cli_train import add_train
from certfx.cli_verify import add_verify
from certfx.errors import CertfxError

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_CHECK_FAILED", "EXIT_ERROR",
           "EXIT_INTERNAL"]

EXIT_OK, EXIT_CHECK_FAILED, EXIT_ERROR, EXIT_INTERNAL = 0, 1, 2, 3
MODULE_CLASS = "CertifiedBounds"
MAX_ROWS = 50  # rows of the bounds table; --json has all of them


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``certfx`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit
    status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version and usage errors
        return stop.code if isinstance(stop.code, int) else EXIT_ERROR
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    try:
        return int(args.run(args, console))
    except (CertfxError, OSError) as err:
        if args.debug:
            traceback.print_exc()
        print(f"certfx: error: {_message(err)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("certfx: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug in certfx: say so, in one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"certfx: internal error: {type(err).__name__}: {err} (run with --debug for the "
              "traceback and please report it)", file=sys.stderr)
        return EXIT_INTERNAL


def _message(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError) and err.filename:
        return f"file '{err.filename}' does not exist; check the path"
    if isinstance(err, OSError) and err.filename:
        return f"{err.strerror or type(err).__name__}: '{err.filename}'"
    # One line: a multi-line message (every unsupported node, …) is joined with "; ".
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[0] + (" " + "; ".join(lines[1:]) if len(lines) > 1 else "")


# ---- the parser --------------------------------------------------------------------------------

class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples in the epilogs as written."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``certfx`` command and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    parser = argparse.ArgumentParser(
        prog="certfx", formatter_class=_Formatter,
        description="certfx compiles neural networks (ONNX) into PyTorch code that computes "
                    "certified bounds on their outputs over a set of inputs (an L-inf ball of "
                    "radius EPS around each input, clipped to [--lower, --upper]). EPS is in "
                    "input (pixel) space: normalization layers are part of the graph.",
        epilog="examples:\n"
               "  certfx inspect examples/models/demo_cnn.onnx --check\n"
               "  certfx compile examples/models/demo_cnn.onnx --domain box -o out/demo_box\n"
               "  certfx bounds examples/models/demo_cnn.onnx --eps 0.05 \\\n"
               "      --input examples/models/demo_inputs.npy "
               "--labels examples/models/demo_labels.npy\n"
               "  certfx verify examples/models/demo_cnn.onnx --eps 0.01 \\\n"
               "      --data examples/models/demo_data.csv\n\n"
               "exit status: 0 success, 1 check failed, 2 bad usage or input, 3 internal error")
    parser.add_argument("--version", action="version", version=f"certfx {certfx.__version__}",
                        help="print the version and exit")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full traceback of an error (also after the subcommand)")
    sub = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND", required=True)
    _add_inspect(sub, common)
    _add_compile(sub, common)
    _add_bounds(sub, common)
    add_verify(sub, common, _Formatter)
    add_train(sub, common, _Formatter)
    add_ace(sub, common, _Formatter)
    return parser


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", type=Path, help="path of an .onnx model file")


def _domain_arg(p: argparse.ArgumentParser) -> None:
    names = ", ".join(certfx.available_domains())
    p.add_argument("--domain", default="box",
                   help=f"abstract domain to compute bounds with ({names}; default: %(default)s)")


def _input_set_args(p: argparse.ArgumentParser, eps_required: bool) -> None:
    p.add_argument("--eps", type=float, required=eps_required, default=None if eps_required
                   else 0.0, help="radius of the ball around each input, in input (pixel) "
                                  "space" + ("" if eps_required else " (default: %(default)s)"))
    p.add_argument("--norm", choices=("linf", "l2"), default="linf",
                   help="the ball's norm (default: %(default)s); for l2 every domain bounds "
                        "the circumscribing box and back-substitution domains also the ball "
                        "itself (dual norm)")
    p.add_argument("--lower", type=float, default=0.0,
                   help="smallest valid input value; the ball is clipped to it "
                        "(default: %(default)s)")
    p.add_argument("--upper", type=float, default=1.0,
                   help="largest valid input value; the ball is clipped to it "
                        "(default: %(default)s)")


def _add_inspect(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "inspect", parents=[common], formatter_class=_Formatter,
        help="show the canonical graph of a model",
        description="Load MODEL, convert it to certfx's canonical graph of core ops and print "
                    "one row per node: its op, per-example shape (B = batch), whether it depends "
                    "on the perturbed input, and where it came from (ONNX node).",
        epilog="example:\n  certfx inspect examples/models/demo_cnn.onnx --check "
               "--dump-passes out/passes")
    _model_arg(p)
    p.add_argument("--check", action="store_true",
                   help="also run the canonical graph and onnxruntime on random inputs and "
                        "fail (exit 1) when they differ by more than --tol")
    p.add_argument("--samples", type=int, default=4,
                   help="random inputs (uniform in [0, 1]) for --check (default: %(default)s)")
    p.add_argument("--tol", type=float, default=1e-4,
                   help="largest allowed |difference| for --check, relative to max(1, largest "
                        "|output|) (default: %(default)s)")
    p.add_argument("--dump-passes", metavar="DIR", type=Path, default=None,
                   help="write the graph after every loading pass to DIR/NN_<pass>.txt")
    p.set_defaults(run=cmd_inspect)


def _add_compile(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "compile", parents=[common], formatter_class=_Formatter,
        help="generate the bound computation of a model",
        description="Compile MODEL for a domain and write the generated bound module to DIR as "
                    "an importable Python package (module.py, state_dict.pt, __init__.py) plus "
                    "report.json. Its class CertifiedBounds has forward(lower, upper, spec=None) "
                    "taking elementwise input bounds of shape (batch, *input_shape). Nothing is "
                    "written if anything fails.",
        epilog="example:\n  certfx compile examples/models/demo_cnn.onnx --domain box "
               "-o out/demo_box --print\n"
               "  python -c \"import sys; sys.path.insert(0, 'out'); import demo_box; "
               "print(demo_box.CertifiedBounds())\"")
    _model_arg(p)
    _domain_arg(p)
    p.add_argument("-o", "--output", metavar="DIR", type=Path, default=None,
                   help="folder to write the module to (new, empty, or an earlier export, "
                        "which is replaced)")
    p.add_argument("--print", dest="print_code", action="store_true",
                   help="print the generated code")
    _input_set_args(p, eps_required=False)
    p.set_defaults(run=cmd_compile)


def _add_bounds(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bounds", parents=[common], formatter_class=_Formatter,
        help="bound the outputs of a model around given inputs",
        description="Compute, for every input in FILE, lower and upper bounds on each output "
                    "(logit) of MODEL over the L-inf ball of radius EPS around the input. With "
                    "labels it also bounds the margins logit[label] - logit[j] from below; the "
                    "input is certified when all of them are positive.",
        epilog="example:\n  certfx bounds examples/models/demo_cnn.onnx --eps 0.05 "
               "--input examples/models/demo_inputs.npy \\\n"
               "      --labels examples/models/demo_labels.npy --json out/bounds.json")
    _model_arg(p)
    _input_set_args(p, eps_required=True)
    p.add_argument("--input", metavar="FILE", type=Path, required=True,
                   help="inputs: a .npy or .pt file of shape (N, *input_shape), or a single "
                        "input without the batch dim")
    _domain_arg(p)
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--labels", metavar="FILE", type=Path, default=None,
                        help="true classes, a .npy or .pt file of N integers")
    labels.add_argument("--y", metavar="Y", type=int, nargs="+", default=None,
                        help="true classes given inline, one integer per input")
    p.add_argument("--json", metavar="OUT", type=Path, default=None,
                   help='write {"lower": [[...]], "upper": [[...]]} (one row per input; with '
                        'labels also "labels", "margin_lower", "certified") to OUT')
    p.add_argument("--batch-size", type=int, default=256,
                   help="inputs bounded at once (default: %(default)s)")
    p.add_argument("--layers", action="store_true",
                   help="also count the unstable ReLUs (input bounds straddling 0) per layer")
    p.add_argument("--compare", metavar="D1,D2,...", default=None,
                   help="compare domains side by side instead (e.g. box,deepz,deeppoly,crown): "
                        "time, mean logit width, certified inputs, unstable ReLUs per layer")
    p.set_defaults(run=cmd_bounds)


# ---- the subcommands ---------------------------------------------------------------------------

def _load(path: Path, dump: Path | None = None) -> fx.GraphModule:
    if path.suffix.lower() != ".onnx":
        raise CertfxError(f"MODEL must be an .onnx file, got '{path}'")
    return certfx.load(path, dump=dump if dump is not None else False)


def _text(value: object, style: str = "") -> Text:
    """Literal text (no rich markup: node names may contain brackets)."""
    return Text(str(value), style=style)


def _shape(shape: object) -> str:
    return "B×" + "×".join(map(str, shape)) if isinstance(shape, tuple) else "—"


def graph_table(gm: fx.GraphModule, title: str = "") -> Table:
    """A rich table of a canonical graph: node, op, per-example shape, perturbed, source."""
    from certfx.passes.normalize import _where

    table = Table(title=title or None, title_justify="left")
    for header in ("node", "op", "shape", "perturbed", "source"):
        table.add_column(header, overflow="fold")
    for n in gm.graph.nodes:
        if n.op == "call_function":
            op = getattr(n.target, "__name__", str(n.target))
        else:
            op = n.op
        if n.op == "get_attr":
            value = getattr(gm, str(n.target), None)
            shape = ("—" if not isinstance(value, torch.Tensor) else
                     f"= {value.item():.6g}" if value.numel() == 1 and value.dim() == 0 else
                     "×".join(map(str, value.shape)))
        else:
            shape = _shape(n.meta.get("certfx.shape"))
        perturbed = n.meta.get("certfx.perturbed")
        mark = {True: ("yes", "bold"), False: ("no", "dim")}.get(perturbed, ("?", ""))
        table.add_row(_text(n.name), _text(op), _text(shape), _text(*mark),
                      _text(_where(n), "dim"))
    return table


def op_counts(gm: fx.GraphModule) -> Counter[str]:
    """How often each core op occurs in ``gm``."""
    return Counter(getattr(n.target, "__name__", str(n.target))
                   for n in gm.graph.nodes if n.op == "call_function")


def cmd_inspect(args: argparse.Namespace, console: Console) -> int:
    """``certfx inspect``: print the canonical graph; ``--check`` against onnxruntime."""
    if args.samples < 1 or not args.tol >= 0:
        raise CertfxError("--samples must be >= 1 and --tol >= 0")
    gm = _load(args.model, args.dump_passes)
    console.print(graph_table(gm, f"{args.model.name}: canonical graph"))
    counts = op_counts(gm)
    console.print(_text(
        f"input B×{'×'.join(map(str, gm.meta['certfx.input_shape']))}, output "
        f"B×{'×'.join(map(str, gm.meta['certfx.output_shape']))}; {len(gm.graph.nodes)} nodes, "
        f"{sum(counts.values())} ops: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))))
    if args.dump_passes is not None:
        console.print(_text(f"graphs after each pass written to {args.dump_passes}/"))
    if not args.check:
        return EXIT_OK
    from certfx.reference import compare_with_onnx, run_onnx

    diff = compare_with_onnx(gm, args.model, samples=args.samples)
    scale = max(1.0, float(run_onnx(args.model, torch.full(
        (1, *gm.meta["certfx.input_shape"]), 0.5)).abs().max()))
    ok = diff <= args.tol * scale
    verdict = Text("OK", "bold green") if ok else Text("FAILED", "bold red")
    console.print(Text(f"check: max |canonical − onnxruntime| = {diff:.3g} over {args.samples} "
                       f"random inputs (tolerance {args.tol * scale:.3g}): ") + verdict)
    return EXIT_OK if ok else EXIT_CHECK_FAILED


def _input_spec(args: argparse.Namespace) -> certfx.specs.InputSpec:
    """The ball of ``--eps``/``--norm``, clipped to ``[--lower, --upper]`` (validated)."""
    ball = certfx.specs.L2Ball if getattr(args, "norm", "linf") == "l2" else certfx.LinfBall
    return ball(args.eps, args.lower, args.upper)


def _compile(args: argparse.Namespace, gm: fx.GraphModule) -> certfx.CertifiedModule:
    return certfx.compile(gm, domain=args.domain, input_spec=_input_spec(args))


def cmd_compile(args: argparse.Namespace, console: Console) -> int:
    """``certfx compile``: generate the bound module, write it with :mod:`certfx.export`."""
    if args.output is None and not args.print_code:
        raise CertfxError("nothing to do: pass -o DIR to write the module and/or --print")
    gm = _load(args.model)
    counts, nodes = op_counts(gm), len(gm.graph.nodes)
    cm = _compile(args, gm)
    if args.print_code:
        console.print(Syntax(cm.code.strip(), "python", theme="ansi_dark", word_wrap=True))
    if args.output is None:
        return EXIT_OK
    from certfx.export import export_module

    report = {
        "model": str(args.model), "domain": cm.domain, "certfx_version": certfx.__version__,
        "input_shape": list(cm.input_shape), "output_shape": list(cm.output_shape),
        "nodes": nodes, "ops": dict(sorted(counts.items())),
        "input_spec": {"eps": args.eps, "lower": args.lower, "upper": args.upper},
        "module": {"file": "module.py", "class": MODULE_CLASS,
                   "forward": "forward(lower, upper, spec=None) -> element with .lower/.upper"},
    }
    header = (f"Bounds of {args.model.name} in the {cm.domain} domain, generated by certfx "
              f"{certfx.__version__}.\n\n"
              f"{MODULE_CLASS}()(lower, upper) takes elementwise input bounds of shape "
              f"(batch, {', '.join(map(str, cm.input_shape))}) — for an L-inf ball, "
              f"(x - eps).clamp({args.lower}, {args.upper}) and (x + eps).clamp(...) — and "
              f"returns an element whose .lower/.upper bound the outputs.\n"
              "Passing spec, a (batch, m, outputs) C-matrix, bounds spec @ outputs instead.")
    folder = export_module(cm.bounds, args.output, module_name=MODULE_CLASS, header=header,
                           extra_files={"report.json": json.dumps(report, indent=1) + "\n"})
    console.print(_text(f"compiled {args.model.name} for the {cm.domain} domain "
                        f"({sum(counts.values())} ops) → {folder}/ "
                        "(module.py, state_dict.pt, report.json)"))
    return EXIT_OK


def cmd_bounds(args: argparse.Namespace, console: Console) -> int:
    """``certfx bounds``: per-input logit bounds (and certified margins with labels)."""
    from certfx.inputs import check_range, read_inputs, read_labels, write_json_atomic

    if args.batch_size < 1:
        raise CertfxError("--batch-size must be >= 1")
    spec = _input_spec(args)  # validates eps and the range
    gm = _load(args.model)
    dtype = next((t.dtype for t in gm.state_dict().values() if t.is_floating_point()),
                 torch.float32)
    x = read_inputs(args.input, gm.meta["certfx.input_shape"], dtype=dtype)
    check_range(x, args.lower, args.upper, f"inputs in {args.input.name}")
    labels_source = args.labels if args.labels is not None else args.y
    y = read_labels(labels_source, x.shape[0]) if labels_source is not None else None
    if args.compare is not None:
        return _compare(args, gm, spec, x, y, console)
    cm = certfx.compile(gm, domain=args.domain, input_spec=spec)
    lows, highs, margins, preds = [], [], [], []
    with torch.no_grad():
        for k in range(0, x.shape[0], args.batch_size):
            xb = x[k:k + args.batch_size]
            lo, hi = cm.certified_forward(xb)
            lows.append(lo.reshape(len(xb), -1))
            highs.append(hi.reshape(len(xb), -1))
            preds.append(cm(xb).reshape(len(xb), -1).argmax(1))
            if y is not None:
                margins.append(cm.certified_forward(xb, y=y[k:k + args.batch_size]))
    lower, upper, pred = torch.cat(lows), torch.cat(highs), torch.cat(preds)
    result: dict[str, object] = {"lower": lower.tolist(), "upper": upper.tolist()}
    certified = None
    if y is not None:
        margin = torch.cat(margins)
        certified = (margin > 0).all(1)
        result.update(labels=y.tolist(), margin_lower=margin.tolist(),
                      certified=certified.tolist())
    if args.json is not None:
        write_json_atomic(args.json, result)
    console.print(_bounds_table(args, lower, upper, pred, y, certified))
    if certified is not None:
        console.print(_text(f"certified {int(certified.sum())}/{len(certified)} inputs at "
                            f"eps={args.eps:g} with the {cm.domain} domain", "bold"))
    if args.layers:
        from certfx.report import compare_domains, comparison_tables

        console.print(comparison_tables(compare_domains(gm, [cm.domain], spec, x, y))[-1])
    if args.json is not None:
        console.print(_text(f"wrote {args.json}"))
    return EXIT_OK


def _compare(args: argparse.Namespace, gm: fx.GraphModule, spec: certfx.LinfBall,
             x: torch.Tensor, y: torch.Tensor | None, console: Console) -> int:
    """``certfx bounds --compare``: the domains' tightness side by side."""
    from certfx.report import compare_domains, comparison_tables

    domains = [d.strip() for d in args.compare.split(",") if d.strip()]
    if not domains:
        raise CertfxError("--compare needs a comma-separated list of domains, e.g. box,crown")
    for domain in domains:
        certfx.get_domain(domain)  # unknown names fail before any work
    for table in comparison_tables(compare_domains(gm, domains, spec, x, y)):
        console.print(table)
    return EXIT_OK


def _bounds_table(args: argparse.Namespace, lower: torch.Tensor, upper: torch.Tensor,
                  pred: torch.Tensor, y: torch.Tensor | None,
                  certified: torch.Tensor | None) -> Table:
    table = Table(title=f"lower / upper bounds on each output, eps={args.eps:g} "
                        f"({args.domain} domain)", title_justify="left", show_lines=True)
    table.add_column("#", justify="right")
    table.add_column("pred", justify="right")
    if y is not None:
        table.add_column("label", justify="right")
        table.add_column("certified", no_wrap=True)
    for j in range(lower.shape[1]):
        table.add_column(f"out{j}", justify="right")
    for i in range(min(lower.shape[0], MAX_ROWS)):
        row = [_text(i), _text(int(pred[i]))]
        if y is not None and certified is not None:
            ok = bool(certified[i])
            row += [_text(int(y[i])), _text("yes" if ok else "no", "green" if ok else "red")]
        row += [_text(f"{float(lower[i, j]):.2f}\n{float(upper[i, j]):.2f}",
                      "bold" if y is not None and j == int(y[i]) else "")
                for j in range(lower.shape[1])]
        table.add_row(*row)
    if lower.shape[0] > MAX_ROWS:
        table.caption = f"first {MAX_ROWS} of {lower.shape[0]} inputs; --json writes all"
    return table
