"""DAG: Diffusion Alignment with GFlowNets, in one file.

DAG post-trains a diffusion model against a black-box reward r(x_0) by reading its N-step DDIM sampler as a GFlowNet
(Zhang, Zhang, Gu, Zhang, Susskind, Jaitly, Zhai, "Improving GFlowNets for Text-to-Image Diffusion Alignment",
arXiv 2406.00633, TMLR 2025). A state is (x_t, t, prompt). The forward policy p_theta(x_child | x_t) is one stochastic
DDIM step of the LoRA-adapted UNet, whose child x_child is one step closer to the image; the backward policy
p_B(x_t | x_child) is the fixed noising kernel q; a flow network F_phi(x_t, t, prompt) is trained with the policy so
that the flows balance on every transition (detailed balance, DB).

For a transition x_t -> x_child of a stored rollout, with beta = reward_exp (the reward's inverse temperature):

    log F(x_t)  = F_phi(x_t, t, c) + beta * r(decode(x0_pred(x_t)))     forward-looking flow (x0_pred: Tweedie)
    log F(x_0)  = beta * r(x_0)                                         terminal boundary
    residual    = log F(x_t) + log p_theta(x_child | x_t) - log p_B(x_t | x_child) - log F(x_child)
    DAG-DB      : residual^2                                                              (--algo db, the default)
    DAG-KL      : residual^2 with log p_theta detached (trains phi only)
                  + kl_coef * a PPO-clipped REINFORCE term with advantage -residual (trains theta)      (--algo kl)
    both        : + unetreg * mean((eps_theta - eps_rollout)^2), a proximal pull toward the rollout policy

What DAG samples. A zero residual on every transition telescopes (p_B = q fixed, F(x_0) = R(x_0)) to F(x_T)
p_theta(x_{0:T-1} | x_T) = R(x_0) q(x_{1:T} | x_0), so with x_T ~ p(x_T) = N(0, I) the sampler draws x_0 with
probability R(x_0) w(x_0), w(x_0) = E_{x_T ~ q(x_T | x_0)}[p(x_T) / F(x_T)], F(x_T) = integral of R(x_0') q(x_T | x_0')
dx_0': an envelope made of the noising kernel, the prior of x_T and the flow, in which the base model's density does not
appear (p_base * exp(beta r) is the target of KL-regularised RL, not of DAG). The log-probs here are means over the D =
C*H*W dimensions of a state, so R(x_0) = exp(D * beta * r(x_0)), D = 16384 for SD latents: essentially the reward's
maximisers. What keeps the samples near the base model in practice is the LoRA starting at the base and a short run of
small steps (200 optimizer steps in the release's configuration, each gradient clipped to norm 1, unetreg pulling toward
the last rollout's policy, which itself moves; DAG-KL's PPO clip), not the fixed point.

Usage:
    torchrun --nproc_per_node=8 dag.py --reward aesthetic       # the paper's aesthetic run: SD-1.5, 100 epochs
    python dag.py --reward aesthetic --trajectories 512 --grad-accum 32     # one GPU, the batches of 8 GPUs
    python dag.py --algo kl ...       # DAG-KL; --algo ddpo / alignprop: the baselines (benchmark/baselines.py)
    python dag.py --model benchmark/models/digits-ddpm --reward benchmark.digits:digit3 ...   # a CPU run: README

Shapes: B trajectories (b in a micro-batch), N denoising steps, K trained transitions per trajectory, C/H/W channels,
height and width of a state (SD: latents 4x64x64), L text tokens, E text width.
"""

import argparse
import contextlib
import dataclasses
import fcntl
import gc
import hashlib
import importlib
import json
import logging
import math
import os
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

# transformers says at import that torchvision is absent and it falls back to PIL; nothing here needs it
logging.getLogger("transformers.utils.import_utils").addFilter(lambda r: "requires torchvision" not in r.getMessage())
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import get_down_block
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from PIL import Image, ImageDraw
from tqdm import tqdm

import rewards

# ==================================================== THE DAG PATH ====================================================

# --- DDIM transition log-probs (Song et al. 2021, Eq. 12, sigma_t = eta * sigma). Conventions a copier must keep: the
# --- model predicts epsilon (v is converted), log-probs are MEANS over dimensions, the schedule has steps_offset=1.
def ddim_scheduler(config, steps):
    """A DDIMScheduler from any diffusers scheduler config, set to `steps` inference steps. NOTE: "leading" spacing with
    steps_offset=1 gives t = 981, 961, ..., 1 (N = 50) for SD and the CIFAR-10 DDPM alike; the DDPM's own config (offset
    0, set_alpha_to_one) ends on a step from t = 0 to t = 0 with zero variance, whose log-prob is 0/0. clip_sample and
    prediction_type are kept from the config (CIFAR: clip; SD: no clip)."""
    scheduler = DDIMScheduler.from_config(config, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    return scheduler


def alphas_at(scheduler, t, like):
    """alpha_bar at t and at the child's timestep max(t - T/N, 0), shaped (B, 1, 1, 1) like `like`."""
    alphas_cumprod = scheduler.alphas_cumprod.to(like.device)  # float32 (T,)
    delta = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    shape = (-1,) + (1,) * (like.ndim - 1)
    return tuple(alphas_cumprod[s].view(shape).to(like.dtype) for s in (t, (t - delta).clamp(min=0)))


def gaussian_logprob(x, mean, std):
    """log N(x; mean, std^2 I) -> (B,).

    NOTE: the MEAN over non-batch dims, not the sum (the release's logp_mean=True, ddim_with_logprob.py:201-203). DB
    with mean log-probs, exponent beta and flow F equals DB with summed log-probs, exponent D*beta and flow D*F,
    divided by D**2; every published hyperparameter was tuned for the mean."""
    logp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return logp.mean(dim=tuple(range(1, x.ndim)))


def model_output_to_eps(scheduler, output, t, x_t):
    """The UNet's output as an epsilon prediction: unchanged for "epsilon" models (SD-1.x, the CIFAR DDPM). NOTE: for
    "v_prediction" models (SD-2.x 768) eps = sqrt(a_t) v + sqrt(1 - a_t) x_t. Other types raise ValueError."""
    if (kind := scheduler.config.prediction_type) not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {kind!r} is not supported (only 'epsilon' and 'v_prediction')")
    a_t = alphas_at(scheduler, t, x_t)[0] if kind == "v_prediction" else None  # on every UNet call: only when used
    return output if a_t is None else a_t.sqrt() * output + (1 - a_t).sqrt() * x_t


def predict_x0(scheduler, eps, t, x_t):
    """Tweedie estimate x0_pred = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), no clamp."""
    a_t, _ = alphas_at(scheduler, t, x_t)
    return (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()


def ddim_step_logprob(scheduler, eps, t, x_t, eta=1.0, x_child=None, generator=None, noise=None):
    """One DDIM step p_theta(x_child | x_t) = N(mu, s_t^2 I); samples x_child = mu + s_t * noise when x_child is None
    (noise drawn from `generator` unless given). -> (x_child, log_pf (B,)).

        x0   = predict_x0(eps), clamped iff scheduler.config.clip_sample
        s_t  = eta * sqrt((1 - a') / (1 - a_t) * (1 - a_t / a'))          (a = alpha_bar; a' at the child's t)
        mu   = sqrt(a') x0 + sqrt(1 - a' - s_t^2) eps
    """
    a_t, a_child = alphas_at(scheduler, t, x_t)
    x0 = predict_x0(scheduler, eps, t, x_t)
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    std = eta * ((1 - a_child) / (1 - a_t) * (1 - a_t / a_child)).sqrt()
    if not bool((std > 0).all()):
        raise ValueError("DDIM step with zero std (the child's t equals t): build the scheduler with steps_offset=1")
    mean = a_child.sqrt() * x0 + (1 - a_child - std**2).sqrt() * eps
    if x_child is None:
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        x_child = mean + std * noise
    return x_child, gaussian_logprob(x_child, mean, std)


def backward_logprob(scheduler, t, x_t, x_child):
    """log p_B(x_t | x_child) = log N(x_t; sqrt(a_t / a') x_child, (1 - a_t / a') I), mean over dims; no gradient."""
    x_t, x_child = x_t.detach(), x_child.detach()
    a_t, a_child = alphas_at(scheduler, t, x_t)
    ratio = a_t / a_child
    return gaussian_logprob(x_t, ratio.sqrt() * x_child, (1 - ratio).sqrt())


# --- Flow network F_phi(x_t, t, c) -> (B,) (release: ConditionalFlow, alignment/flow.py), from diffusers' blocks
class FlowNet(nn.Module):
    """Time-conditioned conv encoder with cross-attention to the prompt, pooled to one scalar per state: timestep ->
    sinusoid(c0) -> MLP(4 c0); conv_in 3x3 -> one down block per entry of `channels` (each halves H and W; all but the
    last cross-attend to the L x E text states when `cross_attention_dim` is set) -> mean over positions -> Linear. The
    default channels are the release's (6,452,993 params at SD-1.5 shapes); a small model takes a small flow
    (--flow-channels). NOTE: the release pools with AvgPool2d(4) (flow.py:135), the global mean for 64x64 latents; the
    global mean here equals it there and works at any size."""

    def __init__(self, in_channels=4, cross_attention_dim=768, channels=(64, 128, 256, 256)):
        super().__init__()
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], 4 * channels[0])
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(zip(channels[:1] + channels[:-1], channels)):
            kind = "DownBlock2D" if cross_attention_dim is None or i == len(channels) - 1 else "CrossAttnDownBlock2D"
            self.blocks.append(get_down_block(kind, 1, c_in, c_out, 4 * channels[0], add_downsample=True,
                                              resnet_eps=1e-5, resnet_act_fn="silu", resnet_groups=32,
                                              cross_attention_dim=cross_attention_dim, num_attention_heads=8,
                                              attention_head_dim=8, downsample_padding=1))
        self.head = nn.Linear(channels[-1], 1)

    def forward(self, x_t, t, text=None):
        temb = self.time_embedding(self.time_proj(t).to(x_t.dtype))  # (B, 4 c0)
        h = self.conv_in(x_t)
        for block in self.blocks:
            attend = getattr(block, "has_cross_attention", False)
            h, _ = block(h, temb, encoder_hidden_states=text) if attend else block(h, temb)
        return self.head(h.mean(dim=(2, 3))).squeeze(-1)  # NOTE: (B,) also for B = 1, where flow.py:170 gives 0-d


