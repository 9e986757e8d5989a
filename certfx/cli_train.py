"""``certfx train``: certified training from the command line.

Trains a model of the zoo (``--model cnn7``) or your own (``--model file.py:factory``) on MNIST
or CIFAR-10 with one of the methods of :mod:`certfx.train`, then evaluates natural, PGD and
certified accuracy on the test set. ``--out DIR`` receives ``checkpoint.pt`` (written every
epoch; a later run with the same ``--out`` resumes from it), ``model.pt`` (the state dict),
``model.onnx`` and ``run.json`` (every setting, the per-epoch history and the results).
Every hyperparameter of the methods has the paper's default and a flag below.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import time
import typing
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from certfx.errors import CertfxError, InvalidValueError

__all__ = ["add_train", "cmd_train"]


def _method_fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Every method option: flag name -> [(method, field)]."""
    from certfx.train import METHODS, get_method

    get_method("ibp")  # loads the built-in methods
    flags: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for name, cls in sorted(METHODS.items()):
        for f in dataclasses.fields(cls.Options):
            flags.setdefault(f.name, []).append((name, f))
    return flags


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is bool:
        return lambda s: {"true": True, "1": True, "yes": True, "false": False, "0": False,
                          "no": False}[s.lower()]
    if typing.get_origin(base) is tuple:
        return lambda s: tuple(v.strip() for v in s.split(",") if v.strip())
    return base


def add_train(sub: Any, common: argparse.ArgumentParser, formatter: type) -> None:
    """Register the ``train`` subcommand."""
    from certfx.train import METHODS
    from certfx.train.evaluate import CERT_CHOICES

    fields = _method_fields()
    p = sub.add_parser(
        "train", parents=[common], formatter_class=formatter,
        help="certified training (IBP, CROWN-IBP, SABR, TAPS, STAPS, COLT, PGD, standard)",
        description=__doc__.split("\n\n", 1)[1],
        epilog="examples:\n"
               "  certfx train --dataset mnist --model small_cnn --method sabr --eps 0.1 \\\n"
               "      --epochs 10 --out runs/sabr\n"
               "  certfx train --dataset mnist --model cnn7 --method taps --eps 0.1 "
               "--split-relus 1\n")
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default="mnist", help="mnist, cifar10 or digits (8x8)")
    g.add_argument("--data", type=Path, help="your copy of the training data (default: the "
                                             "shared folder or $CERTFX_DATA)")
    g.add_argument("--test-data", type=Path, help="your copy of the test data")
    g.add_argument("--limit", type=int, help="use only the first N training examples")
    g.add_argument("--test-limit", type=int, help="evaluate on the first N test examples")
    g.add_argument("--model", default="small_cnn",
                   help="a model of the zoo (certfx.models) or FILE.py:NAME, a function "
                        "returning an nn.Module or a module object (default %(default)s)")
    g.add_argument("--no-augment", action="store_true",
                   help="no random crop and flip for CIFAR-10")
    g = p.add_argument_group("training")
    g.add_argument("--method", default="ibp", choices=sorted(METHODS) or None,
                   help="the training method (default %(default)s)")
    g.add_argument("--eps", type=float, required=True, help="training and test L-inf radius "
                                                            "(pixel space)")
    g.add_argument("--epochs", type=int, default=70, help="epochs (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=256, help="(default %(default)s)")
    g.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default "
                                                          "%(default)s)")
    g.add_argument("--eps-warmup", type=float, help="epochs at eps = 0 (default: the paper "
                                                    "schedule scaled to --epochs)")
    g.add_argument("--eps-ramp", type=float, help="epochs of the eps ramp (default: scaled)")
    g.add_argument("--eps-shape", default="smooth", choices=["smooth", "linear"])
    g.add_argument("--decay-epochs", help="comma-separated epochs of the lr decay (default: "
                                          "scaled from the paper's)")
    g.add_argument("--decay-factor", type=float, default=0.2, help="(default %(default)s)")
    g.add_argument("--grad-clip", type=float, default=10.0, help="max gradient norm, 0 = off")
    g.add_argument("--l1", type=float, default=0.0, help="L1 weight regularization")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    g.add_argument("--out", type=Path, help="folder for checkpoint.pt, model.onnx, run.json")
    g = p.add_argument_group("evaluation")
    g.add_argument("--cert", default="crown", choices=CERT_CHOICES,
                   help="certification after training (default %(default)s; 'cascade' runs "
                        "the verification cascade per example; 'colt' COLT's Sec. 6-7 "
                        "certification: alpha-crown, then partial MILP on the last 1 and 2 ReLU "
                        "layers)")
    g.add_argument("--cert-timeout", type=float, default=10.0,
                   help="seconds per example for --cert cascade and colt")
    g.add_argument("--pgd-eval-steps", type=int, default=50)
    g.add_argument("--pgd-eval-restarts", type=int, default=5)
    g = p.add_argument_group("method hyperparameters (each method's default is the paper's)")
    for name, users in fields.items():
        defaults = ", ".join(f"{m}: {f.default}" for m, f in users)
        cls = typing.cast(Any, METHODS[users[0][0]]).Options
        g.add_argument("--" + name.replace("_", "-"), dest="opt_" + name, metavar=name.upper(),
                       type=_field_type(cls, users[0][1]), default=None,
                       help=f"{users[0][1].metadata.get('help', '')} ({defaults})")
    p.set_defaults(run=cmd_train)


