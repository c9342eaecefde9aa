"""The specification of prepare.py, convert.py and grpo.py, as tests.

    python -m pytest -q test_grpo.py            # CPU: everything but the `gpu` tests
    python -m pytest -q -k gpu test_grpo.py     # on a CUDA machine with vllm installed

Nothing is downloaded: the fixtures write MATH-lighteval-shaped parquet files and tiny random
Qwen2-shaped checkpoints into pytest's tmp dirs.
"""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import prepare  # noqa: E402

gpu = pytest.mark.skipif(
    not (__import__("torch").cuda.is_available()), reason="needs a CUDA GPU (and vllm for grpo runs)")


def run_script(*args, env=None, timeout=600):
    """Run one of our scripts as a user would; returns CompletedProcess with text output."""
    e = dict(os.environ, PYTHONUNBUFFERED="1")
    e.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, env=e, timeout=timeout)


def assert_one_line_error(proc, *words):
    """A user mistake: non-zero exit, no traceback, the last stderr line names the problem."""
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    for w in words:
        assert w in last, last


# ==============================================================================================
# prepare.py: data
# ==============================================================================================
def write_math_parquet(folder, split, rows, shards=1):
    import pandas as pd
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    for k in range(shards):
        part = rows[k::shards]
        pd.DataFrame(part).to_parquet(os.path.join(folder, "data", f"{split}-{k:05d}-of-{shards:05d}.parquet"))


def math_rows(n, split):
    rows = []
    for i in range(n):
        rows.append({"problem": f"What is {i} + {i}?", "level": f"Level {1 + i % 5}", "type": "Algebra",
                     "solution": f"First \\boxed{{{i}}} is wrong; the sum is $\\boxed{{\\frac{{{2 * i}}}{{1}}}}$."})
    return rows


@pytest.fixture
def math_dir(tmp_path):
    d = str(tmp_path / "MATH-lighteval")
    train = math_rows(20, "train")
    train.append({"problem": "No box here", "level": "Level 1", "type": "Algebra", "solution": "It is 4."})
    train.append({"problem": "", "level": "Level 1", "type": "Algebra", "solution": "\\boxed{1}"})
    train.append({"problem": None, "level": "Level 1", "type": "Algebra", "solution": "\\boxed{1}"})
    train.append({"problem": "Unclosed", "level": "Level 1", "type": "Algebra", "solution": "\\boxed{1"})
    write_math_parquet(d, "train", train, shards=2)
    write_math_parquet(d, "test", math_rows(7, "test"))
    return d


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_prepare_writes_reference_layout_and_skips_bad_rows(math_dir, tmp_path):
    out = str(tmp_path / "out")
    p = run_script("prepare.py", "--input_dir", math_dir, "--local_dir", out)
    assert p.returncode == 0, p.stderr
    train, test = read_jsonl(f"{out}/train.json"), read_jsonl(f"{out}/test.json")
    assert len(train) == 20 and len(test) == 7
    assert "train.json: 20 rows (4 skipped" in p.stdout and "test.json: 7 rows (0 skipped" in p.stdout
    row = next(r for r in train if r["prompt"][0]["content"].startswith("What is 3 + 3?"))
    assert row["data_source"] == "DigitalLearningGmbH/MATH-lighteval"
    assert row["prompt"] == [{"role": "user", "content": "What is 3 + 3? Let's think step by step and output the final answer within \\boxed{}."}]
    assert row["ability"] == "math"
    assert row["reward_model"] == {"style": "rule", "ground_truth": "\\frac{6}{1}"}  # the last box, nested braces
    assert row["extra_info"]["split"] == "train" and row["extra_info"]["type"] == "Algebra"
    assert sorted(r["extra_info"]["index"] for r in test) == list(range(7))
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_prepare_missing_input_dir_is_one_line_error(tmp_path):
    p = run_script("prepare.py", "--input_dir", str(tmp_path / "nope"))
    assert_one_line_error(p, "does not exist")


def test_prepare_without_parquet_files_is_one_line_error_and_writes_nothing(tmp_path):
    (tmp_path / "data").mkdir()
    write_math_parquet(str(tmp_path), "train", math_rows(3, "train"))  # no test split
    p = run_script("prepare.py", "--input_dir", str(tmp_path))
    assert_one_line_error(p, "test-*.parquet")
    assert not os.path.exists(tmp_path / "train.json")


def test_prepare_missing_column_is_one_line_error(tmp_path):
    write_math_parquet(str(tmp_path), "train", [{"question": "1+1", "answer": "2"}])
    write_math_parquet(str(tmp_path), "test", [{"question": "1+1", "answer": "2"}])
    p = run_script("prepare.py", "--input_dir", str(tmp_path))
    assert_one_line_error(p, "problem", "solution")


