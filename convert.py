"""Step 2 of the pipeline: Qwen2.5 checkpoints HF <-> Megatron-Core (0.5B ... 72B).

Same positional arguments as the reference pipeline's hf2mcore_qwen2.5_convertor.sh:

    python convert.py MODEL_SIZE LOAD_DIR SAVE_DIR MG2HF USE_CUDA PR [HF_DIR]

    # HF -> Megatron-Core, one process
    python convert.py 7B Qwen2.5-7B-Instruct Qwen2.5-7B-Instruct-mcore false true bf16
    # Megatron-Core -> HF (HF_DIR gives config.json and the tokenizer to copy)
    python convert.py 7B Qwen2.5-7B-Instruct-mcore Qwen2.5-7B-hf-out true true bf16 Qwen2.5-7B-Instruct
    # big models: shard the conversion over GPUs; every rank reads only its own slices
    torchrun --nproc_per_node 8 convert.py 72B Qwen2.5-72B-Instruct q72-mcore false true bf16 --tp 8
    # on a host without GPUs: USE_CUDA=false, in CPU memory (processes talk through gloo)
    python convert.py 7B Qwen2.5-7B-Instruct Qwen2.5-7B-Instruct-mcore false false bf16
    torchrun --nproc_per_node 2 convert.py 7B Qwen2.5-7B-mcore Qwen2.5-7B-hf-out true false bf16 Qwen2.5-7B-Instruct --pp 2

MODEL_SIZE is one of 0.5B 1.5B 3B 7B 14B 32B 72B (checked against config.json), or `custom` to
take any Qwen2-shaped config.json as it is. The Megatron side is a `megatron.core.dist_checkpointing`
checkpoint: its tensors are stored unsharded, so one written at TP1/PP1 loads at TP4/PP2 and
back. Next to it we write `model_config.json` (the shape) so later steps can check it.

Megatron -> HF writes the weights, a config.json with the dtype written and one RoPE base, and
every other file of HF_DIR as it is (tokenizer, chat template, generation config).
SAVE_DIR is written under SAVE_DIR.tmp, then renamed; it may not be, contain or sit inside
LOAD_DIR or HF_DIR, --force or not.

The mapping (`hf_to_mcore`, `mcore_to_hf`, `tp_shard`, `tp_gather`) is the teaching core of this
file, and grpo.py imports it to stream trained weights into vLLM: there is one copy of it.
"""
import argparse
import json
import os
import re
import shutil
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F

from prepare import UserError, die, one_line_errors  # noqa: F401 (UserError: convert.UserError)

# megatron-core warns at import that Transformer Engine and Apex are missing: we build on its
# local (pure PyTorch) spec on purpose, so the warnings say nothing to our users.
warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex|apex).*")

# The seven Qwen2.5 shapes, from their HF config.json files. vocab_size is the embedding's row
# count (151936 / 152064), larger than the tokenizer's 151665 ids; the extra rows are padding.
# Models up to 3B tie the output layer to the embedding; 7B and up have their own lm_head.
QWEN25 = {
    #        layers hidden  ffn    heads kv  vocab   tied   rms_eps
    "0.5B": (24,    896,    4864,  14,   2,  151936, True,  1e-6),
    "1.5B": (28,    1536,   8960,  12,   2,  151936, True,  1e-6),
    "3B":   (36,    2048,   11008, 16,   2,  151936, True,  1e-6),
    "7B":   (28,    3584,   18944, 28,   4,  152064, False, 1e-6),
    "14B":  (48,    5120,   13824, 40,   8,  152064, False, 1e-5),
    "32B":  (64,    5120,   27648, 40,   8,  152064, False, 1e-5),
    "72B":  (80,    8192,   29568, 64,   8,  152064, False, 1e-5),
}
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings")


# The RoPE base transformers' Qwen2Config takes when config.json names none
# (RotaryEmbeddingConfigMixin.default_theta in transformers 5.24; Qwen2Config(rope_theta=10000.0)
# in transformers 4). vLLM reads config.json through transformers, so our Megatron build must fall
# back to the same number, not to Qwen2.5's 1e6: otherwise the two engines run different models.
DEFAULT_ROPE_THETA = 10000.0


def qwen_config(size):
    """The HF-style config dict of a Qwen2.5 size from the table."""
    layers, hidden, ffn, heads, kv, vocab, tied, eps = QWEN25[size]
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": layers,
            "hidden_size": hidden, "intermediate_size": ffn, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": vocab, "tie_word_embeddings": tied, "rms_norm_eps": eps,
            "rope_theta": 1000000.0, "max_position_embeddings": 32768, "hidden_act": "silu"}


