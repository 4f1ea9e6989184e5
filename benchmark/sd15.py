"""Stable Diffusion 1.5 at full size on the CPU: SD-1.5's real architecture, built from its configs with random weights
(the hub is unreachable here), and one reduced DAG-DB epoch of dag.py on it, timed per network call.

    python -m benchmark.sd15 build --out runs/sd15-random     # the pipeline, cached on disk (~4.3 GB of fp32 weights)
    python -m benchmark.sd15 run --model runs/sd15-random --out runs/sd15-run [--grad-checkpointing]
    python -m benchmark.sd15 flops                           # FLOPs per network call at these shapes (flop_counter)

The pipeline: UNet2DConditionModel (block_out 320/640/1280/1280, 2 layers per block, cross-attention 768, attention
head dim 8, 64x64x4 latents), AutoencoderKL (block_out 128/256/512/512, 512x512 images, scaling factor 0.18215), a
CLIP ViT-L/14 text encoder of the real shape (12 layers, 768 wide, 77 positions), SD-1.5's PNDM scheduler config, and
the real CLIP tokenizer from ../shared/assets/clip_tokenizer when it is there (else a letters-only one, 77 tokens).

`run` is `dag.main` in this process with timers around every UNet, VAE-decoder and flow forward (seconds per call,
with and without grad; the training forward+backward is timed per trained transition from log.jsonl), then
RUN/sd15.json with the call counts, seconds per call, the flow's parameter count and the process's peak RSS.
"""

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import dag  # noqa: E402

SHARED_TOKENIZER = ROOT.parent / "shared" / "assets" / "clip_tokenizer"
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
# One reduced epoch: 2 trajectories of 2 DDIM steps, CFG 5, LoRA r 4, the default flow net, JPEG compressibility
EPOCH = ("--reward jpeg_compressibility --prompts simple_animals --steps 2 --trajectories 2 --train-batch 1 "
         "--grad-accum 2 --epochs 1 --no-anneal --guidance-scale 5 --lora-rank 4 --eval-every 0").split()


def build(out):
    """SD-1.5's pipeline from its configs, seeded random weights, saved as safetensors in OUT."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    t0 = time.time()
    real = (SHARED_TOKENIZER / "vocab.json").is_file()
    if real:
        tokenizer = CLIPTokenizer(str(SHARED_TOKENIZER / "vocab.json"), str(SHARED_TOKENIZER / "merges.txt"),
                                  model_max_length=77)
    else:
        from test_dag import toy_clip_tokenizer

        tokenizer = toy_clip_tokenizer(Path(out) / "toy-tokenizer")
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77, hidden_act="quick_gelu",
                                                projection_dim=768, bos_token_id=eos - 1, eos_token_id=eos,
                                                pad_token_id=eos))
    unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                                attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215)
    scheduler = PNDMScheduler(**SD15_SCHEDULER)
    scheduler.register_to_config(clip_sample=False)  # as SD-1.5's scheduler_config.json has it (DDIM reads it)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    counts = {name: sum(p.numel() for p in net.parameters()) for name, net in
              (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    record = {"params": counts, "tokenizer": "the real CLIP tokenizer" if real else "a letters-only toy",
              "vocab": len(tokenizer), "build_s": round(time.time() - t0, 1)}
    (Path(out) / "build.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


def timed(module, name, calls):
    """Time every forward of `module` into calls[name] (seconds, rows)."""
    start = {}
    module.register_forward_pre_hook(lambda mod, args, kwargs: start.update(t=time.perf_counter()), with_kwargs=True)

    def done(mod, args, kwargs, output):
        x = kwargs.get("sample", args[0] if args else None)
        calls.setdefault(name, []).append((time.perf_counter() - start["t"], len(x), torch.is_grad_enabled()))

    module.register_forward_hook(done, with_kwargs=True)


def run(model, out, extra):
    """dag.main on the pipeline with every network call timed -> OUT/sd15.json."""
    calls, load = {}, dag.load_models

    def load_timed(args, device, index):
        m = load(args, device, index)
        for name, net in (("unet", m.unet), ("vae_decoder", m.vae.decoder), ("flow", m.flow)):
            timed(net, name, calls)
        return m

    dag.load_models = load_timed
    t0 = time.time()
    dag.main(["--model", str(model), "--out", str(out), *EPOCH, *extra])
    log = dag.read_jsonl(Path(out) / "log.jsonl")[0]
    args = dag.parse_args(["--model", str(model), *EPOCH, *extra])
    trained = args.trajectories * max(1, int(args.steps * args.timestep_fraction))
    summary = {}
    for name, rows in calls.items():
        for grad in (False, True):  # forward passes only; with grad: the training forward, whose backward follows
            got = [(s, n) for s, n, g in rows if g == grad]
            summary[f"{name}, {'forward with grad' if grad else 'no grad'}"] = {
                "calls": len(got), "rows per call": sorted({n for _, n in got}),
                "s per call": [round(s, 3) for s, _ in got],
                "median s per row": sorted(s / n for s, n in got)[len(got) // 2] if got else None}
    record = {"argv": sys.argv, "threads": torch.get_num_threads(), "calls": summary,
              "rollout_and_scoring_s": log["rollout_s"], "train_s": log["train_s"], "trained_transitions": trained,
              "s per trained transition": log["train_s"] / trained,
              "flow_params": sum(p.numel() for p in dag.FlowNet().parameters()),
              "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "wall_s": time.time() - t0}
    (Path(out) / "sd15.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


def flops(model):
    """FLOPs (torch.utils.flop_counter) of one row through each network at SD-1.5's shapes, beside cost.py's prices."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    args = dag.parse_args(["--model", str(model), *EPOCH])
    m = dag.load_models(args, torch.device("cpu"), dag.pipeline_index(str(model), args.steps))
    x, t = torch.randn(1, 4, 64, 64), torch.tensor([501])
    text = dag.encode_prompts(m, ["a cat"])
    found = {}
    for name, call in (("unet_fwd", lambda: m.unet(x, t, encoder_hidden_states=text)),
                       ("vae_decode_fwd", lambda: m.vae.decode(x / m.vae.config.scaling_factor)),
                       ("flow_fwd", lambda: m.flow(x, t, text))):
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            call()  # the math attention: flop_counter has no formula for the CPU's fused attention kernel
        found[name] = counter.get_total_flops() / 1e9
    print(json.dumps({"GFLOP per row": found, "cost.py": {k: v for k, v in __import__("benchmark.cost").cost
                                                          .SD15_GFLOP.items() if k in found}}, indent=1))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["build", "run", "flops"])
    p.add_argument("--out", default="runs/sd15-random", type=Path)
    p.add_argument("--model", default="runs/sd15-random", type=Path)
    p.add_argument("--grad-checkpointing", action="store_true")
    a = p.parse_args()
    if a.command == "build":
        build(a.out)
    elif a.command == "run":
        run(a.model, a.out, ["--grad-checkpointing"] if a.grad_checkpointing else [])
    else:
        flops(a.model)
