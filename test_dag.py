"""Tests for dag.py: the loss math against references (SPEC Sec. 10), then end-to-end runs on tiny models, the
guarantees of the harness, the reward loaders, and two learning tests on models pretrained here (benchmark/).

Models are built from configs with random weights (the CIFAR-10 DDPM architecture, in a small config of the same
family, and a tiny Stable Diffusion pipeline), except the learning tests', which are the benchmark's pretrained ones.
Run: `HF_HUB_OFFLINE=1 python -m pytest -q test_dag.py`.
"""

import argparse
import collections
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: it reads the variable once

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import dag
import rewards
from benchmark import baselines

torch.set_num_threads(1)  # tiny models: faster on one thread, and the same numbers as the subprocess runs below
HERE = Path(__file__).resolve().parent
SHARED_ASSETS = HERE.parent / "shared" / "assets"  # optional real weights; tests that need them skip without


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------------
# Schedulers and models built from configs
# --------------------------------------------------------------------------------------------------------------------

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, num_train_timesteps=1000)
CIFAR_SCHEDULER = dict(beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=True,
                       num_train_timesteps=1000, variance_type="fixed_large")
CIFAR_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, freq_shift=1,
                  flip_sin_to_cos=False, downsample_padding=0, norm_eps=1e-6, block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
SMALL_UNET = {**CIFAR_UNET, "layers_per_block": 1, "block_out_channels": (32, 64),
              "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D")}


def sd_scheduler(steps=50):
    return dag.ddim_scheduler(DDIMScheduler(**SD_SCHEDULER).config, steps)


def float64_constants(s):
    """diffusers keeps alphas_cumprod in float32 and takes its square roots there; a float64 copy makes
    `scheduler.step` an exact float64 reference (1 - a_t / a' cancels badly in float32 near t = 0)."""
    s.alphas_cumprod = s.alphas_cumprod.double()
    s.final_alpha_cumprod = s.final_alpha_cumprod.double()  # = alphas_cumprod[0], used when t - Delta < 0
    return s


def cifar_scheduler(steps=50):
    return dag.ddim_scheduler(DDPMScheduler(**CIFAR_SCHEDULER).config, steps)


def save_ddpm(path, unet_config):
    from diffusers import DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    DDPMPipeline(unet=UNet2DModel(**unet_config), scheduler=DDPMScheduler(**CIFAR_SCHEDULER)).save_pretrained(path)
    return str(path)


def toy_clip_tokenizer(path):
    """A CLIP BPE tokenizer over single letters; <|endoftext|> gets the largest id, as in CLIP (open_clip pools there
    with argmax(ids))."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "!": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(path)
    return tokenizer


def save_tiny_sd(path):
    """A Stable Diffusion pipeline of the real classes at toy sizes: 16x16 images, 8x8x4 latents, 32-wide text."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = toy_clip_tokenizer(path / "toy_tok")
    eos = len(tokenizer) - 1
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                                                bos_token_id=0, eos_token_id=eos, pad_token_id=eos))
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(32, 32), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path / "pipe")
    return str(path / "pipe")


@pytest.fixture(scope="session")
def ddpm_dir(tmp_path_factory):
    return save_ddpm(tmp_path_factory.mktemp("ddpm"), SMALL_UNET)


@pytest.fixture(scope="session")
def sd_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("sd"))


def cli(model, out, *extra):
    """A tiny run's argv: 4 steps, 4 trajectories, a small flow, the JPEG reward (on the animal prompts for SD)."""
    prompts = ["--prompts", "simple_animals"] if (Path(model) / "text_encoder").is_dir() else []
    return ["--model", str(model), "--out", str(out), "--reward", "jpeg_compressibility", *prompts, "--steps", "4",
            "--trajectories", "4", "--train-batch", "2", "--grad-accum", "1", "--eval-every", "0",
            "--flow-channels", "32", "64", *extra]


def load(model, *extra):
    args = dag.parse_args(cli(model, "/unused", *extra))
    dag.check_args(args)
    torch.manual_seed(0)
    return args, dag.load_models(args, torch.device("cpu"), dag.pipeline_index(str(model), args.steps))


def brightness(device=None):
    """A user's reward factory, loaded through `--reward test_dag:brightness`."""
    return lambda images, prompts: images.mean(dim=(1, 2, 3))


def dark_reward(images, prompts):
    return -images.mean(dim=(1, 2, 3))  # any pixel function will do for routing tests


def scored_rollout(m, prompts, args, seed, reward=dark_reward):
    """A rollout with every state scored, as training at --timestep-fraction 1 would score it."""
    ro = dag.rollout(m, reward, prompts, args, generator(seed))
    dag.score_states(m, reward, ro, torch.ones(len(prompts), args.steps + 1, dtype=torch.bool), args.train_batch)
    return ro


def step_batch(ro, j):
    """Transition j of every trajectory of a rollout."""
    B = len(ro.prompts)
    return ro.transitions(torch.arange(B), torch.full((B,), j))


def run_script(argv, nproc=None, preexec=None, **kwargs):
    """dag.py in a child process (`preexec` runs in the child before it starts). Its SIGINT is reset to the default,
    so that Ctrl-C reaches it even when the suite itself was started in the background by a shell (`pytest ... &`),
    which leaves SIGINT ignored for its children."""

    def child():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if preexec:
            preexec()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.Popen([*(launcher if nproc else [sys.executable]), str(HERE / "dag.py"), *argv], env=env,
                            cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=child, **kwargs)


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("dag.py: error")]


# --------------------------------------------------------------------------------------------------------------------
# 1-3, 12: DDIM transition math
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("make", [sd_scheduler, cifar_scheduler])
def test_ddim_step_matches_diffusers_at_every_timestep(make, eta):  # oracle 1, also at eta < 1 (the std's factor)
    s = make()
    g = generator(1)
    x_t, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    for k, t in enumerate(s.timesteps):
        z = torch.randn(x_t.shape, generator=generator(100 + k))
        ref = s.step(eps, t, x_t, eta=eta, variance_noise=z).prev_sample
        ours, _ = dag.ddim_step_logprob(s, eps, torch.full((2,), int(t)), x_t, eta=eta, generator=generator(100 + k))
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_v_prediction_is_converted_to_epsilon():  # SPEC 5: SD-2.x predicts v
    s = dag.ddim_scheduler(DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": "v_prediction"}).config, 50)
    g = generator(20)
    x_t, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for k, t in enumerate(s.timesteps):
        z = torch.randn(x_t.shape, generator=generator(200 + k))
        ref = s.step(v, t, x_t, eta=1.0, variance_noise=z).prev_sample
        tt = torch.full((2,), int(t))
        eps = dag.model_output_to_eps(s, v, tt, x_t)
        ours, _ = dag.ddim_step_logprob(s, eps, tt, x_t, eta=1.0, noise=z)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        a_t = s.alphas_cumprod[int(t)]
        torch.testing.assert_close(dag.predict_x0(s, eps, tt, x_t), a_t.sqrt() * x_t - (1 - a_t).sqrt() * v)
    s = dag.ddim_scheduler(DDIMScheduler(**{**SD_SCHEDULER, "prediction_type": "sample"}).config, 50)
    with pytest.raises(ValueError, match="not supported"):
        dag.model_output_to_eps(s, v, torch.full((2,), 1), x_t)


@pytest.mark.parametrize("make", [sd_scheduler, cifar_scheduler])
def test_log_probs_match_torch_normal(make):  # oracle 2
    s = float64_constants(make(10))
    g = generator(2)
    x_t, eps, x_child = (torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    for t in s.timesteps:
        tt = torch.full((3,), int(t))
        t_child = max(int(t) - 1000 // 10, 0)
        mean = s.step(eps, t, x_t, eta=1.0, variance_noise=torch.zeros_like(x_t)).prev_sample
        std = s._get_variance(t, t_child).double().sqrt()
        _, log_pf = dag.ddim_step_logprob(s, eps, tt, x_t, x_child=x_child)
        reference = torch.distributions.Normal(mean, std).log_prob(x_child).mean((1, 2, 3))
        torch.testing.assert_close(log_pf, reference, rtol=1e-12, atol=1e-12)
        ratio = s.alphas_cumprod[int(t)].double() / s.alphas_cumprod[t_child].double()
        q = torch.distributions.Normal(ratio.sqrt() * x_child, (1 - ratio).sqrt())  # evaluated at x_t, not x_child
        torch.testing.assert_close(dag.backward_logprob(s, tt, x_t, x_child), q.log_prob(x_t).mean((1, 2, 3)))


def test_eta_one_ddim_is_the_ddpm_posterior_float64():  # oracle 3
    s = sd_scheduler()
    g = generator(3)
    x0 = torch.randn(2, 1, 1, 1, generator=g, dtype=torch.float64)
    x_t = torch.randn(2, 1, 1, 1, generator=g, dtype=torch.float64)
    for t in s.timesteps:
        a_t, a_p = (s.alphas_cumprod[i].double() for i in (int(t), max(int(t) - 20, 0)))
        eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        alpha, beta = a_t / a_p, 1 - a_t / a_p  # the strided chain's one-step noising kernel
        post_mean = a_p.sqrt() * beta / (1 - a_t) * x0 + alpha.sqrt() * (1 - a_p) / (1 - a_t) * x_t
        post = torch.distributions.Normal(post_mean, ((1 - a_p) / (1 - a_t) * beta).sqrt())
        for k in range(3):  # three points pin down a 1-d Gaussian's mean and variance
            x_child = torch.randn(2, 1, 1, 1, generator=generator(k), dtype=torch.float64)
            _, log_pf = dag.ddim_step_logprob(s, eps, torch.full((2,), int(t)), x_t, x_child=x_child)
            torch.testing.assert_close(log_pf, post.log_prob(x_child).flatten(), atol=1e-12, rtol=1e-12)


def test_timesteps_and_x0_round_trip():  # oracle 12
    expected = list(range(981, 0, -20))
    assert sd_scheduler().timesteps.tolist() == expected
    assert cifar_scheduler().timesteps.tolist() == expected
    s = cifar_scheduler()
    assert max(int(s.timesteps[-1]) - 1000 // 50, 0) == 0  # the last step's child is at t = 0
    g = generator(4)
    x0 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    for t in (981, 501, 1):
        a_t = s.alphas_cumprod[t].double()
        x_t = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        torch.testing.assert_close(dag.predict_x0(s, eps, torch.full((2,), t), x_t), x0)


def test_cifar_config_as_published_has_a_zero_variance_step():
    """Why ddim_scheduler forces steps_offset=1: the DDPM's own config makes the last step t -> t = 0."""
    s = DDIMScheduler.from_config(DDPMScheduler(**CIFAR_SCHEDULER).config)
    s.set_timesteps(50)
    assert int(s.timesteps[-1]) == 0
    with pytest.raises(ValueError, match="zero std"):
        dag.ddim_step_logprob(s, torch.zeros(1, 3, 2, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1, 3, 2, 2))


# --------------------------------------------------------------------------------------------------------------------
# 4-7, 11: DB and KL objectives
# --------------------------------------------------------------------------------------------------------------------


def test_db_residual_is_zero_for_the_exact_flow_of_a_point_mass():  # oracle 4
    s = sd_scheduler()
    g = generator(5)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)

    def log_marginal(x, t):  # log q(x_t) for data = point mass at x0, mean over dims
        a = s.alphas_cumprod[t].double()
        return torch.distributions.Normal(a.sqrt() * x0, (1 - a).sqrt()).log_prob(x).mean((1, 2, 3))

    for t in s.timesteps.tolist():
        a = s.alphas_cumprod[t].double()
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g, dtype=torch.float64) * 1.3
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()  # the oracle denoiser of a point mass
        tt = torch.full((3,), t)
        x_child, log_pf = dag.ddim_step_logprob(s, eps, tt, x_t, generator=g)
        log_pb = dag.backward_logprob(s, tt, x_t, x_child)
        loss = dag.db_loss(log_marginal(x_t, t), log_pf, log_pb, log_marginal(x_child, max(t - 20, 0)))
        assert loss.max().sqrt() < 1e-11, (t, loss)


def test_mean_and_sum_reductions_are_a_rescaling():  # oracle 5
    s = float64_constants(sd_scheduler(10))
    g = generator(6)
    x_t = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    t, D, beta = torch.full((4,), int(s.timesteps[3])), 18, 7.0
    flow, flow_child, r, r_child = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(4))
    x_child, log_pf = dag.ddim_step_logprob(s, eps, t, x_t, generator=g)
    log_pb = dag.backward_logprob(s, t, x_t, x_child)
    mean_db = dag.db_loss(flow + beta * r, log_pf, log_pb, flow_child + beta * r_child)
    # the same transition with summed densities (independent reference), exponent D*beta and flow D*F
    t_child = int(t[0]) - 100
    a_t, a_p = s.alphas_cumprod[int(t[0])].double(), s.alphas_cumprod[t_child].double()
    mean = s.step(eps, int(t[0]), x_t, eta=1.0, variance_noise=torch.zeros_like(x_t)).prev_sample
    std = s._get_variance(int(t[0]), t_child).double().sqrt()
    sum_pf = torch.distributions.Normal(mean, std).log_prob(x_child).sum((1, 2, 3))
    sum_pb = torch.distributions.Normal((a_t / a_p).sqrt() * x_child, (1 - a_t / a_p).sqrt()).log_prob(x_t).sum((1, 2, 3))
    sum_db = dag.db_loss(D * flow + D * beta * r, sum_pf, sum_pb, D * flow_child + D * beta * r_child)
    torch.testing.assert_close(sum_db, D**2 * mean_db)


def test_leave_one_out_advantages():  # oracle 6
    a = torch.randn(6, generator=generator(7), dtype=torch.float64)
    others = [[k for k in range(6) if k != i] for i in range(6)]
    d = [a[i] - a[others[i]].mean() for i in range(6)]  # each sample minus the mean of the other five
    expected = [(d[i] / (torch.stack([d[k] ** 2 for k in others[i]]).mean().sqrt() + 1e-8)).clamp(-5, 5)
                for i in range(6)]
    torch.testing.assert_close(dag.leave_one_out_advantages(a), torch.stack(expected))
    scaled = dag.leave_one_out_advantages(3.0 * a + 11.0)
    torch.testing.assert_close(scaled, dag.leave_one_out_advantages(a), atol=1e-7, rtol=0)
    assert dag.leave_one_out_advantages(torch.tensor([100.0] + [0.0] * 9)).max() == 5.0  # one outlier: A = 9 -> 5
    with pytest.raises(ValueError, match="at least 2"):
        dag.leave_one_out_advantages(torch.tensor([1.0]))


def test_ppo_clip_gradient():  # oracle 7
    n = 6
    zero = torch.zeros(n, dtype=torch.float64)
    log_flow_child = torch.tensor([3.0, -2.0, 1.0, -1.0, 0.5, -4.0], dtype=torch.float64)  # sets the advantages
    log_pf = torch.tensor([0.0, 0.0, 0.5, -0.5, -0.5, 0.5], dtype=torch.float64, requires_grad=True)
    _, loss_policy = dag.kl_loss(zero, log_pf, zero, log_flow_child, zero, clip_range=1e-4)
    loss_policy.sum().backward()
    adv = dag.leave_one_out_advantages((log_flow_child - log_pf).detach())
    ratio = log_pf.detach().exp()
    clipped = ((adv > 0) & (ratio > 1 + 1e-4)) | ((adv < 0) & (ratio < 1 - 1e-4))
    assert clipped.tolist() == [False, False, True, True, False, False]
    assert (log_pf.grad[clipped] == 0).all()
    torch.testing.assert_close(log_pf.grad[:2], -adv[:2])  # ratio 1: gradient -A
    torch.testing.assert_close(log_pf.grad[4:], -adv[4:] * ratio[4:])  # outside the clip on the pessimistic side


def test_reward_exp_schedule():  # oracle 11
    values = [dag.reward_exp_at(e, 100, 100.0) for e in (0, 1, 25, 49, 50, 99)]
    assert values == pytest.approx([0, 2, 50, 98, 100, 100])
    assert dag.reward_exp_at(0, 100, 100.0, anneal=False) == 100.0


# --------------------------------------------------------------------------------------------------------------------
# 13-14: flow network, the rollout's layout, the training order and the timestep fraction
# --------------------------------------------------------------------------------------------------------------------


def test_flow_net_shapes_and_sizes():  # oracle 13
    torch.manual_seed(0)
    text_flow, pixel_flow = dag.FlowNet(4, 768), dag.FlowNet(3, None)
    assert sum(p.numel() for p in text_flow.parameters()) == 6_452_993  # the release's ConditionalFlow: 6.45 M
    for B in (1, 4):
        t = torch.full((B,), 981)
        assert text_flow(torch.randn(B, 4, 64, 64), t, torch.randn(B, 77, 768)).shape == (B,)
        assert pixel_flow(torch.randn(B, 3, 32, 32), t).shape == (B,)
    small = dag.FlowNet(3, None, (32, 64))  # --flow-channels 32 64, the digits benchmark's
    assert small(torch.randn(2, 3, 8, 8), torch.full((2,), 981)).shape == (2,)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in pixel_flow.parameters()) / 20