def rope_theta(cfg, path):
    """The RoPE base of an HF Qwen2 config dict, read as transformers reads it.

    transformers 4 writes a top-level `rope_theta` (and `rope_scaling`, null or a dict); transformers
    5 writes `rope_parameters: {rope_theta, rope_type}` and no top-level key, and still reads both.
    Our GPTModel (position_embedding_type="rope", rotary_base) computes plain RoPE only, so any
    other rope type (yarn, linear, dynamic, llama3, longrope, ...) or extra parameter is refused:
    vLLM would scale the frequencies and Megatron would not. Two different bases are refused too,
    since which one wins depends on the reader (transformers 5 prefers the nested one).
    Example: {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}} -> 10000.0
    """
    bases = {}
    if cfg.get("rope_theta") is not None:
        bases["rope_theta"] = cfg["rope_theta"]
    for key in ("rope_parameters", "rope_scaling"):
        rope = cfg.get(key)
        if not rope:                  # null or {}: transformers ignores it too
            continue
        if not isinstance(rope, dict):
            raise UserError(f"{path}: {key} must be a JSON object, not {json.dumps(rope)}")
        kinds = {rope.get("rope_type", "default"), rope.get("type", "default")}
        if kinds != {"default"} or set(rope) - {"rope_type", "type", "rope_theta"}:
            raise UserError(f"{path}: {key} {json.dumps(rope)} is a RoPE variant our Megatron build does not "
                            f"reproduce (only plain RoPE: rope_type default with a rope_theta)")
        if rope.get("rope_theta") is not None:
            bases[f"{key}.rope_theta"] = rope["rope_theta"]
    for key, v in bases.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise UserError(f"{path}: {key} must be a positive number, not {json.dumps(v)}")
    if len({float(v) for v in bases.values()}) > 1:
        raise UserError(f"{path} names two RoPE bases ({', '.join(f'{k}={v}' for k, v in bases.items())}); "
                        f"keep one")
    return float(next(iter(bases.values()))) if bases else DEFAULT_ROPE_THETA


def check_same_model_as_transformers(cfg, path):
    """UserError for Qwen2 config fields that transformers (and vLLM, which reads config.json through
    it) honour and our Megatron build (causal full attention, SwiGLU with silu, head dim =
    hidden/heads) does not: the two engines would run different models, and the trainer's
    vLLM-vs-Megatron log-probs would disagree for a reason no one sees.

    Not checked, because it changes nothing: `attention_bias`. Qwen2 in transformers 5.24 and in vLLM
    hard-codes bias=True on q/k/v and ignores the key; whether the biases exist is checked tensor by
    tensor against the checkpoint (check_hf_tensors).
    """
    if cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"{path}: hidden_act={cfg['hidden_act']}; our Megatron build computes SwiGLU with silu only")
    heads_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    if cfg.get("head_dim") is not None and cfg["head_dim"] != heads_dim:
        # transformers takes head_dim from the config; Megatron (kv_channels) and older vLLM
        # releases take hidden_size / num_attention_heads
        raise UserError(f"{path}: head_dim={cfg['head_dim']} differs from hidden_size/num_attention_heads="
                        f"{heads_dim}; our Megatron build supports only the latter")
    if cfg.get("is_causal") is False:
        # vLLM turns a Qwen2 with is_causal=false into a bidirectional (embedding) model
        raise UserError(f"{path}: is_causal=false (a bidirectional embedding model); GRPO needs a causal LM")
    if cfg.get("use_sliding_window"):
        # transformers: layers from max_window_layers on (or those layer_types names "sliding_attention")
        # see only the last sliding_window tokens; Megatron attends to all. A window at least as long
        # as any sequence the model takes (max_position_embeddings) is the same as no window.
        window = cfg.get("sliding_window", 4096)
        sliding = (cfg.get("max_window_layers", 28) < cfg["num_hidden_layers"]
                   or "sliding_attention" in (cfg.get("layer_types") or []))
        if sliding and window is not None and window < cfg["max_position_embeddings"]:
            raise UserError(f"{path}: use_sliding_window=true with sliding_window={window} < max_position_embeddings="
                            f"{cfg['max_position_embeddings']}; our Megatron build has no sliding-window attention "
                            f"(set use_sliding_window to false if the model was trained without it)")


def resolve_config(model_size, config_json_path):
    """The model config: config.json checked against MODEL_SIZE's row of the table and against
    what our Megatron build reproduces, with the defaults transformers would take filled in.

    A mismatch is an error, not a warning: loading 7B weights into a 14B-shaped model would fail
    later with an opaque shape error, or worse, succeed on a tied/untied mix-up.
    The result names its RoPE base once, as a top-level `rope_theta` (what transformers 4 and 5
    both read): it is written as model_config.json and, by write_hf, as the export's config.json,
    where a second copy under `rope_parameters` could disagree with it.
    """
    if not os.path.isfile(config_json_path):
        raise UserError(f"{config_json_path} not found; it must be an HF Qwen2 config.json")
    with open(config_json_path) as f:
        cfg = json.load(f)
    missing = [k for k in SHAPE_KEYS if k not in cfg and k != "tie_word_embeddings"]
    if missing:
        raise UserError(f"{config_json_path} lacks {', '.join(missing)}; is it a Qwen2 config?")
    # the defaults of transformers' Qwen2Config, which vLLM gets for a key config.json leaves out
    cfg.setdefault("tie_word_embeddings", False)
    cfg.setdefault("rms_norm_eps", 1e-6)
    cfg.setdefault("max_position_embeddings", 32768)
    cfg["rope_theta"] = rope_theta(cfg, config_json_path)
    cfg.pop("rope_parameters", None)
    cfg.pop("rope_scaling", None)
    check_same_model_as_transformers(cfg, config_json_path)
    if model_size != "custom":
        if model_size not in QWEN25:
            raise UserError(f"MODEL_SIZE {model_size} unknown; use one of {' '.join(QWEN25)} or custom")
        want = qwen_config(model_size)
        diff = [f"{k}={cfg[k]} (expected {want[k]})" for k in SHAPE_KEYS if cfg[k] != want[k]]
        if diff:
            raise UserError(f"checkpoint is not Qwen2.5-{model_size}: {', '.join(diff)}")
    return cfg


