"""The digits benchmark: a DDPM pretrained on scikit-learn's bundled digits, a digit-classifier reward, and the four
algorithms of dag.py on it with one budget (benchmark/README.md).

    python -m benchmark.digits pretrain                 # remake the shipped models (benchmark/models/)
    python -m benchmark.digits run --out runs/bench     # the benchmark's runs and its report (--stage, --parallel)
    --reward benchmark.digits:digit3                    # the reward, as dag.py takes it (run from the repository root)

Shipped: benchmark/models/digits-ddpm (a DDPMPipeline, `dag.py --model benchmark/models/digits-ddpm`) and
benchmark/models/digits-classifier.safetensors, both made by `pretrain` (seeded, one thread).
"""

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
import dag  # noqa: E402

MODELS = HERE / "models"
DDPM = MODELS / "digits-ddpm"
CLASSIFIER = MODELS / "digits-classifier.safetensors"
COLOURS = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1]], dtype=np.float32)
COLOUR_NAMES = ("red", "yellow", "green", "cyan", "blue", "magenta")  # hue bin k is centred on 60 k degrees
CIFAR_SCHEDULER = dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=True,
                       num_train_timesteps=1000, variance_type="fixed_large")  # the CIFAR-10 DDPM's


# --------------------------------------------------------------------------------------------------------------------
# Data, models, pretraining
# --------------------------------------------------------------------------------------------------------------------


def digits_unet(channels=(32, 64)):
    """UNet2DModel config for 3x8x8 digits: 2 levels (8x8 -> 4x4), 1 ResNet per block, attention at 4x4."""
    return dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=tuple(channels),
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=min(32, channels[0]), freq_shift=1, flip_sin_to_cos=False, downsample_padding=0,
                norm_eps=1e-6)


def digit_intensities():
    """scikit-learn's 1797 hand-written 8x8 digits -> (intensity (1797, 8, 8) float32 in [0, 1], labels (1797,))."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def colourise(intensity, colour):
    """(B, 8, 8) in [0, 1] and (B,) indices into COLOURS -> (B, 3, 8, 8) RGB in [0, 1]: each digit in its colour."""
    return COLOURS[colour][:, :, None, None] * intensity[:, None]


def pretrain_ddpm(path, steps=2500, batch=64, lr=2e-3, seed=0):
    """Pretrain an unconditional eps-prediction DDPM (the CIFAR-10 DDPM's betas) on the digits, each drawn in a random
    one of COLOURS on black, re-drawn every pass, and save it as a DDPMPipeline. AdamW, a 100-step warm-up, then a
    cosine decay to 0, gradient clip 1. Seeded; on one thread the weights do not depend on the core count."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet, scheduler = UNet2DModel(**digits_unet()), DDPMScheduler(**CIFAR_SCHEDULER)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(100, steps // 10)
    decay = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    intensity, _ = digit_intensities()
    g, t0, step, epoch, losses = torch.Generator().manual_seed(seed), time.time(), 0, 0, []
    unet.train()
    while step < steps:
        rng = np.random.default_rng((seed, epoch))  # a pass: new colours, new order
        data = torch.from_numpy(colourise(intensity, rng.integers(len(COLOURS), size=len(intensity))) * 2 - 1)
        order = torch.from_numpy(rng.permutation(len(data)))
        for i in range(0, len(data) - batch + 1, batch):
            x0 = data[order[i : i + batch]]
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
            loss = torch.nn.functional.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            decay.step()
            step += 1
            losses.append(loss.item())
            if step % 250 == 0 or step == steps:
                print(f"digits DDPM: step {step}/{steps} | loss {loss.item():.4f} | {time.time() - t0:.0f} s")
            if step == steps:
                break
        epoch += 1
    if path is not None:
        DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(path)
    return losses


def train_classifier(seed=0):
    """A colour-invariant digit classifier: a 64-128-10 ReLU MLP on the per-pixel max over the RGB channels (which
    maps every colour of COLOURS back to the digit's intensity), trained on all 1797 digits with 300 full-batch AdamW
    steps."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    intensity, labels = digit_intensities()
    x, y = torch.from_numpy(intensity).flatten(1), torch.from_numpy(labels)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(300):
            loss = torch.nn.functional.cross_entropy(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return net.eval().requires_grad_(False)


def digit_classifier():
    """The shipped classifier (benchmark/models/digits-classifier.safetensors)."""
    from safetensors.torch import load_file

    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    net.load_state_dict(load_file(CLASSIFIER))
    return net.eval().requires_grad_(False)


def digit_logits(net, images):
    """(B, 3, 8, 8) RGB in [0, 1] -> (B, 10) logits, on the images' device; differentiable in the images."""
    return net.to(images.device)(images.float().amax(dim=1).flatten(1))


def digit_reward(target, temperature=4.0):
    """r(x) = p_T(target | x): the classifier's softmax at temperature T (logits / T). T = 4 keeps the score graded
    on the blurry x0 predictions of noisy states, which the forward-looking flow scores (README: the reward)."""
    net = digit_classifier()
    return lambda images, prompts: (digit_logits(net, images) / temperature).softmax(dim=1)[:, target]


def digit3(device=None):
    """`--reward benchmark.digits:digit3`: r = p_4(3 | x), a black-box, colour-invariant, differentiable reward."""
    return digit_reward(3)


# --------------------------------------------------------------------------------------------------------------------
# What the samples are: classes, colours, shapes
# --------------------------------------------------------------------------------------------------------------------


def colour_of(images, lit=0.25):
    """(B, 3, H, W) RGB in [0, 1] -> (B,) index into COLOURS: the hue of the intensity-weighted mean colour of the lit
    pixels (max channel > `lit`), to the nearest of the 6 hues; -1 where no pixel is lit."""
    x = images.detach().float().cpu()
    v = x.amax(dim=1, keepdim=True)
    w = (v > lit).float() * v
    r, g, b = ((x * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3)).clamp(min=1e-8)).unbind(1)
    hue = torch.rad2deg(torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b)) % 360
    return torch.where(w.flatten(1).sum(1) > 0, torch.round(hue / 60).long() % 6, -1)


