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

One step, and what sits in GPU memory during each phase:

    phase                          GPU memory holds
    1 rollout (vLLM generate)      Megatron bf16 params | vLLM weights + KV cache
    2 sleep vLLM, score rewards    Megatron bf16 params | vLLM weights copied to CPU, KV freed
    3 group advantages             (CPU)
    4 ref log-probs (every         Megatron params + grads + optimizer state (back from CPU)
      --kl-log-interval steps)
    5 policy update                + activations of one micro batch (its forward also gives
                                   the "old" log-probs: one optimizer step per batch, see
                                   train_on_batch)
    6 weight sync                  optimizer state and grads go back to CPU; vLLM weights wake,
                                   Megatron -> vLLM one tensor at a time; then the KV cache wakes
    7 log

Why this choreography: the KV cache and the optimizer state (12 bytes per parameter: fp32 master
weights + two Adam moments) do not both fit next to the weights on one GPU for the larger models,
and neither is needed while the other works. Grads are freed (DDP `offload_grad_buffers`), the
optimizer state is copied to pinned host buffers (`offload_trainer`: 0.2 s for 0.5B), vLLM sleeps
between rollouts; we size vLLM's memory share from what is free *after* the trainer's state has
gone to CPU, so both always fit.
"""
import argparse
import json
import os
import random
import sys
import time

# The trainer's allocations come and go (optimizer state, activations, logits of 100k-token
# vocabularies) while vLLM's pool waits asleep; with PyTorch's default fixed-size segments one
# live tensor pins a whole segment and empty_cache() cannot hand the memory back for vLLM's
# wake-up (seen: 10 GiB short on 0.5B). Expandable segments return freed pages. vLLM turns the
# setting off inside its own pool when it comes from this variable, which is why it is set here,
# before torch is imported, and not through torch.cuda.memory._set_allocator_settings.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402
import torch.distributed as dist

import convert
import prepare
from convert import UserError


# ==============================================================================================
# The GRPO math: small pure functions, shapes in the comments
# ==============================================================================================
def masked_sum(x, mask):
    """Sum of x where mask is 1. x, mask: same shape."""
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
    all scored the same carries no signal and gets A = 0 (r - mean = 0 exactly). A group of one
    sample has no baseline: A = 0 too. norm_by_std=False drops the std scaling (Dr. GRPO,
    arXiv 2503.20783), which stops near-unanimous groups from getting huge advantages.

    rewards: [num_prompts * n] ordered prompt by prompt -> advantages: [num_prompts * n]
    Example: n=3, rewards [1, 0, 0] -> mean 1/3, std 0.577 -> advantages [1.155, -0.577, -0.577]
    """
    r = rewards.view(-1, n_samples_per_prompt).float()            # [num_prompts, n]
    mean = r.mean(dim=1, keepdim=True)
    if n_samples_per_prompt == 1:
        return torch.zeros_like(rewards, dtype=torch.float32)
    adv = r - mean
    if norm_by_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.view(-1)


def kl_k3(logp, ref_logp):
    """Per-token KL(pi || pi_ref) estimate "k3" (Schulman, http://joschu.net/blog/kl-approx.html):

        k3 = exp(ref - logp) - (ref - logp) - 1

    unbiased for sampled tokens, and always >= 0 (unlike the naive logp - ref). Clamped so that
    one token with a huge gap cannot blow up the loss. logp, ref_logp: [b, s] -> [b, s]
    """
    d = (ref_logp - logp).clamp(-20, 20)
    return (torch.exp(d) - d - 1).clamp(max=10)


def policy_loss(logp, old_logp, advantages, mask, clip_ratio=0.2, kl_coef=0.0, ref_logp=None):
    """PPO's clipped surrogate with GRPO advantages, summed over the valid tokens.

        ratio = exp(logp - old_logp)                    (clamped at exp(10) against overflow)
        loss  = -min(ratio * A, clip(ratio, 1-clip_ratio, 1+clip_ratio) * A)  [+ kl_coef * k3]

    Returns the *sum* over tokens and the token count, not the mean: Megatron adds the sums of
    all micro batches and data-parallel ranks and divides once by the global token count
    (`calculate_per_token_loss`), so every token of the batch weighs the same however the batch
    is cut into micro batches (the "token-mean" of DAPO, arXiv 2503.14476).

    logp, old_logp, mask, ref_logp: [b, s];  advantages: [b] (one per sequence) or [b, s]
    -> (loss_sum [], num_tokens [], stats dict of sums over tokens)
    Example: A=+1, ratio 1.5 with clip 0.2 -> the term is -1.2 (clipped: no reward for moving
    further); A=-1, ratio 1.5 -> -max(-1.5, -1.2) = 1.5 (never clipped toward more harm).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)                     # [b, 1] broadcasts over tokens
    log_ratio = (logp - old_logp).clamp(max=10.0)
    ratio = torch.exp(log_ratio)
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1 - clip_ratio, 1 + clip_ratio) * advantages
    pg = -torch.minimum(surr1, surr2)                            # [b, s]
    clipped = (surr2 < surr1).float()
    loss = pg
    kl = torch.zeros_like(pg)
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        loss = pg + kl_coef * kl
    mask = mask.float()
    stats = {"pg_loss": masked_sum(pg, mask).detach(), "clip_frac": masked_sum(clipped, mask),
             "kl": masked_sum(kl, mask).detach(), "neg_logp": masked_sum(-logp, mask).detach(),
             "ratio": masked_sum(ratio, mask).detach()}
    return masked_sum(loss, mask), mask.sum(), stats


def toy_reward(response_ids, token_id):
    """The toy task's reward: the fraction of the completion's tokens equal to `token_id`. A random
    policy earns a little of it, so GRPO has a signal to amplify from the first step."""
    return sum(t == token_id for t in response_ids) / max(1, len(response_ids))


# ==============================================================================================
# Batches: rows of prompt + response, right-padded, and the per-token tensors that go with them
# ==============================================================================================
def make_batch(samples, pad_id=0):
    """Stack samples into the tensors one training step reads.

    Row b is prompt + response, right-padded. Position t's logits predict token t+1, so the
    per-token tensors are aligned with *inputs*: targets[b, t] = tokens[b, t+1], and
    mask[b, t] = 1 exactly where that target is a response token.
    Right padding needs no attention mask: attention is causal, so no real token sees a pad.

    samples: list of dicts with prompt_ids, response_ids, advantage, rollout_logps (per response
    token, or None where vLLM was not asked for them)
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
        mask[b, p - 1:p + r - 1] = 1
        if s.get("rollout_logps") is not None:
            rollout_logp[b, p - 1:p + r - 1] = torch.tensor(s["rollout_logps"], dtype=torch.float32)
            has_rollout_logp[b] = 1
    targets = torch.roll(tokens, -1, dims=1)
    targets[:, -1] = pad_id
    advantages = torch.tensor([s.get("advantage", 0.0) for s in samples], dtype=torch.float32)
    lengths = torch.tensor([len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples])
    return {"tokens": tokens, "targets": targets, "mask": mask, "rollout_logp": rollout_logp,
            "advantages": advantages, "lengths": lengths, "has_rollout_logp": has_rollout_logp}


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