def head_dim(cfg):
    return cfg["hidden_size"] // cfg["num_attention_heads"]


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------
def sdpa_core_attention_class():
    """megatron-core's local-spec attention, with the math done by torch's fused SDPA kernel.

    The local spec's DotProductAttention materialises the [b, heads, s, s] score matrix and runs
    an unfused softmax, and keeps that matrix for the backward: it trained 0.5B at about half
    the speed of this module on an H100. Our batches are right-padded and causal, so the causal kernel alone is the right
    mask: pad tokens sit after every real token and no real token attends to them. That is why
    this module ignores `attention_mask`.
    """
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class SDPAttention(DotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            assert packed_seq_params is None and attention_bias is None
            # megatron: [s, b, heads, d] -> torch SDPA: [b, heads, s, d]
            q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
            s, b = query.shape[0], query.shape[1]
            return out.permute(2, 0, 1, 3).reshape(s, b, -1)  # [s, b, heads * d]

    return SDPAttention


def transformer_config(cfg, dtype, tp=1, pp=1, use_cpu_initialization=False, perform_initialization=True, **extra):
    """megatron-core TransformerConfig of a Qwen2 shape: RMSNorm, SwiGLU, RoPE, bias on qkv only."""
    if extra.get("variable_seq_lengths"):
        # megatron-core 0.16.1 rejects variable_seq_lengths (needed by PP > 1 with our trimmed
        # micro batches) next to its default MoE token dispatcher "allgather", even for a dense
        # model that has no MoE layer at all: name the other dispatcher to pass that check.
        extra.setdefault("moe_token_dispatcher_type", "alltoall")
    from megatron.core.transformer import TransformerConfig
    return TransformerConfig(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"], num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg["num_key_value_heads"], kv_channels=head_dim(cfg),
        normalization="RMSNorm", layernorm_epsilon=cfg["rms_norm_eps"],
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        pipeline_dtype=dtype, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        use_cpu_initialization=use_cpu_initialization, perform_initialization=perform_initialization,
        **extra)


def build_model(cfg, config):
    """GPTModel for this rank's pipeline stage, with the local (no Transformer Engine) spec."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = sdpa_core_attention_class()
    model = GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=cfg["vocab_size"],
        max_sequence_length=cfg["max_position_embeddings"],
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=cfg["tie_word_embeddings"],
        position_embedding_type="rope", rotary_base=cfg["rope_theta"])
    # The local spec's RMSNorm ignores params_dtype and keeps fp32 weights. One dtype for every
    # weight, as HF's and vLLM's bf16 models have (Megatron-LM gets it from its Float16Module):
    # the same numbers on both sides of the weight sync, and megatron-core 0.16's distributed
    # optimizer checkpoints pair optimizer state with the wrong parameter when one param group
    # mixes fp32 and bf16 params (seen: a 256-element state for a 512-element qkv bias).
    for p in model.parameters():
        p.data = p.data.to(config.params_dtype)
    return model


def check_parallel_sizes(cfg, tp, pp):
    """Megatron shards heads, query groups, vocab and ffn over TP, and layers over PP."""
    for what, n in (("num_attention_heads", cfg["num_attention_heads"]),
                    ("num_key_value_heads", cfg["num_key_value_heads"]),
                    ("vocab_size", cfg["vocab_size"]), ("intermediate_size", cfg["intermediate_size"])):
        if n % tp:
            raise UserError(f"TP={tp} does not divide {what}={n}; choose a TP that divides it")
    if cfg["num_hidden_layers"] % pp:
        raise UserError(f"PP={pp} does not divide num_hidden_layers={cfg['num_hidden_layers']}")


# ----------------------------------------------------------------------------------------------
# The mapping: one HF Qwen2 tensor set <-> one Megatron-Core GPTModel tensor set
# ----------------------------------------------------------------------------------------------
# Names that map one to one (layer index {i} is global).
RENAMES = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
    "decoder.layers.{i}.input_layernorm.weight": "model.layers.{i}.input_layernorm.weight",
    "decoder.layers.{i}.self_attention.linear_proj.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "decoder.layers.{i}.pre_mlp_layernorm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "decoder.layers.{i}.mlp.linear_fc2.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# Megatron fuses several HF matrices into one (so one GEMM does the work of three or two).
FUSED = {
    "decoder.layers.{i}.self_attention.linear_qkv.weight": ["model.layers.{i}.self_attn.q_proj.weight",
                                                            "model.layers.{i}.self_attn.k_proj.weight",
                                                            "model.layers.{i}.self_attn.v_proj.weight"],
    "decoder.layers.{i}.self_attention.linear_qkv.bias": ["model.layers.{i}.self_attn.q_proj.bias",
                                                          "model.layers.{i}.self_attn.k_proj.bias",
                                                          "model.layers.{i}.self_attn.v_proj.bias"],
    "decoder.layers.{i}.mlp.linear_fc1.weight": ["model.layers.{i}.mlp.gate_proj.weight",
                                                 "model.layers.{i}.mlp.up_proj.weight"],
}
# How TP splits each tensor: column-parallel layers split their output rows (dim 0), row-parallel
# ones their input columns (dim 1); norms are replicated on every TP rank.
TP_DIM = {"linear_qkv.weight": 0, "linear_qkv.bias": 0, "linear_fc1.weight": 0, "word_embeddings.weight": 0,
          "output_layer.weight": 0, "linear_proj.weight": 1, "linear_fc2.weight": 1}


def _template(name):
    """'decoder.layers.7.mlp.linear_fc2.weight' -> ('decoder.layers.{i}.mlp.linear_fc2.weight', 7)."""
    m = re.match(r"(decoder\.layers\.|model\.layers\.)(\d+)\.(.*)", name)
    if m:
        return m.group(1) + "{i}." + m.group(3), int(m.group(2))
    return name, None


def qkv_to_mcore(q, k, v, cfg):
    """Fuse HF q/k/v projections into Megatron's linear_qkv, laid out per query group.

    With G query groups (= KV heads) and H/G query heads per group, the rows are

        [ q heads of group 0 | k of group 0 | v of group 0 | q heads of group 1 | k 1 | v 1 | ... ]

    not [all q | all k | all v]. Grouping rows this way lets TP cut the matrix into contiguous
    row blocks, each holding whole groups with their own k and v: a TP rank computes attention
    for its groups with no communication. (So TP must divide G: 2 for Qwen2.5 <= 3B.)

    Shapes: q [H*d, hidden], k and v [G*d, hidden] (or [H*d], [G*d] for the biases)
            -> [G*(H/G + 2)*d, hidden].
    Example: 0.5B has H=14, G=2, d=64: rows 0..447 are group 0's 7 q heads, 448..511 its k,
    512..575 its v, then group 1 from row 576; 1152 rows in all.
    """
    G, d = cfg["num_key_value_heads"], head_dim(cfg)
    rest = q.shape[1:]
    q = q.reshape(G, -1, *rest)            # [G, H/G*d, ...]
    k = k.reshape(G, d, *rest)             # [G, d, ...]
    v = v.reshape(G, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def qkv_from_mcore(qkv, cfg):
    """Inverse of qkv_to_mcore: split linear_qkv back into HF (q, k, v)."""
    G, d, H = cfg["num_key_value_heads"], head_dim(cfg), cfg["num_attention_heads"]
    rest = qkv.shape[1:]
    x = qkv.reshape(G, (H // G + 2) * d, *rest)
    q, k, v = x.split([H // G * d, d, d], dim=1)
    return q.reshape(H * d, *rest), k.reshape(G * d, *rest), v.reshape(G * d, *rest)


def mcore_names(cfg):
    """Every tensor name of the full (unsharded, all stages) Megatron model, in model order."""
    layer = ["decoder.layers.{i}.input_layernorm.weight", "decoder.layers.{i}.self_attention.linear_qkv.weight",
             "decoder.layers.{i}.self_attention.linear_qkv.bias", "decoder.layers.{i}.self_attention.linear_proj.weight",
             "decoder.layers.{i}.pre_mlp_layernorm.weight", "decoder.layers.{i}.mlp.linear_fc1.weight",
             "decoder.layers.{i}.mlp.linear_fc2.weight"]
    names = ["embedding.word_embeddings.weight"]
    names += [t.format(i=i) for i in range(cfg["num_hidden_layers"]) for t in layer]
    names += ["decoder.final_layernorm.weight"]
    if not cfg["tie_word_embeddings"]:
        names += ["output_layer.weight"]   # tied: the output layer *is* the embedding; nothing to map
    return names


def hf_names(cfg):
    """Every tensor name the HF checkpoint of this shape must hold (and no other)."""
    out = []
    for name in mcore_names(cfg):
        t, i = _template(name)
        out += [n.format(i=i) for n in FUSED[t]] if t in FUSED else [RENAMES[t].format(i=i)]
    return out


def mcore_shape(name, cfg):
    """Full (TP-gathered) shape of a Megatron tensor, known from the config alone, so a pipeline
    stage can receive a tensor it does not own without asking for its shape first."""
    h, f, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim(cfg)
    t, _ = _template(name)
    return {"embedding.word_embeddings.weight": (V, h), "output_layer.weight": (V, h),
            "decoder.final_layernorm.weight": (h,), "decoder.layers.{i}.input_layernorm.weight": (h,),
            "decoder.layers.{i}.pre_mlp_layernorm.weight": (h,),
            "decoder.layers.{i}.self_attention.linear_qkv.weight": (qkv, h),
            "decoder.layers.{i}.self_attention.linear_qkv.bias": (qkv,),
            "decoder.layers.{i}.self_attention.linear_proj.weight": (h, cfg["num_attention_heads"] * head_dim(cfg)),
            "decoder.layers.{i}.mlp.linear_fc1.weight": (2 * f, h),
            "decoder.layers.{i}.mlp.linear_fc2.weight": (h, f)}[t]


def hf_to_mcore(name, hf_get, cfg):
    """The full (TP=1) Megatron tensor `name`, built from HF tensors fetched by `hf_get(hf_name)`.

    linear_fc1 is [gate; up] stacked on dim 0: SwiGLU computes silu(gate(x)) * up(x), and one
    [2*ffn, hidden] GEMM then a chunk in two does both projections at once.
    """
    t, i = _template(name)
    if t in RENAMES:
        return hf_get(RENAMES[t].format(i=i))
    parts = [hf_get(n.format(i=i)) for n in FUSED[t]]
    if "linear_qkv" in t:
        return qkv_to_mcore(*parts, cfg)
    return torch.cat(parts, dim=0)                                   # [gate; up]


def mcore_to_hf(name, tensor, cfg):
    """[(hf_name, tensor), ...] for one full (TP-gathered) Megatron tensor; inverse of hf_to_mcore.
    The outputs are views of `tensor` where possible: no copy of the model is made."""
    t, i = _template(name)
    if t in RENAMES:
        return [(RENAMES[t].format(i=i), tensor)]
    hf = [n.format(i=i) for n in FUSED[t]]
    if "linear_qkv" in t:
        return list(zip(hf, qkv_from_mcore(tensor, cfg)))
    return list(zip(hf, tensor.chunk(2, dim=0)))                    # gate, up


def tp_shard(name, full, tp_rank, tp_size):
    """This TP rank's slice of a full Megatron tensor.

    Column-parallel tensors split on dim 0 into contiguous blocks, except linear_fc1: each rank
    needs matching halves of gate *and* up (its chunk of the SwiGLU), so gate and up are split
    separately and each rank's shard is [gate_k; up_k].
    Example: ffn=4, TP=2: full rows [g0 g1 g2 g3 u0 u1 u2 u3] -> rank 0 [g0 g1 u0 u1], rank 1 [g2 g3 u2 u3].
    """
    t, _ = _template(name)
    dim = TP_DIM.get(t.split(".")[-2] + "." + t.split(".")[-1])
    if dim is None or tp_size == 1:
        return full
    if t.endswith("linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def tp_gather(name, shards):
    """Inverse of tp_shard: the full tensor from the list of all TP ranks' shards."""
    t, _ = _template(name)
    dim = TP_DIM.get(t.split(".")[-2] + "." + t.split(".")[-1])
    if dim is None or len(shards) == 1:
        return shards[0]
    if t.endswith("linear_fc1.weight"):
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


# ----------------------------------------------------------------------------------------------
# Local (this rank) <-> global names
# ----------------------------------------------------------------------------------------------
def local_to_global(model):
    """{local param name: global name} for this rank's GPTModel: pipeline stages number their
    layers from 0, Megatron records the global number (1-based) as `layer_number`."""
    out = {}
    offsets = {j: layer.layer_number - 1 for j, layer in enumerate(model.decoder.layers)}
    for name, _ in model.named_parameters():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        out[name] = f"decoder.layers.{offsets[int(m.group(1))]}.{m.group(2)}" if m else name
    return out


def load_hf_into_model(model, cfg, hf_get, progress=True):
    """Fill this rank's shard of `model` from HF tensors; reads only what this rank holds."""
    from megatron.core import parallel_state as ps
    from tqdm import tqdm
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    params = dict(model.named_parameters())
    names = local_to_global(model)
    for local in tqdm(params, desc="hf->mcore", unit="tensor", disable=not progress, file=sys.stderr):
        glob_name = names[local]
        if glob_name == "output_layer.weight" and cfg["tie_word_embeddings"]:
            glob_name = "embedding.word_embeddings.weight"   # last stage's copy of the tied embedding
        full = hf_to_mcore(glob_name, hf_get, cfg)
        shard = tp_shard(glob_name, full, tp_rank, tp_size)
        p = params[local]
        if tuple(shard.shape) != tuple(p.shape):
            raise UserError(f"{glob_name}: checkpoint shape {tuple(full.shape)} does not fit the model")
        with torch.no_grad():
            p.copy_(shard)


def _owner_map(model):
    """{global name: pipeline stage that holds it}, agreed by all ranks of the PP group."""
    from megatron.core import parallel_state as ps
    mine = [n for n in local_to_global(model).values()
            if not (n == "output_layer.weight" and model.share_embeddings_and_output_weights)]
    stages = [None] * ps.get_pipeline_model_parallel_world_size()
    dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
    owner = {}
    for stage, names in enumerate(stages):
        for n in names:
            owner.setdefault(n, stage)
    return owner


def export_hf(model, cfg):
    """Yield (hf_name, full tensor) for the whole model, on every rank of its TP x PP group.

    Used by mcore->HF conversion and by grpo.py's weight sync into vLLM. Per tensor: the TP
    shards are all-gathered (vLLM's own TP layout differs from Megatron's for qkv, so we
    rebuild full tensors and let vLLM's loader shard them its way), PP stages broadcast the
    layers they own so every stage sees every tensor, then the mapping splits fused tensors.
    Peak extra memory is one full tensor, never the whole model.
    """
    from megatron.core import parallel_state as ps
    tp_size, pp_size = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    tp_group, pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
    names = local_to_global(model)
    local = {names[n]: p for n, p in model.named_parameters()}
    owner = _owner_map(model) if pp_size > 1 else None
    stage = ps.get_pipeline_model_parallel_rank()
    some = next(iter(local.values()))
    for name in mcore_names(cfg):
        if owner is None or owner[name] == stage:
            shard = local[name].detach()
            if tp_size > 1:
                shards = [torch.empty_like(shard) for _ in range(tp_size)]
                dist.all_gather(shards, shard.contiguous(), group=tp_group)
                full = tp_gather(name, shards)
            else:
                full = shard
        else:
            full = torch.empty(mcore_shape(name, cfg), dtype=some.dtype, device=some.device)
        if owner is not None:
            dist.broadcast(full, src=dist.get_global_rank(pp_group, owner[name]), group=pp_group)
        yield from mcore_to_hf(name, full, cfg)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------
def save_mcore(model, cfg, directory):
    """Write this rank's shard into a dist checkpoint in `directory` (which must exist), with the
    shape next to it in model_config.json so a later load can be checked before it starts."""
    from megatron.core import dist_checkpointing
    dist_checkpointing.save(model.sharded_state_dict(), directory)
    if dist.get_rank() == 0:
        with open(os.path.join(directory, "model_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)


def load_mcore(model, directory):
    """Fill this rank's shard from a dist checkpoint written at any TP/PP."""
    from megatron.core import dist_checkpointing
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))


def check_mcore_shape(directory, cfg, against):
    """UserError unless `directory` is a dist checkpoint of the shape in `cfg` (read from `against`)."""
    if not os.path.isfile(os.path.join(directory, "metadata.json")):
        raise UserError(f"{directory} is not a Megatron dist checkpoint (no metadata.json)")
    meta = os.path.join(directory, "model_config.json")
    if os.path.isfile(meta):
        with open(meta) as f:
            saved = json.load(f)
        diff = [k for k in SHAPE_KEYS if saved.get(k) != cfg[k]]
        if diff:
            raise UserError(f"{directory} holds another model than {against} ({', '.join(diff)} differ)")


def hf_reader(load_dir):
    """(names, get) over an HF checkpoint's safetensors files, reading one tensor at a time."""
    from safetensors import safe_open
    files = sorted(f for f in os.listdir(load_dir) if f.endswith(".safetensors"))
    if not files:
        raise UserError(f"no *.safetensors files in {load_dir}")
    where = {}
    for f in files:
        with safe_open(os.path.join(load_dir, f), framework="pt") as st:
            for k in st.keys():
                where[k] = f
    handles = {}

    def get(name):
        if name not in where:
            raise UserError(f"tensor {name} missing from {load_dir}")
        if where[name] not in handles:
            handles[where[name]] = safe_open(os.path.join(load_dir, where[name]), framework="pt")
        return handles[where[name]].get_tensor(name)
    return set(where), get


def check_hf_tensors(names, cfg, load_dir):
    want = set(hf_names(cfg))
    if cfg["tie_word_embeddings"]:
        names = names - {"lm_head.weight"}  # some tied checkpoints store the copy; it is ignored
    missing, unknown = sorted(want - names), sorted(names - want)
    if missing:
        raise UserError(f"{load_dir} lacks {len(missing)} tensor(s) of this shape, e.g. {missing[0]}")
    if unknown:
        raise UserError(f"{load_dir} has {len(unknown)} tensor(s) a Qwen2 model of this shape does not, e.g. {unknown[0]}")


# What write_hf does not copy from HF_DIR: the weights it writes itself (in any format: a stale
# pytorch_model.bin next to our safetensors would be another model), and config.json, written
# from the resolved config.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".index.json")


def copy_hf_extras(hf_dir, save_dir):
    """Copy every file of `hf_dir` but its weights and config.json into `save_dir`, as it is.

    That is the tokenizer in whatever files the source keeps it (tokenizer.json, tokenizer_config.json,
    vocab.json, merges.txt; the chat template in chat_template.jinja since transformers 5, and
    additional_chat_templates/), generation_config.json (vLLM's default sampling parameters), the
    license. A fixed list of names goes stale with each transformers release (ours missed
    chat_template.jinja, and the export had no chat template); re-saving through AutoTokenizer
    would rewrite the files in the installed transformers' format and drop what it does not know.
    Hidden entries (.git, a hub client's .cache) are not part of the model.
    """
    for root, dirs, files in os.walk(hf_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(root, hf_dir)
        for fname in sorted(files):
            if fname.startswith(".") or fname.endswith(WEIGHT_SUFFIXES) or (rel == "." and fname == "config.json"):
                continue
            os.makedirs(os.path.join(save_dir, rel), exist_ok=True)
            shutil.copy(os.path.join(root, fname), os.path.join(save_dir, rel, fname))


def write_hf(tensors, save_dir, cfg, hf_dir, dtype_name, max_shard_bytes=5 * 2**30):
    """Write (name, tensor) pairs as safetensors shards + index, config.json, and HF_DIR's other
    files (tokenizer, chat template, generation config: copy_hf_extras)."""
    from safetensors.torch import save_file
    os.makedirs(save_dir, exist_ok=True)
    shard, size, index, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            n += 1
            fname = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(save_dir, fname), metadata={"format": "pt"})
            index.update({k: fname for k in shard})
            shard, size = {}, 0
    for name, t in tensors:
        shard[name] = t.detach().to("cpu").contiguous().clone()
        size += t.numel() * t.element_size()
        if size >= max_shard_bytes:
            flush()
    flush()
    with open(os.path.join(save_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(os.path.getsize(os.path.join(save_dir, v))
                                                  for v in set(index.values()))}, "weight_map": index}, f, indent=2)
    # One dtype key, naming the dtype written: transformers 5 saves `dtype`, and reads a `torch_dtype`
    # next to it only when `dtype` is absent, so the source's `dtype: float32` would override ours.
    # `torch_dtype` is the key both transformers 4 and 5 read.
    out_cfg = {k: v for k, v in cfg.items() if k != "dtype"}
    out_cfg["torch_dtype"] = DTYPES[dtype_name]
    with open(os.path.join(save_dir, "config.json"), "w") as f:
        json.dump(out_cfg, f, indent=2)
    copy_hf_extras(hf_dir, save_dir)


