"""dag.py beside the authors' own code, end to end: the paper's release (apple/ml-diffusion-alignment-gflownet at
commit 12c5952, its scripts/train_gfn.py) and TRL's DDPOTrainer (trl==0.23.1), each on the text-to-image benchmark's
model, prompts and reward with dag.py's settings, each scored by dag.py's own fixed-noise evaluation, each timed per
phase (benchmark/README.md, the text-to-image part).

The repository holds none of their code. `setup-release` edits a checkout that you fetched (RELEASE_CHANGES: string
replacements, each anchor found exactly once); TRL runs as installed from PyPI, changed at run time by this launcher.

Setup, once (each peer in its own venv; torch==2.13.0 first, so that pip takes the CPU wheel; never torchvision):

    # a checkout of apple/ml-diffusion-alignment-gflownet at 12c5952 in /work/peers/release (git archive or worktree)
    python3 -m venv /work/peers/venv-release && /work/peers/venv-release/bin/pip install torch==2.13.0
    /work/peers/venv-release/bin/pip install diffusers==0.42.1 transformers==5.23.0 peft==0.21.2 inflect termcolor \\
        datasets pyyaml wandb requests
    python3 -m venv /work/peers/venv-trl && /work/peers/venv-trl/bin/pip install torch==2.13.0
    /work/peers/venv-trl/bin/pip install trl==0.23.1 diffusers==0.42.1 transformers==5.23.0 peft==0.21.2
    python -m benchmark.peers setup-release --release /work/peers/release

Runs, from the repository root in dag.py's venv (each peer runs in its own venv, OMP_NUM_THREADS=1, HF_HUB_OFFLINE=1):

    python -m benchmark.peers release --release /work/peers/release --out runs/peers/release-db-seed1 --seed 1
    python -m benchmark.peers ddpo --out runs/peers/trl-ddpo-seed1 --seed 1
    python -m benchmark.peers score --run runs/peers/release-db-seed1 --every 5
    python -m benchmark.peers all --release /work/peers/release --out runs/peers     # all runs, 2 at a time; scores
    python -m benchmark.peers parity --release /work/peers/release --out runs/peers-parity   # rollout r at theta_0
    python -m benchmark.peers speed --release /work/peers/release --out runs/peers-speed     # s/traj, side by side
    python -m benchmark.peers report --out runs/peers    # table.md (+ OUT/speed.md if there) and curves.png

The defaults are the benchmark's budget (t2i.BUDGET: 20 DDIM steps, eta 1, guidance 1, 32 trajectories per epoch,
train batch 8, no accumulation, 20 epochs, LoRA rank 4), and for the release --reward-exp 300 --lr 3e-3 --unetreg 100,
for TRL --lr 3e-3 --clip-range 1e-2; `all` runs MATCHED. A peer run's folder reads like a dag.py run's: args.json
(the equivalent dag.py command line), log.jsonl (per epoch: rollout reward, rollout_s / train_s wall and
rollout_cpu_s / train_cpu_s process CPU seconds), checkpoint-E/ (the LoRA after E epochs, diffusers' format),
wall.json, and after `score` eval.jsonl (dag.evaluate's record, plus digit and colour accuracy).

Changes to the release (RELEASE_CHANGES), each with why:
  1. scripts/distributed.py: `import irisctl.api` goes: an internal cluster package that no registry has, used only by
     the multi-node launcher.
  2. scripts/distributed.py: the gloo backend and no torch.cuda.set_device when CUDA is absent (NCCL needs GPUs).
  3. scripts/train_gfn.py: the CPU device when CUDA is absent (torch.device(local_rank) is CUDA device local_rank),
     and both DDP wrappers without device_ids there (a CPU module takes none).
  4. alignment/rewards.py: ImageReward and torchvision imported only if present: module-level imports that only its
     imagereward reward uses (and torchvision must not sit beside a CPU torch from another index).
  5. alignment/flow.py: the flow's AvgPool2d(4) -> AdaptiveAvgPool2d(1). The one SD-1.5 size fixed in the flow net:
     after its four stride-2 down blocks a 64x64 latent is 4x4 and the pool takes it to 1x1; an 8x8 latent is 1x1
     there and AvgPool2d(4) fails. The adaptive pool equals it at 64x64. Nothing else is tied to SD-1.5: the
     cross-attention width is the text encoder's hidden_size (train_gfn.py:197, 32 here, 768 at SD-1.5), heads are
     channels / 8, in_channels 4; the release's width (64, 128, 256, 256) is kept (5,793,537 parameters here).
  6. alignment/diffusers_patch/pipeline_with_logprob.py: at guidance_scale <= 1 the sampler keeps the conditional half
     of the text states. diffusers' deprecated _encode_prompt, which it calls, concatenates [negative, prompt] states
     whatever do_classifier_free_guidance says, while the latents are not doubled: the UNet call fails ("The size
     of tensor a (32) must match the size of tensor b (64)"). With it the sampler runs the conditional branch alone.
Not edited, done by the launcher at run time (train_gfn.main() under `python -m torch.distributed.run --standalone
--nproc_per_node 1`, i.e. torchrun, in the release's venv): train_gfn.py reads config/sd.yaml and writes ./output
relative to the working directory, so it runs in OUT with OUT/config/sd.yaml = the release's own config with the keys
of the table below overridden (each must exist there); the prompt function and the reward are added to
alignment.prompts / alignment.rewards; the phases are timed by wrapping train_gfn.tqdm (its progress bars "Epoch e:
sampling" and "Epoch e.0: training" bracket them; checkpoint writes fall outside both). The release's training forward
still runs both CFG branches at w = 1 (cfg: True, its default): the same eps as the conditional branch, twice the UNet
rows.

Changes to TRL (at run time, in the DDPO worker):
  a. StableDiffusionPipeline._encode_prompt keeps the conditional half at w <= 1: TRL's pipeline_step fails at w = 1
     exactly as the release's sampler does (change 6).
  b. --lora-rank other than 4: TRL hard-codes LoraConfig(r=4, lora_alpha=4) (DefaultDDPOStableDiffusionPipeline.
     get_trainable_layers); the launcher substitutes r and lora_alpha (the default 4 needs nothing).
  c. save_freq 10**9 (TRL's own state saving off): TRL saves accelerate's whole state only `if epoch != 0 and epoch %
     save_freq == 0` (never the LoRA after the first epoch), and with DDPOConfig's default project_kwargs {} that
     save_state() raises TypeError (no output folder) at the end of the second epoch; the launcher saves the LoRA
     after every epoch with TRL's own save_checkpoint into OUT/checkpoint-E, outside the timed phases.
  d. Timing: DDPOTrainer.step (sampling from its start) and _train_batched_samples (training) are wrapped.
  e. accelerate's PartialState() made before the pipeline: DefaultDDPOStableDiffusionPipeline warns that the model
     folder has no LoRA file through accelerate's logger, which raises RuntimeError before any accelerate state
     exists (TRL's own order, pipeline then trainer, hits it whenever the model ships no LoRA).
  Settings off TRL's defaults: mixed_precision "no" (CPU), per_prompt_stat_tracking True with buffer 32 and min count
  16 (dag.py's DDPO; TRL's default is off, 16 / 16), allow_tf32 False (no effect on CPU), and the table below.

The settings, dag.py flag -> release config key (config/sd.yaml) -> TRL DDPOConfig field:
  --steps              sample.num_steps                       sample_num_steps
  --eta                sample.eta                             sample_eta
  --guidance-scale     sample.guidance_scale (train.cfg)      sample_guidance_scale (train_cfg)
  --trajectories       sample.batch_size x num_batches_per_epoch     sample_batch_size x sample_num_batches_per_epoch
                       (--sample-batch, default --train-batch: dag.py's UNet calls take train_batch rows)
  --train-batch        train.batch_size                       train_batch_size
  --grad-accum         train.gradient_accumulation_steps      train_gradient_accumulation_steps
  --epochs             num_epochs                             num_epochs
  --lr                 train.learning_rate (LoRA and flow)    train_learning_rate
  --flow-lr            none: the release's flow_learning_rate is read by nothing (only --flow-lr = --lr matches)
  --lora-rank          train.lora_rank                        none (change b)
  --timestep-fraction  train.timestep_fraction                train_timestep_fraction
  --reward-exp         train.reward_exp                       -
  --anneal / --no-anneal  train.anneal "linear" / "none"      -
  --unetreg            train.unetreg                          -
  --algo db / kl       train.klpf -1 / --kl-coef (default: the final --reward-exp, as dag.py)    -
  --clip-range         train.clip_range (DAG-KL)              train_clip_range
  --seed               seed                                   seed
  fixed alike          AdamW betas (0.9, 0.999), eps 1e-8, weight decay 1e-4, grad clip 1 (LoRA and flow apart in
                       the release and dag.py), adv clip 5, one inner epoch, CFG negative prompt ""
Not matched: the random streams (each draws its own prompts and noise); the release recomputes the x0_pred rewards in
training with the current theta (dag.py once at rollout); both peers train in train mode (no dropout here: no effect)
and run both CFG branches in the training forward at w = 1 (--no-train-cfg: the conditional branch alone, as dag.py;
the release's cfg=False branch adds a (B, C, H, W) unetreg to (B,) losses, which broadcasts right only when the train
batch B equals the latent width W, as it does here at 8; --no-train-cfg refuses other B with --unetreg).
"""