# ==============================================================================================
# Megatron: model, optimizer, log-probs, one update
# ==============================================================================================
def build_trainer(cfg, args, dtype=torch.bfloat16, device="cuda"):
    """Policy (DDP-wrapped GPTModel, loaded from args.load) and Megatron's (distributed) Adam.

    The checkpoint is loaded *before* the optimizer is built: a mixed-precision optimizer copies
    the bf16 weights into its fp32 master weights when it is created and writes those back after
    every step, so weights loaded later would be replaced by the random init at the first step.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    # calculate_per_token_loss: the loss function returns (sum, token count); Megatron sums both
    # over micro batches and DP ranks and divides once -> a true token-mean over the whole batch.
    config = convert.transformer_config(
        cfg, dtype, args.tp, args.pp, use_cpu_initialization=device == "cpu", perform_initialization=True,
        calculate_per_token_loss=True, variable_seq_lengths=args.pp > 1)
    model = convert.build_model(cfg, config)
    if device != "cpu":
        model.cuda()
    if args.load:                  # None in --benchmark: random weights
        convert.load_mcore(model, args.load)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.distributed_optimizer,
        average_in_collective=False, overlap_grad_reduce=False)
    ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    # Without finalize_model_grads no gradient is ever reduced over data-parallel ranks, and it is
    # what divides by the global token count.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = ddp.no_sync
    opt_config = OptimizerConfig(
        optimizer="adam", lr=args.lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=1e-8, clip_grad=args.grad_clip, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, use_distributed_optimizer=args.distributed_optimizer)
    optimizer = get_megatron_optimizer(opt_config, [ddp])
    return ddp, optimizer


def token_logprobs(logits, targets, temperature):
    """log pi(target) per position, for any TP: logits are vocab-sharded [b, s, V/tp] and
    vocab_parallel_cross_entropy does the softmax across the shards. Temperature divides the
    logits exactly as vLLM's sampler does, so the two sides measure the same distribution.
    logits [b, s, V/tp], targets [b, s] -> [b, s]"""
    from megatron.core import tensor_parallel
    # The cross entropy upcasts a bf16 input itself and then works in place on that fp32 copy, so
    # at T = 1 bf16 logits go in as they are: one fp32 [b, s, V] copy less (5 GiB per 8192-token
    # micro batch of Qwen2.5's vocabulary). fp32 logits must be copied, or the in-place work would
    # overwrite the model's output.
    if temperature != 1.0 or logits.dtype == torch.float32:
        logits = logits.float() / temperature
    return -tensor_parallel.vocab_parallel_cross_entropy(logits, targets)


def _run_micro_batches(model, mbs, loss_fn, forward_only):
    """Megatron's pipeline schedule over our micro batches; returns the loss_fn results (last stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    device = next(model.parameters()).device

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        mb = {k: v.to(device, non_blocking=True) for k, v in mb.items()}
        tokens = mb["tokens"]
        position_ids = torch.arange(tokens.shape[1], device=device).unsqueeze(0).expand_as(tokens)
        logits = model(tokens, position_ids, None)             # [b, s, V/tp] on the last stage
        return logits, lambda out: loss_fn(out, mb)
    L = max(mb["tokens"].shape[1] for mb in mbs)
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(mbs), model=[model], num_microbatches=len(mbs),
        seq_length=L, micro_batch_size=max(mb["tokens"].shape[0] for mb in mbs), forward_only=forward_only)


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

    def loss_fn(logits, mb):
        logp = token_logprobs(logits, mb["targets"], args.temperature)
        return logp.sum() * 0, torch.tensor(1, dtype=torch.int, device=logp.device), {"logp": logp.detach()}
    model.eval()
    with torch.no_grad():
        res = _run_micro_batches(model, [mb for _, mb in mbs], loss_fn, forward_only=True)
    model.train()
    if ps.is_pipeline_last_stage():
        for (rows, mb), r in zip(mbs, res):
            out[torch.tensor(rows), :r["logp"].shape[1]] = r["logp"].float().cpu()
    return out


