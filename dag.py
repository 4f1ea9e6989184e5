"""DAG: Diffusion Alignment with GFlowNets, in one file.

DAG post-trains a diffusion model against a black-box reward r(x0). The N-step DDIM sampler is read as a GFlowNet:
a state is (x_t, t, prompt), the forward policy p_theta(x_prev | x_t) is one stochastic DDIM step of the LoRA-adapted
UNet (x_prev is the child, one step closer to the image: diffusers' prev_sample), the backward policy p_B is the fixed
noising kernel q(x_t | x_prev), and a small flow network F_phi(x_t, t, c) is trained with the policy so that the
flows balance on every transition (detailed balance, DB).

Paper: Zhang, Zhang, Gu, Zhang, Susskind, Jaitly, Zhai, "Improving GFlowNets for Text-to-Image Diffusion Alignment",
arXiv 2406.00633 (TMLR 2025). Authors' release: apple/ml-diffusion-alignment-gflownet (commit 12c5952, cited below
as file:line).

Per transition s = (x_t, t) -> s' = (x_prev, t_prev) of a stored rollout (beta = reward_exp, the inverse temperature):

    log F(s)    = F_phi(x_t, t, c) + beta * r(decode(x0_pred(x_t)))      forward-looking flow (no gradient to theta)
    log F(x0)   = beta * r(x0)                                           terminal boundary
    residual    = log F(s) + log p_theta(x_prev | x_t) - log p_B(x_t | x_prev) - log F(s')
    DAG-DB      : residual**2                                            (--algo db, default)
    DAG-KL      : residual**2 with log p_theta detached (trains phi), plus kl_coef * a PPO-clipped REINFORCE term with
                  advantage -residual (leave-one-out baseline, normalised, clipped) that trains theta   (--algo kl)
    both        : + unetreg * mean((eps_theta - eps_rollout)**2), a proximal pull toward the rollout policy

The forward-looking flow (Pan et al. 2023, "Better training of GFlowNets with local credit") adds to F_phi the reward
of the image the UNet predicts from x_t, so F_phi only learns a correction and every transition, not only the last,
sees the reward.

What the balance point is. With the fixed p_B = q and the terminal boundary F(x0) = R(x0), a zero DB residual on
every transition makes the sampler draw x0 with probability proportional to R(x0) (times a broad envelope from
q(x_T | x0)); the base model's density does NOT appear (q carries no data). Here log-probs are means over the
D = C*H*W dimensions (as in the release), which makes the DB zero that of summed log-probs with log R = D * beta * r:
the fixed point is proportional to exp(D * beta * r(x0)), D = 16384 for SD latents, i.e. essentially the reward's
maximisers. What keeps samples close to the base model in practice is the LoRA starting at the base, the unetreg pull
toward the previous rollout policy, and a short run (200 optimizer steps in the release's config), not the fixed point.

Reading order: the DAG path (DDIM log-probs, flow network, objectives, the model calls it needs, rollout, one training
step, the epoch) comes first; the harness (command line, distributed helpers, model loading, evaluation and cost
accounting, checkpoints, the DDPO and AlignProp baselines, main) follows under its own banners.

Where this file deliberately differs from the paper or the release (each is tagged NOTE: at the code):
  * the x0_pred reward of each state is computed ONCE, at rollout, from the text-branch epsilon of the CFG forward;
    the release recomputes it twice per transition in the training loop (scripts/train_gfn.py:530-543). Any fixed
    g(x_t) added to a free F_phi leaves the DB fixed point unchanged when both ends of a transition use the same g.
  * every rank has its own seed (seed + rank); the release seeds every rank with the same seed (train_gfn.py:83).
  * the flow network returns (B,) for every B; the release's .squeeze() returns a 0-d tensor at B = 1 (flow.py:170).
  * with --no-cfg the rollout stores the text-only eps and log-prob that the training forward recomputes; the release
    compares a text-only training output with the stored post-CFG one (train_gfn.py:506-513).
  * the CIFAR-10 DDPM's scheduler is rebuilt with steps_offset=1 (its own config has a zero-variance last step).

Usage:
    torchrun --nproc_per_node=8 dag.py --reward aesthetic       # the paper's aesthetic run (SD-1.5, 100 epochs)
    python dag.py --reward aesthetic --num-batches 32 --grad-accum 32    # one GPU, same batches as 8 GPUs
    python dag.py --model google/ddpm-cifar10-32 --reward jpeg_compressibility --steps 10 \
        --sample-batch 8 --num-batches 1 --train-batch 4 --grad-accum 2 --epochs 4     # CPU toy run
    torchrun --nproc_per_node=8 dag.py --reward aesthetic --algo ddpo    # the same run with the DDPO baseline

Shapes: B trajectories (b in a micro-batch), N denoising steps, C/H/W channels/height/width of a latent (SD: 4x64x64)
or of a pixel image (3x32x32), L = 77 text tokens, E = 768 text width.
"""

import argparse
import collections
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# NOTE: transformers says at import that torchvision is absent and it falls back to its PIL image processors; nothing
# here uses them (rewards.py preprocesses with tensor ops), so that one message is filtered out.
logging.getLogger("transformers.utils.import_utils").addFilter(lambda r: "requires torchvision" not in r.getMessage())
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import get_down_block
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tqdm import tqdm

import rewards

# ====================================================================================================================
# THE DAG PATH
# ====================================================================================================================

# --------------------------------------------------------------------------------------------------------------------
# DDIM transition log-probabilities (DDIM, Song et al. 2021, Eq. 12 with sigma_t = eta * sigma)
# Self-contained: copy this section with torch, math and diffusers' DDIMScheduler. A copier must also take the three
# conventions it relies on: the model predicts epsilon (v-prediction is converted by `model_output_to_eps`), the
# log-probs are MEANS over dimensions, and the schedule is built with steps_offset=1 (`ddim_scheduler`).
# --------------------------------------------------------------------------------------------------------------------


