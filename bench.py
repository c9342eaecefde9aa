"""The benchmark that `grpo.py --benchmark SIZE` runs: a fixed workload on random Qwen2.5-shaped
weights, the time of each phase of a step, and next to them the two ceilings measured in the
same process, what vLLM and Megatron do alone with the same work.

    torchrun --nproc_per_node 1 grpo.py --benchmark 0.5B                 # 3 timed steps after a warm-up
    torchrun --nproc_per_node 1 grpo.py --benchmark 7B --benchmark-prompts 32 --benchmark-steps 1

It is the training loop itself (grpo.run) on this workload, not a copy of it; this file holds
only what differs: the workload, the weights' config.json for vLLM, and the report.
"""
import json
import os
import time

import torch
import torch.distributed as dist

import convert
import grpo
import memory


def add_arguments(p):
    """The benchmark's flags, on grpo.py's parser."""
    g = p.add_argument_group("benchmark (see bench.py)")
    g.add_argument("--benchmark", choices=list(convert.QWEN25), default=None,
                   help="time a fixed workload on random weights of this Qwen2.5 size (no --load, no data): "
                        "128 prompts x 8 samples, 256-token prompts, 1024 new tokens each, one warm-up step")
    g.add_argument("--benchmark-steps", type=int, default=3, help="timed steps after the warm-up step")
    g.add_argument("--benchmark-prompts", type=int, default=128,
                   help="prompts per step of the benchmark (fewer for big shapes within a time limit)")


def cuda_seconds(fn):
    """(fn(), wall seconds), with the GPU idle before and after: its queued kernels are counted."""
    torch.cuda.synchronize()
    t = time.time()
    result = fn()
    torch.cuda.synchronize()
    return result, time.time() - t


def set_workload(a):
    """The fixed workload, in place of the flags that would change it, so that numbers from
    different runs and machines compare: 8 samples for each of --benchmark-prompts prompts of
    256 random tokens, exactly 1024 new tokens each (vLLM ignores the end-of-sequence token), the
    toy reward, no evaluation, no checkpoints."""
    a.toy_token, a.toy_prompt_len, a.prompts_per_step, a.n_samples_per_prompt = 7, 256, a.benchmark_prompts, 8
    a.max_len, a.max_prompt_len, a.steps, a.model_size = 1280, 256, 1 + a.benchmark_steps, a.benchmark
    a.eval_interval, a.save_interval, a.resume = 0, 0, False
    a.out = a.out if a.out != "grpo-out" else "grpo-benchmark"


def write_config(args, cfg):
    """vLLM reads only config.json from --hf-dir here (dummy weights, no tokenizer): one per node."""
    args.hf_dir = os.path.join(args.out, "benchmark-hf")
    if int(os.environ["LOCAL_RANK"]) == 0:
        os.makedirs(args.hf_dir, exist_ok=True)
        with open(os.path.join(args.hf_dir, "config.json"), "w") as f:
            json.dump(dict(cfg, torch_dtype="bfloat16"), f)
    dist.barrier()


