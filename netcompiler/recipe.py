"""Training recipes: learning-rate schedules and augmentation settings, with PyTorch's names.

Schedules (`lr_schedule`), as torch.optim.lr_scheduler steps them:

    none       lr throughout
    step       StepLR(step_size, gamma), stepped per epoch
    multistep  MultiStepLR(milestones, gamma), per epoch
    cosine     CosineAnnealingLR(T_max = epochs - warmup_epochs, eta_min = min_lr), per epoch
    onecycle   OneCycleLR(max_lr (default lr), total_steps = epochs * batches per epoch,
               pct_start, div_factor, final_div_factor; cosine annealing), per batch;
               momentum is not cycled (cycle_momentum=False)

`warmup_epochs` W > 0 puts LinearLR(start_factor = 1 / (W + 1), total_iters = W) first, as
SequentialLR([warm-up, schedule], milestones=[W]): epoch e < W trains at lr * (e + 1) / (W + 1),
and the schedule then starts its own epoch count at 0 (so milestones count from the end of the
warm-up, as SequentialLR's do).  OneCycle has its own warm-up (pct_start) and takes none.

The learning rate of every batch is a function of (epoch, batch of the epoch): a resumed run
gets the same rates; `lrs` hands a chunk's rates to the C training call.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

AUGMENTS = {"shift": int, "hflip": bool, "erase": float}
AUGMENT_HELP = ("shift=N: random shift by up to N pixels each way (zero padding, as RandomCrop(padding=N)); "
                "hflip: left-right flip with probability 0.5; erase=P: with probability P zero a random "
                "rectangle (RandomErasing's scale and ratio); e.g. shift=2,hflip,erase=0.25")


def parse_augment(text: Any) -> dict[str, Any]:
    """'shift=2,hflip,erase=0.25' -> {'shift': 2, 'hflip': True, 'erase': 0.25}; ValueError."""
    if text is None or text == "" or text == "none":
        return {"shift": 0, "hflip": False, "erase": 0.0}
    if not isinstance(text, str):
        raise ValueError(f"expected text such as 'shift=2,hflip,erase=0.25', got {text!r}")
    out: dict[str, Any] = {"shift": 0, "hflip": False, "erase": 0.0}
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        if name not in AUGMENTS:
            raise ValueError(f"unknown augmentation '{name}' (expected {', '.join(AUGMENTS)})")
        kind = AUGMENTS[name]
        if kind is bool:
            if eq:
                raise ValueError(f"'{name}' takes no value")
            out[name] = True
            continue
        try:
            v = kind(value)
        except ValueError:
            raise ValueError(f"'{name}' needs a{'n integer' if kind is int else ' number'} value, got "
                             f"'{part.strip()}'") from None
        if kind is int and not 0 <= v <= 64:
            raise ValueError(f"shift must be in 0..64, got {v}")
        if kind is float and not 0 <= v <= 1:
            raise ValueError(f"{name} must be a probability in [0, 1], got {v}")
        out[name] = v
    return out


def augment_problem(text: Any) -> str | None:
    try:
        parse_augment(text)
    except ValueError as exc:
        return str(exc)
    return None


def check_schedule(s: dict[str, Any]) -> str | None:
    """What is wrong with the schedule settings `s` (None: nothing)."""
    kind = s["lr_schedule"]
    if kind == "step" and not s.get("step_size"):
        return "--lr-schedule step needs --step-size N (epochs between decays)"
    if kind == "multistep" and not s.get("milestones"):
        return "--lr-schedule multistep needs --milestones N... (epochs at which lr is multiplied by --gamma)"
    if kind == "onecycle" and s["warmup_epochs"]:
        return "--lr-schedule onecycle warms up by itself (--pct-start); --warmup-epochs does not apply"
    if kind == "cosine" and s["warmup_epochs"] >= s["epochs"]:
        return f"--warmup-epochs {s['warmup_epochs']} leaves no epochs for the cosine schedule ({s['epochs']} epochs)"
    if kind == "onecycle" and not 0 < s["pct_start"] < 1:
        return f"--pct-start must be in (0, 1), got {s['pct_start']}"
    if kind == "onecycle" and not (s["div_factor"] > 0 and s["final_div_factor"] > 0):
        return "--div-factor and --final-div-factor must be > 0"
    return None


def constant(s: dict[str, Any]) -> bool:
    """Whether every batch trains at lr (no schedule, no warm-up)."""
    return s["lr_schedule"] == "none" and not s["warmup_epochs"]


def epoch_lr(s: dict[str, Any], epoch: int) -> float:
    """The learning rate of 0-based `epoch` for the per-epoch schedules."""
    lr, w = float(s["lr"]), int(s["warmup_epochs"])
    if epoch < w:
        return lr * (epoch + 1) / (w + 1)
    e = epoch - w
    kind = s["lr_schedule"]
    if kind == "step":
        return lr * s["gamma"] ** (e // s["step_size"])
    if kind == "multistep":
        return lr * s["gamma"] ** sum(1 for m in s["milestones"] if m <= e)
    if kind == "cosine":
        t_max = s["epochs"] - w
        return s["min_lr"] + (lr - s["min_lr"]) * (1 + math.cos(math.pi * e / t_max)) / 2
    return lr


def onecycle_lr(s: dict[str, Any], step: int, total: int) -> float:
    """OneCycleLR's rate at `step` of `total` (two phases, cosine annealing)."""
    top = float(s["max_lr"] if s["max_lr"] is not None else s["lr"])
    initial = top / s["div_factor"]
    low = initial / s["final_div_factor"]
    end1 = float(s["pct_start"] * total) - 1
    end2 = float(total - 1)

    def anneal(a: float, b: float, pct: float) -> float:
        return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1)

    if step <= end1:
        return anneal(initial, top, step / end1)
    return anneal(top, low, (step - end1) / (end2 - end1))


def lrs(s: dict[str, Any], epoch: int, first: int, count: int, batches: int) -> np.ndarray:
    """Rates of batches first..first+count-1 of 0-based `epoch` (`batches` per epoch)."""
    if s["lr_schedule"] == "onecycle":
        total = int(s["epochs"]) * batches
        return np.array([onecycle_lr(s, epoch * batches + b, total) for b in range(first, first + count)])
    return np.full(count, epoch_lr(s, epoch))