# --- Trajectories as data: what a rollout stores, and a micro-batch of transitions taken from it
@dataclasses.dataclass
class Rollout:
    """B trajectories of N DDIM steps, stored as chains of N + 1 states: step j goes from state j (its x_t) to state
    j + 1 (its child), and state N is the image x_0. Every field is indexed by trajectory first."""

    prompts: list  # B prompt strings
    text: torch.Tensor | None  # (B, L, E) prompt states (CLIP's last hidden state); None for an unconditional model
    states: torch.Tensor  # (B, N + 1, C, H, W) fp32, exactly as sampled, so the training forward reproduces log_pf
    timesteps: torch.Tensor  # (N + 1,) long: the DDPM timestep of each state, 0 for x_0
    log_pf: torch.Tensor  # (B, N) log p_theta_rollout(state j + 1 | state j)
    eps: torch.Tensor  # (B, N, C, H, W) the epsilon of step j as the training forward computes it (CFG-guided)
    x0_pred: torch.Tensor  # (B, N, C, H, W) Tweedie estimate of x_0 from state j, text branch only (no CFG)
    state_reward: torch.Tensor  # (B, N + 1) raw r(decode(x0_pred)) of each state once scored, NaN before; r(x_0) at N

    @property
    def reward(self):
        return self.state_reward[:, -1]  # (B,) r(x_0)

    def transitions(self, rows, steps):
        """Step steps[i] of trajectory rows[i] for each i (both (b,) long), as a micro-batch."""
        text = None if self.text is None else self.text[rows]
        return Transitions(rows, self.states[rows, steps], self.states[rows, steps + 1], self.timesteps[steps],
                           self.timesteps[steps + 1], steps + 1 == len(self.timesteps) - 1, text,
                           self.log_pf[rows, steps], self.eps[rows, steps], self.state_reward[rows, steps],
                           self.state_reward[rows, steps + 1])


@dataclasses.dataclass
class Transitions:
    """A training micro-batch: one transition x_t -> x_child of each of b trajectories."""

    rows: torch.Tensor  # (b,) which trajectories of the rollout
    x_t: torch.Tensor  # (b, C, H, W) the parent state
    x_child: torch.Tensor  # (b, C, H, W) the child, one step closer to the image (diffusers' prev_sample)
    t: torch.Tensor  # (b,) timestep of x_t
    t_child: torch.Tensor  # (b,) timestep of x_child, max(t - T/N, 0)
    child_is_x0: torch.Tensor  # (b,) bool: the last step, whose child is the image x_0
    text: torch.Tensor | None  # (b, L, E)
    log_pf_rollout: torch.Tensor  # (b,) log p_theta_rollout(x_child | x_t)
    eps_rollout: torch.Tensor  # (b, C, H, W)
    r_t: torch.Tensor  # (b,) raw reward of x_t's x0 prediction
    r_child: torch.Tensor  # (b,) raw reward of x_child's x0 prediction; at the last step, r(x_0)


# --- DAG objectives: pure functions of (b,) tensors (log_flows: of a flow module and a micro-batch), copyable alone
def reward_exp_at(epoch, num_epochs, reward_exp, anneal=True):
    """beta_e = reward_exp * min(1, e / (num_epochs / 2)), linear over the first half (train_gfn.py:252-256). At e = 0
    beta is 0: the flow learns without the reward, and theta still learns toward a sampler whose flows balance with log
    R = 0 (through the DB residual, or DAG-KL's policy term)."""
    return float(reward_exp) * (min(1.0, epoch / (0.5 * num_epochs)) if anneal else 1.0)


def log_flows(flow, batch, reward_exp):
    """Forward-looking log-flows of both ends of each transition -> (log_flow, log_flow_child), each (b,), both
    including the beta * r term:

        log F(x)    = F_phi(x, t, c) + reward_exp * r(decode(x0_pred(x)))       (the r term carries no gradient)
        log F(x_0)  = reward_exp * r(x_0)       the last step's child is the image: F_phi is not used there

    The reward term is Pan et al.'s forward-looking parameterisation ("Better training of GFlowNets with local
    credit", 2023): F_phi learns a correction only, and every transition, not only the last, sees the reward. A fixed
    g(x) added to a free F_phi leaves the DB fixed point unchanged as long as both ends of a transition use the same g.
    NOTE: the release masks the last step's child the same way (end_mask, train_gfn.py:545-546)."""
    text = None if batch.text is None else batch.text.float()  # the flow is fp32; the text states may be bf16
    log_flow = flow(batch.x_t, batch.t, text) + reward_exp * batch.r_t
    flow_child = torch.where(batch.child_is_x0, 0.0, flow(batch.x_child, batch.t_child, text))
    return log_flow, flow_child + reward_exp * batch.r_child