def digit_samples(model, n=64, steps=20, checkpoint=None):
    """The images of eval seeds 0..n-1 (dag.py's fixed evaluation noise) from the base model, or with a run's
    checkpoint LoRA loaded: (n, 3, 8, 8) in [0, 1]."""
    args = dag.parse_args(["--model", str(model), "--algo", "ddpo", "--steps", str(steps), "--train-batch", "32",
                           "--grad-accum", "1", "--trajectories", "32", "--eval-samples", str(n)])
    dag.check_args(args)
    m = dag.load_models(args, torch.device("cpu"), dag.pipeline_index(str(model), steps))
    if checkpoint is not None:
        state = torch.load(Path(checkpoint) / "training_state.pt", map_location="cpu", weights_only=True)
        dag.set_peft_model_state_dict(m.unet, state["lora"])
    no_reward = dag.rewards.checked(lambda images, prompts: images.new_zeros(len(images)), "none")
    _, (images, _, _) = dag.evaluate(m, no_reward, [""], args, 0, 1)
    return images


def digit_summary(images, target=3):
    """What a person reads off a batch: how many are the target digit, which digits the others are, and how colours
    and shapes spread among the target samples."""
    labels, colours = digit_logits(digit_classifier(), images).argmax(dim=1).cpu(), colour_of(images)
    hit = labels == target

    def entropy(values):  # bits; log2(6) = 2.58 when the 6 colours are equally common
        p = torch.bincount(values[values >= 0], minlength=6).float()
        p = p[p > 0] / p.sum()
        return float(-(p * p.log2()).sum()) if len(p) else 0.0

    shapes = images.detach().cpu().amax(dim=1).flatten(1)[hit]  # the target samples' intensity maps, colour removed
    return {"n": len(images), "target_fraction": float(hit.float().mean()),
            "p_target": float(digit_reward(target)(images, None).mean()),
            "classes": torch.bincount(labels, minlength=10).tolist(),
            "non_target_classes": torch.bincount(labels[~hit], minlength=10).tolist(),
            "colours": [int((colours == k).sum()) for k in range(6)] + [int((colours < 0).sum())],
            "colour_entropy": entropy(colours), "target_colour_entropy": entropy(colours[hit]),
            "target_shape_spread": float(torch.pdist(shapes).mean() / 8) if len(shapes) > 1 else float("nan")}