# ----------------------------------------------------------------------------------------------
# Distributed set-up shared with grpo.py
# ----------------------------------------------------------------------------------------------
def megatron_on_cpu():
    """Let megatron-core 0.16.1 build, load and save a model with every tensor in CPU memory and no
    GPU at all (USE_CUDA=false: users convert on CPU hosts).

    megatron-core calls CUDA in a few places even when no tensor is on a GPU; each is pointed at
    the CPU here, process-wide (convert.py uses no CUDA of its own when USE_CUDA=false). Applied for
    USE_CUDA=false whether or not the host has a GPU: one CPU path, the one the tests run.
    """
    # dist_checkpointing.save: state_dict_saver allocates its "a rank failed" flag on
    # torch.cuda.current_device() (then broadcasts it over gloo).
    torch.cuda.current_device = lambda: "cpu"
    # dist_checkpointing.save: FileSystemWriterAsync.preload_tensors copies every tensor "to cpu"
    # with non_blocking=True, then torch.cuda.synchronize() waits for copies that, here, are done.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # LanguageModule.setup_embeddings_and_output_layer: with tied embeddings and PP > 1 the last
    # stage's copy of the embedding goes through `weight.data.cuda()` before the all-reduce that
    # fills it from the first stage. On the CPU it stays where it is.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def megatron_training_on_cpu():
    """Let megatron-core 0.16.1 train with every tensor in CPU memory (--device cpu, and the tests).

    megatron_on_cpu() covers building, loading and saving; training needs three things
    more, each pointed at the CPU here, process-wide: the pipeline schedules and the optimizers
    allocate their flags with torch.zeros / tensor / empty / ones(..., device="cuda"); the
    mixed-precision and distributed optimizers accept only params whose type() names a
    torch.cuda tensor type; and Megatron's RNG tracker would seed CUDA generators (the inference
    tracker needs none; our models have no dropout).
    """
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    megatron_on_cpu()
    for fn in ("zeros", "tensor", "empty", "ones"):
        def on_cpu(*a, _f=getattr(torch, fn), **k):
            if str(k.get("device", "")).startswith("cuda"):
                k["device"] = "cpu"
            return _f(*a, **k)
        setattr(torch, fn, on_cpu)
    cpu_type = torch.Tensor.type

    def cuda_type_name(self, *a, **k):
        r = cpu_type(self, *a, **k)
        return r.replace("torch.", "torch.cuda.", 1) if not a and not k and not self.is_cuda else r
    torch.Tensor.type = cuda_type_name
    initialize_rng_tracker(inference_rng_tracker=True)