def db_loss(log_flow, log_pf, log_pb, log_flow_child):
    """DAG-DB, detailed balance: (log F(x_t) + log p_theta(x_child|x_t) - log p_B(x_t|x_child) - log F(x_child))^2."""
    return (log_flow + log_pf - log_pb - log_flow_child) ** 2


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
    r = p_theta / p_theta_rollout of the stored transition. Its gradient is 0 where the max picks the clipped term."""
    ratio = torch.exp(log_pf - log_pf_rollout)
    return torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip_range, 1 + clip_range))


def kl_loss(log_flow, log_pf, log_pb, log_flow_child, log_pf_rollout, clip_range=1e-4, adv_clip_max=5.0):
    """DAG-KL, the release's form of the paper's KL gradient (train_gfn.py:552-577) -> (loss_flow, loss_policy), (b,).
    No KL divergence is computed: these are the two losses whose gradients DAG-KL follows. loss_flow trains phi only:
    the DB residual with log p_theta detached. loss_policy trains theta only: a PPO-clipped REINFORCE step with
    advantage a = -residual. Per sample grad_theta residual^2 / 2 = residual * grad_theta log p_theta, so this is
    DAG-DB's theta-gradient plus a baseline, a normalisation, clipping and a ratio."""
    loss_flow = (log_flow + log_pf.detach() - log_pb - log_flow_child) ** 2
    advantages = leave_one_out_advantages((log_flow_child + log_pb - log_pf - log_flow).detach(), adv_clip_max)
    return loss_flow, ppo_clip_loss(log_pf, log_pf_rollout, advantages, clip_range)


# --- What the DAG path reads: the run's settings (the harness fills them from the command line) and its networks
@dataclasses.dataclass
class Config:
    """The DAG path's settings, set by dag.py's flags of the same names. Defaults, per process: the paper's training
    details (50 DDIM steps, CFG 5, beta 100 annealed over half of 100 epochs), else the release's config/sd.yaml."""

    algo: str = "db"  # "db" (DAG-DB) or "kl" (DAG-KL)
    steps: int = 50  # N, DDIM steps
    eta: float = 1.0  # DDIM eta: the step's std is eta times the DDPM posterior's
    guidance_scale: float = 5.0  # CFG weight w, in the rollout and in the training forward (1: no unconditional pass)
    trajectories: int = 64  # B, rolled out per epoch (the release: 4 batches of 16)
    train_batch: int = 8  # trajectories per micro-batch, and rows per UNet call
    grad_accum: int = 4  # micro-batches per optimizer step
    epochs: int = 100
    reward_exp: float = 100.0  # beta, the reward's inverse temperature: log R = beta * r
    anneal: bool = True  # beta from 0 to reward_exp over the first half of the epochs
    kl_coef: float | None = None  # DAG-KL policy term's weight, not a KL's (release: klpf); None: final reward_exp
    clip_range: float = 1e-4  # PPO ratio clip of DAG-KL's policy term
    unetreg: float = 1.0  # weight of the pull toward the last rollout's eps (the rollout policy, not the base model)
    timestep_fraction: float = 1.0  # f: train int(f N) of each trajectory's N transitions (at least 1)


@dataclasses.dataclass
class Models:
    """The networks of one run. Trainable: the UNet's LoRA weights and the flow net."""

    unet: nn.Module  # the policy's epsilon (or v) network: frozen base weights + LoRA, in eval mode (see predict_eps)
    scheduler: DDIMScheduler  # the N-step DDIM schedule (timesteps, alphas_cumprod)
    flow: nn.Module | None  # F_phi (None for the DDPO and AlignProp baselines)
    latent_shape: tuple  # (C, H, W) of a state
    device: torch.device
    dtype: torch.dtype  # of the frozen weights: bf16 on CUDA, else fp32
    vae: nn.Module | None = None  # latent -> image; None for a pixel-space model
    text_encoder: nn.Module | None = None  # None for an unconditional model
    tokenizer: object = None
    uncond: torch.Tensor | None = None  # (1, L, E) text states of "", CFG's negative prompt
    conditional = property(lambda self: self.text_encoder is not None)  # a text-to-image model: text encoder, CFG

    @property
    def lora_params(self):
        return [p for p in self.unet.parameters() if p.requires_grad]

    @property
    def flow_params(self):
        return [] if self.flow is None else list(self.flow.parameters())


@torch.no_grad()
def encode_prompts(m, prompts):
    """CLIP's last hidden state (B, L, E), not pooled."""
    length = m.tokenizer.model_max_length
    tokens = m.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return m.text_encoder(tokens.input_ids.to(m.device))[0]


def predict_eps(m, x_t, t, text, guidance):
    """-> (eps_hat (B, C, H, W) fp32, eps_text): eps_hat = eps_u + w (eps_c - eps_u). NOTE: at w = 1 that is eps_c and
    the conditional branch runs alone, one UNet row per sample, as in diffusers' pipelines; the release's training
    forward runs both branches at any w (train_gfn.py:490-500). The rollout and the training forward both call it (see
    `predict_eps_chunked`). The UNet stays in eval mode; SD's has no dropout or batch-norm, so the release's train mode
    (train_gfn.py:462) computes the same."""
    x = x_t.to(m.dtype)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=m.dtype == torch.bfloat16):  # LoRA weights stay fp32
        if not m.conditional or guidance == 1:
            text_kwargs = {"encoder_hidden_states": text} if m.conditional else {}
            eps = model_output_to_eps(m.scheduler, m.unet(x, t, **text_kwargs).sample.float(), t, x_t)
            return eps, eps
        uncond = m.uncond.expand(len(x), -1, -1)
        out = m.unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([uncond, text])).sample
    eps_u, eps_c = (model_output_to_eps(m.scheduler, o, t, x_t) for o in out.float().chunk(2))
    return eps_u + guidance * (eps_c - eps_u), eps_c


def decode(m, x0, chunk):
    """Latent (or pixel) x0 -> RGB in [0, 1], fp32, the VAE decoding `chunk` images at a time (differentiable)."""
    if m.vae is not None:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=m.dtype == torch.bfloat16):
            x0 = torch.cat([m.vae.decode(c.to(m.dtype) / m.vae.config.scaling_factor).sample for c in x0.split(chunk)])
    return (x0.float() / 2 + 0.5).clamp(0, 1)


# --- Rollout: sample trajectories with the current policy; score the states training will read
def predict_eps_chunked(m, x_t, t, text, guidance, chunk):
    """predict_eps on `chunk` rows at a time; the rollout passes train_batch, the training forward's batch size: kernels
    depend on the batch size, and equal shapes make an unchanged theta reproduce eps and log_pf bitwise (DAG-KL's
    ratio is exactly 1, unetreg exactly 0, until the first optimizer step)."""
    rows = [slice(i, i + chunk) for i in range(0, len(x_t), chunk)]
    parts = [predict_eps(m, x_t[r], t[r], None if text is None else text[r], guidance) for r in rows]
    return tuple(torch.cat(p) for p in zip(*parts))


