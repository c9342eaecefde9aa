"""Step 3 of the pipeline: GRPO on Megatron-Core, with a vLLM engine colocated in every rank.

    # one GPU
    torchrun --nproc_per_node 1 grpo.py --load Qwen2.5-0.5B-mcore --hf-dir Qwen2.5-0.5B-Instruct \\
        --data dataset/MATH-lighteval
    # 8 GPUs, tensor parallel 2 (4 data-parallel groups)
    torchrun --nproc_per_node 8 grpo.py --load Qwen2.5-7B-mcore --hf-dir Qwen2.5-7B-Instruct \\
        --data dataset/MATH-lighteval --tp 2
    # toy task: a random tiny model learns to emit one token id (no data, no tokenizer)
    torchrun --nproc_per_node 1 grpo.py --load tiny-mcore --hf-dir tiny-hf --toy-token 7
    # benchmark: a fixed workload on random Qwen2.5-0.5B-shaped weights, with the two ceilings
    torchrun --nproc_per_node 1 grpo.py --benchmark 0.5B
    # the memory plan of a layout, without GPUs
    python grpo.py --memory-plan 7B --tp 2 --world-size 8 --gpu-gib 80

One step, the phases of run()'s loop, and what sits in GPU memory during each:

    phase                          GPU memory holds
    1 rollout (vLLM generate)      Megatron bf16 params | vLLM weights + KV cache
    2 score rewards, vLLM sleeps   Megatron bf16 params | (vLLM's weights and KV cache freed)
    3 group advantages             (CPU)
    4 ref / old log-probs          + grads; the reference model visits the GPU for its forward
    5 policy update                + activations of one micro batch, then the optimizer state
                                   (back from host memory) for optimizer.step()
    6 offload, weight sync         optimizer state and grads go back to CPU; vLLM weights wake,
                                   Megatron -> vLLM one tensor at a time; then the KV cache wakes
    7 check, evaluate, log         (the vLLM-vs-Megatron log-prob tripwire)

Why this choreography: the KV cache and the optimizer state (12 bytes per parameter: fp32 master
weights + two Adam moments) do not both fit next to the weights on one GPU for the larger models,
and neither is needed while the other works. Grads are freed, the optimizer state goes to pinned
host buffers, vLLM sleeps between rollouts, and vLLM's share is sized from what is free *after*
the trainer's state has left, so both always fit. memory.py plans it all before anything is
allocated and holds the moves; bench.py is --benchmark's report.

Reading order: the GRPO math, then run() (the loop, one call or block per phase above), then the
phases' functions in the loop's order; set-up, checkpoints, logging and the flags come last.
"""
import argparse
import contextlib
import hashlib
import json
import os
import random
import sys
import time

# The trainer's allocations come and go (optimizer state, activations, logits of 100k-token
# vocabularies) while vLLM's pool waits asleep; with PyTorch's default fixed-size segments one
# live tensor pins a whole segment and empty_cache() cannot hand the memory back for vLLM's
# wake-up. Expandable segments return freed pages. vLLM turns the setting off inside its own pool
# when it comes from this variable, which is why it is set here, before torch is imported, and
# not through torch.cuda.memory._set_allocator_settings.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import bench  # noqa: E402
import convert  # noqa: E402
import memory  # noqa: E402
import prepare  # noqa: E402
from convert import UserError  # noqa: E402
from memory import GIB  # noqa: E402


# ==============================================================================================
# The GRPO math: small pure functions, shapes in the comments
# ==============================================================================================
def masked_sum(x, mask):
    """Sum of x where mask is 1 (or weighted by mask). x, mask: same shape."""
    return (x * mask).sum()


def masked_mean(x, mask, eps=1e-8):
    """Mean of x over the positions where mask is 1; 0 for an empty mask (not NaN), so a micro
    batch whose rows are all masked contributes nothing instead of poisoning the step."""
    return (x * mask).sum() / (mask.sum() + eps)


def group_advantages(rewards, n_samples_per_prompt, eps=1e-5, norm_by_std=True):
    """GRPO's advantage: each sample's reward relative to the other samples of the same prompt.

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    No value network: the group mean is the baseline (DeepSeekMath, arXiv 2402.03300). The std is
    the unbiased one (torch's default), as in the reference implementations. A group whose samples
    all scored the same carries no signal and gets A = 0 exactly, whatever the rewards (the same
    test as `informative_groups`). A group of one sample has no baseline: A = 0 too.
    norm_by_std=False drops the std scaling (Dr. GRPO, arXiv 2503.20783), which stops
    near-unanimous groups from getting huge advantages.

    rewards: [num_prompts * n] ordered prompt by prompt -> advantages: [num_prompts * n]
    Example: n=3, rewards [1, 0, 0] -> mean 1/3, std 0.577 -> advantages [1.155, -0.577, -0.577];
             n=8, eight rewards of 0.7 -> advantages all 0.0
    """
    r = rewards.view(-1, n_samples_per_prompt).float()            # [num_prompts, n]
    if n_samples_per_prompt == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    adv = r - r.mean(dim=1, keepdim=True)
    if norm_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    # The float mean of equal fractional rewards (0.7, or an overlong penalty) can be one unit in
    # the last place off; r - mean is then not 0, and dividing by std + eps (std is ~0) turns that
    # rounding into an advantage of the same sign for the whole group. Decide "no signal" exactly.
    signal = informative_groups(r.view(-1), n_samples_per_prompt).unsqueeze(1)   # [num_prompts, 1]
    return torch.where(signal, adv, torch.zeros_like(adv)).view(-1)


def informative_groups(rewards, n_samples_per_prompt):
    """Which prompts' groups carry a gradient: those whose rewards are not all equal.

    An all-equal group has advantages of exactly 0, so its samples change nothing but the token
    count that the loss is averaged over. DAPO's dynamic sampling (arXiv 2503.14476, sec. 3.2)
    drops them and rolls out more prompts instead (`--filter-groups`).
    rewards: [num_prompts * n] -> [num_prompts] bool
    Example: n=2, rewards [1, 1, 0, 1, 0, 0] -> [False, True, False]
    """
    r = rewards.view(-1, n_samples_per_prompt)
    return (r != r[:, :1]).any(dim=1)