def free_port():
    """A TCP port nobody listens on now: bind port 0, read the port the kernel gave, close it.
    (Another process could take it before torch binds it again; the kernel hands out ephemeral
    ports in turn, so that is unlikely, and the cost is one failed start, not a wrong result.)"""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp, pp, use_cuda):
    """torch.distributed + Megatron's TP/PP/DP groups. Works under torchrun or as one process."""
    from megatron.core import parallel_state as ps
    if "WORLD_SIZE" not in os.environ and "MASTER_PORT" not in os.environ:
        # One process, not started by torchrun: it meets only itself, so any free port will do, and
        # a fixed one would make two conversions (or a conversion and a test) on one host collide.
        os.environ["MASTER_PORT"] = str(free_port())
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")   # a launcher that sets WORLD_SIZE but no port
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    world = int(os.environ["WORLD_SIZE"])
    if world % (tp * pp):
        raise UserError(f"{world} processes cannot hold TP={tp} x PP={pp}; use a multiple of {tp * pp} "
                        f"(torchrun --nproc_per_node {tp * pp})")
    if use_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def shutdown_distributed():
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def staging_dir(save_dir):
    """Where the output is written before it replaces SAVE_DIR in one rename (no half-written
    checkpoint ever sits under SAVE_DIR's name)."""
    return save_dir.rstrip("/") + ".tmp"


