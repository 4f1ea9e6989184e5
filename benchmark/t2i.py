"""The text-to-image digits benchmark: a tiny Stable Diffusion pipeline pretrained on captioned digits, a named-digit
reward, prompts with held-out (colour, digit) pairs, and the four algorithms of dag.py on it with one budget.

    python -m benchmark.t2i pretrain --out DIR          # remake benchmark/models/digits-t2i in DIR (~16 min)
    python -m benchmark.t2i run --out runs/t2i          # the stages tune, main, test (--stage, --parallel), the report
    python -m benchmark.t2i report --out runs/t2i       # table.md, curves.png, grids.png of the finished runs
    python -m benchmark.t2i base --out DIR              # how often a pretrained model draws the named digit
    --reward benchmark.t2i:named_digit                  # the reward, as dag.py takes it (run from the repository root)

Shipped: benchmark/models/digits-t2i (a StableDiffusionPipeline, `dag.py --model benchmark/models/digits-t2i`, made by
`pretrain`: seed 0, 1850 UNet steps, one thread, 16 min; its pretrain-record.json) and digits-t2i-prompts: train.txt,
48 of the 60 captions; eval.txt, 12 of those (rows 0-11) and the 12 held out of train.txt (rows 12-23).

The model: the real diffusers / transformers classes of SD 1.5 at toy size, trained from scratch on scikit-learn's 1797
8x8 digits, each drawn in one of digits.COLOURS on black, nearest-upsampled to 16x16 RGB, captioned "a red three":

    AutoencoderKL           16x16x3 <-> 8x8x4 latents (block_out (32, 64)); scaling_factor = 1 / std of the latents
    CLIPTokenizer           whole-word BPE over the 17 caption words, model_max_length 8
    CLIPTextModel           2 layers, 32 wide, 4 heads (trained jointly with the UNet, from scratch)
    UNet2DConditionModel    block_out (32, 64), cross-attention (dim 32) in both levels and the mid block, eps-pred
    DDIMScheduler           SD-1.5's schedule (scaled_linear 0.00085 .. 0.012, 1000 steps, steps_offset 1)

Caption dropout (10 % empty prompts) makes classifier-free guidance work. Pretrained for 1850 UNet steps (of the 4000
that drew the named digit in 98 % of samples), the base draws it in 65 % at guidance 1, where the benchmark samples,
trains and evaluates: room to align.
"""

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark.digits import COLOUR_NAMES, COLOUR_OF, COLOURS, MODELS, colour_of, colourise, loop_seconds  # noqa: E402
from benchmark.digits import curve, digit_classifier, digit_intensities, digit_logits, nice_ticks  # noqa: E402
from benchmark.digits import mean_std, run_jobs, snapshot, with_flag  # noqa: E402
import dag  # noqa: E402

MODEL = MODELS / "digits-t2i"
PROMPTS = MODELS / "digits-t2i-prompts"
TRAINED_ON = 12  # eval.txt's first 12 rows are in train.txt; the other 12 are held out of it
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000, prediction_type="epsilon")
MAX_LENGTH = 8  # <|startoftext|> a red three <|endoftext|> + padding


def parse(prompt):
    """'a red three' -> (colour index, digit index); -1 for a part the prompt does not name."""
    words = prompt.lower().split()
    colour = next((COLOUR_NAMES.index(w) for w in words if w in COLOUR_NAMES), -1)
    digit = next((DIGIT_NAMES.index(w) for w in words if w in DIGIT_NAMES), -1)
    return colour, digit


# --------------------------------------------------------------------------------------------------------------------
# The model: tokenizer, configs, data, pretraining
# --------------------------------------------------------------------------------------------------------------------


