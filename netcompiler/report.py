"""Parameter, MAC, FLOP and memory reports of a checked network.

Conventions (also in README):
- MACs: multiply-accumulates of conv2d and linear layers only, bias excluded
  (conv: output elements * in_channels/groups * kh * kw; linear: in * out), as fvcore counts
  them (torchinfo adds one per output element of a layer with a bias).
- FLOPs: every floating-point add, multiply, compare, divide, exp, erf or tanh counts as
  one.  conv/linear forward = 2*MACs (+1 per output for the bias); their backward =
  4*MACs (input and weight gradients) (+1 per output for the bias gradient); an input
  gradient with nothing trainable upstream (the first layer's) is never computed and not
  counted; a tensor read by several layers adds 1 per element for each further gradient.
  Element-wise layers count the operations of their C expressions (see layers/activations.py);
  pooling, upsampling and batch norm count theirs (their `flops`); the loss 5 per output (13
  for binary_cross_entropy, see loss_flops).
  Forward FLOPs are for evaluation mode; training FLOPs = training-mode forward +
  backward + loss, per sample; the optimizer update (per batch) is not included.
- Activations: elements of each layer's output per sample.  Memory saved for backward is
  every layer output plus max-pool argmax indices and dropout masks, per sample.
"""
from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from .check import Network
from .graph import needs_grad
from .layers import INPUT, Layer, fmt_shape
from .plan import fused_relus, gradient_add_flops, gradient_sum_slots, split_sums_per_sample, without_slot
from .target import current

OPTIMIZER_STATE = {"sgd": 0, "momentum": 1, "adam": 2, "adamw": 2}  # state tensors per parameter


def dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "float64": 8}[dtype]


def loss_flops(net: Network) -> int:
    k = net.num_classes
    # cross_entropy: max, exp and sum for log-sum-exp (3 per class) + softmax-minus-onehot
    # gradient (2 per class); mse: difference, square, sum (3) + gradient (2) per output;
    # binary_cross_entropy: |x|, negation, exp, max, x t, subtraction, log1p, sum (8) + gradient
    # (1 + e, compare, division, - t, * scale: 5) per output.
    return 13 * k if net.loss == "binary_cross_entropy" else 5 * k


def reads_network_input(layers: list[Layer]) -> set[int]:
    """Indices of the layers none of whose inputs needs a gradient (nothing trainable
    upstream: the network input and what is computed from it alone): their input gradient
    is never computed."""
    need = needs_grad(layers)
    return {l.index for l in layers if not any(t in need for t in l.inputs)}


def is_graph(layers: list[Layer]) -> bool:
    """Some layer reads something other than the layer before it."""
    return any(l.inputs != [INPUT if l.index == 0 else layers[l.index - 1].output] for l in layers)


def layer_row(layer: Layer, first: bool = False, fused: tuple[Layer, Layer] | None = None,
              in_place: bool = False) -> dict[str, Any]:
    fwd, bwd = layer.kind.flops(layer)
    if first:
        bwd -= layer.kind.input_grad_flops(layer)
    return {
        "index": layer.index + 1,
        "name": layer.name,
        "kind": layer.kind.kind,
        "options": layer.kind.describe_options(layer),
        "line": layer.line,
        "inputs": list(layer.inputs),
        "input_shape": list(layer.in_shape),
        "output_shape": list(layer.out_shape),
        "params": layer.params,
        "macs": layer.kind.macs(layer),
        "flops": fwd,
        "backward_flops": bwd,
        "activations": 0 if layer.kind.aliases_input(layer) or fused or in_place else layer.out_size,
        # a ReLU computed by its neighbours (plan.fused_relus): [forward by, backward by]
        "fused_into": [fused[0].name, fused[1].name] if fused else None,
    }


def saved_per_sample(layers: list[Layer]) -> tuple[int, int]:
    """(real elements, int32 elements) per sample kept for backward."""
    reals = ints = 0
    no_slot = without_slot(layers)
    for l in layers:
        if l.output not in no_slot:
            reals += l.out_size
        for ctype, n in l.kind.saved_slots(l).values():
            if ctype == "int32_t":
                ints += n
            else:
                reals += n
    # a tensor's gradient written by a second reader that cannot add in place: a slot of its own
    reals += sum(math.prod(s) for s in gradient_sum_slots(layers).values())
    # a batch norm run split (plan.split_layers): each sample's partial sums
    reals += split_sums_per_sample(layers)
    return reals, ints


