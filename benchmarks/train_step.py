"""Images/s of one training step (forward, loss, backward, optimiser) for each model at its
paper resolution and at the light default (128 px). CPU here; `--device cuda` on a GPU."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import report, table  # noqa: E402
from cxrfl_ray.tasks import TASKS  # noqa: E402
from cxrfl_ray.tasks.models import MODELS, create_model  # noqa: E402

# (model, paper resolution, paper batch size)
CASES = [
    ("unetplusplus-efficientnet-b4", 1024, 2),
    ("unet-resnet18", 1024, 2),
    ("resnet50", 224, 8),
    ("densenet121", 224, 8),
    ("resnet18", 224, 8),
]


def step_rate(name: str, size: int, batch: int, device: torch.device, steps: int) -> tuple[float, float | None]:
    """Training images/s, and on CUDA the peak GPU memory (GB) of one client doing it: what
    decides how many clients share a GPU (``fl.client_num_gpus``)."""
    task = MODELS[name].task
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = create_model(name, task, 1, 3).to(device).train()
    loss_fn = TASKS[task].make_loss("dice_bce" if task == "segmentation" else "cross_entropy").to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, size, size, device=device)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.5).float() if task == "segmentation" \
        else torch.randint(0, 3, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = batch * steps / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return rate, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="2 timed steps per case")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = 2 if args.quick else 5
    results = []
    for name, paper_size, batch in CASES:
        # 1024 px segmentation takes minutes per step on 2 CPU cores: quick mode uses 512.
        top = min(paper_size, 512) if args.quick and device.type == "cpu" else paper_size
        for size in (top, 128):
            rate, peak = step_rate(name, size, batch if size == top else 8, device, steps)
            results.append({"model": name, "size": size, "batch": batch if size == top else 8,
                            "images_per_s": round(rate, 2), "peak_gpu_gb": round(peak, 2) if peak else "-"})
            print(results[-1], flush=True)
    lines = table({"model": "model", "size": "px", "batch": "batch", "images_per_s": "train images/s",
                   "peak_gpu_gb": "peak GPU GB per client"}, results)
    report(f"train_step ({args.device}{', quick' if args.quick else ''})", {"results": results}, lines)


if __name__ == "__main__":
    main()
