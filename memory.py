"""GPU memory for grpo.py: the plan that picks the memory flags before anything is allocated,
the levers it can pull, and the moves of state between the GPU and pinned host memory that let
the trainer and vLLM take turns on one GPU (the phase map at the top of grpo.py).

    python grpo.py --memory-plan 7B --tp 2 --world-size 8 --gpu-gib 80     # a layout's plan, no GPU needed
"""
import functools
import os

import torch

import convert
from convert import UserError

GIB = 2**30


# ==============================================================================================
# The memory plan: what each phase holds on a GPU, added up before anything is allocated
# ==============================================================================================
# Bytes per token and layer that the local spec's layer keeps for its backward (bf16): counted
# with torch.autograd.graph.saved_tensors_hooks on megatron-core 0.16.1's layer on an H100 for
# all seven Qwen2.5 shapes (test_gpu_memory_plan_activations_match_what_the_gpu_keeps), and
# matched by  14 h + 10 ffn + 6 kv + 8 head_dim  within 0.1% (h: hidden, kv: key/value width =
# kv heads x head dim). The MLP dominates: the SwiGLU keeps its [2 ffn] input, its halves and
# their product. The rest: four [h] tensors around the two norms (their inputs and outputs; the
# fused CUDA RMSNorm keeps only its bf16 input and one fp32 number per token - the CPU's keeps
# two fp32 copies instead, 12 h more per layer), the fused qkv output, attention's output twice (the kernel's and
# the projection's input) and the RoPE tables. Under TP the heads and the MLP are split over the
# ranks, but the norms' tensors (8 h) are whole on every rank.
ACT_BYTES = {"hidden": 8, "hidden_split": 6, "ffn": 10, "kv": 6, "head_dim": 8}


# What the trainer's side holds besides tensors we count: the CUDA context, NCCL's buffers,
# vLLM's CUDA graphs (they stay while the engine sleeps) and the allocator's slack. Calibrated on
# the measured peaks in the README's memory table.
OVERHEAD_GIB = 3.0


# What the rollout holds beyond the pool vLLM is given at start: the trainer's memory grows after
# its first update (kernels loaded on first use, the allocator's cached blocks; at 0.5B 2.6 GiB
# stayed in use while vLLM slept before the first update, 4.3 GiB after it), and vLLM's sampler
# and prefill working memory. Measured on top of the pool: 2.8 GiB at 0.5B (1024 sequences at
# once), 1.5 GiB at 3B, 1.1 GiB at 7B.
ROLLOUT_GROWTH_GIB = 3.0


# The share of the GPU that stays free while vLLM generates; its pool, sized at start, leaves
# that and the growth above.
ROLLOUT_FREE = 0.1


def rollout_reserve(gpu_bytes):
    return ROLLOUT_FREE * gpu_bytes + ROLLOUT_GROWTH_GIB * GIB


# The share of a GPU the update may fill by the plan: 10% stays free, and 5% more covers the
# plan's own error (its predictions against measured peaks are in the README).
PLAN_FILL = 0.85


def params_per_rank(cfg, tp, pp):
    """Parameters held by the most loaded rank (TP shards matrices and the vocabulary; PP gives
    each stage its layers, the first the embedding, the last the output layer, which with tied
    embeddings is a second copy of the embedding there)."""
    h, f, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * convert.head_dim(cfg)
    layer = (h * qkv + qkv + h * cfg["num_attention_heads"] * convert.head_dim(cfg) + 3 * h * f) / tp + 2 * h
    layers = cfg["num_hidden_layers"] // pp * layer
    embedding = V * h / tp
    if pp == 1:
        return layers + embedding * (1 if cfg["tie_word_embeddings"] else 2) + h
    return layers + max(embedding, embedding + h)            # first stage: embedding; last: output layer


def activation_bytes(cfg, tp):
    """Bytes one layer keeps per token for its backward, without recompute (see ACT_BYTES)."""
    h, kv = cfg["hidden_size"], cfg["num_key_value_heads"] * convert.head_dim(cfg)
    split = ACT_BYTES["hidden_split"] * h + ACT_BYTES["ffn"] * cfg["intermediate_size"] + ACT_BYTES["kv"] * kv
    return ACT_BYTES["hidden"] * h + split / tp + ACT_BYTES["head_dim"] * convert.head_dim(cfg)