def check_output_spares_input(save_dir, name, source):
    """UserError when writing `save_dir` (or its staging folder) would delete or change `source`.

    SAVE_DIR is replaced as a whole, so SAVE_DIR == LOAD_DIR, even with --force, would replace
    the user's only checkpoint with its own conversion; a SAVE_DIR that contains LOAD_DIR deletes
    it; one inside it writes into the source. Paths are compared resolved: a trailing slash, a
    relative path or a symlink name the same folder.
    """
    src = os.path.realpath(source)
    for what, target in (("SAVE_DIR", save_dir), ("SAVE_DIR's staging folder", staging_dir(save_dir))):
        dst = os.path.realpath(target)
        if os.path.commonpath([src, dst]) in (src, dst):
            how = "is" if src == dst else "is inside" if os.path.commonpath([src, dst]) == src else "contains"
            raise UserError(f"{what} {target} {how} {name} {source}: converting would overwrite the input; "
                            f"choose a SAVE_DIR outside it")


def parse_args(argv):
    p = one_line_errors(argparse.ArgumentParser(
        description="Convert Qwen2.5 checkpoints between HF and Megatron-Core (dist_checkpointing).",
        epilog="Example: python convert.py 7B Qwen2.5-7B-Instruct Qwen2.5-7B-mcore false true bf16"))
    p.add_argument("MODEL_SIZE", help=f"one of {' '.join(QWEN25)}, or custom (shape from config.json)")
    p.add_argument("LOAD_DIR", help="source checkpoint (HF folder, or Megatron checkpoint if MG2HF)")
    p.add_argument("SAVE_DIR", help="target folder; must not exist or be empty (see --force)")
    p.add_argument("MG2HF", help="true: Megatron -> HF; false: HF -> Megatron")
    p.add_argument("USE_CUDA", help="true: convert on GPUs (one per rank); false: in CPU memory")
    p.add_argument("PR", help="precision of the written weights: fp32, bf16 or fp16")
    p.add_argument("HF_DIR", nargs="?", help="HF folder with config.json and tokenizer (needed for Megatron -> HF)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size used while converting")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size used while converting")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty SAVE_DIR")
    a = p.parse_args(argv)

    def boolean(name, v):
        if v.lower() not in ("true", "false"):
            raise UserError(f"{name} must be true or false, not {v}")
        return v.lower() == "true"
    a.MG2HF, a.USE_CUDA = boolean("MG2HF", a.MG2HF), boolean("USE_CUDA", a.USE_CUDA)
    if a.PR not in DTYPES:
        raise UserError(f"PR must be one of fp32 bf16 fp16, not {a.PR}")
    if a.MG2HF and not a.HF_DIR:
        raise UserError("HF_DIR is required for Megatron -> HF (config.json and tokenizer are copied from it)")
    if not os.path.isdir(a.LOAD_DIR):
        raise UserError(f"LOAD_DIR {a.LOAD_DIR} does not exist")
    # before the --force check, whose message would otherwise invite the user to overwrite the input
    check_output_spares_input(a.SAVE_DIR, "LOAD_DIR", a.LOAD_DIR)
    if a.MG2HF:
        check_output_spares_input(a.SAVE_DIR, "HF_DIR", a.HF_DIR)
    if os.path.isdir(a.SAVE_DIR) and os.listdir(a.SAVE_DIR) and not a.force:
        raise UserError(f"SAVE_DIR {a.SAVE_DIR} exists and is not empty; pass --force to overwrite")
    if a.tp < 1 or a.pp < 1:
        raise UserError("--tp and --pp must be >= 1")
    return a