import argparse
import gzip
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "benchmark" / "models" / "digits-t2i"
PROMPTS = ROOT / "benchmark" / "models" / "digits-t2i-prompts"
VENVS = {"release": Path("/work/peers/venv-release"), "ddpo": Path("/work/peers/venv-trl")}
REWARD = "benchmark.t2i:named_digit"
EVAL_SAMPLES = 4  # fixed noise seeds per eval prompt, as t2i.BUDGET

# (file, anchor, replacement, why): each anchor must be found exactly once in a checkout of 12c5952
RELEASE_CHANGES = [
    ("scripts/distributed.py", "import irisctl.api as irisctl\n",
     "# peers.py: irisctl (internal, used only by init_distributed_multinode) not imported\n",
     "an internal cluster package that no registry has"),
    ("scripts/distributed.py", 'backend="nccl",\n        init_method=dist_url,',
     'backend="nccl" if torch.cuda.is_available() else "gloo",  # peers.py: gloo on CPU\n        init_method=dist_url,',
     "NCCL needs GPUs"),
    ("scripts/distributed.py", "    torch.cuda.set_device(local_rank)\n",
     "    if torch.cuda.is_available():  # peers.py\n        torch.cuda.set_device(local_rank)\n",
     "no CUDA device to set on CPU"),
    ("scripts/train_gfn.py", "device = torch.device(local_rank)\n",
     'device = torch.device(local_rank if torch.cuda.is_available() else "cpu")  # peers.py\n',
     "torch.device(local_rank) is a CUDA device"),
    ("scripts/train_gfn.py", "DDP(unet, device_ids=[local_rank])",
     "DDP(unet, device_ids=[local_rank] if torch.cuda.is_available() else None)", "a CPU module takes no device ids"),
    ("scripts/train_gfn.py", "DDP(flow_model, device_ids=[local_rank])",
     "DDP(flow_model, device_ids=[local_rank] if torch.cuda.is_available() else None)",
     "a CPU module takes no device ids"),
    ("alignment/rewards.py",
     "import ImageReward as RM\nfrom PIL import Image\nfrom torchvision.transforms import Compose, Resize, CenterCrop, "
     "Normalize\n",
     "try:  # peers.py: only the imagereward reward needs them\n    import ImageReward as RM\n    from torchvision"
     ".transforms import Compose, Resize, CenterCrop, Normalize\nexcept ImportError:\n    RM = None\nfrom PIL import "
     "Image\n",
     "module-level imports of packages that only the imagereward reward uses"),
    ("alignment/flow.py", "self.pool = nn.AvgPool2d(4, stride=4)",
     "self.pool = nn.AdaptiveAvgPool2d(1)  # peers.py: was nn.AvgPool2d(4, stride=4)",
     "AvgPool2d(4) assumes SD-1.5's 64x64 latents (4x4 after four down blocks)"),
    ("alignment/diffusers_patch/pipeline_with_logprob.py",
     "            lora_scale=text_encoder_lora_scale,\n        )\n",
     "            lora_scale=text_encoder_lora_scale,\n        )\n        if not do_classifier_free_guidance:"
     "  # peers.py: _encode_prompt concatenates [negative, prompt] even without CFG\n"
     "            prompt_embeds = prompt_embeds.chunk(2)[1]\n",
     "at guidance <= 1 the sampler got 2B text states for B latents"),
]


def die(message):
    print(f"peers.py: {message}", file=sys.stderr)
    sys.exit(2)


# --------------------------------------------------------------------------------------------------------------------
# Setup of the release checkout
# --------------------------------------------------------------------------------------------------------------------


