"""Speed, tightness and memory of every abstract domain on the benchmark networks.

For each network, batch size and domain, in the same run: the time of ``certified_forward``
(logit bounds, ``torch.no_grad``, frozen weights) divided by the time of a plain forward pass
(the two measured alternately, medians), the mean width ``upper − lower`` of the logit bounds,
and the peak memory one bound computation adds, measured in a fresh process: on CPU the rise
of the peak resident set (``VmHWM`` in ``/proc/self/status``, reset through
``/proc/self/clear_refs``), on CUDA ``torch.cuda.max_memory_allocated`` above the memory in use.

With ``--max-chunks N`` every chunked back-substitution pass runs only its first ``N`` chunks
(:mod:`chunk_probe`): the peak memory is the full run's (every chunk is the same size), the time
is extrapolated from the chunks run, and no width is reported. For CROWN on CNN7, whose full
run takes most of an hour per example on two cores.

Usage:
    python benchmarks/domains.py [--networks mlp cnn7 …] [--domains box deepz crown …]
                                 [--batches 1 8] [--device cpu] [--repeats 10] [--max-chunks N]
                                 [--margins]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

import certfx
from bounds import paired_median_ms  # noqa: E402  (benchmarks/ is the script's folder)
from chunk_probe import max_chunks  # noqa: E402
from networks import NETWORKS, build  # noqa: E402

DEFAULT_BATCHES = {"mlp": [32], "mlp6x100": [32], "cnn7": [1, 8], "conv3": [8], "resnet2b": [8]}


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def _probed(cm: certfx.CertifiedModule, limit: int | None) -> Any:
    return contextlib.nullcontext() if limit is None else max_chunks(cm.bounds, limit)


def peak_memory_mib(key: str, domain: str, batch: int, device: torch.device,
                    limit: int | None = None) -> float:
    """Peak memory (MiB) one bound computation adds, measured in a fresh process so that no
    memory freed by earlier runs is reused: on CPU the rise of the peak resident set
    (``VmHWM``) over the resident set just before the call, on CUDA the rise of
    ``torch.cuda.max_memory_allocated``."""
    script = Path(__file__).resolve()
    result = subprocess.run([sys.executable, str(script), "--_memory", key, domain, str(batch),
                             str(device), str(limit or 0)], capture_output=True, text=True,
                            check=False)
    try:
        return float(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan")


def _memory_child(key: str, domain: str, batch: int, device: torch.device,
                  limit: int | None) -> None:
    spec = NETWORKS[key]
    net = build(key, device).requires_grad_(False)
    x = torch.rand(batch, *spec.input_shape, device=device)
    cm = certfx.compile(net, domain=domain, example_input=x[:1],
                        input_spec=certfx.LinfBall(spec.eps, 0.0, 1.0))
    with torch.no_grad(), _probed(cm, limit):
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            cm.certified_forward(x)
            torch.cuda.synchronize()
            print((torch.cuda.max_memory_allocated() - before) / 2**20)
            return
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS")
        cm.certified_forward(x)
        print(max(0, _status_kib("VmHWM") - before) / 1024)


def measure(key: str, domain: str, batch: int, device: torch.device,
            repeats: int, limit: int | None = None, margins: bool = False
            ) -> dict[str, float] | str:
    """One table row's numbers, or the reason the domain cannot run on the network."""
    spec = NETWORKS[key]
    net = build(key, device)
    frozen = copy.deepcopy(net).requires_grad_(False)
    x = torch.rand(batch, *spec.input_shape, device=device)
    try:
        cm = certfx.compile(frozen, domain=domain, example_input=x[:1],
                            input_spec=certfx.LinfBall(spec.eps, 0.0, 1.0))
    except certfx.CertfxError as err:
        return str(err).splitlines()[0]
    with torch.no_grad():
        with _probed(cm, limit) as log:
            bounds = cm.certified_forward(x)
        extra_ms = 1000 * log.extrapolated_extra_seconds() if limit is not None else 0.0
        labels = net(x).argmax(1)
        args = (x, labels) if margins else (x,)  # margins: lower bounds only
        with _probed(cm, limit):
            fwd, cert = paired_median_ms(lambda: net(x), lambda: cm.certified_forward(*args),
                                         device, 1, repeats)
        cert += extra_ms
    memory = peak_memory_mib(key, domain, batch, device, limit)
    probed = limit is not None and bool(log.passes)
    width = float("nan") if probed else float((bounds.upper - bounds.lower).mean())
    return {"fwd": fwd, "cert": cert, "ratio": cert / fwd, "width": width, "mem": memory}


def main() -> None:
    if len(sys.argv) == 7 and sys.argv[1] == "--_memory":  # the child of peak_memory_mib
        _memory_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), torch.device(sys.argv[5]),
                      int(sys.argv[6]) or None)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS),
                        help="networks to measure (default: all)")
    parser.add_argument("--domains", nargs="+", default=None,
                        help="domains to compare (default: every registered domain)")
    parser.add_argument("--batches", nargs="+", type=int, default=None,
                        help="batch sizes (default: per network, e.g. 32 for the MLPs)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (median reported)")
    parser.add_argument("--margins", action="store_true",
                        help="time margin lower bounds certified_forward(x, y) instead of "
                             "two-sided logit bounds (width and memory stay the logits')")
    parser.add_argument("--max-chunks", type=int, default=None,
                        help="run only the first N chunks of every chunked backward pass "
                             "(memory measured, time extrapolated, no width)")
    args = parser.parse_args()
    device = torch.device(args.device)
    domains = args.domains or certfx.available_domains()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}")
    header = (f"{'network':<20} {'batch':>5} {'domain':<12} {'forward':>9} {'bounds':>10} "
              f"{'ratio':>8} {'mean width':>11} {'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    for key in args.networks:
        for batch in args.batches or DEFAULT_BATCHES[key]:
            for domain in domains:
                row = measure(key, domain, batch, device, args.repeats, args.max_chunks,
                              args.margins)
                name = NETWORKS[key].name
                if isinstance(row, str):
                    print(f"{name:<20} {batch:>5} {domain:<12} n/a: {row}", flush=True)
                    continue
                print(f"{name:<20} {batch:>5} {domain:<12} {row['fwd']:>7.2f}ms "
                      f"{row['cert']:>8.2f}ms {row['ratio']:>7.1f}x {row['width']:>11.4g} "
                      f"{row['mem']:>9.1f}", flush=True)
    print("ratio = bounds / forward (same run, alternating); mean width of the logit bounds; "
          "peak MiB = memory the bound computation adds")


if __name__ == "__main__":
    main()