def memory_plan(cfg, tp, pp, dp, s):
    """Per-GPU bytes of each part, for the settings `s` (a namespace with micro_batch_tokens,
    logits_chunk_tokens, recompute, grad_reduce_dtype, adam_moments, ref (bool: a
    reference model exists), ref_on_gpu, sleep_level, max_len, max_num_seqs, distributed_optimizer,
    gpus_per_node), and the peaks of the two phases that matter:

      train peak   = params + grads + resident reference + overhead
                     + max(activations + logits,  optimizer state)
      rollout      = params + resident reference + overhead + vLLM's share (weights, KV cache)

    max(): the optimizer state comes back from host memory only for optimizer.step(), when the
    activations are gone (optimizer_step). vLLM is given what is left, minus a reserve, so the
    rollout always fits; what the plan checks there is that its KV cache holds at least one
    full-length sequence, and how many run at once.
    """
    P = params_per_rank(cfg, tp, pp)
    h = cfg["hidden_size"]
    kv = cfg["num_key_value_heads"] * convert.head_dim(cfg)
    layers = cfg["num_hidden_layers"] // pp
    T = s.micro_batch_tokens
    per_token_layer = activation_bytes(cfg, tp)
    in_flight = pp                      # 1F1B: the first stage holds up to pp micro batches
    if s.recompute == "full":           # each layer's input (bf16), plus one layer redone at a time
        activations = in_flight * T * layers * 2 * h + T * per_token_layer
    else:
        activations = in_flight * T * layers * per_token_layer
    chunk = min(s.logits_chunk_tokens or T, T)
    # A chunk's backward holds its bf16 logits, the cross entropy's fp32 copy, its fp32 gradient
    # and the bf16 one: 12 bytes per token and vocabulary entry. Whole (one chunk, no recompute),
    # the forward's copies also wait for the backward: 14 bytes, measured at 0.5B. And the output
    # matrix's bf16 gradient, which the backward makes whole before adding it to the fp32
    # gradient buffer (measured with the activations).
    logits = (12 if chunk < T else 14) * chunk * cfg["vocab_size"] / tp + 2 * cfg["vocab_size"] * h / tp
    shard = 1 / dp if s.distributed_optimizer else 1.0
    largest = cfg["vocab_size"] * h / tp                       # the embedding: AdamW's biggest tensor
    # The step's GPU state: fp32 master weights and both Adam moments (12 bytes per parameter; 4
    # when the moments stay in host memory, plus those on their way, which streamed_adam_step
    # keeps within the biggest tensor's), AdamW's temporaries of one tensor at a time, and with
    # bf16 grads megatron's fp32 copy of this rank's gradient shard.
    moments = 12 * P * shard if s.adam_moments == "gpu" else 4 * P * shard + 8 * largest
    step_state = moments + 3 * 4 * largest
    parts = {
        "params": 2 * P,
        "grads": (4 if s.grad_reduce_dtype == "fp32" else 2) * P,
        "optimizer": step_state + (4 * P * shard if s.grad_reduce_dtype == "bf16" else 0),
        "reference": 2 * P if s.ref and s.ref_on_gpu else 0.0,
        "activations": activations,
        "logits": logits,
        "overhead": OVERHEAD_GIB * GIB,
    }
    base = parts["params"] + parts["grads"] + parts["reference"] + parts["overhead"]
    train_peak = base + max(activations + logits, parts["optimizer"])
    if s.ref and not s.ref_on_gpu:      # the reference visits for its forward (optimizer state away)
        train_peak = max(train_peak, base + 2 * P + activations / layers + logits)
    gpu = s.gpu_bytes
    vllm_share = gpu - rollout_reserve(gpu) - parts["params"] - parts["reference"] - parts["overhead"]
    vllm_weights = 2 * params_per_rank(cfg, tp, 1)             # vLLM holds the whole model per TP group
    sampler = s.max_num_seqs * cfg["vocab_size"] * 4          # vLLM's per-sequence token counts
    kv_cache = vllm_share - vllm_weights - sampler - 1.0 * GIB   # ~1 GiB of vLLM's own activations
    kv_per_token = 2 * cfg["num_hidden_layers"] * kv * 2 / tp
    # host memory per node: pinned optimizer state and offloaded reference of every rank on it, vLLM's
    # weights when sleep level 1 copies them out
    host = s.gpus_per_node * (12 * P * shard + (2 * P if s.ref and not s.ref_on_gpu else 0)
                              + (vllm_weights if s.sleep_level == 1 else 0))
    return {"parts": parts, "train_peak": train_peak, "rollout_peak": (1 - ROLLOUT_FREE) * gpu,
            "kv_cache": kv_cache, "kv_tokens": max(0.0, kv_cache / kv_per_token),
            "concurrent_seqs": max(0.0, kv_cache / kv_per_token / s.max_len), "host": host, "gpu": gpu}