def setup_release(release):
    """Apply RELEASE_CHANGES to the checkout in place (a second call finds them applied and changes nothing)."""
    for name, old, new, why in RELEASE_CHANGES:
        path = release / name
        if not path.is_file():
            die(f"{path} is missing: --release must be a checkout of apple/ml-diffusion-alignment-gflownet at 12c5952")
        text = path.read_text()
        if text.count(new) == 1:  # (a replacement may contain its anchor)
            print(f"already applied  {name}: {why}")
            continue
        if text.count(old) != 1:
            die(f"{name}: the anchor {old.strip()[:60]!r} is found {text.count(old)} times, not once (another "
                "version of the release?)")
        path.write_text(text.replace(old, new))
        print(f"applied          {name}: {why}")


def check_release(release):
    for name, _, new, _ in RELEASE_CHANGES:
        path = release / name
        if not path.is_file() or new not in path.read_text():
            die(f"{release} is not set up: python -m benchmark.peers setup-release --release {release}")


# --------------------------------------------------------------------------------------------------------------------
# Settings: one command line, mapped to the release's config and to DDPOConfig
# --------------------------------------------------------------------------------------------------------------------


def add_settings(p, peer):
    """The flags of a peer run; names, meanings and defaults as dag.py's, defaults the t2i benchmark's."""
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", type=Path, default=MODEL, help="a local StableDiffusionPipeline folder")
    p.add_argument("--prompts", type=Path, default=PROMPTS / "train.txt", help="training prompts, one per line")
    p.add_argument("--eval-prompts", type=Path, default=PROMPTS / "eval.txt", help="for `score`")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--trajectories", type=int, default=32, help="per epoch (= sample batch x batches)")
    p.add_argument("--sample-batch", type=int, default=None, help="per sampler call (default: train batch)")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--timestep-fraction", type=float, default=1.0)
    p.add_argument("--train-cfg", action=argparse.BooleanOptionalAction, default=True,
                   help="both CFG branches in the training forward (the peers' default); off: the conditional one "
                        "(w = 1 only, as dag.py)")
    if peer == "release":
        p.add_argument("--release", type=Path, required=True, help="the checkout, after setup-release")
        p.add_argument("--algo", choices=["db", "kl"], default="db")
        p.add_argument("--reward-exp", type=float, default=300.0)
        p.add_argument("--anneal", action=argparse.BooleanOptionalAction, default=True)
        p.add_argument("--unetreg", type=float, default=100.0)
        p.add_argument("--kl-coef", type=float, default=None, help="release: klpf (default: --reward-exp)")
        p.add_argument("--clip-range", type=float, default=1e-4)
        p.add_argument("--flow-lr", type=float, default=None, help="must equal --lr: the release has one lr")
    else:
        p.add_argument("--clip-range", type=float, default=1e-2)
    p.add_argument("--python", type=Path, default=None, help="the peer's venv (default: /work/peers/venv-...)")


def check_settings(a, peer):
    a.sample_batch = a.sample_batch or a.train_batch
    if a.guidance_scale < 1:
        die("--guidance-scale below 1: the peers' samplers would use w = 1 (as dag.py refuses)")
    if not a.train_cfg and a.guidance_scale != 1:
        die("--no-train-cfg trains eps_c, which is the sampled eps only at w = 1")
    if a.sample_batch % a.train_batch or a.trajectories % a.sample_batch:
        die("--trajectories must be a multiple of --sample-batch, and that of --train-batch")
    if a.trajectories % (a.train_batch * a.grad_accum):
        die("--trajectories must be a multiple of --train-batch x --grad-accum (whole optimizer steps)")
    if int(a.steps * a.timestep_fraction) < 1:
        die("int(--steps x --timestep-fraction) is 0: the peers would train no transition (dag.py trains 1)")
    if peer == "release":
        if a.flow_lr is not None and a.flow_lr != a.lr:
            die("--flow-lr: the release trains the LoRA and the flow at one learning rate (train.learning_rate)")
        if a.algo == "kl" and a.train_batch < 2:
            die("--algo kl: the leave-one-out baseline needs --train-batch >= 2")
        width = json.loads((a.model / "unet" / "config.json").read_text())["sample_size"]
        if not a.train_cfg and a.unetreg > 0 and a.train_batch != width:
            die(f"--no-train-cfg with --unetreg: the release's cfg=False branch adds a (B, C, H, W) unetreg to (B,) "
                f"losses (train_gfn.py:512-513, 587), which broadcasts as intended only when B = W ({width})")


def release_config(a):
    """The release's config keys (dotted) that a run sets; every other key keeps the release's value."""
    return {"sample.num_steps": a.steps, "sample.eta": a.eta, "sample.guidance_scale": a.guidance_scale,
            "sample.batch_size": a.sample_batch, "sample.num_batches_per_epoch": a.trajectories // a.sample_batch,
            "train.batch_size": a.train_batch, "train.gradient_accumulation_steps": a.grad_accum,
            "train.learning_rate": a.lr, "train.flow_learning_rate": a.lr, "train.lora_rank": a.lora_rank,
            "train.timestep_fraction": a.timestep_fraction, "train.reward_exp": a.reward_exp,
            "train.anneal": "linear" if a.anneal else "none", "train.unetreg": a.unetreg,
            "train.klpf": -1.0 if a.algo == "db" else (a.reward_exp if a.kl_coef is None else a.kl_coef),
            "train.clip_range": a.clip_range, "train.cfg": a.train_cfg, "train.num_inner_epochs": 1,
            "num_epochs": a.epochs, "seed": a.seed, "save_freq": 1, "mixed_precision": "no", "allow_tf32": False,
            "wandb": False, "pretrained.model": str(a.model.resolve()), "prompt_fn": "peers_prompts",
            "reward_fn": "peers_named_digit", "prompt_fn_kwargs": {}}


def ddpo_config(a):
    """DDPOConfig's fields that a run sets; the others keep TRL's defaults."""
    return dict(num_epochs=a.epochs, seed=a.seed, mixed_precision="no", allow_tf32=False, save_freq=10**9,
                sample_num_steps=a.steps, sample_eta=a.eta, sample_guidance_scale=a.guidance_scale,
                sample_batch_size=a.sample_batch, sample_num_batches_per_epoch=a.trajectories // a.sample_batch,
                train_batch_size=a.train_batch, train_gradient_accumulation_steps=a.grad_accum,
                train_learning_rate=a.lr, train_clip_range=a.clip_range, train_timestep_fraction=a.timestep_fraction,
                train_cfg=a.train_cfg, train_num_inner_epochs=1, train_adv_clip_max=5.0, train_max_grad_norm=1.0,
                train_adam_weight_decay=1e-4, per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=32,
                per_prompt_stat_tracking_min_count=16)