def ddim_scheduler(config, steps):
    """A DDIMScheduler from any diffusers scheduler config, set to `steps` inference steps.

    NOTE: "leading" spacing with steps_offset=1 gives t = 981, 961, ..., 1 (N = 50) for SD and CIFAR alike; the CIFAR
    DDPM's own config (offset 0, set_alpha_to_one) ends with t_prev = t = 0, a zero-variance step whose log-prob is
    0/0. clip_sample and prediction_type are kept from the config (CIFAR: clip on; SD: off)."""
    scheduler = DDIMScheduler.from_config(config, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    return scheduler


def alphas_at(scheduler, t, like):
    """alpha_bar_t and alpha_bar_{t_prev}, t_prev = max(t - Delta, 0), shaped (B, 1, 1, 1) like `like`."""
    alphas_cumprod = scheduler.alphas_cumprod.to(like.device)  # float32 (T_train,)
    delta = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    shape = (-1,) + (1,) * (like.ndim - 1)
    a_t = alphas_cumprod[t].view(shape).to(like.dtype)
    a_prev = alphas_cumprod[(t - delta).clamp(min=0)].view(shape).to(like.dtype)
    return a_t, a_prev


def gaussian_logprob(x, mean, std):
    """log N(x; mean, std^2 I) -> (B,).

    NOTE: the MEAN over non-batch dims, not the sum (the release's logp_mean=True, ddim_with_logprob.py:201-203). DB
    with mean log-probs, exponent beta and flow F equals DB with summed log-probs, exponent D*beta and flow D*F,
    divided by D**2; every published hyperparameter was tuned for the mean."""
    logp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.mean(dim=tuple(range(1, x.ndim)))


def model_output_to_eps(scheduler, output, t, x_t):
    """The UNet's output as an epsilon prediction: unchanged for "epsilon" models (SD-1.x, the CIFAR DDPM); for
    "v_prediction" models (SD-2.x 768) eps = sqrt(a_t) v + sqrt(1 - a_t) x_t. Other types raise ValueError."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return output
    if kind == "v_prediction":
        a_t, _ = alphas_at(scheduler, t, x_t)
        return a_t.sqrt() * output + (1 - a_t).sqrt() * x_t
    raise ValueError(f"prediction_type {kind!r} is not supported (only 'epsilon' and 'v_prediction')")


def predict_x0(scheduler, eps, t, x_t):
    """Tweedie estimate x0_pred = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), no clamp."""
    a_t, _ = alphas_at(scheduler, t, x_t)
    return (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()


def ddim_step_logprob(scheduler, eps, t, x_t, eta=1.0, x_prev=None, generator=None, noise=None):
    """One DDIM step p_theta(x_prev | x_t) = N(mu, s_t^2 I); samples x_prev = mu + s_t * noise when x_prev is None
    (noise drawn from `generator` unless given). -> (x_prev, log_pf (B,)).

        x0   = predict_x0(eps), clamped iff scheduler.config.clip_sample
        s_t  = eta * sqrt((1 - a') / (1 - a_t) * (1 - a_t / a'))
        mu   = sqrt(a') x0 + sqrt(1 - a' - s_t^2) eps                (a = alpha_bar, a' at t_prev)
    """
    a_t, a_prev = alphas_at(scheduler, t, x_t)
    x0 = predict_x0(scheduler, eps, t, x_t)
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    if not bool((std > 0).all()):
        raise ValueError("DDIM step with zero std (t_prev == t): build the scheduler with steps_offset=1")
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    if x_prev is None:
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        x_prev = mean + std * noise
    return x_prev, gaussian_logprob(x_prev, mean, std)


def backward_logprob(scheduler, t, x_t, x_prev):
    """log p_B(x_t | x_prev) = log N(x_t; sqrt(a_t / a') x_prev, (1 - a_t / a') I), mean over dims; no gradient."""
    x_t, x_prev = x_t.detach(), x_prev.detach()
    a_t, a_prev = alphas_at(scheduler, t, x_t)
    ratio = a_t / a_prev
    return gaussian_logprob(x_t, ratio.sqrt() * x_prev, (1 - ratio).sqrt())


# --------------------------------------------------------------------------------------------------------------------
# Flow network F_phi(x_t, t, c) -> (B,) (release: ConditionalFlow, alignment/flow.py). Copy with diffusers' blocks.
# --------------------------------------------------------------------------------------------------------------------


class FlowNet(nn.Module):
    """Time-conditioned conv encoder with cross-attention to the prompt, pooled to one scalar per state.

    timestep -> sinusoid(64) -> MLP(256); conv_in 3x3 -> 4 down blocks (channels 64, 128, 256, 256, each halves H and
    W; the first three cross-attend to the L x E text states when `cross_attention_dim` is set) -> mean over all
    spatial positions -> Linear(256, 1). The release pools with AvgPool2d(4) (flow.py:135): the global mean for 64x64
    latents (4x4 after the downsampling), an error for 32x32 pixels, the top-left 4x4 only for 96x96 latents; the
    global mean here equals it at 64x64 and works at any size."""

    def __init__(self, in_channels=4, cross_attention_dim=768, channels=(64, 128, 256, 256)):
        super().__init__()
        self.time_proj = Timesteps(64, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(64, 256)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(channels[:1] + channels[:-1], channels)):
            attend = cross_attention_dim is not None and i < len(channels) - 1
            self.blocks.append(get_down_block(
                "CrossAttnDownBlock2D" if attend else "DownBlock2D", num_layers=1, in_channels=c_in,
                out_channels=c_out, temb_channels=256, add_downsample=True, resnet_eps=1e-5, resnet_act_fn="silu",
                resnet_groups=32, cross_attention_dim=cross_attention_dim, num_attention_heads=8,
                attention_head_dim=8, downsample_padding=1,
            ))  # fmt: skip
        self.head = nn.Linear(channels[-1], 1)

    def forward(self, x_t, t, text=None):
        temb = self.time_embedding(self.time_proj(t).to(x_t.dtype))  # (B, 256)
        h = self.conv_in(x_t)
        for block in self.blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(h, temb, encoder_hidden_states=text)
            else:
                h, _ = block(h, temb)
        return self.head(h.mean(dim=(2, 3))).squeeze(-1)  # NOTE: (B, C) -> (B,), also for B = 1


# --------------------------------------------------------------------------------------------------------------------
# DAG objectives. Pure functions of (B,) tensors (log_flows: of a flow module and a batch), copyable alone.
# --------------------------------------------------------------------------------------------------------------------


def reward_exp_at(epoch, num_epochs, reward_exp, anneal=True):
    """beta_e = reward_exp * min(1, e / (num_epochs / 2)), linear over the first half (train_gfn.py:252-256).

    At e = 0 beta is 0: the flow learns without the reward, and theta still learns toward a sampler whose flows
    balance with log R = 0 (through the DB residual, or DAG-KL's policy term)."""
    if not anneal:
        return float(reward_exp)
    return float(reward_exp) * min(1.0, epoch / (0.5 * num_epochs))


def log_flows(flow, batch, reward_exp):
    """Forward-looking log-flows of both ends of each transition (state j -> state j + 1) -> (log_flow of x_t,
    log_flow_prev of x_prev, the child), each (b,). `flow` is F_phi(x, t, text) -> (b,); `reward_exp` this epoch's
    beta; `batch` a Transitions (below): x_t, x_prev (b, C, H, W), t, t_prev, step (b,) long, text (b, L, E) or None,
    x0_pred_reward (b, N), reward (b,).

        log F(state j)  = F_phi(x_t, t, c) + reward_exp * r(x0_pred(state j))          (no gradient to theta)
        log F(x_0)      = reward_exp * r(x_0)                                           terminal boundary

    The rollout scored every state once: batch.x0_pred_reward[:, j] is r(decode(x0_pred)) of state j (b, N), and
    batch.reward is r(x_0) of the final image. So the child's reward term is the column one to the right of the
    parent's (the child of step j is the state that step j + 1 starts from), and the child of the last step is x_0
    itself, where x0_pred = x_0 and the flow is pinned to the reward.
    NOTE: at that boundary F_phi is not used (the release's end_mask, train_gfn.py:545-546)."""
    text = None if batch.text is None else batch.text.float()  # the flow is fp32; the text states may be bf16
    n = batch.x0_pred_reward.shape[1]
    r = torch.cat([batch.x0_pred_reward, batch.reward[:, None]], dim=1)  # (b, N + 1): r of every state, x_0 last
    r_parent = r.gather(1, batch.step[:, None]).squeeze(1)
    r_child = r.gather(1, batch.step[:, None] + 1).squeeze(1)
    log_flow = flow(batch.x_t, batch.t, text) + reward_exp * r_parent
    at_x0 = batch.step == n - 1
    log_flow_prev = reward_exp * r_child + torch.where(at_x0, 0.0, flow(batch.x_prev, batch.t_prev, text))
    return log_flow, log_flow_prev


def db_loss(log_flow, log_pf, log_pb, log_flow_prev):
    """DAG-DB, detailed balance: (log F(s) + log p_theta(s'|s) - log p_B(s|s') - log F(s'))^2 -> (B,)."""
    return (log_flow + log_pf - log_pb - log_flow_prev) ** 2


def leave_one_out_advantages(a, adv_clip_max=5.0, eps=1e-8):
    """The release's leave-one-out normalisation of a (n,) (train_gfn.py:559-565), clipped to +-adv_clip_max:

        d_i = a_i - mean_{k != i} a_k              (each sample's own leave-one-out baseline)
        v_i = mean_{k != i} d_k^2                  (the other samples' squared deviations, each with its own baseline)
        A_i = clamp(d_i / (sqrt(v_i) + eps))"""
    n = a.numel()
    if n < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 samples per batch (--train-batch >= 2)")
    d = a - (a.sum() - a) / (n - 1)
    var = ((d**2).sum() - d**2) / (n - 1)
    return (d / (var.sqrt() + eps)).clamp(-adv_clip_max, adv_clip_max)


def ppo_clip_loss(log_pf, log_pf_rollout, advantages, clip_range):
    """PPO's clipped surrogate (Schulman et al. 2017), per sample: max(-A r, -A clip(r, 1 - c, 1 + c)) with the ratio
    r = p_theta / p_theta_rollout of the stored transition; its gradient is exactly 0 where the clip is active."""
    ratio = torch.exp(log_pf - log_pf_rollout)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))


def kl_loss(log_flow, log_pf, log_pb, log_flow_prev, log_pf_rollout, clip_range=1e-4, adv_clip_max=5.0):
    """DAG-KL, the release's form of the paper's KL gradient (train_gfn.py:552-577) -> (loss_flow, loss_policy), (B,).

    loss_flow trains phi only: the DB residual with log p_theta detached. loss_policy trains theta only: a PPO-clipped
    REINFORCE step with advantage a = -residual. NOTE: per sample grad_theta residual^2 / 2 = residual *
    grad_theta log p_theta, so this is DAG-DB's theta-gradient plus a baseline, normalisation, clipping and a ratio."""
    loss_flow = (log_flow + log_pf.detach() - log_pb - log_flow_prev) ** 2
    advantages = leave_one_out_advantages((log_flow_prev + log_pb - log_pf - log_flow).detach(), adv_clip_max)
    return loss_flow, ppo_clip_loss(log_pf, log_pf_rollout, advantages, clip_range)


# --------------------------------------------------------------------------------------------------------------------
# The models, as the DAG path calls them (loading is in the harness, `load_models`)
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Models:
    """The networks of one run. Only the LoRA weights of `unet` and the flow are trainable."""

    unet: nn.Module  # the policy's epsilon (or v) network: frozen base weights + LoRA
    scheduler: DDIMScheduler  # the N-step DDIM schedule (timesteps, alphas_cumprod)
    flow: nn.Module | None  # F_phi; None for the baselines
    latent_shape: tuple  # (C, H, W) of a state
    device: torch.device
    dtype: torch.dtype  # of the frozen weights: bf16 on CUDA by default, else fp32
    vae: nn.Module | None = None  # latent -> image; None for a pixel-space model
    text_encoder: nn.Module | None = None  # None for an unconditional model
    tokenizer: object = None
    uncond: torch.Tensor | None = None  # (1, L, E) text states of "", CFG's negative prompt
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # evaluations, for cost

    @property
    def conditional(self):
        return self.text_encoder is not None

    @property
    def lora_params(self):
        return [p for p in self.unet.parameters() if p.requires_grad]

    @property
    def flow_params(self):
        return [] if self.flow is None else list(self.flow.parameters())