def training_memory(layers: list[Layer], batch_size: int, dtype: str = "float32",
                    optimizer: str = "adam") -> dict[str, int]:
    """Bytes to train at `batch_size`: parameters, gradients, optimizer state, the cache of
    transformed weights (Winograd convolutions), and per sample the saved activations and
    their gradients."""
    b = dtype_bytes(dtype)
    params = sum(l.params for l in layers)
    buffers = sum(math.prod(s) for l in layers for s in l.buffer_shapes().values())
    reals, ints = saved_per_sample(layers)
    out = {
        "params_bytes": (params + buffers) * b,
        "grads_bytes": params * b,
        "optimizer_bytes": OPTIMIZER_STATE[optimizer] * params * b,
        "cache_bytes": sum(math.prod(s) for l in layers for s in l.kind.cache_shapes(l).values()) * b,
        # forward saves `reals`; backward needs a gradient of the same size for each
        "activation_bytes": batch_size * (2 * reals * b + 4 * ints),
    }
    out["total_bytes"] = sum(out.values())
    return out


def kernel_rows(layers: list[Layer]) -> list[dict[str, Any]]:
    """The kernel path each layer of a kind with several runs (conv2d), and why."""
    rows = []
    for l in layers:
        choice = l.kind.kernel_choice(l)
        if choice is not None:
            rows.append({"name": l.name, "kind": l.kind.kind, "path": choice.path.name,
                         "forward": choice.path.forward + (f"; evaluation: {choice.eval_path.name}, "
                                                           f"{choice.eval_path.forward}" if choice.eval_path else ""),
                         "backward": choice.path.backward
                         if l.grad_input else choice.path.backward + " (no input gradient)",
                         "why": choice.why, "costs": choice.costs})
    return rows