def test_prepare_local_dir_that_is_a_file_is_one_line_error_and_writes_nothing(math_dir, tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    p = run_script("prepare.py", "--input_dir", math_dir, "--local_dir", str(target))
    assert_one_line_error(p, str(target), "is a file")
    assert sorted(os.listdir(tmp_path)) == ["MATH-lighteval", "out"] and target.read_text() == "not a folder"


def test_prepare_failing_on_the_second_file_leaves_no_new_train_json_beside_the_old_test_json(math_dir, tmp_path):
    """run.sh takes the data step as done when both files exist: a failed write must not leave a
    pair that looks done. Here test.json's temp file cannot be opened (a folder sits there)."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.json").write_text("old train\n")
    (out / "test.json").write_text("old test\n")
    (out / "test.json.tmp").mkdir()
    p = run_script("prepare.py", "--input_dir", math_dir, "--local_dir", str(out))
    assert_one_line_error(p, "test.json.tmp")
    assert not (out / "train.json").exists() or (out / "train.json").read_text() == "old train\n"
    assert set(os.listdir(out)) <= {"train.json", "test.json", "test.json.tmp"}   # no temp file of ours left


def test_download_offline_is_one_line_error(tmp_path):
    p = run_script("prepare.py", "download", "--local_dir", str(tmp_path / "d"), timeout=300)
    assert_one_line_error(p, "AI-ModelScope/MATH-lighteval", "modelscope")


def test_every_script_has_help():
    for script in ("prepare.py", "convert.py", "grpo.py"):
        p = run_script(script, "--help")
        assert p.returncode == 0 and "usage" in p.stdout.lower(), script
        assert_one_line_error(run_script(script, "--no-such-flag"), "see --help")


# ==============================================================================================
# prepare.py: last_boxed and the reward
# ==============================================================================================
@pytest.mark.parametrize("text,expected", [
    ("The answer is \\boxed{42}.", "42"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{1} and later \\boxed{2}", "2"),
    ("\\fbox{7}", "7"),
    ("\\boxed{3} then \\fbox{\\sqrt{2}}", "\\sqrt{2}"),
    ("\\boxed {x}", "x"),
    ("\\boxed{\\left\\{1,2\\right\\}}", "\\left\\{1,2\\right\\}"),
    ("\\boxed{a{b{c}}d}", "a{b{c}}d"),
    ("\\boxed{1} and \\boxed{2", None),      # the last box is cut off: no answer
    ("no box at all", None),
    ("", None),
    ("\\boxed", None),
    ("\\boxed 5", None),
])
def test_last_boxed(text, expected):
    assert prepare.last_boxed(text) == expected


EQUAL = [
    ("1/2", "0.5"), ("\\frac{1}{2}", "\\dfrac12"), ("0.5", "\\frac{1}{2}"), ("1,000", "1000"), ("x=3", "3"),
    ("90^\\circ", "90"), ("[1,2)", "[1,2)"), ("(1,2)", "(1, 2)"), ("5\\text{ cm}", "5"), ("\\$5", "5"),
    ("10\\%", "10"), ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}"), ("x^2+2x+1", "(x+1)^2"), ("\\infty", "\\infty"),
    ("\\{1,2\\}", "\\{2,1\\}"), ("-\\frac{3}{4}", "-0.75"), ("3\\sqrt{2}", "\\sqrt{18}"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"), ("2\\pi", "\\pi \\cdot 2"),
    ("\\text{(A)}", "A"),
]
NOT_EQUAL = [
    ("2", "3"), ("[1,2)", "(1,2)"), ("1/2", "0.51"), ("\\pi", "3.14159"), ("(1,2)", "(2,1)"), ("a", "b"),
    ("2\\pi", "6.28"), ("x=3", "4"), ("\\frac{1}{3}", "0.33"), ("\\sqrt{2}", "2"), ("1000", "100"),
    ("\\begin{pmatrix}1\\\\2\\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}"),
]


@pytest.mark.parametrize("truth,answer", EQUAL)
def test_math_reward_equal_forms_score_one_both_ways(truth, answer):
    assert prepare.math_reward(f"Thus \\boxed{{{answer}}}.", truth) == 1.0
    assert prepare.math_reward(f"Thus \\boxed{{{truth}}}.", answer) == 1.0


@pytest.mark.parametrize("truth,answer", NOT_EQUAL)
def test_math_reward_different_values_score_zero_both_ways(truth, answer):
    assert prepare.math_reward(f"Thus \\boxed{{{answer}}}.", truth) == 0.0
    assert prepare.math_reward(f"Thus \\boxed{{{truth}}}.", answer) == 0.0


def test_math_reward_needs_a_complete_last_box():
    assert prepare.math_reward("The answer is 5.", "5") == 0.0
    assert prepare.math_reward("\\boxed{5} no wait \\boxed{5", "5") == 0.0
    assert prepare.math_reward("\\boxed{4} no wait \\boxed{5}", "5") == 1.0


def test_math_reward_times_out_on_pathological_input():
    t = time.time()
    assert prepare.math_reward("\\boxed{\\sum_{n=1}^{10^{9}} n^{n}}", "5", timeout_s=1) == 0.0
    assert prepare.math_reward("\\boxed{1}", "10^{10^{10}}!", timeout_s=1) == 0.0
    assert time.time() - t < 10


def test_score_responses_matches_math_reward_in_worker_processes():
    responses = [f"\\boxed{{\\frac{{{i}}}{{2}}}}" for i in range(200)] + ["no box", "\\boxed{\\sum_{n=1}^{10^{9}} n^{n}}"]
    truths = [f"{i % 3}/2" for i in range(200)] + ["1", "5"]
    rewards, timed_out = prepare.score_responses(responses, truths, num_workers=2, timeout_s=1)
    assert rewards == [1.0 if i < 3 else 0.0 for i in range(200)] + [0.0, 0.0]
    assert timed_out == 0                      # SIGALRM stopped the pathological one in time


def reward_hangs_on_marker(response, ground_truth, timeout_s):
    """math_reward, except that the response "HANG" blocks where neither SIGALRM nor SIGTERM can
    reach it, as sympy stuck in C code would. Module level: forkserver workers import it by name."""
    import signal
    if response == "HANG":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGTERM})
        time.sleep(3600)
    return prepare.math_reward(response, ground_truth, timeout_s)


def reward_dies_on_marker(response, ground_truth, timeout_s):
    """math_reward, except that the response "DIE" ends the worker process on the spot."""
    if response == "DIE":
        os._exit(1)
    return prepare.math_reward(response, ground_truth, timeout_s)


def test_score_responses_zeroes_and_counts_only_the_answer_that_hangs():
    responses = [f"\\boxed{{{i}}}" for i in range(64)]
    responses[5] = "HANG"
    truths = [str(i) for i in range(64)]                     # every other answer is right
    prepare.score_responses(["\\boxed{1}"], ["1"], num_workers=2, reward_fn=reward_hangs_on_marker)  # start
    t = time.time()
    rewards, timed_out = prepare.score_responses(responses, truths, num_workers=2, timeout_s=1, stall_s=3,
                                                 reward_fn=reward_hangs_on_marker)
    elapsed = time.time() - t
    prepare.close_reward_workers()
    assert rewards == [0.0 if i == 5 else 1.0 for i in range(64)]
    assert timed_out == 1
    assert 3 <= elapsed < 30                   # waited out the stall once, then went on


def test_score_responses_survives_a_worker_that_dies():
    responses = [f"\\boxed{{{i}}}" for i in range(32)]
    responses[7] = "DIE"
    rewards, timed_out = prepare.score_responses(responses, [str(i) for i in range(32)], num_workers=2,
                                                 reward_fn=reward_dies_on_marker)
    again, _ = prepare.score_responses(["\\boxed{2}"] * 4, ["2"] * 4, num_workers=2, reward_fn=reward_dies_on_marker)
    prepare.close_reward_workers()
    assert rewards == [0.0 if i == 7 else 1.0 for i in range(32)] and timed_out == 1
    assert again == [1.0] * 4                  # the dead worker was replaced


def test_close_reward_workers_stops_the_worker_processes():
    import multiprocessing
    before = {p.pid for p in multiprocessing.active_children()}
    prepare.score_responses(["\\boxed{1}"] * 4, ["1"] * 4, num_workers=2)
    workers = {p.pid for p in multiprocessing.active_children()} - before
    prepare.close_reward_workers()
    assert len(workers) == 2
    assert not workers & {p.pid for p in multiprocessing.active_children()}
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_process_that_scored_in_workers_exits_without_teardown_errors():
    # With torch imported (as in the trainer), interpreter teardown used to reach the reward
    # pool after multiprocessing's pickler was gone: "Exception ignored in Pool.__del__".
    p = run_script("-c", "import torch, prepare; "
                   "print(prepare.score_responses(['\\\\boxed{1}'] * 4, ['1'] * 4, num_workers=2))")
    assert "Exception ignored" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert p.returncode == 0 and p.stdout.strip() == "([1.0, 1.0, 1.0, 1.0], 0)"


# ==============================================================================================
# grpo.py: the math, against plain-Python references
# ==============================================================================================
def ref_group_advantages(rewards, n, eps=1e-5, norm=True):
    out = []
    for g in range(0, len(rewards), n):
        grp = rewards[g:g + n]
        mean = sum(grp) / n
        std = (sum((x - mean) ** 2 for x in grp) / (n - 1)) ** 0.5 if n > 1 else 0.0
        out += [0.0 if n == 1 else (x - mean) / ((std + eps) if norm else 1.0) for x in grp]
    return out


def test_group_advantages_match_reference_on_random_rewards():
    import random
    import torch
    import grpo
    rng = random.Random(0)
    for n in (2, 3, 8):
        for norm in (True, False):
            r = [float(rng.random() < 0.4) if rng.random() < 0.5 else rng.random() for _ in range(5 * n)]
            got = grpo.group_advantages(torch.tensor(r), n, norm_by_std=norm).tolist()
            assert got == pytest.approx(ref_group_advantages(r, n, norm=norm), abs=1e-5)


def test_all_equal_group_gets_zero_advantage():
    import torch
    import grpo
    adv = grpo.group_advantages(torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]), 3)
    assert adv[:6].tolist() == [0.0] * 6
    assert adv[6:].tolist() == pytest.approx([1.1547, -0.5773, -0.5773], abs=1e-3)   # the docstring's example


def test_single_sample_group_gets_zero_advantage():
    import torch
    import grpo
    assert grpo.group_advantages(torch.tensor([1.0, 0.0, 0.5]), 1).tolist() == [0.0, 0.0, 0.0]


def ref_policy_loss(logp, old, adv, mask, clip, kl_coef, ref):
    import math
    total, n, clipped = 0.0, 0, 0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(min(logp[b][t] - old[b][t], 10.0))
            s1, s2 = ratio * adv[b], min(max(ratio, 1 - clip), 1 + clip) * adv[b]
            d = max(-20.0, min(20.0, ref[b][t] - logp[b][t]))
            total += -min(s1, s2) + kl_coef * min(math.exp(d) - d - 1, 10.0)
            clipped += s2 < s1
            n += 1
    return total, n, clipped


def test_policy_loss_matches_reference_on_random_inputs():
    import torch
    import grpo
    torch.manual_seed(0)
    for trial in range(5):
        B, S = 4, 7
        logp, old, ref = (-torch.rand(B, S) * 3 for _ in range(3))
        adv = torch.randn(B)
        mask = (torch.rand(B, S) < 0.7).float()
        mask[0] = 0                                   # a fully masked row contributes nothing
        loss, n, stats = grpo.policy_loss(logp, old, adv, mask, 0.2, 0.1, ref)
        r_loss, r_n, r_clip = ref_policy_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.1, ref.tolist())
        assert float(loss) == pytest.approx(r_loss, rel=1e-5, abs=1e-5)
        assert float(n) == r_n and float(stats["clip_frac"]) == r_clip


def test_policy_loss_of_unchanged_policy_is_minus_token_weighted_advantage():
    import torch
    import grpo
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, n, stats = grpo.policy_loss(logp, logp, torch.tensor([2.0, -1.0]), mask)
    assert float(loss) == -(2.0 * 2 - 1.0 * 1) and float(n) == 3 and float(stats["clip_frac"]) == 0


def test_kl_k3_is_zero_at_equal_policies_and_positive_elsewhere():
    import torch
    import grpo
    x = torch.tensor([-1.0, -2.0])
    assert grpo.kl_k3(x, x).tolist() == [0.0, 0.0]
    assert (grpo.kl_k3(x, x + torch.tensor([0.5, -0.5])) > 0).all()


def test_masked_mean_of_empty_mask_is_zero():
    import torch
    import grpo
    assert float(grpo.masked_mean(torch.ones(3), torch.zeros(3))) == 0.0
    assert float(grpo.masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0]))) == 2.0


def test_make_batch_aligns_targets_and_mask_with_response_tokens():
    import grpo
    b = grpo.make_batch([{"prompt_ids": [5, 6], "response_ids": [7, 8], "rollout_logps": [-0.5, -0.25]},
                         {"prompt_ids": [1], "response_ids": [2, 3, 4]}])
    assert b["tokens"].tolist() == [[5, 6, 7, 8], [1, 2, 3, 4]]
    assert b["targets"].tolist() == [[6, 7, 8, 0], [2, 3, 4, 0]]
    assert b["mask"].tolist() == [[0, 1, 1, 0], [1, 1, 1, 0]]
    assert b["rollout_logp"][0].tolist() == [0, -0.5, -0.25, 0]
    assert b["has_rollout_logp"].tolist() == [1, 0]      # vLLM gave no log-probs for the second


def test_micro_batches_trim_padding_and_keep_every_row_once():
    import grpo
    samples = [{"prompt_ids": [1] * 2, "response_ids": [2] * n} for n in (30, 2, 3, 28, 1)]
    b = grpo.make_batch(samples)
    mbs = grpo.micro_batches(b, max_tokens=64)
    assert sorted(i for rows, _ in mbs for i in rows) == list(range(5))
    for rows, mb in mbs:
        assert mb["tokens"].shape[1] == max(len(samples[i]["response_ids"]) + 2 for i in rows)
        assert mb["tokens"].numel() <= 64 or len(rows) == 1
    assert sum(mb["tokens"].numel() for _, mb in mbs) < b["tokens"].numel()


def test_toy_reward_is_fraction_of_target_token():
    import grpo
    assert grpo.toy_reward([7, 1, 7, 2], 7) == 0.5 and grpo.toy_reward([], 7) == 0.0


# ==============================================================================================
# convert.py
# ==============================================================================================
def cpu_shims():
    """Let megatron-core 0.16.1 run on a CPU-only torch (tests only; the product expects CUDA).

    Rotary embedding moves inv_freq to torch.cuda.current_device(); dist_checkpointing and the
    pipeline schedules call torch.cuda.synchronize and allocate flags on "cuda"; convert.py
    refuses to start without CUDA.
    """
    import torch
    import convert
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    # the schedules and the optimizers allocate flags with torch.zeros/tensor(..., device="cuda")
    for fn in ("zeros", "tensor", "empty", "ones"):
        def on_cpu(*a, _f=getattr(torch, fn), **k):
            if str(k.get("device", "")).startswith("cuda"):
                k["device"] = "cpu"
            return _f(*a, **k)
        setattr(torch, fn, on_cpu)
    torch.Tensor.cuda = lambda self, *a, **k: self   # tied embeddings + PP: the last stage's copy
    # megatron's mixed-precision and distributed optimizers accept only params whose type() is
    # torch.cuda.{BFloat16,Half,Float}Tensor: report CPU tensors under those names
    cpu_type = torch.Tensor.type

    def cuda_type_name(self, *a, **k):
        r = cpu_type(self, *a, **k)
        return r.replace("torch.", "torch.cuda.", 1) if not a and not k and not self.is_cuda else r
    torch.Tensor.type = cuda_type_name
    convert.require_cuda_runtime = lambda: None
    from megatron.core.tensor_parallel.random import initialize_rng_tracker
    initialize_rng_tracker(inference_rng_tracker=True)


def run_shimmed(script, *args, nproc=1, timeout=600):
    """Run one of our scripts on CPU through the shims: `python test_grpo.py SCRIPT ARGS`, under
    torchrun (gloo) when nproc > 1."""
    if nproc == 1:
        return run_script("test_grpo.py", script, *args, timeout=timeout)
    port = str(29600 + os.getpid() % 300)
    return run_script("-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", port,
                      "test_grpo.py", script, *args, env={"OMP_NUM_THREADS": "1"}, timeout=timeout)


def tiny_qwen_config(tied):
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=128, hidden_size=48,
                intermediate_size=64, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
                tie_word_embeddings=tied, hidden_act="silu", torch_dtype="float32")


def make_tiny_hf(path, tied, seed=0):
    """A random Qwen2ForCausalLM saved in HF format (safetensors + config)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**tiny_qwen_config(tied)))
    with torch.no_grad():   # HF zero-inits biases; random ones catch a wrong bias layout
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(0, 0.5 if n.endswith("bias") else 0.1).add_(1.0 if "norm" in n else 0.0)
    model.save_pretrained(path)
    return model