def _load_model(spec: str, dataset: str) -> torch.nn.Module:
    from certfx.models import MODELS, build_model

    if ":" not in spec:
        if spec not in MODELS:
            raise CertfxError(f"unknown model '{spec}'; choose one of {', '.join(MODELS)} or "
                              f"pass FILE.py:NAME")
        return build_model(spec, dataset)
    path, name = spec.rsplit(":", 1)
    if not Path(path).is_file():
        raise CertfxError(f"--model {spec}: file '{path}' does not exist")
    module_spec = importlib.util.spec_from_file_location("certfx_user_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, name):
        raise CertfxError(f"--model {spec}: '{path}' defines no '{name}'")
    obj = getattr(module, name)
    model = obj if isinstance(obj, torch.nn.Module) else obj()
    if not isinstance(model, torch.nn.Module):
        raise CertfxError(f"--model {spec}: '{name}' gave a {type(model).__name__}, not an "
                          f"nn.Module")
    return model


def _options(args: argparse.Namespace) -> Any:
    from certfx.train import get_method

    cls = get_method(args.method).Options
    own = {f.name for f in dataclasses.fields(cls)}
    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    foreign = sorted(set(given) - own)
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise InvalidValueError(f"{flags} not an option of method '{args.method}'; its options "
                                f"are {', '.join('--' + k.replace('_', '-') for k in own)}")
    return cls(**given)


def cmd_train(args: argparse.Namespace, console: Console) -> int:
    """Train, evaluate, and write the artifacts."""
    from certfx.data import load_dataset
    from certfx.train import TrainConfig, Trainer, evaluate

    decays = None
    if args.decay_epochs:
        try:
            decays = tuple(int(v) for v in args.decay_epochs.split(","))
        except ValueError:
            raise InvalidValueError(f"--decay-epochs takes comma-separated integers, got "
                                    f"{args.decay_epochs!r}") from None
    config = TrainConfig(method=args.method, options=_options(args), eps=args.eps,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         eps_warmup=args.eps_warmup, eps_ramp=args.eps_ramp,
                         eps_shape=args.eps_shape, decay_epochs=decays,
                         decay_factor=args.decay_factor, grad_clip=args.grad_clip, l1=args.l1,
                         seed=args.seed, dataset=args.dataset)
    train = load_dataset(args.dataset, "train", path=args.data, limit=args.limit)
    test = load_dataset(args.dataset, "test", path=args.test_data, limit=args.test_limit)
    torch.manual_seed(args.seed)
    model = _load_model(args.model, args.dataset)
    augment = None
    if args.dataset == "cifar10" and not args.no_augment:
        from certfx.data import RandomCropFlip
        augment = RandomCropFlip(size=32, padding=2)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), console=console, transient=False) as progress:
        task = progress.add_task("training", total=args.epochs, info="")
        step_task = progress.add_task("", total=1, info="", visible=False)

        def on_event(event: str, data: dict[str, Any]) -> None:
            if event == "epoch_start":
                progress.update(step_task, description=f"epoch {data['epoch'] + 1}", completed=0,
                                total=data["steps"], visible=True, info="")
            elif event == "step":
                progress.update(step_task, completed=data["step"],
                                info=f"eps {data['eps']:.4f} loss {data['loss']:.4f}")
            elif event == "epoch_end":
                progress.update(task, completed=data["epoch"],
                                info=f"eps {data['eps']:.4f} loss {data['loss']:.4f} "
                                     f"train acc {data['train_accuracy']:.3f}")

        trainer = Trainer(model, train.images, train.labels, config, device=args.device,
                          out=args.out, augment=augment, callback=on_event)
        progress.update(task, completed=trainer.epoch)
        history = trainer.fit()
        progress.update(step_task, visible=False)
    train_seconds = time.perf_counter() - start
    console.print(f"evaluating on {test.images.shape[0]} test images (cert: {args.cert}) …")
    result = evaluate(model, test.images, test.labels, args.eps, cert=args.cert,
                      pgd_steps=args.pgd_eval_steps, pgd_restarts=args.pgd_eval_restarts,
                      cascade_timeout=args.cert_timeout)
    console.print(_result_table(args, result, train_seconds))
    extra: dict[str, Any] = {}
    if args.method in ("taps", "staps"):  # TAPS App. E: the model-selection proxy
        from certfx.train.taps import taps_accuracy
        extra["taps_accuracy"] = round(taps_accuracy(
            trainer.method, test.images.to(trainer.device), test.labels.to(trainer.device),
            args.eps), 4)
        console.print(f"TAPS accuracy (App. E proxy, not a certificate): "
                      f"{100 * extra['taps_accuracy']:.1f}%")
    if args.out is not None:
        _write_artifacts(args, model, test.images[:1], config, history, result, train_seconds,
                         train, test, console, extra)
    return 0