def train_on_batch(model, optimizer, batch, args):
    """One optimizer step over the whole rollout batch (micro batches accumulate gradients).
    Returns stats (token sums over this DP rank's batch; reduced over DP by the caller).

    Old log-probs: PPO's ratio compares the policy being updated with the one that sampled. We
    take one optimizer step per rollout batch, so before that step the two are the same weights,
    and the "old" log-probs are exactly the log-probs this forward computes: `logp.detach()`.
    The ratio is then 1 in value and its gradient is grad(logp), the policy gradient; a separate
    forward would recompute the same numbers (up to kernel noise) and cost 11 s next to the 19 s
    update (0.5B benchmark).
    With --old-logp-pass (batch["old_logp"] set) the classic separate pass is used instead, which
    is what a loop of several optimizer steps per batch would need.
    The same forward measures how far vLLM's log-probs of the sampled tokens are from Megatron's
    (`logp_diff`, over the `logp_diff_tokens` of the rows that carry vLLM log-probs): a stale or
    wrong weight sync shows up there."""
    from megatron.core import parallel_state as ps
    mbs = micro_batches(batch, args.micro_batch_tokens)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    use_ref, use_old = "ref_logp" in batch, "old_logp" in batch

    def loss_fn(logits, mb):
        logp = token_logprobs(logits, mb["targets"], args.temperature)
        old = mb["old_logp"] if use_old else logp.detach()
        loss_sum, n, stats = policy_loss(logp, old, mb["advantages"], mb["mask"],
                                         args.clip_ratio, args.kl_coef, mb["ref_logp"] if use_ref else None)
        checked = mb["mask"] * mb["has_rollout_logp"].unsqueeze(1)
        stats["logp_diff"] = masked_sum((logp.detach() - mb["rollout_logp"]).abs(), checked)
        stats["logp_diff_tokens"] = checked.sum()
        return loss_sum, n.int(), {k: v.detach() for k, v in dict(stats, loss=loss_sum, tokens=n).items()}
    res = _run_micro_batches(model, [mb for _, mb in mbs], loss_fn, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    stats = {}
    if ps.is_pipeline_last_stage():
        for r in res:
            for k, v in r.items():
                stats[k] = stats.get(k, 0.0) + float(v)
    stats["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    stats["update_skipped"] = float(not ok)
    return stats


def _torch_optimizers(optimizer):
    """The torch Adam instances inside Megatron's (chained) optimizer wrapper."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "optimizer", None) is not None:
            yield opt.optimizer


def _optimizer_tensors(optimizer):
    """Every tensor the Megatron optimizer owns on the GPU: fp32 master weights and the Adam
    moments (12 bytes per parameter, sharded over DP with the distributed optimizer)."""
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            yield from group["params"]
        for state in inner.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v))


def offload_trainer(model, optimizer):
    """Grads freed, optimizer state to CPU; the bf16 params stay (vLLM's weights come from them).

    Megatron-Core's own optimizer.offload_to_cpu() copies each tensor into fresh pageable
    memory, every step: about 3 GB/s plus page faults. Here every tensor gets one pinned
    host buffer, allocated once and reused, which PCIe fills at full speed; the tensor objects
    stay the same (only .data moves), so the optimizer never notices."""
    model.offload_grad_buffers()                 # grads are recomputed: free, do not copy
    moved = []
    for t in _optimizer_tensors(optimizer):
        if t.is_cuda:
            buf = getattr(t, "_pinned_cpu", None)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = t._pinned_cpu = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buf.copy_(t.data, non_blocking=True)
            moved.append(t)
    torch.cuda.synchronize()                     # copies done before the GPU memory is reused
    for t in moved:
        t.data = t._pinned_cpu
    torch.cuda.empty_cache()                     # hand the freed pages to vLLM's wake-up


def restore_trainer(model, optimizer):
    for t in _optimizer_tensors(optimizer):
        if not t.is_cuda and getattr(t, "_pinned_cpu", None) is not None:
            t.data = t.data.to("cuda", non_blocking=True)
    model.restore_grad_buffers()                 # reallocates, zeroes and synchronizes


# ==============================================================================================
# Checkpoints: resume where a killed run stopped
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


def _train_state_dict(model, optimizer, is_loading=False):
    # the unwrapped GPTModel's keys: the same as convert.py's, so convert.py exports either.
    # The distributed optimizer's default format in megatron-core 0.16 ("fully_sharded_model_space")
    # is rejected by its own dist_checkpointing ("flattened_range is not supported"): ask for
    # "dp_reshardable", each rank saving its own shard (resume with the same TP x PP; DP may change).
    msd = model.module.sharded_state_dict()
    meta = {"distrib_optim_sharding_type": "dp_reshardable"}
    return {"model": msd, "optimizer": optimizer.sharded_state_dict(msd, is_loading=is_loading, metadata=meta)}


def save_checkpoint(root, step, model, optimizer, cfg, train_state, keep_last):
    """Model + optimizer (dist_checkpointing, any TP/PP can load it), the loop's position and
    every rank's RNG states; then drop all but the newest `keep_last` checkpoints."""
    import shutil
    from megatron.core import dist_checkpointing, tensor_parallel
    path = os.path.join(root, f"step_{step:06d}")
    tmp = path + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save(_train_state_dict(model, optimizer), tmp)
    torch.save({"python": random.getstate(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                "megatron": tensor_parallel.get_cuda_rng_tracker().get_states()},
               os.path.join(tmp, f"rng_{dist.get_rank():05d}.pt"))
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(tmp, "model_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(tmp, "train_state.json"), "w") as f:   # written last: marks it complete
            json.dump(dict(train_state, step=step), f)
        os.replace(tmp, path)
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load_checkpoint(path, model, optimizer):
    """Restore what save_checkpoint wrote; returns the train state (step, data position)."""
    from megatron.core import dist_checkpointing, tensor_parallel
    # megatron-core 0.16.1 without apex/TE reads Adam's "step" from every parameter's state while
    # it plans the load, and a fresh optimizer has no state yet (AssertionError in state_dict()).
    # Zero state of the right shapes makes the plan; the load then overwrites all of it.
    for inner in _torch_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p].update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p),
                                          step=torch.tensor(0.0))
    state = dist_checkpointing.load(_train_state_dict(model, optimizer, is_loading=True), path)
    model.module.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    # ...and then its parameter-state load puts back the "step" of that zero state (0), which
    # would restart Adam's bias correction. The saved step is in the loaded param groups.
    for inner in _torch_optimizers(optimizer):
        steps = {g["step"] for g in inner.param_groups if g.get("step") is not None}
        if len(steps) == 1:
            step = float(steps.pop())
            for st in inner.state.values():
                if "step" in st:
                    st["step"] = torch.tensor(step)
    rng_file = os.path.join(path, f"rng_{dist.get_rank():05d}.pt")
    if os.path.isfile(rng_file):    # absent when resuming with another number of ranks
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["megatron"])
    with open(os.path.join(path, "train_state.json")) as f:
        return json.load(f)


def keep_metrics_up_to(path, step):
    """On resume, forget logged steps after the checkpoint: they are about to be redone."""
    if os.path.isfile(path):
        with open(path) as f:
            rows = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(path, "w") as f:
            f.writelines(rows)


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
    modes = ["online", "offline"] if os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") != "offline" else ["offline"]
    for mode in modes:
        try:
            run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=60), **kwargs)
            with open(id_file, "w") as f:
                f.write(run.id)
            print(f"wandb: {mode} run {run.id} in project {args.wandb_project}", flush=True)
            return run
        except Exception as e:
            print(f"warning: wandb {mode} failed ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})", flush=True)
    return None