def coded_rollout(B, N):
    """A Rollout whose every entry names its place: state j of trajectory i carries 100 i + j."""
    code = torch.arange(B)[:, None] * 100 + torch.arange(N + 1)[None]  # (B, N + 1)
    states = code[..., None, None, None].float().expand(B, N + 1, 1, 2, 2)
    timesteps = torch.cat([torch.arange(N - 1, -1, -1) * 20 + 1, torch.zeros(1, dtype=torch.long)])
    return dag.Rollout(prompts=[f"p{i}" for i in range(B)], text=torch.arange(B)[:, None, None].float(),
                       states=states, timesteps=timesteps, log_pf=code[:, :N].double(),
                       eps=-code[:, :N, None, None, None].float(), x0_pred=states[:, :N] * 10,
                       state_reward=code.float() + 0.5)


@pytest.mark.parametrize("fraction", [1.0, 0.4])
def test_train_epoch_visits_the_chosen_transitions_once_with_aligned_fields(fraction):  # oracle 14, issue 19
    """The real transition_order and train_epoch with a recording loss: each trajectory trains int(N f) distinct
    transitions (all N at f = 1), each once, in a per-trajectory random order, every field of a micro-batch row
    belonging to that trajectory's step (x_child its child), and the loss normalised over the K trained."""
    B, N = 6, 5
    K = int(N * fraction)
    ro, weight = coded_rollout(B, N), torch.nn.Parameter(torch.zeros(()))
    m = dag.Models(unet=torch.nn.Linear(1, 1), scheduler=None, flow=None, latent_shape=(1, 2, 2),
                   device=torch.device("cpu"), dtype=torch.float32)
    visits = collections.defaultdict(list)

    def loss_fn(batch):
        i = batch.rows
        j = (batch.x_t[:, 0, 0, 0] - 100 * i).long()
        assert torch.equal(batch.x_child[:, 0, 0, 0], (100 * i + j + 1).float())  # the child: state j + 1
        assert torch.equal(batch.t, ro.timesteps[j]) and torch.equal(batch.t_child, ro.timesteps[j + 1])
        assert torch.equal(batch.child_is_x0, j == N - 1)
        assert torch.equal(batch.log_pf_rollout, (100 * i + j).double())
        assert torch.equal(batch.eps_rollout.flatten(), -(100 * i + j).float())
        assert torch.equal(batch.r_t, 100 * i + j + 0.5) and torch.equal(batch.r_child, 100 * i + j + 1.5)
        assert torch.equal(batch.text.flatten(), i.float())
        for row, step in zip(i.tolist(), j.tolist()):
            visits[row].append(step)
        return 0.5 * weight.expand(len(i)) + 1.0, {"loss": torch.zeros(())}

    args = argparse.Namespace(train_batch=2, grad_accum=3)
    order, perm = dag.transition_order(B, N, fraction, generator(8))
    assert perm.shape == (B, K)
    opt = torch.optim.SGD([weight], lr=1.0)
    m.flow = torch.nn.Module()  # flow_params: [] ; lora_params: the Linear's two tensors (no grad: counted as 0)
    m.unet.requires_grad_(False)
    m.flow.register_parameter("w", weight)
    dag.train_epoch(m, ro, order, perm, opt, loss_fn, args)
    assert sorted(visits) == list(range(B))
    assert all(len(v) == K and len(set(v)) == K and set(v) <= set(range(N)) for v in visits.values())
    assert len({tuple(v) for v in visits.values()}) > 1, "every trajectory got the same steps or order"
    # one optimizer step over 3 micro-batches x K passes of mean(0.5) / (3 K): the gradient is 0.5, below the clip of 1
    assert weight.item() == pytest.approx(-0.5, abs=1e-6)


def test_the_rollout_decodes_exactly_the_states_the_trained_transitions_read(sd_dir):  # issue 19
    """At f < 1 the rollout scores only the final images; score_states then decodes and scores exactly the states
    that the K trained transitions read (both ends of each; the final image is already scored), the others stay NaN.
    At f = 1 every state is scored: N x0 predictions and the final image per trajectory."""
    args, m = load(sd_dir, "--steps", "10", "--trajectories", "4", "--timestep-fraction", "0.2")
    calls = []
    counted = lambda images, prompts: calls.append(len(images)) or -images.mean(dim=(1, 2, 3))
    ro = dag.rollout(m, counted, ["cat", "dog", "a fox", "bee"], args, generator(9))
    assert sum(calls) == 4 and ro.state_reward[:, :-1].isnan().all() and not ro.reward.isnan().any()
    order, perm = dag.transition_order(4, 10, 0.2, generator(10))
    read = dag.states_read(perm, 10)
    expected = {(i, j) for i in range(4) for s in perm[i].tolist() for j in (s, s + 1)}
    assert {tuple(ij) for ij in read.nonzero().tolist()} == expected and perm.shape == (4, 2)
    calls.clear()
    dag.score_states(m, counted, ro, read, args.train_batch)
    assert sum(calls) == int(read[:, :-1].sum()) and not ro.state_reward[read].isnan().any()
    assert ro.state_reward[:, :-1][~read[:, :-1]].isnan().all()  # r(x_0), the last column, is always scored
    for i, j in expected - {(i, 10) for i in range(4)}:  # each scored state: r(decode(x0_pred)) of its own prompt
        image = dag.decode(m, ro.x0_pred[i : i + 1, j], 1)
        assert ro.state_reward[i, j].item() == pytest.approx(-image.mean().item(), abs=1e-6)
    calls.clear()
    dag.score_states(m, counted, ro, torch.ones(4, 11, dtype=torch.bool), args.train_batch)
    assert sum(calls) == 4 * 10 and not ro.state_reward.isnan().any()


