"""The training loop every method shares.

Per step: the batch (augmented for CIFAR), ε from the annealing schedule, the method's loss with
batch norms on the batch's statistics (:mod:`certfx.train.batch_stats`), an L1 term on the weights
when asked (TAPS App. D.4), gradient-norm clipping, Adam. Per epoch: the learning-rate decay, a
checkpoint that a later run with the same ``--out`` resumes from, and the epoch's mean metrics.

Defaults are TAPS App. D.4 / Shi et al. (2021): Adam with learning rate 5·10⁻⁴, decayed by 0.2 at
two milestones, gradient clipping at norm 10, and for MNIST 70 epochs with ε = 0 in the first,
growing over the next 20 (``paper_schedule``); for a shorter run the milestones scale with its
length.

Example:
    >>> import torch
    >>> from certfx.train.loop import TrainConfig, Trainer
    >>> torch.manual_seed(0) and None
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 16), torch.nn.ReLU(),
    ...                           torch.nn.Linear(16, 2))
    >>> x = torch.rand(64, 1, 2, 2); y = (x.flatten(1).sum(1) > 2).long()
    >>> trainer = Trainer(net, x, y, TrainConfig(method="ibp", eps=0.01, epochs=2,
    ...                                          batch_size=32))
    >>> history = trainer.fit()
    >>> len(history), sorted(history[-1])[:3]
    (2, ['box_cert', 'epoch', 'eps'])
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from certfx.errors import CertfxError, InvalidValueError
from certfx.train.batch_stats import batch_statistics
from certfx.train.method import Method, StepContext, get_method
from certfx.train.schedule import SHAPES, EpsSchedule, lr_factor

__all__ = ["CHECKPOINT", "TrainConfig", "Trainer", "paper_schedule"]

CHECKPOINT = "checkpoint.pt"

# (total epochs, ε = 0 epochs, ramp epochs, decay milestones) of TAPS App. D, Table 2 (after
# Shi et al. 2021); the ε = 0 epoch is the start epoch 1 of their scripts
_PAPER = {"mnist": (70, 1, 20, (50, 60)), "cifar10": (160, 1, 80, (120, 140))}


def paper_schedule(dataset: str, epochs: int) -> tuple[float, float, tuple[int, ...]]:
    """``(warm-up, ramp, decay milestones)`` of the papers' schedule for ``dataset``, scaled to a
    run of ``epochs`` epochs (MNIST's for other data).

    >>> paper_schedule("mnist", 70)
    (1.0, 20.0, (50, 60))
    >>> paper_schedule("mnist", 7)
    (0.1, 2.0, (5, 6))
    """
    total, warmup, ramp, decays = _PAPER.get(dataset, _PAPER["mnist"])
    scale = epochs / total
    return (round(warmup * scale, 4), round(ramp * scale, 4),
            tuple(round(d * scale) for d in decays))


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run (the method's own hyperparameters are in ``options``).

    Attributes:
        method: a registered method name (``certfx.train.METHODS``).
        options: the method's ``Options`` instance (``None``: the paper's defaults).
        eps: the target training radius (pixel space).
        epochs: epochs to train.
        batch_size: examples per step.
        lr: Adam's initial learning rate.
        eps_warmup, eps_ramp: epochs at ε = 0 and of the ε ramp (``None``: the paper schedule,
            scaled to ``epochs``).
        eps_shape: ``"smooth"`` or ``"linear"`` ramp.
        decay_epochs: epochs at which the learning rate is multiplied by ``decay_factor``.
        decay_factor: the learning-rate decay.
        grad_clip: maximal gradient norm (0: no clipping).
        l1: weight of the L1 norm of the linear/conv weights.
        seed: seed of the shuffling, the attacks' random starts and the augmentation.
        dataset: the data set's name (chooses the paper schedule).
    """

    method: str = "ibp"
    options: Any = None
    eps: float = 0.1
    epochs: int = 70
    batch_size: int = 256
    lr: float = 5e-4
    eps_warmup: float | None = None
    eps_ramp: float | None = None
    eps_shape: str = "smooth"
    decay_epochs: tuple[int, ...] | None = None
    decay_factor: float = 0.2
    grad_clip: float = 10.0
    l1: float = 0.0
    seed: int = 0
    dataset: str = "mnist"

    def __post_init__(self) -> None:
        if not self.eps >= 0 or math.isinf(self.eps):
            raise InvalidValueError(f"--eps must be a finite radius >= 0, got {self.eps}")
        if self.epochs < 1 or self.batch_size < 1:
            raise InvalidValueError("--epochs and --batch-size must be >= 1")
        if not self.lr > 0 or self.grad_clip < 0 or self.l1 < 0 or not self.decay_factor > 0:
            raise InvalidValueError("need lr > 0, grad_clip >= 0, l1 >= 0, decay_factor > 0")
        if self.eps_shape not in SHAPES:
            raise InvalidValueError(f"--eps-shape must be one of {', '.join(SHAPES)}")

    def schedule(self) -> tuple[float, float, tuple[int, ...]]:
        """The effective ``(warm-up, ramp, decay milestones)``."""
        warmup, ramp, decays = paper_schedule(self.dataset, self.epochs)
        return (warmup if self.eps_warmup is None else self.eps_warmup,
                ramp if self.eps_ramp is None else self.eps_ramp,
                decays if self.decay_epochs is None else tuple(self.decay_epochs))

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "options"}
        warmup, ramp, decays = self.schedule()
        out.update(eps_warmup=warmup, eps_ramp=ramp, decay_epochs=list(decays))
        out["options"] = (dataclasses.asdict(self.options) if self.options is not None else
                          dataclasses.asdict(get_method(self.method).Options()))
        return out


