"""Training throughput of a model, fp32 vs bf16 autocast, measured in one run (same process, interleaved).

Run: .venv/bin/python benchmarks/train_speed.py [--model custom-cnn] [--size 64] [--batch 64] [--steps 20] [--rounds 3]
[--device cpu|cuda]
Prints a table and writes benchmarks/results/train_speed_<model>.json (or --out). Each step is a real training step
as ``train`` runs it: augmentation on the CPU, then normalisation, channels_last forward/backward and AdamW on the
device (on CUDA the step ends with a synchronize, so the time is the step's, not its launch's). bf16 only pays off
on CPUs with native bf16 (AVX-512 BF16 / AMX); elsewhere it is emulated and slower, which is why
``precision=auto`` picks fp32 there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from harness import command_line, interleaved, machine_info, save_result
from rich.console import Console
from rich.table import Table

from malaria_cells.augment import augment
from malaria_cells.models import autocast, build_model, cpu_has_bf16, default_preprocessing, to_input


def steps_per_s(model, prep, precision: str, batch: int, steps: int, device: torch.device) -> float:
    """Median images/s over ``steps`` training steps (after two warm-up steps)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x_u8 = torch.randint(0, 255, (batch, prep.input_size, prep.input_size, 3), dtype=torch.uint8)
    y = torch.randint(0, 2, (batch,)).float().to(device)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        x = to_input(augment(x_u8, gen).to(device), prep)
        with autocast(precision, device):
            out = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="custom-cnn")
    ap.add_argument("--size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (augmentation stays on the CPU, as in train)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/train_speed_<model>.json")
    args = ap.parse_args()
    machine = machine_info(["malaria-cells", "torch", "timm", "numpy"])  # CPU, cores, versions, git commit
    device = torch.device(args.device)
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    torch.set_num_threads(os.cpu_count() or 1)
    prep = default_preprocessing(args.model, args.size)
    model = build_model(args.model).to(device).to(memory_format=torch.channels_last).train()
    rounds = interleaved(
        {p: lambda p=p: steps_per_s(model, prep, p, args.batch, args.steps, device) for p in ("fp32", "bf16")},
        args.rounds,
    )
    params = {
        "model": args.model,
        "input_size": prep.input_size,
        "batch": args.batch,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    out = {
        "cpu_has_native_bf16": cpu_has_bf16(),
        "images_per_s": {p: statistics.median(v) for p, v in rounds.items()},
        "rounds": rounds,
    }
    on = machine.get("gpu") or f"{params['threads']} threads (native bf16: {cpu_has_bf16()})"
    t = Table(title=f"{args.model} training at {prep.input_size}px, batch {args.batch}, {on}")
    t.add_column("precision")
    t.add_column("images/s (median of rounds)", justify="right")
    for p, v in out["images_per_s"].items():
        t.add_row(p, f"{v:.0f}")
    Console().print(t)
    save_result(
        args.out or f"benchmarks/results/train_speed_{args.model}.json",
        name="train_speed",
        command=command_line(),
        params=params,
        results=out,
        machine=machine,
    )


if __name__ == "__main__":
    main()