@pytest.mark.parametrize("guidance, rows_per_sample", [(1, 1), (5, 2)])
def test_at_guidance_one_the_unet_runs_one_row_per_sample(sd_dir, guidance, rows_per_sample):  # issue 28
    """eps_u + 1 (eps_c - eps_u) = eps_c: at w = 1 the rollout, the training forward and the evaluation run the
    conditional branch alone (N + K UNet rows per trajectory, N per evaluation sample), half of CFG's at w = 5; the
    x0 prediction that the forward-looking reward scores is then the policy's own."""
    args, m = load(sd_dir, "--guidance-scale", str(guidance), "--steps", "5", "--timestep-fraction", "0.4")
    rows = []
    m.unet.register_forward_pre_hook(lambda module, a, kw: rows.append(len(kw.get("sample", a[0]))), with_kwargs=True)
    ro = dag.rollout(m, dark_reward, ["cat", "dog", "a fox", "bee"], args, generator(3))
    assert sum(rows) == 4 * 5 * rows_per_sample
    order, perm = dag.transition_order(4, 5, 0.4, generator(4))
    rows.clear()
    for j in range(perm.shape[1]):
        dag.policy_logprob(m, ro.transitions(order, perm[order, j]), args)
    assert sum(rows) == 4 * 2 * rows_per_sample  # K = int(0.4 * 5) = 2 trained transitions per trajectory
    rows.clear()
    with torch.no_grad():
        dag.denoise(m, ["cat", "dog"], torch.randn(2, *m.latent_shape, generator=generator(5)), args)
    assert sum(rows) == 2 * 5 * rows_per_sample
    if guidance == 1:
        assert torch.equal(ro.x0_pred[:, 1], dag.predict_x0(m.scheduler, ro.eps[:, 1], ro.timesteps[1], ro.states[:, 1]))


def test_the_scored_x0_prediction_is_the_text_branchs_not_the_guided_one(sd_dir):  # SPEC 2
    """At guidance 5 the rollout steps with the guided eps but stores x0_pred from the conditional branch alone (the
    forward-looking reward scores what the text branch predicts, as the release does)."""
    args, m = load(sd_dir, "--guidance-scale", "5")
    ro = dag.rollout(m, dark_reward, ["cat", "dog", "a fox", "bee"], args, generator(6))
    for j in (0, 2):
        x_t, t = ro.states[:, j], ro.timesteps[j].expand(4)
        with torch.no_grad():
            eps_text, _ = dag.predict_eps(m, x_t, t, ro.text, 1)
        torch.testing.assert_close(ro.x0_pred[:, j], dag.predict_x0(m.scheduler, eps_text, t, x_t), atol=1e-5, rtol=0)
        assert (ro.x0_pred[:, j] - dag.predict_x0(m.scheduler, ro.eps[:, j], t, x_t)).abs().max() > 1e-3


def test_the_dag_path_runs_from_its_own_config_without_the_harness(sd_dir):
    """dag_epoch with a Config built by hand (no command line, no harness function): one epoch trains both nets."""
    _, m = load(sd_dir)
    cfg = dag.Config(steps=4, trajectories=4, train_batch=2, grad_accum=1, epochs=2, reward_exp=5.0)
    before = [p.detach().clone() for p in m.lora_params + m.flow_params]
    optimizer = torch.optim.AdamW(m.lora_params + m.flow_params, lr=1e-2, weight_decay=0)  # moved by gradients only
    generators = {"noise": generator(1), "cpu": generator(2)}
    scores, stats = dag.dag_epoch(m, dark_reward, ["cat", "dog"], optimizer, 1, cfg, generators)
    assert scores.shape == (4,) and stats["reward_exp"] == 5.0 and stats["steps_taken"] == [True, True]
    assert all(not torch.equal(a, b) for a, b in zip(before, m.lora_params + m.flow_params) if b.ndim > 1)


def test_log_flows_shift_the_child_reward_and_pin_the_boundary():  # SPEC 2
    """Both ends of the forward-looking flow: the reward of state j and of state j + 1, and at the last step the
    child is x_0 with log F = beta * r(x_0) and no F_phi term."""
    B, N, beta = 4, 5, 3.0
    ro = coded_rollout(B, N)

    def flow(x, t, text):  # a flow that tells where it was evaluated
        return 1000.0 + t.float()

    rows, steps = torch.arange(B), torch.tensor([0, 2, 3, N - 1])
    log_flow, log_flow_child = dag.log_flows(flow, ro.transitions(rows, steps), beta)
    parent, child = 100 * rows + steps + 0.5, 100 * rows + steps + 1.5  # state_reward of states j and j + 1
    torch.testing.assert_close(log_flow, 1000.0 + ro.timesteps[steps].float() + beta * parent)
    last = steps == N - 1
    expected_child = beta * child + torch.where(last, 0.0, 1000.0 + ro.timesteps[steps + 1].float())
    torch.testing.assert_close(log_flow_child, expected_child)
    assert log_flow_child[-1] == beta * ro.reward[-1]  # the terminal boundary: beta * r(x_0)


# --------------------------------------------------------------------------------------------------------------------
# 8-10, 15: ratio, unetreg, gradient routing and the learning signal on real model code (tiny DDPM and tiny SD)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which, guidance", [("ddpm", "5"), ("sd", "5"), ("sd", "1")])
def test_ratio_is_one_and_unetreg_zero_on_the_training_micro_batches(which, guidance, request):  # oracles 8, 10
    """Parameters unchanged since the rollout, micro-batches taken from the rollout in training order (mixed
    timesteps): the recomputed log-prob and eps equal the stored ones bitwise, with CFG in the training forward (and
    at w = 1 with the conditional branch alone in both)."""
    args, m = load(request.getfixturevalue(f"{which}_dir"), "--guidance-scale", guidance)
    ro = dag.rollout(m, dark_reward, ["cat", "dog", "a fox", "bee"], args, generator(9))
    assert torch.equal(ro.reward, dark_reward(dag.decode(m, ro.states[:, -1], 16), None))  # state N is the image's x_0
    order, perm = dag.transition_order(4, args.steps, 1.0, generator(18))
    for i in range(0, 4, args.train_batch):
        rows = order[i : i + args.train_batch]
        for j in range(args.steps):
            batch = ro.transitions(rows, perm[rows, j])
            log_pf, eps = dag.policy_logprob(m, batch, args)
            assert torch.equal(log_pf, batch.log_pf_rollout), "exp(log_pf - log_pf_rollout) must be exactly 1"
            reg = ((eps - batch.eps_rollout) ** 2).mean()
            (grad,) = torch.autograd.grad(reg, m.lora_params[-1])
            assert reg.item() == 0.0 and (grad == 0).all()


@pytest.mark.parametrize("which", ["ddpm", "sd"])
def test_gradient_routing_db_and_kl(which, request):  # oracle 9
    args, m = load(request.getfixturevalue(f"{which}_dir"))
    ro = scored_rollout(m, ["cat", "dog", "a fox", "bee"], args, 10)
    ro.eps = ro.eps + 0.1  # make unetreg nonzero: its value is checked below
    batch = step_batch(ro, 1)
    flow_grads = {}
    for algo in ("db", "kl"):
        args.algo = algo
        m.unet.zero_grad(set_to_none=True)
        m.flow.zero_grad(set_to_none=True)
        loss, stats = dag.dag_loss(m, batch, 3.0, args)
        loss.mean().backward()
        assert all(p.grad is not None for p in m.lora_params)
        lora_b = [p for n, p in m.unet.named_parameters() if "lora_B" in n]  # B = 0 at init, so only B moves first
        assert lora_b and all(p.grad.abs().sum() > 0 for p in lora_b)
        flow_grads[algo] = [p.grad.clone() for p in m.flow.parameters()]
        frozen = [p for p in m.unet.parameters() if not p.requires_grad]
        for module in (m.vae, m.text_encoder):
            frozen += list(module.parameters()) if module is not None else []
        assert frozen and all(p.grad is None for p in frozen)
    assert all(torch.equal(a, b) for a, b in zip(flow_grads["db"], flow_grads["kl"]))
    with torch.no_grad():
        eps, _ = dag.predict_eps(m, batch.x_t, batch.t, batch.text, args.guidance_scale)
    assert stats["unetreg"].item() == pytest.approx(((eps - batch.eps_rollout) ** 2).mean().item(), rel=1e-5)


def test_kl_policy_term_is_the_only_theta_gradient_and_its_weight_defaults_to_the_final_beta(ddpm_dir):
    """With --unetreg 0 and --kl-coef 0, theta gets no gradient (loss_flow trains phi only). --kl-coef unset is the
    final --reward-exp ("For DAG-KL, we put the final beta coefficient on the KL gradient term"), not the annealed
    beta of the epoch: the loss equals the one with --kl-coef set to --reward-exp."""
    args, m = load(ddpm_dir, "--algo", "kl", "--unetreg", "0", "--kl-coef", "0")
    batch = step_batch(scored_rollout(m, [""] * 4, args, 11), 2)
    loss, _ = dag.dag_loss(m, batch, 2.0, args)
    loss.mean().backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in m.lora_params)  # theta: nothing from loss_flow
    args.kl_coef, args.reward_exp = None, 30.0
    unset, _ = dag.dag_loss(m, batch, 2.0, args)  # this epoch's beta is 2; the policy term's weight is 30
    args.kl_coef = 30.0
    assert torch.equal(unset, dag.dag_loss(m, batch, 2.0, args)[0])
    args.kl_coef = 2.0
    assert not torch.equal(unset, dag.dag_loss(m, batch, 2.0, args)[0])


def test_flow_alone_halves_the_db_loss(ddpm_dir):  # oracle 15a
    args, m = load(ddpm_dir)
    ro = scored_rollout(m, [""] * 4, args, 12)
    batches = [step_batch(ro, j) for j in range(args.steps)]
    log_pb = [dag.backward_logprob(m.scheduler, b.t, b.x_t, b.x_child) for b in batches]
    opt = torch.optim.AdamW(m.flow.parameters(), lr=3e-4)
    losses = []
    for _ in range(30):  # theta is fixed, so log_pf = log_pf_rollout exactly (see the ratio test)
        opt.zero_grad()
        loss = 0.0
        for b, lpb in zip(batches, log_pb):
            log_flow, log_flow_child = dag.log_flows(m.flow, b, 5.0)
            loss = loss + dag.db_loss(log_flow, b.log_pf_rollout, lpb, log_flow_child).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses


@pytest.mark.parametrize("algo", ["db", "kl"])
def test_policy_step_favours_transitions_toward_higher_reward(algo, ddpm_dir):  # oracle 15b, one step
    """With F_phi = 0 and a large reward_exp, the DB residual is ~ reward_exp * (r_t - r_child): one small policy
    step must raise log p_theta of the transitions whose child has the higher x0_pred reward, and lower the others.
    A sign error in the residual, the advantage or the parent / child alignment flips this."""
    args, m = load(ddpm_dir, "--algo", algo, "--train-batch", "4", "--unetreg", "0")
    ro = scored_rollout(m, [""] * 4, args, 13)
    torch.nn.init.zeros_(m.flow.head.weight)
    torch.nn.init.zeros_(m.flow.head.bias)
    m.flow.requires_grad_(False)
    batches = [step_batch(ro, j) for j in range(args.steps)]
    for b in batches:
        dag.dag_loss(m, b, 1e4, args)[0].mean().backward()
    with torch.no_grad():
        for p in m.lora_params:
            p -= 1e-3 * p.grad / (p.grad.norm() + 1e-12)
        gain = torch.cat([b.r_child - b.r_t for b in batches])
        change = torch.cat([dag.policy_logprob(m, b, args)[0] - b.log_pf_rollout for b in batches])
    assert change.abs().max() > 0
    assert (gain * change).sum() > 0, (gain, change)  # first order: lr * reward_exp * gain^T J D J^T gain >= 0


def test_optimizer_step_clips_each_group_to_norm_one(ddpm_dir):
    """A large gradient is clipped to norm 1 in the LoRA group and in the flow group separately (SGD with lr 1 makes
    the step the clipped gradient); a small one passes unchanged."""
    _, m = load(ddpm_dir)
    for scale, expected in ((100.0, 1.0), (1e-3, None)):
        before = [[p.detach().clone() for p in group] for group in (m.lora_params, m.flow_params)]
        for group in (m.lora_params, m.flow_params):
            for i, p in enumerate(group):
                p.grad = torch.full_like(p, scale / math.sqrt(sum(q.numel() for q in group)) * (-1) ** i)
        small = math.sqrt(sum(float((p.grad**2).sum()) for p in m.lora_params))
        assert dag.optimizer_step(m, torch.optim.SGD(m.lora_params + m.flow_params, lr=1.0))
        for group, old in zip((m.lora_params, m.flow_params), before):
            step = math.sqrt(sum(float(((p.detach() - q) ** 2).sum()) for p, q in zip(group, old)))
            assert step == pytest.approx(expected or small, rel=1e-4)