def kernel_lines(rep: dict) -> list[str]:
    rows = rep["kernels"]
    if not rows:
        return ["kernel paths: no layer has several"]
    head = ["name", "path", "forward", "backward", "why"]
    body = [[r[k] for k in head] for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def fmt(row):
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    vec = rep.get("kernel_vec")
    width = f" for vectors of {vec} reals" if vec else ""
    return ([f"kernel paths{width} (cost: estimated vector operations per sample, forward and backward):", fmt(head),
             "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


def build_report(net: Network, batch_size: int = 64, dtype: str = "float32", optimizer: str = "adam",
                 kernels: bool = False) -> dict:
    first = reads_network_input(net.layers)
    fused = fused_relus(net.layers)
    no_slot = without_slot(net.layers)
    rows = [layer_row(l, l.index in first, fused.get(l.index), l.output in no_slot and not l.kind.aliases_input(l))
            for l in net.layers]
    summed = gradient_add_flops(net.layers)  # gradients summed where a tensor has several readers
    for r, l in zip(rows, net.layers):
        r["backward_flops"] += summed[l.index]
    train_fwd_extra = sum(l.kind.train_forward_extra_flops(l) for l in net.layers)
    total_flops = sum(r["flops"] for r in rows)
    total_bwd = sum(r["backward_flops"] for r in rows)
    reals, ints = saved_per_sample(net.layers)
    buffers = sum(math.prod(s) for s in net.buffer_shapes().values())
    mem = training_memory(net.layers, batch_size, dtype, optimizer)
    return {
        "name": net.name,
        "spec": net.file,
        "spec_hash": net.spec_hash,
        "input": list(net.input_shape),
        "output": list(net.output_shape),
        "loss": net.loss,
        "dtype": dtype,
        "layers": rows,
        "graph": is_graph(net.layers),
        "total_params": net.total_params,
        "total_param_bytes": net.total_params * dtype_bytes(dtype),
        "total_buffers": buffers,
        "total_macs": sum(r["macs"] for r in rows),
        "total_flops": total_flops,
        "loss_flops": loss_flops(net),
        "training_flops": total_flops + train_fwd_extra + total_bwd + loss_flops(net),
        "saved_activations": reals,
        "saved_indices": ints,
        "saved_activation_bytes": reals * dtype_bytes(dtype) + 4 * ints,
        "batch_size": batch_size,
        "optimizer": optimizer,
        "training_memory": mem,
        **({"kernels": kernel_rows(net.layers), "kernel_vec": current().vec} if kernels else {}),
    }


# ---- formatting ------------------------------------------------------------------------
COLUMNS = [("index", "#"), ("name", "name"), ("kind", "kind"), ("input_shape", "input"),
           ("output_shape", "output"), ("params", "params"), ("macs", "MACs"), ("flops", "FLOPs"),
           ("activations", "activations")]


def _columns(rep: dict) -> list[tuple[str, str]]:
    """The table's columns: a graph's also name each layer's inputs."""
    return COLUMNS[:3] + [("inputs", "inputs")] + COLUMNS[3:] if rep.get("graph") else COLUMNS


def _cell(key: str, v: Any) -> str:
    if key == "inputs":
        return ", ".join(v)
    if key.endswith("_shape"):
        return fmt_shape(tuple(v))
    if isinstance(v, int) and key != "index":
        return f"{v:,}"
    return str(v)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def table_lines(rep: dict) -> list[str]:
    """The per-layer table as aligned text lines (also used in the generated C header)."""
    cols = _columns(rep)
    head = [h for _, h in cols]
    body = [[_cell(k, r[k]) for k, _ in cols] for r in rep["layers"]]
    totals = {"name": "total", "input_shape": fmt_shape(tuple(rep["input"])),
              "output_shape": fmt_shape(tuple(rep["output"])), "params": f"{rep['total_params']:,}",
              "macs": f"{rep['total_macs']:,}", "flops": f"{rep['total_flops']:,}",
              "activations": f"{sum(r['activations'] for r in rep['layers']):,}"}
    total = [totals.get(k, "") for k, _ in cols]
    widths = [max(len(row[i]) for row in [head, *body, total]) for i in range(len(head))]
    numeric = {i for i, (k, _) in enumerate(cols) if k in ("index", "params", "macs", "flops", "activations")}

    def fmt(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [fmt(head), rule, *map(fmt, body), rule, fmt(total)]


def summary_lines(rep: dict) -> list[str]:
    mem = rep["training_memory"]
    return [
        f"parameters: {rep['total_params']:,} ({human_bytes(rep['total_param_bytes'])} as {rep['dtype']})"
        + (f"; buffers (running statistics): {rep['total_buffers']:,}" if rep["total_buffers"] else ""),
        f"forward per sample: {rep['total_macs']:,} MACs, {rep['total_flops']:,} FLOPs",
        f"training per sample (forward + backward + loss): {rep['training_flops']:,} FLOPs",
        f"saved for backward per sample: {rep['saved_activations']:,} values"
        + (f" + {rep['saved_indices']:,} indices" if rep["saved_indices"] else "")
        + f" ({human_bytes(rep['saved_activation_bytes'])})",
        f"training memory at batch {rep['batch_size']} with {rep['optimizer']}: {human_bytes(mem['total_bytes'])} "
        f"(params {human_bytes(mem['params_bytes'])}, grads {human_bytes(mem['grads_bytes'])}, optimizer "
        f"{human_bytes(mem['optimizer_bytes'])}, "
        + (f"Winograd weights {human_bytes(mem['cache_bytes'])}, " if mem["cache_bytes"] else "")
        + f"activations+gradients {human_bytes(mem['activation_bytes'])})",
    ] + _fused_lines(rep)


def _fused_lines(rep: dict) -> list[str]:
    fused = [r for r in rep["layers"] if r.get("fused_into")]
    if not fused:
        return []
    return ["fused ReLUs (no buffer or pass of their own; forward in the layer before, backward in the layer "
            "after): " + ", ".join(f"{r['name']} ({r['fused_into'][0]}, {r['fused_into'][1]})" for r in fused)]


CONVENTIONS = ("MACs: conv/linear multiply-accumulates, bias excluded (as fvcore; torchinfo adds the bias). "
               "FLOPs: each add, multiply, compare, divide, exp, erf, tanh = 1; forward in eval mode; training = "
               "train-mode forward + backward + loss, optimizer excluded.")


def format_report(rep: dict, fmt: str = "text") -> str:
    if fmt == "json":
        return json.dumps(rep, indent=2) + "\n"
    if fmt == "csv":
        buf = io.StringIO()
        keys = ["index", "name", "kind", "options", "input_shape", "output_shape", "params", "macs", "flops",
                "backward_flops", "activations"] + (["inputs"] if rep.get("graph") else [])
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(keys)
        for r in rep["layers"]:
            w.writerow([fmt_shape(tuple(r[k])) if k.endswith("_shape") else " ".join(r[k]) if k == "inputs" else r[k]
                        for k in keys])
        return buf.getvalue()
    if fmt == "markdown":
        cols = _columns(rep)
        head = [h for _, h in cols]
        lines = [f"# {rep['name']} ({rep['spec']})", "", "| " + " | ".join(head) + " |",
                 "|" + "|".join("---:" if k in ("index", "params", "macs", "flops", "activations") else "---"
                                for k, _ in cols) + "|"]
        for r in rep["layers"]:
            lines.append("| " + " | ".join(_cell(k, r[k]) for k, _ in cols) + " |")
        lines.append("")
        lines += [f"- {s}" for s in summary_lines(rep)]
        if rep.get("kernels"):
            lines += ["", f"Kernel paths for vectors of {rep['kernel_vec']} reals:", "",
                      "| name | kernel path | forward | backward | why |", "|---|---|---|---|---|"]
            lines += [f"| {r['name']} | {r['path']} | {r['forward']} | {r['backward']} | {r['why']} |"
                      for r in rep["kernels"]]
        lines += ["", f"_{CONVENTIONS}_"]
        return "\n".join(lines) + "\n"
    lines = [f"{rep['name']}: {rep['spec']} (input {fmt_shape(tuple(rep['input']))}, loss {rep['loss']})", ""]
    lines += table_lines(rep) + [""] + summary_lines(rep)
    if "kernels" in rep:
        lines += [""] + kernel_lines(rep)
    lines += ["", CONVENTIONS]
    return "\n".join(lines) + "\n"