def save_digit_grid(path, images, cols=8, scale=5):
    """(B, 3, H, W) in [0, 1] -> a PNG grid, each image `scale` x (nearest), 1-pixel grey gaps."""
    B, _, H, W = images.shape
    rows = math.ceil(B / cols)
    grid = torch.full((3, rows * (H + 1) + 1, cols * (W + 1) + 1), 0.3)
    for i, image in enumerate(images.detach().cpu()):
        y, x = (i // cols) * (H + 1) + 1, (i % cols) * (W + 1) + 1
        grid[:, y : y + H, x : x + W] = image
    array = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST).save(path)
    return path


def pretrain(out=MODELS):
    """Remake the shipped models: the DDPM (2500 steps) and the classifier, on one thread."""
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    net = train_classifier()
    intensity, labels = digit_intensities()
    accuracy = (net(torch.from_numpy(intensity).flatten(1)).argmax(1) == torch.from_numpy(labels)).float().mean()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, out / CLASSIFIER.name)
    print(f"classifier: training accuracy {accuracy:.4f} -> {out / CLASSIFIER.name}")
    t0 = time.time()
    pretrain_ddpm(out / DDPM.name)
    print(f"digits DDPM: {time.time() - t0:.0f} s -> {out / DDPM.name}")


# --------------------------------------------------------------------------------------------------------------------
# The benchmark: the same budget for every algorithm, a tuning stage, seeds, the timestep fraction, a beta sweep, two
# mutants of dag.py; runs are `python dag.py` processes on one thread each
# --------------------------------------------------------------------------------------------------------------------

BUDGET = ("--steps 20 --eta 1 --trajectories 32 --train-batch 8 --grad-accum 1 --epochs 30 --eval-every 5 "
          "--eval-samples 16 --save-every 30 --flow-channels 32 64").split()
# The tuning tries, 5 per algorithm, seed 0 (`--stage tune` runs them; the argmax of the final eval reward is kept)
TRIES = {
    "db": ["--lr 3e-3 --reward-exp 100", "--lr 3e-3 --reward-exp 100 --unetreg 100",
           "--lr 3e-3 --reward-exp 300 --unetreg 100", "--lr 1e-2 --flow-lr 1e-3 --reward-exp 300 --unetreg 100",
           "--lr 3e-3 --flow-lr 3e-4 --reward-exp 300 --unetreg 100"],
    "kl": ["--lr 3e-3 --reward-exp 100 --clip-range 1e-2", "--lr 1e-2 --reward-exp 100 --clip-range 1e-2",
           "--lr 1e-2 --flow-lr 1e-3 --reward-exp 100 --clip-range 1e-2",
           "--lr 1e-2 --flow-lr 1e-3 --reward-exp 100 --clip-range 1e-2 --unetreg 100",
           "--lr 3e-3 --flow-lr 3e-4 --reward-exp 100 --clip-range 1e-2"],
    "ddpo": ["--lr 3e-3 --clip-range 1e-2", "--lr 1e-2 --clip-range 1e-2", "--lr 1e-2 --clip-range 0.2",
             "--lr 3e-2 --clip-range 1e-2", "--lr 1e-2 --clip-range 1e-2 --timestep-fraction 0.25"],
    "alignprop": ["--lr 1e-3 --truncation 1", "--lr 3e-3 --truncation 1", "--lr 1e-2 --truncation 1",
                  "--lr 3e-3 --truncation 5", "--lr 1e-2 --truncation 5"],
}
CHOSEN = {}  # filled by the tuning stage (or read back from a finished one): {algo: flags}
SEEDS = (1, 2, 3)  # not seed 0, the tuning's, so that the table is not biased by the choice
EVAL = ("--eval-samples", "64")  # the main runs: 64 fixed eval seeds (the tuning tries: 16)
FRACTIONS = (0.25, 0.1)  # issue 19: DAG-DB and DAG-KL at these timestep fractions too (f = 1 is the main run)
BETAS = (0, 1000)  # the chosen DAG-DB setting at these reward_exp too; beta = 0 is the learning test's drift control
MUTANTS = {  # one-line edits of dag.py that the learning test must (sign) or may not (boundary) catch
    "sign": ("log_flow = flow(batch.x_t, batch.t, text) + reward_exp * batch.r_t",
             "log_flow = flow(batch.x_t, batch.t, text) - reward_exp * batch.r_t"),
    "boundary": ("flow_child = torch.where(batch.child_is_x0, 0.0, flow(batch.x_child, batch.t_child, text))",
                 "flow_child = flow(batch.x_child, batch.t_child, text)"),
}
THRESHOLD = 0.5  # "trajectories to reach": the first evaluation whose mean p(3) is at least this
# The learning test (test_dag.py): the chosen DAG-DB setting at seed SEEDS[0] must raise the eval p(3) of the 64 seeds
# by more than `margin` in 30 epochs. The margin comes from the measured gains of the seeds, the beta = 0 drift and the
# sign mutant (benchmark/README.md, "The learning test").
LEARNING_TEST = {"flags": "--lr 1e-2 --flow-lr 1e-3 --reward-exp 300 --unetreg 100", "margin": 0.3}  # = CHOSEN["db"]


