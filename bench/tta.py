"""Time to accuracy: one spec's whole training run in netcompiler and in PyTorch eager.

    python bench/tta.py                         # lenet5, its train: section, Fashion-MNIST, 2 threads
    python bench/tta.py --net fashion_convnet --epochs 3
    python bench/tta.py --quick                 # smoke run: 512 training images, 1 epoch

Both sides train the same architecture from the same initial weights on the same inputs
(scaled and normalised once, with the training set's mean and std as netc train computes
them), with the recipe of the spec's `train:` section (or the flags): optimizer, learning
rate per batch (the rates netc computes, `netcompiler.recipe.lrs`, set on the torch
optimizer before each step), weight decay, label smoothing, gradient clipping, batch size,
epochs and augmentation. netcompiler runs `netc train` itself (`netcompiler.train.train`,
validation on the test set after each epoch). PyTorch runs `netcompiler.torchref`'s twin of
the network, `torch.optim.AdamW` / `SGD`, `F.cross_entropy(label_smoothing=...)`,
`clip_grad_norm_`, and the augmentation as batched tensor indexing (the shift with the
normalised black outside, the left-right flip; RandomErasing's rectangle per sample), with
`torch.set_num_threads(threads)`, and also evaluates on the test set after each epoch.
The shuffling and augmentation draws differ between the two (each uses its own generator).

Printed: per epoch, both test accuracies and both cumulative wall times (training and the
per-epoch evaluation; building and loading data excluded), then the final accuracies, the
wall and CPU times and their ratio, and the time each needed to first reach the lower of the
two final accuracies minus 0.3 points.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from netcompiler import recipe  # noqa: E402
from netcompiler.check import load  # noqa: E402
from netcompiler.data import dataset_stats, load_dataset, prepare_inputs  # noqa: E402
from netcompiler.train import METRICS_COLUMNS, TrainOptions, resolve_settings, train  # noqa: E402

TOLERANCE = 0.003  # "the same accuracy": within 0.3 points


def spec_path(name: str) -> Path:
    p = Path(name)
    return p if p.suffix in (".yaml", ".yml") else ROOT / "specs" / f"{name}.yaml"


def loadavg() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_netc(opts: TrainOptions) -> dict:
    """netc train; wall time per epoch from its metrics (training + evaluation of the epoch)."""
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    result = train(opts, progress=False)
    total = time.perf_counter() - t0
    acc, clock, t = [], [], 0.0
    for row in result["history"]:
        h = dict(zip(METRICS_COLUMNS, row))
        t += float(h["seconds"])
        acc.append(float(h["val_acc"]))
        clock.append(t)
    return {"acc": acc, "clock": clock, "wall": clock[-1], "total_wall": total, "cpu": cpu_seconds() - cpu0}


def augment_batch(torch, x, gen, aug: dict, fill: float):
    """Shift by up to aug['shift'] pixels (fill outside), flip left-right with p 1/2, and with
    probability aug['erase'] zero a RandomErasing rectangle: as netc's C does, batched."""
    b, c, h, w = x.shape
    s = int(aug["shift"])
    if s or aug["hflip"]:
        dy = torch.randint(-s, s + 1, (b,), generator=gen) if s else torch.zeros(b, dtype=torch.long)
        dx = torch.randint(-s, s + 1, (b,), generator=gen) if s else torch.zeros(b, dtype=torch.long)
        flip = torch.randint(0, 2, (b,), generator=gen).bool() if aug["hflip"] else torch.zeros(b, dtype=torch.bool)
        padded = torch.nn.functional.pad(x, (s, s, s, s), value=fill)
        j = torch.arange(w)
        cols = torch.where(flip[:, None], w - 1 - j, j) + dx[:, None] + s  # (b, w)
        rows = torch.arange(h)[None, :] + dy[:, None] + s  # (b, h)
        x = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    if aug["erase"] > 0:
        x = x.clone()
        hit = torch.rand(b, generator=gen) < aug["erase"]
        for i in torch.nonzero(hit).flatten().tolist():
            for _ in range(10):
                area = h * w * (0.02 + 0.31 * float(torch.rand(1, generator=gen)))
                ratio = float(np.exp(np.log(0.3) + (np.log(3.3) - np.log(0.3)) * float(torch.rand(1, generator=gen))))
                eh, ew = int(round((area * ratio) ** 0.5)), int(round((area / ratio) ** 0.5))
                if 1 <= eh < h and 1 <= ew < w:
                    top = int(torch.randint(0, h - eh + 1, (1,), generator=gen))
                    left = int(torch.randint(0, w - ew + 1, (1,), generator=gen))
                    x[i, :, top:top + eh, left:left + ew] = 0
                    break
    return x