@torch.no_grad()
def rollout(m, reward_fn, prompts, cfg, generator):
    """Sample B = len(prompts) trajectories of N DDIM steps -> Rollout. Only the final images are scored here;
    `score_states` scores the states that training will read."""
    B, N = len(prompts), len(m.scheduler.timesteps)
    text = encode_prompts(m, prompts) if m.conditional else None
    states, steps = [torch.randn((B, *m.latent_shape), generator=generator, device=m.device)], []
    for t_scalar in m.scheduler.timesteps:
        x_t, t = states[-1], torch.full((B,), int(t_scalar), device=m.device, dtype=torch.long)
        eps, eps_text = predict_eps_chunked(m, x_t, t, text, cfg.guidance_scale, cfg.train_batch)  # as training does
        x_child, log_pf = ddim_step_logprob(m.scheduler, eps, t, x_t, cfg.eta, generator=generator)
        states.append(x_child)
        steps.append((log_pf, eps, predict_x0(m.scheduler, eps_text, t, x_t)))
    state_reward = torch.full((B, N + 1), float("nan"), device=m.device)
    state_reward[:, N] = reward_fn(decode(m, states[-1], cfg.train_batch), prompts).float()
    timesteps = torch.cat([m.scheduler.timesteps, torch.zeros(1, dtype=torch.long)]).to(m.device)
    log_pf, eps, x0_pred = (torch.stack(v, 1) for v in zip(*steps))  # (B, N), (B, N, C, H, W), (B, N, C, H, W)
    return Rollout(list(prompts), text, torch.stack(states, 1), timesteps, log_pf, eps, x0_pred, state_reward)


@torch.no_grad()
def score_states(m, reward_fn, ro, scored, chunk):
    """The forward-looking reward r(decode(x0_pred)) of the states marked in `scored` ((B, N + 1) bool: the states the
    trained transitions read), written into ro.state_reward; the others stay NaN, so reading one is loud. NOTE: computed
    once per state, with the rollout's theta, from the text-branch eps of the CFG forward. The release recomputes it in
    the training loop, twice per transition (train_gfn.py:530-543), with the current theta: the values agree until the
    epoch's first optimizer step; after it they are stale here by up to trajectories / (train_batch * grad_accum) - 1
    optimizer steps (1 in the release's configuration)."""
    for j in range(ro.x0_pred.shape[1]):
        marked = scored[:, j].nonzero().squeeze(1)
        for rows in (marked[i : i + chunk] for i in range(0, len(marked), chunk)):
            images = decode(m, ro.x0_pred[rows, j], chunk)
            ro.state_reward[rows, j] = reward_fn(images, [ro.prompts[i] for i in rows.tolist()]).float()


# --- Training: which transitions, the loss of a micro-batch, the optimizer step, one pass over a rollout, the epoch
def transition_order(B, N, fraction, generator):
    """The release's training order (train_gfn.py:423-440): shuffle the trajectories, permute the N transitions of
    EACH trajectory independently, and train the first K = int(N * fraction) of each permutation (the release's
    timestep_fraction, train_gfn.py:263). -> (order (B,): the trajectory of each row, perm (B, K) long: perm[i, j], the
    step trained at pass j of trajectory i). A micro-batch of rows then mixes timesteps. NOTE: K is at least 1; where
    int(N * fraction) is 0 the release trains nothing."""
    order = torch.randperm(B, generator=generator)
    perm = torch.argsort(torch.rand(B, N, generator=generator), dim=1)
    return order, perm[:, : max(1, int(N * fraction))]


def states_read(perm, N):
    """(B, N + 1) bool: the states that the transitions in perm (B, K) read, both ends of each (step j: j and j + 1)."""
    read = torch.zeros(len(perm), N + 1, dtype=torch.bool, device=perm.device)
    return read.scatter_(1, perm, True).scatter_(1, perm + 1, True)


def policy_logprob(m, batch, cfg):
    """The training forward: log p_theta(x_child | x_t) (b,) of the stored transitions under the current LoRA, with
    the eps it used: CFG in the training forward too, as the release's default (cfg=True)."""
    eps, _ = predict_eps(m, batch.x_t, batch.t, batch.text, cfg.guidance_scale)
    _, log_pf = ddim_step_logprob(m.scheduler, eps, batch.t, batch.x_t, cfg.eta, x_child=batch.x_child)
    return log_pf, eps


def dag_loss(m, batch, reward_exp, cfg):
    """DAG-DB or DAG-KL loss (b,) of a micro-batch at this epoch's reward_exp, and detached stats. NOTE: kl_coef None is
    the final reward_exp: "For DAG-KL, we put the final beta coefficient on the KL gradient term" (the paper)."""
    log_pf, eps = policy_logprob(m, batch, cfg)
    log_pb = backward_logprob(m.scheduler, batch.t, batch.x_t, batch.x_child)
    log_flow, log_flow_child = log_flows(m.flow, batch, reward_exp)
    if cfg.algo == "db":
        loss = db_loss(log_flow, log_pf, log_pb, log_flow_child)
    else:
        loss_flow, loss_policy = kl_loss(log_flow, log_pf, log_pb, log_flow_child, batch.log_pf_rollout, cfg.clip_range)
        loss = loss_flow + (cfg.reward_exp if cfg.kl_coef is None else cfg.kl_coef) * loss_policy
    # unetreg: the per-step KL(p_theta || p_rollout) without its timestep weight, a proximal pull (0 until theta moves)
    unetreg = ((eps - batch.eps_rollout) ** 2).mean(dim=tuple(range(1, eps.ndim)))
    loss = loss + cfg.unetreg * unetreg
    stats = {"loss": loss, "log_pf": log_pf, "log_flow": log_flow, "unetreg": unetreg}
    return loss, {k: v.detach().mean() for k, v in stats.items()}


def average_gradients(params):
    """Average the gradients over the ranks, once per optimizer step. NOTE: no DDP wrapper (the release's, train_gfn.py:
    180, 201); a missing gradient counts as zero, so every rank takes part in the same all-reduces."""
    if dist.is_initialized():
        for p in params:
            p.grad = torch.zeros_like(p) if p.grad is None else p.grad
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def optimizer_step(m, optimizer, max_grad_norm=1.0):
    """Average gradients over ranks, clip LoRA and flow separately (the release's max_grad_norm 1), step. -> True, or
    False when a gradient norm is not finite (a NaN or inf loss): that step is skipped and never reaches the weights.
    Every rank decides on the same averaged gradients, so the ranks stay in sync."""
    average_gradients(m.lora_params + m.flow_params)
    norms = [nn.utils.clip_grad_norm_(params, max_grad_norm) for params in (m.lora_params, m.flow_params) if params]
    finite = bool(torch.isfinite(torch.stack(norms)).all())
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


def train_epoch(m, ro, order, perm, optimizer, loss_fn, cfg, show_progress=False):
    """One pass over a rollout: for each micro-batch of train_batch trajectories (in `order`), for j in 0..K-1,
    backward loss_fn(transition perm[i, j] of each trajectory i).mean() / (grad_accum * K); an optimizer step every
    grad_accum micro-batches (as the release accumulates, train_gfn.py:264). -> this process's mean stats over the
    epoch, and steps_taken: one bool per optimizer step (False: skipped, its gradient was not finite)."""
    K = perm.shape[1]
    stats, taken = [], []
    bar = not show_progress or not sys.stderr.isatty()  # a bar on a terminal (rank 0's), none in a redirected log
    for k, i in enumerate(tqdm(range(0, len(order), cfg.train_batch), "train", leave=False, disable=bar)):
        rows = order[i : i + cfg.train_batch]
        for j in range(K):
            loss, s = loss_fn(ro.transitions(rows, perm[rows, j]))
            (loss.mean() / (cfg.grad_accum * K)).backward()
            stats.append(s)
        if (k + 1) % cfg.grad_accum == 0:
            taken.append(optimizer_step(m, optimizer))
    means = torch.stack([torch.stack(list(s.values())) for s in stats]).mean(0)  # (n_stats,)
    return {**dict(zip(stats[0], means.tolist())), "steps_taken": taken}