@torch.no_grad()
def encode_prompts(m, prompts):
    """CLIP last hidden state (B, L, E), not pooled."""
    ids = m.tokenizer(prompts, padding="max_length", max_length=m.tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids  # fmt: skip
    return m.text_encoder(ids.to(m.device))[0]


def autocast(m):
    """bf16 autocast on CUDA when the frozen weights are bf16 (LoRA and flow weights stay fp32); otherwise nothing."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if m.dtype == torch.bfloat16 else contextlib.nullcontext()


def predict_eps(m, x_t, t, text, guidance):
    """-> (eps_hat (B, C, H, W) fp32, eps_text): eps_hat = eps_u + w (eps_c - eps_u); guidance=None: eps_c only.

    The same function runs at rollout and in the training forward, so an unchanged theta reproduces the rollout's
    log-probs exactly (the DAG-KL ratio is 1 until the first optimizer step). NOTE: that needs the UNet in eval mode
    in both (train() keeps it there; it has no dropout or batch-norm) and equal batch shapes (predict_eps_chunked)."""
    x = x_t.to(m.dtype)
    with autocast(m):
        if not m.conditional or guidance is None:
            text_kwargs = {"encoder_hidden_states": text} if m.conditional else {}
            eps = model_output_to_eps(m.scheduler, m.unet(x, t, **text_kwargs).sample.float(), t, x_t)
            return eps, eps
        uncond = m.uncond.expand(len(x), -1, -1)
        out = m.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, text])).sample
    eps_u, eps_c = (model_output_to_eps(m.scheduler, o, t, x_t) for o in out.float().chunk(2))
    return eps_u + guidance * (eps_c - eps_u), eps_c


def predict_eps_chunked(m, x_t, t, text, guidance, chunk):
    """predict_eps on `chunk` rows at a time.

    NOTE: the rollout calls the UNet with train_batch rows, as the training forward does: kernels depend on the batch
    size, and equal shapes make an unchanged theta reproduce eps bitwise (DAG-KL ratio exactly 1, unetreg exactly 0)."""
    parts = [predict_eps(m, x_t[i : i + chunk], t[i : i + chunk], None if text is None else text[i : i + chunk],
                         guidance) for i in range(0, len(x_t), chunk)]  # fmt: skip
    return tuple(torch.cat(p) for p in zip(*parts))


def decode(m, x0, chunk):
    """Latent (or pixel) x0 -> RGB in [0, 1], fp32; VAE decodes `chunk` images at a time. Differentiable when the
    caller enables grad (AlignProp); the rollout and evaluation call it under no_grad."""
    if m.vae is not None:
        with autocast(m):
            x0 = torch.cat([m.vae.decode(c.to(m.dtype) / m.vae.config.scaling_factor).sample.float()
                            for c in x0.split(chunk)])  # fmt: skip
    return (x0 / 2 + 0.5).clamp(0, 1)


# --------------------------------------------------------------------------------------------------------------------
# Rollout: sample trajectories with the current policy and store what training needs
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Rollout:
    """B trajectories x_T -> x_0 of N DDIM steps, stored as chains of N + 1 states: step j goes from state j to
    state j + 1, and state N is the final x_0. Fields marked "or None" are not filled by the DDPO baseline."""

    states: torch.Tensor  # (B, N + 1, C, H, W) fp32, exactly as sampled (so the KL ratio recomputes bitwise)
    timesteps: torch.Tensor  # (N + 1,) long: the DDPM timestep of each state, 0 for x_0
    log_pf_rollout: torch.Tensor  # (B, N) log p_theta_rollout(state j + 1 | state j), mean over dims
    eps_rollout: torch.Tensor | None  # (B, N, C, H, W) eps of step j at rollout (guided; text-only with --no-cfg)
    x0_pred_reward: torch.Tensor | None  # (B, N) raw r(decode(x0_pred(state j))), text branch, no CFG
    reward: torch.Tensor  # (B,) raw r(x_0) of the final image
    text: torch.Tensor | None  # (B, L, E) prompt states; None for an unconditional model

    def transitions(self, rows, steps):
        """One transition per trajectory: step steps[i] of trajectory rows[i] (each (b,) long)."""
        pick = lambda v: None if v is None else v[rows, steps]  # noqa: E731 -- per-step fields
        return Transitions(
            rows=rows, step=steps, x_t=self.states[rows, steps], x_prev=self.states[rows, steps + 1],
            t=self.timesteps[steps], t_prev=self.timesteps[steps + 1],
            text=None if self.text is None else self.text[rows],
            log_pf_rollout=pick(self.log_pf_rollout), eps_rollout=pick(self.eps_rollout),
            x0_pred_reward=None if self.x0_pred_reward is None else self.x0_pred_reward[rows], reward=self.reward[rows],
        )  # fmt: skip

    @staticmethod
    def cat(parts):
        """Concatenate rollouts of the same schedule along the trajectory axis."""
        join = lambda vs: None if vs[0] is None else torch.cat(vs)  # noqa: E731
        fields = {f.name: join([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(Rollout)
                  if f.name != "timesteps"}  # fmt: skip
        return Rollout(**fields, timesteps=parts[0].timesteps)


@dataclasses.dataclass
class Transitions:
    """A training micro-batch: one transition (state j -> state j + 1) of each of b trajectories, j = step[i]."""

    rows: torch.Tensor  # (b,) which trajectories of the rollout
    step: torch.Tensor  # (b,) j, the transition's position in its trajectory
    x_t: torch.Tensor  # (b, C, H, W) state j
    x_prev: torch.Tensor  # (b, C, H, W) state j + 1, the child (diffusers' prev_sample)
    t: torch.Tensor  # (b,) timestep of x_t
    t_prev: torch.Tensor  # (b,) timestep of x_prev = max(t - Delta, 0)
    text: torch.Tensor | None  # (b, L, E)
    log_pf_rollout: torch.Tensor  # (b,)
    eps_rollout: torch.Tensor | None  # (b, C, H, W)
    x0_pred_reward: torch.Tensor | None  # (b, N): every state's x0_pred reward, for both ends (see log_flows)
    reward: torch.Tensor  # (b,) r(x_0)


def draw_prompts(prompts, n, generator):
    """n prompts drawn uniformly with replacement -> (indices (n,), prompts list)."""
    idx = torch.randint(len(prompts), (n,), generator=generator)
    return idx, [prompts[i] for i in idx]


def policy_step(m, x, t, text, args, generator):
    """One sampling step of the rollout policy (CFG with --guidance-scale), UNet in train_batch chunks.

    -> (x_prev, log_pf, eps, eps_text): log_pf and eps are those the training forward will recompute. NOTE: with
    --no-cfg that forward is text-only, so both are re-taken from a text-only forward of the same x_prev (one more
    UNet call per step); the release compares a text-only training output with the post-CFG rollout one."""
    eps, eps_text = predict_eps_chunked(m, x, t, text, args.guidance_scale, args.train_batch)
    x_prev, log_pf = ddim_step_logprob(m.scheduler, eps, t, x, args.eta, generator=generator)
    if not args.cfg and m.conditional:
        eps, _ = predict_eps_chunked(m, x, t, text, None, args.train_batch)
        _, log_pf = ddim_step_logprob(m.scheduler, eps, t, x, args.eta, x_prev=x_prev)
    return x_prev, log_pf, eps, eps_text


@torch.no_grad()
def rollout(m, reward_fn, prompts, args, generator):
    """Sample B = len(prompts) trajectories of N DDIM steps -> (Rollout, images (B, 3, H, W) in [0, 1]).

    NOTE: the x0_pred reward of each state, the forward-looking term of its log-flow, is computed here once, from the
    text-branch eps that the CFG forward already produced. The release recomputes it in the training loop,
    twice per transition (train_gfn.py:530-543): 100 more UNet forwards and 50 more VAE decodes and reward calls per
    trajectory."""
    B = len(prompts)
    text = encode_prompts(m, prompts) if m.conditional else None
    x = torch.randn((B, *m.latent_shape), generator=generator, device=m.device)
    states, log_pfs, epss, x0_rewards = [x], [], [], []
    for t_scalar in m.scheduler.timesteps:
        x_t, t = states[-1], torch.full((B,), int(t_scalar), device=m.device, dtype=torch.long)
        x_prev, log_pf, eps, eps_text = policy_step(m, x_t, t, text, args, generator)
        x0_pred = decode(m, predict_x0(m.scheduler, eps_text, t, x_t), args.decode_chunk)
        x0_rewards.append(reward_fn(x0_pred, prompts).float())
        states.append(x_prev)
        log_pfs.append(log_pf)
        epss.append(eps)
    images = decode(m, states[-1], args.decode_chunk)
    timesteps = torch.cat([m.scheduler.timesteps, torch.zeros(1, dtype=torch.long)]).to(m.device)
    ro = Rollout(states=torch.stack(states, 1), timesteps=timesteps, log_pf_rollout=torch.stack(log_pfs, 1),
                 eps_rollout=torch.stack(epss, 1), x0_pred_reward=torch.stack(x0_rewards, 1),
                 reward=reward_fn(images, prompts).float(), text=text)  # fmt: skip
    return ro, images


# --------------------------------------------------------------------------------------------------------------------
# One training step
# --------------------------------------------------------------------------------------------------------------------


def policy_logprob(m, batch, args):
    """The training forward: log p_theta(x_prev | x_t) (b,) of the stored transitions under the current LoRA, with
    the eps it used. NOTE: CFG in the training forward too (the release's cfg=True), unless --no-cfg."""
    eps, _ = predict_eps(m, batch.x_t, batch.t, batch.text, args.guidance_scale if args.cfg else None)
    _, log_pf = ddim_step_logprob(m.scheduler, eps, batch.t, batch.x_t, args.eta, x_prev=batch.x_prev)
    return log_pf, eps


def dag_loss(m, batch, reward_exp, args):
    """DAG-DB or DAG-KL loss (b,) of one micro-batch of transitions, + detached stats (tensors: no GPU sync)."""
    log_pf, eps = policy_logprob(m, batch, args)
    log_pb = backward_logprob(m.scheduler, batch.t, batch.x_t, batch.x_prev)
    log_flow, log_flow_prev = log_flows(m.flow, batch, reward_exp)
    if args.algo == "db":
        loss = db_loss(log_flow, log_pf, log_pb, log_flow_prev)
    else:
        loss_flow, loss_policy = kl_loss(log_flow, log_pf, log_pb, log_flow_prev, batch.log_pf_rollout,
                                         args.clip_range, args.adv_clip)  # fmt: skip
        loss = loss_flow + args.kl_coef * loss_policy
    # unetreg: the per-step KL(p_theta || p_rollout) without its timestep weight, a proximal pull (0 until theta moves)
    unetreg = ((eps - batch.eps_rollout) ** 2).mean(dim=tuple(range(1, eps.ndim)))
    loss = loss + args.unetreg * unetreg
    stats = {"loss": loss, "log_pf": log_pf, "log_flow": log_flow, "unetreg": unetreg}
    return loss, {k: v.detach().mean() for k, v in stats.items()}


def optimizer_step(m, optimizer, args):
    """Average gradients over ranks, clip LoRA and flow separately (max norm --max-grad-norm), step. -> True, or
    False when a gradient norm is not finite (a NaN or inf loss): that step is skipped, so it never reaches the weights.
    Every rank decides on the same averaged gradients, so the ranks stay in sync."""
    average_gradients(m.lora_params + m.flow_params)
    norms = [torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm) for params in (m.lora_params, m.flow_params)
             if params]  # fmt: skip
    finite = bool(torch.isfinite(torch.stack(norms)).all())
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


def transition_order(B, N, generator):
    """The release's training order: shuffle the trajectories, and permute the N transitions of EACH trajectory
    independently (so a micro-batch mixes timesteps).

    -> (order (B,): trajectory of each row, perm (B, N): perm[i, j] is the step trained at pass j of trajectory i)."""
    order = torch.randperm(B, generator=generator)
    perm = torch.argsort(torch.rand(B, N, generator=generator), dim=1)
    return order, perm


def train_epoch(m, ro, optimizer, loss_fn, args, generator, rank=0):
    """One pass over a rollout: for each micro-batch of train_batch trajectories, for j in 0..N-1, backward
    loss_fn(one permuted transition of each).mean() / (grad_accum * N); an optimizer step every grad_accum
    micro-batches. -> mean stats over the epoch and all ranks, and steps_taken: one bool per optimizer step."""
    B, N = ro.log_pf_rollout.shape
    order, perm = (v.to(m.device) for v in transition_order(B, N, generator))
    stats, taken, micro_batches = [], [], range(0, B, args.train_batch)
    for k, i in enumerate(tqdm(micro_batches, desc="train", disable=rank != 0, leave=False)):
        rows = order[i : i + args.train_batch]
        for j in range(N):
            loss, s = loss_fn(ro.transitions(rows, perm[rows, j]))
            (loss.mean() / (args.grad_accum * N)).backward()
            stats.append(s)
        if (k + 1) % args.grad_accum == 0:
            taken.append(optimizer_step(m, optimizer, args))
    local = torch.stack([torch.stack(list(s.values())) for s in stats]).mean(0, keepdim=True)  # (1, n_stats)
    return {**dict(zip(stats[0], gather(local).mean(0).tolist())), "steps_taken": taken}


# --------------------------------------------------------------------------------------------------------------------
# The epoch: rollout, then one pass of training on it
# --------------------------------------------------------------------------------------------------------------------


def dag_epoch(m, reward_fn, prompts, optimizer, epoch, args, generators, rank=0):
    """One DAG epoch: num_batches rollouts of sample_batch trajectories (each with random prompts), then train_epoch
    with the DB or KL loss at this epoch's beta. generators: "noise" (on the device: x_T and the sampler's noise) and
    "cpu" (prompts and the training order), both seeded per rank. -> (rewards (B,) of this rank, grid, stats)."""
    reward_exp = reward_exp_at(epoch, args.epochs, args.reward_exp, args.anneal)
    t0 = time.time()
    parts, grid = [], None
    for _ in tqdm(range(args.num_batches), desc=f"epoch {epoch} sample", disable=rank != 0, leave=False):
        _, batch_prompts = draw_prompts(prompts, args.sample_batch, generators["cpu"])
        ro, images = rollout(m, reward_fn, batch_prompts, args, generators["noise"])
        grid = grid or (images[:16].cpu(), batch_prompts[:16], ro.reward[:16].tolist())
        parts.append(ro)
    ro = Rollout.cat(parts)
    t1 = time.time()
    stats = train_epoch(m, ro, optimizer, lambda batch: dag_loss(m, batch, reward_exp, args), args,
                        generators["cpu"], rank)  # fmt: skip
    return ro.reward, grid, {"reward_exp": reward_exp, **stats, "rollout_s": t1 - t0, "train_s": time.time() - t1}


# ====================================================================================================================
# THE HARNESS
# ====================================================================================================================

# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # runwayml/stable-diffusion-v1-5 was deleted from the hub


def parse_args(argv=None):
    """Defaults: the paper's aesthetic task with the release's hyperparameters (config/sd.yaml, whose own task is
    ImageReward), unless a help text says why."""
    p = argparse.ArgumentParser(description="DAG (DB / KL) post-training of a diffusion model against a reward, with "
                                "the DDPO and AlignProp baselines on the same loop.",
                                formatter_class=lambda prog: argparse.HelpFormatter(prog, max_help_position=30))
    g = p.add_argument_group("model and task")
    g.add_argument("--model", default=SD15, help="hub id or local diffusers directory; an unconditional UNet2DModel "
                   "pipeline (e.g. google/ddpm-cifar10-32) runs in pixel space without text")
    g.add_argument("--reward", default="aesthetic", help=f"{', '.join(rewards.REWARDS)}, or module:factory")
    g.add_argument("--prompts", default=None, help=f"prompt set ({', '.join(rewards.PROMPT_SETS)}) or a file, one "
                   "prompt per line; default: the reward's task set")
    g.add_argument("--lora-rank", type=int, default=4, help="LoRA rank r, alpha = r, on to_q, to_k, to_v, to_out.0")
    g.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="frozen weights on CUDA (LoRA and flow stay fp32; always fp32 on CPU)")

    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=50, help="N, DDIM inference steps")
    g.add_argument("--eta", type=float, default=1.0, help="DDIM eta in (0, 1]; > 0 so that p_theta has a density")
    g.add_argument("--guidance-scale", type=float, default=5.0, help="CFG weight w (negative prompt '')")
    g.add_argument("--cfg", action=argparse.BooleanOptionalAction, default=True,
                   help="CFG in the training forward too (release: cfg); --no-cfg trains the text-only policy")
    g.add_argument("--sample-batch", type=int, default=16, help="trajectories per rollout batch, per process")
    g.add_argument("--num-batches", type=int, default=4, help="rollout batches per epoch, per process")
    g.add_argument("--decode-chunk", type=int, default=16, help="images per VAE decode call (bounds memory)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute UNet activations in the backward")

    g = p.add_argument_group("objective")
    g.add_argument("--algo", choices=["db", "kl", "ddpo", "alignprop"], default="db",
                   help="DAG-DB, DAG-KL, or a baseline: DDPO (PPO on terminal rewards), AlignProp (reward backprop)")
    g.add_argument("--reward-exp", type=float, default=100.0, help="beta, inverse temperature: log R = beta * r")
    g.add_argument("--anneal", action=argparse.BooleanOptionalAction, default=True,
                   help="ramp beta linearly from 0 over the first half of the epochs")
    g.add_argument("--kl-coef", type=float, default=None,
                   help="DAG-KL's policy-term weight (release: klpf); default: the final --reward-exp, as in the paper")
    g.add_argument("--unetreg", type=float, default=1.0, help="weight of mean((eps - eps_rollout)^2)")
    g.add_argument("--clip-range", type=float, default=1e-4, help="PPO ratio clip, DAG-KL and DDPO")
    g.add_argument("--adv-clip", type=float, default=5.0, help="advantage clip, DAG-KL, DDPO (release: adv_clip_max)")

    g = p.add_argument_group("baselines")
    g.add_argument("--min-count", type=int, default=16, help="DDPO: rewards a prompt needs before its own mean/std")
    g.add_argument("--buffer-size", type=int, default=32,
                   help="DDPO: last rewards kept per prompt (32: DDPO's aesthetic config)")
    g.add_argument("--truncation", type=int, default=1,
                   help="AlignProp: K, the last steps the reward gradient flows through (fixed K, see README)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100, help="rollout + training rounds")
    g.add_argument("--train-batch", type=int, default=8, help="trajectories per training micro-batch, per process")
    g.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate of the LoRA weights")
    g.add_argument("--flow-lr", type=float, default=None, help="learning rate of the flow network (default: --lr)")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clip, LoRA and flow separately")
    g.add_argument("--seed", type=int, default=0, help="base seed; rank r uses seed + r")

    g = p.add_argument_group("outputs")
    g.add_argument("--out", default="runs/dag", help="run directory: args.json, log.jsonl, grids, checkpoints")
    g.add_argument("--save-every", type=int, default=10,
                   help="keep the checkpoint of every k-th epoch and the last (each epoch's rolls until then)")
    g.add_argument("--eval-every", type=int, default=10, help="evaluate at epoch 0, every k epochs, at the end; 0: off")
    g.add_argument("--eval-prompts", default=None, help="set or file to evaluate on (default: --prompts' eval split)")
    g.add_argument("--eval-samples", type=int, default=4, help="k fixed noise seeds per eval prompt (>= 2, diversity)")
    g.add_argument("--resume", default=None, help="'auto' (newest readable checkpoint in --out) or a checkpoint dir")
    g.add_argument("--allow-changes", default=None, metavar="NAMES",
                   help="resume with these recorded settings changed, comma-separated (e.g. epochs)")
    return p.parse_args(argv)


def die(message):
    """A user mistake: one line on stderr and exit status 2, never a traceback."""
    say(f"dag.py: error: {' '.join(str(message).split())}")  # library messages can span lines
    raise SystemExit(2)


def say(line):
    """One line on stderr, on a line of its own even while a progress bar is drawn."""
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def check_args(args):
    """Validate flag values and the batch arithmetic before anything heavy is loaded; fill derived defaults."""
    if args.reward not in rewards.REWARDS and ":" not in args.reward:
        die(f"unknown reward {args.reward!r}: choose from {', '.join(rewards.REWARDS)} or give module:function")
    if not 0 < args.eta <= 1:
        die("--eta must be in (0, 1]: eta = 0 is deterministic (no log-probability); eta > 1 can make 1 - a' - s_t^2 "
            "negative (no DDIM mean)")
    for name in ("steps", "epochs", "sample_batch", "num_batches", "train_batch", "grad_accum", "save_every",
                 "decode_chunk"):  # fmt: skip
        if getattr(args, name) < 1:
            die(f"--{name.replace('_', '-')} must be >= 1")
    if args.sample_batch % args.train_batch:
        die(f"--sample-batch {args.sample_batch} is not divisible by --train-batch {args.train_batch}")
    micro_batches = args.sample_batch * args.num_batches // args.train_batch
    if micro_batches % args.grad_accum:
        die(f"{micro_batches} micro-batches per epoch (sample-batch*num-batches/train-batch) are not divisible by "
            f"--grad-accum {args.grad_accum}")  # fmt: skip
    if args.eval_every < 0 or args.eval_samples < 2:
        die("--eval-every must be >= 0 and --eval-samples >= 2 (diversity compares samples of the same prompt)")
    if args.algo == "alignprop" and ":" not in args.reward and args.reward not in rewards.DIFFERENTIABLE:
        die(f"--algo alignprop backpropagates through the reward, and {args.reward!r} has no gradient: use one of "
            f"{', '.join(sorted(rewards.DIFFERENTIABLE))} (or a differentiable module:function)")  # fmt: skip
    if not 1 <= args.truncation <= args.steps or not 1 <= args.min_count <= args.buffer_size:
        die("--truncation must be in [1, --steps], and 1 <= --min-count <= --buffer-size (else no prompt ever gets "
            "its own statistics)")
    if args.algo == "kl" and args.train_batch < 2:
        die("--algo kl needs --train-batch >= 2 (the leave-one-out baseline needs two samples)")
    if args.lora_rank < 1:
        die("--lora-rank must be >= 1")
    for name, low in (("lr", 0), ("flow_lr", 0), ("max_grad_norm", 0), ("clip_range", 0), ("adv_clip", 0),
                      ("weight_decay", None), ("reward_exp", None), ("kl_coef", None), ("unetreg", None),
                      ("guidance_scale", None)):  # fmt: skip
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and (value > 0 if low == 0 else value >= 0)):
            die(f"--{name.replace('_', '-')} must be a finite number {'> 0' if low == 0 else '>= 0'}, not {value}")
    unknown = set(filter(None, (args.allow_changes or "").split(","))) - set(RUN_SETTINGS)
    if unknown:
        die(f"--allow-changes: {', '.join(sorted(unknown))} is not a recorded setting ({', '.join(RUN_SETTINGS)})")
    args.flow_lr = args.lr if args.flow_lr is None else args.flow_lr
    # "For DAG-KL, we put the final beta coefficient on the KL gradient term" (the paper's training details)
    args.kl_coef = args.reward_exp if args.kl_coef is None else args.kl_coef