# ==============================================================================================
# vLLM: the colocated engine
# ==============================================================================================
def create_engine(args, cfg, gpu_memory_utilization):
    """One vLLM engine per rank, sharing torchrun's process group (external_launcher).

    load_format="dummy": vLLM allocates random weights and never reads the checkpoint; the first
    weight sync fills them from Megatron, so both engines provably run the same weights.
    Each data-parallel group gets its own seed, or all groups would sample the same texts.
    """
    from vllm import LLM
    return LLM(
        model=args.hf_dir, tensor_parallel_size=args.tp, distributed_executor_backend="external_launcher",
        enable_sleep_mode=True, load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=args.max_len,
        seed=args.seed + dist.get_rank() // args.tp, enable_prefix_caching=True,
        # log-probs after temperature, comparable with the trainer's logits / T
        logprobs_mode="processed_logprobs", max_num_seqs=args.max_num_seqs,
        # With TP > 1 vLLM fuses all-reduce + RMSNorm through FlashInfer's MNNVL all-reduce, and
        # its custom all-reduce maps peer memory over CUDA IPC. Both need NVLink features that
        # shared hosts often switch off (seen: CUBLAS_STATUS_INTERNAL_ERROR, then an illegal
        # memory access, at engine start on 2 x H200). NCCL alone is enough for rollouts.
        disable_custom_all_reduce=True,
        # vLLM captures CUDA graphs for decode batches up to min(2 * max_num_seqs, 512) sequences
        # by default; a rollout keeps all max_num_seqs sequences decoding together, and batches
        # above the largest graph run without one. Capture up to the batch we actually run.
        compilation_config={"pass_config": {"fuse_allreduce_rms": False},
                            "max_cudagraph_capture_size": max(512, args.max_num_seqs)})


def out_of_memory_hint(e, where):
    """A UserError naming the fix if `e` is a GPU out-of-memory failure, else None."""
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower() or "less than desired GPU memory" in text:
        return UserError(f"GPU out of memory {where}; lower --gpu-memory-utilization, --max-num-seqs or "
                         f"--micro-batch-tokens, or use a larger --tp ({text.splitlines()[0][:160]})")
    return None


def vllm_model(llm):
    return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model


def sync_weights(model, llm, cfg):
    """Megatron -> vLLM, one full tensor at a time (convert.export_hf gathers TP shards and PP
    stages and splits fused qkv / gate-up back to HF names; vLLM's Qwen2 loader re-fuses and
    re-shards them its own way). load_weights copies into the existing bf16 tensors in place,
    so vLLM's CUDA graphs stay valid."""
    vllm_model(llm).load_weights(convert.export_hf(model.module, cfg))
    # Cached prefixes were computed with the old weights: reusing them would be silently wrong.
    llm.reset_prefix_cache()


def generate(llm, prompts, sampling_params):
    """prompts: list of token-id lists; sampling_params: one for all, or one per prompt
    -> per prompt, the list of its n samples (response token ids, per-token logprobs or None,
    finish reason)."""
    from vllm.inputs import TokensPrompt
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling_params, use_tqdm=False)
    result = []
    for o in outs:
        samples = []
        for c in o.outputs:
            lps = [next(iter(lp.values())).logprob if lp else 0.0 for lp in c.logprobs] if c.logprobs else None
            samples.append((list(c.token_ids), lps, c.finish_reason))
        result.append(samples)
    return result