def dag_argv(a, peer):
    """The dag.py command line of the same run (args.json["argv"]: what `score` and t2i's report read)."""
    argv = ["dag.py", "--model", str(a.model.resolve()), "--reward", REWARD, "--prompts", str(a.prompts.resolve()),
            "--eval-prompts", str(a.eval_prompts.resolve()), "--eval-samples", str(EVAL_SAMPLES), "--steps",
            str(a.steps), "--eta", str(a.eta), "--guidance-scale", str(a.guidance_scale), "--trajectories",
            str(a.trajectories), "--train-batch", str(a.train_batch), "--grad-accum", str(a.grad_accum), "--epochs",
            str(a.epochs), "--lora-rank", str(a.lora_rank), "--timestep-fraction", str(a.timestep_fraction)]
    if peer == "release":
        argv += ["--algo", a.algo, "--lr", str(a.lr), "--reward-exp", str(a.reward_exp), "--unetreg", str(a.unetreg),
                 "--clip-range", str(a.clip_range)] + (["--kl-coef", str(a.kl_coef)] if a.kl_coef is not None else [])
        argv += [] if a.anneal else ["--no-anneal"]
    else:
        argv += ["--algo", "ddpo", "--lr", str(a.lr), "--clip-range", str(a.clip_range)]
    return argv + ["--seed", str(a.seed)]


# --------------------------------------------------------------------------------------------------------------------
# Launching a peer: the parent (dag.py's venv) and the workers (the peer's venv)
# --------------------------------------------------------------------------------------------------------------------