def convert(a):
    dtype = getattr(torch, DTYPES[a.PR])
    cfg = resolve_config(a.MODEL_SIZE, os.path.join(a.HF_DIR if a.MG2HF else a.LOAD_DIR, "config.json"))
    check_parallel_sizes(cfg, a.tp, a.pp)
    if a.MG2HF:
        check_mcore_shape(a.LOAD_DIR, cfg, os.path.join(a.HF_DIR, "config.json"))
    else:
        names, hf_get = hf_reader(a.LOAD_DIR)
        check_hf_tensors(names, cfg, a.LOAD_DIR)
    if a.USE_CUDA and not torch.cuda.is_available():
        raise UserError("USE_CUDA=true but no CUDA GPU is visible; pass USE_CUDA=false to convert in CPU memory")
    if not a.USE_CUDA:
        megatron_on_cpu()
    init_distributed(a.tp, a.pp, a.USE_CUDA)
    rank = dist.get_rank()
    if dist.get_world_size() != a.tp * a.pp:
        raise UserError(f"convert.py runs with exactly TP x PP = {a.tp * a.pp} processes, not {dist.get_world_size()}")
    model = build_model(cfg, transformer_config(cfg, dtype, a.tp, a.pp, use_cpu_initialization=not a.USE_CUDA,
                                                perform_initialization=False))
    if a.USE_CUDA:
        model.cuda()
    tmp = staging_dir(a.SAVE_DIR)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    try:
        write_converted(a, cfg, model, dtype, tmp, rank, None if a.MG2HF else hf_get)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # never leave a half-written checkpoint behind
        raise
    dist.barrier()
    if rank == 0:
        if os.path.isdir(a.SAVE_DIR):
            shutil.rmtree(a.SAVE_DIR)
        os.replace(tmp, a.SAVE_DIR)
    dist.barrier()
    shutdown_distributed()
    if rank == 0:
        print(f"wrote {a.SAVE_DIR}")


def write_converted(a, cfg, model, dtype, tmp, rank, hf_get):
    if not a.MG2HF:
        load_hf_into_model(model, cfg, lambda n: hf_get(n).to(dtype), progress=rank == 0)
        save_mcore(model, cfg, tmp)
    else:
        load_mcore(model, a.LOAD_DIR)
        from tqdm import tqdm
        tensors = export_hf(model, cfg)
        if rank == 0:
            tensors = tqdm(tensors, desc="mcore->hf", unit="tensor", total=len(hf_names(cfg)), file=sys.stderr)
            write_hf(((n, t.to(dtype)) for n, t in tensors), tmp, cfg, a.HF_DIR, a.PR)
        else:
            for _ in tensors:    # take part in the collectives; rank 0 writes
                pass


def main(argv=None):
    try:
        convert(parse_args(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        die(str(e))


if __name__ == "__main__":
    main()