def average_on_two_ranks(rank, init_file):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
        params[0].grad = torch.tensor([1.0, 2.0, 3.0]) * (rank + 1)  # rank 1: twice rank 0's; params[1]: no grad
        dag.average_gradients(params)
        assert torch.equal(params[0].grad, torch.tensor([1.5, 3.0, 4.5])) and torch.equal(params[1].grad, torch.zeros(2))
    finally:
        torch.distributed.destroy_process_group()


def test_gradients_are_averaged_over_the_ranks_not_summed(tmp_path):
    """Two gloo processes: the all-reduced gradient is the mean of the ranks' gradients; a missing one counts as 0."""
    torch.multiprocessing.spawn(average_on_two_ranks, args=(str(tmp_path / "init"),), nprocs=2)


# --------------------------------------------------------------------------------------------------------------------
# End to end: a run's outputs, the full-size CIFAR architecture, torchrun, the LoRA export
# --------------------------------------------------------------------------------------------------------------------


def test_a_run_writes_its_log_evaluations_and_checkpoints(ddpm_dir, tmp_path, capsys):
    """A tiny run's log, evaluations, grids and checkpoints; beta x std(r) logged every epoch, and one warning per run
    (none again at a resume) when the final beta x the base model's reward spread is far from where DAG learned (these
    tiny noise images' JPEG sizes barely vary: 100 x ~0.01 kB)."""
    dag.main(cli(ddpm_dir, tmp_path, "--epochs", "2", "--algo", "kl", "--eval-every", "1", "--eval-samples", "3"))
    log, evals = dag.read_jsonl(tmp_path / "log.jsonl"), dag.read_jsonl(tmp_path / "eval.jsonl")
    assert [r["beta_reward_std"] for r in log] == pytest.approx([r["reward_exp"] * r["reward_std"] for r in log])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dag.py: warning")]
    assert len(warnings) == 1 and "--reward-exp 100 x std(r)" in warnings[0] and "is outside" in warnings[0], warnings
    assert [r["epoch"] for r in log] == [0, 1] and [r["epoch"] for r in evals] == [0, 1, 2]
    assert all(math.isfinite(r[k]) for r in log for k in ("loss", "log_pf", "log_flow", "reward_mean", "unetreg"))
    assert log[0]["reward_exp"] == 0 and log[1]["reward_exp"] == 100 and log[0]["skipped_steps"] == 0
    assert all(r["diversity"] > 0 and r["diversity_space"] == "pixels" for r in evals)
    assert sorted(p.name for p in tmp_path.glob("eval-*.png")) == ["eval-0000.png", "eval-0001.png", "eval-0002.png"]
    assert [p.name for p in dag.checkpoints(tmp_path)] == ["checkpoint-2"]  # checkpoint-1 rolled: not on --save-every
    assert (tmp_path / "checkpoint-2" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((tmp_path / "args.json").read_text())["algo"] == "kl"
    dag.main(cli(ddpm_dir, tmp_path, "--epochs", "3", "--algo", "kl", "--eval-every", "1", "--eval-samples", "3",
                 "--resume", "auto"))
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("dag.py: warning")]  # a resume


def test_full_size_cifar_ddpm_architecture(tmp_path):
    from diffusers import UNet2DModel

    assert round(sum(p.numel() for p in UNet2DModel(**CIFAR_UNET).parameters()) / 1e6, 1) == 35.7
    model = save_ddpm(tmp_path / "full", CIFAR_UNET)
    dag.main([*cli(model, tmp_path / "run", "--epochs", "1", "--no-anneal", "--steps", "2", "--trajectories", "2"),
              "--flow-channels", "64", "128", "256", "256"])
    assert dag.read_jsonl(tmp_path / "run" / "log.jsonl")[0]["epoch"] == 0


def test_torchrun_two_processes_stay_in_sync_and_say_which_rank_failed(sd_dir, tmp_path):
    """2 processes: every rank's weights equal at each save (checked there), rank 0 alone writes the outputs, every
    rank's RNG state is saved, and the evaluation split over the ranks equals a one-process evaluation. A reward that
    raises on rank 1 only ends the run with a line that names rank 1 and the error."""
    (tmp_path / "eval.txt").write_text("cat\na fox\nbee\n")  # 3 prompts x 3 seeds: 5 + 4 (+ 1 pad) per rank
    eval_flags = ["--eval-every", "2", "--eval-prompts", str(tmp_path / "eval.txt"), "--eval-samples", "3"]
    argv = cli(sd_dir, tmp_path / "run", "--epochs", "2", "--lr", "1e-2", "--reward", "test_dag:brightness", *eval_flags)
    proc = run_script(argv, nproc=2)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "2 process(es)" in output, output
    run = tmp_path / "run"
    state = torch.load(run / "checkpoint-2" / "training_state.pt", weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["noise"], state["rng"][1]["noise"])
    assert [r["epoch"] for r in dag.read_jsonl(run / "log.jsonl")] == [0, 1]  # rank 0 alone writes the log
    evals = dag.read_jsonl(run / "eval.jsonl")
    assert [r["epoch"] for r in evals] == [0, 2] and (run / "eval-0002.png").is_file()
    args, m = load(sd_dir, *eval_flags)  # the same initial weights in one process: the same fixed-noise evaluation
    record, _ = dag.evaluate(m, rewards.checked(brightness(), "brightness"), ["cat", "a fox", "bee"], args, 0, 1)
    assert evals[0]["eval_reward_per_prompt"] == pytest.approx(record["eval_reward_per_prompt"], abs=1e-5)

    proc = run_script(cli(sd_dir, tmp_path / "fails", "--epochs", "2", "--reward", "test_dag:raises_on_rank_1"), nproc=2)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0 and error_lines(output)[0].startswith(
        "dag.py: error: rank 1 failed: RuntimeError: the reward server is down (test_dag.py:"), output
    assert "Connection closed by peer" not in output and len(error_lines(output)) <= 2, output  # rank 0: at most
    # "stopped by SIGTERM" (torchrun's), never the lost connection; torchrun then prints its own summary


def raises_on_rank_1(device=None):
    def fn(images, prompts):
        if os.environ.get("RANK") == "1":
            raise RuntimeError("the reward server is down")
        return images.mean(dim=(1, 2, 3))

    return fn


def test_saved_lora_loads_into_a_fresh_pipeline(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    dag.main(cli(sd_dir, tmp_path, "--epochs", "2", "--lr", "3e-2", "--algo", "ddpo"))

    def sample(pipe):
        return pipe("cat", num_inference_steps=3, generator=generator(0), output_type="pt").images

    pipe = StableDiffusionPipeline.from_pretrained(sd_dir)
    before = sample(pipe)
    pipe.load_lora_weights(tmp_path / "checkpoint-2")
    assert (sample(pipe) - before).abs().max() > 1e-4


# --------------------------------------------------------------------------------------------------------------------
# The guarantees: a kill loses at most one epoch; nothing non-finite is trained or saved; a mistake is one line;
# a resume refuses another run
# --------------------------------------------------------------------------------------------------------------------


def test_a_kill_loses_at_most_the_epoch_it_interrupts(sd_dir, tmp_path):
    """A run stopped three times, each in the middle of an epoch, by a scheduler's SIGTERM, by Ctrl-C (SIGINT) and by
    kill -9, each time with a half-written checkpoint and a torn log line left behind as a kill during a write would
    leave them: every --resume auto continues from the last completed epoch, the log readers skip the torn line, and
    the run ends with the numbers of a run that was never stopped."""
    (tmp_path / "eval.txt").write_text("cat\n")

    def argv(out, *extra):
        return cli(sd_dir, out, "--epochs", "5", "--save-every", "1", "--lr", "1e-2", "--reward-exp", "5",
                   "--eval-every", "2", "--eval-prompts", str(tmp_path / "eval.txt"), "--eval-samples", "2", *extra)

    dag.main(argv(tmp_path / "full"))  # the reference, never stopped (the suite runs on one thread, as run_script)
    run = tmp_path / "cut"
    for k, how in enumerate((signal.SIGTERM, signal.SIGINT, signal.SIGKILL), start=1):
        proc = run_script(argv(run, *(["--resume", "auto"] if k > 1 else [])))
        while not (run / f"checkpoint-{k}").is_dir():
            assert proc.poll() is None, "the run ended before it could be interrupted"
            time.sleep(0.02)
        time.sleep(0.2)  # into the next epoch
        proc.send_signal(how)
        output, _ = proc.communicate(timeout=60)
        newest = int(dag.checkpoints(run)[0].name.split("-")[1])
        if how == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL, output
        else:  # one line, no traceback, exit 128 + the signal's number
            assert proc.returncode == 128 + how and "Traceback" not in output, output
            assert error_lines(output) == [f"dag.py: error: stopped by {how.name}; checkpoint-{newest} is intact: "
                                           "continue with --resume auto"], output
        (run / f".tmp-checkpoint-{newest + 1}").mkdir()
        (run / f".tmp-checkpoint-{newest + 1}" / "training_state.pt").write_bytes(b"half")
        with open(run / "log.jsonl", "a") as f:
            f.write('{"epoch": 9, "reward_me')
        assert [r["epoch"] for r in dag.read_jsonl(run / "log.jsonl")] == list(range(newest))
    proc = run_script(argv(run, "--resume", "auto"))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and f"epoch {newest} of 5" in output, output
    expected, got = dag.read_jsonl(tmp_path / "full" / "log.jsonl"), dag.read_jsonl(run / "log.jsonl")
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected] == [0, 1, 2, 3, 4]
    for a, b in zip(got, expected):
        for key in ("reward_mean", "loss", "log_flow", "reward_exp"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["epoch"], key)
    evals, expected = (dag.read_jsonl(r / "eval.jsonl") for r in (run, tmp_path / "full"))
    assert [r["epoch"] for r in evals] == [r["epoch"] for r in expected] == [0, 2, 4, 5]
    assert [r["eval_reward_mean"] for r in evals] == pytest.approx([r["eval_reward_mean"] for r in expected], rel=1e-6)
    assert not list(run.glob(".tmp-*"))


KILL_IN_THE_WRITE = """
import os, signal, sys, torch
import dag
save = torch.save
def killed_midway(obj, path, *args, **kwargs):  # the LoRA file is written; the training state is cut short
    if isinstance(obj, dict) and obj.get("epoch") == 2:
        open(path, "wb").write(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)
    save(obj, path, *args, **kwargs)
torch.save = killed_midway
dag.main(sys.argv[1:])
"""


def test_a_kill_inside_the_checkpoint_write_leaves_the_previous_one(ddpm_dir, tmp_path):
    """kill -9 in the middle of writing checkpoint-2: no checkpoint-2 appears (it is written aside and renamed), the
    newest checkpoint is the complete checkpoint-1, and --resume auto continues from it."""
    argv = cli(ddpm_dir, tmp_path, "--epochs", "3", "--save-every", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE)}
    proc = subprocess.run([sys.executable, "-c", KILL_IN_THE_WRITE, *argv], env=env, cwd=HERE, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in dag.checkpoints(tmp_path)] == ["checkpoint-1"]
    dag.main([*argv, "--resume", "auto"])
    assert [r["epoch"] for r in dag.read_jsonl(tmp_path / "log.jsonl")] == [0, 1, 2]


