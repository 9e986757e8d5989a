"""``certfx ace``: certify-or-predict compositions (ACE, paper 000) from the command line.

* ``certfx ace compose --core C --cert B --select entropy|selnet --threshold T -o ace.onnx``:
  the composed network (Eq. 2) as ONNX, checked against the composed graph with onnxruntime;
* ``certfx ace train --cert B --dataset mnist --eps E -o selnet.onnx``: selection labels
  (Eq. 3) and a certifiably trained selection network (Sec. 4.1.1);
* ``certfx ace certify … --eps E``: end-to-end certification (Sec. 4.2) with natural, adversarial
  (App. E) and certified accuracy, which branch answered and whether the selection was proven;
* ``certfx ace sweep …``: the accuracies over a range of thresholds from one certification run,
  as CSV and as a natural-vs-certified plot (Figure 2).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from certfx.errors import InvalidValueError

__all__ = ["add_ace"]

_EPILOG = """examples:
  certfx ace train --cert cert.onnx --dataset mnist --eps 0.1 --epochs 5 -o selnet.onnx
  certfx ace compose --core core.onnx --cert cert.onnx --select selnet --selnet selnet.onnx \\
      --threshold 0 -o ace.onnx
  certfx ace certify --core core.onnx --cert cert.onnx --select entropy --threshold 0.5 \\
      --dataset mnist --limit 200 --eps 0.1 --domain deepz --records out/records.pt
  certfx ace sweep --records out/records.pt --csv out/sweep.csv --plot out/sweep.png"""


def add_ace(sub: Any, common: argparse.ArgumentParser, formatter: type) -> None:
    """Register ``certfx ace`` and its subcommands."""
    p = sub.add_parser("ace", parents=[common], formatter_class=formatter, epilog=_EPILOG,
                       help="certify-or-predict: compose, train, certify, sweep (ACE)",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    acts = p.add_subparsers(title="actions", metavar="ACTION", required=True)

    def networks(q: argparse.ArgumentParser, threshold: bool = True) -> None:
        q.add_argument("--core", type=Path, required=True, help="the core network (ONNX)")
        q.add_argument("--cert", type=Path, required=True,
                       help="the certification network (ONNX)")
        q.add_argument("--select", choices=("entropy", "selnet"), default="entropy",
                       help="selection mechanism (default: entropy)")
        q.add_argument("--selnet", type=Path, default=None,
                       help="the selection network (ONNX, 1 or 2 outputs) for --select selnet")
        if threshold:
            q.add_argument("--threshold", type=float, required=True,
                           help="T: entropy < T, or selection score > T, selects --cert")

    def data(q: argparse.ArgumentParser, split: str) -> None:
        q.add_argument("--dataset", choices=("mnist", "cifar10", "digits"), default="mnist")
        q.add_argument("--data", type=Path, default=None,
                       help="your copy of the data set (file or folder); default: the shared "
                            "files")
        q.add_argument("--limit", type=int, default=None,
                       help=f"use only the first N {split} examples")
        q.add_argument("--eps", type=float, required=True, help="L-inf radius (pixel space)")

    c = acts.add_parser("compose", parents=[common], formatter_class=formatter,
                        help="compose core, certification and selection into one ONNX model")
    networks(c)
    c.add_argument("-o", "--output", type=Path, required=True, help="the composed .onnx")
    c.set_defaults(run=cmd_compose)

    t = acts.add_parser("train", parents=[common], formatter_class=formatter,
                        help="train a selection network on Eq. 3's labels")
    t.add_argument("--cert", type=Path, required=True, help="the certification network (ONNX)")
    data(t, "training")
    t.add_argument("--labels-by", choices=("certified", "adversarial", "natural"),
                   default="certified", help="selection labels (default: certified, Eq. 3)")
    t.add_argument("--label-domain", default="box",
                   help="domain certifying the labels (default: box)")
    t.add_argument("--method", default="ibp",
                   help="certfx.train method for the selection network (default: ibp)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("-o", "--output", type=Path, required=True, help="the selection .onnx")
    t.set_defaults(run=cmd_train)

    for name, helptext in (("certify", "end-to-end certification at one threshold"),
                           ("sweep", "accuracies over many thresholds, CSV and plot")):
        q = acts.add_parser(name, parents=[common], formatter_class=formatter, help=helptext)
        if name == "sweep":
            q.add_argument("--records", type=Path, default=None,
                           help="records written by 'certfx ace certify --records' (then no "
                                "network or data arguments are needed)")
            q.add_argument("--thresholds", default=None,
                           help="comma-separated thresholds (default: 21 spanning the scores)")
            q.add_argument("--csv", type=Path, default=None, help="write the sweep as CSV")
            q.add_argument("--plot", type=Path, default=None,
                           help="write the natural-vs-certified plot (PNG)")
        q.add_argument("--ace", type=Path, default=None,
                       help="a composed model written by 'certfx ace compose' (instead of "
                            "--core/--cert/--select/--selnet)")
        for arg in ("--core", "--cert"):
            q.add_argument(arg, type=Path, default=None, help=f"the {arg[2:]} network (ONNX)")
        q.add_argument("--select", choices=("entropy", "selnet"), default="entropy")
        q.add_argument("--selnet", type=Path, default=None)
        q.add_argument("--threshold", type=float, default=None,
                       help="T (see compose; default: the one stored in --ace)")
        q.add_argument("--dataset", choices=("mnist", "cifar10", "digits"), default="mnist")
        q.add_argument("--data", type=Path, default=None)
        q.add_argument("--limit", type=int, default=None)
        q.add_argument("--eps", type=float, default=None, required=name == "certify")
        q.add_argument("--domain", default="deepz",
                       help="domain certifying the certification network (default: deepz)")
        q.add_argument("--score-domain", default=None,
                       help="domain bounding the selection score (default: --domain if it can, "
                            "else deepz)")
        q.add_argument("--pgd-steps", type=int, default=40)
        q.add_argument("--pgd-restarts", type=int, default=1)
        q.add_argument("--certify-core", action="store_true",
                       help="also try to certify the core network (the paper assumes it fails)")
        if name == "certify":
            q.add_argument("--records", type=Path, default=None,
                           help="save the per-example records for 'certfx ace sweep'")
            q.add_argument("--json", type=Path, default=None, help="write the results as JSON")
        q.set_defaults(run=cmd_certify if name == "certify" else cmd_sweep)


def _selection(args: argparse.Namespace) -> Any:
    from certfx.passes import Entropy, SelectionNet

    if args.select == "entropy":
        if args.selnet is not None:
            raise InvalidValueError("--selnet is for --select selnet")
        return Entropy(args.threshold)
    if args.selnet is None:
        raise InvalidValueError("--select selnet needs --selnet FILE.onnx (train one with "
                                "'certfx ace train')")
    return SelectionNet(args.threshold, network=str(args.selnet))


def _compose(args: argparse.Namespace) -> Any:
    from certfx.passes import insert_ace

    for path in (args.core, args.cert):
        if not path.exists():
            raise FileNotFoundError(2, "No such file", str(path))
    return insert_ace(str(args.core), str(args.cert), _selection(args))


def cmd_compose(args: argparse.Namespace, console: Console) -> int:
    import numpy as np

    from certfx.ace.onnx_io import export_ace

    ace = _compose(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    x = torch.rand(8, *ace.meta["certfx.input_shape"])
    export_ace(ace, args.output)
    try:
        import onnxruntime as ort
    except ImportError:
        note = "not checked (onnxruntime is not installed)"
    else:
        got = ort.InferenceSession(str(args.output)).run(None, {"x": x.numpy()})[0]
        diff = float(np.abs(got - ace(x).detach().numpy()).max())
        if diff > 1e-4:
            args.output.unlink()
            raise InvalidValueError(f"the exported model differs from the composed graph by "
                                    f"{diff:.3g}; nothing was written")
        note = f"onnxruntime agrees with the composed graph (max diff {diff:.2g})"
    console.print(f"wrote {args.output} ({args.select}, T = {args.threshold}); {note}; "
                  f"'certfx ace certify --ace {args.output}' reads it back")
    return 0


def _test_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    from certfx.data import load_dataset

    ds = load_dataset(args.dataset, "test", path=args.data, limit=args.limit)
    return ds.images, ds.labels


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    import certfx
    from certfx.ace.train import selection_labels, train_selection
    from certfx.data import load_dataset

    ds = load_dataset(args.dataset, "train", path=args.data, limit=args.limit)
    cert = certfx.load(str(args.cert))
    console.print(f"selection labels ({args.labels_by}, {args.label_domain}) on "
                  f"{ds.images.shape[0]} training images …")
    labels = selection_labels(cert, ds.images, ds.labels, args.eps, args.label_domain,
                              by=args.labels_by)
    console.print(f"{int(labels.sum())} of {labels.numel()} selected "
                  f"({100 * float(labels.float().mean()):.1f}%)")
    sel = train_selection(cert, ds.images, labels, args.eps, method=args.method,
                          epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp.onnx")
    torch.onnx.export(sel, (ds.images[:1],), str(tmp), input_names=["x"], output_names=["s"],
                      dynamic_axes={"x": {0: "batch"}, "s": {0: "batch"}}, dynamo=False)
    os.replace(tmp, args.output)
    with torch.no_grad():
        acc = float((sel(ds.images).argmax(1) == labels).float().mean())
    console.print(f"wrote {args.output} (training accuracy on the selection labels "
                  f"{100 * acc:.1f}%; use --select selnet --selnet {args.output})")
    return 0


def _collect(args: argparse.Namespace) -> Any:
    from certfx.ace import collect

    if args.eps is None:
        raise InvalidValueError("give --eps (or --records from a certify run)")
    ace = _composed(args)
    x, y = _test_data(args)
    return collect(ace, x, y, args.eps, domain=args.domain, score_domain=args.score_domain,
                   pgd_steps=args.pgd_steps, pgd_restarts=args.pgd_restarts,
                   certify_core=args.certify_core)


def _accuracy_table(rows: list[Any], records: Any, title: str) -> Table:
    table = Table(title=title)
    for col in ("model", "T", "natural", "adversarial", "certified", "selected",
                "selection proven"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for r in rows:
        table.add_row("ACE", f"{r.threshold:g}", f"{100 * r.natural:.1f}%",
                      f"{100 * r.adversarial:.1f}%", f"{100 * r.certified:.1f}%",
                      f"{100 * r.selected:.1f}%", f"{100 * r.selection_certified:.1f}%")
    for name in ("cert", "core"):
        b = records.branch(name)
        table.add_row(f"{name} alone", "", f"{100 * b['natural']:.1f}%",
                      f"{100 * b['adversarial']:.1f}%",
                      f"{100 * b['certified']:.1f}%" if name == "cert" or
                      bool(records.core_certified.any()) else "not tried", "", "")
    return table


def _composed(args: argparse.Namespace) -> Any:
    """The composed graph of ``--ace FILE`` or of ``--core/--cert/--select``; sets
    ``args.threshold`` to the stored one where none was given."""
    if args.ace is not None:
        from certfx.ace.onnx_io import load_ace

        if args.core is not None or args.cert is not None or args.selnet is not None:
            raise InvalidValueError("--ace replaces --core, --cert and --selnet; give either")
        ace = load_ace(args.ace)
        if args.threshold is None:
            args.threshold = ace.meta["certfx.ace"]["threshold"]
        return ace
    if args.core is None or args.cert is None:
        raise InvalidValueError("give --ace FILE, or --core and --cert")
    if args.threshold is None:
        args.threshold = 0.0 if args.select == "selnet" else 1.0
    return _compose(args)


def cmd_certify(args: argparse.Namespace, console: Console) -> int:
    if args.threshold is None and args.ace is None:
        raise InvalidValueError("give --threshold T (or --ace FILE with its stored threshold)")
    records = _collect(args)
    result = records.at(args.threshold)
    d = records.decide(args.threshold)
    n = int(records.score.numel())
    console.print(_accuracy_table([result], records,
                                  f"ACE ({records.select}) at eps {args.eps}, {n} examples, "
                                  f"{args.domain}"))
    both = int((d["cert_reachable"] & d["core_reachable"]).sum())
    console.print(f"answered by the certification network: {int(d['answer_cert'].sum())}, by "
                  f"the core: {n - int(d['answer_cert'].sum())}; selection not proven (both "
                  f"branches reachable): {both}")
    if args.records is not None:
        args.records.parent.mkdir(parents=True, exist_ok=True)
        records.save(str(args.records))
        console.print(f"wrote {args.records}")
    if args.json is not None:
        per_example = [{"index": i, "branch": "cert" if bool(d["answer_cert"][i]) else "core",
                        "selection_certified": bool(d["cert_reachable"][i] ^
                                                    d["core_reachable"][i]),
                        **{k: bool(d[k][i]) for k in ("natural", "adversarial", "certified")}}
                       for i in range(n)]
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "eps": args.eps, "domain": args.domain, "select": records.select,
            "result": result.to_json(), "cert_alone": records.branch("cert"),
            "core_alone": records.branch("core"), "examples": per_example}, indent=1))
        console.print(f"wrote {args.json}")
    return 0


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    from certfx.ace import AceRecords, default_thresholds, plot, sweep, write_csv

    records = AceRecords.load(str(args.records)) if args.records is not None else \
        _collect(args)
    if args.thresholds:
        try:
            thresholds = [float(v) for v in args.thresholds.split(",") if v.strip()]
        except ValueError as err:
            raise InvalidValueError(f"--thresholds must be numbers separated by commas: "
                                    f"{err}") from err
    else:
        thresholds = default_thresholds(records)
    rows = sweep(records, thresholds)
    console.print(_accuracy_table(rows, records, f"ACE ({records.select}) threshold sweep, eps "
                                                 f"{records.eps}, {records.domain}"))
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        write_csv(rows, args.csv)
        console.print(f"wrote {args.csv}")
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot({f"ACE ({records.select})": rows}, {"certification network":
                                                 records.branch("cert")}, args.plot,
             title=f"eps = {records.eps}")
        console.print(f"wrote {args.plot}")
    return 0