def load_safetensors_dir(path):
    from safetensors.torch import load_file
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def logits_main(argv):
    """`test_grpo.py logits CKPT CONFIG_JSON TOKENS_PT OUT_PT TP PP`: full-vocab fp32 logits of a
    Megatron checkpoint, through megatron's own pipeline schedule (so PP=2 really pipelines)."""
    import torch
    import convert
    from megatron.core import parallel_state as ps, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    ckpt, cfg_json, tokens_pt, out_pt, tp, pp = argv[0], argv[1], argv[2], argv[3], int(argv[4]), int(argv[5])
    cfg = convert.resolve_config("custom", cfg_json)
    cuda = torch.cuda.is_available()
    convert.init_distributed(tp, pp, use_cuda=cuda)
    model = convert.build_model(cfg, convert.transformer_config(
        cfg, torch.float32, tp, pp, use_cpu_initialization=not cuda, perform_initialization=False))
    if cuda:
        model.cuda()
    convert.load_mcore(model, ckpt)
    tokens = torch.load(tokens_pt).to("cuda" if cuda else "cpu")

    def step(it, model):
        x = next(it)
        out = model(x, torch.arange(x.shape[1]).expand_as(x), None)
        return out, lambda o: (o.sum() * 0, {"logits": tensor_parallel.gather_from_tensor_model_parallel_region(o)})
    res = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
        seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        torch.save(res[0]["logits"].cpu(), out_pt)
    convert.shutdown_distributed()


def test_qkv_is_laid_out_per_query_group():
    import torch
    import convert
    cfg = tiny_qwen_config(True)                       # 6 heads, 2 groups, head_dim 8
    d = 8
    q = torch.arange(6 * d).float().repeat_interleave(1)   # row r of q holds r
    k, v = 100 + torch.arange(2 * d).float(), 200 + torch.arange(2 * d).float()
    qkv = convert.qkv_to_mcore(q, k, v, cfg)
    # group 0: q heads 0-2 (rows 0..23), k head 0, v head 0; then group 1
    expected = torch.cat([q[:24], k[:8], v[:8], q[24:], k[8:], v[8:]])
    assert torch.equal(qkv, expected)
    assert all(torch.equal(a, b) for a, b in zip(convert.qkv_from_mcore(qkv, cfg), (q, k, v)))


def test_fc1_tp_shards_hold_matching_gate_and_up_rows():
    import torch
    import convert
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    full = torch.arange(8).float().unsqueeze(1)        # [g0 g1 g2 g3 u0 u1 u2 u3] = 0..7
    shards = [convert.tp_shard(name, full, r, 2) for r in range(2)]
    assert shards[0].flatten().tolist() == [0, 1, 4, 5] and shards[1].flatten().tolist() == [2, 3, 6, 7]
    assert torch.equal(convert.tp_gather(name, shards), full)