def test_a_resume_refuses_another_run_and_may_extend_the_epochs(ddpm_dir, tmp_path, capsys):
    """A changed setting is refused in one line that lists it, also for another run's checkpoint given to a fresh
    --out; --epochs may change, and beta then follows the new schedule from the resumed epoch on."""
    run = tmp_path / "run"
    dag.main(cli(ddpm_dir, run, "--epochs", "2", "--save-every", "1"))
    first = dag.read_jsonl(run / "log.jsonl")
    for extra, listed in ((["--reward", "test_dag:brightness"], "reward 'jpeg_compressibility' -> 'test_dag:brightness'"),
                          (["--lr", "1e-3"], "lr 0.0003 -> 0.001"), (["--timestep-fraction", "0.5"], "timestep_fraction")):
        with pytest.raises(SystemExit) as exit_info:
            dag.main(cli(ddpm_dir, run, "--epochs", "2", *extra, "--resume", "auto"))
        err = error_lines(capsys.readouterr().err)
        assert exit_info.value.code == 2 and len(err) == 1 and listed in err[0] and "another run" in err[0], err
    other = tmp_path / "other"  # another run's checkpoint, resumed into a fresh --out with other settings
    with pytest.raises(SystemExit):
        dag.main(cli(ddpm_dir, other, "--epochs", "2", "--algo", "ddpo", "--resume", str(run / "checkpoint-1")))
    assert "algo 'db' -> 'ddpo'" in capsys.readouterr().err
    dag.main(cli(ddpm_dir, other, "--epochs", "2", "--resume", str(run / "checkpoint-1")))  # the same run: continues
    assert [r["loss"] for r in dag.read_jsonl(other / "log.jsonl")] == pytest.approx([first[1]["loss"]], rel=1e-6)

    dag.main(cli(ddpm_dir, run, "--epochs", "4", "--resume", "auto"))  # extended: beta = 100 * e / 2 from epoch 2
    log = dag.read_jsonl(run / "log.jsonl")
    assert [r["epoch"] for r in log] == [0, 1, 2, 3] and [r["reward_exp"] for r in log] == [0, 100, 100, 100]
    assert [r["loss"] for r in log[:2]] == [r["loss"] for r in first]


COUNTDOWN = {"calls": None}  # countdown_brightness raises once this many calls have been made


def countdown_brightness(device=None):
    def fn(images, prompts):
        if COUNTDOWN["calls"] is not None:
            COUNTDOWN["calls"] -= 1
            if COUNTDOWN["calls"] < 0:
                raise RuntimeError("the reward server is down")
        return images.mean(dim=(1, 2, 3))

    return fn


def test_a_resume_keeps_what_the_run_kept_and_never_returns_to_an_abandoned_branch(ddpm_dir, tmp_path, capsys):
    """A resume with --save-every back at its default deletes none of the kept checkpoints 1-3 (the rotation deletes
    only the checkpoint this process wrote before, if not kept), and a user's copies are neither deleted nor read as
    epochs. A resume from checkpoint-1 sets the later checkpoints and their records aside (OUT/abandoned-*), so that
    after a crash --resume auto continues this branch, not the abandoned one."""
    import shutil

    run, COUNTDOWN["calls"] = tmp_path / "run", None
    argv = cli(ddpm_dir, run, "--reward", "test_dag:countdown_brightness", "--eval-samples", "1")  # 1: no evaluations
    dag.main([*argv, "--epochs", "3", "--save-every", "1"])
    for name in ("checkpoint-2-copy1", "checkpoint-2.bak1"):
        shutil.copytree(run / "checkpoint-2", run / name)
    dag.main([*argv, "--epochs", "5", "--resume", "auto"])
    assert [p.name for p in dag.checkpoints(run)] == [f"checkpoint-{e}" for e in (5, 3, 2, 1)]  # 4: rotated
    assert (run / "checkpoint-2-copy1").is_dir() and (run / "checkpoint-2.bak1").is_dir()
    COUNTDOWN["calls"] = 9  # one epoch of rewards (the final images, 4 states x 2 chunks), then a crash in the next
    with pytest.raises(SystemExit) as exit_info:
        dag.main([*argv, "--epochs", "6", "--resume", str(run / "checkpoint-1")])
    err = error_lines(capsys.readouterr().err)
    assert exit_info.value.code == 1 and len(err) == 1 and "RuntimeError: the reward server is down" in err[0], err
    assert "--resume" not in err[0] and (run / "traceback-rank0.txt").is_file()  # no resume fixes a failing reward
    COUNTDOWN["calls"] = None
    (aside,) = run.glob("abandoned-*")
    assert sorted(p.name for p in aside.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3", "checkpoint-5"]
    assert [r["epoch"] for r in dag.read_jsonl(aside / "log.jsonl")] == [1, 2, 3, 4]
    dag.main([*argv, "--epochs", "6", "--resume", "auto"])
    assert "epoch 2 of 6" in capsys.readouterr().out
    assert [r["epoch"] for r in dag.read_jsonl(run / "log.jsonl")] == [0, 1, 2, 3, 4, 5]


def test_a_resume_refuses_replaced_weights_or_edited_prompts_but_not_grad_checkpointing(sd_dir, tmp_path, capsys):
    """The settings stored in a checkpoint identify the base weights (a fingerprint of their values) and the prompts
    (their text), not only the paths; a setting that does not change the numbers does not block a resume."""
    import shutil

    from diffusers import UNet2DConditionModel

    model, prompts, run = tmp_path / "model", tmp_path / "prompts.txt", tmp_path / "run"
    shutil.copytree(sd_dir, model)
    prompts.write_text("cat\ndog\n")
    argv = cli(model, run, "--prompts", str(prompts), "--no-anneal")
    dag.main([*argv, "--epochs", "1"])

    def refused(listed, *extra):
        with pytest.raises(SystemExit) as exit_info:
            dag.main([*argv, "--epochs", "2", "--resume", "auto", *extra])
        err = error_lines(capsys.readouterr().err)
        assert exit_info.value.code == 2 and len(err) == 1 and listed in err[0], err

    prompts.write_text("cat\nfox\n")  # edited between stop and resume
    refused("another run (prompts_sha1")
    prompts.write_text("cat\ndog\n")
    shutil.copytree(model / "unet", tmp_path / "unet")
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    unet.save_pretrained(model / "unet")  # retrained, in place
    refused("another run (weights_sha1")
    shutil.rmtree(model / "unet")
    shutil.copytree(tmp_path / "unet", model / "unet")
    dag.main([*argv, "--epochs", "2", "--resume", "auto", "--grad-checkpointing"])
    assert [r["epoch"] for r in dag.read_jsonl(run / "log.jsonl")] == [0, 1]
    with pytest.raises(SystemExit) as exit_info:
        dag.main([*argv, "--epochs", "1", "--resume", "auto"])
    err = error_lines(capsys.readouterr().err)
    assert exit_info.value.code == 2 and err == ["dag.py: error: --resume: checkpoint-2 is at epoch 2, past --epochs 1"]


def test_a_full_disk_during_evaluation_is_one_line_and_leaves_no_partial_image(ddpm_dir, tmp_path):
    """A file-size limit (a full disk, as the grid's PNG meets it): one line, exit 1, no PNG of 0 bytes or in part."""

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4000, resource.RLIM_INFINITY))

    proc = run_script(cli(ddpm_dir, tmp_path, "--epochs", "2", "--eval-every", "1", "--eval-samples", "2"),
                      preexec=small_files)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and len(error_lines(output)) == 1 and "Traceback" not in output, output
    assert "File too large" in error_lines(output)[0], output
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob(".tmp-*"))


def test_a_run_directory_in_use_is_refused(ddpm_dir, tmp_path, capsys):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "w") as lock:  # what a running dag.py holds
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as exit_info:
            dag.main(cli(ddpm_dir, tmp_path, "--epochs", "2"))
    assert exit_info.value.code == 2 and error_lines(capsys.readouterr().err) == [
        f"dag.py: error: {tmp_path} is in use by another run"]
    assert not (tmp_path / "log.jsonl").exists()


def test_a_failed_checkpoint_write_is_one_line_and_the_last_checkpoint_stays(ddpm_dir, tmp_path):
    """A write that really fails (a file-size limit, as a full disk would: torch.save raises RuntimeError there, not
    OSError): one line, exit 1, no temporary directory left, the previous checkpoint intact and resumable."""
    run = tmp_path / "run"
    dag.main(cli(ddpm_dir, run, "--epochs", "2", "--save-every", "1", "--eval-every", "0"))
    shutil_state = (run / "checkpoint-1" / "training_state.pt").read_bytes()

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

    import shutil

    shutil.rmtree(run / "checkpoint-2")
    proc = run_script(cli(ddpm_dir, run, "--epochs", "2", "--save-every", "1", "--resume", "auto"),
                      preexec=small_files)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and len(error_lines(output)) == 1, output
    assert "cannot write checkpoint-2" in output and "the newest intact checkpoint: " in output, output
    assert "Traceback" not in output and not list(run.glob(".tmp-*")) and not (run / "checkpoint-2").exists()
    assert (run / "checkpoint-1" / "training_state.pt").read_bytes() == shutil_state
    dag.main(cli(ddpm_dir, run, "--epochs", "2", "--save-every", "1", "--resume", "auto"))  # without the limit
    assert [p.name for p in dag.checkpoints(run)] == ["checkpoint-2", "checkpoint-1"]


def reward_huge(device=None):  # finite, but reward_exp * r overflows float32: the loss and the gradients are NaN
    return lambda images, prompts: torch.full((len(images),), 3e38)