def report(args, ctx, engine, model, optimizer, ref, batch):
    """Print (and write to OUT/benchmark.json) the time of each phase per step, averaged over
    the steps after the warm-up, and the two ceilings measured in the same process: the same
    prompts through plain `LLM.generate` (no log-probs at all), and a plain Megatron
    forward+backward of the same rows (no optimizer step). Also the reference model's forward,
    which a step runs only every --kl-log-interval steps when --kl-coef is 0, and the memory
    plan's prediction next to the measured peaks. tokens/s are for the whole job (all GPUs)."""
    history = ctx["history"]
    steps = history[1:] or history
    mean = {k: sum(m.get(k, 0.0) for m in steps) / len(steps) for k in steps[0]
            if k.startswith("time_") or k.endswith("_tokens")}
    world = dist.get_world_size()
    # ceiling 1: vLLM alone (it is awake after the last step's sync), on the last step's prompts
    places = range(ctx["engine_index"], args.prompts_per_step, ctx["engines"])
    prompts = [ctx["train"][ctx["data_state"]["order"][k]] for k in places]
    params = [ctx["sampling"](args.max_len - args.toy_prompt_len, None)] * len(prompts)
    before = engine.counter("vllm:num_preemptions")

    def job_tokens_per_s(sampling_params):
        def generate():
            outs = engine.generate([p for p, _ in prompts], sampling_params)
            n = torch.tensor([sum(len(s[0]) for o in outs for s in o)], device="cuda", dtype=torch.float64)
            dist.all_reduce(n)
            return n.item()
        tokens, seconds = cuda_seconds(generate)
        return tokens / args.tp / seconds                 # each TP group generated its own share
    vllm_tps = job_tokens_per_s(params)
    plain_preemptions = None if before is None else engine.counter("vllm:num_preemptions") - before
    # the same with a seed on every request, as the rollout asks (rollout_seed): vLLM then draws
    # each seeded request's samples with a generator of its own, the rollout's one difference in
    # kind from plain generate
    seeded_tps = job_tokens_per_s([ctx["sampling"](args.max_len - args.toy_prompt_len, None,
                                                   seed=grpo.rollout_seed(args.seed, 0, 1, k))
                                   for k in places])
    cache = engine.llm.llm_engine.vllm_config.cache_config
    # ceiling 2: Megatron forward+backward alone, same rows and micro batches
    engine.sleep(level=args.sleep_level)
    memory.restore_grads(model)
    mbs = [mb for _, mb in grpo.micro_batches(batch, args.micro_batch_tokens)]

    def loss_fn(logp, _ent, mb):
        return -(logp * mb["mask"]).sum(), mb["mask"].sum().int(), {}
    model.zero_grad_buffer()
    _, fb_s = cuda_seconds(lambda: grpo._run_micro_batches(model, mbs, loss_fn, False, args))
    dp_tokens = torch.tensor([float(batch["lengths"].sum())], device="cuda", dtype=torch.float64)
    dist.all_reduce(dp_tokens)                           # every TP/PP rank of a DP group counts it once more
    fb_tps = dp_tokens.item() / (args.tp * args.pp) / fb_s
    ref_s = cuda_seconds(lambda: grpo.reference_logprobs(ref, batch, args))[1] if ref is not None else None
    # ceiling 2's complement: the optimizer step alone, on that forward+backward's gradients (-sum
    # logp: never zero, unlike the benchmark's own, where a random model rarely earns the toy
    # reward and most groups carry no signal), and the largest change it makes to the fp32 master
    # weights of the first and the last tensor: the update really moves the weights at this size.
    masters = [p for inner in memory.torch_optimizers(optimizer) for g in inner.param_groups for p in g["params"]]
    probes = [masters[0], masters[-1]] if masters else []
    before = [p.detach().to("cpu", copy=True) for p in probes]
    _, step_s_alone = cuda_seconds(lambda: grpo.optimizer_step(model, optimizer, args))
    moved = max((float((p.detach().cpu() - b).abs().max()) for p, b in zip(probes, before)), default=0.0)
    step_s = sum(v for k, v in mean.items() if k.startswith("time_"))
    plan = memory.plan_and_pick_defaults(args, convert.qwen_config(args.benchmark), ctx["dp"], torch.cuda.mem_get_info()[1])
    report = {"model": args.benchmark, "gpus": world, "tp": args.tp, "pp": args.pp, "prompts": args.prompts_per_step,
              "device": torch.cuda.get_device_name(), "timed_steps": len(steps), "step_s": step_s,
              "phases_s": {k[5:]: v for k, v in mean.items() if k.startswith("time_")},
              "rollout_tokens_per_s": mean["generated_tokens"] / mean["time_rollout"],
              "update_tokens_per_s": mean["train_tokens"] / mean["time_update"],
              "ceiling_vllm_tokens_per_s": vllm_tps, "vllm_seeded_tokens_per_s": seeded_tps,
              "ceiling_megatron_fwd_bwd_tokens_per_s": fb_tps, "megatron_fwd_bwd_s": fb_s,
              "optimizer_step_alone_s": step_s_alone, "optimizer_step_max_weight_change": moved,
              "grad_norms": [m.get("grad_norm") for m in history],
              "gpu_peak_train_gib": max(m.get("gpu_peak_train_gib", 0.0) for m in history),
              "gpu_used_rollout_gib": max(m["gpu_used_rollout_gib"] for m in history),
              "plan_train_gib": plan["train_peak"] / memory.GIB, "plan_rollout_gib": plan["rollout_peak"] / memory.GIB,
              "settings": {k: getattr(args, k) for k in ("micro_batch_tokens", "logits_chunk_tokens", "recompute",
                                                          "grad_reduce_dtype", "adam_moments", "sleep_level",
                                                          "kl_coef", "kl_log_interval", "ref_on_gpu", "max_num_seqs")},
              "reference_forward_s": ref_s, "kv_cache_tokens": getattr(cache, "kv_cache_size_tokens", None),
              "vllm_preemptions_per_step": sum(m.get("vllm_preemptions", 0) for m in steps) / len(steps),
              "vllm_preemptions_plain": plain_preemptions}
    report["rollout_share_of_ceiling"] = report["rollout_tokens_per_s"] / vllm_tps
    if dist.get_rank() == 0:
        print(f"benchmark: Qwen2.5-{args.benchmark} shape, random weights, {args.prompts_per_step} prompts x "
              f"{args.n_samples_per_prompt} samples, {args.toy_prompt_len} + {args.max_len - args.toy_prompt_len} tokens, "
              f"{world} x {report['device']}, TP {args.tp} PP {args.pp}, mean of {len(steps)} steps after a warm-up")
        print("  settings: " + " ".join(f"{k}={v}" for k, v in report["settings"].items()))
        for k, v in report["phases_s"].items():
            print(f"  {k:<12} {v:8.2f} s")
        print(f"  {'step':<12} {step_s:8.2f} s")
        if ref_s is not None:
            print(f"  reference forward {ref_s:.2f} s: in every step with --kl-coef > 0, else every "
                  f"--kl-log-interval ({args.kl_log_interval}) steps")
        print(f"  rollout {report['rollout_tokens_per_s']:,.0f} generated tok/s = "
              f"{100 * report['rollout_share_of_ceiling']:.0f}% of plain vLLM ({vllm_tps:,.0f} tok/s); KV cache "
              f"{report['kv_cache_tokens']} tokens; preemptions per rollout {report['vllm_preemptions_per_step']} "
              f"(plain vLLM {plain_preemptions}); plain vLLM with a seed per request {seeded_tps:,.0f} tok/s")
        print(f"  update {report['update_tokens_per_s']:,.0f} tok/s (optimizer step included); plain Megatron "
              f"forward+backward {fb_tps:,.0f} tok/s ({fb_s:.2f} s); optimizer step alone {step_s_alone:.2f} s, "
              f"largest change of a master weight {moved:.3g}; grad norms of the steps "
              + " ".join(f"{g:.3g}" for g in report["grad_norms"] if g is not None))
        print(f"  GPU memory: train peak {report['gpu_peak_train_gib']:.1f} GiB (plan {report['plan_train_gib']:.1f}), "
              f"rollout {report['gpu_used_rollout_gib']:.1f} GiB (plan {report['plan_rollout_gib']:.1f}) "
              f"of {torch.cuda.mem_get_info()[1] / memory.GIB:.1f} GiB")
        with open(os.path.join(args.out, "benchmark.json"), "w") as f:
            json.dump(report, f, indent=2)
    return report