def load_prompts(args, conditional):
    """(train, eval) prompts: --prompts, else the reward's task set; for evaluation that set's eval split, or
    --eval-prompts (a set: its eval split; a file: all of it). An unconditional model gets the empty prompt (given
    flags are still checked, the task's default set is not fetched)."""
    spec = args.prompts or (rewards.TASK_PROMPTS.get(args.reward, "simple_animals") if conditional else None)
    try:
        train, held = rewards.prompt_set(spec) if spec else ([""], [""])
        if args.eval_prompts:
            prompts, split = rewards.prompt_set(args.eval_prompts)
            held = split if args.eval_prompts in rewards.PROMPT_SETS else prompts  # a file: every line of it
    except (OSError, ValueError) as e:
        die(f"prompts: {e}")
    return (train, held) if conditional else ([""], [""])


# --------------------------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything runs as rank 0 of 1)
# --------------------------------------------------------------------------------------------------------------------


def setup_distributed():
    """-> (rank, world_size, device). NCCL on GPU, gloo on CPU."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def average_gradients(params):
    """All-reduce the gradients of the trainable params in one flat buffer, once per optimizer step.

    No DistributedDataParallel: only ~7 M trainable parameters need syncing, and a param that missed the loss would
    make DDP's ranks silently diverge. A missing grad counts as zero so every rank sends the same layout."""
    if not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p).clone()