@dataclass
class Trainer:
    """Trains ``model`` on ``(x, y)`` with the configured method (see the module docstring).

    Attributes:
        model: the network (moved to ``device``).
        x, y: the training images ``(N, C, H, W)`` in ``[0, 1]`` and labels ``(N,)``.
        config: the :class:`TrainConfig`.
        device: where to train (``"cuda"`` where available).
        out: a directory for ``checkpoint.pt`` (resumed when it exists); ``None``: none.
        augment: ``(batch, generator) -> batch`` (e.g. CIFAR's random crop and flip).
        callback: called with an event name and a dict (``epoch_start``, ``step``,
            ``epoch_end``) — the CLI draws its progress display from them.
    """

    model: nn.Module
    x: Tensor
    y: Tensor
    config: TrainConfig = field(default_factory=TrainConfig)
    device: str | torch.device = "cpu"
    out: Path | None = None
    augment: Callable[[Tensor, torch.Generator], Tensor] | None = None
    callback: Callable[[str, dict[str, Any]], None] | None = None
    input_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        cfg = self.config
        if self.x.shape[0] != self.y.shape[0] or self.x.shape[0] == 0:
            raise InvalidValueError(f"{self.x.shape[0]} training images but {self.y.shape[0]} "
                                    f"labels; both must be equal and > 0")
        self.device = torch.device(self.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise CertfxError("--device cuda but PyTorch sees no CUDA device; use --device cpu")
        torch.manual_seed(cfg.seed)
        # the model moves before compiling: the generated graphs hold its tensors
        self.model.to(self.device).train()
        example = self.x[:1].to(self.device)
        self.method: Method = get_method(cfg.method)(self.model, example, cfg.options,
                                                     self.input_range)
        self.method.total_epochs = cfg.epochs
        self.steps_per_epoch = math.ceil(self.x.shape[0] / cfg.batch_size)
        warmup, ramp, self.decays = cfg.schedule()
        self.eps = EpsSchedule(cfg.eps, self.steps_per_epoch, warmup, ramp, cfg.eps_shape)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self.shuffle = torch.Generator().manual_seed(cfg.seed)
        self.epoch, self.step, self.history = 0, 0, []
        if self.out is not None and (Path(self.out) / CHECKPOINT).exists():
            self._resume(Path(self.out) / CHECKPOINT)

    # ---- checkpoints ----------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch, "step": self.step, "history": self.history,
                "config": self.config.to_json(), "shuffle": self.shuffle.get_state(),
                "generator": self.generator.get_state()}

    def save(self) -> None:
        """Write the checkpoint atomically (a crash never leaves a half-written file)."""
        if self.out is None:
            return
        path = Path(self.out)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / (CHECKPOINT + ".tmp")
        torch.save(self._state(), tmp)
        tmp.replace(path / CHECKPOINT)

    def _resume(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        saved, now = state["config"], self.config.to_json()
        changed = [k for k in ("method", "eps", "dataset", "batch_size", "options")
                   if saved.get(k) != now.get(k)]
        if changed:
            raise CertfxError(f"{path} was written by a run with other settings ({', '.join(changed)}"
                              f"); use another --out directory or delete the checkpoint")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.shuffle.set_state(state["shuffle"])
        self.generator.set_state(state["generator"])

    # ---- training -------------------------------------------------------------------------
    def _l1(self) -> Tensor:
        weights = [m.weight for m in self.model.modules()
                   if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        return sum(w.abs().sum() for w in weights)

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        if self.callback is not None:
            self.callback(event, data)

    def train_epoch(self) -> dict[str, Any]:
        """One epoch; returns its mean metrics."""
        cfg, epoch = self.config, self.epoch
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(epoch, self.decays, cfg.decay_factor)
        self.method.on_epoch_start(epoch)
        self._emit("epoch_start", {"epoch": epoch, "eps": self.eps(self.step),
                                   "steps": self.steps_per_epoch})
        order = torch.randperm(self.x.shape[0], generator=self.shuffle)
        totals: dict[str, float] = {}
        start, correct, seen = time.perf_counter(), 0, 0
        for i in range(self.steps_per_epoch):
            idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            x, y = self.x[idx].to(self.device), self.y[idx].to(self.device)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            eps = self.eps(self.step)
            ctx = StepContext(epoch, self.step, eps, cfg.eps, self.eps.progress(self.step),
                              self.generator)
            with batch_statistics(self.model, x):
                out = self.method.loss(x, y, ctx)
                loss = out.loss
                if cfg.l1 > 0:
                    loss = loss + cfg.l1 * self._l1()
                if not torch.isfinite(loss):
                    raise CertfxError(f"the {cfg.method} loss became {loss.item()} in epoch "
                                      f"{epoch + 1}, step {i + 1}; lower --lr or --eps, or "
                                      f"raise --eps-ramp")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                self.optimizer.step()
                with torch.no_grad():
                    correct += int((self.model(x).argmax(1) == y).sum())
                seen += y.shape[0]
            metrics = {"loss": loss.item(), **out.metrics}
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v
            self.step += 1
            self._emit("step", {"epoch": epoch, "step": i + 1, "steps": self.steps_per_epoch,
                                "eps": eps, **metrics})
        summary = {k: round(v / self.steps_per_epoch, 6) for k, v in totals.items()}
        summary.update(epoch=epoch + 1, eps=round(self.eps(self.step - 1), 6),
                       lr=self.optimizer.param_groups[0]["lr"],
                       train_accuracy=round(correct / max(seen, 1), 4),
                       seconds=round(time.perf_counter() - start, 2))
        self.history.append(summary)
        self.epoch += 1
        self.save()
        self._emit("epoch_end", summary)
        return summary

    def fit(self) -> list[dict[str, Any]]:
        """Train until ``config.epochs`` (from the checkpoint's epoch when resumed)."""
        while self.epoch < self.config.epochs:
            self.train_epoch()
        self.method.on_train_end()
        self.model.eval()
        return self.history


def write_run_json(path: Path, data: dict[str, Any]) -> None:
    """``run.json`` with every setting and result, written atomically."""
    from certfx.inputs import write_text_atomic
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")