def argv(algo, flags, seed, *extra):
    return ["--model", str(DDPM), "--reward", "benchmark.digits:digit3", *BUDGET, "--algo", algo, *flags.split(),
            "--seed", str(seed), *extra]


def with_flag(flags, name, value):
    """`flags` with --name set to value (replaced, or appended)."""
    words = flags.split()
    if name in words:
        words[words.index(name) + 1] = str(value)
    else:
        words += [name, str(value)]
    return " ".join(words)


def run_jobs(jobs, parallel):
    """Run (out, argv, dag_py) jobs, `parallel` at a time, each `python dag.py` on one thread from the repository root;
    a job whose out holds wall.json is done and skipped, so an interrupted benchmark continues where it stopped."""
    import shutil

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    todo = [job for job in jobs if not (job[0] / "wall.json").is_file()]
    running, t0 = [], time.time()
    while todo or running:
        while todo and len(running) < parallel:
            out, args, script = todo.pop(0)
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            log = open(out.parent / f"{out.name}.log", "w")
            proc = subprocess.Popen([sys.executable, str(script), *args, "--out", str(out)], env=env, cwd=ROOT,
                                    stdout=log, stderr=subprocess.STDOUT)
            running.append((out, proc, log, time.time()))
            print(f"[{time.time() - t0:5.0f} s] start {out.name}", flush=True)
        time.sleep(1)
        for job in [j for j in running if j[1].poll() is not None]:
            out, proc, log, started = job
            log.close()
            running.remove(job)
            if proc.returncode:
                raise RuntimeError(f"{out.name} failed (exit {proc.returncode}); see {out.parent / out.name}.log")
            code = hashlib.sha1(Path(proc.args[1]).read_bytes()).hexdigest()[:12]  # which dag.py ran
            (out / "wall.json").write_text(json.dumps({"wall_s": time.time() - started, "dag_py_sha1": code}))
            evals = curve(dag.read_jsonl(out / "eval.jsonl"))
            print(f"[{time.time() - t0:5.0f} s] done  {out.name}: {time.time() - started:.0f} s, eval {evals}")


def final(run):
    return dag.read_jsonl(run / "eval.jsonl")[-1]["eval_reward_mean"]


def snapshot(folder, edit=None):
    """A copy of dag.py (with one line edited: MUTANTS[edit]) and rewards.py in FOLDER, to run from: editing the
    working tree then does not change the runs in flight. -> the copy of dag.py."""
    source = (ROOT / "dag.py").read_text()
    if edit is not None:
        old, new = MUTANTS[edit]
        assert source.count(old) == 1, f"the {edit} mutant's line is not in dag.py"
        source = source.replace(old, new)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dag.py").write_text(source)
    (folder / "rewards.py").write_text((ROOT / "rewards.py").read_text())
    return folder / "dag.py"