def broadcast_parameters(params):
    """Start every rank from rank 0's LoRA and flow initialisation."""
    if dist.is_initialized():
        for p in params:
            dist.broadcast(p.data, src=0)


def parameter_digest(params):
    """Per-rank fingerprints of the trainable weights, (world,) float64: equal entries mean the ranks are in sync."""
    digest = sum((p.detach().double() * (i + 1)).sum() for i, p in enumerate(params)).reshape(1)
    return gather(digest).tolist()


def gather(tensor):
    """Concatenate a (B, ...) tensor from every rank."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------------------------------
# Model loading and evaluation counting
# --------------------------------------------------------------------------------------------------------------------


def where(model):
    """How a --model value was read: a local directory if one exists at that path, else a hub id."""
    return f"local directory {model!r}" if Path(model).is_dir() else f"hub id {model!r}"


def pipeline_index(model, steps):
    """The pipeline's model_index.json (which components it has), once its scheduler is known to fit: a supported
    prediction type, and --steps within its schedule. Any problem is one error line, before weights load."""
    try:
        index = DiffusionPipeline.load_config(model)
        config = DDIMScheduler.load_config(model, subfolder="scheduler")
    except Exception as e:  # noqa: BLE001 -- every hub / filesystem failure means the same thing to the user
        if Path(model).is_dir():
            die(f"{where(model)} is not a diffusers pipeline: {e.__class__.__name__} reading its model_index.json or "
                "scheduler/scheduler_config.json (a partial copy?)")
        die(f"cannot fetch {where(model)} ({e.__class__.__name__}; no local directory of that name either). Offline, "
            f"download it once elsewhere (hf download {model} --local-dir DIR) and pass --model DIR")  # fmt: skip
    prediction, T = config.get("prediction_type", "epsilon"), config.get("num_train_timesteps", 1000)
    if prediction not in ("epsilon", "v_prediction"):
        die(f"{model}: prediction_type {prediction!r} is not supported (epsilon, v_prediction)")
    if steps >= T:  # leading spacing with offset 1: t = 1 + j * (T // N) must stay below T
        die(f"--steps {steps}: the model's schedule has {T} training timesteps, so at most {T - 1} DDIM steps")
    return index


def load_models(args, device, index=None):
    """-> Models with LoRA attached to the UNet, and a flow net for DAG (none for the baselines)."""
    index = index or pipeline_index(args.model, args.steps)
    conditional = "text_encoder" in index
    dtype = torch.bfloat16 if device.type == "cuda" and args.precision == "bf16" else torch.float32
    skip = {k: None for k in ("safety_checker", "feature_extractor", "image_encoder") if k in index}
    try:
        pipe = DiffusionPipeline.from_pretrained(args.model, dtype=dtype, **skip)
    except Exception as e:  # noqa: BLE001 -- a missing or truncated weights file, a partial download
        die(f"cannot load the weights of {where(args.model)}: {e.__class__.__name__}: {e}")
    scheduler = ddim_scheduler(pipe.scheduler.config, args.steps)
    unet = pipe.unet.to(device).requires_grad_(False)
    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                      target_modules=["to_k", "to_q", "to_v", "to_out.0"])  # fmt: skip
    if hasattr(unet, "add_adapter"):
        unet.add_adapter(lora)  # UNet2DConditionModel: diffusers' own LoRA format on save
    else:
        inject_adapter_in_model(lora, unet)  # UNet2DModel has no add_adapter
    if args.grad_checkpointing:
        unet.enable_gradient_checkpointing()  # active whenever grad is enabled, i.e. in the training forward only
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # trainable weights in fp32, frozen ones in `dtype`
    channels = unet.config.in_channels
    m = Models(unet=unet, scheduler=scheduler, flow=None, device=device, dtype=dtype,
               latent_shape=(channels, unet.config.sample_size, unet.config.sample_size))  # fmt: skip
    if conditional:
        m.vae = pipe.vae.to(device).requires_grad_(False)
        m.text_encoder = pipe.text_encoder.to(device).requires_grad_(False)
        m.tokenizer = pipe.tokenizer
        m.uncond = encode_prompts(m, [""])
    if args.algo in ("db", "kl"):
        m.flow = FlowNet(channels, m.text_encoder.config.hidden_size if conditional else None).to(device)  # fp32
    for kind, module in (("unet", m.unet), ("vae_decode", None if m.vae is None else m.vae.decoder), ("flow", m.flow)):
        if module is not None:
            count_evaluations(module, kind, m.counts)
    return m


def count_evaluations(module, kind, counts):
    """Tally every forward of `module` as counts[kind_fwd] += batch rows, and its backward (when autograd runs it)
    as counts[kind_bwd]: the cost accounting in log.jsonl is counted, not assumed. The forward is counted when it
    starts, so a whole-module recomputation by gradient checkpointing (which may stop before the end) counts too."""

    def count_forward(module, inputs):
        counts[f"{kind}_fwd"] += len(inputs[0])

    def count_backward(module, inputs, out):
        out = out if torch.is_tensor(out) else out[0]  # diffusers returns an output dataclass
        if out.requires_grad:
            out.register_hook(lambda grad: counts.update({f"{kind}_bwd": len(grad)}))

    module.register_forward_pre_hook(count_forward)
    module.register_forward_hook(count_backward)


def counted(reward_fn, counts, name="the reward"):
    """The reward fn, checked and counted: every call's output must be a finite float tensor of shape (B,) on the
    images' device, else the run stops with one line naming the reward, what was wrong and the fix (a NaN would
    otherwise reach the weights through the loss). Tallies images scored in counts["reward_fwd"], and calls of its
    image embedding (used for diversity), if it has one, in counts["reward_embed_fwd"]."""

    def fn(images, prompts):
        counts["reward_fwd"] += len(images)
        return check_reward(reward_fn(images, prompts), name, images)

    def embed(images):
        counts["reward_embed_fwd"] += len(images)
        return reward_fn.embed(images)

    fn.embed = embed if getattr(reward_fn, "embed", None) is not None else None
    return fn


def check_reward(scores, name, images):
    """`scores` if it is a finite float (B,) tensor on images.device; otherwise one error line."""
    B, fix = len(images), f"return one finite float score per image: a tensor of shape ({len(images)},)"
    if not torch.is_tensor(scores):
        die(f"reward {name!r} returned a {type(scores).__name__}, not a tensor: {fix}")
    if scores.shape != (B,) or not scores.is_floating_point():
        die(f"reward {name!r} returned a {scores.dtype} tensor of shape {tuple(scores.shape)} for {B} images: {fix}")
    if scores.device != images.device:
        die(f"reward {name!r} returned scores on {scores.device}, the images are on {images.device}: return them on "
            "images.device")
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        die(f"reward {name!r} returned {bad} non-finite score(s) (nan or inf) for {B} images: make it finite, e.g. "
            "clamp or torch.nan_to_num its output")
    return scores


# --------------------------------------------------------------------------------------------------------------------
# Evaluation (fixed noise, reward, diversity), cost accounting, images
# --------------------------------------------------------------------------------------------------------------------

# GFLOP per sample at SD-1.5 shapes (the project's cost model, from torch.utils.flop_counter); the reward is CLIP-L,
# and an image embedding for diversity is its vision tower, costed the same. Backwards of the VAE and of the reward
# (AlignProp) have no number here, and diffusers' per-block recomputation under --grad-checkpointing is not seen by
# the counters (about one more UNet forward per UNet backward): the total is a lower bound in those cases.
SD15_GFLOP = {"unet_fwd": 803, "unet_bwd": 910, "vae_decode_fwd": 2515, "reward_fwd": 162, "reward_embed_fwd": 162,
              "flow_fwd": 9, "flow_bwd": 18}  # fmt: skip


def cost_record(counts, trajectories):
    """Network evaluations per trajectory by kind, and their FLOP total at SD-1.5 per-evaluation costs."""
    per_traj = {f"evals_{k}": v / trajectories for k, v in sorted(counts.items())}
    tflop = sum(SD15_GFLOP.get(k, 0) * v for k, v in counts.items()) / trajectories / 1000
    return {**per_traj, "sd15_tflop_per_traj": tflop}


def peak_memory_gb(device):
    """CUDA: peak allocated since the last reset. CPU: the process's peak resident set (Linux reports KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def denoise(m, prompts, x, args, noise=None, generator=None, grad_steps=0):
    """x_T -> x_0 with the policy alone (no per-state reward, nothing stored), for evaluation and AlignProp.

    Step j's variance noise is noise[:, j] if given, else drawn from `generator`. The last `grad_steps` steps keep the
    graph, each UNet call under gradient checkpointing (its activations are recomputed in the backward)."""
    text = encode_prompts(m, prompts) if m.conditional else None
    N = len(m.scheduler.timesteps)
    for j, t_scalar in enumerate(m.scheduler.timesteps):
        t = torch.full((len(x),), int(t_scalar), device=m.device, dtype=torch.long)
        with torch.set_grad_enabled(torch.is_grad_enabled() and j >= N - grad_steps):
            if torch.is_grad_enabled():
                eps = checkpoint(lambda x_, t_=t: predict_eps(m, x_, t_, text, args.guidance_scale)[0], x,
                                 use_reentrant=False)  # fmt: skip
            else:
                eps, _ = predict_eps(m, x, t, text, args.guidance_scale)
            step_noise = None if noise is None else noise[:, j]
            x, _ = ddim_step_logprob(m.scheduler, eps, t, x, args.eta, generator=generator, noise=step_noise)
    return x


@torch.no_grad()
def sample_images(m, prompts, noise, args):
    """Images of the current policy from given noise (B, N + 1, C, H, W): noise[:, 0] is x_T and noise[:, j + 1] the
    variance noise of step j."""
    return decode(m, denoise(m, prompts, noise[:, 0], args, noise=noise[:, 1:]), args.decode_chunk)