def test_hf_and_mcore_mappings_are_exact_inverses():
    """HF tensors -> full mcore -> TP=2 shards -> gathered -> HF: every tensor comes back equal."""
    import torch
    import convert
    from transformers import Qwen2Config, Qwen2ForCausalLM
    for tied in (True, False):
        cfg = tiny_qwen_config(tied)
        torch.manual_seed(0)
        hf = {n: p.detach() + torch.randn_like(p) for n, p in Qwen2ForCausalLM(Qwen2Config(**cfg)).state_dict().items()}
        if tied:
            hf.pop("lm_head.weight", None)
        assert set(hf) == set(convert.hf_names(cfg))
        back = {}
        for name in convert.mcore_names(cfg):
            full = convert.hf_to_mcore(name, hf.__getitem__, cfg)
            assert tuple(full.shape) == convert.mcore_shape(name, cfg)
            shards = [convert.tp_shard(name, full, r, 2) for r in range(2)]
            back.update(convert.mcore_to_hf(name, convert.tp_gather(name, shards), cfg))
        assert set(back) == set(hf) and all(torch.equal(back[n], hf[n]) for n in hf)


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """HF tiny models (tied and untied), their mcore conversions, a token batch and HF logits."""
    import torch
    root = tmp_path_factory.mktemp("convert")
    out = {"root": root}
    torch.manual_seed(1)
    tokens = torch.randint(0, 128, (2, 16))
    torch.save(tokens, root / "tokens.pt")
    for tied in (True, False):
        tag = "tied" if tied else "untied"
        model = make_tiny_hf(str(root / f"hf_{tag}"), tied, seed=2 if tied else 3)
        with torch.no_grad():
            torch.save(model(tokens).logits, root / f"ref_{tag}.pt")
        p = run_shimmed("convert.py", "custom", str(root / f"hf_{tag}"), str(root / f"mc_{tag}"), "false", "false", "fp32")
        assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_hf_to_mcore_to_hf_round_trip_is_bit_exact(tiny_ckpts, tied):
    import torch
    root, tag = tiny_ckpts["root"], "tied" if tied else "untied"
    p = run_shimmed("convert.py", "custom", str(root / f"mc_{tag}"), str(root / f"back_{tag}"), "true", "false", "fp32",
                    str(root / f"hf_{tag}"))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = load_safetensors_dir(root / f"hf_{tag}"), load_safetensors_dir(root / f"back_{tag}")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert ("lm_head.weight" in b) == (not tied)        # a tied model gets no separate lm_head
    from transformers import AutoModelForCausalLM
    back = AutoModelForCausalLM.from_pretrained(root / f"back_{tag}")
    assert torch.equal(back(torch.load(root / "tokens.pt")).logits, torch.load(root / f"ref_{tag}.pt"))


