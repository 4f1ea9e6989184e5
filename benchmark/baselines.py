"""The paper's comparison, on dag.py's sampler, rewards, LoRA, optimizer, batches and loop: DDPO and AlignProp.

    python dag.py --algo ddpo ...        # dag.py's loop calls ddpo_epoch (or alignprop_epoch) of this module

Each epoch function has the signature (m, reward_fn, prompts, optimizer, history, args, generators, rank, world) and
dag_epoch's return shape: (this process's rewards (B,), stats with "steps_taken", "rollout_s", "train_s"). `history`
is the algorithm's own state, saved in every checkpoint (DDPO: its per-prompt rewards). They differ from their
references as the README says: DDPO keeps its per-prompt reward tracker (buffer 32, min count 16: its aesthetic config)
and advantage clip 5; AlignProp backpropagates through a fixed last K = --truncation steps (its default draws K per
batch).
"""

import sys
import time

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import dag
import rewards


def problems(args):
    """The baselines' own flag mistakes, for dag.check_args (each one line before anything loads)."""
    return [message for bad, message in [
        (args.algo == "alignprop" and ":" not in args.reward and args.reward not in rewards.DIFFERENTIABLE,
         f"--algo alignprop needs a differentiable reward: {', '.join(sorted(rewards.DIFFERENTIABLE))} or your own"),
        (args.algo == "alignprop" and args.timestep_fraction != 1, "--timestep-fraction is for db, kl and ddpo"),
        (args.truncation > args.steps, "--truncation must be <= --steps"),
    ] if bad]


def per_prompt_advantages(scores, prompt_ids, history, min_count=16, buffer_size=32):
    """DDPO's advantages (Black et al. 2023, arXiv 2305.13301; its aesthetic config's buffer): rewards standardised by
    the last buffer_size of their prompt's (this batch's included), by the batch's while it has < min_count."""
    advantages = torch.empty_like(scores)
    for pid in prompt_ids.unique().tolist():
        rows = prompt_ids == pid
        history[pid] = seen = (history.get(pid, []) + scores[rows].tolist())[-buffer_size:]
        ref = torch.tensor(seen, dtype=scores.dtype) if len(seen) >= min_count else scores.cpu()
        advantages[rows] = (scores[rows] - ref.mean().item()) / (ref.std(unbiased=False).item() + 1e-6)
    return advantages


def ddpo_loss(m, batch, advantages, args):
    """DDPO's per-transition loss: PPO's clipped surrogate with the trajectory's advantage (b,)."""
    log_pf, _ = dag.policy_logprob(m, batch, args)
    loss = dag.ppo_clip_loss(log_pf, batch.log_pf_rollout, advantages, args.clip_range)
    return loss, {"loss": loss.detach().mean(), "log_pf": log_pf.detach().mean()}


def ddpo_epoch(m, reward_fn, prompts, optimizer, history, args, generators, rank=0, world=1):
    """One DDPO epoch: a rollout (terminal rewards only), advantages from the rewards and prompts of ALL ranks
    (clipped to +-5, DDPO's adv_clip_max), one pass of `ddpo_loss` over K transitions of each trajectory."""
    t0 = time.time()
    idx = torch.randint(len(prompts), (args.trajectories,), generator=generators["cpu"])
    ro = dag.rollout(m, reward_fn, [prompts[i] for i in idx], args, generators["noise"])
    advantages = per_prompt_advantages(dag.gather(ro.reward), dag.gather(idx.to(m.device)), history).clamp(-5, 5)
    mine = advantages.view(world, -1)[rank]  # this rank's trajectories
    order, perm = (v.to(m.device) for v in dag.transition_order(args.trajectories, args.steps, args.timestep_fraction,
                                                                 generators["cpu"]))
    t1 = time.time()
    stats = dag.train_epoch(m, ro, order, perm, optimizer, lambda b: ddpo_loss(m, b, mine[b.rows], args), args,
                            rank == 0)
    return ro.reward, {**stats, "rollout_s": t1 - t0, "train_s": time.time() - t1}


def alignprop_epoch(m, reward_fn, prompts, optimizer, history, args, generators, rank=0, world=1):
    """One AlignProp epoch (Prabhudesai et al. 2023, arXiv 2310.03739) in DAG's batches: -r(decode(x_0)) backpropagated
    through the decode and the last K = --truncation steps (the first N - K run without grad)."""
    t0, scores, taken = time.time(), [], []
    bar = rank != 0 or not sys.stderr.isatty()
    for k in tqdm(range(args.trajectories // args.train_batch), "alignprop", leave=False, disable=bar):
        texts = [prompts[i] for i in torch.randint(len(prompts), (args.train_batch,), generator=generators["cpu"])]
        x_T = torch.randn((args.train_batch, *m.latent_shape), generator=generators["noise"], device=m.device)
        x = dag.denoise(m, texts, x_T, args, generator=generators["noise"], grad_steps=args.truncation)
        reward = reward_fn(checkpoint(dag.decode, m, x, args.train_batch, use_reentrant=False), texts).float()
        if not reward.requires_grad:
            dag.die(f"--algo alignprop: reward {args.reward!r} returned no gradient")
        (-reward.mean() / args.grad_accum).backward()
        if (k + 1) % args.grad_accum == 0:
            taken.append(dag.optimizer_step(m, optimizer))
        scores.append(reward.detach())
    scores = torch.cat(scores)
    return scores, {"loss": -scores.mean().item(), "steps_taken": taken, "rollout_s": 0.0, "train_s": time.time() - t0}