def test_non_finite_gradients_never_reach_the_weights(ddpm_dir, tmp_path, capsys):
    """A loss that is NaN: every such optimizer step is skipped and counted, the checkpoint holds the initial (finite)
    weights, and the run stops with one line after 3 skipped steps in a row (2 per epoch here)."""
    with pytest.raises(SystemExit) as exit_info:
        dag.main(cli(ddpm_dir, tmp_path, "--reward", "test_dag:reward_huge", "--no-anneal", "--epochs", "3"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and len(error_lines(err)) == 1, err
    assert "3 optimizer steps in a row had a non-finite gradient" in err and "Traceback" not in err
    assert [r["skipped_steps"] for r in dag.read_jsonl(tmp_path / "log.jsonl")] == [2]
    state = torch.load(tmp_path / "checkpoint-1" / "training_state.pt", weights_only=True)
    _, m = load(ddpm_dir)  # the same seed: the same initial LoRA and flow
    initial = dag.get_peft_model_state_dict(m.unet)
    assert all(torch.equal(state["lora"][k], initial[k]) for k in initial)
    assert all(torch.equal(v, m.flow.state_dict()[k]) for k, v in state["flow"].items())


NOT_A_FACTORY = 3


def reward_fn_without_factory(images, prompts):  # the closure given where its factory belongs
    return images.mean(dim=(1, 2, 3))


def factory_of_a_number(device=None):
    return 0.5


def reward_one_too_many(device=None):
    return lambda images, prompts: torch.zeros(len(images) + 1)


def reward_column(device=None):
    return lambda images, prompts: images.mean(dim=(1, 2, 3))[:, None]


def reward_list(device=None):
    return lambda images, prompts: [0.5] * len(images)


def reward_int(device=None):
    return lambda images, prompts: torch.zeros(len(images), dtype=torch.long)


def reward_nan(device=None):  # one image's score is NaN
    return lambda images, prompts: images.mean(dim=(1, 2, 3)).index_fill(0, torch.tensor([0]), float("nan"))


def reward_on_meta(device=None):  # scores on another device than the images'
    return lambda images, prompts: torch.zeros(len(images), device="meta")


def detached_brightness(device=None):
    return lambda images, prompts: images.mean(dim=(1, 2, 3)).detach()


@pytest.mark.parametrize("extra, message", [
    (["--trajectories", "6", "--train-batch", "4"], "is not a multiple of --train-batch 4 x --grad-accum 1"),
    (["--algo", "kl", "--train-batch", "1"], "--train-batch >= 2"),
    (["--epochs", "1"], "--epochs 1 with annealing trains at beta = 0 only"),
    (["--reward", "nope"], "unknown reward"),
    (["--reward", "test_dag:nope"], "cannot import the factory"),
    (["--eta", "0"], "--eta must be in (0, 1]"),
    (["--guidance-scale", "0.5"], "--guidance-scale must be finite, >= 1"),
    (["--timestep-fraction", "0"], "--timestep-fraction must be in (0, 1]"),
    (["--prompts", "EMPTY"], "holds no prompt"),
    (["--prompts", "/does/not/exist.txt"], "neither a prompt set"),
    (["--steps", "1000"], "at most 999 DDIM steps"),
    (["--lora-rank", "0"], "--lora-rank must be >= 1"),
    (["--lr", "nan"], "--lr must be finite, > 0"),
    (["--reward-exp", "-1"], "--reward-exp must be finite, >= 0"),
    (["--flow-channels", "48", "64"], "each a multiple of 32"),
    (["--flow-channels", "32"], "--flow-channels needs at least 2 widths"),
    (["--lr", "0"], "--lr must be finite, > 0"),
    (["--flow-lr", "0"], "--flow-lr must be finite, > 0"),
    (["--clip-range", "0"], "--clip-range must be finite, > 0"),
    (["--train-batch", "0"], "--train-batch must be >= 1"),
    (["--grad-accum", "0"], "--grad-accum must be >= 1"),
    (["--eval-prompts", "simple_animals"], "are for a text-to-image model"),
    (["--reward", "test_dag:reward_on_meta"], "returned a torch.float32 tensor of shape (4,) on meta for 4 images"),
    (["--algo", "alignprop"], "--algo alignprop needs a differentiable reward"),
    (["--algo", "alignprop", "--reward", "test_dag:detached_brightness"], "returned no gradient"),
    (["--out", "AFILE"], "is a file, or holds a run"),
    (["--out", "/dev/null/run"], "is not writable"),
    (["--model", "no-such-org/no-such-model"], "hf download no-such-org/no-such-model"),
    (["--reward", "test_dag:NOT_A_FACTORY"], "is a int, not a factory"),
    (["--reward", "test_dag:reward_fn_without_factory"], "is not a factory f(device=...)"),
    (["--reward", "test_dag:factory_of_a_number"], "returned a float, not fn(images, prompts)"),
    (["--reward", "test_dag:reward_one_too_many"], "of shape (5,) on cpu with 0 non-finite score(s) for 4 images"),
    (["--reward", "test_dag:reward_column"], "of shape (4, 1)"),
    (["--reward", "test_dag:reward_list"], "returned a list for 4 images"),
    (["--reward", "test_dag:reward_int"], "returned a torch.int64 tensor"),
    (["--reward", "test_dag:reward_nan"], "with 1 non-finite score(s) for 4 images"),
])
def test_user_mistakes_exit_2_with_one_line(extra, message, request, tmp_path, capsys):
    """Each mistake: exit status 2 and one error line, no traceback, no checkpoint."""
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "afile").write_text("")
    extra = [{"EMPTY": str(tmp_path / "empty.txt"), "AFILE": str(tmp_path / "afile")}.get(e, e) for e in extra]
    model = request.getfixturevalue("sd_dir" if "--prompts" in extra else "ddpm_dir")  # prompts: a text model's
    with pytest.raises(SystemExit) as exit_info:
        dag.main([*cli(model, tmp_path / "run", "--epochs", "2"), *extra])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(error_lines(err)) == 1 and message in error_lines(err)[0], err
    assert "Traceback" not in err and not list(tmp_path.glob("run/checkpoint-*"))


def test_a_broken_model_directory_is_one_line(ddpm_dir, tmp_path, capsys):
    import shutil

    for name, damage in (("prediction_type 'sample' is not supported", "sample"),
                         ("cannot load the weights of", "truncate"), ("cannot read the configs of", "no index")):
        model = tmp_path / damage.replace(" ", "-")
        shutil.copytree(ddpm_dir, model)
        if damage == "sample":
            config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
            (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, "prediction_type": "sample"}))
        elif damage == "truncate":
            weights = model / "unet" / "diffusion_pytorch_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:1000])  # an interrupted download
        else:
            (model / "model_index.json").unlink()
        with pytest.raises(SystemExit) as exit_info:
            dag.main(cli(model, tmp_path / f"run-{model.name}"))
        err = error_lines(capsys.readouterr().err)
        assert exit_info.value.code == 2 and len(err) == 1 and name in err[0], err


def test_a_set_that_cannot_be_fetched_is_one_line(sd_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAG_CACHE", str(tmp_path))
    argv = cli(sd_dir, tmp_path / "run")
    argv[argv.index("--prompts") : argv.index("--prompts") + 2] = []  # the reward's own set: DrawBench, not cached
    with pytest.raises(SystemExit) as exit_info:
        dag.main([*argv, "--reward", "imagereward"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "DrawBench is not cached" in err and len(error_lines(err)) == 1


# --------------------------------------------------------------------------------------------------------------------
# Baselines: DDPO and AlignProp
# --------------------------------------------------------------------------------------------------------------------


def test_ddpo_per_prompt_advantages_match_a_brute_force_tracker():
    """Three batches through the tracker vs a plain re-computation from the full reward history."""
    g, history, seen = generator(40), {}, {}
    for batch in range(3):
        prompt_ids = torch.randint(3, (6,), generator=g)
        scores = torch.randn(6, generator=g, dtype=torch.float64)
        got = baselines.per_prompt_advantages(scores, prompt_ids, history, min_count=4, buffer_size=5)
        for pid, r in zip(prompt_ids.tolist(), scores.tolist()):
            seen.setdefault(pid, []).append(r)
        for i, (pid, r) in enumerate(zip(prompt_ids.tolist(), scores.tolist())):
            ref = seen[pid][-5:] if len(seen[pid]) >= 4 else scores.tolist()  # the prompt's last 5, else the batch
            mean = sum(ref) / len(ref)
            std = math.sqrt(sum((x - mean) ** 2 for x in ref) / len(ref))
            assert got[i].item() == pytest.approx((r - mean) / (std + 1e-6), rel=1e-9), (batch, i)
    assert all(len(v) <= 5 for v in history.values()) and any(len(v) >= 4 for v in history.values())


def test_ddpo_step_favours_trajectories_with_positive_advantage_and_resumes_its_history(ddpm_dir, tmp_path):
    """One DDPO step on stored trajectories raises log p_theta of the trajectories with positive advantage and lowers
    the others: sum_i A_i * delta log p_i > 0 (fails if the sign of the advantage flips). End to end, a resumed DDPO
    run restores the per-prompt history and continues to the uninterrupted run's numbers."""
    args, m = load(ddpm_dir, "--algo", "ddpo", "--trajectories", "8", "--train-batch", "8")
    ro = dag.rollout(m, brightness(), [""] * 8, args, generator(42))
    advantages = baselines.per_prompt_advantages(ro.reward, torch.zeros(8, dtype=torch.long), {}, 16, 16)
    batches = [step_batch(ro, j) for j in range(args.steps)]
    for b in batches:
        baselines.ddpo_loss(m, b, advantages[b.rows], args)[0].mean().backward()
    with torch.no_grad():
        for p in m.lora_params:
            p -= 1e-3 * p.grad / (p.grad.norm() + 1e-12)
        change = sum(dag.policy_logprob(m, b, args)[0] - b.log_pf_rollout for b in batches)
    assert change.abs().max() > 0 and (advantages * change).sum() > 0

    dag.main(cli(ddpm_dir, tmp_path / "full", "--algo", "ddpo", "--epochs", "2"))
    dag.main(cli(ddpm_dir, tmp_path / "cut", "--algo", "ddpo", "--epochs", "1"))
    dag.main(cli(ddpm_dir, tmp_path / "cut", "--algo", "ddpo", "--epochs", "2", "--resume", "auto"))
    full, cut = (dag.read_jsonl(tmp_path / name / "log.jsonl") for name in ("full", "cut"))
    assert cut[1]["loss"] == pytest.approx(full[1]["loss"], rel=1e-6, abs=1e-12)
    states = [torch.load(tmp_path / n / "checkpoint-2" / "training_state.pt", weights_only=True) for n in ("full", "cut")]
    assert states[0]["history"] == states[1]["history"] and len(states[0]["history"][0]) == 8 and states[0]["flow"] is None


def test_alignprop_gradient_flows_through_the_last_k_steps_only(ddpm_dir):
    """K = 1: the LoRA gradient equals that of a hand-built sampler whose first N - 1 steps run without grad, and the
    UNet runs backward once per sample; K = 2 changes it (the earlier step then contributes)."""
    backwards = []

    def grads(args, m):
        for p in m.lora_params:
            p.grad = None
        backwards.clear()
        x_T = torch.randn((2, *m.latent_shape), generator=generator(41))
        x = dag.denoise(m, [""] * 2, x_T, args, generator=generator(41), grad_steps=args.truncation)
        (-brightness()(dag.decode(m, x, 2), None)).mean().backward()
        return [p.grad.clone() for p in m.lora_params]

    args, m = load(ddpm_dir, "--algo", "alignprop", "--reward", "test_dag:brightness", "--truncation", "1")

    def count_backward(module, inputs, out):  # the UNet's output receives a gradient: one backward of len rows
        if out.sample.requires_grad:
            out.sample.register_hook(lambda grad: backwards.append(len(grad)))

    m.unet.register_forward_hook(count_backward)
    k1 = grads(args, m)
    assert backwards == [2]
    g = generator(41)
    x = torch.randn((2, *m.latent_shape), generator=generator(41))
    for i, t_scalar in enumerate(m.scheduler.timesteps):
        t = torch.full((2,), int(t_scalar), dtype=torch.long)
        with torch.set_grad_enabled(i == args.steps - 1):
            eps, _ = dag.predict_eps(m, x, t, None, None)
            x, _ = dag.ddim_step_logprob(m.scheduler, eps, t, x, args.eta, generator=g)
    for p in m.lora_params:
        p.grad = None
    (-brightness()(dag.decode(m, x, 16), [""] * 2)).mean().backward()
    for a, b in zip(k1, [p.grad for p in m.lora_params]):
        torch.testing.assert_close(a, b)
    args.truncation = 2
    k2 = grads(args, m)
    assert backwards == [2, 2] and any((a - b).abs().max() > 1e-9 for a, b in zip(k1, k2))


def test_alignprop_raises_a_pixel_reward_on_fixed_eval_noise(ddpm_dir, tmp_path):
    """A few seeded steps on the small CIFAR-architecture DDPM with the mean-brightness reward: the fixed-noise
    evaluation reward rises (fails if the loss sign flips)."""
    dag.main(cli(ddpm_dir, tmp_path, "--algo", "alignprop", "--reward", "test_dag:brightness", "--trajectories", "16",
                 "--train-batch", "8", "--epochs", "4", "--lr", "1e-2", "--eval-every", "2", "--eval-samples", "8"))
    evals = [r["eval_reward_mean"] for r in dag.read_jsonl(tmp_path / "eval.jsonl")]
    assert len(evals) == 3 and evals[0] < evals[1] < evals[2], evals


# --------------------------------------------------------------------------------------------------------------------
# Evaluation, diversity, gradient checkpointing
# --------------------------------------------------------------------------------------------------------------------


def test_evaluation_noise_is_fixed_and_the_images_follow_the_policy(sd_dir):
    args, m = load(sd_dir, "--eval-samples", "3")
    fn, prompts = rewards.checked(dark_reward, "dark"), ["cat", "a fox"]
    first, (images, labels, scores) = dag.evaluate(m, fn, prompts, args, 0, 1)
    second, (images_again, _, scores_again) = dag.evaluate(m, fn, prompts, args, 0, 1)
    assert torch.equal(images, images_again) and scores == scores_again and first == second  # bitwise on CPU
    assert labels == ["seed 0: cat", "seed 1: cat", "seed 2: cat", "seed 0: a fox", "seed 1: a fox", "seed 2: a fox"]
    noise = torch.randn((args.steps + 1, *m.latent_shape), generator=generator(2))[None]  # seed 2's noise
    direct = dag.decode(m, dag.denoise(m, ["a fox"], noise[:, 0], args, noise=noise[:, 1:]), 1)
    assert torch.equal((direct * 255).round() / 255, images[5:6])  # the sampler alone reproduces the grid's image
    assert not torch.equal(images[3], images[4])  # different seeds, different images
    with torch.no_grad():
        m.lora_params[1].add_(0.3)  # a changed policy changes the evaluation images, not the noise
    _, (changed, _, _) = dag.evaluate(m, fn, prompts, args, 0, 1)
    assert not torch.equal(changed, images)


def test_diversity_is_zero_for_identical_samples_and_grows_with_spread():
    assert dag.diversity(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), 2) == 2.0  # one prompt, two samples at distance 2
    base = torch.randn(3, 1, 8, generator=generator(31))
    assert dag.diversity(base.expand(3, 4, 8).reshape(12, 8), 4) == 0
    noise = torch.randn(3, 4, 8, generator=generator(32))
    spread = [dag.diversity((base + s * noise).reshape(12, 8), 4) for s in (0.1, 0.5, 2.0)]
    assert 0 < spread[0] < spread[1] < spread[2]
    assert spread[1] == pytest.approx(5 * spread[0])  # a distance: scales with the spread


def test_grad_checkpointing_gives_the_same_gradients(sd_dir, monkeypatch):
    import torch.utils.checkpoint

    checkpoint, calls, runs = torch.utils.checkpoint.checkpoint, [], []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    for extra in ([], ["--grad-checkpointing"]):
        args, m = load(sd_dir, *extra)
        ro = scored_rollout(m, ["cat", "dog", "a fox", "bee"], args, 30)
        calls.clear()
        saved = []  # activations kept for the backward, in elements
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
            loss, _ = dag.dag_loss(m, ro.transitions(torch.arange(2), torch.ones(2, dtype=torch.long)), 5.0, args)
        loss.mean().backward()
        runs.append((len(calls), sum(saved), [p.grad.clone() for p in m.lora_params]))
    (plain_calls, plain_saved, plain), (checkpointed_calls, checkpointed_saved, checkpointed) = runs
    assert plain_calls == 0 and checkpointed_calls > 0 and checkpointed_saved < plain_saved  # no-grad rollout: none
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)
# --------------------------------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------------------------------


def test_jpeg_rewards_match_an_independent_pil_computation():
    import io

    import numpy as np
    from PIL import Image

    images = torch.rand(3, 3, 32, 32, generator=generator(15))
    images[0] = 0.5  # a flat image compresses far better than noise
    sizes = []
    for img in images:
        array = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, "JPEG", quality=95)
        sizes.append(len(buffer.getvalue()) / 1000)
    got = rewards.load("jpeg_incompressibility")(images, [""] * 3)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, torch.tensor(sizes))
    torch.testing.assert_close(rewards.load("jpeg_compressibility")(images, [""] * 3), -torch.tensor(sizes))
    assert got[0] < got[1]


