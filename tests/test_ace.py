"""ACE end to end (paper 000, Sec. 4.2, App. E): certification records, accuracies per threshold,
the selection labels and network, and the `certfx ace` command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from certfx.ace import AceRecords, collect, default_thresholds, sweep, write_csv
from certfx.ace.train import selection_labels, selection_network, train_selection
from certfx.cli import main
from certfx.passes import Entropy, SelectionNet, insert_ace
from certfx.verify import PGDConfig, pgd_ball


def _nets(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    core = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    cert = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():  # a confident certification network: varied entropies
        cert[3].weight.mul_(6)
    return core, cert


def _data(n: int = 120, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


@pytest.fixture(scope="module")
def entropy_case() -> tuple[nn.Module, torch.Tensor, torch.Tensor, AceRecords, float]:
    core, cert = _nets()
    x, _ = _data()
    with torch.no_grad():
        y = cert(x).argmax(1)  # labels the certification network gets right
        y[::3] = core(x[::3]).argmax(1)
        h = torch.special.entr(cert(x).softmax(1)).sum(1)
    t = float(h.median())
    ace = insert_ace(core, cert, Entropy(t), example_input=x[:1])
    rec = collect(ace, x, y, eps=0.02, domain="deepz", pgd_steps=10, pgd_restarts=2)
    return ace, x, y, rec, t


def test_certified_implies_adversarial_implies_natural(entropy_case) -> None:
    _, _, _, rec, t = entropy_case
    for threshold in default_thresholds(rec):
        d = rec.decide(threshold)
        assert bool((d["certified"] <= d["adversarial"]).all())
        assert bool((d["adversarial"] <= d["natural"]).all())
    d = rec.decide(t)
    # the threshold at the median entropy sends examples both ways, some undecided
    assert 0 < int(d["answer_cert"].sum()) < rec.score.numel()
    assert int((d["cert_reachable"] & d["core_reachable"]).sum()) > 0
    assert int(d["certified"].sum()) > 0


def test_certified_only_where_the_selection_is_proven_and_cert_certified(entropy_case) -> None:
    _, _, _, rec, t = entropy_case
    d = rec.decide(t)
    sure_cert = d["cert_reachable"] & ~d["core_reachable"]
    assert bool((d["certified"] == (sure_cert & rec.cert_certified & d["natural"])).all())
    assert bool((~d["certified"] | d["answer_cert"]).all())  # the core is never certified


def test_selection_certificate_holds_on_samples_and_attacks(entropy_case) -> None:
    """Where the selection is claimed proven, no sampled point of the ball selects the other
    branch (checked by random points, corners and PGD on the score)."""
    ace, x, y, rec, t = entropy_case
    from certfx.passes.insert_ace import ace_subgraph

    score = ace_subgraph(ace, "score")
    d = rec.decide(t)
    proven = (d["cert_reachable"] ^ d["core_reachable"])
    assert int(proven.sum()) > 0
    eps, st = 0.02, rec.select_threshold(t)
    xs = x[proven]
    pts = xs.unsqueeze(1) + eps * (2 * torch.rand(xs.shape[0], 300, *xs.shape[1:]) - 1)
    pts[:, :20] = xs.unsqueeze(1) + eps * torch.sign(torch.randn(xs.shape[0], 20, *xs.shape[1:]))
    pts = pts.clamp(0, 1)
    with torch.no_grad():
        s = score(pts.flatten(0, 1)).reshape(xs.shape[0], -1)
    selected = (s > st)
    want = d["answer_cert"][proven].unsqueeze(1)
    assert bool((selected == want).all())
    # PGD pushing the score across the threshold (spec row: ±(s − t) ≤ 0 means switched)
    sign = torch.where(d["answer_cert"][proven], 1.0, -1.0)
    spec = sign.view(-1, 1, 1)
    shifted = nn.Sequential(score, _Shift(st))
    found = pgd_ball(shifted, xs, None, eps, config=PGDConfig(steps=30, restarts=2),
                     spec=spec).found
    assert not bool(found.any())


class _Shift(nn.Module):
    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return s - self.t


def test_certified_examples_resist_attacks_on_the_composed_model(entropy_case) -> None:
    ace, x, y, rec, t = entropy_case
    d = rec.decide(t)
    cert_idx = d["certified"]
    found = pgd_ball(ace, x[cert_idx], y[cert_idx], 0.02,
                     config=PGDConfig(steps=40, restarts=3)).found
    assert not bool(found.any())


def test_sweep_reuses_records_and_writes_csv(entropy_case, tmp_path: Path) -> None:
    _, _, _, rec, _ = entropy_case
    path = tmp_path / "rec.pt"
    rec.save(str(path))
    back = AceRecords.load(str(path))
    ts = default_thresholds(back)
    rows = sweep(back, ts)
    assert rows[0].selected == 0.0 and rows[-1].selected == 1.0  # both ends covered
    assert rows[-1].natural == back.branch("cert")["natural"]
    assert rows[0].natural == back.branch("core")["natural"]
    write_csv(rows, tmp_path / "s.csv")
    lines = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert len(lines) == len(ts) and float(lines[3]["certified"]) == rows[3].certified


def test_exported_onnx_runs_in_onnxruntime_and_loads_back(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from certfx.ace.onnx_io import export_ace, load_ace
    from certfx.errors import ModelLoadError

    core, cert = _nets()
    x, _ = _data(40)
    sel = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 1))
    for selection in (Entropy(0.7), SelectionNet(0.05, network=sel)):
        ace = insert_ace(core, cert, selection, example_input=x[:1])
        export_ace(ace, tmp_path / "ace.onnx")
        got = ort.InferenceSession(str(tmp_path / "ace.onnx")).run(None, {"x": x.numpy()})[0]
        assert abs(got - ace(x).detach().numpy()).max() < 1e-5
        back = load_ace(tmp_path / "ace.onnx")
        assert torch.allclose(back(x), ace(x), atol=1e-5)
        assert back.meta["certfx.ace"]["select"] == ace.meta["certfx.ace"]["select"]
    plain = tmp_path / "plain.onnx"
    torch.onnx.export(core, (x[:1],), str(plain), dynamo=False)
    with pytest.raises(ModelLoadError, match="not an ACE model"):
        load_ace(plain)


def test_selection_labels_and_network() -> None:
    _, cert = _nets()
    x, _ = _data(200)
    with torch.no_grad():
        y = cert(x).argmax(1)
        y[::2] = (y[::2] + 1) % 3  # half the labels wrong: selection must drop them
    labels = selection_labels(cert, x, y, eps=0.001, domain="box")
    assert labels[::2].sum() == 0 and labels[1::2].sum() > 0
    sel = selection_network(cert, x[:1])
    assert all(not p.requires_grad for p in sel.features.parameters())
    assert all(p.requires_grad for p in sel.head.parameters())
    before = [p.clone() for p in cert.parameters()]
    trained = train_selection(cert, x, labels, eps=0.001, method="standard", epochs=3)
    assert all(torch.equal(a, b) for a, b in zip(before, cert.parameters()))
    assert trained(x).shape == (200, 2)
    core, _ = _nets(1)
    ace = insert_ace(core, cert, SelectionNet(0.0, network=trained), example_input=x[:1])
    with torch.no_grad():
        logits = trained(x)
        want = torch.where((logits[:, 1] - logits[:, 0] > 0).unsqueeze(1), cert(x), core(x))
    assert torch.allclose(ace(x), want, atol=1e-6)


def _export(net: nn.Module, path: Path) -> None:
    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), str(path), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}},
                      dynamo=False)


def test_cli_compose_certify_sweep(tmp_path: Path) -> None:
    torch.manual_seed(0)
    core = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    cert = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
    data = tmp_path / "tiny.csv"  # 20 random 28×28 'images', label first, pixels 0..255
    g = torch.Generator().manual_seed(0)
    rows = [",".join(map(str, [i % 10, *torch.randint(0, 256, (784,), generator=g).tolist()]))
            for i in range(20)]
    data.write_text("\n".join(rows) + "\n")
    _export(core, tmp_path / "core.onnx")
    _export(cert, tmp_path / "cert.onnx")
    nets = ["--core", str(tmp_path / "core.onnx"), "--cert", str(tmp_path / "cert.onnx")]
    assert main(["ace", "compose", *nets, "--threshold", "2.0", "-o",
                 str(tmp_path / "ace.onnx")]) == 0
    assert (tmp_path / "ace.onnx").exists()
    common = [*nets, "--dataset", "mnist", "--data", str(data), "--eps", "0.005",
              "--pgd-steps", "5"]
    assert main(["ace", "certify", *common, "--threshold", "2.2", "--records",
                 str(tmp_path / "r.pt"), "--json", str(tmp_path / "r.json")]) == 0
    out = json.loads((tmp_path / "r.json").read_text())
    assert len(out["examples"]) == 20 and out["select"] == "entropy"
    # the composed ONNX file reads back as the same ACE model: same certification results
    data_args = ["--dataset", "mnist", "--data", str(data), "--eps", "0.005", "--pgd-steps", "5"]
    assert main(["ace", "certify", "--ace", str(tmp_path / "ace.onnx"), *data_args,
                 "--threshold", "2.2", "--json", str(tmp_path / "r2.json")]) == 0
    again = json.loads((tmp_path / "r2.json").read_text())
    assert [e["branch"] for e in again["examples"]] == [e["branch"] for e in out["examples"]]
    assert again["result"]["certified"] == out["result"]["certified"]
    assert main(["ace", "sweep", "--records", str(tmp_path / "r.pt"), "--csv",
                 str(tmp_path / "s.csv"), "--plot", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 1000
    # a selection network trained on Eq. 3's labels composes with --select selnet
    assert main(["ace", "train", "--cert", str(tmp_path / "cert.onnx"), "--dataset", "mnist",
                 "--data", str(data), "--eps", "0.005", "--epochs", "1", "--method", "standard",
                 "--label-domain", "box", "-o", str(tmp_path / "sel.onnx")]) == 0
    assert main(["ace", "compose", *nets, "--select", "selnet", "--selnet",
                 str(tmp_path / "sel.onnx"), "--threshold", "0", "-o",
                 str(tmp_path / "ace_sel.onnx")]) == 0
    # bad inputs: named, nothing written
    assert main(["ace", "compose", *nets, "--select", "selnet", "--threshold", "0", "-o",
                 str(tmp_path / "bad.onnx")]) == 2
    assert not (tmp_path / "bad.onnx").exists()
    assert main(["ace", "sweep", "--records", str(tmp_path / "r.pt"), "--thresholds",
                 "1,x"]) == 2
    (tmp_path / "junk.pt").write_text("not records")
    assert main(["ace", "sweep", "--records", str(tmp_path / "junk.pt")]) == 2
    assert main(["ace", "sweep", "--records", str(tmp_path / "missing.pt")]) == 2


def test_joint_entropy_loss_lowers_certified_entropy_and_raises_the_rest() -> None:
    """Eq. 6 with λ = 1: the entropy term alone moves each group's worst-case entropy the right
    way (certified examples down, the others up)."""
    from certfx.domains.interval import Interval, box_softmax_entropy
    from certfx.train import TrainConfig, Trainer, get_method
    from certfx.train.losses import certified

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.rand(64, 4)
    with torch.no_grad():
        y = net(x).argmax(1)
        y[::2] = (y[::2] + 1) % 3  # wrong labels: never certified
    opts = get_method("ace-entropy").Options(entropy_weight=1.0, pretrain=0.0, init="default",
                                             fast_reg=0.0)
    cfg = TrainConfig(method="ace-entropy", options=opts, eps=0.01, epochs=30, batch_size=64,
                      lr=1e-2, eps_warmup=0, eps_ramp=0)
    trainer = Trainer(net, x, y, cfg)
    method = trainer.method

    def entropies():
        with torch.no_grad():
            lo, hi = method.logits_box.certified_forward(x, eps=0.01)
            h = box_softmax_entropy(Interval(lo, hi), within_range=False)
            sel = certified(method.box(x, y, 0.01).margins)
        return h, sel

    h0, sel0 = entropies()
    history = trainer.fit()
    h1, _ = entropies()
    assert history[-1]["entropy_loss"] < history[0]["entropy_loss"]
    assert bool(sel0.any()) and bool((~sel0).any())
    assert float(h1.upper[sel0].mean()) < float(h0.upper[sel0].mean())
    assert float(h1.lower[~sel0].mean()) > float(h0.lower[~sel0].mean())
