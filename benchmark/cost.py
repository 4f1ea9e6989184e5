"""Counted cost per trajectory at SD-1.5 shapes, by algorithm and --timestep-fraction (benchmark/README.md).

    python -m benchmark.cost        # one epoch of each setting on a tiny SD pipeline with 50 DDIM steps

Network evaluations are counted by hooks on the UNet, the VAE decoder and the flow (rows through each forward, and
rows whose output gets a gradient in the backward) and by a wrapper around the reward; the counts do not depend on the
image size, so a tiny pipeline gives the SD-1.5 counts. They are weighted with the project's per-sample costs of
SD-1.5 (torch.utils.flop_counter): UNet forward 803 GFLOP, its LoRA-only backward 910, VAE decode 2515, CLIP-L reward
162, flow (the release's size) 9 forward / 18 backward. `python -m benchmark.sd15 flops` recounts the forwards on
SD-1.5's real architecture (804.4, 2514.5, 9.1). Timed on the CPU (benchmark/README.md, SD-1.5 at full size), a VAE
decode takes 2.95 UNet rows against these FLOPs' 3.13, but the flow 0.027-0.034 against 0.011: FLOPs underprice the flow
2.4-3x there, still ~3 % of a UNet row.
"""

import collections
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dag  # noqa: E402
import rewards  # noqa: E402
from benchmark import baselines  # noqa: E402
from test_dag import save_tiny_sd  # noqa: E402  the tiny SD pipeline of the tests

SD15_GFLOP = {"unet_fwd": 803, "unet_bwd": 910, "vae_decode_fwd": 2515, "reward_fwd": 162, "flow_fwd": 9,
              "flow_bwd": 18}


def count_evaluations(module, kind, counts):
    """counts[kind_fwd] += rows of every forward; counts[kind_bwd] += rows of every output that receives a gradient."""

    def forward(module, inputs, out):
        counts[f"{kind}_fwd"] += len(inputs[0])
        out = out if torch.is_tensor(out) else out[0]
        if out.requires_grad:
            out.register_hook(lambda grad: counts.update({f"{kind}_bwd": len(grad)}))

    module.register_forward_hook(forward)


def per_trajectory(model, algo, fraction, steps=50, trajectories=4):
    """One epoch of `algo` at `fraction` -> {kind: evaluations per trajectory}, TFLOP per trajectory at SD-1.5."""
    argv = ["--model", model, "--reward", "jpeg_compressibility", "--prompts", "simple_animals", "--algo", algo,
            "--steps", str(steps), "--trajectories", str(trajectories), "--train-batch", "2", "--grad-accum", "2",
            "--epochs", "2", "--no-anneal", "--timestep-fraction", str(fraction)]
    args = dag.parse_args(argv)
    dag.check_args(args)
    m = dag.load_models(args, torch.device("cpu"), dag.pipeline_index(model, steps))
    counts = collections.Counter()
    for kind, module in (("unet", m.unet), ("vae_decode", m.vae.decoder), ("flow", m.flow)):
        if module is not None:
            count_evaluations(module, kind, counts)
    jpeg = rewards.load("jpeg_compressibility")

    def reward(images, prompts):
        counts["reward_fwd"] += len(images)
        return jpeg(images, prompts)

    params = m.lora_params + m.flow_params
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generators = {"noise": torch.Generator().manual_seed(0), "cpu": torch.Generator().manual_seed(0)}
    if algo == "ddpo":
        baselines.ddpo_epoch(m, reward, ["a cat"], optimizer, {}, args, generators)
    else:
        dag.dag_epoch(m, reward, ["a cat"], optimizer, 1, args, generators)
    evals = {k: v / trajectories for k, v in sorted(counts.items())}
    return evals, sum(SD15_GFLOP[k] * v for k, v in evals.items()) / 1000


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = save_tiny_sd(Path(tmp))
        print("| algorithm | f | K of 50 | UNet fwd / bwd rows | VAE decodes | rewards | flow fwd / bwd | TFLOP |")
        print("|---|---|---|---|---|---|---|---|")
        for algo in ("db", "ddpo"):
            for fraction in (1.0, 0.5, 0.25, 0.1):
                e, tflop = per_trajectory(model, algo, fraction)
                print(f"| {algo} | {fraction:g} | {max(1, int(50 * fraction))} | {e['unet_fwd']:g} / "
                      f"{e.get('unet_bwd', 0):g} | {e['vae_decode_fwd']:g} | {e['reward_fwd']:g} | "
                      f"{e.get('flow_fwd', 0):g} / {e.get('flow_bwd', 0):g} | {tflop:.1f} |", flush=True)