def plan_fits(plan, host_bytes, max_len):
    """Why a plan does not fit (a short phrase), or None: the update must stay within PLAN_FILL of
    the GPU, the KV cache must hold one full-length sequence, the host its share of the state."""
    if plan["train_peak"] > PLAN_FILL * plan["gpu"]:
        return (f"the update would need {plan['train_peak'] / GIB:.1f} GiB, more than {PLAN_FILL:.0%} of "
                f"{plan['gpu'] / GIB:.1f} GiB")
    if plan["kv_tokens"] < max_len:
        return f"vLLM's KV cache would hold {plan['kv_tokens']:.0f} tokens, less than one {max_len}-token sequence"
    if host_bytes and plan["host"] > 0.9 * host_bytes:
        return f"host memory would hold {plan['host'] / GIB:.0f} of {host_bytes / GIB:.0f} GiB"
    return None


def plan_and_pick_defaults(args, cfg, dp, gpu_bytes, host_bytes=None, suggest=True):
    """Fill the memory flags the user left unset with the fastest settings that fit, by
    memory_plan; UserError naming a change that fits when none does. Preference, fastest first:
    no recompute, fp32 gradients, Adam moments on the GPU, big micro batches; then each lever in
    turn (bf16 gradients and recompute before moving the moments, which costs most)."""
    import itertools
    import types
    gpu_bytes = args.gpu_gib * GIB if args.gpu_gib else gpu_bytes
    if args.host_gib:
        host_bytes = args.host_gib * GIB
    elif host_bytes is None:
        host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    world = args.tp * args.pp * dp
    fixed = {"micro_batch_tokens": args.micro_batch_tokens, "recompute": args.recompute,
             "grad_reduce_dtype": args.grad_reduce_dtype, "adam_moments": args.adam_moments,
             "logits_chunk_tokens": args.logits_chunk_tokens}
    mbts = [t for t in (16384, 8192, 4096) if t >= args.max_len] or [args.max_len]
    # whole logits (0) skip the chunks' recompute of the output layer: the 0.5B benchmark's update
    # took 16% less time (its output layer holds a quarter of its weights); 2048-token chunks
    # where the whole logits do not fit
    choices = itertools.product(["gpu", "host"], ["fp32", "bf16"], ["none", "full"], mbts, [0, 2048])
    base = dict(ref=args.kl_coef > 0 or args.kl_log_interval > 0,
                ref_on_gpu=args.ref_on_gpu, sleep_level=args.sleep_level, max_len=args.max_len,
                max_num_seqs=args.max_num_seqs, distributed_optimizer=args.distributed_optimizer,
                gpus_per_node=min(world, int(os.environ.get("LOCAL_WORLD_SIZE", world))), gpu_bytes=gpu_bytes)
    closest = None
    for moments, grads, recompute, mbt, chunk in choices:
        s = dict(micro_batch_tokens=mbt, recompute=recompute, grad_reduce_dtype=grads, adam_moments=moments,
                 logits_chunk_tokens=chunk)
        s.update({k: v for k, v in fixed.items() if v is not None})
        plan = memory_plan(cfg, args.tp, args.pp, dp, types.SimpleNamespace(**base, **s))
        plan["settings"] = s
        if plan_fits(plan, host_bytes, args.max_len) is None:
            for k, v in s.items():
                setattr(args, k, v)
            return plan
        if closest is None or plan["train_peak"] < closest["train_peak"]:
            closest = plan
    fix = suggest_layout(args, cfg, gpu_bytes, host_bytes) if suggest else ""
    why = plan_fits(closest, host_bytes, args.max_len)
    raise UserError(f"TP {args.tp} x PP {args.pp} does not fit with any memory setting ({why} even with "
                    f"{' '.join(f'{k}={v}' for k, v in closest['settings'].items())}){': ' + fix if fix else ''}")