def overlong_penalty(response_lengths, max_response_lengths, buffer, penalty):
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), added to the reward:

        0                                       if L <= L_max - buffer
        -penalty * (L - (L_max - buffer)) / buffer   if L_max - buffer < L <= L_max

    A truncated answer usually scores 0 anyway; this also pushes down answers that are about to
    run out of room, a smooth signal where truncation is a cliff. L_max is the sample's own
    response budget (max_len - its prompt's length).
    response_lengths, max_response_lengths: [N] -> [N], values in [-penalty, 0]
    Example: L_max 100, buffer 20, penalty 1: L 80 -> 0, L 90 -> -0.5, L 100 -> -1.0
    """
    over = (response_lengths.float() - (max_response_lengths.float() - buffer)).clamp(min=0)
    return -penalty * (over / buffer).clamp(max=1.0)


def kl_k3(logp, ref_logp):
    """Per-token KL(pi || pi_ref) estimate "k3" (Schulman, http://joschu.net/blog/kl-approx.html):

        k3 = exp(ref - logp) - (ref - logp) - 1

    unbiased for sampled tokens, and always >= 0 (unlike the naive logp - ref). Clamped so that
    one token with a huge gap cannot blow up the loss. logp, ref_logp: [b, s] -> [b, s]
    """
    d = (ref_logp - logp).clamp(-20, 20)
    return (torch.exp(d) - d - 1).clamp(max=10)


def tis_weights(old_logp, rollout_logp, cap):
    """Truncated importance sampling against the rollout/trainer mismatch (as verl's
    `tis_imp_ratio_cap` and TRL's vLLM importance-sampling correction):

        w = min(pi_old(y) / pi_vllm(y), cap)      per token, no gradient

    The samples come from vLLM, but the loss assumes they came from the trainer's pi_old; bf16
    kernels make the two differ slightly, and w reweights each token toward the distribution the
    loss assumes. The cap bounds the variance a near-zero vLLM probability would cause.
    old_logp, rollout_logp: [b, s] -> [b, s]
    Example: pi_old 0.5, pi_vllm 0.4, cap 2 -> 1.25;  pi_old 0.9, pi_vllm 0.1, cap 2 -> 2
    """
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def loss_weights(mask, loss_agg, norm_len):
    """Per-token weights w [b, s] and this micro batch's share of the normaliser, such that the
    loss of a whole batch is  sum(w * loss) / sum(normalisers)  however the batch is cut into
    micro batches and data-parallel ranks (rows are never split, and Megatron adds the sums and
    the normalisers of all micro batches and ranks before it divides: `calculate_per_token_loss`).

      token-mean               w = mask          n = response tokens      (DAPO; the default)
      seq-mean-token-mean      w = mask / |o_i|  n = sequences            (the GRPO paper)
      seq-mean-token-sum-norm  w = mask          n = sequences * norm_len (Dr. GRPO, 2503.20783)

    token-mean weighs every token alike, so long answers weigh more; seq-mean-token-mean weighs
    every answer alike, so a token of a short answer weighs more; Dr. GRPO divides by a constant,
    so neither the length of an answer nor of the batch rescales its gradient. norm_len is the
    response budget, --max-len minus --max-prompt-len, never the batch's padded width, which
    changes from batch to batch (verl divides by that width unless `actor.loss_scale_factor` is
    set to norm_len).
    A row whose mask is empty (an answer --overlong-filter took out) counts in no normaliser: the
    seq-means average over the answers left in the loss. A filtered answer carries no verdict, so
    counting it (as TRL's `grpo` and `dr_grpo` losses do, dividing by all rows) would shrink the
    step by the share of truncated answers. Under token-mean the two agree, since a filtered
    answer adds no tokens.
    mask: [b, s] -> (w [b, s], normaliser: int tensor [])
    Example: two answers of 1 and 3 tokens, norm_len 4:
      token-mean: w [1 | 1 1 1], n 4;  seq-mean-token-mean: w [1 | 1/3 1/3 1/3], n 2;
      seq-mean-token-sum-norm: w [1 | 1 1 1], n 8.
      One answer with a token loss of -1 beside a filtered one: seq-mean-token-mean gives -1 / 1
      = -1.0 (dividing by both rows would give -0.5).
    """
    tokens = mask.sum(dim=1)                                    # [b]
    seqs = (tokens > 0).sum()
    if loss_agg == "token-mean":
        return mask, tokens.sum().int()
    if loss_agg == "seq-mean-token-mean":
        return mask / tokens.clamp(min=1).unsqueeze(1), seqs.int()
    if loss_agg == "seq-mean-token-sum-norm":
        return mask, (seqs * norm_len).int()
    raise ValueError(loss_agg)


def policy_loss(logp, old_logp, advantages, weights, clip_ratio_low=0.2, clip_ratio_high=0.2,
                kl_coef=0.0, ref_logp=None, is_weights=None, clip_ratio_c=None):
    """PPO's clipped surrogate with GRPO advantages, summed over the tokens with their weights.

        ratio = exp(logp - old_logp)                    (clamped at exp(10) against overflow)
        pg    = -min(ratio * A, clip(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high) * A)
        pg    = min(pg, clip_ratio_c * |A|)  where A < 0       (dual clip; only with clip_ratio_c)
        loss  = pg [* is_weights]  [+ kl_coef * k3(logp, ref_logp)]

    Returns the weighted *sum* over tokens, not a mean: see `loss_weights` for how the sum
    becomes the chosen mean over the whole batch.
    The clip only acts when the policy has moved since the samples were scored, i.e. from the
    second optimizer step on one batch (`--mini-batches`, `--epochs`). With one step per batch
    (the default, as in the reference pipeline) old_logp is the update's own log-prob, the
    ratio is exactly 1, clip_frac is 0 and the loss is the plain policy gradient -A * logp.
    Clip-higher (clip_ratio_high > clip_ratio_low) is DAPO's: it leaves more room to raise
    unlikely tokens, against entropy collapse.
    The PPO clip never bounds a token with A < 0 whose ratio has grown: its loss ratio * |A| grows
    with the ratio, so one such token can dominate a batch. Dual-clip PPO (Ye et al., arXiv
    1912.09729; verl's `actor.clip_ratio_c`, 3 by default there) caps that loss at
    clip_ratio_c * |A|. None (our default, as in the reference pipeline) leaves it off; like the
    clip, it can only act off-policy. stats["clip_frac_dual"] counts the tokens it capped (verl's
    `pg_clipfrac_lower`), apart from stats["clip_frac"].

    logp, old_logp, weights, ref_logp, is_weights: [b, s];  advantages: [b] or [b, s]
    -> (loss_sum [], stats: dict of token sums)
    Example: A=+1, ratio 1.5 with clip 0.2 -> -min(1.5, 1.2) = -1.2 (clipped: no reward for
    moving further); A=-1, ratio 1.5 -> -min(-1.5, -1.2) = 1.5 (never clipped toward more harm);
    A=-1, ratio 4, clip_ratio_c 3 -> min(4, 3 * 1) = 3.0 (dual clip; 4.0 without it).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)                     # [b, 1] broadcasts over tokens
    ratio = torch.exp((logp - old_logp).clamp(max=10.0))
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_ratio_low, 1 + clip_ratio_high) * advantages
    pg = -torch.minimum(surr1, surr2)                            # [b, s]
    dual = torch.zeros_like(pg, dtype=torch.bool)
    if clip_ratio_c is not None:
        cap = -clip_ratio_c * advantages                         # C * |A| where A < 0
        dual = (advantages < 0) & (pg > cap)
        pg = torch.where(dual, cap, pg)
    if is_weights is not None:
        pg = pg * is_weights
    loss = pg
    kl = torch.zeros_like(pg)
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        loss = pg + kl_coef * kl
    on = (weights > 0).float()                                   # the tokens in the loss
    stats = {"pg_loss": masked_sum(pg, on).detach(), "clip_frac": masked_sum((surr2 < surr1).float(), on),
             "clip_frac_dual": masked_sum(dual.float(), on), "kl": masked_sum(kl, on).detach(),
             "neg_logp": masked_sum(-logp, on).detach(), "ratio": masked_sum(ratio, on).detach(),
             "loss_tokens": on.sum()}
    return masked_sum(loss, weights), stats


def toy_reward(response_ids, token_id):
    """The toy task's reward: the fraction of the completion's tokens equal to `token_id`. A random
    policy earns a little of it, so GRPO has a signal to amplify from the first step."""
    return sum(t == token_id for t in response_ids) / max(1, len(response_ids))


def logp_diff_verdict(diffs, warn, stop, first_steps=3):
    """The tripwire on the vLLM-vs-Megatron log-prob gap (mean |diff| per token, one per step).

    After every weight sync both engines hold the same bf16 weights, so the gap is kernel noise:
    about 0.001 on a trained small model and 0.01-0.04 on random Qwen2.5-shaped weights (higher
    entropy). A gap far above that means the two engines run different models — a config field
    read differently (RoPE base or scaling, norm epsilon), a stale or wrong weight sync, a dtype
    — and the run learns nothing while looking healthy. -> "stop" when each of the first
    `first_steps` steps is above `stop` (0 turns the stop off), "warn" when the newest is above
    `warn`, else "ok".
    Example: warn 0.1, stop 0.25: [0.8, 1.2, 0.5] -> stop;  [0.8, 0.01] -> ok;  [0.01, 0.3] -> warn
    """
    if stop > 0 and len(diffs) == first_steps and all(d > stop for d in diffs):
        return "stop"
    return "warn" if diffs and diffs[-1] > warn else "ok"


def rollout_seed(seed, step, stream=0, index=0):
    """The sampling seed of one request: prompt `index` of a step's batch (its place among the
    prompts of that round, whichever engine answers it), in `stream` (0: evaluation, 1 + k: the
    k-th rollout round; other numbers for other draws, e.g. the mini-batch shuffle). 62 bits:
    vLLM keeps seeds as int64 and seeds sample j of a request with seed + j.

    vLLM's sampler draws each request's noise from the request's own seed; a request without one
    gets a seed from numpy's global stream, which the engine seeds only when it starts. Seeding
    every request from (seed, step, stream, index) makes each step's samples a function of the
    step alone: a run resumed after step k draws in step k+1 exactly what it would have drawn
    without the interruption (and preempted requests redraw the same tokens), and any layout
    (TP, PP, DP: how many engines share the prompts) draws the same samples for the same prompt,
    up to the kernels' numerics. Different prompts get different seeds, so two engines never
    sample the same texts."""
    digest = hashlib.sha256(f"{seed}/{step}/{stream}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**62 - 1)


# ==============================================================================================
# run(): the set-up, then the loop, one call or block per phase
# ==============================================================================================
def run(args):
    """The whole run: set-up, then the steps, each phase of the map at the top of this file one
    call or block of the loop. The phases' functions follow below in the same order; set-up,
    checkpoints and logging come after them."""
    cfg, engines, dp = check_run(args)                  # all checked before anything starts
    start_device(args, cfg, dp)
    ctx = load_prompts(args, cfg, engines, dp)
    model, optimizer = build_trainer(cfg, args, ctx["dtype"], args.device)
    ref = build_reference(cfg, args, model, ctx["dtype"])
    resume(ctx, model, optimizer)
    with phase(ctx, 0, "start vLLM", timed=False):
        memory.offload_trainer(model, optimizer)        # vLLM is sized from what is free after this
        ctx["engine"] = engine = create_engine(args, cfg)
        sync_weights(model, engine, cfg)
    log = start_logging(ctx, cfg)
    if args.eval_interval and ctx["test"] and ctx["start"] == 1:        # the accuracy before any training
        m = {"step": 0}
        with phase(ctx, 0, "evaluation", timed=False):
            evaluate(ctx, 0, m)
        log(m)
    from tqdm import tqdm
    for step in tqdm(range(ctx["start"], args.steps + 1), desc="grpo", unit="step", disable=ctx["rank"] != 0,
                     file=sys.stderr):
        m, ctx["times"] = {"step": step}, {}
        ctx["history"].append(m)
        # ---- 1-2. rollout and rewards (vLLM awake), then vLLM sleeps ---------------------------------
        samples = rollout(ctx, step, m)
        with phase(ctx, step, "sleep"):
            engine.sleep(level=args.sleep_level)
        # ---- 3. group advantages, this DP rank's share -----------------------------------------------
        batch = prepare_batch(ctx, samples, m)
        if batch is not None:
            with train_memory_gauge(ctx, m):
                # ---- 4. old and reference log-probs ----------------------------------------------
                with phase(ctx, step, "restore"):
                    memory.restore_grads(model)
                if needs_old_logp_pass(args):
                    with phase(ctx, step, "old_logp"):
                        batch["old_logp"] = compute_logprobs(model, batch, args)
                measure_kl = ref is not None and (args.kl_coef > 0 or step % args.kl_log_interval == 0)
                if measure_kl:
                    with phase(ctx, step, "ref_logp"):
                        batch["ref_logp"] = reference_logprobs(ref, batch, args)
                # ---- 5. policy update (and checkpoint) ---------------------------------------------
                with phase(ctx, step, "update"):
                    stats = train_on_batch(model, optimizer, batch, args, shuffle_rng(args, step))
                    m.update(step_metrics(reduce_stats(stats, ctx), stats, measure_kl))
            if args.save_interval and (step % args.save_interval == 0 or step == args.steps):
                with phase(ctx, step, "save"):
                    save_checkpoint(ctx["ckpt_root"], step, model, optimizer, cfg, train_state(ctx, m), args.keep_last)
        # ---- 6. offload the trainer, vLLM wakes, weight sync -----------------------------------------
        with phase(ctx, step, "offload"):
            memory.offload_trainer(model, optimizer)
        if ctx["gpu"]:
            m["gpu_free_before_wake_gib"] = torch.cuda.mem_get_info()[0] / GIB
        with phase(ctx, step, "wake"):
            engine.wake_up(tags=["weights"])
        with phase(ctx, step, "sync"):
            sync_weights(model, engine, cfg)
        with phase(ctx, step, "wake"):
            engine.wake_up(tags=["kv_cache", "scheduling"])
        # ---- 7. the tripwire, evaluation, log ----------------------------------------------------------
        if "logp_diff" in m:
            ctx["diffs"].append(m["logp_diff"])
            check_logp_diff(ctx["diffs"], args, ctx["rank"])
        if args.eval_interval and ctx["test"] and step % args.eval_interval == 0:
            with phase(ctx, step, "evaluation", timed=False):
                evaluate(ctx, step, m)
        log(m)
    if args.benchmark:
        bench.report(args, ctx, engine, model, optimizer, ref, batch)
    else:
        save_final(ctx, model, cfg)
    convert.shutdown_distributed()


@contextlib.contextmanager
def phase(ctx, step, name, timed=True):
    """One phase of a step: named (--trace prints it on every rank, to find the collective a hang
    waits in), timed (its wall seconds, its GPU work included, add up in ctx["times"][name],
    logged as time_<name>) and, if the GPU runs out of memory in it, stopped with one line naming
    the phase and the flags that lower its memory (memory.out_of_memory_hint)."""
    if ctx["args"].trace:
        print(f"[rank {dist.get_rank()}] step {step}: {name}", flush=True)
    t = time.time()
    try:
        yield
        if ctx["gpu"]:
            torch.cuda.synchronize()
    except UserError:
        raise
    except Exception as e:
        hint = memory.out_of_memory_hint(e, name)
        if hint is None:
            raise
        raise hint from None
    if timed:
        ctx["times"][name] = ctx["times"].get(name, 0.0) + time.time() - t


# ==============================================================================================
# 1. Rollout: the prompts of the step, generated by the engine of each TP group
# ==============================================================================================
def take_prompts(state, k, seed):
    """The next k indices of the shuffled prompt order; a fresh shuffle (a new epoch) when it runs
    out, so no prompt is skipped. state: {"order", "cursor", "epoch"}, saved with checkpoints."""
    out = []
    while len(out) < k:
        if state["cursor"] >= len(state["order"]):
            state["epoch"] += 1
            random.Random(seed + state["epoch"]).shuffle(state["order"])
            state["cursor"] = 0
        take = state["order"][state["cursor"]:state["cursor"] + k - len(out)]
        state["cursor"] += len(take)
        out += take
    return out


def rollout(ctx, step, m):
    """Phases 1-2: generate and score; with --filter-groups, keep only the groups whose rewards
    differ and roll out more prompts until the step has --prompts-per-step of them (or
    --filter-max-rounds is reached). Returns the samples to train on, on every rank."""
    args = ctx["args"]
    kept, seen, rounds, timeouts, preempted = [], [], 0, 0, ctx["engine"].counter("vllm:num_preemptions")
    n = args.n_samples_per_prompt
    while rounds < (args.filter_max_rounds if args.filter_groups else 1):
        prompts = [ctx["train"][i] for i in take_prompts(ctx["data_state"], args.prompts_per_step, args.seed)]
        samples, t = rollout_round(ctx, prompts, step, rounds)
        rounds, timeouts, seen = rounds + 1, timeouts + t, seen + samples
        shape_rewards(samples, args)
        kept += keep_informative(samples, n) if args.filter_groups else samples
        if len(kept) >= args.prompts_per_step * n:
            break
    groups = min(len(kept) // n, args.prompts_per_step) // ctx["dp"] * ctx["dp"]   # whole groups per DP rank
    kept = kept[:groups * n]
    scores = torch.tensor([s["score"] for s in seen])
    lengths = [len(s["response_ids"]) for s in seen]
    # over every sample rolled out in the step, also those of the groups --filter-groups dropped
    m.update({"reward": sum(s["reward"] for s in seen) / len(seen), "score": float(scores.mean()),
              "score_std": float(scores.std()) if len(scores) > 1 else 0.0,
              "accuracy": share_correct(seen),
              "response_len_mean": sum(lengths) / len(lengths), "response_len_max": max(lengths),
              "generated_tokens": sum(lengths), "truncated_frac": sum(s["truncated"] for s in seen) / len(seen),
              "reward_timeouts": timeouts, "rollout_digest": digest(seen)})
    if args.filter_groups:
        m.update({"filter_rounds": rounds, "filter_dropped_frac": 1 - len(kept) / len(seen),
                  "filter_groups_trained": groups})
    if preempted is not None:
        m["vllm_preemptions"] = ctx["engine"].counter("vllm:num_preemptions") - preempted
    if ctx["gpu"]:
        m["gpu_used_rollout_gib"] = memory.gpu_used() / GIB
    return kept


def rollout_round(ctx, prompts, step, rnd):
    """Phase 1, one round: this engine generates its share of `prompts` and scores it; every rank
    gets every engine's samples back (TP and PP peers of a DP rank must train on identical rows,
    and PP stages rolled out different prompts), in the order of `prompts` whatever the number
    of engines, with the samples of one prompt contiguous."""
    args, engine = ctx["args"], ctx["engine"]
    places = range(ctx["engine_index"], len(prompts), ctx["engines"])        # this engine's prompts: their places in the round
    mine = [prompts[k] for k in places]
    requests = [ctx["sampling"](*request, seed=rollout_seed(args.seed, step, 1 + rnd, k))
                for k, request in zip(places, rollout_requests([p for p, _ in mine], args, rnd))]
    with phase(ctx, step, "rollout"):
        outs = engine.generate([p for p, _ in mine], requests)
    samples = []
    for k, (prompt_ids, truth), group_outs in zip(places, mine, outs):
        for resp, lps, finish in group_outs:
            samples.append({"prompt_ids": prompt_ids, "response_ids": resp, "rollout_logp": lps,
                            "truncated": finish == "length", "truth": truth, "place": k,
                            "budget": args.max_len - len(prompt_ids)})
    timed_out = 0
    with phase(ctx, step, "reward"):
        if ctx["tp_rank"] == 0:                  # TP peers hold the same samples: score once
            timed_out = score(samples, args, ctx["tokenizer"])
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (samples, timed_out) if ctx["tp_rank"] == 0 else ([], 0))
    all_samples = sorted((s for g in gathered[::args.tp] for s in g[0]), key=lambda s: s["place"])   # stable
    return all_samples, sum(g[1] for g in gathered)


def rollout_requests(prompts, args, rnd):
    """(max new tokens, logprobs) of each prompt's request. Each prompt may be answered with what
    is left of --max-len after it, as in the reference pipeline. vLLM's log-probs serve the
    vLLM-vs-Megatron check (and --tis-cap): the loss takes Megatron's. They cost Python objects
    per token in the thread that also schedules the GPU, so without --tis-cap only the first
    prompt of an engine's share asks for them (logprobs=0: the sampled token's), in the first
    round: its n samples are plenty to see a bad sync. --filter-groups drops a group whose
    answers all score alike, log-probs and all, so there the first prompt of every round asks; a
    step whose asking groups were all dropped has no check (no logp_diff).
    Example: max_len 20, prompts of 3 and 10 tokens -> [(17, 0), (10, None)]"""
    asks = rnd == 0 or args.filter_groups
    return [(args.max_len - len(p), 0 if (args.tis_cap or (i == 0 and asks)) else None)
            for i, p in enumerate(prompts)]


def digest(samples):
    """A short hash of every generated token of the step: equal digests, equal rollouts (used to
    check that a resumed run draws the same samples)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(str(s["response_ids"]).encode())
    return h.hexdigest()[:16]


# ==============================================================================================
# 1. The rollout engine: the five calls the loop makes
# ==============================================================================================
# The loop never touches vLLM directly. It asks its engine for five things:
#
#   engine.generate(prompts, requests)   prompts: token-id lists; requests: one dict per prompt,
#                                        vLLM's SamplingParams fields (`sampling_request`)
#                                        -> per prompt, its n samples: (token ids, log-prob of
#                                        each sampled token or None, "stop" | "length")
#   engine.load_weights(named_tensors)   (HF name, full tensor) pairs, as convert.export_hf
#                                        yields them; copied into the engine's weights in place
#   engine.sleep(level)                  hand the engine's GPU memory to the trainer ...
#   engine.wake_up(tags)                 ... and take it back ("weights", then "kv_cache")
#   engine.reset_prefix_cache()          forget prompt prefixes computed with older weights
#
# (and engine.counter(name), vLLM's cumulative counters for the log, None on the CPU; only the
# benchmark, which times vLLM against itself, reaches into vLLM past these calls)
#
# `VLLMEngine` is the one GPU users run; `TorchEngine` answers the same calls with a plain
# PyTorch model on the CPU, so that the whole loop runs where vLLM cannot (CI, a laptop):
# `grpo.py --device cpu`.

# vLLM samples top-k / top-p requests (our evaluation: T 0.6, top-p 0.95, top-k 20) with
# FlashInfer's kernels, which this vLLM build compiles with nvcc on their first use, in the middle
# of a run: that was the slow first evaluation. vLLM's own top-k / top-p (Triton, compiled during
# its warm-up) samples the same distribution. Training rollouts (top-p 1, top-k -1) use neither.
os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")


def sampling_request(n, temperature, max_tokens, stop_token_ids, logprobs=None, top_p=1.0, top_k=-1, seed=None,
                     ignore_eos=False):
    """One prompt's request, as the fields of vLLM's SamplingParams (the CPU engine reads the same).

    Training rollouts sample with top_p 1 and top_k -1: truncation would renormalise the
    distribution, and the samples would no longer come from the policy the loss assumes.
    logprobs=0 asks for the log-prob of each sampled token (after temperature; see VLLMEngine);
    None asks for none. seed: sample j of the request is drawn with seed + j."""
    return dict(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                logprobs=logprobs, stop_token_ids=list(stop_token_ids) or None, seed=seed, ignore_eos=ignore_eos)


def cudagraph_sizes(max_num_seqs):
    """The decode batch sizes vLLM captures CUDA graphs for. vLLM's default list for up to 1024
    sequences has 83 sizes, each captured twice (piecewise and full graphs): that capture is most
    of an engine's start-up. Powers of two, then steps of 128, pad a batch by at most 128
    sequences; a rollout keeps its batch full for most of its steps anyway."""
    sizes = [s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s < max_num_seqs]
    sizes += list(range(256, max_num_seqs, 128)) + [max_num_seqs]
    return sorted(set(sizes))


class VLLMEngine:
    """vLLM colocated in this rank: one engine per TP group, sharing torchrun's process group
    (external_launcher); the ranks of a TP group submit identical requests and get identical
    samples.

    load_format="dummy": vLLM allocates random weights and never reads the checkpoint; the first
    weight sync fills them from Megatron, so both engines provably run the same weights. Every
    request of the loop carries its own seed (rollout_seed); the engine-wide seed only draws for
    the benchmark's unseeded plain-vLLM ceiling.
    """

    def __init__(self, args, cfg, gpu_memory_utilization):
        from vllm import LLM
        self.llm = LLM(
            model=args.hf_dir, tensor_parallel_size=args.tp, distributed_executor_backend="external_launcher",
            enable_sleep_mode=True, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=args.max_len,
            seed=args.seed + dist.get_rank() // args.tp, enable_prefix_caching=True,
            # log-probs after temperature, comparable with the trainer's logits / T
            logprobs_mode="processed_logprobs", max_num_seqs=args.max_num_seqs,
            # the benchmark reads vLLM's counters (preemptions); a training run skips their cost
            disable_log_stats=not args.benchmark,
            # With TP > 1 vLLM fuses all-reduce + RMSNorm through FlashInfer's MNNVL all-reduce, and
            # its custom all-reduce maps peer memory over CUDA IPC. Both need NVLink features that
            # shared hosts often switch off (seen: CUBLAS_STATUS_INTERNAL_ERROR, then an illegal
            # memory access, at engine start on 2 x H200). NCCL alone is enough for rollouts.
            disable_custom_all_reduce=True,
            compilation_config={"pass_config": {"fuse_allreduce_rms": False},
                                "cudagraph_capture_sizes": cudagraph_sizes(args.max_num_seqs),
                                "max_cudagraph_capture_size": args.max_num_seqs})

    def generate(self, prompts, requests):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        if not prompts:
            return []
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                                 [SamplingParams(**r) for r in requests], use_tqdm=False)
        return [[(list(c.token_ids),
                  [next(iter(lp.values())).logprob if lp else 0.0 for lp in c.logprobs] if c.logprobs else None,
                  c.finish_reason) for c in o.outputs] for o in outs]

    def load_weights(self, named_tensors):
        # vLLM's Qwen2 loader re-fuses qkv / gate-up and re-shards them its own way, copying into
        # the existing bf16 tensors in place, so its CUDA graphs stay valid.
        self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model.load_weights(named_tensors)

    def sleep(self, level):
        self.llm.sleep(level=level)

    def wake_up(self, tags):
        self.llm.wake_up(tags=tags)

    def reset_prefix_cache(self):
        self.llm.reset_prefix_cache()

    def counter(self, name):
        """A cumulative vLLM counter (e.g. "vllm:num_preemptions"), or None without log stats."""
        try:
            return sum(m.value for m in self.llm.get_metrics() if m.name == name)
        except Exception:
            return None


class TorchEngine:
    """The same five calls on a transformers Qwen2 in fp32, for machines without a GPU. This is
    what vLLM does for us, written out (without its paged KV cache, continuous batching and
    CUDA graphs, which are what make vLLM fast):

    - every sample of every prompt is a row; up to --max-num-seqs rows decode together, prompts
      left-padded so that every row's next token sits in the last column;
    - prefill: one forward over the prompts fills the KV cache; decode: one forward per new
      token, each feeding only the newest token and reading the rest from the cache;
    - each row draws its tokens with its own generator, seeded seed + j for sample j as vLLM
      does, so a sample depends on its request alone, never on its batch-mates (up to the float
      rounding of a batched forward);
    - a row ends at a stop token ("stop", also when it is the last token allowed; kept in its
      output, as vLLM keeps it) or at max_tokens ("length").

    It starts with random weights, as vLLM's load_format="dummy"; the first weight sync fills
    them. The trainer on the CPU is fp32 too, so both sides compute the same model and their
    log-probs of the sampled tokens agree to float rounding: the weight sync is checked exactly.
    There is no GPU memory to hand over: sleep and wake_up do nothing, and there is no prefix
    cache to reset.
    """

    def __init__(self, hf_dir, max_num_seqs, seed):
        from transformers import AutoConfig, AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir)).float().eval()
        # vLLM stops at the generation config's eos ids too (unless ignore_eos), not only at the
        # request's stop_token_ids.
        gen = os.path.join(hf_dir, "generation_config.json")
        eos = json.load(open(gen)).get("eos_token_id") if os.path.isfile(gen) else None
        self.eos = set([eos] if isinstance(eos, int) else eos or [])
        self.max_num_seqs = max_num_seqs
        self.unseeded = torch.Generator().manual_seed(seed)     # for requests without a seed

    def load_weights(self, named_tensors):
        params = self.model.state_dict()                # a tied lm_head shares embed_tokens' tensor
        with torch.no_grad():
            for name, tensor in named_tensors:
                params[name].copy_(tensor)

    def sleep(self, level):
        pass

    def wake_up(self, tags):
        pass

    def reset_prefix_cache(self):
        pass

    def counter(self, name):
        return None

    def generate(self, prompts, requests):
        rows = [(k, j) for k, r in enumerate(requests) for j in range(r["n"])]
        out = [[None] * r["n"] for r in requests]
        for i in range(0, len(rows), self.max_num_seqs):
            part = rows[i:i + self.max_num_seqs]
            for (k, j), sample in zip(part, self._decode([prompts[k] for k, _ in part], [requests[k] for k, _ in part],
                                                         [j for _, j in part])):
                out[k][j] = sample
        return out

    @torch.no_grad()
    def _decode(self, prompts, requests, sample_index):
        from transformers import DynamicCache
        B, P = len(prompts), max(len(p) for p in prompts)
        tokens = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts])            # [B, P] left-padded
        mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
        position = (mask.cumsum(1) - 1).clamp(min=0)                                     # 0 at each prompt's start
        gens = [torch.Generator().manual_seed(r["seed"] + j) if r["seed"] is not None else self.unseeded
                for r, j in zip(requests, sample_index)]
        stops = [set(r["stop_token_ids"] or []) | (set() if r["ignore_eos"] else self.eos) for r in requests]
        samples = [([], [] if r["logprobs"] is not None else None, None) for r in requests]
        cache = DynamicCache()
        for t in range(max(r["max_tokens"] for r in requests)):
            # the cache is passed by position: transformers renamed its keyword (past_key_values ->
            # cache) between the 5.x releases this project accepts
            logits = self.model(tokens, mask, position, cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            for b, (r, (ids, logps, finish)) in enumerate(zip(requests, samples)):
                if finish is not None:
                    continue
                token, logp = sample_token(logits[b].float(), r, gens[b])
                ids.append(token)
                if logps is not None:
                    logps.append(logp)
                if token in stops[b] or len(ids) == r["max_tokens"]:     # stop tokens first, as vLLM's check_stop
                    samples[b] = (ids, logps, "stop" if token in stops[b] else "length")
            if all(s[2] is not None for s in samples):
                break
            tokens = torch.tensor([[s[0][-1]] for s in samples])                        # [B, 1] the newest token
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
            position = position[:, -1:] + 1
        return samples


def sample_token(logits, request, generator):
    """One token from one row's next-token logits [V], as vLLM's sampler draws it: temperature,
    then top-k, then top-p (nucleus) on what is left, then a draw from the renormalised
    distribution (temperature 0: the most likely token). Returns (token, its log-prob under the
    distribution it was drawn from: vLLM's processed_logprobs).
    Example: logits [2, 1, 0], top_k 2 -> the draw is between tokens 0 and 1, p = [0.73, 0.27]."""
    if request["temperature"] == 0:
        token = int(logits.argmax())
        return token, float(torch.log_softmax(logits, -1)[token])
    z = logits / request["temperature"]
    if 0 < request["top_k"] < z.numel():
        z = z.masked_fill(z < torch.topk(z, request["top_k"]).values[-1], float("-inf"))
    if request["top_p"] < 1:
        p, order = torch.softmax(z, -1).sort(descending=True)
        drop = p.cumsum(-1) - p >= request["top_p"]            # past the nucleus (never the first)
        z = z.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    logp = torch.log_softmax(z, -1)
    token = int(torch.multinomial(logp.exp(), 1, generator=generator))
    return token, float(logp[token])


def create_engine(args, cfg):
    """This rank's share of its TP group's rollout engine: vLLM on GPUs, sized from what the GPU
    has free now (the trainer's state is in host memory at this point); TorchEngine with --device
    cpu."""
    t0 = time.time()
    if args.device == "cpu":
        engine = TorchEngine(args.hf_dir, args.max_num_seqs, args.seed)
    else:
        free, total = torch.cuda.mem_get_info()
        util = args.gpu_memory_utilization or max(0.05, (free - memory.rollout_reserve(total)) / total)
        log0(f"GPU: {free / GIB:.1f} of {total / GIB:.1f} GiB free after offload; vLLM gets {util:.2f}")
        engine = VLLMEngine(args, cfg, util)
    log0(f"{type(engine).__name__} up in {time.time() - t0:.0f}s")
    return engine


# ==============================================================================================
# 2. Rewards: the task's reward function, in worker processes
# ==============================================================================================
def score(samples, args, tokenizer):
    """Fill "score" (the task's reward) and "correct" (whether the reward counts the answer as
    right) in each sample; returns how many timed out."""
    if args.toy_token is not None:
        for s in samples:
            s["score"], s["correct"] = prepare.reward_and_correct(toy_reward(s["response_ids"], args.toy_token))
        return 0
    texts = tokenizer.batch_decode([s["response_ids"] for s in samples], skip_special_tokens=True)
    scores, correct, timed_out = score_texts(texts, [s["truth"] for s in samples], args)
    for s, r, c in zip(samples, scores, correct):
        s["score"], s["correct"] = r, c
    return timed_out


def score_texts(texts, truths, args):
    """(scores, correct, timed_out) of decoded answers by the --reward function, in --reward-workers
    processes. A reward function that raises stops the run at its first scoring, in one line."""
    try:
        return prepare.score_responses(texts, truths, num_workers=args.reward_workers, reward_fn=args.reward_fn)
    except prepare.RewardError as e:
        raise UserError(f"{e} (fix it, or return 0.0 for answers it cannot judge)") from None


def share_correct(samples):
    """accuracy: the share of samples whose reward counts them as right. Not the share scoring 1:
    a reward may give 1.1 to a right answer that is boxed and 1.0 to one that is not.
    Example: scores [1.1, 1.0, 0.1] with correct [True, True, False] -> 0.667 (the mean score is 0.733)"""
    return sum(s["correct"] for s in samples) / len(samples)


def shape_rewards(samples, args):
    """The reward GRPO trains on, from each sample's "score": plus the soft overlong penalty with
    --overlong-buffer; and "in_loss" 0 for a truncated answer with --overlong-filter (it carries
    no verdict on its answer, only that it ran out of room). In place."""
    rewards = torch.tensor([s["score"] for s in samples], dtype=torch.float32)
    if args.overlong_buffer:
        rewards += overlong_penalty(torch.tensor([len(s["response_ids"]) for s in samples]),
                                    torch.tensor([s["budget"] for s in samples]), args.overlong_buffer,
                                    args.overlong_penalty)
    for s, r in zip(samples, rewards.tolist()):
        s["reward"] = r
        s["in_loss"] = 0.0 if (args.overlong_filter and s["truncated"]) else 1.0


# ==============================================================================================
# 3. Group advantages and the batch: rows of prompt + response, right-padded
# ==============================================================================================
def prepare_batch(ctx, samples, m):
    """Phase 3: group advantages over all samples, then this DP rank's contiguous share."""
    args = ctx["args"]
    if not samples:
        return None
    r = torch.tensor([s["reward"] for s in samples])
    adv = group_advantages(r, args.n_samples_per_prompt, norm_by_std=not args.no_std_norm)
    for s, a in zip(samples, adv.tolist()):
        s["advantage"] = a
    m.update({"adv_abs_mean": float(adv.abs().mean()), "adv_max": float(adv.max()), "adv_min": float(adv.min()),
              "train_tokens": sum(len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples)})
    per_dp = len(samples) // ctx["dp"]
    return make_batch(samples[ctx["dp_rank"] * per_dp:(ctx["dp_rank"] + 1) * per_dp])


def keep_informative(samples, n):
    """The samples of the prompts whose n rewards are not all equal (--filter-groups)."""
    keep = informative_groups(torch.tensor([s["reward"] for s in samples]), n).tolist()
    return [s for g, k in enumerate(keep) if k for s in samples[g * n:(g + 1) * n]]


def make_batch(samples, pad_id=0):
    """Stack samples into the tensors one training step reads.

    Row b is prompt + response, right-padded. Position t's logits predict token t+1, so the
    per-token tensors are aligned with *inputs*: targets[b, t] = tokens[b, t+1], and
    mask[b, t] = 1 exactly where that target is a response token (times the sample's "in_loss",
    0 for an answer filtered out of the loss, e.g. by --overlong-filter).
    Right padding needs no attention mask: attention is causal, so no real token sees a pad.

    samples: list of dicts with prompt_ids, response_ids, advantage, rollout_logp (per response
    token, or None where vLLM was not asked for them), optional in_loss (default 1)
    -> tokens, targets, mask, rollout_logp: [B, L];  advantages, lengths, has_rollout_logp: [B]
    Example: prompt [5, 6], response [7, 8] -> tokens [5, 6, 7, 8], targets [6, 7, 8, pad],
             mask [0, 1, 1, 0]: logits at 6 score 7, logits at 7 score 8.
    """
    L = max(len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples)
    B = len(samples)
    tokens = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.float32)
    rollout_logp = torch.zeros((B, L), dtype=torch.float32)
    has_rollout_logp = torch.zeros(B, dtype=torch.float32)
    for b, s in enumerate(samples):
        p, r = len(s["prompt_ids"]), len(s["response_ids"])
        tokens[b, :p + r] = torch.tensor(s["prompt_ids"] + s["response_ids"])
        mask[b, p - 1:p + r - 1] = float(s.get("in_loss", 1))
        if s.get("rollout_logp") is not None:
            rollout_logp[b, p - 1:p + r - 1] = torch.tensor(s["rollout_logp"], dtype=torch.float32)
            has_rollout_logp[b] = 1
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = pad_id
    advantages = torch.tensor([s.get("advantage", 0.0) for s in samples], dtype=torch.float32)
    lengths = torch.tensor([len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples])
    return {"tokens": tokens, "targets": targets, "mask": mask, "rollout_logp": rollout_logp,
            "advantages": advantages, "lengths": lengths, "has_rollout_logp": has_rollout_logp}


def select_rows(batch, rows):
    """The sub-batch of the given row indices (every tensor of the batch, row-wise)."""
    idx = torch.as_tensor(rows, dtype=torch.long)
    return {k: v[idx] for k, v in batch.items()}


def micro_batches(batch, max_tokens):
    """Cut a batch into micro batches of at most `max_tokens` (rows x padded length), rows sorted
    by length and each micro batch trimmed to its longest row: response lengths vary from tens to
    thousands of tokens, and a row padded to the batch's longest would mostly compute padding.
    Returns a list of (row indices, micro batch dict)."""
    lengths = batch["lengths"]
    order = torch.argsort(lengths, descending=True).tolist()
    out, cur = [], []
    for i in order:
        longest = int(lengths[cur[0]]) if cur else int(lengths[i])
        if cur and (len(cur) + 1) * longest > max_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    result = []
    for rows in out:
        L = int(lengths[rows[0]])
        idx = torch.tensor(rows)
        result.append((rows, {k: (v[idx, :L] if v.dim() == 2 else v[idx]) for k, v in batch.items()}))
    return result


def mini_batch_rows(num_rows, num_mini_batches, rng):
    """Shuffled row indices cut into `num_mini_batches` near-equal parts, one optimizer step each
    (verl's ppo_mini_batch_size, TRL's steps per generation). Rows, never tokens, are split, so
    each mini-batch's loss is the exact token mean (or chosen mean) of its own rows.
    Example: 5 rows, 2 mini-batches -> e.g. [[3, 0, 4], [1, 2]]"""
    order = list(range(num_rows))
    rng.shuffle(order)
    k = min(num_mini_batches, num_rows)
    return [order[num_rows * i // k:num_rows * (i + 1) // k] for i in range(k)]


# ==============================================================================================
# 4-5. Log-probs and the policy update, on Megatron
# ==============================================================================================
def build_trainer(cfg, args, dtype=torch.bfloat16, device="cuda"):
    """Policy (DDP-wrapped GPTModel, loaded from args.load) and Megatron's (distributed) Adam.

    The checkpoint is loaded *before* the optimizer is built: a mixed-precision optimizer copies
    the bf16 weights into its fp32 master weights when it is created and writes those back after
    every step, so weights loaded later would be replaced by the random init at the first step.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    # calculate_per_token_loss: the loss function returns (sum, normaliser); Megatron sums both
    # over micro batches and DP ranks and divides once -> an exact mean over the whole batch.
    config = convert.transformer_config(
        cfg, dtype, args.tp, args.pp, use_cpu_initialization=device == "cpu", perform_initialization=True,
        calculate_per_token_loss=True, variable_seq_lengths=args.pp > 1, **memory.recompute_settings(args.recompute))
    model = convert.build_model(cfg, config)
    if device != "cpu":
        model.cuda()
    if args.load:                  # None in --benchmark: random weights
        convert.load_mcore(model, args.load)
    # bf16 gradient reduction halves the grad buffer (2 instead of 4 bytes per parameter); the
    # optimizer still accumulates in fp32 master weights. Sums over many DP ranks lose a little
    # precision, which is why fp32 stays the default where memory allows.
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.grad_reduce_dtype == "fp32", use_distributed_optimizer=args.distributed_optimizer,
        average_in_collective=False, overlap_grad_reduce=False)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    # Without finalize_model_grads no gradient is ever reduced over data-parallel ranks, and it is
    # what divides by the global normaliser.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    opt_config = OptimizerConfig(
        optimizer="adam", lr=args.lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=1e-8, clip_grad=args.grad_clip, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, use_distributed_optimizer=args.distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    apply_weight_decay_multipliers(optimizer, args.weight_decay)
    for inner in memory.torch_optimizers(optimizer):
        for group in inner.param_groups:
            # torch's default "foreach" AdamW computes each step's temporaries for all parameters
            # at once (4 more bytes per parameter at the step's peak); one tensor at a time they
            # are the size of the largest tensor, for a few milliseconds more per step.
            group["foreach"] = False
    if args.adam_moments == "host":
        t0 = time.time()
        memory.stream_adam_moments(optimizer)
        log0(f"Adam's moments: {sum(p.numel() for p in memory.optimizer_tensors(optimizer)) * 8 / GIB:.1f} GiB of "
             f"pinned host memory in {time.time() - t0:.0f}s")
    return ddp, optimizer


def apply_weight_decay_multipliers(optimizer, weight_decay):
    """Norm weights and biases are not decayed: get_megatron_optimizer puts them in param groups
    with wd_mult 0, but only Megatron-LM's OptimizerParamScheduler ever multiplies it in; we run
    without one, so without this every group would decay by the full weight_decay — pulling
    RMSNorm gains toward 0 and the qkv biases with them."""
    for inner in memory.torch_optimizers(optimizer):
        for group in inner.param_groups:
            group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def needs_old_logp_pass(args):
    """A separate old-log-prob forward is needed once the policy moves within a batch."""
    return args.old_logp_pass or args.mini_batches * args.epochs > 1


def compute_logprobs(model, batch, args):
    """Per-token log-probs of the batch under `model` (no grad), [B, L], on the last PP stage.

    Computed by Megatron, not taken from vLLM: the ratio logp/old_logp must compare the same
    numerics, or kernel differences between the engines would look like policy change and get
    clipped. Under no_grad, not inference_mode: Megatron's rotary embedding caches tensors,
    and inference-mode tensors in that cache break the backward pass later.
    """
    from megatron.core import parallel_state as ps
    B, Lmax = batch["tokens"].shape
    out = torch.zeros(B, Lmax)
    mbs = micro_batches(batch, args.micro_batch_tokens)

    def loss_fn(logp, _ent, mb):
        # forward_only: the schedule still takes (loss, normaliser, stats) from a loss function,
        # but nothing is backpropagated and only the stats (the log-probs themselves) are read
        return logp.new_zeros(()), torch.ones((), dtype=torch.int, device=logp.device), {"logp": logp.detach()}
    model.eval()
    with torch.no_grad():
        res = _run_micro_batches(model, [mb for _, mb in mbs], loss_fn, True, args)
    model.train()
    if ps.is_pipeline_last_stage():
        for (rows, mb), r in zip(mbs, res):
            out[torch.tensor(rows), :r["logp"].shape[1]] = r["logp"].float().cpu()
    return out


def reference_logprobs(ref, batch, args):
    """The frozen initial policy's log-probs; it visits the GPU for this forward only."""
    if not args.ref_on_gpu:
        memory.restore_reference(ref)
    out = compute_logprobs(ref, batch, args)
    if not args.ref_on_gpu:
        memory.offload_reference(ref)
    return out


def token_logprobs(logits, targets, temperature):
    """log pi(target) per position, for any TP: logits are vocab-sharded [..., V/tp] and
    vocab_parallel_cross_entropy does the softmax across the shards. Temperature divides the
    logits exactly as vLLM's sampler does, so the two sides measure the same distribution.
    logits [..., V/tp], targets [...] -> [...]"""
    from megatron.core import tensor_parallel
    # The cross entropy upcasts a bf16 input itself and then works in place on that fp32 copy, so
    # at T = 1 bf16 logits go in as they are: one fp32 copy of the logits less. fp32 logits must
    # be copied, or the in-place work would overwrite the model's output.
    if temperature != 1.0 or logits.dtype == torch.float32:
        logits = logits.float() / temperature
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, targets)


def vocab_parallel_entropy(logits):
    """Entropy of softmax(logits) per position, the vocabulary sharded over TP (no gradient):

        H = log Z - sum_v p_v z_v,   log Z = m + log sum_v exp(z_v - m)

    Three sums over the shards (max, sum of exp, sum of p*z) make it exact for any TP.
    logits [..., V/tp] -> [...]"""
    from megatron.core import parallel_state as ps
    group = ps.get_tensor_model_parallel_group()
    z = logits.float()
    m = z.max(dim=-1, keepdim=True).values
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    e = torch.exp(z - m)
    sums = torch.stack([e.sum(dim=-1), (e * z).sum(dim=-1)])
    if ps.get_tensor_model_parallel_world_size() > 1:
        dist.all_reduce(sums, group=group)
    return m.squeeze(-1) + sums[0].log() - sums[1] / sums[0]


def forward_hidden(model, tokens, position_ids):
    """GPTModel's forward up to, not including, its output layer: the final-normed hidden states
    [b, s, h] (on the last pipeline stage; other stages return what they send on).

    GPTModel would multiply them by the [V/tp, h] output matrix at once: for a micro batch of
    8192 tokens and Qwen's 151936-token vocabulary that is 2.5 GB of bf16 logits, plus the
    cross entropy's fp32 copy and the same again for their gradient. `chunked_logprobs` does the
    projection a chunk of tokens at a time instead. For this one call the output layer hands its
    input back unchanged (an instance attribute shadows the class's forward)."""
    gpt = _gpt(model)
    head = gpt.output_layer if gpt.post_process else None
    if head is not None:
        head.forward = lambda hidden_states, weight=None, runtime_gather_output=None: (hidden_states, None)
    try:
        return model(tokens, position_ids, None)
    finally:
        if head is not None:
            del head.forward


def _gpt(model):
    """The GPTModel inside Megatron's DDP wrapper (the reference model has none)."""
    return getattr(model, "module", model)


def chunked_logprobs(model, hidden, targets, temperature, chunk_tokens, entropy_out=None):
    """log pi(target) per position from the final hidden states, `chunk_tokens` tokens at a time.

    Each chunk runs the output layer and the cross entropy under activation checkpointing, so
    only one chunk's logits exist at a time in the forward, and the backward recomputes them one
    chunk at a time: the [tokens, vocabulary] logits are never whole. The price is one more
    output-layer matmul per token in the backward. chunk_tokens 0: one chunk.
    With `entropy_out` (a list), the policy's entropy per position is appended (no gradient).
    hidden [b, s, h], targets [b, s] -> [b, s]
    """
    from torch.utils.checkpoint import checkpoint
    gpt = _gpt(model)
    weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
    b, s, h = hidden.shape
    flat_h = hidden.reshape(b * s, 1, h)              # the output layer reads [tokens, batch, h]
    flat_t = targets.reshape(b * s, 1)
    chunk = chunk_tokens or b * s

    def head_logprobs(hc, tc, calls):
        calls.append(1)
        logits, _ = gpt.output_layer(hc, weight=weight)  # [c, 1, V/tp]
        if entropy_out is not None and len(calls) == 1:   # not again when the backward recomputes the chunk
            with torch.no_grad():
                entropy_out.append(vocab_parallel_entropy(logits.detach() / temperature).reshape(-1))
        return token_logprobs(logits, tc, temperature)

    out = []
    for i in range(0, b * s, chunk):
        hc, tc = flat_h[i:i + chunk], flat_t[i:i + chunk]
        if torch.is_grad_enabled() and chunk < b * s:
            out.append(checkpoint(head_logprobs, hc, tc, [], use_reentrant=False))
        else:
            out.append(head_logprobs(hc, tc, []))
    logp = torch.cat(out).reshape(b, s)
    if entropy_out is not None and entropy_out:
        entropy_out[:] = [torch.cat(entropy_out).reshape(b, s)]
    return logp


def _run_micro_batches(model, mbs, loss_fn, forward_only, args, entropy=False):
    """Megatron's pipeline schedule over our micro batches; returns the loss_fn results (last
    stage). On the last stage the schedule's "output tensor" is the per-token log-prob [b, s]
    (and the entropy, when asked): loss_fn(logp, ent, mb) turns it into the loss."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    device = next(model.parameters()).device
    last = _gpt(model).post_process

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
        tokens = mb["tokens"]
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        out = forward_hidden(model, tokens, position_ids)   # [b, s, h] on the last stage
        if not last:
            return out, None
        ent = [] if entropy else None
        logp = chunked_logprobs(model, out, mb["targets"], args.temperature, args.logits_chunk_tokens, ent)
        return logp, lambda lp: loss_fn(lp, ent[0] if ent else None, mb)
    L = max(mb["tokens"].shape[1] for mb in mbs)
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(mbs), model=[model], num_microbatches=len(mbs),
        seq_length=L, micro_batch_size=max(mb["tokens"].shape[0] for mb in mbs), forward_only=forward_only)


def norm_len(args):
    """Dr. GRPO's constant normaliser: the response budget of a prompt of the longest allowed length."""
    return args.max_len - (args.toy_prompt_len if args.toy_token is not None else args.max_prompt_len)


def train_on_batch(model, optimizer, batch, args, rng):
    """--epochs passes over the batch, each cut into --mini-batches shuffled mini-batches, one
    optimizer step per mini-batch (the GRPO paper's mu iterations; TRL's num_iterations, verl's
    ppo_epochs and ppo_mini_batch_size). Stats are summed over all steps; grad_norm is the mean."""
    total, norms, skipped = {}, [], 0.0
    for epoch in range(args.epochs):
        for i, rows in enumerate(mini_batch_rows(batch["tokens"].shape[0], args.mini_batches, rng)):
            if epoch or i:               # the state goes back to host memory while activations live
                memory.offload_optimizer(optimizer)
            s = update_step(model, optimizer, select_rows(batch, rows), args)
            norms.append(s.pop("grad_norm"))
            skipped += s.pop("update_skipped")
            for key, v in s.items():
                total[key] = total.get(key, 0.0) + v
    total["grad_norm"] = sum(norms) / len(norms)
    total["update_skipped"] = skipped
    total["optimizer_steps"] = float(len(norms))
    return total


def shuffle_rng(args, step):
    """The mini-batch shuffle's random stream: a seed of its own each step (rollout_seed's stream
    99, which no rollout round reaches), so that a resumed step shuffles as it would have."""
    return random.Random(rollout_seed(args.seed, step, 99))


def update_step(model, optimizer, batch, args):
    """One optimizer step over `batch` (micro batches accumulate gradients). Returns stats
    (sums over this DP rank's rows; reduced over DP by the caller).

    Old log-probs: PPO's ratio compares the policy being updated with the one that sampled. With
    one optimizer step per rollout batch (the default) the two are the same weights before that
    step, so the "old" log-probs are exactly the log-probs this forward computes:
    `logp.detach()`. The ratio is then 1 in value and its gradient is grad(logp), the policy
    gradient; a separate forward would recompute the same numbers (up to kernel noise) at the
    cost of a whole extra pass. With several steps per batch (or --old-logp-pass), batch["old_logp"]
    comes from a forward before the first step.
    The old log-probs are also compared with vLLM's log-probs of the same sampled tokens
    (`logp_diff`): a stale or wrong weight sync, or two different models, show up there."""
    from megatron.core import parallel_state as ps
    mbs = micro_batches(batch, args.micro_batch_tokens)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    use_ref, use_old = "ref_logp" in batch, "old_logp" in batch

    def loss_fn(logp, ent, mb):
        old = mb["old_logp"] if use_old else logp.detach()
        weights, normaliser = loss_weights(mb["mask"], args.loss_agg, norm_len(args))
        is_w = tis_weights(old, mb["rollout_logp"], args.tis_cap) if args.tis_cap else None
        loss_sum, stats = policy_loss(logp, old, mb["advantages"], weights, args.clip_ratio_low, args.clip_ratio_high,
                                      args.kl_coef, mb["ref_logp"] if use_ref else None, is_w, args.clip_ratio_c)
        # old is the policy that sampled, as Megatron computes it: compared with vLLM's numbers
        checked = mb["mask"] * mb["has_rollout_logp"].unsqueeze(1)
        stats["logp_diff"] = masked_sum((old - mb["rollout_logp"]).abs(), checked)
        stats["logp_diff_tokens"] = checked.sum()
        if is_w is not None:
            stats["tis_weight"] = masked_sum(is_w, (weights > 0).float())
        if ent is not None:   # a token mean under every --loss-agg: a property of the policy, not of the loss
            stats["entropy"] = masked_sum(ent, (weights > 0).float())
        stats = {k: v.detach() for k, v in dict(stats, loss=loss_sum.detach(), normaliser=normaliser).items()}
        return loss_sum, normaliser, stats
    res = _run_micro_batches(model, [mb for _, mb in mbs], loss_fn, False, args, entropy=True)
    ok, grad_norm = optimizer_step(model, optimizer, args)
    stats = {}
    if ps.is_pipeline_last_stage():
        for r in res:
            for k, v in r.items():
                stats[k] = stats.get(k, 0.0) + float(v)
    stats["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    stats["update_skipped"] = float(not ok)
    return stats


def optimizer_step(model, optimizer, args):
    """optimizer.step(), with the optimizer state brought back from host memory just for it: the
    forward/backward's activations are freed by now, so activations and the 12 bytes per
    parameter of Adam state never sit on the GPU together."""
    memory.restore_optimizer(optimizer)
    ok, grad_norm, _ = optimizer.step()
    return ok, grad_norm


def reduce_stats(stats, ctx):
    """Sum a rank's stats over the whole job, counting each DP rank once (its last pipeline
    stage, TP rank 0, holds them), so that every rank gets the same numbers."""
    from megatron.core import parallel_state as ps
    keys = ("loss", "pg_loss", "clip_frac", "clip_frac_dual", "kl", "neg_logp", "ratio", "loss_tokens", "logp_diff",
            "logp_diff_tokens", "entropy", "tis_weight", "normaliser")
    counts = ps.is_pipeline_last_stage() and ctx["tp_rank"] == 0
    t = torch.tensor([float(stats.get(k, 0.0)) * counts for k in keys], device=ctx["device"], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def step_metrics(red, stats, measure_kl):
    """The update's metrics from the job-wide sums (see reduce_stats)."""
    tok = max(red["loss_tokens"], 1.0)
    m = {"loss": red["loss"] / max(red["normaliser"], 1.0), "pg_loss": red["pg_loss"] / tok,
         "clip_frac": red["clip_frac"] / tok, "clip_frac_dual": red["clip_frac_dual"] / tok,
         "neg_logp": red["neg_logp"] / tok, "ratio_mean": red["ratio"] / tok,
         "entropy": red["entropy"] / tok, "grad_norm": stats["grad_norm"],
         "update_skipped": stats["update_skipped"], "optimizer_steps": stats["optimizer_steps"]}
    if red["logp_diff_tokens"] > 0:
        m["logp_diff"] = red["logp_diff"] / red["logp_diff_tokens"]
    if red["tis_weight"]:
        m["tis_weight_mean"] = red["tis_weight"] / tok
    if measure_kl:
        m["kl"] = red["kl"] / tok
    return m


@contextlib.contextmanager
def train_memory_gauge(ctx, m):
    """gpu_peak_train_gib: the GPU memory in use at the peak of phases 4-5, as the driver counts
    it (vLLM's sleeping share included), from the allocator's peak over the block."""
    if not ctx["gpu"]:
        yield
        return
    used0, reserved0 = memory.gpu_used(), torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    yield
    m["gpu_peak_train_gib"] = (used0 + torch.cuda.max_memory_reserved() - reserved0) / GIB


# ==============================================================================================
# 6. Weight sync: Megatron -> engine (the offload before it: memory.offload_trainer)
# ==============================================================================================
def sync_weights(model, engine, cfg):
    """Megatron -> engine, one full tensor at a time: convert.export_hf gathers TP shards and PP
    stages and splits fused qkv / gate-up back to HF names."""
    engine.load_weights(convert.export_hf(model.module, cfg))
    # Cached prefixes were computed with the old weights: reusing them would be silently wrong.
    engine.reset_prefix_cache()


# ==============================================================================================
# 7. Evaluation
# ==============================================================================================
def evaluate(ctx, step, m):
    """Accuracy on the first --eval-prompts test prompts, each engine answering its share once
    (greedy with --eval-temperature 0). The scored answers go to OUT/eval/step_N.jsonl."""
    args = ctx["args"]
    places = range(ctx["engine_index"], min(args.eval_prompts, len(ctx["test"])), ctx["engines"])
    rows = [ctx["test"][k] for k in places]
    greedy = args.eval_temperature == 0
    requests = [sampling_request(1, args.eval_temperature, args.max_len - len(p), ctx["stop_ids"],
                                 top_p=1.0 if greedy else args.eval_top_p, top_k=-1 if greedy else args.eval_top_k,
                                 seed=rollout_seed(args.seed, step, 0, k))
                for k, (p, _) in zip(places, rows)]
    t = time.time()
    outs = ctx["engine"].generate([p for p, _ in rows], requests)
    m["time_eval_generate"] = time.time() - t
    t = time.time()
    texts, acc, scores = [], [], []
    if outs and ctx["tp_rank"] == 0:            # TP peers hold the same answers: score once
        texts = ctx["tokenizer"].batch_decode([o[0][0] for o in outs], skip_special_tokens=True)
        scores, acc, _ = score_texts(texts, [g for _, g in rows], args)
    totals = torch.tensor([sum(acc), len(acc), sum(len(o[0][0]) for o in outs) * (ctx["tp_rank"] == 0), sum(scores)],
                          dtype=torch.float64, device=ctx["device"])
    dist.all_reduce(totals)
    m["eval_accuracy"] = (totals[0] / totals[1].clamp(min=1)).item()
    m["eval_score"] = (totals[3] / totals[1].clamp(min=1)).item()
    m["eval_generated_tokens"] = totals[2].item()
    m["eval_temperature"] = args.eval_temperature
    m["time_eval_score"] = time.time() - t
    if ctx["log_rank"]:       # the answers this rank scored, to read what the model writes
        os.makedirs(os.path.join(args.out, "eval"), exist_ok=True)
        with open(os.path.join(args.out, "eval", f"step_{step:06d}.jsonl"), "w") as f:
            for text, (_, truth), r, a in zip(texts, rows, scores, acc):
                f.write(json.dumps({"response": text, "ground_truth": truth, "score": r, "correct": a}) + "\n")


# ==============================================================================================
# Set-up: the layout, the device, the prompts, the models
# ==============================================================================================
def check_run(args):
    """The model's config, the layout and the output folder, checked before anything starts:
    (config, engines, DP size)."""
    if args.benchmark:
        cfg = convert.qwen_config(args.benchmark)
    else:
        cfg = convert.resolve_config(args.model_size, os.path.join(args.hf_dir, "config.json"))
        convert.check_mcore_shape(args.load, cfg, os.path.join(args.hf_dir, "config.json"))
    convert.check_parallel_sizes(cfg, args.tp, args.pp)
    engines, dp = rollout_layout(args.prompts_per_step, int(os.environ.get("WORLD_SIZE", "1")), args.tp, args.pp)
    if args.mini_batches > args.prompts_per_step // dp * args.n_samples_per_prompt:
        raise UserError(f"--mini-batches {args.mini_batches} is more than the {args.prompts_per_step // dp * args.n_samples_per_prompt} "
                        "samples each data-parallel rank trains on per step")
    if not args.benchmark:
        check_out_dir(args.out, args.resume)
    return cfg, engines, dp


def start_device(args, cfg, dp):
    """torch.distributed and Megatron's groups on the chosen device, and what the device decides.

    On GPUs (the default): NCCL, one GPU per rank, bf16 weights, and the memory plan fills the
    memory flags the user left unset. With --device cpu the same loop runs on gloo with fp32
    weights and the TorchEngine (create_engine), and this is all that changes:
    - Megatron is taught to train without CUDA (convert.megatron_training_on_cpu);
    - no memory plan: the memory flags get the fastest setting, as on a GPU with room to spare,
      and the GPU-only ones are refused when given (memory.check_device_flags);
    - the memory choreography has nothing to move: memory's offload and restore functions
      return at once for tensors on the CPU, and the engine's sleep and wake_up do nothing; the
      GPU memory gauges are not logged.
    """
    if args.device == "cpu":
        convert.megatron_training_on_cpu()
        convert.init_distributed(args.tp, args.pp, use_cuda=False)
        for k, v in memory.CPU_MEMORY_SETTINGS.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
        torch.manual_seed(args.seed)
        return
    if not torch.cuda.is_available():
        raise UserError("grpo.py needs CUDA GPUs (vLLM and the Megatron trainer run on them); --device cpu runs the "
                        "same loop on the CPU, slowly, with a plain PyTorch engine instead of vLLM")
    convert.init_distributed(args.tp, args.pp, use_cuda=True)      # (sets each rank's GPU)
    plan = memory.plan_and_pick_defaults(args, cfg, dp, gpu_bytes=torch.cuda.mem_get_info()[1])
    if dist.get_rank() == 0:
        print(memory.format_memory_plan(plan), flush=True)
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    # These seeds make the random initial weights of --benchmark (and Megatron's TP RNG tracker)
    # the same on every run; the data order and each step's sampling have seeds of their own.
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)


def load_prompts(args, cfg, engines, dp):
    """The prompt sets (tokenized) and the run's context: what every phase reads (ctx)."""
    from megatron.core import parallel_state as ps
    tokenizer = None
    if args.benchmark:
        bench.write_config(args, cfg)
    if args.toy_token is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
        train, dropped = tokenize(tokenizer, prepare.load_prompt_file(os.path.join(args.data, "train.json")), args.max_prompt_len)
        test, _ = tokenize(tokenizer, prepare.load_prompt_file(os.path.join(args.data, "test.json")), args.max_prompt_len)
        log0(f"prompts: {len(train)} train ({dropped} dropped: longer than {args.max_prompt_len} tokens), {len(test)} test")
        if not train:
            raise UserError(f"no training prompt fits --max-prompt-len {args.max_prompt_len}")
        stop_ids = sorted({i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
                           if isinstance(i, int) and i >= 0})
    else:
        rng = random.Random(args.seed)
        train = [([rng.randrange(cfg["vocab_size"]) for _ in range(args.toy_prompt_len)], None) for _ in range(4096)]
        test, stop_ids = [], []

    def sampling(max_tokens, logprobs, seed=None):
        return sampling_request(args.n_samples_per_prompt, args.temperature, max_tokens, stop_ids, logprobs,
                                seed=seed, ignore_eos=args.benchmark is not None)
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    rank = dist.get_rank()
    return {"args": args, "tokenizer": tokenizer, "train": train, "test": test, "stop_ids": stop_ids,
            "sampling": sampling, "rank": rank, "engine_index": rank // args.tp, "engines": engines, "dp": dp,
            "device": args.device, "gpu": args.device == "cuda",
            "dtype": torch.bfloat16 if args.device == "cuda" else torch.float32,
            "dp_rank": ps.get_data_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
            "data_state": {"order": order, "cursor": 0, "epoch": 0}, "prompt_set": prompt_set_fingerprint(train),
            "log_rank": ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                        and ps.get_data_parallel_rank() == 0,
            "ckpt_root": os.path.join(args.out, "checkpoints"), "times": {}, "history": [], "diffs": []}


def build_reference(cfg, args, model, dtype):
    """The frozen initial policy, for the KL (None without one): params only (no grads, no
    optimizer), kept in host memory between its forwards unless --ref-on-gpu."""
    if not (args.kl_coef > 0 or args.kl_log_interval > 0):
        return None
    ref = convert.build_model(cfg, convert.transformer_config(cfg, dtype, args.tp, args.pp,
                                                             use_cpu_initialization=args.device == "cpu",
                                                             variable_seq_lengths=args.pp > 1)).to(args.device)
    if args.load:
        convert.load_mcore(ref, args.load)
    else:
        ref.load_state_dict(model.module.state_dict())
    ref.requires_grad_(False)
    if not args.ref_on_gpu:
        memory.offload_reference(ref)
    return ref


def resume(ctx, model, optimizer):
    """With --resume and a complete checkpoint in OUT: its weights, optimizer state, data order
    and the metrics line of its step. Sets ctx["start"], the first step to run."""
    args = ctx["args"]
    found = complete_checkpoints(ctx["ckpt_root"])[-1:] if args.resume else []
    state = load_checkpoint(found[0][1], model, optimizer) if found else {}
    if found:
        log0(f"resuming after step {state['step']} from {found[0][1]}")
        check_prompt_set(state.get("prompt_set"), ctx["prompt_set"], args.data)
        ctx["data_state"] = state.get("data", ctx["data_state"])
    ctx["start"], ctx["saved_metrics"] = state.get("step", 0) + 1, state.get("metrics")


def prompt_set_fingerprint(rows):
    """{"rows": N, "sha256": short hash} of the prompts a run trains on, in order: (prompt, ground
    truth) pairs, as the saved data order indexes them (after tokenize dropped the long ones).
    Checkpoints record it, and a resume checks it: the saved order of another prompt set would
    index the wrong prompts, or past the end of a shorter set."""
    h = hashlib.sha256()
    for prompt, truth in rows:
        h.update(json.dumps([prompt, truth]).encode() + b"\n")
    return {"rows": len(rows), "sha256": h.hexdigest()[:16]}


def tokenize(tokenizer, rows, max_prompt_len):
    """Chat-template each prompt (add_generation_prompt so the model answers as the assistant);
    prompts longer than the budget are dropped and counted, never cut (a cut problem has a
    different answer)."""
    out, dropped = [], 0
    for messages, truth in rows:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        if len(ids) > max_prompt_len:
            dropped += 1
            continue
        out.append((list(ids), truth))
    return out, dropped


def rollout_layout(prompts_per_step, world, tp, pp):
    """(engines, data-parallel size): one vLLM engine per TP group (so PP stages roll out as
    extra engines), Megatron's data parallelism over TP x PP. UserError when the step's prompts
    do not divide over the data-parallel ranks: a prompt without a rank to train on would be
    rolled out, scored and counted in the reward, and never trained on."""
    engines, dp = world // tp, world // (tp * pp)
    if prompts_per_step % dp:
        raise UserError(f"--prompts-per-step {prompts_per_step} does not divide over {dp} data-parallel ranks "
                        f"(world {world} / TP {tp} / PP {pp}): use a multiple of {dp}")
    return engines, dp


# ==============================================================================================
# Checkpoints and the run's files: resume where a killed run stopped, never mix two runs
# ==============================================================================================
def complete_checkpoints(root):
    """[(step, path)] of the finished checkpoints under root, oldest first. A save is written to
    step_N.tmp and renamed when every rank is done, so a run killed while saving leaves only a
    .tmp folder, which is ignored here and cleared by the next save."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith("step_") and name[5:].isdigit() and os.path.isfile(os.path.join(path, "train_state.json")):
            out.append((int(name[5:]), path))
    return sorted(out)


def checkpoints_to_prune(checkpoints, keep_last):
    """The paths to delete after a save: all but the newest `keep_last` complete checkpoints.
    checkpoints: [(step, path)] oldest first, as complete_checkpoints returns them."""
    return [path for _, path in checkpoints[:-keep_last]]


def check_out_dir(out, resume):
    """UserError when starting here would mix two runs or overwrite a finished one.

    A fresh start (nothing to resume, or --no-resume) in a folder that holds another run's
    checkpoints would interleave the two: the keep-last pruning ranks checkpoints by step, so
    the old run's later steps would delete the new run's saves, and a plain rerun would resume
    the old run. A finished run (final/) without checkpoints would be silently overwritten."""
    found = complete_checkpoints(os.path.join(out, "checkpoints"))
    if found and not resume:
        raise UserError(f"--no-resume, but {os.path.join(out, 'checkpoints')} holds another run (up to step "
                        f"{found[-1][0]}); choose a new --out or move that folder aside")
    if not found and os.path.isdir(os.path.join(out, "final")):
        raise UserError(f"{out} holds a finished run (final/) and no checkpoint to resume; choose a new --out "
                        "or move it aside")


def save_checkpoint(root, step, model, optimizer, cfg, train_state, keep_last):
    """Model + optimizer (dist_checkpointing, any TP/PP can load the model), and the loop's state
    (data position, the prompt set's fingerprint, the step's metrics line so far); then drop all but
    the newest `keep_last`.

    No RNG state is saved: every step's sampling is seeded from (--seed, step, prompt) by
    `rollout_seed`, so a resumed run draws the same samples without one."""
    import shutil
    from megatron.core import dist_checkpointing
    path = os.path.join(root, f"step_{step:06d}")
    tmp = path + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save(_train_state_dict(model, optimizer), tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "model_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(tmp, "train_state.json"), "w") as f:   # written last: marks it complete
            json.dump(dict(train_state, step=step), f)
        os.replace(tmp, path)
        for old in checkpoints_to_prune(complete_checkpoints(root), keep_last):
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def _train_state_dict(model, optimizer, is_loading=False):
    # the unwrapped GPTModel's keys: the same as convert.py's, so convert.py exports either.
    # The distributed optimizer's default format in megatron-core 0.16 ("fully_sharded_model_space")
    # is rejected by its own dist_checkpointing ("flattened_range is not supported"): ask for
    # "dp_reshardable", each rank saving its own shard (resume with the same TP x PP; DP may change).
    msd = model.module.sharded_state_dict()
    meta = {"distrib_optim_sharding_type": "dp_reshardable"}
    return {"model": msd, "optimizer": optimizer.sharded_state_dict(msd, is_loading=is_loading, metadata=meta)}


def load_checkpoint(path, model, optimizer):
    """Restore what save_checkpoint wrote; returns the train state (step, data position, ...)."""
    from megatron.core import dist_checkpointing
    # megatron-core 0.16.1 without apex/TE reads Adam's "step" from every parameter's state while
    # it plans the load, and a fresh optimizer has no state yet (AssertionError in state_dict()).
    # Zero state of the right shapes makes the plan; the load then overwrites all of it.
    for inner in memory.torch_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                                          step=torch.tensor(0.0))
    state = dist_checkpointing.load(_train_state_dict(model, optimizer, is_loading=True), path)
    model.module.load_state_dict(state["model"])
    # no_grad: megatron-core 0.16.1's dp_reshardable loader copies into the optimizer's main
    # params without it; with fp32 weights (--device cpu) the main params are the model's own
    # leaf params, which autograd refuses to change in place.
    with torch.no_grad():
        optimizer.load_state_dict(state["optimizer"])
    # ...and then its parameter-state load puts back the "step" of that zero state (0), which
    # would restart Adam's bias correction. The saved step is in the loaded param groups.
    for inner in memory.torch_optimizers(optimizer):
        steps = {g["step"] for g in inner.param_groups if g.get("step") is not None}
        if len(steps) == 1:
            step = float(steps.pop())
            for st in inner.state.values():
                if "step" in st:
                    st["step"] = torch.tensor(step)
    # load_state_dict restored the saved param groups, weight decay included: re-apply ours.
    apply_weight_decay_multipliers(optimizer, optimizer.config.weight_decay)
    with open(os.path.join(path, "train_state.json")) as f:
        return json.load(f)


def check_prompt_set(saved, now, data_dir):
    """UserError when a checkpoint trained on another prompt set than the one loaded now (fingerprints
    from prompt_set_fingerprint). CKPT_DIR does not depend on DATA_DIR, so this is one changed
    variable away. Checkpoints from before fingerprints were recorded (saved None) are not checked."""
    if saved is not None and saved != now:
        raise UserError(f"the checkpoint was trained on {saved['rows']} prompts (sha256 {saved['sha256']}), but --data "
                        f"{data_dir} gives {now['rows']} (sha256 {now['sha256']}); resume with the prompt set it trained on "
                        "(the same --data, --max-prompt-len and tokenizer) or start a new --out")


def train_state(ctx, m):
    """What a checkpoint carries besides the model and the optimizer: the data order, this step's
    metrics as known when it is saved (see restore_metrics) and the prompt set's fingerprint.
    Saved right after the update, while the optimizer state is on the GPU: a run killed after
    this point resumes at step + 1; killed before it, it redoes this step (from the previous
    checkpoint on): no completed step is lost or done twice."""
    return {"data": ctx["data_state"], "metrics": dict(m, **time_metrics(ctx["times"])), "prompt_set": ctx["prompt_set"]}


def save_final(ctx, model, cfg):
    """The trained policy to OUT/final (convert.py turns it into an HF folder)."""
    final = os.path.join(ctx["args"].out, "final")
    if ctx["rank"] == 0 and os.path.isdir(final):
        import shutil
        shutil.rmtree(final)
    dist.barrier()
    if ctx["rank"] == 0:
        os.makedirs(final)
    dist.barrier()
    convert.save_mcore(model.module, cfg, final)
    dist.barrier()
    log0(f"saved the policy to {final}")
    if ctx["wandb"] is not None:
        ctx["wandb"].finish()
    prepare.close_reward_workers()


# ==============================================================================================
# Logging
# ==============================================================================================
def start_logging(ctx, cfg):
    """metrics.jsonl (made to hold exactly the steps before ctx["start"]) and wandb, on the one
    rank that logs; returns log(m), which writes a step's line with its phase times, and prints
    the progress line."""
    args = ctx["args"]
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "metrics.jsonl")
    ctx["wandb"] = None
    if ctx["log_rank"]:
        restore_metrics(path, ctx["start"] - 1, ctx["saved_metrics"])
        ctx["wandb"] = start_wandb(args, cfg, ctx["start"] - 1)

    def log(m):
        m.update(time_metrics(ctx["times"]))
        if "time_rollout" in m:
            m["tokens_per_s_rollout"] = m["generated_tokens"] / max(m["time_rollout"], 1e-9) / ctx["engines"]
        if ctx["log_rank"]:
            with open(path, "a") as f:
                f.write(json.dumps(m) + "\n")
            if ctx["wandb"] is not None:
                ctx["wandb"].log(m, step=m["step"])
            print(progress_line(m), flush=True)
    return log


def restore_metrics(path, resume_step, saved_line=None):
    """Make metrics.jsonl hold exactly the steps 1..resume_step, on every start.

    Lines after the resume point are about to be redone (a run killed before its first
    checkpoint restarts from step 0, so all of them); a torn last line (killed mid-write) is
    dropped. The checkpoint carries its step's metrics as known when it was saved: the line is
    written after the weight sync and the evaluation, and a run killed in between would lose it,
    so it is put back from there (without the fields measured after the save). Rewritten
    through a temp file and a rename: a crash here never leaves half a file."""
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and resume_step > 0 and row.get("step", -1) <= resume_step:
                    rows.append(row)
    if saved_line is not None and not any(r["step"] == resume_step for r in rows):
        rows.append(saved_line)
    rows.sort(key=lambda r: r["step"])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def start_wandb(args, cfg, resume_step):
    """wandb on the logging rank, or None. No network or no key -> offline mode; any failure ->
    a warning and no wandb: monitoring must never stop a training run."""
    if not args.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        print("warning: wandb is not installed (pip install wandb); logging to metrics.jsonl only", flush=True)
        return None
    id_file = os.path.join(args.out, "wandb_id.txt")
    run_id = open(id_file).read().strip() if resume_step and os.path.isfile(id_file) else None
    kwargs = dict(project=args.wandb_project, name=args.wandb_name, id=run_id, resume="allow",
                  config=dict(vars(args), model=cfg), dir=args.out)
    online = os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "offline"
    for mode in (["online", "offline"] if online else ["offline"]):
        try:
            run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60, silent=True), **kwargs)
            with open(id_file, "w") as f:
                f.write(run.id)
            print(f"wandb: {mode} run {run.id} in project {args.wandb_project}", flush=True)
            return run
        except Exception as e:
            print(f"warning: wandb {mode} failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})",
                  flush=True)
    return None


def check_logp_diff(diffs, args, rank):
    """The tripwire (see logp_diff_verdict); every rank holds the same job-wide numbers."""
    verdict = logp_diff_verdict(diffs, args.logp_diff_warn, args.logp_diff_stop)
    if verdict == "stop":
        raise UserError(
            f"vLLM's and Megatron's log-probs of the sampled tokens differ by {', '.join(f'{d:.3f}' for d in diffs)} "
            f"per token in the first {len(diffs)} steps (bf16 noise is below ~0.05): the two engines run different "
            "models. Likely causes: a config.json field the two read differently (RoPE base or scaling, norm "
            "epsilon), a stale or wrong weight sync, a dtype mismatch. --logp-diff-stop 0 trains on anyway")
    if verdict == "warn" and rank == 0:
        print(f"WARNING: vLLM-vs-Megatron log-prob diff {diffs[-1]:.3f} per token (above --logp-diff-warn "
              f"{args.logp_diff_warn}): check the weight sync and the model config", flush=True)


def time_metrics(times):
    return {f"time_{k}": v for k, v in times.items()}


def progress_line(m):
    """One line per step on stdout (the full record is the metrics.jsonl line)."""
    parts = [f"step {m['step']}:"]
    for key, fmt in (("reward", "reward {:.3f}"), ("loss", "loss {:.4f}"), ("kl", "kl {:.4f}"),
                     ("clip_frac", "clip {:.3f}"), ("entropy", "entropy {:.3f}"),
                     ("logp_diff", "|logp diff| {:.4f}"), ("response_len_mean", "len {:.0f}"),
                     ("grad_norm", "grad {:.3g}"), ("gpu_peak_train_gib", "peak {:.1f} GiB"),
                     ("eval_accuracy", "eval_acc {:.3f}")):
        if key in m:
            parts.append(fmt.format(m[key]))
    parts += [f"{k[5:]} {v:.1f}s" for k, v in m.items() if k.startswith("time_")]
    return " ".join(parts)


def log0(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


# ==============================================================================================
# Arguments
# ==============================================================================================
def parse_args(argv):
    p = prepare.one_line_errors(argparse.ArgumentParser(
        description="GRPO training: Megatron-Core trains, a colocated vLLM rolls out. Run under torchrun "
                    "(see the top of grpo.py)."))
    g = p.add_argument_group("I/O")
    g.add_argument("--load", help="Megatron checkpoint of the initial policy (convert.py output); required")
    g.add_argument("--hf-dir", help="HF folder of the same model: config.json (for vLLM) and tokenizer; required")
    g.add_argument("--data", default="dataset/MATH-lighteval", help="folder with prepare.py's train.json / test.json")
    g.add_argument("--reward", default="prepare:math_reward",
                   help="the task's reward, MODULE:FUNCTION importable from the current folder or PYTHONPATH, called as "
                        "FUNCTION(response, ground_truth, timeout_s=...) -> float or (float, correct) (see prepare.load_reward)")
    g.add_argument("--out", default="grpo-out", help="folder for metrics.jsonl, checkpoints/ and final/")
    g.add_argument("--save-interval", type=int, default=10, help="checkpoint every N steps (0: only the final policy)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (older ones are deleted)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start from --load; refused if OUT/checkpoints holds a run (default: resume from the newest)")
    g.add_argument("--wandb-project", default=None, help="log to this wandb project (run.sh sets it when enable_wandb=True)")
    g.add_argument("--wandb-name", default=None, help="wandb run name")
    g.add_argument("--model-size", default="custom", help="Qwen2.5 size to check the checkpoint against, or custom")
    g = p.add_argument_group("GRPO (defaults follow the reference pipeline)")
    g.add_argument("--steps", type=int, default=100, help="training steps (one rollout batch each)")
    g.add_argument("--prompts-per-step", type=int, default=64, help="prompts per rollout batch")
    g.add_argument("--n-samples-per-prompt", type=int, default=32, help="group size G of GRPO")
    g.add_argument("--max-len", type=int, default=2048,
                   help="prompt + response tokens at most: each prompt may be answered with max-len minus its length")
    g.add_argument("--max-prompt-len", type=int, default=1024, help="longer prompts are dropped (and counted)")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    g.add_argument("--clip-ratio", type=float, default=0.2,
                   help="PPO clip epsilon, both sides (acts only with several optimizer steps per batch)")
    g.add_argument("--clip-ratio-low", type=float, default=None, help="lower clip epsilon (default --clip-ratio)")
    g.add_argument("--clip-ratio-high", type=float, default=None,
                   help="upper clip epsilon (default --clip-ratio; DAPO's clip-higher: 0.28)")
    g.add_argument("--clip-ratio-c", type=float, default=None,
                   help="dual-clip PPO: cap the loss of a token with a negative advantage at C * |A| (must be > 1; "
                        "default off; verl's clip_ratio_c, 3 there; acts only with several optimizer steps per batch)")
    g.add_argument("--mini-batches", type=int, default=1,
                   help="optimizer steps per pass over a rollout batch (shuffled mini-batches)")
    g.add_argument("--epochs", type=int, default=1, help="passes over each rollout batch (the GRPO paper's mu)")
    g.add_argument("--loss-agg", default="token-mean", choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
                   help="how token losses become the batch loss (see loss_weights)")
    g.add_argument("--kl-coef", type=float, default=0.0, help="weight of the k3 KL to the initial policy in the loss")
    g.add_argument("--kl-log-interval", type=int, default=10,
                   help="with --kl-coef 0, measure the KL to the initial policy every N steps (0: never, and no "
                        "reference model is kept); with --kl-coef > 0 it is part of the loss, so every step")
    g.add_argument("--no-std-norm", action="store_true", help="advantages without std scaling (Dr. GRPO)")
    g.add_argument("--old-logp-pass", action="store_true",
                   help="compute old log-probs in a separate forward before the update even with one optimizer step "
                        "per batch (default: the update's own forward, exact in that case; see update_step)")
    g.add_argument("--filter-groups", action="store_true",
                   help="DAPO dynamic sampling: drop groups whose rewards are all equal and roll out more prompts")
    g.add_argument("--filter-max-rounds", type=int, default=4, help="rollout rounds per step at most with --filter-groups")
    g.add_argument("--overlong-filter", action="store_true", help="truncated answers stay out of the loss (DAPO)")
    g.add_argument("--overlong-buffer", type=int, default=0,
                   help="DAPO soft overlong punishment: the last N tokens of each answer's budget cost reward")
    g.add_argument("--overlong-penalty", type=float, default=1.0, help="reward lost at the end of the budget")
    g.add_argument("--tis-cap", type=float, default=0.0,
                   help="truncated importance sampling: weight tokens by min(p_trainer / p_vllm, CAP) (0: off; "
                        "asks vLLM for log-probs of every sample)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=2e-6, help="constant learning rate")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--weight-decay", type=float, default=0.01, help="decoupled weight decay (not on norms and biases)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip")
    g.add_argument("--no-distributed-optimizer", dest="distributed_optimizer", action="store_false",
                   help="replicate optimizer state on every DP rank instead of sharding it")
    memory.add_arguments(p)
    g = p.add_argument_group("parallelism and engine")
    g.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the same loop without GPUs (gloo, fp32, a plain PyTorch engine instead of vLLM; slow, "
                        "for learning and tests; see start_device)")
    g.add_argument("--tp", type=int, default=1, help="tensor parallel size (Megatron and vLLM)")
    g.add_argument("--pp", type=int, default=1, help="pipeline parallel size (Megatron; vLLM holds the whole model)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM's share of GPU memory (default: what is free after the trainer offloads, minus 10%% of "
                        "the GPU and what grows beside vLLM after the first update; see memory.rollout_reserve)")
    g.add_argument("--sleep-level", type=int, default=None, choices=(1, 2),
                   help="vLLM sleep between rollouts: 2 (default) drops its weights (the sync rewrites them "
                        "anyway), 1 keeps a copy in host memory")
    g.add_argument("--max-num-seqs", type=int, default=1024,
                   help="the engine's batch of concurrent sequences (vLLM, or the CPU engine's rows at once)")
    g.add_argument("--reward-workers", type=int, default=4, help="processes running the reward per engine")
    g = p.add_argument_group("checks, eval and logging")
    g.add_argument("--logp-diff-warn", type=float, default=0.1,
                   help="warn when vLLM's and Megatron's log-probs of the sampled tokens differ more (per token)")
    g.add_argument("--logp-diff-stop", type=float, default=0.25,
                   help="stop when they differ more in each of the first 3 steps (0: never stop)")
    g.add_argument("--eval-interval", type=int, default=10, help="evaluate every N steps and before the first (0: never)")
    g.add_argument("--eval-prompts", type=int, default=500, help="test prompts per evaluation")
    g.add_argument("--eval-temperature", type=float, default=0.6,
                   help="0: greedy (most published MATH numbers); else sampled with --eval-top-p/--eval-top-k")
    g.add_argument("--eval-top-p", type=float, default=0.95)
    g.add_argument("--eval-top-k", type=int, default=20)
    g.add_argument("--seed", type=int, default=1234, help="data order, and every step's sampling (see rollout_seed)")
    g.add_argument("--trace", action="store_true", help="every rank prints each phase it enters (to locate hangs)")
    g.add_argument("--toy-token", type=int, default=None,
                   help="toy task: random prompts, reward = fraction of completion tokens equal to this id")
    g.add_argument("--toy-prompt-len", type=int, default=8)
    g.add_argument("--check-flags", action="store_true",
                   help="check the flags (and the layout, with WORLD_SIZE set) and exit; touches no file or GPU")
    bench.add_arguments(p)
    a = p.parse_args(argv)
    check_values(a)
    a.reward_fn = prepare.load_reward(a.reward)
    if a.benchmark and a.filter_groups:
        raise UserError("--filter-groups changes the benchmark's workload; time it on a training run")
    if a.benchmark:
        bench.set_workload(a)
        return a
    if a.check_flags or a.memory_plan:
        return a
    if not a.load or not a.hf_dir:
        raise UserError("--load and --hf-dir are required (or --benchmark SIZE for random weights)")
    if not os.path.isdir(a.load) or not os.path.isfile(os.path.join(a.load, "metadata.json")):
        raise UserError(f"--load {a.load} is not a Megatron checkpoint (convert.py ... false ... writes one)")
    if not os.path.isfile(os.path.join(a.hf_dir, "config.json")):
        raise UserError(f"--hf-dir {a.hf_dir} has no config.json")
    return a


def check_values(a):
    """The flag checks that need no file and no GPU (also what --check-flags runs)."""
    memory.check_device_flags(a)
    a.clip_ratio_low = a.clip_ratio if a.clip_ratio_low is None else a.clip_ratio_low
    a.clip_ratio_high = a.clip_ratio if a.clip_ratio_high is None else a.clip_ratio_high
    positive = {"--steps": a.steps, "--prompts-per-step": a.prompts_per_step, "--max-len": a.max_len,
                "--keep-last": a.keep_last, "--mini-batches": a.mini_batches, "--epochs": a.epochs,
                "--filter-max-rounds": a.filter_max_rounds, "--tp": a.tp, "--pp": a.pp, "--max-num-seqs": a.max_num_seqs,
                "--benchmark-steps": a.benchmark_steps + 1, "--benchmark-prompts": a.benchmark_prompts}
    for name, v in positive.items():
        if v < 1:
            raise UserError(f"{name} must be >= 1" if name != "--benchmark-steps" else "--benchmark-steps must be >= 0")
    non_negative = {"--kl-log-interval": a.kl_log_interval, "--kl-coef": a.kl_coef, "--save-interval": a.save_interval,
                    "--eval-interval": a.eval_interval, "--eval-prompts": a.eval_prompts, "--lr": a.lr,
                    "--weight-decay": a.weight_decay, "--grad-clip": a.grad_clip, "--clip-ratio-low": a.clip_ratio_low,
                    "--clip-ratio-high": a.clip_ratio_high, "--tis-cap": a.tis_cap, "--overlong-buffer": a.overlong_buffer,
                    "--logits-chunk-tokens": a.logits_chunk_tokens or 0, "--eval-temperature": a.eval_temperature,
                    "--logp-diff-stop": a.logp_diff_stop, "--reward-workers": a.reward_workers}
    for name, v in non_negative.items():
        if v < 0:
            raise UserError(f"{name} must be >= 0")
    if a.n_samples_per_prompt < 2:
        raise UserError("--n-samples-per-prompt must be >= 2: GRPO's baseline is the mean of the other samples")
    if a.max_prompt_len >= a.max_len:
        raise UserError("--max-prompt-len must be smaller than --max-len (room is needed for the response)")
    if a.temperature <= 0:
        raise UserError("--temperature must be > 0: GRPO needs sampled, different answers per prompt")
    if a.clip_ratio_low >= 1:
        raise UserError("--clip-ratio-low must be < 1")
    if a.clip_ratio_c is not None and a.clip_ratio_c <= 1:
        raise UserError("--clip-ratio-c must be > 1 (it caps the loss at C * |A|, above the PPO clip's; "
                        "leave it out for no dual clip)")
    if a.tis_cap and a.tis_cap < 1:
        raise UserError("--tis-cap must be >= 1 (or 0 for off)")
    if a.micro_batch_tokens is not None and a.micro_batch_tokens < a.max_len:
        raise UserError(f"--micro-batch-tokens {a.micro_batch_tokens} is less than --max-len {a.max_len}: "
                        "a full-length row must fit one micro batch")
    if a.gpu_memory_utilization is not None and not 0 < a.gpu_memory_utilization < 1:
        raise UserError("--gpu-memory-utilization is a share between 0 and 1")
    if not 0 < a.eval_top_p <= 1:
        raise UserError("--eval-top-p must be in (0, 1]")
    if a.overlong_buffer >= a.max_len - a.max_prompt_len:
        raise UserError("--overlong-buffer must be smaller than the response budget (--max-len - --max-prompt-len)")
    if a.mini_batches > a.n_samples_per_prompt * a.prompts_per_step:
        raise UserError("--mini-batches is larger than the samples of a step")
    world = a.world_size or (int(os.environ["WORLD_SIZE"]) if os.environ.get("WORLD_SIZE") else None)
    if world is not None:
        if world % (a.tp * a.pp):
            raise UserError(f"{world} GPUs cannot be split into TP={a.tp} x PP={a.pp} groups")
        if not a.benchmark:
            rollout_layout(a.prompts_per_step, world, a.tp, a.pp)


def main(argv=None):
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.check_flags:
            print("grpo.py flags ok")
            return
        if args.memory_plan:
            return memory.print_memory_plan(args)
        run(args)
    except UserError as e:
        prepare.die(str(e))
    except Exception as e:              # out of memory outside a step's phases
        hint = memory.out_of_memory_hint(e, "set-up")
        if hint is None:
            raise
        prepare.die(str(hint))


if __name__ == "__main__":
    # run as the module `grpo`, the one bench.py imports, rather than as a second copy named __main__
    import grpo
    grpo.main()