def _result_table(args: argparse.Namespace, result: Any, seconds: float) -> Table:
    table = Table(title=f"{args.method} on {args.dataset}, eps = {args.eps}")
    for col in ("natural", "PGD", f"certified ({result.cert_method})", "train s", "eval s"):
        table.add_column(col, justify="right")
    cert = "-" if result.certified is None else f"{100 * result.certified:.1f}%"
    table.add_row(f"{100 * result.natural:.1f}%", f"{100 * result.pgd:.1f}%", cert,
                  f"{seconds:.1f}", f"{result.seconds:.1f}")
    return table


def _write_artifacts(args: argparse.Namespace, model: torch.nn.Module, example: torch.Tensor,
                     config: Any, history: list, result: Any, seconds: float, train: Any,
                     test: Any, console: Console, extra: dict[str, Any]) -> None:
    from certfx.inputs import write_bytes_atomic
    from certfx.train.loop import write_run_json

    model = model.cpu().eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    write_bytes_atomic(args.out / "model.pt", buffer.getvalue())
    try:
        buffer = io.BytesIO()
        with warnings.catch_warnings():  # the TorchScript exporter works offline; its notice
            warnings.simplefilter("ignore", DeprecationWarning)  # is not the user's concern
            torch.onnx.export(model, (example.cpu(),), buffer, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"},
                                                                     "logits": {0: "batch"}},
                              dynamo=False)
        write_bytes_atomic(args.out / "model.onnx", buffer.getvalue())
        onnx_note = "model.onnx"
    except Exception as err:  # noqa: BLE001 - the run's results stay useful without it
        onnx_note = f"not written: {type(err).__name__}: {err}"
        console.print(f"[yellow]warning: ONNX export failed ({err}); model.pt is written")
    write_run_json(args.out / "run.json", {
        "command": "certfx train", "model": args.model, "dataset": args.dataset,
        "train_source": getattr(train, "source", None), "test_source": getattr(test, "source",
                                                                                None),
        "train_examples": int(train.images.shape[0]), "device": args.device,
        "config": config.to_json(), "history": history, "train_seconds": round(seconds, 2),
        "evaluation": result.to_json() | extra, "onnx": onnx_note})
    console.print(f"wrote {args.out}/run.json, model.pt, {onnx_note}")