def benchmark(out, stages, parallel=2):
    """The stages in order: tune (fills CHOSEN), main, fraction, beta, mutants; then the report. Every run of this call
    runs dag.py as it was when the call started (a snapshot in OUT/code)."""
    script = snapshot(out / "code")
    if "tune" in stages:
        run_jobs([(out / "tune" / f"{a}-{k}", argv(a, f, 0), script) for k in range(5)
                  for a, tries in TRIES.items() for f in tries[k : k + 1]], parallel)
    for algo, tries in TRIES.items():
        done = [k for k in range(5) if (out / "tune" / f"{algo}-{k}" / "wall.json").is_file()]
        if len(done) == 5:
            CHOSEN[algo] = tries[max(done, key=lambda k: final(out / "tune" / f"{algo}-{k}"))]
    jobs = []
    if "main" in stages:
        jobs += [(out / f"{a}-seed{s}", argv(a, CHOSEN[a], s, *EVAL), script) for a in CHOSEN for s in SEEDS]
    if "fraction" in stages:
        jobs += [(out / f"{a}-f{f}-seed{s}", argv(a, with_flag(CHOSEN[a], "--timestep-fraction", f), s, *EVAL),
                  script) for a in ("db", "kl") for f in FRACTIONS for s in SEEDS]
    if "beta" in stages:
        jobs += [(out / f"beta{b}", argv("db", with_flag(CHOSEN["db"], "--reward-exp", b), SEEDS[0], *EVAL),
                  script) for b in BETAS]
    if "mutants" in stages:
        jobs += [(out / f"mutant-{name}", argv("db", CHOSEN["db"], SEEDS[0], *EVAL),
                  snapshot(out / f"code-{name}", name))
                 for name in MUTANTS]
    run_jobs(jobs, parallel)


# --------------------------------------------------------------------------------------------------------------------
# The report: tables, a figure, sample grids
# --------------------------------------------------------------------------------------------------------------------


def mean_std(values, digits=3):
    values = [v for v in values if v == v]
    if not values:
        return "-"
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)):.{digits}f}"


def curve(evals):
    return " ".join(f"{r['eval_reward_mean']:.3f}" for r in evals)


def loop_seconds(run):
    """The run's training-loop seconds: rollout (with the state scoring) and training, evaluations excluded."""
    return sum(r["rollout_s"] + r["train_s"] for r in dag.read_jsonl(run / "log.jsonl"))