def launch(a, peer):
    """Write OUT's settings, run the peer's worker in its venv (one thread), then give its checkpoints dag.py's names,
    fold the release's own per-step log into log.jsonl, and write wall.json."""
    check_settings(a, peer)
    if peer == "release":
        check_release(a.release.resolve())
    out = a.out.resolve()
    if (out / "wall.json").exists() or (out / "train.log").exists():
        die(f"{out} holds a run: pass another --out")
    python = (a.python or VENVS[peer]) / "bin" / "python"
    if not python.exists():
        die(f"{python} is missing: make the venv as this file's docstring says")
    out.mkdir(parents=True, exist_ok=True)
    spec = {"peer": peer, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
            "prompts": str(a.prompts.resolve()),
            "config": release_config(a) if peer == "release" else ddpo_config(a)}
    (out / "peers.json").write_text(json.dumps(spec, indent=1))
    argv = dag_argv(a, peer)
    algo = argv[argv.index("--algo") + 1]
    (out / "args.json").write_text(json.dumps({"peer": peer, "algo": algo, "trajectories": a.trajectories,
                                               "epochs": a.epochs, "seed": a.seed, "argv": argv}, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    if peer == "release":
        env["PYTHONPATH"] = os.pathsep.join([str(a.release.resolve()), str(ROOT)])
        cmd = [str(python), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__,
               "_release-worker", "--release", str(a.release.resolve()), "--out", str(out)]
    else:
        env["PYTHONPATH"] = str(ROOT)
        cmd = [str(python), __file__, "_ddpo-worker", "--out", str(out)]
    print(f"{peer}: {' '.join(cmd)}\n  log: {out / 'train.log'}", flush=True)
    t0 = time.time()
    with open(out / "train.log", "w") as log:
        rc = subprocess.run(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall, usage = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc:
        die(f"{peer} failed (exit {rc}); the end of {out / 'train.log'}:\n" +
            "\n".join((out / "train.log").read_text().splitlines()[-25:]))
    if peer == "release":
        for path in (out / "output").glob("checkpoint_epoch*"):  # the LoRA after epoch e (0-based): E = e + 1
            path.rename(out / f"checkpoint-{int(path.name.removeprefix('checkpoint_epoch')) + 1}")
        merge_release_log(out)
    (out / "wall.json").write_text(json.dumps({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                                               "peer": peer}))
    for r in read_jsonl(out / "log.jsonl"):
        print(" | ".join(f"{k} {v:.4g}" for k, v in r.items() if isinstance(v, (int, float))))
    print(f"{peer}: done in {wall:.0f} s -> {out}")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def merge_release_log(out):
    """Add the release's own per-epoch means (its output/result.json, a gzip pickle keyed by global step: loss,
    log_pf, flow, log_pb, unetreg, logr, reward_mean of its rollout) to log.jsonl, prefixed 'release_'."""
    result = pickle.load(gzip.open(out / "output" / "result.json", "rb"))
    steps_of = {}
    for step, epoch in result["epoch"].items():
        steps_of.setdefault(epoch, []).append(step)
    records = read_jsonl(out / "log.jsonl")
    for r in records:
        for key, values in result.items():
            if key in ("config", "epoch", "time", "reward_mean", "reward_std"):
                continue
            got = [float(values[s]) for s in steps_of.get(r["epoch"], []) if s in values]
            if got:
                r[f"release_{key}"] = sum(got) / len(got)
        # its rollout reward mean is logged at the global step of the epoch's first optimizer step (0 at epoch 0)
        at = min(steps_of.get(r["epoch"], [1])) - 1
        if at in result["reward_mean"]:
            r["release_reward_mean"] = float(result["reward_mean"][at])
    (out / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


class PhaseClock:
    """Wall and process-CPU seconds of each epoch's sampling and training phases, and the rollout rewards (the reward
    calls made while sampling) -> one log.jsonl record per epoch, written when its training ends."""

    def __init__(self, out, beta=None):
        self.out, self.beta, self.phase, self.record, self.start = out, beta, None, {}, None

    def mark(self, phase, epoch):
        """Close the open phase and open `phase` ('sampling', 'training', or None: the epoch is done)."""
        now = (time.perf_counter(), time.process_time())
        if self.phase is not None:
            name = {"sampling": "rollout", "training": "train"}[self.phase]
            self.record[f"{name}_s"] = now[0] - self.start[0]
            self.record[f"{name}_cpu_s"] = now[1] - self.start[1]
        if phase == "sampling":
            self.record = {"epoch": epoch, "scores": []}
        if phase is None and self.record:
            scores = self.record.pop("scores")
            record = {"epoch": epoch, "reward_mean": statistics.fmean(scores), "reward_std": statistics.stdev(scores),
                      "trajectories": len(scores), **{k: v for k, v in self.record.items() if k != "epoch"}}
            if self.beta is not None:
                record["reward_exp"] = self.beta(epoch)
            with open(self.out / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            self.record = {}
        self.phase, self.start = phase, now

    def rewards(self, scores):
        if self.phase == "sampling":
            self.record["scores"] += [float(s) for s in scores]

    def around(self, iterable, phase, epoch):
        """Iterate, with the phase opened at the first item; a training phase closes the epoch at the end."""
        self.mark(phase, epoch)
        yield from iterable
        if phase == "training":
            self.mark(None, epoch)


def train_prompts(path):
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def release_worker(release, out):
    """Under torchrun, in the release's venv, in OUT: write OUT/config/sd.yaml, register the prompts and the reward,
    time the phases, run train_gfn.main()."""
    import torch
    import torch.distributed as dist
    import yaml

    sys.path[:0] = [str(release), str(ROOT)]
    spec = json.loads((out / "peers.json").read_text())
    config = yaml.safe_load((release / "config" / "sd.yaml").read_text())
    for key, value in spec["config"].items():
        *parents, last = key.split(".")
        node = config["parameters"]
        for k in parents:
            node = node[k]
        assert last in node, f"{key} is not a key of the release's config"
        node[last] = value
    (out / "config").mkdir(exist_ok=True)
    (out / "config" / "sd.yaml").write_text(yaml.safe_dump(config))

    import alignment.prompts
    import alignment.rewards
    import scripts.train_gfn as train_gfn
    from benchmark.t2i import named_digit

    p = config["parameters"]
    anneal, beta, epochs = p["train"]["anneal"], p["train"]["reward_exp"], p["num_epochs"]
    clock = PhaseClock(out, lambda e: beta * (min(1, e / (0.5 * epochs)) if anneal == "linear" else 1.0))
    prompts = train_prompts(spec["prompts"])
    alignment.prompts.peers_prompts = lambda: (random.choice(prompts), {})  # the release seeds `random`

    def peers_named_digit(dtype=torch.float32, device="cpu"):
        fn = named_digit(device)

        def _fn(images, prompts, metadata):  # the release's reward interface
            scores = fn(images.float(), list(prompts))
            clock.rewards(scores)
            return scores, {}

        return _fn

    alignment.rewards.peers_named_digit = peers_named_digit
    tqdm = train_gfn.tqdm

    def timed_tqdm(iterable, *args, desc="", **kwargs):
        bar = tqdm(iterable, *args, desc=desc, **kwargs)
        m = re.fullmatch(r"Epoch (\d+)(?:\.\d+)?: (sampling|training)", desc)
        return bar if m is None else clock.around(bar, m[2], int(m[1]))

    train_gfn.tqdm = timed_tqdm
    train_gfn.main()
    dist.destroy_process_group()


def ddpo_worker(out):
    """In TRL's venv, in OUT: DDPOTrainer on the pipeline, with changes a-e of the docstring."""
    import trl.models.modeling_sd_base as sd_base
    from accelerate import PartialState
    from diffusers import StableDiffusionPipeline
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    from benchmark.t2i import named_digit

    spec = json.loads((out / "peers.json").read_text())
    settings = spec["settings"]
    encode_prompt = StableDiffusionPipeline._encode_prompt

    def _encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, *args, **kwargs):
        """(a) diffusers' deprecated _encode_prompt concatenates [negative, prompt] even without CFG."""
        embeds = encode_prompt(self, prompt, device, num_images_per_prompt, do_classifier_free_guidance, *args,
                               **kwargs)
        return embeds if do_classifier_free_guidance else embeds.chunk(2)[1]

    StableDiffusionPipeline._encode_prompt = _encode_prompt
    rank, lora_config = settings["lora_rank"], sd_base.LoraConfig
    if rank != 4:  # (b) TRL's get_trainable_layers hard-codes r = lora_alpha = 4
        sd_base.LoraConfig = lambda **kw: lora_config(**{**kw, "r": rank, "lora_alpha": rank})

    clock = PhaseClock(out)
    prompts, reward = train_prompts(spec["prompts"]), named_digit()

    def reward_fn(images, prompts, metadata):
        scores = reward(images.float(), list(prompts))
        clock.rewards(scores)
        return scores, {}

    PartialState()  # (e) the pipeline warns (no LoRA file in the model) through accelerate's logger, which raises
    pipe = DefaultDDPOStableDiffusionPipeline(settings["model"], use_lora=True)  # before an accelerate state exists
    trainer = DDPOTrainer(DDPOConfig(**spec["config"]), reward_fn, lambda: (random.choice(prompts), {}), pipe)
    step, train_batched = trainer.step, trainer._train_batched_samples

    def timed_step(epoch, global_step):  # (c, d) the phases timed; the LoRA saved after each epoch
        clock.mark("sampling", epoch)
        global_step = step(epoch, global_step)
        pipe.save_checkpoint([pipe.unet], None, str(out / f"checkpoint-{epoch + 1}"))
        return global_step

    def timed_train(inner_epoch, epoch, global_step, batched_samples):
        clock.mark("training", epoch)
        global_step = train_batched(inner_epoch, epoch, global_step, batched_samples)
        clock.mark(None, epoch)
        return global_step

    trainer.step, trainer._train_batched_samples = timed_step, timed_train
    trainer.train()


# --------------------------------------------------------------------------------------------------------------------
# Scoring: dag.py's fixed-noise evaluation of a run's LoRA checkpoints
# --------------------------------------------------------------------------------------------------------------------


def diffusers_lora_to_peft(path):
    """A diffusers-format LoRA file (what the release, TRL and dag.py save: 'unet.<module>.lora.down/up.weight') ->
    (the state dict that peft's set_peft_model_state_dict takes for a UNet, the rank)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    state = load_file(path)
    if any(not k.startswith("unet.") for k in state):
        raise ValueError(f"{path}: keys other than the UNet's LoRA, e.g. {next(k for k in state if 'unet.' != k[:5])}")
    state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    alphas = {k: v for k, v in state.items() if k.endswith(".alpha")}
    ranks = {v.shape[0] for k, v in state.items() if "lora_A" in k}
    if len(ranks) != 1 or any(float(v) != next(iter(ranks)) for v in alphas.values()):
        raise ValueError(f"{path}: ranks {ranks} and alphas {set(map(float, alphas.values()))}: alpha = r expected")
    return {k: v for k, v in state.items() if k not in alphas}, ranks.pop()


def check_conversion(model, checkpoint, unet, text):
    """The UNet with the converted LoRA against diffusers' own loader (pipe.load_lora_weights) on one input:
    -> (max |difference|, max |LoRA effect|); raises if they differ."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    size = unet.config.sample_size
    x = torch.randn((len(text), unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(0))
    t = torch.linspace(901, 21, len(text)).long()
    with torch.no_grad():
        base = pipe.unet(x, t, encoder_hidden_states=text).sample
        pipe.load_lora_weights(str(checkpoint))
        theirs = pipe.unet(x, t, encoder_hidden_states=text).sample
        ours = unet(x, t, encoder_hidden_states=text).sample
    diff, effect = (ours - theirs).abs().max().item(), (theirs - base).abs().max().item()
    if not torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5):
        raise AssertionError(f"{checkpoint}: the converted LoRA differs from load_lora_weights' by {diff:.3g}")
    return diff, effect


def score(run, every=None, name=None, check=True):
    """Evaluate the base model (epoch 0) and each checkpoint-E of RUN (every E divisible by `every`, and the last)
    with dag.evaluate as the run's own settings say (its args.json argv: eval prompts, noise seeds, steps, eta,
    guidance, batch), add digit / colour accuracy (t2i.accuracy) -> RUN/eval.jsonl (a dag.py run:
    eval-rescored.jsonl, beside its own). Each checkpoint also gets training_state.pt holding its LoRA as
    t2i.samples reads it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    import dag
    from benchmark.t2i import accuracy, named_digit

    meta = json.loads((run / "args.json").read_text())
    args = dag.parse_args(meta["argv"][1:])
    checkpoints = {int(p.name.split("-")[1]): p for p in dag.checkpoints(run)}
    if not checkpoints:
        die(f"{run}: no checkpoint-E folder")
    last = max(checkpoints)
    chosen = [0] + [e for e in sorted(checkpoints) if not every or e % every == 0 or e == last]
    ranks = {diffusers_lora_to_peft(checkpoints[e] / "pytorch_lora_weights.safetensors")[1] for e in chosen[1:]}
    if len(ranks) != 1:
        die(f"{run}: checkpoints of ranks {ranks}")
    args.lora_rank, args.algo = ranks.pop(), "ddpo"  # no flow net
    torch.manual_seed(0)
    m = dag.load_models(args, torch.device("cpu"), dag.pipeline_index(args.model, args.steps))
    reward = dag.rewards.checked(named_digit(), "named_digit")
    eval_prompts = dag.rewards.task_prompts(args.reward, args.prompts, args.eval_prompts)[1]
    labels = [p for p in eval_prompts for _ in range(args.eval_samples)]
    lora_keys = set(dag.get_peft_model_state_dict(m.unet))
    zero = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in dag.get_peft_model_state_dict(m.unet).items()}
    path = run / (name or ("eval.jsonl" if "peer" in meta else "eval-rescored.jsonl"))
    path.write_text("")
    for epoch in chosen:
        t0, record = time.time(), {"epoch": epoch}
        if epoch == 0:
            state = zero  # lora_B = 0: the base model
        else:
            checkpoint = checkpoints[epoch]
            state, _ = diffusers_lora_to_peft(checkpoint / "pytorch_lora_weights.safetensors")
            if set(state) != lora_keys:
                die(f"{checkpoint}: LoRA keys differ from the UNet's ({len(set(state) ^ lora_keys)} apart)")
            if not (checkpoint / "training_state.pt").exists():  # a peer's; never a dag.py run's full state
                torch.save({"epoch": epoch, "lora": state}, checkpoint / "training_state.pt")
        result = dag.set_peft_model_state_dict(m.unet, state)
        if getattr(result, "unexpected_keys", None):
            die(f"epoch {epoch}: unexpected LoRA keys {result.unexpected_keys[:3]}")
        if epoch and check:
            text = dag.encode_prompts(m, eval_prompts[:2])
            record["conversion_max_diff"], record["lora_max_effect"] = check_conversion(args.model, checkpoint,
                                                                                        m.unet, text)
        evaluation, (images, _, _) = dag.evaluate(m, reward, eval_prompts, args, 0, 1)
        digit, colour = accuracy(images, labels)
        record = {"epoch": epoch, **evaluation, "digit_acc": digit, "colour_acc": colour,
                  "eval_s": time.time() - t0, **{k: v for k, v in record.items() if k != "epoch"}}
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"{run.name} epoch {epoch}: eval r {record['eval_reward_mean']:.4f} | digit {digit:.3f} | colour "
              f"{colour:.3f} | diversity {record['diversity']:.4f} | {record['eval_s']:.0f} s", flush=True)
    return path


# --------------------------------------------------------------------------------------------------------------------
# The comparison's runs, and the parity check at theta_0
# --------------------------------------------------------------------------------------------------------------------

SEEDS = (1, 2, 3)
# The matched settings (name: its algorithm, then a suffix): dag.py's DAG-DB and DAG-KL tuning tries whose flow
# learns at --lr (the release has one learning rate: t2i.TRIES db-1 and kl-5), the benchmark's chosen DAG-DB (db-2,
# also at one rate) and DDPO's chosen setting (ddpo-4); the peers' runs take the same flags (their defaults: the budget)
MATCHED = {"db": "--reward-exp 300 --lr 3e-3 --unetreg 100",
           "db-b1000": "--reward-exp 1000 --lr 3e-3 --unetreg 100",
           "kl": "--reward-exp 300 --lr 3e-3 --clip-range 1e-2 --unetreg 100",
           "ddpo": "--lr 3e-3 --clip-range 0.2"}
RUNS = [(f"release-{a}-seed{s}", "release", ["--algo", a[:2], *MATCHED[a].split(), "--seed", str(s)])
        for a in ("db", "kl", "db-b1000") for s in SEEDS] + \
       [(f"trl-ddpo-seed{s}", "ddpo", [*MATCHED["ddpo"].split(), "--seed", str(s)]) for s in SEEDS]


def dag_runs(out):
    """dag.py at the matched settings and SEEDS, as the t2i benchmark runs it: {name: (out, argv)}."""
    from benchmark.t2i import argv as t2i_argv

    return {f"dag-{a}-seed{s}": (out / f"dag-{a}-seed{s}", t2i_argv(a.split("-")[0], MATCHED[a], s))
            for a in MATCHED for s in SEEDS}


def run_all(release, out, every=5, parallel=2):
    """dag.py's matched runs (`parallel` at a time, from a snapshot of dag.py), then RUNS `parallel` at a time (a
    finished one, with wall.json, is skipped), each peer run then scored every `every` epochs."""
    from benchmark.digits import run_jobs, snapshot

    for path, argv in dag_runs(out).values():  # the t2i benchmark's run of the same command line, if it has one
        for done in (ROOT / "runs" / "t2i").glob("*/wall.json"):
            same = json.loads((done.parent / "args.json").read_text())["argv"][1:-2] == argv  # without its --out
            if same and not (path / "wall.json").exists():
                shutil.copytree(done.parent, path, dirs_exist_ok=True)
    run_jobs([(path, argv, snapshot(out / "code")) for path, argv in dag_runs(out).values()], parallel)
    todo = [(out / name, peer, flags) for name, peer, flags in RUNS if not (out / name / "wall.json").exists()]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    running = []
    while todo or running:
        while todo and len(running) < parallel:
            run, peer, flags = todo.pop(0)
            shutil.rmtree(run, ignore_errors=True)
            argv = [peer, "--out", str(run), *flags] + (["--release", str(release)] if peer == "release" else [])
            log = open(out / f"{run.name}.log", "w")
            running.append((subprocess.Popen([sys.executable, "-m", "benchmark.peers", *argv], cwd=ROOT, env=env,
                                             stdout=log, stderr=subprocess.STDOUT), log, run))
            print(f"start {run.name}", flush=True)
        time.sleep(2)
        for job in [j for j in running if j[0].poll() is not None]:
            running.remove(job)
            job[1].close()
            if job[0].returncode:
                die(f"{job[2].name} failed; see {out / job[2].name}.log")
            print(f"done  {job[2].name}", flush=True)
    for name, _, _ in RUNS:
        if not read_jsonl(out / name / "eval.jsonl"):
            score(out / name, every)


def speed(release, out, repeats=2, epochs=2):
    """Seconds per trajectory, rollout and training apart, of dag.py and each peer side by side: for each timestep
    fraction and each pair, a short run of dag.py then one of the peer (no evaluation), `repeats` times over, one at a
    time, one thread each -> OUT/speed.json (every epoch's seconds) and a table of medians and ratios."""
    from benchmark.digits import snapshot
    from benchmark.t2i import argv as t2i_argv

    script, rows = snapshot(out / "code"), {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # the reward's module
    for k in range(repeats):
        for f in (1.0, 0.25):
            for algo, peer in (("db", "release"), ("kl", "release"), ("ddpo", "ddpo")):
                extra = ["--epochs", str(epochs), "--timestep-fraction", str(f)]
                ours, theirs = out / f"dag-{algo}-f{f}-{k}", out / f"{peer}-{algo}-f{f}-{k}"
                for run in (ours, theirs):
                    shutil.rmtree(run, ignore_errors=True)
                subprocess.run([sys.executable, str(script), *t2i_argv(algo, MATCHED[algo], 1), *extra,
                                "--eval-every", "0", "--out", str(ours)], cwd=ROOT, env=env, check=True,
                               stdout=subprocess.DEVNULL)
                peer_algo = ["--algo", algo] if peer == "release" else []
                main([peer, "--out", str(theirs), *peer_algo, *MATCHED[algo].split(), "--seed", "1", *extra] +
                     (["--release", str(release)] if peer == "release" else []))
                for side, run in (("dag.py", ours), (peer, theirs)):
                    for r in read_jsonl(run / "log.jsonl"):
                        rows.setdefault(f"{algo} f={f:g} {side}", []).append(
                            {"rollout": r["rollout_s"] / r.get("trajectories", 32), "train": r["train_s"] / 32})
    (out / "speed.json").write_text(json.dumps(rows, indent=1))
    lines = ["| pair | f | dag.py s/traj, rollout + train | peer s/traj, rollout + train | peer / dag.py |",
             "|---|---|---|---|---|"]
    for algo, peer in (("db", "release"), ("kl", "release"), ("ddpo", "ddpo")):
        for f in (1.0, 0.25):
            med = {side: {part: statistics.median(r[part] for r in rows[f"{algo} f={f:g} {side}"])
                          for part in ("rollout", "train")} for side in ("dag.py", peer)}
            total = {side: med[side]["rollout"] + med[side]["train"] for side in med}
            lines.append(f"| {algo}: dag.py / {'the release' if peer == 'release' else 'TRL'} | {f:g} | "
                         f"{med['dag.py']['rollout']:.3f} + {med['dag.py']['train']:.3f} | "
                         f"{med[peer]['rollout']:.3f} + {med[peer]['train']:.3f} | "
                         f"{total[peer] / total['dag.py']:.2f} |")
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def parity(release, out, trajectories=64, steps=20):
    """The rollout reward at theta_0 (epoch 0, before any update) of dag.py, the release and TRL on the same model,
    prompts, steps and guidance 1: one epoch each, one trained transition per trajectory."""
    flags = ["--steps", str(steps), "--trajectories", str(trajectories), "--epochs", "1", "--timestep-fraction",
             str(1 / steps)]
    runs = {"dag.py db": out / "dag-db", "release db": out / "release-db", "trl ddpo": out / "trl-ddpo"}
    if not (runs["dag.py db"] / "log.jsonl").exists():
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run([sys.executable, str(ROOT / "dag.py"), "--model", str(MODEL), "--reward", REWARD, "--prompts",
                        str(PROMPTS / "train.txt"), "--eval-prompts", str(PROMPTS / "eval.txt"), "--guidance-scale",
                        "1", "--train-batch", "8", "--grad-accum", "1", "--eval-every", "0", "--reward-exp", "300",
                        "--no-anneal", "--lr", "3e-3", "--unetreg", "100", "--seed", "1", *flags, "--out",
                        str(runs["dag.py db"])],
                       cwd=ROOT, env=env, check=True)
    for key, peer in (("release db", "release"), ("trl ddpo", "ddpo")):
        if not (runs[key] / "wall.json").exists():
            shutil.rmtree(runs[key], ignore_errors=True)
            main([peer, "--out", str(runs[key]), "--seed", "1", *flags] +
                 (["--release", str(release), "--no-anneal"] if peer == "release" else []))
    print(f"rollout reward at theta_0, {trajectories} trajectories, {steps} DDIM steps, guidance 1 (mean +- s.e.):")
    for key, run in runs.items():
        r = read_jsonl(run / "log.jsonl")[0]
        print(f"  {key:11s} {r['reward_mean']:.4f} +- {r['reward_std'] / trajectories ** 0.5:.4f}"
              f"  (rollout {r['rollout_s']:.1f} s, train {r['train_s']:.1f} s)")


def report(out, threshold=0.8):
    """OUT/table.md and OUT/curves.png: each pair (dag.py beside the release's DAG-DB and DAG-KL, and beside TRL's
    DDPO) at SEEDS, scored by one evaluator (dag.evaluate on the same fixed noise; digit accuracy read from the
    samples), with the speed table of `speed` if it ran."""
    from PIL import Image, ImageDraw

    from benchmark.digits import mean_std, nice_ticks
    from benchmark.t2i import evaluations

    def evals(run):  # [(epoch, eval r, digit accuracy)] of a dag.py run (its grids) or a peer run (its `score`)
        rows = evaluations(run) if (run / "eval-0000.png").exists() else read_jsonl(run / "eval.jsonl")
        return [(r["epoch"], r["eval_reward_mean"], r["digit_acc"]) for r in rows]

    pairs = [("DAG-DB", "dag-db", "release-db", "the release"), ("DAG-KL", "dag-kl", "release-kl", "the release"),
             ("DAG-DB at beta 1000", "dag-db-b1000", "release-db-b1000", "the release"),
             ("DDPO", "dag-ddpo", "trl-ddpo", "TRL")]
    lines = ["| algorithm | code | eval r, final | digit acc, final | trajectories to digit acc ≥ "
             f"{threshold} | seeds |", "|---|---|---|---|---|---|"]
    curves = {}
    for algo, ours, theirs, who in pairs:
        for prefix, label in ((ours, "dag.py"), (theirs, who)):
            runs = [out / f"{prefix}-seed{s}" for s in SEEDS if (out / f"{prefix}-seed{s}" / "wall.json").exists()]
            if not runs:
                continue
            ev = [evals(run) for run in runs]
            reach = [next((str(e * 32) for e, _, acc in rows if acc >= threshold), "no") for rows in ev]
            lines.append(f"| {algo} | {label} | {mean_std([rows[-1][1] for rows in ev])} | "
                         f"{mean_std([rows[-1][2] for rows in ev])} | {', '.join(reach)} | {len(runs)} |")
            curves[f"{algo}, {label}"] = [(rows[0][0] * 32, sum(r[j][2] for r in ev) / len(ev))
                                          for j, rows in enumerate(zip(*ev))]
    if (out / "speed.md").exists():
        lines += ["", "Seconds per trajectory, one thread, side by side (`speed`; medians of every epoch):", "",
                  *(out / "speed.md").read_text().splitlines()]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    W, H, colours = 760, 340, {"DAG-DB": "steelblue", "DAG-KL": "darkorange", "DAG-DB at beta 1000": "purple",
                                  "DDPO": "seagreen"}
    image = Image.new("RGB", (W + 220, H), "white")
    draw = ImageDraw.Draw(image)
    ys = [y for c in curves.values() for _, y in c]
    (y_ticks, decimals), (x_ticks, _) = nice_ticks(min(ys), max(ys)), nice_ticks(0, 640)
    left, right, top, bottom = 50, W - 14, 24, H - 30

    def px(x, y):
        return (left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (right - left),
                bottom - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top))

    draw.text((left, 6), "digit accuracy of the fixed-noise eval samples, mean over seeds: dag.py solid, peer dashed",
              fill="black")
    draw.rectangle((left, top, right, bottom), outline="gray")
    for y in y_ticks:
        draw.line((left, px(0, y)[1], right, px(0, y)[1]), fill=(230, 230, 230))
        draw.text((4, px(0, y)[1] - 6), f"{y:.{decimals}f}", fill="black")
    for x in x_ticks:
        draw.text((px(x, 0)[0] - 8, bottom + 6), f"{x:g}", fill="black")
    draw.text((right - 72, H - 12), "trajectories", fill="gray")
    def polyline(xy, colour, dashed):  # dashes of 7 px every 11 px along the line
        for a, b in zip(xy, xy[1:]):
            n = max(1, int(math.dist(a, b) / 11)) if dashed else 1
            for k in range(n):
                s, e = k / n, (k + 7 / 11) / n if dashed else 1
                draw.line((a[0] + s * (b[0] - a[0]), a[1] + s * (b[1] - a[1]), a[0] + e * (b[0] - a[0]),
                           a[1] + e * (b[1] - a[1])), fill=colour, width=2)

    for i, (name, points) in enumerate(curves.items()):
        colour, dashed = colours[name.split(",")[0]], "dag.py" not in name
        polyline([px(x, y) for x, y in points], colour, dashed)
        polyline([(W, top + 16 * i + 6), (W + 33, top + 16 * i + 6)], colour, dashed)
        draw.text((W + 40, top + 16 * i), name, fill=colour)
    image.save(out / "curves.png")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmark.peers", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup-release", help="apply the changes to a checkout of the release")
    s.add_argument("--release", type=Path, required=True)
    add_settings(sub.add_parser("release", help="train_gfn.py under torchrun, on the CPU"), "release")
    add_settings(sub.add_parser("ddpo", help="TRL's DDPOTrainer"), "ddpo")
    s = sub.add_parser("score", help="dag.evaluate of a run's checkpoints -> eval.jsonl")
    s.add_argument("--run", type=Path, nargs="+", required=True)
    s.add_argument("--every", type=int, default=None, help="only epochs divisible by this (and the last)")
    s.add_argument("--name", default=None, help="output file name in the run folder")
    s.add_argument("--no-check", action="store_true", help="skip the check against pipe.load_lora_weights")
    for name in ("all", "parity", "speed", "report"):
        s = sub.add_parser(name, help={"all": "dag.py's matched runs and RUNS, then scores", "parity": "rollout reward "
                                       "at theta_0, all three", "speed": "seconds per trajectory side by side",
                                       "report": "table.md and curves.png of the runs"}[name])
        s.add_argument("--release", type=Path, required=True)
        s.add_argument("--out", type=Path, required=True)
    w = sub.add_parser("_release-worker")
    w.add_argument("--release", type=Path, required=True)
    w.add_argument("--out", type=Path, required=True)
    w = sub.add_parser("_ddpo-worker")
    w.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if a.command == "setup-release":
        setup_release(a.release)
    elif a.command in ("release", "ddpo"):
        launch(a, a.command)
    elif a.command == "score":
        for run in a.run:
            score(run.resolve(), a.every, a.name, not a.no_check)
    elif a.command == "all":
        run_all(a.release.resolve(), a.out.resolve())
    elif a.command == "parity":
        parity(a.release.resolve(), a.out.resolve())
    elif a.command == "speed":
        speed(a.release.resolve(), a.out.resolve())
    elif a.command == "report":
        report(a.out.resolve())
    elif a.command == "_release-worker":
        release_worker(a.release, a.out)
    else:
        ddpo_worker(a.out)


if __name__ == "__main__":
    main()