def clip_bpe(word, ranks):
    """CLIP's BPE of one word (openai/CLIP simple_tokenizer.bpe): characters, the last with '</w>', then repeatedly
    merge the lowest-ranked adjacent pair (all its occurrences, left to right)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        best = min(set(zip(parts, parts[1:])), key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def word_merges(words):
    """BPE merges (in rank order) under which every word is one token: add a merge of the first two parts of a word
    that is still split, until none is. A new merge ranks last, so it never changes how an earlier word splits before
    its own end state; the loop reaches a fixed point."""
    merges = []
    while True:
        ranks = {m: i for i, m in enumerate(merges)}
        todo = [p for p in (clip_bpe(w, ranks) for w in words) if len(p) > 1]
        if not todo:
            return merges
        merges.append((todo[0][0], todo[0][1]))


def build_tokenizer(path):
    """CLIPTokenizer (vocab.json + merges.txt in `path`) over single letters and the caption words; <|endoftext|> is
    the last id (as in CLIP) and the padding; model_max_length MAX_LENGTH."""
    from transformers import CLIPTokenizer

    words = ["a", *COLOUR_NAMES, *DIGIT_NAMES]
    merges = word_merges(words)
    vocab = {"<|startoftext|>": 0}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=MAX_LENGTH,
                        pad_token="<|endoftext|>")
    for w in words:  # the real tokenizer must agree: one token per caption word
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids)[0] == w + "</w>", (w, ids)
    return tok


def render(intensity, colour):
    """(B, 8, 8) in [0, 1], (B,) colour ids -> (B, 3, 16, 16) RGB in [-1, 1]: the digit in its colour on black,
    nearest-upsampled 2x (so a 2x2 average pool gives the 8x8 digit back exactly)."""
    rgb = torch.from_numpy(colourise(intensity.numpy(), colour.numpy()))
    return F.interpolate(rgb, scale_factor=2, mode="nearest") * 2 - 1


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=32, sample_size=16)


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH,
                                        bos_token_id=0, eos_token_id=eos, pad_token_id=eos, projection_dim=32))


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
                                norm_num_groups=32, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def cosine_warmup(optimizer, steps, warmup):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def train_vae(intensity, steps, batch, lr, kl_weight, g):
    """AutoencoderKL on random (digit, colour) draws: MSE(recon of a posterior sample) + kl_weight * KL."""
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = cosine_warmup(opt, steps, min(50, steps // 10))
    vae.train()
    t0, recent = time.time(), []
    for step in range(1, steps + 1):
        idx = torch.randint(len(intensity), (batch,), generator=g)
        x = render(intensity[idx], torch.randint(len(COLOURS), (batch,), generator=g))
        post = vae.encode(x).latent_dist
        rec = F.mse_loss(vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=g)).sample, x)
        loss = rec + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [rec.item()])[-50:]
        if step % 100 == 0 or step == steps:
            print(f"vae step {step}/{steps} | recon mse {sum(recent) / len(recent):.5f} | {time.time() - t0:.0f} s")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_all(vae, intensity):
    """Posterior mean and std of every (digit, colour), and the reconstruction MSE of the means over them all (images
    in [-1, 1]): (6 * 1797, 4, 8, 8) twice, row c * 1797 + i, and a float."""
    means, stds, err = [], [], 0.0
    for c in range(len(COLOURS)):
        for chunk in intensity.split(256):
            x = render(chunk, torch.full((len(chunk),), c))
            post = vae.encode(x).latent_dist
            means.append(post.mean)
            stds.append(post.std)
            err += F.mse_loss(vae.decode(post.mean).sample, x, reduction="sum").item()
    return torch.cat(means), torch.cat(stds), err / (len(COLOURS) * len(intensity) * 3 * 16 * 16)


def train_unet(intensity, labels, means, stds, scaling, tokenizer, steps, batch, lr, dropout, g):
    """UNet2DConditionModel + CLIPTextModel, jointly from scratch: eps-prediction MSE on scaled latents of random
    (digit, colour) draws, uniform t in [0, 1000), captions 'a {colour} {digit}', replaced by '' with prob `dropout`."""
    from diffusers import DDIMScheduler

    unet, text_encoder = make_unet(), make_text_encoder(tokenizer)
    alphas = DDIMScheduler(**SD_SCHEDULER).alphas_cumprod
    captions = [f"a {colour} {digit}" for colour in COLOUR_NAMES for digit in DIGIT_NAMES]
    ids_table = tokenizer(captions + [""], padding="max_length", max_length=MAX_LENGTH, truncation=True,
                          return_tensors="pt").input_ids  # (61, L): row c * 10 + d, last row the empty prompt
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = cosine_warmup(opt, steps, min(200, steps // 10))
    unet.train()
    text_encoder.train()
    t0, recent, N = time.time(), [], len(intensity)
    for step in range(1, steps + 1):
        i = torch.randint(N, (batch,), generator=g)
        c = torch.randint(len(COLOURS), (batch,), generator=g)
        rows = c * N + i
        z0 = (means[rows] + stds[rows] * torch.randn(means[rows].shape, generator=g)) * scaling
        cap = torch.where(torch.rand(batch, generator=g) < dropout, len(captions), c * 10 + labels[i])
        t = torch.randint(0, 1000, (batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        text = text_encoder(ids_table[cap])[0]
        loss = F.mse_loss(unet(a.sqrt() * z0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=text).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-200:]
        if step % 250 == 0 or step == steps:
            print(f"unet step {step}/{steps} | eps mse (last 200) {sum(recent) / len(recent):.4f} | "
                  f"{time.time() - t0:.0f} s")
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False), sum(recent) / len(recent)


def pretrain(out, vae_steps=800, unet_steps=1850, batch=64, vae_lr=1e-3, unet_lr=1e-3, kl_weight=1e-6, dropout=0.1,
             seed=0):
    """Train the VAE (AdamW, cosine, 800 steps), then the UNet and text encoder (unet_steps), on one thread, and save
    the StableDiffusionPipeline (safetensors) and OUT/pretrain-record.json. Seeded: a rerun gives the same weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    g, t_all, out = torch.Generator().manual_seed(seed), time.time(), Path(out)
    intensity, labels = (torch.from_numpy(a) for a in digit_intensities())
    tok_dir = Path(tempfile.mkdtemp(prefix="t2i-tokenizer-"))
    tokenizer = build_tokenizer(tok_dir)
    vae = train_vae(intensity, vae_steps, batch, vae_lr, kl_weight, g)
    means, stds, vae_mse = encode_all(vae, intensity)
    latents = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(seed + 1))
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    print(f"vae: recon mse {vae_mse:.5f} (posterior mean, all 10782 images) | scaling_factor {scaling:.4f}")
    torch.manual_seed(seed + 2)  # the UNet / text encoder init does not depend on the VAE phase's draws
    unet, text_encoder, unet_loss = train_unet(intensity, labels, means, stds, scaling, tokenizer, unet_steps, batch,
                                               unet_lr, dropout, g)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                            scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(out, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # the BPE files too (transformers 5 saves only tokenizer.json)
        shutil.copy(tok_dir / name, out / "tokenizer" / name)
    shutil.rmtree(tok_dir, ignore_errors=True)
    record = {"seed": seed, "vae_steps": vae_steps, "unet_steps": unet_steps, "batch": batch, "vae_lr": vae_lr,
              "unet_lr": unet_lr, "kl_weight": kl_weight, "caption_dropout": dropout, "vae_recon_mse": vae_mse,
              "scaling_factor": scaling, "unet_train_loss_last200": unet_loss,
              "total_seconds": round(time.time() - t_all, 1)}
    (out / "pretrain-record.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


# --------------------------------------------------------------------------------------------------------------------
# The reward, and what the samples are
# --------------------------------------------------------------------------------------------------------------------


def named_digit(device=None, temperature=4.0):
    """`--reward benchmark.t2i:named_digit`: r(image, prompt) = p_T(the digit the prompt names | image), T = 4: the
    shipped colour-invariant digits classifier (digits.digit_classifier) on the image average-pooled to 8x8.
    Differentiable in the images; a prompt that names no digit raises ValueError."""
    net = digit_classifier()

    def fn(images, prompts):
        digits = [parse(p)[1] for p in prompts]
        if min(digits) < 0:
            raise ValueError(f"named_digit: a prompt names no digit: {prompts[digits.index(-1)]!r}")
        p = (digit_logits(net, F.adaptive_avg_pool2d(images.float(), 8)) / temperature).softmax(dim=1)
        return p.gather(1, torch.tensor(digits, device=images.device)[:, None]).squeeze(1)

    return fn


def samples(run, checkpoint=None):
    """dag.evaluate of the base model, or with a checkpoint's LoRA loaded, as `run` evaluated (its eval prompts, noise,
    steps, eta, guidance, batch): -> (record, images (P k, 3, 16, 16) in [0, 1], their prompts)."""
    args = dag.parse_args(json.loads((run / "args.json").read_text())["argv"][1:])
    args.algo = "ddpo"  # no flow net
    m = dag.load_models(args, torch.device("cpu"), dag.pipeline_index(args.model, args.steps))
    if checkpoint is not None:
        state = torch.load(checkpoint / "training_state.pt", map_location="cpu", weights_only=True)
        dag.set_peft_model_state_dict(m.unet, state["lora"])
    prompts = dag.rewards.task_prompts(args.reward, args.prompts, args.eval_prompts)[1]
    record, (images, _, _) = dag.evaluate(m, dag.rewards.checked(named_digit(), "named_digit"), prompts, args, 0, 1)
    return record, images, [p for p in prompts for _ in range(args.eval_samples)]


def accuracy(images, prompts):
    """(digit accuracy, colour accuracy): the classifier's argmax on the 8x8 average pool and digits.colour_of against
    what each prompt names."""
    named = torch.tensor([parse(p) for p in prompts])
    digits = digit_logits(digit_classifier(), F.adaptive_avg_pool2d(images, 8)).argmax(1)
    return float((digits == named[:, 1]).float().mean()), float((colour_of(images) == named[:, 0]).float().mean())


# --------------------------------------------------------------------------------------------------------------------
# The benchmark: guidance 1, 20 DDIM steps, 20 epochs of 32 trajectories, one thread per run
# --------------------------------------------------------------------------------------------------------------------

BUDGET = ("--steps 20 --eta 1 --trajectories 32 --train-batch 8 --grad-accum 1 --epochs 20 --guidance-scale 1 "
          "--eval-every 5 --eval-samples 4 --save-every 20").split() + [
    "--prompts", str(PROMPTS / "train.txt"), "--eval-prompts", str(PROMPTS / "eval.txt")]
TRIES = {  # the tuning, at seed 0, over each algorithm's key knobs; the try with the best final eval r is kept
    "db": ["--reward-exp 100 --lr 3e-3 --unetreg 100", "--reward-exp 300 --lr 3e-3 --unetreg 100",
           "--reward-exp 1000 --lr 3e-3 --unetreg 100", "--reward-exp 300 --lr 3e-3 --flow-lr 1e-3 --unetreg 100",
           "--reward-exp 300 --lr 1e-2 --flow-lr 1e-3 --unetreg 100",
           "--reward-exp 1000 --lr 1e-2 --flow-lr 1e-3 --unetreg 100"],
    "kl": ["--reward-exp 100 --lr 1e-2 --flow-lr 1e-3 --clip-range 1e-2 --unetreg 100",
           "--reward-exp 300 --lr 1e-2 --flow-lr 1e-3 --clip-range 1e-2 --unetreg 100",
           "--reward-exp 1000 --lr 1e-2 --flow-lr 1e-3 --clip-range 1e-2 --unetreg 100",
           "--reward-exp 300 --lr 1e-2 --flow-lr 3e-3 --clip-range 1e-2 --unetreg 100",
           "--reward-exp 300 --lr 3e-3 --flow-lr 1e-3 --clip-range 1e-2 --unetreg 100",
           "--reward-exp 300 --lr 3e-3 --clip-range 1e-2 --unetreg 100"],
    "ddpo": ["--lr 1e-3 --clip-range 1e-2", "--lr 3e-3 --clip-range 1e-2", "--lr 1e-2 --clip-range 1e-2",
             "--lr 3e-2 --clip-range 1e-2", "--lr 3e-3 --clip-range 0.2", "--lr 1e-2 --clip-range 0.2"],
    "alignprop": ["--lr 1e-3 --truncation 20", "--lr 3e-3 --truncation 20", "--lr 3e-3 --truncation 5",
                  "--lr 1e-2 --truncation 5", "--lr 1e-2 --truncation 1", "--lr 3e-2 --truncation 1"],
}
SEEDS = (1, 2, 3)  # fresh seeds for each chosen setting (the tuning ran at seed 0)
CHOSEN = {}  # {algo: flags}, read back from the finished tuning (choose)
# The learning test (test_dag.py) in CI: the chosen DB setting at half the transitions for 12 epochs, to fit the suite;
# the test stage runs it at two seeds with the beta = 0 control and the reward-sign mutant (digits.MUTANTS) it must
# fail on. The margin lies between them: seeds +0.071 / +0.108, beta 0 -0.009, sign -0.084 (benchmark/README.md); at a
# quarter of the transitions seed 1 did not learn in 12 epochs (runs/t2i/test-f0.25 in the report)
TEST_EPOCHS, TEST_FRACTION = 12, 0.5
LEARNING_TEST = {"flags": "--reward-exp 1000 --lr 3e-3 --unetreg 100", "seed": 1, "margin": 0.03}  # = CHOSEN["db"]
THRESHOLD = 0.8  # "trajectories to": the first evaluation whose digit accuracy is at least this


def argv(algo, flags, seed, *extra):
    return ["--model", str(MODEL), "--reward", "benchmark.t2i:named_digit", *BUDGET, "--algo", algo, *flags.split(),
            "--seed", str(seed), *extra]


def test_argv(flags, seed):
    """The learning test's run: `flags` (the chosen DB setting) at TEST_FRACTION for TEST_EPOCHS epochs."""
    flags = with_flag(with_flag(flags, "--timestep-fraction", TEST_FRACTION), "--epochs", TEST_EPOCHS)
    return argv("db", flags, seed, "--eval-every", str(TEST_EPOCHS), "--save-every", str(TEST_EPOCHS))


def choose(out):
    """CHOSEN from the finished tuning: per algorithm, the try with the best final eval r at seed 0."""
    for algo, tries in TRIES.items():
        done = [k for k in range(len(tries)) if (out / "tune" / f"{algo}-{k}" / "wall.json").is_file()]
        if len(done) == len(tries):
            best = max(done, key=lambda k: dag.read_jsonl(out / "tune" / f"{algo}-{k}" / "eval.jsonl")[-1]
                       ["eval_reward_mean"])
            CHOSEN[algo] = tries[best]


def benchmark(out, stages, parallel=2):
    """The stages in order: tune (every TRIES entry at seed 0), main (each chosen setting at SEEDS, and DB at beta 0),
    test (the learning test's candidates: two seeds, beta 0, the sign mutant). Each run is `python dag.py` on one
    thread from a snapshot of dag.py made when this call started (OUT/code)."""
    script = snapshot(out / "code")
    if "tune" in stages:
        run_jobs([(out / "tune" / f"{a}-{k}", argv(a, tries[k], 0), script) for k in range(6)
                  for a, tries in TRIES.items()], parallel)
    choose(out)
    jobs = []
    if "main" in stages:
        jobs += [(out / f"{a}-seed{s}", argv(a, CHOSEN[a], s), script) for s in SEEDS for a in CHOSEN]
        jobs.append((out / "db-beta0-seed1", argv("db", with_flag(CHOSEN["db"], "--reward-exp", 0), 1), script))
    if "test" in stages:
        db = CHOSEN["db"]
        jobs += [(out / "test" / f"seed{s}", test_argv(db, s), script) for s in (1, 2)]
        jobs.append((out / "test" / "beta0", test_argv(with_flag(db, "--reward-exp", 0), 1), script))
        jobs.append((out / "test" / "sign", test_argv(db, 1), snapshot(out / "code-sign", "sign")))
    run_jobs(jobs, parallel)


# --------------------------------------------------------------------------------------------------------------------
# The report: every evaluation's samples read back from its grid, accuracy, tables, curves, grids
# --------------------------------------------------------------------------------------------------------------------


def grid_images(path, n, cols, size=192, pixels=16):
    """The n images of an eval-EPOCH.png that dag.py's save_grid wrote ((size + 28)-pixel rows of `cols` cells, each
    16x16 image upscaled by NEAREST): (n, 3, 16, 16) in [0, 1], exactly the uint8 values it saved."""
    grid, step = torch.from_numpy(np.array(Image.open(path).convert("RGB"))), size // pixels
    centres = torch.arange(pixels) * step + step // 2
    cells = [grid[(i // cols) * (size + 28) + centres][:, (i % cols) * size + centres] for i in range(n)]
    return torch.stack(cells).permute(0, 3, 1, 2).float() / 255


def eval_prompts(run):
    """A run's eval prompt of each sample, in its grid's order, and the samples per prompt."""
    args = dag.parse_args(json.loads((run / "args.json").read_text())["argv"][1:])
    prompts = [line.strip() for line in Path(args.eval_prompts).read_text().splitlines() if line.strip()]
    return [p for p in prompts for _ in range(args.eval_samples)], args.eval_samples


def evaluations(run):
    """Every evaluation of a run: its eval.jsonl record with the digit accuracy (all, trained-on, held-out) and the
    colour accuracy of its samples, read back from its grid."""
    prompts, k = eval_prompts(run)
    records = []
    for r in dag.read_jsonl(run / "eval.jsonl"):
        images = grid_images(run / f"eval-{r['epoch']:04d}.png", len(prompts), k)
        named = torch.tensor([parse(p) for p in prompts])
        digit = digit_logits(digit_classifier(), F.adaptive_avg_pool2d(images, 8)).argmax(1) == named[:, 1]
        seen = TRAINED_ON * k
        records.append({**r, "digit_acc": digit.float().mean().item(), "digit_acc_trained": digit[:seen].float()
                        .mean().item(), "digit_acc_held_out": digit[seen:].float().mean().item(),
                        "colour_acc": (colour_of(images) == named[:, 0]).float().mean().item(), "images": images})
    return records


def report(out):
    """OUT/table.md (the chosen settings over seeds, every run, every try), curves.png and grids.png."""
    choose(out)
    runs = sorted(p.parent for p in out.glob("**/wall.json") if "code" not in str(p))
    ev = {run: evaluations(run) for run in runs}
    per_epoch = {run: loop_seconds(run) / len(dag.read_jsonl(run / "log.jsonl")) for run in runs}
    trajectories = {run: json.loads((run / "args.json").read_text())["trajectories"] for run in runs}
    base = ev[runs[0]][0]

    def reach(run):
        return next((str(r["epoch"] * trajectories[run]) for r in ev[run] if r["digit_acc"] >= THRESHOLD), "no")

    groups = {a: [out / f"{a}-seed{s}" for s in SEEDS if out / f"{a}-seed{s}" in ev] for a in CHOSEN}
    groups["db, beta 0"] = [p for p in [out / "db-beta0-seed1"] if p in ev]
    lines = [f"Base model ({len(eval_prompts(runs[0])[0])} fixed-noise eval samples, guidance 1): eval r "
             f"{base['eval_reward_mean']:.3f}, digit accuracy {base['digit_acc']:.3f} (trained-on prompts "
             f"{base['digit_acc_trained']:.3f}, held-out {base['digit_acc_held_out']:.3f}), colour accuracy "
             f"{base['colour_acc']:.3f}, diversity {base['diversity']:.3f}.", "",
             "| algorithm | setting | eval r | digit acc | trained-on | held-out | colour acc | diversity | loop s "
             f"| trajectories to digit acc ≥ {THRESHOLD} |", "|---" * 10 + "|"]
    for name, paths in groups.items():
        if paths:
            a = json.loads((paths[0] / "args.json").read_text())["argv"]
            flags = " ".join(a[a.index("--algo") + 2 : a.index("--seed")])
            cells = [mean_std([ev[p][-1][key] for p in paths]) for key in ("eval_reward_mean", "digit_acc",
                     "digit_acc_trained", "digit_acc_held_out", "colour_acc", "diversity")]
            lines.append(f"| {name} | `{flags}` | {' | '.join(cells)} | "
                         f"{mean_std([loop_seconds(p) for p in paths], 0)} | {', '.join(reach(p) for p in paths)} |")
    lines += ["", "| run | flags | eval r at each evaluation | digit acc at each evaluation | final trained-on / "
              "held-out digit acc | colour acc | diversity 0 → last | loop s | wall s |", "|---" * 9 + "|"]
    for run in runs:
        a = json.loads((run / "args.json").read_text())["argv"]
        flags = " ".join(a[a.index("--algo") + 1 : a.index("--seed")])
        chosen = " (chosen)" if run.parent.name == "tune" and flags.split(maxsplit=1)[1] in CHOSEN.values() else ""
        last = ev[run][-1]
        lines.append(f"| {run.relative_to(out)}{chosen} | `{flags}` | {curve(ev[run])} | "
                     f"{' '.join(format(r['digit_acc'], '.3f') for r in ev[run])} | "
                     f"{last['digit_acc_trained']:.3f} / {last['digit_acc_held_out']:.3f} | {last['colour_acc']:.3f} | "
                     f"{ev[run][0]['diversity']:.3f} → {last['diversity']:.3f} | {loop_seconds(run):.0f} | "
                     f"{json.loads((run / 'wall.json').read_text())['wall_s']:.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    figure(out / "curves.png", {name: [(ev[p], trajectories[p], per_epoch[p]) for p in paths]
                                for name, paths in groups.items() if paths})
    shown = {"base": base["images"], **{a: ev[out / f"{a}-seed1"][-1]["images"] for a in CHOSEN if out / f"{a}-seed1"
                                         in ev}}
    prompts, k = eval_prompts(runs[0])
    grids(out / "grids.png", shown, prompts[::k], k)
    print("\n".join(lines))


def figure(path, groups, W=420, H=300):
    """Four panels, the mean over the seeds of each group ({name: [(evaluations, trajectories per epoch, loop seconds
    per epoch) of each seed]}): digit accuracy against trajectories and against training-loop seconds (one thread),
    eval r and diversity against trajectories."""
    panels = [("digit accuracy", "digit_acc", "trajectories"), ("digit accuracy", "digit_acc", "loop seconds"),
              ("eval r = p_4(named digit)", "eval_reward_mean", "trajectories"),
              ("diversity (RMS pixel distance)", "diversity", "trajectories")]
    image = Image.new("RGB", (W * len(panels), H + 24), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, key, axis) in enumerate(panels):
        lines = {}
        for name, seeds in groups.items():
            lines[name] = []
            for j in range(len(seeds[0][0])):
                x = [ev[j]["epoch"] * (sec if axis == "loop seconds" else traj) for ev, traj, sec in seeds]
                lines[name].append((sum(x) / len(seeds), sum(ev[j][key] for ev, _, _ in seeds) / len(seeds)))
        xs, ys = [x for c in lines.values() for x, _ in c], [y for c in lines.values() for _, y in c]
        (y_ticks, decimals), (x_ticks, _) = nice_ticks(min(ys), max(ys)), nice_ticks(min(xs), max(xs))
        left, right, top, bottom = i * W + 56, (i + 1) * W - 14, 24, H - 30

        def px(x, y):
            return (left + (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0]) * (right - left),
                    bottom - (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0]) * (bottom - top))

        draw.text((left, 6), title + ", mean over seeds", fill="black")
        draw.rectangle((left, top, right, bottom), outline="gray")
        for y in y_ticks:
            draw.line((left, px(0, y)[1], right, px(0, y)[1]), fill=(230, 230, 230))
            draw.text((i * W + 4, px(0, y)[1] - 6), f"{y:.{decimals}f}", fill="black")
        for x in x_ticks:
            draw.text((px(x, 0)[0] - 8, bottom + 6), f"{x:g}", fill="black")
        draw.text((right - 6 * len(axis), H - 12), axis, fill="gray")
        for name, points in lines.items():
            xy = [px(x, y) for x, y in points]
            for a, b in zip(xy, xy[1:]):
                if "beta 0" in name:  # dashed: a dash from a to the middle of the segment
                    b = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
                draw.line((a, b), fill=COLOUR_OF[name.split(",")[0]], width=2)
    for k, name in enumerate(groups):
        x, colour = 8 + 150 * k, COLOUR_OF[name.split(",")[0]]
        draw.line((x, H + 12, x + 20, H + 12), fill=colour, width=2)
        draw.text((x + 24, H + 6), name + (" (dashed)" if "beta 0" in name else ""), fill=colour)
    image.save(path)


def grids(path, shown, prompts, per, scale=3):
    """One row per eval prompt (held-out ones marked), one block of its `per` fixed-noise samples per model."""
    S = 16 * scale
    block, label = per * (S + 2) + 12, 130
    sheet = Image.new("RGB", (label + block * len(shown), 20 + len(prompts) * (S + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, (name, images) in enumerate(shown.items()):
        draw.text((label + j * block, 4), name, fill="black")
        for i, image in enumerate(images):
            array = (image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
            tile = Image.fromarray(array).resize((S, S), Image.NEAREST)
            sheet.paste(tile, (label + j * block + (i % per) * (S + 2), 20 + (i // per) * (S + 2)))
    for i, prompt in enumerate(prompts):
        draw.text((4, 20 + i * (S + 2) + S // 2 - 6), prompt + (" (held out)" if i >= TRAINED_ON else ""), fill="black")
    sheet.save(path)


def base_accuracy(model):
    """All 60 captions x 4 fixed seeds, 20 DDIM steps, guidance 1 (dag.evaluate): the share of samples
    showing the named digit and the named colour, and the mean reward."""
    prompts = [f"a {c} {d}" for c in COLOUR_NAMES for d in DIGIT_NAMES]
    args = dag.parse_args(["--model", str(model), "--reward", "benchmark.t2i:named_digit", "--steps", "20",
                           "--guidance-scale", "1", "--eval-samples", "4", "--train-batch", "8", "--algo", "ddpo"])
    m = dag.load_models(args, torch.device("cpu"), dag.pipeline_index(str(model), 20))
    record, (images, _, _) = dag.evaluate(m, dag.rewards.checked(named_digit(), "named_digit"), prompts, args, 0, 1)
    digit, colour = accuracy(images, [p for p in prompts for _ in range(args.eval_samples)])
    return {"model": str(model), "digit_acc": round(digit, 3), "colour_acc": round(colour, 3),
            "r": round(record["eval_reward_mean"], 3)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["pretrain", "run", "report", "base"])
    p.add_argument("--out", default="runs/t2i", type=Path, help="run folder (pretrain: the pipeline's folder)")
    p.add_argument("--stage", nargs="+", choices=["tune", "main", "test"], default=["tune", "main", "test"])
    p.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--unet-steps", type=int, default=1850, help="pretrain: UNet and text encoder steps")
    a = p.parse_args()
    torch.set_num_threads(1)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines reach a redirected log as they happen
    if a.command == "pretrain":
        pretrain(a.out, unet_steps=a.unet_steps)
    elif a.command == "base":
        print(json.dumps(base_accuracy(a.out)))
    else:
        if a.command == "run":
            benchmark(a.out, a.stage, a.parallel)
        report(a.out)