def report(out):
    """OUT/table.md, curves.png, samples.png, beta.png and summary.json from the finished runs."""
    runs = sorted(p for p in out.glob("*") if (p / "wall.json").is_file())
    samples = {"base": digit_samples(DDPM)}
    for run in runs:
        samples[run.name] = digit_samples(DDPM, checkpoint=dag.checkpoints(run)[0])  # the newest: the final one
    summary = {name: digit_summary(images) for name, images in samples.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    groups = {a: [out / f"{a}-seed{s}" for s in SEEDS] for a in CHOSEN}
    groups.update({f"{a} f={f}": [out / f"{a}-f{f}-seed{s}" for s in SEEDS] for a in ("db", "kl") for f in FRACTIONS})
    groups = {k: [p for p in v if p in runs] for k, v in groups.items()}
    lines = ["| algorithm | setting | eval p(3), base → trained | classified 3 (of 64) | diversity (32×32 px) | "
             f"colours among the 3s (bits) | shape spread of the 3s | loop s | trajectories to p(3) ≥ {THRESHOLD} "
             "|",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, paths in groups.items():
        if not paths:
            continue
        evals, s = [dag.read_jsonl(p / "eval.jsonl") for p in paths], [summary[p.name] for p in paths]
        reach = [next((str(r["epoch"] * 32) for r in ev if r["eval_reward_mean"] >= THRESHOLD), "no") for ev in evals]
        setting = json.loads((paths[0] / "args.json").read_text())["argv"]
        flags = " ".join(setting[setting.index("--algo") + 2 : setting.index("--seed")])
        lines.append(f"| {name} | `{flags}` | {evals[0][0]['eval_reward_mean']:.3f} → "
                     f"{mean_std([e[-1]['eval_reward_mean'] for e in evals])} | "
                     f"{mean_std([64 * x['target_fraction'] for x in s], 1)} | {evals[0][0]['diversity']:.3f} → "
                     f"{mean_std([e[-1]['diversity'] for e in evals])} | "
                     f"{mean_std([x['target_colour_entropy'] for x in s])} | "
                     f"{mean_std([x['target_shape_spread'] for x in s])} | "
                     f"{mean_std([loop_seconds(p) for p in paths], 0)} | "
                     f"{', '.join(reach)} |")
    b = summary["base"]
    lines += ["", f"Base model, 64 fixed-noise samples: {64 * b['target_fraction']:.0f} classified 3, classes 0-9 "
              f"{b['classes']}, colours (r, y, g, c, b, m, unlit) {b['colours']}, colours among the 3s "
              f"{b['target_colour_entropy']:.2f} bits, shape spread of the 3s {b['target_shape_spread']:.3f}.", "",
              "| run | eval p(3) at epochs 0, 5, ..., 30 | diversity 0 → 30 | classified 3 (of 64) | classes 0-9 of "
              "the others | colours (r, y, g, c, b, m, unlit) | loop s | wall s |",
              "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        ev, s = dag.read_jsonl(run / "eval.jsonl"), summary[run.name]
        lines.append(f"| {run.name} | {curve(ev)} | {ev[0]['diversity']:.3f} "
                     f"→ {ev[-1]['diversity']:.3f} | {64 * s['target_fraction']:.0f} | {s['non_target_classes']} | "
                     f"{s['colours']} | {loop_seconds(run):.0f} | "
                     f"{json.loads((run / 'wall.json').read_text())['wall_s']:.0f} |")
    if (out / "tune").is_dir():
        lines += ["", "| tuning try (seed 0) | eval p(3) at epochs 0, 5, ..., 30 | diversity 0 → 30 | loop s |",
                  "|---|---|---|---|"]
        for algo, tries in TRIES.items():
            for k, flags in enumerate(tries):
                run = out / "tune" / f"{algo}-{k}"
                if (run / "wall.json").is_file():
                    ev = dag.read_jsonl(run / "eval.jsonl")
                    lines.append(f"| {algo}-{k} `{flags}`{' (chosen)' if CHOSEN.get(algo) == flags else ''} | "
                                 f"{curve(ev)} | {ev[0]['diversity']:.3f} → "
                                 f"{ev[-1]['diversity']:.3f} | {loop_seconds(run):.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    curves = {name: [dag.read_jsonl(p / "eval.jsonl") for p in paths] for name, paths in groups.items() if paths}
    per_epoch = {name: sum(loop_seconds(p) for p in paths) / len(paths) / 30 for name, paths in groups.items() if paths}
    figure(out / "curves.png", curves, per_epoch)
    shown = ["base"] + [f"{a}-seed{SEEDS[0]}" for a in CHOSEN if f"{a}-seed{SEEDS[0]}" in samples]
    grids(out / "samples.png", {name: samples[name] for name in shown})
    betas = {"base": samples["base"], **{f"beta {b}": samples[f"beta{b}"] for b in BETAS if f"beta{b}" in samples}}
    grids(out / "beta.png", {**betas, "db (chosen)": samples.get(f"db-seed{SEEDS[0]}", samples["base"])})
    print("\n".join(lines))


def nice_ticks(lo, hi, n=5):
    """About n round tick values (steps of 1, 2 or 5 x 10^k) spanning [lo, hi], and the decimals to print them with."""
    if not hi > lo:
        lo, hi = lo - max(abs(lo), 1.0) * 0.05, hi + max(abs(hi), 1.0) * 0.05
    raw = (hi - lo) / max(n - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(k * power for k in (1, 2, 5, 10) if k * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks = [first + i * step for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]
    return ticks, max(0, -math.floor(math.log10(step)))


COLOUR_OF = {"db": "steelblue", "kl": "darkorange", "ddpo": "seagreen", "alignprop": "crimson"}


def figure(path, curves, seconds_per_epoch):
    """Three panels: eval p(3) against trajectories, against training-loop seconds (mean per epoch x epoch), and
    diversity against trajectories; the mean over seeds, one line per algorithm and fraction (dashes: f < 1)."""
    panels = [("eval p(3), mean over seeds", "eval_reward_mean", "trajectories"),
              ("eval p(3), mean over seeds", "eval_reward_mean", "loop seconds (1 thread, 2 runs at a time)"),
              ("diversity (32x32 pixels)", "diversity", "trajectories")]
    W, H = 420, 300
    image = Image.new("RGB", (W * len(panels), H + 24), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, key, axis) in enumerate(panels):
        lines = {}
        for name, evals in curves.items():
            scale = seconds_per_epoch[name] if axis.startswith("loop") else 32
            lines[name] = [(r["epoch"] * scale, sum(e[k][key] for e in evals) / len(evals))
                           for k, r in enumerate(evals[0])]
        xs, ys = [x for c in lines.values() for x, _ in c], [y for c in lines.values() for _, y in c]
        (y_ticks, decimals), (x_ticks, _) = nice_ticks(min(ys), max(ys)), nice_ticks(min(xs), max(xs))
        left, right, top, bottom = i * W + 56, (i + 1) * W - 14, 24, H - 30

        def px(x, y):
            return (left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (right - left),
                    bottom - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top))

        draw.text((left, 6), title, fill="black")
        draw.rectangle((left, top, right, bottom), outline="gray")
        for y in y_ticks:
            draw.line((left, px(0, y)[1], right, px(0, y)[1]), fill=(230, 230, 230))
            draw.text((i * W + 4, px(0, y)[1] - 6), f"{y:.{decimals}f}", fill="black")
        for x in x_ticks:
            draw.text((px(x, 0)[0] - 8, bottom + 6), f"{x:g}", fill="black")
        draw.text((right - 6 * len(axis), H - 12), axis, fill="gray")
        for name, points in lines.items():
            colour, dashed = COLOUR_OF[name.split()[0]], " f=" in name
            xy = [px(x, y) for x, y in points]
            for a, b in zip(xy, xy[1:]):
                if dashed:  # a dash from a to the middle of the segment
                    b = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
                draw.line((a, b), fill=colour, width=1 if "0.1" in name else 2)
    for k, name in enumerate(curves):
        x = 8 + 150 * k
        draw.line((x, H + 12, x + 20, H + 12), fill=COLOUR_OF[name.split()[0]], width=2)
        draw.text((x + 24, H + 6), name + (" (dashed)" if " f=" in name else ""), fill=COLOUR_OF[name.split()[0]])
    image.save(path)


def grids(path, samples):
    """Side by side, one labelled 8x8 grid of the 64 fixed-noise samples per run (the same noise in each)."""
    import tempfile

    tiles = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, images in samples.items():
            tiles.append((name, Image.open(save_digit_grid(Path(tmp) / "grid.png", images)).copy()))
    w, h = tiles[0][1].size
    sheet = Image.new("RGB", (len(tiles) * (w + 10), h + 20), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (name, tile) in enumerate(tiles):
        sheet.paste(tile, (k * (w + 10), 20))
        draw.text((k * (w + 10) + 2, 4), name, fill="black")
    sheet.save(path)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["pretrain", "run", "report"])
    p.add_argument("--out", default="runs/bench", type=Path)
    p.add_argument("--stage", nargs="+", choices=["tune", "main", "fraction", "beta", "mutants"],
                   default=["tune", "main", "fraction", "beta", "mutants"])
    p.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    a = p.parse_args()
    torch.set_num_threads(1)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a redirected log as they happen
    if a.command == "pretrain":
        pretrain()
    else:
        if a.command == "run":
            benchmark(a.out, a.stage, a.parallel)
        else:
            benchmark(a.out, [], a.parallel)  # reads the tuning's choice back
        report(a.out)