def run_torch(network, state, s: dict, X, Y, TX, TY, threads: int, fill: float) -> dict:
    import torch
    import torch.nn.functional as F

    from netcompiler.torchref import torch_model

    torch.set_num_threads(threads)
    model = torch_model(network, state, dtype=torch.float32)
    if s["optimizer"] in ("adam", "adamw"):
        opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    else:
        opt = torch.optim.SGD(model.parameters(), lr=s["lr"], weight_decay=s["weight_decay"],
                              momentum=s["momentum"] if s["optimizer"] == "momentum" else 0.0,
                              nesterov=bool(s["nesterov"]))
    aug = recipe.parse_augment(s["augment"])
    bs, epochs = int(s["batch_size"]), int(s["epochs"])
    gen = torch.Generator().manual_seed(int(s["seed"]))
    x, y = torch.from_numpy(X), torch.from_numpy(Y.astype(np.int64))
    tx, ty = torch.from_numpy(TX), torch.from_numpy(TY.astype(np.int64))
    n = len(x)
    batches = -(-n // bs)
    acc, clock = [], []
    cpu0 = cpu_seconds()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        rates = recipe.lrs(s, epoch, 0, batches, batches)
        for k in range(batches):
            idx = order[k * bs:(k + 1) * bs]
            xb = augment_batch(torch, x[idx], gen, aug, fill)
            for g in opt.param_groups:
                g["lr"] = float(rates[k])
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=float(s["label_smoothing"]))
            loss.backward()
            if s["clip_grad_norm"]:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s["clip_grad_norm"])
            opt.step()
        model.eval()
        correct = 0
        with torch.inference_mode():
            for k in range(0, len(tx), 256):
                correct += int((model(tx[k:k + 256]).argmax(1) == ty[k:k + 256]).sum())
        acc.append(correct / len(tx))
        clock.append(time.perf_counter() - t0)
        print(f"torch epoch {epoch + 1}/{epochs}: test acc {100 * acc[-1]:.2f}% | {clock[-1]:.1f} s", flush=True)
    return {"acc": acc, "clock": clock, "wall": clock[-1], "total_wall": clock[-1], "cpu": cpu_seconds() - cpu0}