def dag_epoch(m, reward_fn, prompts, optimizer, epoch, cfg, generators, show_progress=False):
    """One DAG epoch: roll out cfg.trajectories trajectories (prompts drawn uniformly), choose the K transitions of
    each to train, score the states they read, then one pass of training at this epoch's beta. generators: "noise" (on
    the device: x_T and the sampler's noise) and "cpu" (prompts, training order). -> (rewards r(x_0) (B,), stats).
    NOTE: one rollout of all B (the UNet on train_batch rows at a time); the release samples 4 batches of 16."""
    reward_exp = reward_exp_at(epoch, cfg.epochs, cfg.reward_exp, cfg.anneal)
    t0 = time.time()
    idx = torch.randint(len(prompts), (cfg.trajectories,), generator=generators["cpu"])
    ro = rollout(m, reward_fn, [prompts[i] for i in idx], cfg, generators["noise"])
    order, perm = (v.to(m.device) for v in transition_order(cfg.trajectories, cfg.steps, cfg.timestep_fraction,
                                                             generators["cpu"]))
    score_states(m, reward_fn, ro, states_read(perm, cfg.steps), cfg.train_batch)
    t1 = time.time()
    stats = train_epoch(m, ro, order, perm, optimizer, lambda b: dag_loss(m, b, reward_exp, cfg), cfg, show_progress)
    return ro.reward, {**stats, "reward_exp": reward_exp, "rollout_s": t1 - t0, "train_s": time.time() - t1}


# ==================================================== THE HARNESS =====================================================