def test_reward_plugin_and_unknown_name():
    fn = rewards.load("test_dag:brightness")
    assert fn(torch.full((2, 3, 4, 4), 0.25), ["", ""]).tolist() == [0.25, 0.25]
    with pytest.raises(ValueError, match="unknown reward"):
        rewards.load("nope")
    for typo in ("test_dag:nope", "no_such_module:fn"):
        with pytest.raises(ValueError, match="cannot import the factory"):
            rewards.load(typo)


@pytest.mark.skipif(not (SHARED_ASSETS / rewards.AESTHETIC_HEAD_FILE).is_file(), reason="real LAION head not in ../shared/assets")
def test_aesthetic_reward_device_preprocessing_matches_pil(tmp_path):
    """The real LAION head on a random tiny CLIP (the head's 768-d input is all it needs): our tensor preprocessing
    gives the score that transformers' PIL image processor gives, within 0.02 on SD-sized (downsampled) images."""
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=224, patch_size=32, projection_dim=768)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    fn = rewards.aesthetic("cpu", clip_model=str(tmp_path / "clip"), head_path=str(SHARED_ASSETS / rewards.AESTHETIC_HEAD_FILE))
    smooth = torch.nn.functional.interpolate(torch.rand(3, 3, 16, 16, generator=generator(16)), size=(512, 384), mode="bilinear")
    images = torch.from_numpy(rewards.to_uint8(smooth)).permute(0, 3, 1, 2).float() / 255  # what PIL will see
    images.requires_grad_(True)
    scores = fn(images, [""] * 3)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert fn.embed(images).shape == (3, 768)
    scores.sum().backward()
    assert images.grad.abs().sum() > 0  # differentiable (AlignProp-style use)

    processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                   image_mean=list(rewards.CLIP_MEAN), image_std=list(rewards.CLIP_STD))
    pil = processor(images=[Image.fromarray(a) for a in rewards.to_uint8(smooth)], return_tensors="pt").pixel_values
    ours = rewards.clip_preprocess(images.detach())
    assert (ours - pil).abs().mean() < 0.01
    clip = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip")
    head = rewards.MLPHead()
    head.load_state_dict(torch.load(SHARED_ASSETS / rewards.AESTHETIC_HEAD_FILE, map_location="cpu", weights_only=True))
    with torch.no_grad():
        emb = clip(pixel_values=pil).image_embeds
        reference = head(emb / emb.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(scores.detach(), reference, atol=0.02, rtol=0)


def randn_state(shapes, seed):
    """Random tensors of the given shapes; LayerNorm weights around 1."""
    g, state = generator(seed), {}
    for key, shape in shapes.items():
        state[key] = torch.randn(shape, generator=g) * (0.02 if len(shape) > 1 else 0.1)
        if re.search(r"(norm\d?|ln_\w+)\.weight$", key):
            state[key] += 1.0
    return state


def ref_attention(x, w_qkv, b_qkv, w_out, b_out, heads, causal=False):
    """Multi-head self-attention from a packed (3D, D) projection, as timm's ViT and open_clip store it."""
    B, T, D = x.shape
    q, k, v = (x @ w_qkv.T + b_qkv).view(B, T, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // heads)
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D) @ w_out.T + b_out


def ref_vit(s, pixels, layers, heads, eps, names):
    """A pre-norm ViT written from an original checkpoint's keys (BLIP's timm ViT or open_clip's VisionTransformer);
    `names` maps each part to its key. Returns the final LayerNorm of every token."""
    F = torch.nn.functional
    ln = lambda x, key: F.layer_norm(x, x.shape[-1:], s[f"{key}.weight"], s[f"{key}.bias"], eps)
    linear = lambda x, key: x @ s[f"{key}.weight"].T + s[f"{key}.bias"]
    conv = s[names["conv"] + ".weight"]
    x = F.conv2d(pixels, conv, s.get(names["conv"] + ".bias"), stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    cls = s[names["cls"]].reshape(1, 1, -1).expand(len(x), 1, -1)
    x = torch.cat([cls, x], 1) + s[names["pos"]].reshape(1, x.shape[1] + 1, -1)
    if "pre" in names:
        x = ln(x, names["pre"])
    for i in range(layers):
        b = f"{names['blocks']}.{i}."
        qkv = (s[b + names["qkv"] + "weight"], s[b + names["qkv"] + "bias"])
        x = x + ref_attention(ln(x, b + names["n1"]), *qkv, s[b + names["out"] + ".weight"], s[b + names["out"] + ".bias"], heads)
        x = x + linear(F.gelu(linear(ln(x, b + names["n2"]), b + names["fc1"])), b + names["fc2"])
    return ln(x, names["post"])


def test_imagereward_checkpoint_layout_loads_into_transformers_blip(tmp_path):
    """A random ImageReward.pt in the published key layout (BLIP's timm ViT + med.py BERT + MLP) loads strictly into
    transformers' BLIP classes, and the score equals a reference written from the original keys: a timm ViT, the
    [CLS] state of the BERT that cross-attends to its tokens, the MLP, then (r - mean) / std."""
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig

    D, T, layers, heads = 32, 24, 2, 4
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz"]
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("\n".join(tokens) + "\n")
    BertTokenizer(str(tmp_path / "tok" / "vocab.txt")).save_pretrained(tmp_path / "tok")
    vision = BlipVisionConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=heads,
                              image_size=32, patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu")
    text = BlipTextConfig(vocab_size=len(tokens), hidden_size=T, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=40, encoder_hidden_size=D)
    v = "blip.visual_encoder."
    shapes = {v + "cls_token": (1, 1, D), v + "pos_embed": (1, 17, D), v + "patch_embed.proj.weight": (D, 3, 8, 8),
              v + "patch_embed.proj.bias": (D,), v + "norm.weight": (D,), v + "norm.bias": (D,)}
    for i in range(layers):
        b = f"{v}blocks.{i}."
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D), b + "attn.qkv.bias": (3 * D,),
                       b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,), b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                       b + "mlp.fc1.weight": (64, D), b + "mlp.fc1.bias": (64,), b + "mlp.fc2.weight": (D, 64), b + "mlp.fc2.bias": (D,)})
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((T, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        shapes.update({f"mlp.layers.{i}.weight": (n_out, n_in), f"mlp.layers.{i}.bias": (n_out,)})
    state = randn_state(shapes, 20)
    torch.manual_seed(21)
    bert = BlipTextModel(text, add_pooling_layer=False).eval()  # med.py and transformers share these key names
    state.update({f"blip.text_encoder.{k}": val for k, val in bert.state_dict().items()})
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]  # persistent in med.py: dropped
    state["blip.text_decoder.cls.predictions.bias"] = torch.zeros(3)  # not used for scoring: dropped
    torch.save(state, tmp_path / "ImageReward.pt")

    fn = rewards.imagereward("cpu", checkpoint=str(tmp_path / "ImageReward.pt"), tokenizer=str(tmp_path / "tok"), configs=(vision, text))
    images = torch.rand(3, 3, 32, 32, generator=generator(22), requires_grad=True)
    prompts = ["a cat", "dog", "a very long prompt that the thirty five token limit cuts off here and there and everywhere"]
    scores = fn(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and scores.device == images.device
    scores.sum().backward()
    assert images.grad.abs().sum() > 0  # differentiable

    names = dict(conv=v + "patch_embed.proj", cls=v + "cls_token", pos=v + "pos_embed", blocks=v + "blocks", qkv="attn.qkv.",
                 out="attn.proj", n1="norm1", n2="norm2", fc1="mlp.fc1", fc2="mlp.fc2", post=v + "norm")
    with torch.no_grad():
        image_tokens = ref_vit(state, rewards.clip_preprocess(images, 32), layers, heads, 1e-6, names)
        ids = BertTokenizer.from_pretrained(tmp_path / "tok")(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        cls = bert(**ids, encoder_hidden_states=image_tokens, encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long)).last_hidden_state[:, 0]
        for i in (0, 2, 4, 6, 7):
            cls = cls @ state[f"mlp.layers.{i}.weight"].T + state[f"mlp.layers.{i}.bias"]
        reference = (cls.squeeze(-1) - rewards.IMAGEREWARD_MEAN) / rewards.IMAGEREWARD_STD
    torch.testing.assert_close(scores.detach(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fn.embed(images).detach(), image_tokens[:, 0], atol=1e-5, rtol=1e-5)  # for diversity


def open_clip_state(D, W, P, heads, layers, vocab, seed):
    """A random state dict in open_clip's CLIP layout: text width W, vision width D, projection P, 16-px images."""
    shapes = {"token_embedding.weight": (vocab, W), "positional_embedding": (77, W), "ln_final.weight": (W,), "ln_final.bias": (W,),
              "text_projection": (W, P), "visual.class_embedding": (D,), "visual.positional_embedding": (5, D),
              "visual.conv1.weight": (D, 3, 8, 8), "visual.ln_pre.weight": (D,), "visual.ln_pre.bias": (D,),
              "visual.ln_post.weight": (D,), "visual.ln_post.bias": (D,), "visual.proj": (D, P)}
    for prefix, width in (("transformer.", W), ("visual.transformer.", D)):
        for i in range(layers):
            b = f"{prefix}resblocks.{i}."
            shapes.update({b + "ln_1.weight": (width,), b + "ln_1.bias": (width,), b + "attn.in_proj_weight": (3 * width, width),
                           b + "attn.in_proj_bias": (3 * width,), b + "attn.out_proj.weight": (width, width), b + "attn.out_proj.bias": (width,),
                           b + "ln_2.weight": (width,), b + "ln_2.bias": (width,), b + "mlp.c_fc.weight": (4 * width, width),
                           b + "mlp.c_fc.bias": (4 * width,), b + "mlp.c_proj.weight": (width, 4 * width), b + "mlp.c_proj.bias": (width,)})
    return {**randn_state(shapes, seed), "logit_scale": torch.tensor(math.log(100.0))}


def test_hpsv2_open_clip_checkpoint_matches_a_reference_forward(tmp_path):
    """A random HPSv2-style checkpoint ({'state_dict': open_clip layout, fp16}) loads strictly into transformers'
    CLIPModel, and the score equals open_clip's forward written from the original keys: packed qkv, causal text
    attention pooled at argmax(ids), x @ proj projections, then the cosine similarity."""
    from transformers import CLIPConfig

    D, W, P, heads, layers = 32, 24, 16, 4, 2
    tokenizer = toy_clip_tokenizer(tmp_path / "tok")
    state = open_clip_state(D, W, P, heads, layers, len(tokenizer), 23)
    torch.save({"epoch": 1, "state_dict": {k: v.half() for k, v in state.items()}}, tmp_path / "HPS.pt")
    eos = len(tokenizer) - 1
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=W, intermediate_size=4 * W, num_hidden_layers=layers,
                                         num_attention_heads=heads, max_position_embeddings=77, hidden_act="gelu",
                                         bos_token_id=0, eos_token_id=eos, pad_token_id=eos),
                        vision_config=dict(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=layers, num_attention_heads=heads,
                                           image_size=16, patch_size=8, hidden_act="gelu"), projection_dim=P)
    fn = rewards.hpsv2("cpu", checkpoint=str(tmp_path / "HPS.pt"), tokenizer=str(tmp_path / "tok"), config=config)
    images = torch.rand(3, 3, 24, 16, generator=generator(24), requires_grad=True)
    prompts = ["a cat", "dog", "zebra on a hill"]
    scores = fn(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and (scores.abs() <= 1).all()
    scores.sum().backward()
    assert images.grad.abs().sum() > 0  # differentiable

    s = {k: v.half().float() for k, v in state.items()}
    names = dict(conv="visual.conv1", cls="visual.class_embedding", pos="visual.positional_embedding", pre="visual.ln_pre",
                 blocks="visual.transformer.resblocks", qkv="attn.in_proj_", out="attn.out_proj", n1="ln_1", n2="ln_2",
                 fc1="mlp.c_fc", fc2="mlp.c_proj", post="visual.ln_post")
    F = torch.nn.functional
    with torch.no_grad():
        image = ref_vit(s, rewards.clip_preprocess(images, 16), layers, heads, 1e-5, names)[:, 0] @ s["visual.proj"]
        ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        x = s["token_embedding.weight"][ids] + s["positional_embedding"]
        ln = lambda x, k: F.layer_norm(x, (W,), s[k + ".weight"], s[k + ".bias"], 1e-5)
        for i in range(layers):
            b = f"transformer.resblocks.{i}."
            x = x + ref_attention(ln(x, b + "ln_1"), s[b + "attn.in_proj_weight"], s[b + "attn.in_proj_bias"],
                                  s[b + "attn.out_proj.weight"], s[b + "attn.out_proj.bias"], heads, causal=True)
            h = F.gelu(ln(x, b + "ln_2") @ s[b + "mlp.c_fc.weight"].T + s[b + "mlp.c_fc.bias"])
            x = x + h @ s[b + "mlp.c_proj.weight"].T + s[b + "mlp.c_proj.bias"]
        text = ln(x, "ln_final")[torch.arange(3), ids.argmax(-1)] @ s["text_projection"]
        reference = F.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(scores.detach(), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fn.embed(images).detach(), image, atol=1e-5, rtol=1e-5)  # for the diversity metric


def test_pickscore_equals_the_clip_logits(tmp_path):
    """PickScore through our tensor path equals CLIPModel's own logits_per_image diagonal (logit_scale.exp() * cos)."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = toy_clip_tokenizer(tmp_path / "clip")
    eos = len(tokenizer) - 1
    torch.manual_seed(25)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, eos_token_id=eos, pad_token_id=eos),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           image_size=16, patch_size=8), projection_dim=16)
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    fn = rewards.pickscore("cpu", model=str(tmp_path / "clip"), tokenizer=str(tmp_path / "clip"))
    images, prompts = torch.rand(2, 3, 16, 16, generator=generator(26)), ["a fox", "bee"]
    scores = fn(images, prompts)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    model = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=rewards.clip_preprocess(images, 16)).logits_per_image
    torch.testing.assert_close(scores, logits.diagonal(), atol=1e-4, rtol=1e-5)
    assert fn.embed(images).shape == (2, 16)


def test_a_weights_file_of_the_wrong_kind_is_a_value_error(tmp_path):
    from transformers import CLIPConfig

    torch.save({"state_dict": {"foo": torch.zeros(2)}}, tmp_path / "wrong.pt")
    config = CLIPConfig(text_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2),
                        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           image_size=16, patch_size=8), projection_dim=4)
    with pytest.raises(ValueError, match="is not an HPSv2 checkpoint"):
        rewards.hpsv2("cpu", checkpoint=str(tmp_path / "wrong.pt"), config=config)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not the LAION aesthetic head"):
        rewards.load_weights(rewards.MLPHead(), tmp_path / "text.pt", "the LAION aesthetic head")


def test_missing_package_and_missing_weights_are_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    for name in ("aesthetic", "imagereward", "hpsv2", "pickscore"):
        with pytest.raises(ImportError, match=r"pip install transformers"):
            rewards.load(name)
    monkeypatch.delitem(sys.modules, "transformers")
    for name, env in (("imagereward", "DAG_IMAGEREWARD"), ("hpsv2", "DAG_HPSV2"), ("aesthetic", "DAG_AESTHETIC_HEAD")):
        monkeypatch.delenv(env, raising=False)
        with pytest.raises(OSError, match=f"download it once online or set {env}"):
            rewards.load(name)  # HF_HUB_OFFLINE=1: nothing cached


def test_prompt_sets_and_their_eval_splits(monkeypatch, tmp_path):
    import csv

    import huggingface_hub

    hpd = {style: [f"{style} {i}" for i in range(12)] for style in rewards.HPD_STYLES}
    for style, prompts in hpd.items():
        (tmp_path / f"{style}.json").write_text(json.dumps(prompts))

    def fake_download(repo, filename, repo_type=None):
        assert (repo, repo_type) == ("zhwang/HPDv2", "dataset"), "only HPDv2 is downloaded"
        return str(tmp_path / Path(filename).name)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("DAG_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train, held = rewards.prompt_set("hpd_photo_painting")
    assert held == hpd["photo"][:10] + hpd["paintings"][:10] and train == hpd["photo"][10:] + hpd["paintings"][10:]
    assert len(rewards.prompt_set("hpd")[0]) == 4 * 2
    train, held = rewards.prompt_set("imagenet_all")  # shipped in rewards.py: no download
    assert len(train) == 1000 and held == train[::125] and train[0] == "tench, Tinca tinca"
    assert train[999] == "toilet tissue, toilet paper, bathroom tissue" and all(name.strip() == name for name in train)
    train, held = rewards.prompt_set("simple_animals")
    assert len(train) == 45 and set(held) <= set(train)

    with pytest.raises(OSError, match="DrawBench is not cached"):
        rewards.prompt_set("drawbench")
    rows = [("Colors", f"color {i}") for i in range(4)] + [("Misspellings", "a tcar"), ("Rare Words", "artophagous")]
    rows += [("Gary Marcus et al. ", f"marcus {i}") for i in range(3)]  # the sheet's trailing space
    (tmp_path / "cache").mkdir()
    with open(tmp_path / "cache" / "drawbench.csv", "w", newline="") as f:
        csv.writer(f).writerows([("Prompts", "Category")] + [(p, c) for c, p in rows])
    train, held = rewards.prompt_set("drawbench")
    assert held == ["color 0", "color 1", "marcus 0", "marcus 1"] and train == ["color 2", "color 3", "marcus 2"]
    (tmp_path / "cache" / "drawbench.csv").write_text("<html>Sign in</html>\n")  # what a failed download can leave
    with pytest.raises(ValueError, match="is not the DrawBench sheet"):
        rewards.prompt_set("drawbench")

    assert set(rewards.TASK_PROMPTS) == set(rewards.REWARDS) and set(rewards.TASK_PROMPTS.values()) <= set(rewards.PROMPT_SETS)
    (tmp_path / "mine.txt").write_text("a red fox\n\n  an owl  \n")
    assert rewards.prompt_set(str(tmp_path / "mine.txt")) == (["a red fox", "an owl"], ["a red fox", "an owl"])
    (tmp_path / "many.txt").write_text("".join(f"prompt {i}\n" for i in range(100)))
    train, held = rewards.prompt_set(str(tmp_path / "many.txt"))  # a long file: at most 16 eval prompts
    assert len(train) == 100 and held == train[::7] and len(held) == 15
    with pytest.raises(ValueError, match="neither a prompt set"):
        rewards.prompt_set("no_such_set")


# --------------------------------------------------------------------------------------------------------------------
# Learning on pretrained models: a DAG-DB run of each benchmark (benchmark/README.md)
# --------------------------------------------------------------------------------------------------------------------


def test_dag_db_raises_the_digit_reward_of_the_shipped_ddpm(tmp_path):
    """The benchmark's chosen DAG-DB setting at its first seed, 30 epochs of 32 trajectories on the shipped digits DDPM:
    the fixed-noise eval reward p_4(3) of 64 seeds rises by more than the margin, which was chosen from the measured
    gains of three seeds against the drift without a reward (beta = 0) and the reward-sign mutant of dag.py, which
    fails this test (benchmark/README.md, "The learning test")."""
    from benchmark import digits

    test = digits.LEARNING_TEST
    dag.main([*digits.argv("db", test["flags"], digits.SEEDS[0], *digits.EVAL), "--eval-every", "30",
              "--out", str(tmp_path)])
    evals = [r["eval_reward_mean"] for r in dag.read_jsonl(tmp_path / "eval.jsonl")]
    assert len(evals) == 2 and evals[1] - evals[0] > test["margin"], evals


def test_dag_db_raises_prompt_alignment_of_the_shipped_text_to_image_model(tmp_path):
    """The user's path (text encoder, the conditional UNet branch at guidance 1, VAE decode, a flow net that
    cross-attends to the prompt) on the tiny text-to-image model pretrained here, whose base draws the named digit in
    about two samples of three: the benchmark's chosen DAG-DB setting at half the transitions for 12 epochs (384
    trajectories) raises the fixed-noise eval reward p_4(named digit) of 24 prompts x 4 seeds (12 prompts held out of
    training) by more than the margin chosen from two seeds against the beta = 0 control and the reward-sign mutant of
    dag.py, which fails this test (benchmark/README.md, "The text-to-image learning test")."""
    from benchmark import t2i

    test = t2i.LEARNING_TEST
    dag.main([*t2i.test_argv(test["flags"], test["seed"]), "--out", str(tmp_path)])
    evals = [r["eval_reward_mean"] for r in dag.read_jsonl(tmp_path / "eval.jsonl")]
    assert len(evals) == 2 and evals[1] - evals[0] > test["margin"], evals