def first_reaching(r: dict, target: float) -> float | None:
    return next((t for a, t in zip(r["acc"], r["clock"]) if a >= target), None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="time to accuracy: netc train vs the same run in PyTorch eager")
    ap.add_argument("--net", default="lenet5", help="spec name under specs/ or a .yaml path (default lenet5)")
    ap.add_argument("--data", default="fashion-mnist", help="netc train's --data (default fashion-mnist)")
    ap.add_argument("--epochs", type=int, help="default: the spec's train: section")
    ap.add_argument("--batch-size", type=int, help="default: the spec's train: section")
    ap.add_argument("--threads", type=int, default=2, help="netc threads and torch.set_num_threads (default 2)")
    ap.add_argument("--limit", type=int, help="use only the first N training images")
    ap.add_argument("--test-limit", type=int, help="evaluate on only the first N test images")
    ap.add_argument("--quick", action="store_true", help="smoke run: --limit 512 --test-limit 256 --epochs 1")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.limit, args.test_limit = args.limit or 512, args.test_limit or 256
        args.epochs = args.epochs or 1

    path = spec_path(args.net)
    network = load(str(path))
    if network.loss != "cross_entropy":
        raise SystemExit(f"error: {path}: time to accuracy needs a cross_entropy network")
    ds = load_dataset(args.data)
    tx, ty = ds.test_x, ds.test_y
    if args.test_limit:
        tx, ty = tx[:args.test_limit], ty[:args.test_limit]
    data = args.data
    tmp = tempfile.TemporaryDirectory(prefix="netc-tta-")
    if args.test_limit:  # netc train validates on the data's whole test set: give it the shortened one
        x, y = ds.train_x[:args.limit] if args.limit else ds.train_x, ds.train_y[:args.limit] if args.limit else ds.train_y
        data = str(Path(tmp.name) / "data.npz")
        np.savez(data, x=x, y=y, x_test=tx, y_test=ty)
    opts = TrainOptions(spec=str(path), data=data, out=str(Path(tmp.name) / "run"), epochs=args.epochs,
                        batch_size=args.batch_size, threads=args.threads, limit=args.limit, force=True)
    s = resolve_settings(network, opts)
    if s["normalize"] != "global":
        raise SystemExit("error: time to accuracy normalises with one mean and std (normalize: global)")
    if s["val_split"]:
        raise SystemExit("error: the spec's train: section sets val_split; time to accuracy evaluates on the test set")
    raw_x = ds.train_x[:args.limit] if args.limit else ds.train_x
    raw_y = ds.train_y[:args.limit] if args.limit else ds.train_y
    mean, std = (s["mean"], s["std"]) if s["mean"] is not None and s["std"] is not None else dataset_stats(raw_x)
    X = prepare_inputs(raw_x, network.input_shape, mean=mean, std=std)
    TX = prepare_inputs(tx, network.input_shape, mean=mean, std=std)

    import netcompiler as nc

    net = nc.compile(network, threads=args.threads)
    net.init(int(s["seed"]))  # netc train's initial weights (the same seed): the torch twin starts there too
    state = net.state_dict()

    print(f"time to accuracy: {network.name} ({network.total_params:,} parameters), {ds.name}, {len(X)} training "
          f"and {len(TX)} test images, {s['epochs']} epochs, batch {s['batch_size']}, {args.threads} threads")
    print(f"recipe: {s['optimizer']} lr {s['lr']:g} weight decay {s['weight_decay']:g}, schedule {s['lr_schedule']}, "
          f"augment {s['augment'] or 'none'}, label smoothing {s['label_smoothing']:g}, "
          f"clip {s['clip_grad_norm']:g}")
    print(f"loadavg at start: {loadavg()}", flush=True)
    results = {"netc": run_netc(opts)}
    print(f"netc done ({results['netc']['wall']:.1f} s); loadavg {loadavg()}", flush=True)
    results["torch"] = run_torch(network, state, s, X, raw_y, TX, ty, args.threads, -float(mean) / float(std))
    print(f"torch done ({results['torch']['wall']:.1f} s); loadavg at end: {loadavg()}\n")

    a, b = results["netc"], results["torch"]
    print("epoch  netc acc  netc s   torch acc  torch s")
    for e in range(len(a["acc"])):
        print(f"{e + 1:5d}  {100 * a['acc'][e]:7.2f}%  {a['clock'][e]:7.1f}  {100 * b['acc'][e]:8.2f}%  "
              f"{b['clock'][e]:7.1f}")
    target = min(a["acc"][-1], b["acc"][-1]) - TOLERANCE
    ta, tb = first_reaching(a, target), first_reaching(b, target)
    print(f"\nfinal test accuracy: netc {100 * a['acc'][-1]:.2f}%, torch {100 * b['acc'][-1]:.2f}% "
          f"(difference {100 * (a['acc'][-1] - b['acc'][-1]):+.2f} points)")
    print(f"wall: netc {a['wall']:.2f} s, torch {b['wall']:.2f} s: torch/netc {b['wall'] / a['wall']:.2f}x")
    print(f"CPU: netc {a['cpu']:.2f} s, torch {b['cpu']:.2f} s: torch/netc {b['cpu'] / a['cpu']:.2f}x")
    print(f"first at >= {100 * target:.2f}% (the lower final accuracy - 0.3 points): netc {ta:.2f} s, "
          f"torch {tb:.2f} s: torch/netc {tb / ta:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"net": network.name, "epochs": s["epochs"], "threads": args.threads,
                                               "target": target, "netc_time_to_target": ta,
                                               "torch_time_to_target": tb, **results}, indent=2) + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