def suggest_layout(args, cfg, gpu_bytes, host_bytes):
    """The change to name when nothing fits: the smallest TP x PP that fits on these GPUs."""
    import copy
    for tp, pp in sorted(((t, p) for t in (1, 2, 4, 8) for p in (1, 2, 4, 8)), key=lambda x: (x[0] * x[1], x[1])):
        if tp * pp <= args.tp * args.pp:
            continue
        try:
            convert.check_parallel_sizes(cfg, tp, pp)
        except UserError:
            continue
        a = copy.copy(args)
        a.tp, a.pp = tp, pp
        try:
            plan_and_pick_defaults(a, cfg, 1, gpu_bytes, host_bytes, suggest=False)
        except UserError:
            continue
        nodes = -(-tp * pp // 8)
        return (f"use --tp {tp} --pp {pp} ({tp * pp} GPUs per model copy"
                + (f", {nodes} nodes of 8" if nodes > 1 else "") + "), or GPUs with more memory")
    return "use GPUs with more memory"


def format_memory_plan(plan):
    """The plan as printed at start."""
    p, s = plan["parts"], plan["settings"]
    lines = ["memory plan per GPU (GiB): " + "  ".join(f"{k} {v / GIB:.1f}" for k, v in p.items()),
             f"  update peak {plan['train_peak'] / GIB:.1f} of {plan['gpu'] / GIB:.1f};  rollout: vLLM KV cache "
             f"{plan['kv_cache'] / GIB:.1f} GiB = {plan['kv_tokens']:,.0f} tokens = {plan['concurrent_seqs']:.0f} "
             f"full-length sequences at once;  host memory per node {plan['host'] / GIB:.1f}",
             "  settings: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in s.items())]
    return "\n".join(lines)


def print_memory_plan(args):
    """--memory-plan SIZE: the plan of a layout, on any machine (no GPU needed)."""
    cfg = convert.qwen_config(args.memory_plan)
    convert.check_parallel_sizes(cfg, args.tp, args.pp)
    world = args.world_size or args.tp * args.pp
    if world % (args.tp * args.pp):
        raise UserError(f"--world-size {world} cannot be split into TP={args.tp} x PP={args.pp} groups")
    if not args.gpu_gib:
        raise UserError("--memory-plan needs --gpu-gib (the memory of one GPU)")
    plan = plan_and_pick_defaults(args, cfg, world // (args.tp * args.pp), None, host_bytes=0)
    print(f"Qwen2.5-{args.memory_plan}, TP {args.tp} x PP {args.pp} x DP {world // (args.tp * args.pp)}, "
          f"{args.gpu_gib:g} GiB GPUs")
    print(format_memory_plan(plan))

def add_arguments(p):
    """The memory flags, on grpo.py's parser: what --help lists, each picked by the plan when unset."""
    g = p.add_argument_group("memory (defaults: picked by the memory plan printed at start)")
    g.add_argument("--micro-batch-tokens", type=int, default=None, help="tokens (rows x padded length) per micro batch")
    g.add_argument("--logits-chunk-tokens", type=int, default=None,
                   help="tokens per chunk of the output layer + log-prob (0: the whole micro batch at once; "
                        "the plan picks 0 where the whole logits fit, else 2048)")
    g.add_argument("--recompute", choices=("none", "full"), default=None,
                   help="activation recompute: full = keep only each layer's input, recompute in the backward")
    g.add_argument("--grad-reduce-dtype", choices=("fp32", "bf16"), default=None, help="gradient buffer dtype")
    g.add_argument("--adam-moments", choices=("gpu", "host"), default=None,
                   help="host: Adam's moments stay in host memory and visit the GPU one tensor at a time in the step "
                        "(see stream_adam_moments)")
    g.add_argument("--ref-on-gpu", action="store_true",
                   help="keep the reference model on the GPU (default: in host memory between its forwards)")
    g.add_argument("--gpu-gib", type=float, default=None, help="GPU memory to plan for (default: the GPU's)")
    g.add_argument("--host-gib", type=float, default=None,
                   help="host memory per node to plan for (default: this machine's; --memory-plan: not checked)")
    g.add_argument("--memory-plan", choices=list(convert.QWEN25), default=None,
                   help="print the memory plan of this Qwen2.5 size for --tp/--pp/--world-size/--gpu-gib and exit")
    g.add_argument("--world-size", type=int, default=None, help="GPUs in the job, for --memory-plan")


def check_device_flags(a):
    """--device cpu refuses, in one line, the flags that only size or move GPU memory: on the CPU
    they would do nothing, and a user who sets one expects it to act."""
    if a.device == "cpu" and not a.memory_plan:
        given = {"--gpu-memory-utilization": a.gpu_memory_utilization is not None,
                 "--sleep-level": a.sleep_level is not None, "--gpu-gib": a.gpu_gib is not None,
                 "--host-gib": a.host_gib is not None, "--ref-on-gpu": a.ref_on_gpu,
                 "--adam-moments host": a.adam_moments == "host", "--grad-reduce-dtype bf16": a.grad_reduce_dtype == "bf16",
                 "--recompute full": a.recompute == "full",
                 "--benchmark": a.benchmark is not None}
        for flag, on in given.items():
            if on:
                raise UserError(f"{flag} sizes or moves GPU memory (or times GPUs) and has no meaning with --device cpu; "
                                "leave it out")
    if a.sleep_level is None:
        a.sleep_level = 2


# The memory flags on the CPU, where no plan picks them: the fastest settings (a GPU with room to
# spare gets the same from the plan). The others (--adam-moments host, bf16 gradients) only save
# GPU memory.
CPU_MEMORY_SETTINGS = {"micro_batch_tokens": 8192, "logits_chunk_tokens": 0, "recompute": "none",
                       "grad_reduce_dtype": "fp32", "adam_moments": "gpu"}


# ==============================================================================================
# The levers: recompute, and Adam's moments in host memory
# ==============================================================================================
def recompute_settings(recompute):
    """TransformerConfig fields for --recompute. "full": every layer keeps only its input and
    recomputes its forward during the backward (one layer per checkpoint): activations shrink
    from tens of KB per token and layer to the hidden state alone, for about one extra forward
    (a third more compute in the update)."""
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return {}


def stream_adam_moments(optimizer):
    """--adam-moments host: Adam's two moments (8 of the 12 bytes per parameter of optimizer state)
    live in pinned host memory for good and visit the GPU one tensor at a time, during that
    tensor's own update in optimizer.step(). The step then needs the fp32 master weights on the
    GPU and the moments of a few tensors: the lever for models whose weights, gradients and
    optimizer state alone nearly fill a GPU (Qwen2.5-7B on one 141 GB GPU).

    Megatron's own HybridDeviceOptimizer, which runs Adam on the CPU instead, needs Transformer
    Engine's precision-aware optimizer in megatron-core 0.16.1, which this project does without.
    Here the inner torch AdamW steps one tensor at a time (its param_groups narrowed to that
    tensor, its state shared) and streamed_adam_step moves the moments around each call.

    The host buffers are allocated and page-locked here, once, before the first step: pinning
    fresh memory makes the kernel fault in and lock every page (tens of seconds for 7B's 61 GB),
    which would otherwise land in the first update's time."""
    for inner in torch_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                for k in MOMENTS:
                    setattr(p, "_host_" + k, pinned_empty(p.shape, p.dtype))
        inner.step = functools.partial(streamed_adam_step, inner, inner.step)


MOMENTS = ("exp_avg", "exp_avg_sq")


def streamed_adam_step(inner, adam_step, closure=None):
    """AdamW one tensor at a time, its moments brought from host memory just before and sent back
    just after, on two copy streams of their own, so that the PCIe trip (16 bytes per parameter,
    both ways) runs while the GPU computes and in both directions at once:

        up stream (host -> GPU):   in 1   in 2   in 3 ...
        compute stream:                 step 1  step 2  step 3 ...
        down stream (GPU -> host):              out 1   out 2  ...

    Events order the three streams: a step waits for its moments' arrival (an event recorded on
    the up stream), a return trip waits for its step. record_stream tells PyTorch's caching
    allocator which streams use a tensor, so that its memory is reused only after all of them are
    done with it. And the CPU, which would otherwise queue every tensor's trip at once (and
    allocate all the moments on the GPU), waits before it asks for tensor i + 1's moments until
    tensor i - 1's are home, and tensor i's too when the two would not fit in the room of the
    biggest tensor's moments: the GPU holds no more of the moments than the biggest tensor's
    (8 bytes per parameter of the embedding), while it works through what is queued.
    For the copies to be asynchronous, the host buffers must be page-locked: pinned_empty
    registers them with CUDA, and torch then treats them as pinned (is_pinned() is True)."""
    compute = torch.cuda.current_stream()
    up, down = _copy_streams()
    todo = [(group, p) for group in inner.param_groups for p in group["params"] if p.grad is not None]
    arrived, home = [None] * len(todo), [None] * len(todo)

    def bring_in(i):
        state = inner.state[todo[i][1]]
        for k in MOMENTS:
            if k in state and not state[k].is_cuda:           # absent before the first step
                with torch.cuda.stream(up):                   # the GPU copy is allocated and filled on `up`
                    gpu = state[k].to(compute.device, non_blocking=True)
                gpu.record_stream(compute)                    # its memory is reused only when the step is done too
                state[k] = gpu
        arrived[i] = up.record_event()

    def send_home(i):
        p = todo[i][1]
        state = inner.state[p]
        down.wait_stream(compute)                             # after this tensor's step
        for k in MOMENTS:
            gpu, host = state[k], getattr(p, "_host_" + k)
            with torch.cuda.stream(down):
                host.copy_(gpu, non_blocking=True)
            gpu.record_stream(down)                           # not reused before the copy has read it
            state[k] = host
        home[i] = down.record_event()

    room = max((p.numel() for _, p in todo), default=0)  # the biggest tensor's moments: all the GPU holds of them
    groups = inner.param_groups
    try:
        if todo:
            bring_in(0)
        for i, (group, p) in enumerate(todo):
            compute.wait_event(arrived[i])
            inner.param_groups = [dict(group, params=[p])]
            adam_step()
            send_home(i)
            if i + 1 < len(todo):
                if i >= 1:
                    home[i - 1].synchronize()
                if p.numel() + todo[i + 1][1].numel() > room:
                    home[i].synchronize()                 # no room for both: the next waits
                bring_in(i + 1)
    finally:
        inner.param_groups = groups
    torch.cuda.synchronize()             # the moments are home before anyone reads them


@functools.cache
def _copy_streams():
    """The two side streams of streamed_adam_step, made once."""
    return torch.cuda.Stream(), torch.cuda.Stream()


# ==============================================================================================
# Moving state between the GPU and pinned host memory (the choreography of grpo.py's steps)
# ==============================================================================================
def pinned_empty(shape, dtype):
    """A page-locked host tensor of exactly this size, which PCIe copies fill at full speed and
    without blocking. torch.empty(..., pin_memory=True) would round every allocation up to a power
    of two (PyTorch's caching host allocator), nearly doubling the host memory of a big model's
    optimizer state (seen: Qwen2.5-7B's killed a 128 GiB host); an ordinary allocation registered
    with CUDA is page-locked at its own size. These buffers live as long as the run."""
    t = torch.empty(shape, dtype=dtype)
    if t.numel():
        err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
        if err:
            raise RuntimeError(f"cudaHostRegister failed with CUDA error {err}")
    return t


def on_gpu(model):
    """Whether the model's tensors are on a GPU: on the CPU there is no memory to hand over, and
    the offloads and restores below return at once."""
    return next(model.parameters()).is_cuda


def torch_optimizers(optimizer):
    """The torch Adam instances inside Megatron's (chained) optimizer wrapper."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "optimizer", None) is not None:
            yield opt.optimizer


def optimizer_tensors(optimizer):
    """Every tensor the Megatron optimizer owns on the GPU: fp32 master weights and the Adam
    moments (12 bytes per parameter, sharded over DP with the distributed optimizer)."""
    for inner in torch_optimizers(optimizer):
        for group in inner.param_groups:
            yield from group["params"]
        for state in inner.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v))


def offload_trainer(model, optimizer):
    """Grads freed, optimizer state to CPU; the bf16 params stay (vLLM's weights come from them).

    Megatron-Core's own optimizer.offload_to_cpu() copies each tensor into fresh pageable
    memory, every step. Here every tensor gets one pinned host buffer, allocated once and
    reused, which PCIe fills at full speed; the tensor objects stay the same (only .data
    moves), so the optimizer never notices."""
    if not on_gpu(model):
        return
    optimizer.zero_grad()                        # the fp32 gradient copies of bf16 grad buffers
    model.offload_grad_buffers()                 # grads are recomputed: free, do not copy
    offload_optimizer(optimizer)
    torch.cuda.empty_cache()                     # hand the freed pages to vLLM's wake-up


def offload_optimizer(optimizer):
    """The optimizer state to its pinned host buffers (see offload_trainer)."""
    if not torch.cuda.is_available():
        return
    moved = []
    for t in optimizer_tensors(optimizer):
        if t.is_cuda:
            buf = getattr(t, "_host", None)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = t._host = pinned_empty(t.shape, t.dtype)
            buf.copy_(t.data, non_blocking=True)
            moved.append(t)
    torch.cuda.synchronize()                     # copies done before the GPU memory is reused
    for t in moved:
        t.data = t._host


def restore_grads(model):
    if on_gpu(model):
        model.restore_grad_buffers()                 # reallocates, zeroes and synchronizes


def restore_optimizer(optimizer):
    for t in optimizer_tensors(optimizer):
        if not t.is_cuda and getattr(t, "_host", None) is not None:
            t.data = t.data.to("cuda", non_blocking=True)


def offload_reference(ref):
    """Move the frozen reference model to pinned host memory between its uses (it is needed once
    every --kl-log-interval steps, or once per step with --kl-coef > 0, and would otherwise hold
    2 bytes per parameter of GPU memory through every rollout)."""
    if not on_gpu(ref):
        return
    for p in ref.parameters():
        if p.is_cuda and getattr(p, "_host", None) is None:     # frozen: copied out once
            p._host = pinned_empty(p.shape, p.dtype)
            p._host.copy_(p.data, non_blocking=True)
    torch.cuda.synchronize()
    for p in ref.parameters():
        p.data = p._host


def restore_reference(ref):
    for p in ref.parameters():
        if not p.is_cuda and getattr(p, "_host", None) is not None:   # offloaded (never on the CPU)
            p.data = p.data.to("cuda", non_blocking=True)


def gpu_used():
    free, total = torch.cuda.mem_get_info()
    return total - free


# ==============================================================================================
# The out-of-memory hint: the flags that lower each phase's GPU memory
# ==============================================================================================
# The knobs that lower each phase's GPU memory (grpo.phase names them), for the one-line hint.
MEMORY_KNOBS = {
    "start vLLM": "lower --gpu-memory-utilization or --max-num-seqs, or use a larger --tp",
    "rollout": "lower --max-num-seqs or --max-len",
    "wake": "lower --gpu-memory-utilization; add --adam-moments host",
    "sync": "lower --gpu-memory-utilization; add --adam-moments host",
    "ref_logp": "lower --micro-batch-tokens or --logits-chunk-tokens",
    "old_logp": "lower --micro-batch-tokens or --logits-chunk-tokens",
    "update": "lower --micro-batch-tokens or --logits-chunk-tokens, add --recompute full, "
              "--grad-reduce-dtype bf16 or --adam-moments host, or use a larger --tp / --pp",
    "evaluation": "lower --eval-prompts or --max-num-seqs",
}


def out_of_memory_hint(e, phase):
    """A UserError naming the phase and its knobs if `e` is a GPU out-of-memory failure, else None."""
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in text.lower() or "less than desired GPU memory" in text:
        knobs = MEMORY_KNOBS.get(phase, "see the memory plan printed at start")
        return UserError(f"GPU out of memory in phase '{phase}'; {knobs} ({text.splitlines()[0][:160]})")
    return None