# ==============================================================================================
# Data
# ==============================================================================================
def load_prompt_file(path):
    """(messages, ground_truth) pairs from prepare.py's JSON lines."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; run `python prepare.py --input_dir ... --local_dir {os.path.dirname(path)}`")
    rows = []
    with open(path) as f:
        for k, line in enumerate(f):
            try:
                r = json.loads(line)
                rows.append((r["prompt"], r["reward_model"]["ground_truth"]))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path} line {k + 1} is not a prepare.py record (prompt, reward_model.ground_truth)")
    if not rows:
        raise UserError(f"{path} is empty")
    return rows


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
    g.add_argument("--out", default="grpo-out", help="folder for metrics.jsonl, checkpoints/ and final/")
    g.add_argument("--save-interval", type=int, default=10, help="checkpoint every N steps (0: only the final policy)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept (older ones are deleted)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start from --load even if OUT/checkpoints holds a checkpoint (default: resume from the newest)")
    g.add_argument("--wandb-project", default=None, help="log to this wandb project (run.sh sets it when enable_wandb=True)")
    g.add_argument("--wandb-name", default=None, help="wandb run name")
    g.add_argument("--model-size", default="custom", help="Qwen2.5 size to check the checkpoint against, or custom")
    g = p.add_argument_group("GRPO (defaults follow the reference example)")
    g.add_argument("--steps", type=int, default=100, help="optimizer steps (one per rollout batch)")
    g.add_argument("--prompts-per-step", type=int, default=64, help="prompts per rollout batch")
    g.add_argument("--n-samples-per-prompt", type=int, default=32, help="group size G of GRPO")
    g.add_argument("--max-len", type=int, default=2048, help="prompt + response tokens at most")
    g.add_argument("--max-prompt-len", type=int, default=1024, help="longer prompts are dropped (and counted)")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    g.add_argument("--clip-ratio", type=float, default=0.2, help="PPO clip epsilon")
    g.add_argument("--kl-coef", type=float, default=0.0, help="weight of the k3 KL to the initial policy in the loss")
    g.add_argument("--kl-log-interval", type=int, default=10,
                   help="with --kl-coef 0, measure the KL to the initial policy every N steps (0: never, and no "
                        "reference model is kept); with --kl-coef > 0 it is part of the loss, so every step")
    g.add_argument("--no-std-norm", action="store_true", help="advantages without std scaling (Dr. GRPO)")
    g.add_argument("--old-logp-pass", action="store_true",
                   help="compute old log-probs in a separate forward before the update (default: the update's own "
                        "forward, exact for one optimizer step per rollout batch; see train_on_batch)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=2e-6, help="constant learning rate")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip")
    g.add_argument("--micro-batch-tokens", type=int, default=8192, help="tokens (rows x padded length) per micro batch")
    g.add_argument("--no-distributed-optimizer", dest="distributed_optimizer", action="store_false",
                   help="replicate optimizer state on every DP rank instead of sharding it")
    g = p.add_argument_group("parallelism and engine")
    g.add_argument("--tp", type=int, default=1, help="tensor parallel size (Megatron and vLLM)")
    g.add_argument("--pp", type=int, default=1, help="pipeline parallel size (Megatron; vLLM holds the whole model)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM's share of GPU memory (default: what is free after the trainer offloads, minus 4 GiB)")
    g.add_argument("--sleep-level", type=int, default=1, choices=(1, 2),
                   help="vLLM sleep level between rollouts: 1 keeps a CPU copy of its weights, 2 drops them")
    g.add_argument("--max-num-seqs", type=int, default=1024, help="vLLM's batch of concurrent sequences")
    g.add_argument("--reward-workers", type=int, default=4, help="processes scoring math answers per rank")
    g = p.add_argument_group("eval and logging")
    g.add_argument("--eval-interval", type=int, default=10, help="evaluate every N steps (0: never)")
    g.add_argument("--eval-prompts", type=int, default=500, help="test prompts per evaluation")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--trace", action="store_true", help="every rank prints each phase it enters (to locate hangs)")
    g.add_argument("--toy-token", type=int, default=None,
                   help="toy task: random prompts, reward = fraction of completion tokens equal to this id")
    g.add_argument("--toy-prompt-len", type=int, default=8)
    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", choices=list(convert.QWEN25), default=None,
                   help="time a fixed workload on random weights of this Qwen2.5 size (no --load, no data): "
                        "128 prompts x 8 samples, 256-token prompts, 1024 new tokens each, one warm-up step")
    g.add_argument("--benchmark-steps", type=int, default=3, help="timed steps after the warm-up step")
    a = p.parse_args(argv)
    if a.kl_log_interval < 0 or a.kl_coef < 0:
        raise UserError("--kl-log-interval and --kl-coef must be >= 0")
    if a.benchmark:
        # the workload is fixed so that numbers from different runs and machines compare
        a.toy_token, a.toy_prompt_len, a.prompts_per_step, a.n_samples_per_prompt = 7, 256, 128, 8
        a.max_len, a.max_prompt_len, a.steps, a.model_size = 1280, 256, 1 + a.benchmark_steps, a.benchmark
        a.eval_interval, a.save_interval, a.resume = 0, 0, False
        a.out = a.out if a.out != "grpo-out" else "grpo-benchmark"
        return a
    if a.keep_last < 1:
        raise UserError("--keep-last must be >= 1")
    if a.n_samples_per_prompt < 2:
        raise UserError("--n-samples-per-prompt must be >= 2: GRPO's baseline is the mean of the other samples")
    if a.max_prompt_len >= a.max_len:
        raise UserError("--max-prompt-len must be smaller than --max-len (room is needed for the response)")
    if not a.load or not a.hf_dir:
        raise UserError("--load and --hf-dir are required (or --benchmark SIZE for random weights)")
    if not os.path.isdir(a.load) or not os.path.isfile(os.path.join(a.load, "metadata.json")):
        raise UserError(f"--load {a.load} is not a Megatron checkpoint (convert.py ... false ... writes one)")
    if not os.path.isfile(os.path.join(a.hf_dir, "config.json")):
        raise UserError(f"--hf-dir {a.hf_dir} has no config.json")
    return a


# ==============================================================================================
# Main
# ==============================================================================================
def main(argv=None):
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        prepare.die(str(e))


def log0(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


def cuda_seconds(fn):
    """(fn(), wall seconds), with the GPU idle before and after: its queued kernels are counted."""
    torch.cuda.synchronize()
    t = time.time()
    result = fn()
    torch.cuda.synchronize()
    return result, time.time() - t


def benchmark_report(args, history, llm, model, optimizer, ref, batch, prompts, sampling_params):
    """Print (and write to OUT/benchmark.json) the time of each phase per step, averaged over
    the steps after the warm-up, and the two ceilings measured in the same process: the same
    prompts through plain `LLM.generate` (no log-probs at all), and a plain Megatron
    forward+backward of the same rows (no optimizer step). Also the reference model's forward,
    which a step runs only every --kl-log-interval steps when --kl-coef is 0. tokens/s are for
    the whole job (all GPUs)."""
    timed = history[1:] or history
    mean = {k: sum(m[k] for m in timed) / len(timed) for k in timed[0] if k.startswith("time_") or k.endswith("_tokens")}
    world = dist.get_world_size()
    # ceiling 1: vLLM alone (it is awake after the last step's sync)
    def plain_vllm():
        outs = generate(llm, prompts, sampling_params)
        n = torch.tensor([sum(len(s[0]) for o in outs for s in o)], device="cuda", dtype=torch.float64)
        dist.all_reduce(n)
        return n.item()
    gen_tokens, vllm_s = cuda_seconds(plain_vllm)
    vllm_tps = gen_tokens / args.tp / vllm_s              # each TP group generated its own share
    # ceiling 2: Megatron forward+backward alone, same rows and micro batches
    llm.sleep(level=args.sleep_level)
    restore_trainer(model, optimizer)
    mbs = [mb for _, mb in micro_batches(batch, args.micro_batch_tokens)]

    def loss_fn(logits, mb):
        logp = token_logprobs(logits, mb["targets"], args.temperature)
        return -(logp * mb["mask"]).sum(), mb["mask"].sum().int(), {}
    model.zero_grad_buffer()
    _, fb_s = cuda_seconds(lambda: _run_micro_batches(model, mbs, loss_fn, forward_only=False))
    dp_tokens = torch.tensor([float(batch["lengths"].sum())], device="cuda", dtype=torch.float64)
    dist.all_reduce(dp_tokens)                           # every TP/PP rank of a DP group counts it once more
    fb_tps = dp_tokens.item() / (args.tp * args.pp) / fb_s
    ref_s = cuda_seconds(lambda: compute_logprobs(ref, batch, args))[1] if ref is not None else None
    step_s = sum(v for k, v in mean.items() if k.startswith("time_"))
    report = {"model": args.benchmark, "gpus": world, "tp": args.tp, "pp": args.pp,
              "device": torch.cuda.get_device_name(), "timed_steps": len(timed), "step_s": step_s,
              "phases_s": {k[5:]: v for k, v in mean.items() if k.startswith("time_")},
              "rollout_tokens_per_s": mean["generated_tokens"] / mean["time_rollout"],
              "update_tokens_per_s": mean["train_tokens"] / mean["time_update"],
              "ceiling_vllm_tokens_per_s": vllm_tps, "ceiling_megatron_fwd_bwd_tokens_per_s": fb_tps,
              "gpu_used_after_update_gib": max(m["gpu_used_after_update_gib"] for m in history),
              "kl_coef": args.kl_coef, "kl_log_interval": args.kl_log_interval, "reference_forward_s": ref_s}
    report["rollout_share_of_ceiling"] = report["rollout_tokens_per_s"] / vllm_tps
    if dist.get_rank() == 0:
        print(f"benchmark: Qwen2.5-{args.benchmark} shape, random weights, {args.prompts_per_step} prompts x "
              f"{args.n_samples_per_prompt} samples, {args.toy_prompt_len} + {args.max_len - args.toy_prompt_len} tokens, "
              f"{world} x {report['device']}, TP {args.tp} PP {args.pp}, mean of {len(timed)} steps after a warm-up")
        for k, v in report["phases_s"].items():
            print(f"  {k:<10} {v:8.2f} s")
        print(f"  {'step':<10} {step_s:8.2f} s")
        if ref_s is not None:
            print(f"  reference forward {ref_s:.2f} s: in every step with --kl-coef > 0, else every "
                  f"--kl-log-interval ({args.kl_log_interval}) steps")
        print(f"  rollout {report['rollout_tokens_per_s']:,.0f} generated tok/s = "
              f"{100 * report['rollout_share_of_ceiling']:.0f}% of plain vLLM ({vllm_tps:,.0f} tok/s)")
        print(f"  update {report['update_tokens_per_s']:,.0f} tok/s (optimizer step included); plain Megatron "
              f"forward+backward {fb_tps:,.0f} tok/s")
        print(f"  GPU memory used after the update: {report['gpu_used_after_update_gib']:.1f} GiB")
        with open(os.path.join(args.out, "benchmark.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report


def trace(args, step, phase):
    """--trace: every rank says which phase it enters, to find the collective a hang waits in."""
    if args.trace:
        print(f"[rank {dist.get_rank()}] step {step}: {phase}", flush=True)


def run(args):
    if args.benchmark:
        cfg = convert.qwen_config(args.benchmark)
    else:
        cfg = convert.resolve_config(args.model_size, os.path.join(args.hf_dir, "config.json"))
        convert.check_mcore_shape(args.load, cfg, os.path.join(args.hf_dir, "config.json"))
    convert.check_parallel_sizes(cfg, args.tp, args.pp)
    if not torch.cuda.is_available():
        raise UserError("grpo.py needs CUDA GPUs (vLLM and the Megatron trainer run on them)")
    convert.init_distributed(args.tp, args.pp, use_cuda=True)
    if args.benchmark:             # vLLM reads only config.json (dummy weights, no tokenizer)
        args.hf_dir = os.path.join(args.out, "benchmark-hf")
        if int(os.environ["LOCAL_RANK"]) == 0:
            os.makedirs(args.hf_dir, exist_ok=True)
            with open(os.path.join(args.hf_dir, "config.json"), "w") as f:
                json.dump(dict(cfg, torch_dtype="bfloat16"), f)
        dist.barrier()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    rank, world = dist.get_rank(), dist.get_world_size()
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    torch.manual_seed(args.seed)
    model_parallel_cuda_manual_seed(args.seed)
    random.seed(args.seed)     # the same prompt order on every rank

    # ---- data -----------------------------------------------------------------------------
    tokenizer = None
    if args.toy_token is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.hf_dir)
        train, dropped = tokenize(tokenizer, load_prompt_file(os.path.join(args.data, "train.json")), args.max_prompt_len)
        test, _ = tokenize(tokenizer, load_prompt_file(os.path.join(args.data, "test.json")), args.max_prompt_len)
        log0(f"prompts: {len(train)} train ({dropped} dropped: longer than {args.max_prompt_len} tokens), {len(test)} test")
        stop_ids = sorted({i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"))
                           if isinstance(i, int) and i >= 0})
    else:
        rng = random.Random(args.seed)
        train = [([rng.randrange(cfg["vocab_size"]) for _ in range(args.toy_prompt_len)], None) for _ in range(4096)]
        test, stop_ids = [], []

    # ---- models ---------------------------------------------------------------------------
    model, optimizer = build_trainer(cfg, args)
    ref = None
    if args.kl_coef > 0 or args.kl_log_interval > 0:
        # The frozen initial policy, for KL. Only bf16 params on the GPU: no grads, no optimizer.
        ref = convert.build_model(cfg, convert.transformer_config(cfg, torch.bfloat16, args.tp, args.pp,
                                                                 variable_seq_lengths=args.pp > 1)).cuda()
        if args.load:
            convert.load_mcore(ref, args.load)
        else:
            ref.load_state_dict(model.module.state_dict())
        ref.requires_grad_(False)
    ckpt_root = os.path.join(args.out, "checkpoints")
    resume_from = complete_checkpoints(ckpt_root)[-1:] if args.resume else []
    train_state = None
    if resume_from:
        train_state = load_checkpoint(resume_from[0][1], model, optimizer)
        log0(f"resuming after step {train_state['step']} from {resume_from[0][1]}")
    offload_trainer(model, optimizer)
    free, total = torch.cuda.mem_get_info()
    util = args.gpu_memory_utilization or max(0.05, (free - 4 * 2**30) / total)
    log0(f"GPU: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free after offload; vLLM gets {util:.2f}")
    t0 = time.time()
    try:
        llm = create_engine(args, cfg, util)
    except Exception as e:
        raise out_of_memory_hint(e, "while starting vLLM") or e
    log0(f"vLLM engine up in {time.time() - t0:.0f}s")
    sync_weights(model, llm, cfg)
    from vllm import SamplingParams
    # Every sample may grow to max_len; TP peers must pass identical SamplingParams, so the
    # budget is fixed, not per prompt.
    max_new_tokens = args.max_len - (args.toy_prompt_len if args.toy_token is not None else args.max_prompt_len)
    # top_p 1 / top_k -1 for training rollouts: truncation would renormalise vLLM's log-probs and
    # the samples would no longer come from the policy that the loss assumes.
    # vLLM's own log-probs (logprobs=0: the sampled token's) serve only the vLLM-vs-Megatron check;
    # the loss takes Megatron's. They are not free: vLLM turns each one into Python objects, per
    # token and step, in the thread that also schedules the GPU. Asked for on every sample they made
    # a 0.5B benchmark rollout 36 s instead of 22 s (H100). So only the first prompt of each engine's
    # share asks for them: n samples of it are plenty to see a stale or wrong weight sync.
    def rollout_params(logprobs):
        return SamplingParams(n=args.n_samples_per_prompt, temperature=args.temperature, top_p=1.0, top_k=-1,
                              max_tokens=max_new_tokens, logprobs=logprobs, stop_token_ids=stop_ids or None,
                              seed=None, ignore_eos=args.benchmark is not None)
    checked, unchecked = rollout_params(0), rollout_params(None)
    os.makedirs(args.out, exist_ok=True)
    log_rank = (ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and dp_rank == 0)
    rollout_groups, group = world // args.tp, rank // args.tp    # one vLLM engine per TP group
    order = list(range(len(train)))
    random.Random(args.seed).shuffle(order)
    cursor, start = 0, 1
    if train_state is not None:
        order, cursor, start = train_state["order"], train_state["cursor"], train_state["step"] + 1
    metrics_file = None
    if log_rank:
        if train_state is not None:
            keep_metrics_up_to(os.path.join(args.out, "metrics.jsonl"), train_state["step"])
        metrics_file = open(os.path.join(args.out, "metrics.jsonl"), "a")
    wandb_run = start_wandb(args, cfg, start - 1) if log_rank else None
    from tqdm import tqdm
    bar = tqdm(range(start, args.steps + 1), desc="grpo", unit="step", disable=rank != 0, file=sys.stderr)

    history = []
    for step in bar:
        m, times = {"step": step}, {}
        history.append(m)
        # ---- 1. rollout: this engine's share of the step's prompts -------------------------
        trace(args, step, "rollout")
        t = time.time()
        if cursor + args.prompts_per_step > len(order):
            random.Random(args.seed + step).shuffle(order)
            cursor = 0
        step_prompts = [train[i] for i in order[cursor:cursor + args.prompts_per_step]]
        cursor += args.prompts_per_step
        mine = step_prompts[group::rollout_groups]
        outs = generate(llm, [p for p, _ in mine], [checked if i == 0 else unchecked for i in range(len(mine))])
        times["rollout"] = time.time() - t
        # ---- 2. sleep vLLM, score ---------------------------------------------------------
        trace(args, step, "sleep+score")
        t = time.time()
        llm.sleep(level=args.sleep_level)
        times["sleep"] = time.time() - t
        t = time.time()
        samples = []
        for (prompt_ids, truth), group_outs in zip(mine, outs):
            for resp, lps, finish in group_outs:
                samples.append({"prompt_ids": prompt_ids, "response_ids": resp, "rollout_logps": lps,
                                "truncated": finish == "length", "truth": truth})
        if args.toy_token is not None:
            rewards = [toy_reward(s["response_ids"], args.toy_token) for s in samples]
        else:
            texts = tokenizer.batch_decode([s["response_ids"] for s in samples], skip_special_tokens=True)
            rewards = prepare.score_responses(texts, [s["truth"] for s in samples], num_workers=args.reward_workers)
        for s, r in zip(samples, rewards):
            s["reward"] = r
        times["reward"] = time.time() - t
        # every rank gets every rollout, then takes its data-parallel share: TP and PP peers of one
        # DP rank must train on identical rows, and PP stages rolled out different prompts.
        gathered = [None] * world
        dist.all_gather_object(gathered, samples if rank % args.tp == 0 else [])
        all_samples = [s for g in range(rollout_groups) for s in gathered[g * args.tp]]
        # ---- 3. advantages (samples of one prompt are contiguous) -------------------------
        trace(args, step, "advantages")
        r = torch.tensor([s["reward"] for s in all_samples])
        adv = group_advantages(r, args.n_samples_per_prompt, norm_by_std=not args.no_std_norm)
        for s, a in zip(all_samples, adv.tolist()):
            s["advantage"] = a
        per_dp = len(all_samples) // args.n_samples_per_prompt // dp_size * args.n_samples_per_prompt
        shard = all_samples[dp_rank * per_dp:(dp_rank + 1) * per_dp]
        batch = make_batch(shard)
        # ---- 4. reference (and, with --old-logp-pass, old) log-probs ------------------------
        trace(args, step, "logprobs")
        t = time.time()
        restore_trainer(model, optimizer)
        times["restore"] = time.time() - t
        t = time.time()
        if args.old_logp_pass:
            batch["old_logp"] = compute_logprobs(model, batch, args)
        # With kl_coef 0 the reference model does not touch the loss: its forward (11 s next to
        # the update's 19 s in the 0.5B benchmark) only measures how far the policy drifted, so
        # it runs every kl_log_interval steps (TRL and verl skip it altogether at KL weight 0).
        measure_kl = ref is not None and (args.kl_coef > 0 or step % args.kl_log_interval == 0)
        if measure_kl:
            batch["ref_logp"] = compute_logprobs(ref, batch, args)
        times["logprobs"] = time.time() - t
        # ---- 5. policy update ------------------------------------------------------------
        trace(args, step, "update")
        stats, times["update"] = cuda_seconds(lambda: train_on_batch(model, optimizer, batch, args))
        if args.save_interval and (step % args.save_interval == 0 or step == args.steps):
            # Saved right after the update, while the optimizer state is on the GPU. A run killed
            # after this point resumes at step + 1; killed before it, it redoes this step (from
            # the previous checkpoint on): no completed step is lost or done twice.
            t = time.time()
            save_checkpoint(ckpt_root, step, model, optimizer, cfg, {"order": order, "cursor": cursor}, args.keep_last)
            times["save"] = time.time() - t
        # ---- 6. weight sync --------------------------------------------------------------
        trace(args, step, "sync")
        used_in_update = total - torch.cuda.mem_get_info()[0]
        t = time.time()
        offload_trainer(model, optimizer)
        times["offload"] = time.time() - t
        free_before_wake = torch.cuda.mem_get_info()[0]
        t = time.time()
        try:
            llm.wake_up(tags=["weights"])
        except Exception as e:
            raise out_of_memory_hint(e, "while waking vLLM after the update (the trainer kept too much)") or e
        times["wake"] = time.time() - t
        t = time.time()
        sync_weights(model, llm, cfg)
        times["sync"] = time.time() - t
        t = time.time()
        llm.wake_up(tags=["kv_cache", "scheduling"])
        times["wake"] += time.time() - t
        # ---- 7. log ----------------------------------------------------------------------
        trace(args, step, "log")
        red = torch.tensor([stats.get(k, 0.0) for k in
                            ("loss", "pg_loss", "clip_frac", "kl", "neg_logp", "tokens", "logp_diff",
                             "logp_diff_tokens")], device="cuda")
        dist.all_reduce(red, group=ps.get_data_parallel_group())
        n_tok = max(red[5].item(), 1.0)
        lengths = [len(s["response_ids"]) for s in all_samples]
        m.update({
            "reward": float(r.mean()), "reward_std": float(r.std()) if len(r) > 1 else 0.0,
            "accuracy": float((r == 1).float().mean()),
            "adv_abs_mean": float(adv.abs().mean()), "adv_max": float(adv.max()), "adv_min": float(adv.min()),
            "response_len_mean": sum(lengths) / len(lengths), "response_len_max": max(lengths),
            "generated_tokens": sum(lengths),
            "train_tokens": sum(len(s["prompt_ids"]) + len(s["response_ids"]) for s in all_samples),
            "clipped_ratio": sum(s["truncated"] for s in all_samples) / len(all_samples),
            "loss": red[0].item() / n_tok, "pg_loss": red[1].item() / n_tok, "clip_frac": red[2].item() / n_tok,
            "neg_logp": red[4].item() / n_tok,
            "logp_diff_vllm_megatron": red[6].item() / max(red[7].item(), 1.0),
            "grad_norm": stats["grad_norm"], "update_skipped": stats["update_skipped"],
            "tokens_per_s_rollout": sum(lengths) / max(times["rollout"], 1e-9) / max(1, rollout_groups),
            # (torch's own peak counters also count vLLM's sleeping pool, so we read the driver)
            "gpu_used_after_update_gib": used_in_update / 2**30, "gpu_free_before_wake_gib": free_before_wake / 2**30,
            **{f"time_{k}": v for k, v in times.items()}})
        if measure_kl:
            m["kl"] = red[3].item() / n_tok
        # ---- eval ------------------------------------------------------------------------
        if args.eval_interval and step % args.eval_interval == 0 and test:
            t = time.time()
            eval_rows = test[:args.eval_prompts][group::rollout_groups]
            ep = SamplingParams(n=1, temperature=0.6, top_p=0.95, top_k=20, max_tokens=max_new_tokens,
                                stop_token_ids=stop_ids or None)
            eouts = generate(llm, [p for p, _ in eval_rows], ep)
            m["time_eval_generate"] = time.time() - t
            t = time.time()
            texts = tokenizer.batch_decode([o[0][0] for o in eouts], skip_special_tokens=True)
            acc = prepare.score_responses(texts, [g for _, g in eval_rows], num_workers=args.reward_workers)
            acc_t = torch.tensor([sum(acc), len(acc)], dtype=torch.float64, device="cuda") * (rank % args.tp == 0)
            dist.all_reduce(acc_t)
            m["eval_accuracy"] = (acc_t[0] / acc_t[1].clamp(min=1)).item()
            m["time_eval_score"] = time.time() - t
            if log_rank:       # the answers this rank scored, to read what the model writes
                os.makedirs(os.path.join(args.out, "eval"), exist_ok=True)
                with open(os.path.join(args.out, "eval", f"step_{step:06d}.jsonl"), "w") as f:
                    for text, (_, truth), a in zip(texts, eval_rows, acc):
                        f.write(json.dumps({"response": text, "ground_truth": truth, "reward": a}) + "\n")
        if metrics_file:
            metrics_file.write(json.dumps(m) + "\n")
            metrics_file.flush()
            if wandb_run is not None:
                wandb_run.log(m, step=step)
            print(f"step {step}: reward {m['reward']:.3f} loss {m['loss']:.4f} "
                  + (f"kl {m['kl']:.4f} " if "kl" in m else "") +
                  f"clip {m['clip_frac']:.3f} |logp diff| {m['logp_diff_vllm_megatron']:.4f} "
                  f"len {m['response_len_mean']:.0f} grad {m['grad_norm']:.3f} "
                  f"mem {m['gpu_used_after_update_gib']:.1f}/{m['gpu_free_before_wake_gib']:.1f} GiB used/free "
                  + " ".join(f"{k[5:]} {v:.1f}s" for k, v in m.items() if k.startswith("time_"))
                  + (f" eval_acc {m['eval_accuracy']:.3f}" if "eval_accuracy" in m else ""), flush=True)
    if args.benchmark:
        benchmark_report(args, history, llm, model, optimizer, ref, batch, [p for p, _ in mine], unchecked)
        del llm
        convert.shutdown_distributed()
        return
    # ---- final checkpoint ----------------------------------------------------------------------
    final = os.path.join(args.out, "final")
    if rank == 0 and os.path.isdir(final):
        import shutil
        shutil.rmtree(final)
    dist.barrier()
    if rank == 0:
        os.makedirs(final)
    dist.barrier()
    convert.save_mcore(model.module, cfg, final)
    dist.barrier()
    log0(f"saved the policy to {final}")
    if wandb_run is not None:
        wandb_run.finish()
    del llm
    convert.shutdown_distributed()


if __name__ == "__main__":
    main()