def eval_noise(m, k, steps):
    """Noise of eval seed s = 0..k-1, (k, N + 1, C, H, W): the same at every evaluation and in every run, so images of
    one (prompt, seed) are comparable across epochs, algorithms and --seed."""
    return torch.stack([torch.randn((steps + 1, *m.latent_shape), generator=torch.Generator().manual_seed(s))
                        for s in range(k)])  # fmt: skip


def image_features(reward_fn, images):
    """Features for the diversity metric: the reward model's unit-norm image embedding (`reward_fn.embed`) when it
    has one; otherwise the image area-resampled to 32x32 and flattened, over sqrt(dim) (an RMS pixel distance)."""
    if getattr(reward_fn, "embed", None) is not None:
        f = reward_fn.embed(images).float()
        return f / f.norm(dim=-1, keepdim=True)
    small = F.interpolate(images.float(), size=(32, 32), mode="area").flatten(1)
    return small / math.sqrt(small.shape[1])


def diversity(features, k):
    """Mean pairwise L2 distance between the k samples of each prompt (rows grouped by prompt), averaged over prompts:
    0 when every prompt's samples are identical, larger as they spread; a fall during training is mode collapse."""
    f = features.reshape(-1, k, features.shape[-1])
    d = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")  # exact zeros for identical rows
    return (d.sum(dim=(1, 2)) / (k * (k - 1))).mean().item()


def evaluate(m, reward_fn, prompts, args, rank, world):
    """Sample every (eval prompt, seed) pair with fixed noise, split over ranks; score, embed, gather.

    -> (record, grid material) on rank 0, (None, None) elsewhere."""
    k = args.eval_samples
    m.counts.clear()
    pairs = [(p, s) for p in range(len(prompts)) for s in range(k)]
    per_rank = math.ceil(len(pairs) / world)
    mine = (pairs[rank * per_rank :] + pairs)[:per_rank]  # the last rank pads with repeats: equal shapes to gather
    noise = eval_noise(m, k, args.steps)
    scores, features, images = [], [], []
    for i in range(0, per_rank, args.sample_batch):
        chunk = mine[i : i + args.sample_batch]
        texts = [prompts[p] for p, _ in chunk]
        x0 = sample_images(m, texts, noise[[s for _, s in chunk]].to(m.device), args)
        with torch.no_grad():
            scores.append(reward_fn(x0, texts).float())
            features.append(image_features(reward_fn, x0))
        images.append((x0 * 255).round().to(torch.uint8))
    scores, features, images = (gather(torch.cat(v))[: len(pairs)] for v in (scores, features, images))
    if rank != 0:
        return None, None
    per_prompt = scores.view(len(prompts), k).mean(1)
    space = "reward embedding" if getattr(reward_fn, "embed", None) is not None else "pixels 32x32"
    record = {"eval_reward_mean": scores.mean().item(), "eval_reward_std": scores.std().item(),
              "diversity": diversity(features, k), "diversity_space": space,
              "eval_reward_per_prompt": [round(v, 5) for v in per_prompt.tolist()],
              **cost_record(m.counts, per_rank)}  # fmt: skip
    return record, (images.float().cpu() / 255, [f"seed {s}: {prompts[p]}" for p, s in pairs], scores.tolist())


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


def plot_curves(path, log, evals):
    """curves.png: training reward, eval reward and eval diversity against epoch (PIL only, no plotting library).
    Each panel's axes have labelled round ticks, so a small change does not look like a large one; non-finite points
    are left out (and counted in the title)."""
    panels = [("train reward (mean)", [(r["epoch"], r["reward_mean"]) for r in log]),
              ("eval reward (mean, fixed noise)", [(r["epoch"], r["eval_reward_mean"]) for r in evals]),
              ("eval diversity", [(r["epoch"], r["diversity"]) for r in evals])]  # fmt: skip
    W, H = 400, 280
    image = Image.new("RGB", (W * len(panels), H), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, points) in enumerate(panels):
        left, right, top, bottom = i * W + 64, (i + 1) * W - 14, 24, H - 34
        finite = [(x, y) for x, y in points if math.isfinite(y)]
        dropped = f" ({len(points) - len(finite)} non-finite left out)" if len(finite) < len(points) else ""
        draw.text((left, 6), title + dropped, fill="black")
        draw.rectangle((left, top, right, bottom), outline="gray")
        if not finite:
            continue
        xs, ys = zip(*finite)
        y_ticks, decimals = nice_ticks(min(ys), max(ys))
        x_ticks, _ = nice_ticks(min(xs), max(max(xs), min(xs) + 1))
        x_ticks = [x for x in x_ticks if x == int(x)]
        (x_lo, x_hi), (y_lo, y_hi) = (x_ticks[0], x_ticks[-1]), (y_ticks[0], y_ticks[-1])
        to_px = lambda x, y: (left + (x - x_lo) / (x_hi - x_lo) * (right - left),  # noqa: E731
                              bottom - (y - y_lo) / (y_hi - y_lo) * (bottom - top))  # fmt: skip
        for y in y_ticks:
            _, py = to_px(x_lo, y)
            draw.line((left, py, right, py), fill=(230, 230, 230))
            draw.text((i * W + 4, py - 6), f"{y:.{decimals}f}", fill="black")
        for x in x_ticks:
            px, _ = to_px(x, y_lo)
            draw.line((px, bottom, px, bottom + 4), fill="gray")
            draw.text((px - 6, bottom + 6), f"{int(x)}", fill="black")
        draw.text((right - 30, H - 14), "epoch", fill="gray")
        xy = [to_px(x, y) for x, y in finite]
        if len(xy) > 1:
            draw.line(xy, fill="steelblue", width=2)
        for x, y in xy:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill="steelblue")
    image.save(path)


def save_grid(path, images, prompts, scores, cols=4, size=192):
    """PNG grid of (B, 3, H, W) images in [0, 1] with the prompt and reward under each."""
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * size, rows * (size + 28)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (array, prompt, score) in enumerate(zip(rewards.to_uint8(images), prompts, scores)):
        x, y = (i % cols) * size, (i // cols) * (size + 28)
        grid.paste(Image.fromarray(array).resize((size, size), Image.NEAREST), (x, y))
        draw.text((x + 4, y + size + 2), f"{prompt[:28]}\nr = {float(score):.3f}", fill="black")
    grid.save(path)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints, resume, and stopping cleanly
# --------------------------------------------------------------------------------------------------------------------


class RunFailed(Exception):
    """A failure the run reports in one line (exit status 1): a full disk, non-finite gradients that persist."""


class Stop(Exception):
    """SIGTERM or SIGINT arrived: the run ends, its newest checkpoint intact."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Signals:
    """While active, SIGTERM (what a cluster scheduler sends before it kills a job) and SIGINT (Ctrl-C) raise Stop as
    soon as Python regains control from the running torch op, so a run ends within seconds. Inside
    `with signals.deferred():` (a log line, a checkpoint) the Stop waits for the block to finish, so no file is left
    half written. A context manager: the previous handlers are restored on exit."""

    def __enter__(self):
        self.depth, self.pending = 0, None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.depth:
            self.pending = signum
        else:
            raise Stop(signum)

    @contextlib.contextmanager
    def deferred(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0 and self.pending is not None:
                signum, self.pending = self.pending, None
                raise Stop(signum)


def rng_state(generators):
    return {name: g.get_state() for name, g in generators.items()}


def checkpoints(out):
    """OUT's checkpoint-EPOCH directories, newest first."""
    found = [p for p in out.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]), reverse=True)