# --- Command line, one-line errors
def parse_args(argv=None):
    """Config's settings (its defaults) and the harness's own. SD-1.5's hub id: runwayml's repository was deleted."""
    c, p = Config, argparse.ArgumentParser(prog="dag.py", description="DAG post-training of a diffusion model")
    p.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5", help="hub id or diffusers dir")
    p.add_argument("--reward", default="aesthetic", help=f"{', '.join(rewards.REWARDS)}, or module:factory")
    p.add_argument("--prompts", default=None, help="prompt set or text file (default: the reward's task set)")
    p.add_argument("--algo", choices=["db", "kl", "ddpo", "alignprop"], default=c.algo, help="DAG-DB, -KL, baselines")
    p.add_argument("--reward-exp", type=float, default=c.reward_exp, help="beta, inverse temperature: log R = beta r")
    p.add_argument("--anneal", action=argparse.BooleanOptionalAction, default=c.anneal, help="beta from 0 in half")
    p.add_argument("--kl-coef", type=float, default=c.kl_coef, help="DAG-KL policy term weight (klpf; default: beta)")
    p.add_argument("--unetreg", type=float, default=c.unetreg, help="weight of mean((eps - eps_rollout)^2)")
    p.add_argument("--clip-range", type=float, default=c.clip_range, help="PPO ratio clip (DAG-KL, DDPO)")
    p.add_argument("--timestep-fraction", type=float, default=c.timestep_fraction, help="f: train int(f N) steps each")
    p.add_argument("--truncation", type=int, default=1, help="AlignProp: K, the last steps backpropagated through")
    p.add_argument("--steps", type=int, default=c.steps, help="N, DDIM steps")
    p.add_argument("--eta", type=float, default=c.eta, help="DDIM eta in (0, 1]")
    p.add_argument("--guidance-scale", type=float, default=c.guidance_scale, help="CFG weight w >= 1 (negative: '')")
    p.add_argument("--trajectories", type=int, default=c.trajectories, help="per process and epoch")
    p.add_argument("--train-batch", type=int, default=c.train_batch, help="trajectories per micro-batch (UNet batch)")
    p.add_argument("--grad-accum", type=int, default=c.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--epochs", type=int, default=c.epochs, help="rollout + training rounds")
    p.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate of the LoRA weights")
    p.add_argument("--flow-lr", type=float, default=None, help="learning rate of the flow net (default: --lr)")
    p.add_argument("--flow-channels", type=int, nargs="+", default=[64, 128, 256, 256], help="flow widths (release's)")
    p.add_argument("--lora-rank", type=int, default=4, help="LoRA rank r (alpha = r) on to_q, to_k, to_v, to_out.0")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute UNet activations in the backward")
    p.add_argument("--seed", type=int, default=0, help="base seed; rank r uses seed + r")
    p.add_argument("--out", default="runs/dag", help="run directory: args, logs, images, checkpoints")
    p.add_argument("--save-every", type=int, default=10, help="keep every k-th epoch's checkpoint (and the last)")
    p.add_argument("--eval-every", type=int, default=10, help="fixed-noise evaluation every k epochs (0: off)")
    p.add_argument("--eval-prompts", default=None, help="set or file to evaluate on (default: the task's eval split)")
    p.add_argument("--eval-samples", type=int, default=4, help="fixed noise seeds per eval prompt (>= 2)")
    p.add_argument("--resume", default=None, help="'auto' (the newest checkpoint in --out) or a checkpoint directory")
    return p.parse_args(argv)


def die(message, status=2, rank=0):  # a user mistake (2) or a failure (1): one line on stderr if rank 0, no traceback
    if rank == 0:
        tqdm.write(f"dag.py: error: {' '.join(str(message).split())}", file=sys.stderr)  # a line of its own
    raise SystemExit(status)


def check_args(args):
    """Flag values and batch arithmetic, before anything heavy loads: the first problem found is one line. -> args"""
    a, v = args, {**vars(args), "flow_lr": 1 if args.flow_lr is None else args.flow_lr, "kl_coef": args.kl_coef or 0}
    counts = ("steps", "epochs", "trajectories", "train_batch", "grad_accum", "save_every", "lora_rank", "truncation")
    fl = {n: "--" + n.replace("_", "-") for n in v}
    problems = [f"{fl[n]} must be >= 1" for n in counts if v[n] < 1]
    problems += [f"{fl[n]} must be finite, > 0" for n in ("lr", "flow_lr", "clip_range") if not 0 < v[n] < 1e99]
    problems += [f"{fl[n]} must be finite, >= 0" for n in ("reward_exp", "kl_coef", "unetreg") if not 0 <= v[n] < 1e99]
    problems += [message for bad, message in [
        (a.reward not in rewards.REWARDS and ":" not in a.reward,
         f"unknown reward {a.reward!r}: choose from {', '.join(rewards.REWARDS)} or give module:function"),
        (not 1 <= a.guidance_scale < 1e99, "--guidance-scale must be finite, >= 1 (1: the conditional branch alone; "
         "diffusers' pipe(...) samples any w <= 1 that way, so a LoRA trained at w < 1 would be sampled apart)"),
        (not 0 < a.eta <= 1, "--eta must be in (0, 1]: 0 has no density, > 1 can leave the DDIM mean undefined"),
        (not 0 < a.timestep_fraction <= 1, "--timestep-fraction must be in (0, 1]"),
        (not problems and a.trajectories % (a.train_batch * a.grad_accum), f"--trajectories {a.trajectories} is not "
         f"a multiple of --train-batch {a.train_batch} x --grad-accum {a.grad_accum}"),
        (a.eval_every < 0 or a.eval_every and a.eval_samples < 2, "--eval-every must be >= 0 and, with evaluations, "
         "--eval-samples >= 2 (diversity compares a prompt's samples)"),
        (a.algo == "kl" and a.train_batch < 2, "--algo kl needs --train-batch >= 2 (leave-one-out baseline)"),
        (a.algo in ("db", "kl") and a.anneal and a.epochs < 2,
         "--epochs 1 with annealing trains at beta = 0 only, without the reward: use --epochs >= 2 or --no-anneal"),
        (len(a.flow_channels) < 2 or any(c < 32 or c % 32 for c in a.flow_channels), "--flow-channels needs at least "
         "2 widths (every block but the last cross-attends to the prompt), each a multiple of 32"),
    ] if bad] + (importlib.import_module("benchmark.baselines").problems(a) if a.algo in ("ddpo", "alignprop") else [])
    if problems:
        die(problems[0])
    return args


# --- Distributed (torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is rank 0 of 1): gather
def gather(x):  # a (B, ...) tensor from every rank, concatenated; any other object: [rank 0's, rank 1's, ...]
    if not dist.is_initialized():
        return x if torch.is_tensor(x) else [x]
    tensor = torch.is_tensor(x)
    parts = [torch.empty_like(x) if tensor else None for _ in range(dist.get_world_size())]
    (dist.all_gather if tensor else dist.all_gather_object)(parts, x)
    return torch.cat(parts) if tensor else parts


# --- Loading: the model, its configs checked before its weights load
def pipeline_index(model, steps):
    """The pipeline's model_index.json, its scheduler checked (prediction type, --steps) before the weights load."""
    try:
        index = DiffusionPipeline.load_config(model)
        config = DDIMScheduler.load_config(model, subfolder="scheduler")
    except Exception as e:  # every hub or filesystem failure means the same to the user
        die(f"cannot read the configs of {model!r} ({e.__class__.__name__}; a hub id offline? Download it once "
            f"elsewhere, hf download {model} --local-dir DIR, and pass --model DIR)")
    T, kind = config.get("num_train_timesteps", 1000), config.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        die(f"{model}: prediction_type {kind!r} is not supported (epsilon, v_prediction)")
    if steps >= T:  # leading spacing with offset 1: t = 1 + j * (T // N) must stay below T
        die(f"--steps {steps}: the model's schedule has {T} training timesteps, so at most {T - 1} DDIM steps")
    return index


def load_models(args, device, index):
    """-> Models: the pipeline's networks, LoRA on the UNet, a flow net for DAG. NOTE: on CUDA, bf16 frozen weights and
    the UNet under bf16 autocast, the rest fp32 (LoRA, flow, stored states), no GradScaler; the release runs the UNet in
    bf16 without autocast (train_gfn.py:169-177), the flow under bf16 autocast (:199, :525), stores bf16 latents and
    scales the loss with a GradScaler (:130-132). On the CPU everything is fp32."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    skip = {k: None for k in ("safety_checker", "feature_extractor", "image_encoder") if k in index}
    try:
        pipe = DiffusionPipeline.from_pretrained(args.model, dtype=dtype, **skip)
    except Exception as e:  # a missing or truncated weights file, a partial download
        die(f"cannot load the weights of {args.model!r}: {e.__class__.__name__}: {e}")
    unet, targets = pipe.unet.to(device).requires_grad_(False), ["to_k", "to_q", "to_v", "to_out.0"]
    lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian", target_modules=targets)
    inject_adapter_in_model(lora, unet)
    if args.grad_checkpointing:
        unet.enable_gradient_checkpointing()  # active whenever grad is enabled: the training forward only
    for p in unet.parameters():
        p.data = p.data.float() if p.requires_grad else p.data
    c, size = unet.config.in_channels, unet.config.sample_size
    m = Models(unet.eval(), ddim_scheduler(pipe.scheduler.config, args.steps), None, (c, size, size), device, dtype)
    if "text_encoder" in index:
        m.vae, m.text_encoder = (net.to(device).requires_grad_(False) for net in (pipe.vae, pipe.text_encoder))
        m.tokenizer = pipe.tokenizer
        m.uncond = encode_prompts(m, [""])
    if args.algo in ("db", "kl"):
        text_width = m.text_encoder.config.hidden_size if m.conditional else None
        m.flow = FlowNet(c, text_width, tuple(args.flow_channels)).to(device)
    return m


def fingerprint(arrays):  # of tensors or strings
    data = (a.encode() + b"\n" if isinstance(a, str) else a.detach().float().cpu().numpy().tobytes() for a in arrays)
    return hashlib.sha1(b"".join(data)).hexdigest()[:16]


# --- Evaluation: fixed noise, reward, diversity, image grids
def denoise(m, prompts, x, args, noise=None, generator=None, grad_steps=0):
    """x_T -> x_0 with the policy alone, for evaluation and AlignProp: step j's noise is noise[:, j] or drawn from
    `generator`; the last `grad_steps` steps keep the graph, each UNet call checkpointed (else a plain call)."""
    text = encode_prompts(m, prompts) if m.conditional else None
    for j, t_scalar in enumerate(m.scheduler.timesteps):
        t = torch.full((len(x),), int(t_scalar), device=m.device, dtype=torch.long)
        with torch.set_grad_enabled(torch.is_grad_enabled() and j >= args.steps - grad_steps):
            eps = checkpoint(predict_eps, m, x, t, text, args.guidance_scale, use_reentrant=False)[0]
            step_noise = None if noise is None else noise[:, j]
            x, _ = ddim_step_logprob(m.scheduler, eps, t, x, args.eta, generator=generator, noise=step_noise)
    return x


def diversity(features, k):
    """Mean pairwise L2 distance between the k samples of each prompt (rows grouped by prompt): a fall is collapse."""
    f = features.reshape(-1, k, features.shape[-1])
    d = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")  # exact zeros for identical rows
    return (d.sum(dim=(1, 2)) / (k * (k - 1))).mean().item()


@torch.no_grad()
def evaluate(m, reward_fn, prompts, args, rank, world):
    """Every (eval prompt, seed s) pair, split over the ranks: x_T and every step's noise from seed s alone, the same in
    every evaluation and run. Diversity: in the reward model's unit image embedding (`reward_fn.embed`), else in 32x32
    pixels (an RMS distance). -> (record, (images, labels, scores)) on rank 0, (None, None) elsewhere."""
    k, shape = args.eval_samples, (args.steps + 1, *m.latent_shape)  # noise[s, 0]: x_T; noise[s, j + 1]: step j's
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in range(k)])
    pairs = [(p, s) for p in range(len(prompts)) for s in range(k)]
    per_rank = math.ceil(len(pairs) / world)
    mine = (pairs[rank * per_rank :] + pairs)[:per_rank]  # the last rank pads with repeats: equal shapes to gather
    scores, features, images = [], [], []
    for i in range(0, per_rank, args.train_batch):
        chunk = mine[i : i + args.train_batch]
        texts, z = [prompts[p] for p, _ in chunk], noise[[s for _, s in chunk]]
        x0 = decode(m, denoise(m, texts, z[:, 0].to(m.device), args, noise=z[:, 1:].to(m.device)), args.train_batch)
        f = reward_fn.embed(x0).float() if reward_fn.embed else F.interpolate(x0, size=(32, 32), mode="area").flatten(1)
        scores.append(reward_fn(x0, texts).float())
        features.append(f / (f.norm(dim=-1, keepdim=True) if reward_fn.embed else math.sqrt(f.shape[1])))
        images.append((x0 * 255).round().to(torch.uint8))
    scores, features, images = (gather(torch.cat(v))[: len(pairs)] for v in (scores, features, images))
    if rank != 0:
        return None, None
    record = {"eval_reward_mean": scores.mean().item(), "eval_reward_std": scores.std().item(),
              "diversity": diversity(features, k), "diversity_space": "embedding" if reward_fn.embed else "pixels",
              "eval_reward_per_prompt": [round(v, 5) for v in scores.view(len(prompts), k).mean(1).tolist()]}
    return record, (images.float().cpu() / 255, [f"seed {s}: {prompts[p]}" for p, s in pairs], scores.tolist())


def save_grid(path, images, prompts, scores, cols=4, size=192):
    """PNG grid of (B, 3, H, W) images in [0, 1] with the prompt and reward under each, written aside and renamed."""
    grid = Image.new("RGB", (cols * size, math.ceil(len(images) / cols) * (size + 28)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (array, prompt, score) in enumerate(zip(rewards.to_uint8(images), prompts, scores)):
        x, y = (i % cols) * size, (i // cols) * (size + 28)
        grid.paste(Image.fromarray(array).resize((size, size), Image.NEAREST), (x, y))
        draw.text((x + 4, y + size + 2), f"{prompt[:28]}\nr = {float(score):.3f}", fill="black")
    try:
        grid.save(path.with_name(f".tmp-{path.name}"), format="PNG")
        os.replace(path.with_name(f".tmp-{path.name}"), path)
    finally:
        path.with_name(f".tmp-{path.name}").unlink(missing_ok=True)  # a full disk leaves no part of a PNG


# --- Checkpoints: a kill at any moment loses at most the epoch it interrupts; a resume refuses another run's
# --- checkpoint, deletes nothing the run kept and never returns to an abandoned branch
def checkpoints(out):  # OUT's complete checkpoint-EPOCH dirs, newest first (not one being written, nor a user's copy)
    found = [p for p in Path(out).glob("checkpoint-*") if p.name[11:].isdecimal()]
    return sorted(found, key=lambda p: int(p.name[11:]), reverse=True)


def read_jsonl(path):  # a line that does not parse (cut short by a kill or a full disk) is skipped
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def save_checkpoint(out, epoch, m, optimizer, generators, history, settings, rank, drop=None):
    """Rank 0 writes OUT/checkpoint-EPOCH aside and renames it into place, so a kill leaves all of it or none: the LoRA
    in diffusers' format (pipe.load_lora_weights(dir) reads it), the training state, every rank's RNG streams, the run's
    settings; then deletes checkpoint-`drop`. Weights unequal across ranks or not finite, a failed write: one line."""
    params = m.lora_params + m.flow_params
    rng, digests = gather({name: g.get_state() for name, g in generators.items()}), gather(fingerprint(params))
    finite = all(bool(torch.isfinite(p).all()) for p in params)
    error = None if len(set(digests)) == 1 and finite else f"the ranks' weights differ ({digests}) or are not finite"
    if rank == 0 and error is None:
        tmp, final = out / f".tmp-checkpoint-{epoch}", out / f"checkpoint-{epoch}"
        try:
            tmp.mkdir()
            lora = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(m.unet).items()}
            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=convert_state_dict_to_diffusers(lora))
            flow = None if m.flow is None else m.flow.state_dict()
            state = {"epoch": epoch, "settings": settings, "lora": lora, "flow": flow, "rng": rng, "history": history}
            torch.save({**state, "optimizer": optimizer.state_dict()}, tmp / "training_state.pt")
            os.replace(tmp, final)
            if drop:
                shutil.rmtree(out / f"checkpoint-{drop}", ignore_errors=True)
        except Exception as e:  # NOTE: a full disk is an OSError, torch.save's RuntimeError or safetensors' own error
            shutil.rmtree(tmp, ignore_errors=True)
            free = shutil.disk_usage(out).free / 2**20
            error = f"cannot write {final.name} ({' '.join(str(e).split())[:160]}; {free:.1f} MB free there)"
    error = gather(error)[0]
    if error:
        die(f"{error}; the newest intact checkpoint: {next(iter(checkpoints(out)), None)}", status=1, rank=rank)


def resume(args, out, m, optimizer, generators, history, settings, rank):
    """-> the epoch to start at: 0, or that of the checkpoint --resume names ('auto': OUT's newest), after restoring
    its LoRA, flow, optimizer, DDPO history and every rank's RNG streams. Its settings must be this run's."""
    found = checkpoints(out)[:1] if args.resume == "auto" else [Path(args.resume)] if args.resume else []
    path = gather(found[0] if found else None)[0]  # rank 0's choice
    if path is None:
        return 0
    try:
        state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a missing or damaged file
        die(f"--resume: cannot read {path / 'training_state.pt'} ({e.__class__.__name__})")
    diff = [f"{k} {v!r} -> {settings.get(k)!r}" for k, v in state["settings"].items() if settings.get(k) != v]
    if diff:
        die(f"--resume: {path} is a checkpoint of another run ({'; '.join(diff)}): resume it with its own settings")
    if state["epoch"] > args.epochs:
        die(f"--resume: {path.name} is at epoch {state['epoch']}, past --epochs {args.epochs}")
    set_peft_model_state_dict(m.unet, state["lora"])
    if m.flow is not None:
        m.flow.load_state_dict(state["flow"])
    optimizer.load_state_dict(state["optimizer"])
    history.update(state["history"])
    for name, g in generators.items():
        g.set_state(state["rng"][rank][name])
    return state["epoch"]


def set_aside_later(out, start):
    """Checkpoints past `start` (a branch that a resume from an earlier one abandons) move with their log records to
    OUT/abandoned-TIME/, so --resume auto never returns to them; the records of a redone epoch are dropped."""
    later = [p for p in checkpoints(out) if int(p.name[11:]) > start]
    aside = out / time.strftime("abandoned-%Y%m%d-%H%M%S")
    for name in ("log.jsonl", "eval.jsonl"):
        records = [(r["epoch"] < start, json.dumps(r) + "\n") for r in read_jsonl(out / name)]
        if later:
            aside.mkdir(exist_ok=True)
            (aside / name).write_text("".join(line for kept, line in records if not kept))
        (out / f".tmp-{name}").write_text("".join(line for kept, line in records if kept))
        os.replace(out / f".tmp-{name}", out / name)
    for p in later:
        os.replace(p, aside / p.name)


# --- main: one line for every way a run ends early
def on_signal(signum, frame):
    """SIGTERM (pre-emption) and Ctrl-C end the run alike; the signals that follow (torchrun's) are ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None):
    sys.modules.setdefault("dag", sys.modules[__name__])  # benchmark/baselines.py's `import dag` is this module
    args = check_args(parse_args(argv))
    out, lock = Path(args.out), None
    if int(os.environ.get("RANK", 0)) == 0:  # rank 0's claim on --out, before anything heavy
        if out.exists() and not out.is_dir() or not args.resume and (checkpoints(out) or (out / "log.jsonl").exists()):
            die(f"--out {out} is a file, or holds a run: pass --resume auto to continue that run, or another --out")
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = open(out / ".lock", "w")
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until this process ends
        except OSError as e:
            die(f"{out} is in use by another run" if lock else f"--out {out} is not writable ({e.strerror or e})")
        for stale in out.glob(".tmp-*"):  # a write that a kill interrupted
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    rank, world, cuda = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if "RANK" in os.environ:  # NCCL on GPUs (each process on its LOCAL_RANK's), gloo on the CPU
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        train(args, out, rank, world, device)
    except KeyboardInterrupt as e:
        traceback.clear_frames(e.__traceback__)  # the traceback would keep the models alive through the teardown
        name, newest = str(e) or "SIGINT", next(iter(checkpoints(out)), None)
        kept = f"{newest.name} is intact: continue with --resume auto" if newest else "no checkpoint was written yet"
        die(f"stopped by {name}; {kept}", status=128 + signal.Signals[name], rank=rank)
    except Exception as e:  # a failure: one line per failing rank, its traceback in a file
        detail, frame = out / f"traceback-rank{rank}.txt", traceback.extract_tb(e.__traceback__)[-1]
        with contextlib.suppress(OSError):  # a full disk: the line still comes
            detail.write_text(traceback.format_exc())
        traceback.clear_frames(e.__traceback__)
        if not isinstance(e, dist.DistError) and "by peer" not in str(e):  # gloo: "Connection closed by peer"
            tqdm.write(f"dag.py: error: rank {rank} failed: {e.__class__.__name__}: {' '.join(str(e).split())[:300]} "
                       f"({Path(frame.filename).name}:{frame.lineno}; traceback: {detail})", file=sys.stderr)
        raise SystemExit(2 if isinstance(e, rewards.RewardError) else 1)  # a reward returning junk: a mistake
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        gc.collect()  # NOTE: freeing the models before the teardown avoids an intermittent gloo abort at exit
        if dist.is_initialized():
            dist.destroy_process_group()
        if lock:
            lock.close()


def train(args, out, rank, world, device):
    """Load everything, then the epoch loop: (evaluate) -> one epoch of --algo -> log -> checkpoint."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(args.seed)  # the LoRA and flow initialisation: the same on every rank (checked at each save)
    # NOTE: CRUCIAL: a seed per rank for prompts, noise and shuffling (the release seeds all alike, train_gfn.py:83)
    generators = {k: torch.Generator(d).manual_seed(args.seed + rank) for k, d in (("noise", device), ("cpu", "cpu"))}
    index = pipeline_index(args.model, args.steps)
    if "text_encoder" not in index and (args.prompts or args.eval_prompts):
        die(f"--prompts and --eval-prompts are for a text-to-image model; {args.model} is unconditional")
    try:  # prompts and reward before the weights load, so that a mistake in either fails fast
        prompts, eval_prompts = [""], [""]
        if "text_encoder" in index:
            prompts, eval_prompts = rewards.task_prompts(args.reward, args.prompts, args.eval_prompts)
        reward_fn = rewards.load(args.reward, device)  # every output checked (rewards.checked)
    except (ImportError, OSError, ValueError) as e:
        die(e)
    m = load_models(args, device, index)
    # NOTE: the flow's own lr (--flow-lr); the release's config has flow_learning_rate but uses learning_rate for both
    groups = [{"params": m.lora_params, "lr": args.lr}, {"params": m.flow_params, "lr": args.flow_lr or args.lr}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=1e-4)  # the release's AdamW
    base = [p.flatten()[::1024] for net in (m.unet, m.vae, m.text_encoder) if net for p in net.parameters()
            if not p.requires_grad]  # every 1024th value of each frozen tensor: replaced weights show
    # the run's settings, which a resume must find equal: all but these flags, which do not change the numbers
    free = ("out", "resume", "epochs", "save_every", "eval_every", "eval_prompts", "eval_samples", "grad_checkpointing")
    settings = {**{k: v for k, v in vars(args).items() if k not in free}, "world_size": world,
                "weights_sha1": fingerprint(base), "prompts_sha1": fingerprint(prompts)}
    history = {}  # DDPO's rewards per prompt id
    start = resume(args, out, m, optimizer, generators, history, settings, rank)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})  # what the DAG path reads
    if rank == 0:
        lora, flow = (sum(p.numel() for p in ps) for ps in (m.lora_params, m.flow_params))
        print(f"{args.algo} on {args.model}: LoRA {lora:,} + flow {flow:,} params; {world} process(es) x "
              f"{args.trajectories} trajectories per epoch; epoch {start} of {args.epochs}", flush=True)
        if start == 0:
            (out / "args.json").write_text(json.dumps({**settings, "argv": sys.argv}, indent=1))
        set_aside_later(out, start)

    def log(name, record):
        print(" | ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, (int, float))), flush=True)
        with open(out / name, "a") as f:
            f.write(json.dumps(record) + "\n")

    skipped = 0  # optimizer steps skipped in a row
    for epoch in range(start, args.epochs + 1):
        if args.eval_every and (epoch % args.eval_every == 0 or epoch == args.epochs):
            t0 = time.time()
            record, grid = evaluate(m, reward_fn, eval_prompts, args, rank, world)
            if rank == 0:
                log("eval.jsonl", {"epoch": epoch, **record, "eval_s": time.time() - t0})
                save_grid(out / f"eval-{epoch:04d}.png", *grid, cols=args.eval_samples)
        if epoch == args.epochs:
            break
        t0 = time.time()
        if args.algo in ("db", "kl"):
            scores, stats = dag_epoch(m, reward_fn, prompts, optimizer, epoch, cfg, generators, rank == 0)
        else:  # DDPO and AlignProp on this loop: benchmark/baselines.py, its own state in `history`
            epoch_fn = getattr(importlib.import_module("benchmark.baselines"), f"{args.algo}_epoch")
            scores, stats = epoch_fn(m, reward_fn, prompts, optimizer, history, args, generators, rank, world)
        scores, taken = gather(scores), stats.pop("steps_taken")
        for ok in taken:
            skipped = 0 if ok else skipped + 1
            if skipped == 3:
                die(f"3 optimizer steps in a row had a non-finite gradient (epoch {epoch}); they were skipped, so the "
                    "weights and the checkpoints are finite", status=1, rank=rank)
        mean = [k for k in stats if not k.endswith("_s") and k != "reward_exp"]  # averaged over the ranks
        stats.update(zip(mean, gather(torch.tensor([[stats[k] for k in mean]], dtype=torch.float64)).mean(0).tolist()))
        record = {"epoch": epoch, "reward_mean": scores.mean().item(), "reward_std": scores.std().item(), **stats,
                  "skipped_steps": taken.count(False), "traj_per_s": len(scores) / (time.time() - t0)}
        if args.algo in ("db", "kl"):  # beta x the reward's spread: how far the reward can move the flows
            record["beta_reward_std"] = stats["reward_exp"] * record["reward_std"]
            # the final beta x std(r) of the base model's rewards (a run's first epoch): our runs learned at 24-354
            if rank == 0 and epoch == 0 and not 20 <= args.reward_exp * record["reward_std"] <= 400:
                tqdm.write(f"dag.py: warning: --reward-exp {args.reward_exp:g} x std(r) {record['reward_std']:.3g} is "
                           "outside 20-400 (DAG learned at 24-354 in our runs, barely at 6: README)", file=sys.stderr)
        if device.type == "cuda":
            record["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        if rank == 0:
            log("log.jsonl", record)
        drop = epoch if epoch > start and epoch % args.save_every else None  # the previous one this process wrote
        save_checkpoint(out, epoch + 1, m, optimizer, generators, history, settings, rank, drop)  # every epoch


if __name__ == "__main__":
    main()