@pytest.mark.parametrize("tied", [True, False])
def test_megatron_logits_match_transformers(tiny_ckpts, tied):
    import torch
    root, tag = tiny_ckpts["root"], "tied" if tied else "untied"
    out = root / f"logits_{tag}.pt"
    p = run_shimmed("logits", str(root / f"mc_{tag}"), str(root / f"hf_{tag}" / "config.json"),
                    str(root / "tokens.pt"), str(out), "1", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    ref, got = torch.load(root / f"ref_{tag}.pt"), torch.load(out)
    assert got.shape == ref.shape == (2, 16, 128)
    assert (got - ref).abs().max() < 1e-4


def test_tp2_conversion_and_tp2_pp2_logits_and_export_match(tiny_ckpts):
    """HF -> mcore at TP=2 (2 gloo processes); that checkpoint gives the same logits at TP=2 and
    at PP=2 (dist_checkpointing reshards), and exports back to HF bit-exactly at PP=2."""
    import torch
    root = tiny_ckpts["root"]
    for tag in ("tied", "untied"):
        hf, mc = root / f"hf_{tag}", root / f"mc_tp2_{tag}"
        p = run_shimmed("convert.py", "custom", str(hf), str(mc), "false", "false", "fp32", "--tp", "2", nproc=2)
        assert p.returncode == 0, p.stderr[-3000:]
        ref = torch.load(root / f"ref_{tag}.pt")
        for tp, pp in ((2, 1), (1, 2)):
            out = root / f"logits_{tag}_{tp}{pp}.pt"
            p = run_shimmed("logits", str(mc), str(hf / "config.json"), str(root / "tokens.pt"), str(out),
                            str(tp), str(pp), nproc=2)
            assert p.returncode == 0, p.stderr[-3000:]
            assert (torch.load(out) - ref).abs().max() < 1e-4, (tag, tp, pp)
        back = root / f"back_pp2_{tag}"
        p = run_shimmed("convert.py", "custom", str(mc), str(back), "true", "false", "fp32", str(hf), "--pp", "2", nproc=2)
        assert p.returncode == 0, p.stderr[-3000:]
        a, b = load_safetensors_dir(hf), load_safetensors_dir(back)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_bad_inputs_fail_with_one_line_and_write_nothing(tiny_ckpts, tmp_path):
    root = tiny_ckpts["root"]
    hf, mc = str(root / "hf_tied"), str(root / "mc_tied")
    target = str(tmp_path / "out")
    cases = [
        (("0.5B", hf, target, "false", "false", "bf16"), ["not Qwen2.5-0.5B", "num_hidden_layers=4"]),
        (("9B", hf, target, "false", "false", "bf16"), ["MODEL_SIZE 9B"]),
        (("custom", mc, target, "true", "false", "bf16"), ["HF_DIR is required"]),
        (("custom", hf, target, "maybe", "false", "bf16"), ["MG2HF must be true or false"]),
        (("custom", hf, target, "false", "false", "int8"), ["PR must be"]),
        (("custom", str(tmp_path / "nope"), target, "false", "false", "bf16"), ["does not exist"]),
        (("custom", hf, mc, "false", "false", "bf16"), ["not empty", "--force"]),
        (("custom", hf, target, "false", "false", "bf16", "--tp", "3"), ["TP=3 does not divide num_key_value_heads=2"]),
        (("custom", hf, target, "true", "false", "bf16", hf), ["not a Megatron dist checkpoint"]),
        (("custom", mc, target, "true", "false", "bf16", str(root / "hf_untied")), ["another model", "tie_word_embeddings"]),
    ]
    for args, words in cases:
        assert_one_line_error(run_script("convert.py", *args), *words)
        assert not os.path.exists(target) and not os.path.exists(target + ".tmp"), args
    # a checkpoint with a tensor missing, and one with a tensor too many
    import torch
    from safetensors.torch import save_file
    tensors = load_safetensors_dir(hf)
    for tag, bad in (("missing", {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}),
                     ("extra", dict(tensors, **{"model.layers.9.mlp.up_proj.weight": torch.zeros(1)}))):
        d = tmp_path / tag
        d.mkdir()
        save_file(bad, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(tiny_qwen_config(True)))
        p = run_script("convert.py", "custom", str(d), target, "false", "false", "bf16")
        assert_one_line_error(p, "model.layers.1.mlp.up_proj.weight" if tag == "missing" else "model.layers.9.mlp.up_proj.weight")
        assert not os.path.exists(target)


def test_convert_refuses_to_start_without_cuda(tiny_ckpts, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = run_script("convert.py", "custom", str(tiny_ckpts["root"] / "hf_tied"), str(tmp_path / "o"), "false", "false", "bf16")
    assert_one_line_error(p, "no CUDA GPU")
    assert not os.path.exists(tmp_path / "o")


def test_one_train_step_raises_positive_and_lowers_negative_completion(tiny_ckpts, tmp_path):
    root = tiny_ckpts["root"]
    out = tmp_path / "step.json"
    p = run_shimmed("trainstep", str(root / "mc_tied"), str(root / "hf_tied"), str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["after"][0] > r["before"][0] + 0.1          # advantage +1: its tokens got likelier
    assert r["after"][1] < r["before"][1] - 0.1          # advantage -1: less likely
    # Megatron's loss (summed over micro batches) equals the pure function's on the same log-probs
    assert r["stats"]["loss"] == pytest.approx(r["ref_loss"], abs=1e-5) == -(4 * 1.0 + 2 * -1.0)
    assert r["stats"]["tokens"] == r["ref_tokens"] == 6
    assert r["stats"]["neg_logp"] == pytest.approx(r["ref_neg_logp"], rel=1e-5)
    assert r["stats"]["grad_norm"] > 0 and r["stats"]["update_skipped"] == 0
    # the vLLM-vs-Megatron monitor: sum of |Megatron logp - rollout logp| over the response tokens
    # of the rows that carry vLLM log-probs (row 0's 4 tokens; row 1 has none)
    assert r["stats"]["logp_diff"] == pytest.approx(r["ref_logp_diff"], rel=1e-5)
    assert r["stats"]["logp_diff_tokens"] == 4
    # old log-probs from the update's own forward == a separate pass (one optimizer step per batch)
    assert r["twin_stats"]["loss"] == pytest.approx(r["stats"]["loss"], abs=1e-6)
    assert r["twin_stats"]["grad_norm"] == pytest.approx(r["stats"]["grad_norm"], rel=1e-5)
    assert r["twin_max_diff"] < 1e-4 * r["step_size"]


def test_one_train_step_at_tp2_matches_tp1(tiny_ckpts, tmp_path):
    root = tiny_ckpts["root"]
    res = []
    for nproc, flags in ((1, []), (2, ["--tp", "2"])):
        out = tmp_path / f"step{nproc}.json"
        p = run_shimmed("trainstep", str(root / "mc_untied"), str(root / "hf_untied"), str(out), *flags, nproc=nproc)
        assert p.returncode == 0, p.stderr[-3000:]
        res.append(json.loads(out.read_text()))
    assert res[1]["before"] == pytest.approx(res[0]["before"], abs=1e-4)
    assert res[1]["after"] == pytest.approx(res[0]["after"], abs=1e-3)
    assert res[1]["stats"]["grad_norm"] == pytest.approx(res[0]["stats"]["grad_norm"], rel=1e-4)


def test_one_train_step_at_pp2_matches_pp1(tiny_ckpts, tmp_path):
    """Pipeline parallel: micro batches of different lengths flow through megatron's 1F1B
    schedule (variable_seq_lengths) and give the same update as one stage."""
    root = tiny_ckpts["root"]
    res = []
    for nproc, flags in ((1, []), (2, ["--pp", "2"])):
        out = tmp_path / f"step{nproc}.json"
        p = run_shimmed("trainstep", str(root / "mc_untied"), str(root / "hf_untied"), str(out),
                        "--micro-batch-tokens", "8", *flags, nproc=nproc)
        assert p.returncode == 0, p.stderr[-3000:]
        res.append(json.loads(out.read_text()))
    assert res[1]["before"] == pytest.approx(res[0]["before"], abs=1e-4)
    assert res[1]["after"] == pytest.approx(res[0]["after"], abs=1e-3)
    assert res[1]["stats"]["loss"] == pytest.approx(res[0]["stats"]["loss"], abs=1e-5)
    assert res[1]["stats"]["grad_norm"] == pytest.approx(res[0]["stats"]["grad_norm"], rel=1e-4)


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tiny_tokenizer(path, texts):
    """A small BPE tokenizer with Qwen's chat markers and a ChatML template, trained offline on
    `texts` (no hub): stands in for Qwen2.5's tokenizer in tests."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def test_prompts_are_chat_templated_and_long_ones_dropped(math_dir, tmp_path):
    import grpo
    out = str(tmp_path / "data")
    assert run_script("prepare.py", "--input_dir", math_dir, "--local_dir", out).returncode == 0
    rows = grpo.load_prompt_file(os.path.join(out, "train.json"))
    tok = make_tiny_tokenizer(str(tmp_path / "tok"), [r[0][0]["content"] for r in rows] * 5)
    kept, dropped = grpo.tokenize(tok, rows, max_prompt_len=10**6)
    assert dropped == 0 and len(kept) == len(rows) == 20
    text = tok.decode(kept[0][0])
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert kept[0][1] == rows[0][1]
    n = max(len(ids) for ids, _ in kept) - 1
    kept, dropped = grpo.tokenize(tok, rows, max_prompt_len=n)
    assert dropped > 0 and all(len(ids) <= n for ids, _ in kept) and len(kept) + dropped == 20


def test_malformed_prompt_file_is_a_user_error(tmp_path):
    import grpo
    from convert import UserError
    bad = tmp_path / "train.json"
    bad.write_text('{"prompt": [], "reward_model": {"ground_truth": "1"}}\n{"oops": 1}\n')
    with pytest.raises(UserError, match="line 2"):
        grpo.load_prompt_file(str(bad))
    with pytest.raises(UserError, match="not found"):
        grpo.load_prompt_file(str(tmp_path / "none.json"))


@pytest.mark.parametrize("nproc,flags", [
    (1, ["--no-distributed-optimizer", "--grad-clip", "0"]),
    (2, ["--no-distributed-optimizer", "--grad-clip", "0", "--tp", "2"]),
    (2, ["--bf16"]),     # what runs on GPUs: bf16 weights, Adam state sharded over DP=2, grad clip
])
def test_checkpoint_round_trip_and_resume_after_a_killed_save(tiny_ckpts, tmp_path, nproc, flags):
    root = tiny_ckpts["root"]
    result = tmp_path / "ckpt.json"
    p = run_shimmed("ckpt", str(root / "mc_untied"), str(root / "hf_untied"), str(tmp_path / "out"), str(result),
                    *flags, nproc=nproc)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(result.read_text())
    assert r["listing"] == ["step_000002", "step_000003", "step_000004.tmp"]   # keep_last=2; the half save
    assert r["step"] == 3 and r["state"] == {"order": [3, 1, 2], "cursor": 24, "step": 3}
    assert r["same_params"] and r["same_opt"] and r["n_opt_state"] > 0
    assert r["same_next"]


def test_resume_drops_metrics_of_steps_that_will_be_redone(tmp_path):
    import grpo
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in range(1, 6)))
    grpo.keep_metrics_up_to(str(path), 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_gpu_out_of_memory_becomes_a_hint_and_other_errors_pass_through():
    import torch
    import grpo
    e = grpo.out_of_memory_hint(RuntimeError("CUDA Error: out of memory at cumem_allocator.cpp:163"), "while waking vLLM")
    assert "GPU out of memory while waking vLLM" in str(e) and "--gpu-memory-utilization" in str(e)
    assert grpo.out_of_memory_hint(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "x") is not None
    assert grpo.out_of_memory_hint(ValueError("Free memory on device (3/79 GiB) on startup is less than desired GPU "
                                              "memory utilization (0.9, 71 GiB)"), "x") is not None
    assert grpo.out_of_memory_hint(KeyError("weights"), "x") is None


def test_benchmark_mode_fixes_the_workload_and_needs_no_checkpoint():
    import grpo
    a = grpo.parse_args(["--benchmark", "0.5B", "--steps", "99", "--prompts-per-step", "2"])
    assert (a.prompts_per_step, a.n_samples_per_prompt, a.toy_prompt_len, a.max_len - a.toy_prompt_len) == (128, 8, 256, 1024)
    assert a.steps == 4 and a.load is None and a.save_interval == 0 and not a.resume and a.out == "grpo-benchmark"


def test_grpo_bad_flags_fail_with_one_line(tiny_ckpts, tmp_path):
    root = tiny_ckpts["root"]
    mc, hf = str(root / "mc_tied"), str(root / "hf_tied")
    cases = [
        (["--hf-dir", hf], ["--load and --hf-dir are required", "--benchmark"]),
        (["--benchmark", "9B"], ["invalid choice"]),
        (["--load", str(tmp_path / "none"), "--hf-dir", hf], ["not a Megatron checkpoint"]),
        (["--load", mc, "--hf-dir", str(tmp_path)], ["no config.json"]),
        (["--load", mc, "--hf-dir", hf, "--n-samples-per-prompt", "1"], ["must be >= 2"]),
        (["--load", mc, "--hf-dir", hf, "--tp", "4"], ["TP=4 does not divide num_attention_heads=6"]),
        (["--load", mc, "--hf-dir", str(root / "hf_untied")], ["another model", "tie_word_embeddings"]),
        (["--load", mc, "--hf-dir", hf, "--max-prompt-len", "4096"], ["--max-prompt-len"]),
        (["--load", mc, "--hf-dir", hf, "--kl-log-interval", "-1"], ["--kl-log-interval", ">= 0"]),
    ]
    for args, words in cases:
        assert_one_line_error(run_script("grpo.py", *args), *words)
    import torch
    if not torch.cuda.is_available():
        assert_one_line_error(run_script("grpo.py", "--load", mc, "--hf-dir", hf), "needs CUDA")


def trainstep_main(argv):
    """`test_grpo.py trainstep CKPT HF_DIR OUT_JSON [grpo flags]`: one GRPO update on CPU of a
    hand-made batch: one prompt, a completion with advantage +1 and one with -1."""
    import torch
    import convert
    import grpo
    ckpt, hf_dir, out = argv[:3]
    args = grpo.parse_args(["--load", ckpt, "--hf-dir", hf_dir, "--lr", "1e-3", "--kl-log-interval", "0", *argv[3:]])
    cfg = convert.resolve_config("custom", os.path.join(hf_dir, "config.json"))
    convert.init_distributed(args.tp, args.pp, use_cuda=False)
    model, optimizer = grpo.build_trainer(cfg, args, dtype=torch.float32, device="cpu")   # loads args.load
    samples = [{"prompt_ids": [5, 9, 3], "response_ids": [11, 12, 13, 14], "advantage": 1.0,
                "rollout_logps": [-1.0] * 4},                # stand-ins for vLLM's log-probs
               {"prompt_ids": [5, 9, 3], "response_ids": [21, 22], "advantage": -1.0, "rollout_logps": None}]
    batch = grpo.make_batch(samples)
    # the same step twice from the same checkpoint: with a separate old-log-prob pass, and with
    # the default (old = the update's own forward, detached); they must land on the same weights
    twin, twin_opt = grpo.build_trainer(cfg, args, dtype=torch.float32, device="cpu")
    twin_stats = grpo.train_on_batch(twin, twin_opt, dict(batch), args)
    before = grpo.compute_logprobs(model, batch, args)
    batch["old_logp"] = before
    stats = grpo.train_on_batch(model, optimizer, batch, args)
    after = grpo.compute_logprobs(model, batch, args)
    after_twin = grpo.compute_logprobs(twin, batch, args)
    # the reference: the same loss from the pure function on the same log-probs (ratio = 1)
    ref_loss, ref_n, ref_stats = grpo.policy_loss(before, before, batch["advantages"], batch["mask"], args.clip_ratio)
    m = batch["mask"]
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:   # a last stage
        with open(out, "w") as f:
            json.dump({"stats": stats, "ref_loss": float(ref_loss), "ref_tokens": float(ref_n),
                       "ref_neg_logp": float(ref_stats["neg_logp"]), "twin_stats": twin_stats,
                       "ref_logp_diff": float(((before[0] + 1.0).abs() * m[0]).sum()),   # row 0 only
                       "twin_max_diff": float(((after_twin - after) * m).abs().max()),
                       "step_size": float(((after - before) * m).abs().max()),
                       "before": [float((before[i] * m[i]).sum()) for i in range(2)],
                       "after": [float((after[i] * m[i]).sum()) for i in range(2)]}, f)
    convert.shutdown_distributed()


# ==============================================================================================
# run.sh
# ==============================================================================================
def run_sh_env(env=None):
    """This process's environment without run.sh's settings, plus `env`."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("MODEL_SIZE", "TP", "PP", "WANDB_API_KEY", "enable_wandb", "DRY_RUN", "MASTER_PORT")}
    e.update(env or {})
    return e


def run_sh(*args, env=None, timeout=60):
    return subprocess.run(["bash", "run.sh", *args], cwd=HERE, capture_output=True, text=True, env=run_sh_env(env),
                          timeout=timeout)


def test_run_sh_help_documents_every_variable():
    p = run_sh("--help")
    assert p.returncode == 0
    for var in ("MODEL_SIZE", "MODEL_DIR", "DATA_DIR", "CKPT_DIR", "GPUS_PER_NODE", "TP", "PP", "NNODES",
                "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "enable_wandb", "wandb_project", "WANDB_API_KEY"):
        assert f"  {var} " in p.stdout, var


def test_run_sh_dry_run_prints_the_pipeline_and_never_the_key(tmp_path):
    p = run_sh("--dry-run", "--steps", "5", env={"MODEL_SIZE": "7B", "GPUS_PER_NODE": "8", "enable_wandb": "True",
                                                "WANDB_API_KEY": "sk-very-secret", "CKPT_DIR": str(tmp_path / "ck"),
                                                "DATA_DIR": str(tmp_path / "data"), "MODEL_DIR": str(tmp_path / "m")})
    assert p.returncode == 0, p.stderr
    assert "sk-very-secret" not in p.stdout + p.stderr and "WANDB_API_KEY=set" in p.stdout
    cmds = [line[2:] for line in p.stdout.splitlines() if line.startswith("+ ")]
    assert [c.split()[1] if c.startswith("python") else c.split()[0] for c in cmds] == \
        ["grpo.py", "prepare.py", "prepare.py", "prepare.py", "torchrun", "torchrun", "torchrun"]
    check, cmds = cmds[0], cmds[1:]
    assert "download --local_dir" in cmds[0] and "download-model --model Qwen/Qwen2.5-7B-Instruct" in cmds[2]
    assert "--nproc_per_node 2 --master_port 29500 convert.py 7B" in cmds[3] and "--tp 2 --pp 1" in cmds[3]  # 7B: TP=2
    assert "--nproc_per_node 8 grpo.py" in cmds[4] and "--wandb-project grpo-megatron --steps 5" in cmds[4]
    assert cmds[5].endswith(f"true true bf16 {tmp_path / 'm'} --tp 2 --pp 1 --force")
    assert check.split(" --check-flags ")[1] == cmds[4].split(" grpo.py ")[1]    # the flags training gets
    assert not os.path.exists(tmp_path / "ck")                                                    # ran nothing


def test_run_sh_skips_steps_whose_output_exists(math_dir, tmp_path):
    data = tmp_path / "data"
    assert run_script("prepare.py", "--input_dir", math_dir, "--local_dir", str(data)).returncode == 0
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "ck" / "mcore").mkdir(parents=True)
    (tmp_path / "ck" / "mcore" / "metadata.json").write_text("{}")
    p = run_sh("--dry-run", env={"MODEL_SIZE": "0.5B", "GPUS_PER_NODE": "1", "CKPT_DIR": str(tmp_path / "ck"),
                                 "DATA_DIR": str(data), "MODEL_DIR": str(tmp_path / "m")})
    assert p.returncode == 0, p.stderr
    cmds = [line for line in p.stdout.splitlines() if line.startswith("+ ")]
    assert len(cmds) == 3 and "--check-flags" in cmds[0] and "grpo.py" in cmds[1] and "convert.py 0.5B" in cmds[2]
    assert p.stdout.count("= skip:") == 3 and "--wandb-project" not in cmds[1]


@pytest.mark.parametrize("env,words", [
    ({"MODEL_SIZE": "9B"}, ["MODEL_SIZE=9B"]),
    ({"TP": "3"}, ["TP=3", "divisible by 3"]),
    ({"GPUS_PER_NODE": "x"}, ["GPUS_PER_NODE=x is not a number"]),
    ({"enable_wandb": "yes"}, ["enable_wandb=yes"]),
    ({"GPUS_PER_NODE": "2", "TP": "4", "NNODES": "2"}, ["more than GPUS_PER_NODE=2"]),
    ({"MODEL_SIZE": "custom", "MODEL_DIR": "/nonexistent"}, ["MODEL_SIZE=custom needs MODEL_DIR"]),
])
def test_run_sh_bad_settings_fail_with_one_line(env, words):
    assert_one_line_error(run_sh("--dry-run", env=env), *words)


def done_steps_1_and_2(tmp_path):
    """Settings whose data and model steps are done, so that a run that is not dry goes straight
    to the conversion (which fails fast on a CPU machine) and never to a download."""
    for d, files in (("data", ("train.json", "test.json")), ("m", ("config.json",))):
        (tmp_path / d).mkdir()
        for f in files:
            (tmp_path / d / f).write_text("{}")
    return {"MODEL_SIZE": "0.5B", "GPUS_PER_NODE": "1", "DATA_DIR": str(tmp_path / "data"),
            "MODEL_DIR": str(tmp_path / "m"), "CKPT_DIR": str(tmp_path / "ck")}


@pytest.mark.parametrize("value", ["True", "true", "1"])
def test_run_sh_dry_run_variable_takes_the_spellings_of_enable_wandb(tmp_path, value):
    p = run_sh(env=dict(done_steps_1_and_2(tmp_path), DRY_RUN=value))
    assert p.returncode == 0, p.stderr
    assert "+ python convert.py 0.5B" in p.stdout and not os.path.exists(tmp_path / "ck")     # printed, not run


@pytest.mark.parametrize("value", ["yes", "2"])
def test_run_sh_dry_run_variable_rejects_other_spellings(tmp_path, value):
    p = run_sh(env=dict(done_steps_1_and_2(tmp_path), DRY_RUN=value))
    assert_one_line_error(p, f"DRY_RUN={value}")
    assert "+ " not in p.stdout


def test_run_sh_reads_numbers_with_leading_zeros_as_decimal(tmp_path):
    p = run_sh("--dry-run", env={"MODEL_SIZE": "7B", "GPUS_PER_NODE": "08", "TP": "08", "MASTER_PORT": "029501",
                                 "CKPT_DIR": str(tmp_path / "ck")})
    assert p.returncode == 0 and p.stderr == "", p.stderr
    train = next(line for line in p.stdout.splitlines() if line.startswith("+ torchrun --nnodes"))
    assert "--master_port 29501 --nproc_per_node 8 grpo.py" in train and "--tp 8 --pp 1" in train


def test_run_sh_conversion_and_export_use_master_port(tmp_path):
    p = run_sh("--dry-run", env={"MODEL_SIZE": "7B", "GPUS_PER_NODE": "2", "MASTER_PORT": "29517",
                                 "CKPT_DIR": str(tmp_path / "ck")})
    assert p.returncode == 0, p.stderr
    converts = [line for line in p.stdout.splitlines() if line.startswith("+ torchrun") and "convert.py" in line]
    assert len(converts) == 2 and all("--master_port 29517 " in c for c in converts), converts


@pytest.mark.xfail(reason="needs grpo.py --check-flags", strict=False)
def test_run_sh_stops_at_a_grpo_flag_typo_with_grpo_errors_line_before_step_1(math_dir, tmp_path):
    env = done_steps_1_and_2(tmp_path)
    shutil.rmtree(env["DATA_DIR"])
    shutil.copytree(math_dir, env["DATA_DIR"])         # parquet only: step 1 would write train.json
    p = run_sh("--stepz", "5", env=env)
    assert_one_line_error(p, "--stepz")
    assert p.stderr.strip().splitlines()[-1] == run_script("grpo.py", "--stepz", "5").stderr.strip().splitlines()[-1]
    assert not os.path.exists(os.path.join(env["DATA_DIR"], "train.json"))


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(HERE, "README.md")).read()
    block = readme.split("Run the tests", 1)[1].split("\n\n")[1]       # the indented block after that line
    commands = [line[4:] for line in block.splitlines()]
    ci = open(os.path.join(HERE, ".ci", "run")).read().splitlines()
    assert len(commands) >= 2 and ci[-len(commands):] == commands


def test_cpu_test_set_keeps_the_torch_of_a_gpu_env_and_of_this_one():
    """vllm 0.26.0 (requirements.txt) pins torch 2.11.0; pip replaces an installed torch that the
    CPU test set's torch requirement does not accept, which would break vLLM in a GPU env."""
    from importlib.metadata import version
    from packaging.requirements import Requirement
    lines = [line.split("#")[0].strip() for line in open(os.path.join(HERE, "requirements-cpu.txt"))]
    reqs = [Requirement(line) for line in lines if line]
    torch_req, = [r for r in reqs if r.name == "torch"]
    assert torch_req.specifier.contains("2.11.0") and torch_req.specifier.contains(version("torch"))


# ==============================================================================================
# GPU (run on a CUDA machine with vllm: python -m pytest -q -k gpu test_grpo.py -s)
# ==============================================================================================
def gpu_hf_model(path, cfg, dtype="float32"):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(Qwen2Config(**cfg))
    model.to(getattr(torch, dtype)).save_pretrained(path)
    return model


def gpu_tiny_model(path, vocab_size=64, texts=None):
    """A random 2-layer Qwen2 saved in `path` for the GPU runs. With `texts`, a tiny tokenizer
    trained on them goes there too, and its size (rounded up to 64) is the vocabulary."""
    if texts is not None:
        vocab_size = (len(make_tiny_tokenizer(path, texts)) + 63) // 64 * 64
    cfg = dict(tiny_qwen_config(True), vocab_size=vocab_size, hidden_size=256, intermediate_size=512,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    gpu_hf_model(path, cfg)
    return cfg


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


@gpu
def test_gpu_toy_task_learns_and_vllm_logprobs_match_megatron(tmp_path):
    """A random tiny Qwen2 (vocab 64) learns to emit token 7; after every weight sync vLLM's
    log-probs of the sampled tokens agree with Megatron's."""
    gpu_tiny_model(str(tmp_path / "hf"), vocab_size=64)
    p = run_script("convert.py", "custom", str(tmp_path / "hf"), str(tmp_path / "mc"), "false", "true", "bf16")
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_script("-m", "torch.distributed.run", "--nproc_per_node", "1", "grpo.py", "--load", str(tmp_path / "mc"),
                   "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--toy-token", "7",
                   "--steps", "30", "--prompts-per-step", "32", "--n-samples-per-prompt", "8", "--max-len", "40",
                   "--toy-prompt-len", "8", "--max-prompt-len", "8", "--lr", "1e-3", "--eval-interval", "0",
                   "--gpu-memory-utilization", "0.3", timeout=900)
    print(p.stdout[-6000:])
    assert p.returncode == 0, p.stderr[-5000:]
    m = read_metrics(tmp_path / "out" / "metrics.jsonl")
    rewards = [x["reward"] for x in m]
    print("reward curve:", " ".join(f"{r:.3f}" for r in rewards))
    print("logp diff:", " ".join(f"{x['logp_diff_vllm_megatron']:.4f}" for x in m))
    assert len(m) == 30
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1
    assert max(x["logp_diff_vllm_megatron"] for x in m) < 0.02


@gpu
def test_gpu_qwen25_05b_shape_converts_and_runs_three_steps(tmp_path):
    """The real Qwen2.5-0.5B config, random weights: convert on the GPU (logits checked), then
    three GRPO steps through vLLM and Megatron (toy reward: no tokenizer offline)."""
    import torch
    import convert
    cfg = convert.qwen_config("0.5B")
    hf = gpu_hf_model(str(tmp_path / "hf"), cfg)
    tokens = torch.randint(0, 151000, (2, 64))
    torch.save(tokens, tmp_path / "tokens.pt")
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        ref = hf(tokens.cuda()).logits.float().cpu()
    del hf
    torch.cuda.empty_cache()     # the trainer's vLLM sizes itself from the free memory
    for pr in ("fp32", "bf16"):
        t = time.time()
        p = run_script("-c", "import resource, convert, torch; convert.main(); "
                       "print('peak GPU GiB %.2f, peak RSS GiB %.2f' % (torch.cuda.max_memory_allocated() / 2**30, "
                       "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))",
                       "0.5B", str(tmp_path / "hf"), str(tmp_path / f"mc_{pr}"), "false", "true", pr)
        assert p.returncode == 0, p.stderr[-3000:]
        print(f"convert 0.5B HF->mcore {pr} USE_CUDA=true: {time.time() - t:.1f}s (with imports); {p.stdout.strip()}")
    p = run_script("test_grpo.py", "logits", str(tmp_path / "mc_fp32"), str(tmp_path / "hf" / "config.json"),
                   str(tmp_path / "tokens.pt"), str(tmp_path / "logits.pt"), "1", "1")
    assert p.returncode == 0, p.stderr[-3000:]
    diff = (torch.load(tmp_path / "logits.pt") - ref).abs().max().item()
    print(f"0.5B fp32 logits HF vs Megatron (GPU): max abs diff {diff:.2e}")
    assert diff < 1e-3
    p = run_script("-m", "torch.distributed.run", "--nproc_per_node", "1", "grpo.py", "--load", str(tmp_path / "mc_bf16"),
                   "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--model-size", "0.5B",
                   "--toy-token", "7", "--steps", "3", "--prompts-per-step", "32", "--n-samples-per-prompt", "16",
                   "--max-len", "1280", "--toy-prompt-len", "256", "--max-prompt-len", "256", "--eval-interval", "0",
                   timeout=900)
    print(p.stdout[-6000:])
    assert p.returncode == 0, p.stderr[-5000:]
    m = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert len(m) == 3 and all(math.isfinite(x["loss"]) for x in m)
    assert max(x["logp_diff_vllm_megatron"] for x in m) < 0.02


@gpu
def test_gpu_math_data_path_with_tokenizer_and_eval(math_dir, tmp_path):
    """The real data path: prepare.py's prompts, chat template, decode, math_reward in worker
    processes, and evaluation on the test split (a tiny random model with a tiny tokenizer)."""
    data = str(tmp_path / "data")
    assert run_script("prepare.py", "--input_dir", math_dir, "--local_dir", data).returncode == 0
    texts = [json.loads(line)["prompt"][0]["content"] for line in open(os.path.join(data, "train.json"))]
    gpu_tiny_model(str(tmp_path / "hf"), texts=texts * 5 + ["\\boxed{12} The answer is"] * 20)
    p = run_script("convert.py", "custom", str(tmp_path / "hf"), str(tmp_path / "mc"), "false", "true", "bf16")
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_script("-m", "torch.distributed.run", "--nproc_per_node", "1", "grpo.py", "--load", str(tmp_path / "mc"),
                   "--hf-dir", str(tmp_path / "hf"), "--data", data, "--out", str(tmp_path / "out"),
                   "--steps", "2", "--prompts-per-step", "8", "--n-samples-per-prompt", "4", "--max-len", "256",
                   "--max-prompt-len", "128", "--eval-interval", "2", "--eval-prompts", "7",
                   "--gpu-memory-utilization", "0.3", "--kl-log-interval", "2", timeout=900)
    print(p.stdout[-4000:])
    assert p.returncode == 0, p.stderr[-5000:]
    assert "prompts: 20 train (0 dropped" in p.stdout
    m = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert len(m) == 2 and "eval_accuracy" in m[1] and 0.0 <= m[1]["eval_accuracy"] <= 1.0
    evals = [json.loads(line) for line in open(tmp_path / "out" / "eval" / "step_000002.jsonl")]
    print(f"eval: generate {m[1]['time_eval_generate']:.1f}s, score {m[1]['time_eval_score']:.1f}s; first answer:",
          repr(evals[0]["response"][:300]))
    assert len(evals) == 7 and sum(e["reward"] for e in evals) / 7 == pytest.approx(m[1]["eval_accuracy"])
    assert all(0.0 <= x["reward"] <= 1.0 and x["logp_diff_vllm_megatron"] < 0.02 for x in m)
    assert "kl" not in m[0] and "kl" in m[1]                       # --kl-log-interval 2
    if m[0]["reward_std"] == 0:
        # all samples scored alike -> zero advantages -> zero gradient: the policy must still be
        # the loaded one (a bf16 optimizer built before loading would reset it to its random init)
        assert m[0]["grad_norm"] == 0 and m[1]["kl"] < 1e-3


@gpu
def test_gpu_run_sh_end_to_end_killed_in_step_3_resumes_and_exports(math_dir, tmp_path):
    """`bash run.sh` as a user runs it, on a tiny random model and generated MATH parquet files:
    prepare, convert, train; SIGKILL to the whole job during step 3; the rerun skips the done
    steps, resumes after step 2, finishes step 4, exports to HF, and vLLM loads the export."""
    import signal
    texts = [r["problem"] for r in math_rows(20, "train")] + ["\\boxed{12} The answer is"] * 20
    model_dir = str(tmp_path / "model")
    gpu_tiny_model(model_dir, texts=texts * 5)
    ck = tmp_path / "ck"
    settings = dict(MODEL_SIZE="custom", GPUS_PER_NODE="1", MODEL_DIR=model_dir, DATA_DIR=math_dir, CKPT_DIR=str(ck),
                    MASTER_PORT="29517", PYTHONUNBUFFERED="1")
    flags = ["--steps", "4", "--save-interval", "1", "--keep-last", "2", "--prompts-per-step", "8",
             "--n-samples-per-prompt", "4", "--max-len", "256", "--max-prompt-len", "128", "--eval-interval", "0",
             "--gpu-memory-utilization", "0.3"]
    metrics = ck / "grpo" / "metrics.jsonl"
    log1 = open(tmp_path / "run1.log", "w")
    job = subprocess.Popen(["bash", "run.sh", *flags], cwd=HERE, env=run_sh_env(settings), stdout=log1,
                           stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert job.poll() is None, open(tmp_path / "run1.log").read()[-5000:]
        assert time.time() - t0 < 600, "no step 2 within 600 s"
        time.sleep(0.05)
    # step 2 is logged: step 3 is under way. kill -9 the whole job: torchrun starts its workers in
    # sessions of their own, so the process group of run.sh is not enough.
    os.killpg(job.pid, signal.SIGKILL)
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and str(ck).encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass
    job.wait()
    time.sleep(5)                                 # nothing may still be training
    killed_at = len(metrics.read_text().splitlines())
    print(open(tmp_path / "run1.log").read()[-3000:])
    print(f"killed with {killed_at} steps logged; checkpoints: {sorted(os.listdir(ck / 'grpo' / 'checkpoints'))}")
    assert killed_at == 2
    p = run_sh(*flags, env=settings, timeout=900)
    print(p.stdout[-5000:])
    assert p.returncode == 0, p.stderr[-5000:]
    assert p.stdout.count("= skip:") == 3                        # data, model, conversion
    assert "resuming after step 2" in p.stdout
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]                                  # none lost, none repeated
    assert sorted(os.listdir(ck / "grpo" / "checkpoints")) == ["step_000003", "step_000004"]
    # the export: vLLM serves it (a fresh process, the way a user would evaluate the result)
    code = ("import sys; from vllm import LLM, SamplingParams; "
            "llm = LLM(model=sys.argv[1], gpu_memory_utilization=0.3, max_model_len=256, enforce_eager=True); "
            "o = llm.generate(['What is 2 + 2?'], SamplingParams(max_tokens=8, temperature=0)); "
            "print('vllm export ok:', len(o[0].outputs[0].token_ids), 'tokens')")
    v = run_script("-c", code, str(ck / "hf"), timeout=600)
    print(v.stdout[-500:])
    assert v.returncode == 0 and "vllm export ok: 8 tokens" in v.stdout, v.stderr[-3000:]


def optimizer_tensors(optimizer):
    """Copies of the master weights and Adam moments, param by param, state keys sorted."""
    import torch
    import grpo
    out = []
    for inner in grpo._torch_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                out.append(p.detach().clone())
                st = inner.state.get(p, {})
                out += [torch.as_tensor(st[k]).clone() for k in sorted(st)]
    return out


def ckpt_main(argv):
    """`test_grpo.py ckpt CKPT HF_DIR OUT_DIR RESULT_JSON [flags]`: three GRPO updates with a
    checkpoint after each (keep 2), a save killed half-way (a stale step_4.tmp), then a fresh
    trainer resumes from the newest complete checkpoint."""
    import torch
    import convert
    import grpo
    ckpt, hf_dir, out, result = argv[:4]
    dtype = torch.bfloat16 if "--bf16" in argv else torch.float32        # (a test flag, not grpo's)
    args = grpo.parse_args(["--load", ckpt, "--hf-dir", hf_dir, "--lr", "1e-3", "--kl-log-interval", "0",
                            *[a for a in argv[4:] if a != "--bf16"]])
    cfg = convert.resolve_config("custom", os.path.join(hf_dir, "config.json"))
    convert.init_distributed(args.tp, args.pp, use_cuda=False)
    model, optimizer = grpo.build_trainer(cfg, args, dtype=dtype, device="cpu")
    batch = grpo.make_batch([{"prompt_ids": [5, 9, 3], "response_ids": [11, 12, 13], "advantage": 1.0},
                             {"prompt_ids": [5, 9, 3], "response_ids": [21, 22], "advantage": -1.0}])
    batch["old_logp"] = grpo.compute_logprobs(model, batch, args)
    root = os.path.join(out, "checkpoints")
    for step in (1, 2, 3):
        grpo.train_on_batch(model, optimizer, batch, args)
        grpo.save_checkpoint(root, step, model, optimizer, cfg, {"order": [3, 1, 2], "cursor": step * 8}, keep_last=2)
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved_opt = optimizer_tensors(optimizer)
    if int(os.environ.get("RANK", "0")) == 0:
        os.makedirs(os.path.join(root, "step_000004.tmp"))          # killed while saving step 4
    torch.distributed.barrier()
    listing = sorted(os.listdir(root))
    fresh, fresh_opt = grpo.build_trainer(cfg, args, dtype=dtype, device="cpu")
    (step, path), = grpo.complete_checkpoints(root)[-1:]
    state = grpo.load_checkpoint(path, fresh, fresh_opt)
    same_params = all(torch.equal(p, saved[n]) for n, p in fresh.named_parameters())
    b = optimizer_tensors(fresh_opt)
    same_opt = len(b) == len(saved_opt) and all(torch.equal(x, y) for x, y in zip(saved_opt, b))
    # one more identical update on both: the resumed trainer continues exactly
    grpo.train_on_batch(model, optimizer, batch, args)
    grpo.train_on_batch(fresh, fresh_opt, batch, args)
    same_next = all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
    if int(os.environ.get("RANK", "0")) == 0:
        with open(result, "w") as f:
            json.dump({"listing": listing, "step": step, "state": state, "same_params": same_params,
                       "same_opt": same_opt, "same_next": same_next, "n_opt_state": len(b)}, f)
    convert.shutdown_distributed()


def shim_main(argv):
    """`python test_grpo.py SCRIPT ARGS...`: SCRIPT's main(ARGS) with the CPU shims."""
    import importlib
    import torch
    if not torch.cuda.is_available():
        cpu_shims()
    if argv[0] == "logits":
        return logits_main(argv[1:])
    if argv[0] == "trainstep":
        return trainstep_main(argv[1:])
    if argv[0] == "ckpt":
        return ckpt_main(argv[1:])
    importlib.import_module(argv[0].removesuffix(".py")).main(argv[1:])


if __name__ == "__main__":
    shim_main(sys.argv[1:])