def fsync_tree(path):
    """Flush every file under `path`, and the directories themselves, to disk."""
    for p in [*sorted(path.rglob("*")), path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(out, epoch, m, optimizer, generators, rank, history, algo, keep):
    """Rank 0 writes OUT/checkpoint-EPOCH: the files go to a temp directory, are fsynced, and the directory is renamed,
    so a kill or a full disk never leaves a broken checkpoint. Then the older checkpoints that `keep(epoch)` does not
    keep are deleted. Includes every rank's RNG states and DDPO's per-prompt history (the same on every rank).
    Raises RunFailed, on every rank, when the weights are not finite or the write fails."""
    states = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(states, rng_state(generators))
    else:
        states[0] = rng_state(generators)
    params = m.lora_params + m.flow_params
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise RunFailed(f"refusing to write checkpoint-{epoch}: the trainable weights are not finite")
    digests, error = parameter_digest(params), ""
    if rank == 0:
        final, tmp = out / f"checkpoint-{epoch}", out / f".checkpoint-{epoch}.tmp"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            lora = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(m.unet).items()}
            if m.conditional:  # diffusers' LoRA format, what pipe.load_lora_weights(dir) reads
                StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=convert_state_dict_to_diffusers(lora))
            else:
                save_file(lora, tmp / "pytorch_lora_weights.safetensors")  # peft key format (UNet2DModel)
            state = {"epoch": epoch, "algo": algo, "lora": lora, "optimizer": optimizer.state_dict(), "rng": states,
                     "flow": None if m.flow is None else m.flow.state_dict(), "digests": digests,
                     "ddpo_history": history}  # fmt: skip
            torch.save(state, tmp / "training_state.pt")
            fsync_tree(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            fsync_tree(out)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            intact = next((p.name for p in checkpoints(out)), None)
            error = (f"{e.strerror or e} while writing checkpoint-{epoch}; "
                     f"{intact + ' is intact' if intact else 'there is no earlier checkpoint'}")  # fmt: skip
        for old in checkpoints(out)[1:] if not error else []:
            if not keep(int(old.name.split("-")[1])):
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():  # every rank learns whether rank 0's write failed
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        error = errors[0]
    if error:
        raise RunFailed(error)
    if len(set(digests)) > 1:
        raise RuntimeError(f"ranks diverged: trainable-weight digests {digests}")


def find_checkpoint(out, resume, print0=print):
    """-> (path, state) of the checkpoint to resume: the given directory, or for 'auto' the newest OUT/checkpoint-*
    that loads (unreadable ones are skipped and named); (None, None) when there is none."""
    candidates = checkpoints(out) if resume == "auto" else [Path(resume)]
    for path in candidates:
        try:
            return path, torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 -- a truncated or missing file: any failure means "unreadable"
            if resume != "auto":
                die(f"--resume {resume!r}: cannot read {path / 'training_state.pt'} ({e.__class__.__name__})")
            print0(f"skipping {path}: unreadable ({e.__class__.__name__}: {' '.join(str(e).split())[:120]})")
    return None, None


def load_checkpoint(path, state, m, optimizer, generators, rank, history, algo):
    """Restore LoRA, flow, optimizer, DDPO's history and this rank's RNG streams. -> the number of completed epochs."""
    if state.get("algo", algo) != algo:
        die(f"--resume {path}: that run trained with --algo {state['algo']}, not --algo {algo}")
    set_peft_model_state_dict(m.unet, state["lora"])
    if m.flow is not None:
        m.flow.load_state_dict(state["flow"])
    history.update(state.get("ddpo_history") or {})
    optimizer.load_state_dict(state["optimizer"])
    if rank < len(state["rng"]):
        for name, g in generators.items():
            g.set_state(state["rng"][rank][name])
    return state["epoch"]


# Settings that change what a run computes: a resume must use the recorded ones, unless --allow-changes names them.
RUN_SETTINGS = ("model", "model_digest", "reward", "prompts", "eval_prompts", "eval_samples", "algo", "steps", "eta",
                "guidance_scale", "cfg", "lora_rank", "sample_batch", "num_batches", "train_batch", "grad_accum",
                "world_size", "epochs", "reward_exp", "anneal", "kl_coef", "unetreg", "clip_range", "adv_clip",
                "min_count", "buffer_size", "truncation", "lr", "flow_lr", "weight_decay", "max_grad_norm", "seed")


def model_digest(unet, n=32):
    """A fingerprint of the frozen base weights: the middle entry of each of the first n non-constant frozen tensors.
    Another model of the same shapes gives other numbers; a bf16 and an fp32 copy of one model agree to < 1 %."""
    frozen = [p.detach().flatten() for p in unet.parameters() if not p.requires_grad and p.numel() > 1]
    return [float(p[p.numel() // 2]) for p in frozen if bool(p.min() != p.max())][:n]


def run_settings(args, world, digest):
    return {**vars(args), "world_size": world, "model_digest": digest}


def check_resume(record, settings, start):
    """Compare a resume's settings with the run's record (its args.json). -> the changed names (all allowed by
    --allow-changes; otherwise one error line listing every difference)."""

    def same(a, b):
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):  # the model digest
            return math.dist(a, b) <= 1e-2 * math.hypot(*a)
        return math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) and isinstance(b, float) else a == b

    changed = [k for k in RUN_SETTINGS if k in record and not same(record[k], settings[k])]
    allowed = set(filter(None, (settings["allow_changes"] or "").split(",")))
    refused = [k for k in changed if k not in allowed]
    if refused:
        diff = "; ".join("model_digest (other base weights)" if k == "model_digest" else
                         f"{k} {record[k]!r} -> {settings[k]!r}" for k in refused)  # fmt: skip
        die(f"--resume: settings differ from the run's record (args.json): {diff}. Resume with the recorded ones, or "
            f"pass --allow-changes {','.join(refused)} to continue with the new ones")
    return changed


def beta_note(record, settings, start):
    """What a changed --epochs (or --reward-exp) does to the beta schedule from the resumed epoch on."""
    old, new = (reward_exp_at(start, s["epochs"], s["reward_exp"], s["anneal"]) for s in (record, settings))
    final = math.ceil(settings["epochs"] / 2) if settings["anneal"] else 0
    return (f"beta at epoch {start} is {new:.4g} (the recorded schedule: {old:.4g}); it reaches "
            f"{settings['reward_exp']:g} at epoch {final}")


def supersede(out, start):
    """Resuming at epoch `start`: move what the resumed run will redo (log records from `start` on, checkpoints after
    it; the whole earlier record when `start` is 0) to OUT/superseded/<time>/, so no history is ever deleted."""
    keep = out / "superseded" / time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for name in ("log.jsonl", "eval.jsonl"):
        records = read_jsonl(out / name)
        redo = [r for r in records if r["epoch"] >= start]
        if redo:
            keep.mkdir(parents=True, exist_ok=True)
            (keep / name).write_text("".join(f"{json.dumps(r)}\n" for r in redo))
            write_atomic(out / name, "".join(f"{json.dumps(r)}\n" for r in records if r["epoch"] < start))
            moved.append(f"{len(redo)} {name} records")
    for path in [p for p in checkpoints(out) if int(p.name.split("-")[1]) > start] + (
            [out / "args.json", out / "resumes.jsonl"] if start == 0 else []):  # fmt: skip
        if path.exists():
            keep.mkdir(parents=True, exist_ok=True)
            os.replace(path, keep / path.name)
            moved.append(path.name)
    return f"moved to {keep}: {', '.join(moved)}" if moved else ""


def write_atomic(path, text):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------------------------
# Baselines on the same sampler, rewards and loop: DDPO (--algo ddpo) and AlignProp (--algo alignprop).
# Each is an epoch function with dag_epoch's return shape; neither has a flow network or a reward temperature.
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def ddpo_rollout(m, reward_fn, prompts, args, generator):
    """DDPO's rollout: the same policy steps as DAG's, terminal reward only (no per-state x0_pred reward, no eps)."""
    B = len(prompts)
    text = encode_prompts(m, prompts) if m.conditional else None
    x = torch.randn((B, *m.latent_shape), generator=generator, device=m.device)
    states, log_pfs = [x], []
    for t_scalar in m.scheduler.timesteps:
        t = torch.full((B,), int(t_scalar), device=m.device, dtype=torch.long)
        x, log_pf, _, _ = policy_step(m, x, t, text, args, generator)
        states.append(x)
        log_pfs.append(log_pf)
    images = decode(m, x, args.decode_chunk)
    timesteps = torch.cat([m.scheduler.timesteps, torch.zeros(1, dtype=torch.long)]).to(m.device)
    ro = Rollout(states=torch.stack(states, 1), timesteps=timesteps, log_pf_rollout=torch.stack(log_pfs, 1),
                 eps_rollout=None, x0_pred_reward=None, reward=reward_fn(images, prompts).float(), text=text)
    return ro, images


def per_prompt_advantages(scores, prompt_ids, history, min_count, buffer_size):
    """DDPO's advantages (Black et al. 2023, arXiv 2305.13301): each terminal reward standardised by the mean / std of
    the last `buffer_size` rewards of its prompt (this batch included), or by the batch's while the prompt has fewer
    than `min_count`. history: {prompt id: [rewards]}, updated in place. (B,) float -> (B,) float."""
    advantages = torch.empty_like(scores)
    for pid in prompt_ids.unique().tolist():
        rows = prompt_ids == pid
        seen = (history.get(pid, []) + scores[rows].tolist())[-buffer_size:]
        history[pid] = seen
        ref = torch.tensor(seen, dtype=scores.dtype) if len(seen) >= min_count else scores.cpu()
        advantages[rows] = (scores[rows] - ref.mean().item()) / (ref.std(unbiased=False).item() + 1e-6)
    return advantages


def ddpo_loss(m, batch, advantages, args):
    """DDPO's per-transition loss: the PPO-clipped surrogate with the trajectory's advantage (b,)."""
    log_pf, _ = policy_logprob(m, batch, args)
    loss = ppo_clip_loss(log_pf, batch.log_pf_rollout, advantages, args.clip_range)
    return loss, {"loss": loss.detach().mean(), "log_pf": log_pf.detach().mean()}


def ddpo_epoch(m, reward_fn, prompts, optimizer, history, args, generators, rank=0, world=1):
    """One DDPO epoch: rollouts, advantages from the rewards and prompts of ALL ranks, one pass of PPO training."""
    t0 = time.time()
    parts, ids, grid = [], [], None
    for _ in tqdm(range(args.num_batches), desc="ddpo sample", disable=rank != 0, leave=False):
        idx, batch_prompts = draw_prompts(prompts, args.sample_batch, generators["cpu"])
        ro, images = ddpo_rollout(m, reward_fn, batch_prompts, args, generators["noise"])
        grid = grid or (images[:16].cpu(), batch_prompts[:16], ro.reward[:16].tolist())
        parts.append(ro)
        ids.append(idx.to(m.device))
    ro = Rollout.cat(parts)
    scores = per_prompt_advantages(gather(ro.reward), gather(torch.cat(ids)), history, args.min_count, args.buffer_size)
    advantages = scores.clamp(-args.adv_clip, args.adv_clip).view(world, -1)[rank]  # this rank's trajectories
    t1 = time.time()
    stats = train_epoch(m, ro, optimizer, lambda batch: ddpo_loss(m, batch, advantages[batch.rows], args), args,
                        generators["cpu"], rank)  # fmt: skip
    return ro.reward, grid, {**stats, "rollout_s": t1 - t0, "train_s": time.time() - t1}


def alignprop_loss(m, reward_fn, prompts, args, generator):
    """AlignProp (Prabhudesai et al. 2023, arXiv 2310.03739): loss = -r(decode(x_0)), backpropagated through the
    sampler. The first N - K steps run without grad; the last K = --truncation steps and the decode keep the graph,
    each under gradient checkpointing. -> (loss (B,), reward (B,) detached, images)."""
    x_T = torch.randn((len(prompts), *m.latent_shape), generator=generator, device=m.device)
    x = denoise(m, prompts, x_T, args, generator=generator, grad_steps=args.truncation)
    images = checkpoint(decode, m, x, args.decode_chunk, use_reentrant=False)
    reward = reward_fn(images, prompts).float()
    if not reward.requires_grad:
        die(f"--algo alignprop: reward {args.reward!r} returned no gradient")
    return -reward, reward.detach(), images.detach()


def alignprop_epoch(m, reward_fn, prompts, optimizer, args, generators, rank=0):
    """One AlignProp epoch with DAG's batch arithmetic: num_batches * sample_batch trajectories per process, sampled
    and trained in micro-batches of train_batch, an optimizer step every grad_accum. Sampling is training here, so
    all the time is train_s."""
    t0, per_rank, scores, losses, taken, grid = time.time(), args.sample_batch * args.num_batches, [], [], [], None
    for k in tqdm(range(per_rank // args.train_batch), desc="alignprop", disable=rank != 0, leave=False):
        _, batch_prompts = draw_prompts(prompts, args.train_batch, generators["cpu"])
        loss, reward, images = alignprop_loss(m, reward_fn, batch_prompts, args, generators["noise"])
        (loss.mean() / args.grad_accum).backward()
        if (k + 1) % args.grad_accum == 0:
            taken.append(optimizer_step(m, optimizer, args))
        scores.append(reward)
        losses.append(loss.detach().mean())
        grid = grid or (images.cpu()[:16], batch_prompts[:16], reward[:16].tolist())
    loss = gather(torch.stack(losses).mean().reshape(1)).mean().item()
    return torch.cat(scores), grid, {"loss": loss, "steps_taken": taken, "rollout_s": 0.0, "train_s": time.time() - t0}


# --------------------------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    out = Path(args.out)
    check_out(out, args.resume)
    rank, world, device = setup_distributed()
    try:
        with Signals() as signals:
            train(args, out, rank, world, device, signals)
    except Stop as e:
        newest = next((str(p) for p in checkpoints(out)), None)
        if rank == 0:
            say(f"dag.py: stopped by {e}; {f'the newest checkpoint is {newest}' if newest else 'no checkpoint yet'}: "
                "continue with --resume auto")
        raise SystemExit(128 + e.signum) from None
    except RunFailed as e:  # raised on every rank alike
        if rank == 0:
            say(f"dag.py: error: {e}")
        raise SystemExit(1) from None
    except BaseException as e:
        if not isinstance(e, SystemExit):  # a bug or a library error: say where the run can continue from
            newest = next((str(p) for p in checkpoints(out)), None)
            if rank == 0:
                say(f"dag.py: {e.__class__.__name__} during training; the newest checkpoint is {newest}: continue "
                    "with --resume auto once it is fixed")
        traceback.clear_frames(e.__traceback__)  # the traceback would keep train's models alive through teardown
        raise
    finally:
        gc.collect()  # NOTE: freeing the models before teardown avoids an intermittent gloo abort at exit
        if dist.is_initialized():
            dist.destroy_process_group()


def check_out(out, resume):
    """--out must be a writable directory, and a fresh one unless --resume: checked before anything heavy loads."""
    if out.exists() and not out.is_dir():
        die(f"--out {out} is a file, not a directory")
    if resume is None and (any((out / n).exists() for n in ("log.jsonl", "args.json")) or checkpoints(out)):
        die(f"{out} already holds a run: pass --resume auto to continue it, or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        die(f"--out {out} is not writable ({e.__class__.__name__}: {e.strerror or e})")


CONSOLE_KEYS = ("epoch", "reward_exp", "reward_mean", "reward_std", "loss", "log_flow", "unetreg", "rollout_s",
                "train_s", "traj_per_s", "peak_mem_gb", "sd15_tflop_per_traj")  # fmt: skip
MAX_SKIPS_IN_A_ROW = 3  # optimizer steps with a non-finite gradient before the run stops


def train(args, out, rank, world, device, signals):
    """Load everything, then the epoch loop: (evaluate) -> one epoch of --algo -> log -> checkpoint."""
    print0 = print if rank == 0 else (lambda *a, **k: None)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)  # weight init; rank 0's is broadcast below anyway
    # NOTE: CRUCIAL: a different seed per rank for prompts, noise and shuffling, or every GPU draws the same samples
    generators = {"noise": torch.Generator(device).manual_seed(args.seed + rank),
                  "cpu": torch.Generator().manual_seed(args.seed + rank)}  # fmt: skip
    # prompts and reward before the diffusion model, so that a mistake in either fails in seconds
    index = pipeline_index(args.model, args.steps)
    prompts, eval_prompts = load_prompts(args, "text_encoder" in index)
    try:
        reward_fn = rewards.load(args.reward, device)
    except (ImportError, OSError, ValueError) as e:
        die(f"cannot load reward {args.reward!r}: {e}")
    m = load_models(args, device, index)
    reward_fn = counted(reward_fn, m.counts, args.reward)
    groups = [{"params": m.lora_params, "lr": args.lr}] + ([{"params": m.flow_params, "lr": args.flow_lr}]
                                                            if m.flow is not None else [])  # fmt: skip
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=args.weight_decay, eps=1e-8)
    broadcast_parameters(m.lora_params + m.flow_params)
    history = {}  # DDPO's rewards per prompt id
    start = start_or_resume(args, out, m, optimizer, generators, history, rank, world, signals)
    per_rank = args.sample_batch * args.num_batches
    print0(header(args, m, world, device, len(eval_prompts)))
    # NOTE: eval mode throughout, training included: neither net has dropout or batch-norm to switch on, and train mode
    # takes other kernels, so the training forward would no longer reproduce the rollout's eps bitwise.
    m.unet.eval()
    if m.flow is not None:
        m.flow.eval()
    def run_epoch(e):
        if args.algo in ("db", "kl"):
            return dag_epoch(m, reward_fn, prompts, optimizer, e, args, generators, rank)
        if args.algo == "ddpo":
            return ddpo_epoch(m, reward_fn, prompts, optimizer, history, args, generators, rank, world)
        return alignprop_epoch(m, reward_fn, prompts, optimizer, args, generators, rank)

    eval_due = lambda e: args.eval_every and (e % args.eval_every == 0 or e == args.epochs)  # noqa: E731
    keep = lambda e: e % args.save_every == 0 or e == args.epochs  # noqa: E731 -- the others roll
    skipped_in_a_row = 0
    for epoch in range(start, args.epochs):
        if eval_due(epoch):
            log_evaluation(m, reward_fn, eval_prompts, args, out, epoch, rank, world, signals)
        m.counts.clear()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.time()
        local_rewards, grid, stats = run_epoch(epoch)
        seconds, all_rewards = time.time() - t0, gather(local_rewards)
        taken = stats.pop("steps_taken")
        for ok in taken:
            skipped_in_a_row = 0 if ok else skipped_in_a_row + 1
            if skipped_in_a_row == MAX_SKIPS_IN_A_ROW:
                raise RunFailed(f"{MAX_SKIPS_IN_A_ROW} optimizer steps in a row had a non-finite gradient (epoch "
                                f"{epoch}); they were skipped, so the weights and checkpoints are finite")
        record = {"epoch": epoch, "reward_mean": all_rewards.mean().item(),
                  "reward_std": all_rewards.std().item() if all_rewards.numel() > 1 else 0.0, **stats,
                  "skipped_steps": taken.count(False), "traj_per_s": per_rank * world / seconds,
                  "transitions_per_s": per_rank * world * args.steps / seconds,
                  "peak_mem_gb": peak_memory_gb(device), **cost_record(m.counts, per_rank)}  # fmt: skip
        with signals.deferred():
            if rank == 0:  # the log line first: a kill before the checkpoint below only makes a resume redo the epoch
                print(" | ".join(f"{k} {record[k]:.4g}" for k in CONSOLE_KEYS if k in record), flush=True)
                with open(out / "log.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                save_grid(out / f"samples-{epoch:04d}.png", *grid)
                plot_curves(out / "curves.png", read_jsonl(out / "log.jsonl"), read_jsonl(out / "eval.jsonl"))
            # NOTE: a checkpoint every epoch (older ones are deleted unless keep() holds them), so a kill, a crash or
            # a full disk loses at most the epoch it interrupts
            save_checkpoint(out, epoch + 1, m, optimizer, generators, rank, history, args.algo, keep)
    if eval_due(args.epochs):
        log_evaluation(m, reward_fn, eval_prompts, args, out, args.epochs, rank, world, signals)


def start_or_resume(args, out, m, optimizer, generators, history, rank, world, signals):
    """Restore the checkpoint that --resume names (checked against the run's recorded settings), move aside what the
    resumed run will redo, and keep the record: args.json on a fresh start, a line in resumes.jsonl on a resume.
    -> the epoch to start at."""
    print0 = print if rank == 0 else (lambda *a, **k: None)
    settings, start = run_settings(args, world, model_digest(m.unet)), 0
    if rank == 0:
        for stale in out.glob(".checkpoint-*.tmp"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
    path, state = find_checkpoint(out, args.resume, print0) if args.resume else (None, None)
    record = json.loads((out / "args.json").read_text()) if (out / "args.json").is_file() else None
    if state is not None:
        changed = check_resume(record, settings, state["epoch"]) if record else []
        start = load_checkpoint(path, state, m, optimizer, generators, rank, history, args.algo)
        print0(f"resumed from {path} at epoch {start}" + (f" with changed {', '.join(changed)}" if changed else ""))
        if {"epochs", "reward_exp", "anneal"} & set(changed) and args.algo in ("db", "kl"):
            print0(f"note: {beta_note(record, settings, start)}")
    elif args.resume:
        print0(f"no checkpoint in {out}: starting at epoch 0")
    with signals.deferred():
        if rank == 0:
            note = supersede(out, start) if args.resume else ""
            if note:
                print(note)
            if start == 0:  # the run's record of its settings, written once and never overwritten
                (out / "args.json").write_text(json.dumps({**settings, "argv": sys.argv}, indent=2))
            else:
                with open(out / "resumes.jsonl", "a") as f:
                    f.write(json.dumps({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "epoch": start,
                                        "checkpoint": str(path), "argv": sys.argv}) + "\n")  # fmt: skip
    return start


def header(args, m, world, device, n_eval):
    """The run's first console lines: what trains, on what, with which batch arithmetic."""
    per_rank = args.sample_batch * args.num_batches
    n_lora, n_flow = sum(p.numel() for p in m.lora_params), sum(p.numel() for p in m.flow_params)
    name = f"DAG-{args.algo.upper()}" if m.flow is not None else args.algo.upper()
    evaluation = "off"
    if args.eval_every:
        evaluation = f"{n_eval} prompts x {args.eval_samples} seeds every {args.eval_every} epochs"
    return (f"{name} | {args.model} ({'text-to-image' if m.conditional else 'unconditional'}) | world {world} | "
            f"device {device.type} | frozen {m.dtype} | trainable LoRA {n_lora:,} + flow {n_flow:,}\n"
            f"per process: {args.num_batches} x {args.sample_batch} trajectories of {args.steps} steps, train batch "
            f"{args.train_batch} x accum {args.grad_accum} -> {per_rank // (args.train_batch * args.grad_accum)} "
            f"optimizer steps/epoch | global: {per_rank * world} trajectories/epoch | evaluation: {evaluation}")


def log_evaluation(m, reward_fn, prompts, args, out, epoch, rank, world, signals):
    """Evaluate; rank 0 appends to eval.jsonl, saves eval-EPOCH.png (prompt rows x seed columns) and curves.png."""
    t0 = time.time()
    record, grid = evaluate(m, reward_fn, prompts, args, rank, world)
    with signals.deferred():
        if rank != 0:
            return
        record = {"epoch": epoch, **record, "eval_s": time.time() - t0}
        keys = ("eval_reward_mean", "eval_reward_std", "diversity", "eval_s")
        print(f"eval {epoch} | " + " | ".join(f"{k} {record[k]:.4g}" for k in keys), flush=True)
        with open(out / "eval.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        save_grid(out / f"eval-{epoch:04d}.png", *grid, cols=args.eval_samples)
        plot_curves(out / "curves.png", read_jsonl(out / "log.jsonl"), read_jsonl(out / "eval.jsonl"))


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


if __name__ == "__main__":
    main()
