"""The specification of prepare.py, convert.py and grpo.py, as tests.

    python -m pytest -q test_grpo.py            # CPU: everything but the `gpu` tests
    python -m pytest -q -k gpu test_grpo.py     # on a CUDA machine with vllm installed

Nothing is downloaded: the fixtures write MATH-lighteval-shaped parquet files and tiny random
Qwen2-shaped checkpoints into pytest's tmp dirs.
"""
import json
import math
import os
import random
import re
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


def test_prepare_with_no_usable_row_is_one_line_error_and_writes_nothing(tmp_path):
    """A prompt set of zero rows means the columns or the answer format are wrong: say so, write nothing."""
    unboxed = [{"problem": f"What is {i} + {i}?", "solution": f"It is {2 * i}."} for i in range(5)]
    write_math_parquet(str(tmp_path / "in"), "train", unboxed)
    write_math_parquet(str(tmp_path / "in"), "test", math_rows(3, "test"))
    p = run_script("prepare.py", "--input_dir", str(tmp_path / "in"), "--local_dir", str(tmp_path / "out"))
    assert_one_line_error(p, "no usable train row", "all 5 skipped", "--answer_format boxed", "nothing was written")
    assert os.listdir(tmp_path / "out") == []


def gsm8k_rows(n):
    return [{"question": f"Tom has {i} apples and buys 1,000 more. How many?",
             "answer": f"He has {i} + 1000 = <<{i}+1000={i + 1000}>>{i + 1000:,} apples.\n#### {i + 1000:,}"}
            for i in range(n)]


def test_prepare_reads_a_gsm8k_layout_with_its_flags(tmp_path):
    """GSM8K as on the hub: main/{train,test}-*.parquet, question/answer, the answer after ####."""
    import pandas as pd
    os.makedirs(tmp_path / "gsm8k" / "main")
    train = gsm8k_rows(6) + [{"question": "No marker", "answer": "It is 4."}]
    pd.DataFrame(train).to_parquet(tmp_path / "gsm8k" / "main" / "train-00000-of-00001.parquet")
    pd.DataFrame(gsm8k_rows(3)).to_parquet(tmp_path / "gsm8k" / "main" / "test-00000-of-00001.parquet")
    p = run_script("prepare.py", "--input_dir", str(tmp_path / "gsm8k"), "--subdir", "main", "--question_column", "question",
                   "--answer_column", "answer", "--answer_format", "gsm8k", "--data_source", "openai/gsm8k")
    assert p.returncode == 0, p.stderr
    assert "train.json: 6 rows (1 skipped: no answer after #### or empty problem)" in p.stdout
    train, test = read_jsonl(tmp_path / "gsm8k" / "train.json"), read_jsonl(tmp_path / "gsm8k" / "test.json")
    assert [r["reward_model"]["ground_truth"] for r in train] == ["1000", "1001", "1002", "1003", "1004", "1005"]
    assert train[2]["prompt"] == [{"role": "user", "content": "Tom has 2 apples and buys 1,000 more. How many? "
                                   + prepare.INSTRUCTION}]
    assert train[0]["data_source"] == "openai/gsm8k" and len(test) == 3


def test_prepare_reads_jsonl_with_the_whole_answer_and_no_instruction(tmp_path):
    rows = [{"q": "2 + 2?", "a": 4}, {"q": "Capital of France?", "a": " Paris "}, {"q": "Empty?", "a": ""}]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    p = run_script("prepare.py", "--input_dir", str(tmp_path), "--subdir", ".", "--question_column", "q",
                   "--answer_column", "a", "--answer_format", "whole", "--instruction", "")
    assert p.returncode == 0, p.stderr
    train = read_jsonl(tmp_path / "train.json")
    assert [(r["prompt"][0]["content"], r["reward_model"]["ground_truth"]) for r in train] == \
        [("2 + 2?", "4"), ("Capital of France?", "Paris")]


@pytest.mark.parametrize("answer,answer_format,truth", [
    ("so $\\boxed{1}$ or rather $\\boxed{\\frac{1}{2}}$.", "boxed", "\\frac{1}{2}"),
    ("She has 3 + 2 = <<3+2=5>>5 apples.\n#### 1,005", "gsm8k", "1005"),
    ("#### 7\n#### -12", "gsm8k", "-12"),                         # the last marker
    ("no marker, 42", "gsm8k", None),
    ("####   ", "gsm8k", None),
    (" 42 ", "whole", "42"),
    (42, "whole", "42"),
    (None, "boxed", None),
])
def test_ground_truth_is_taken_from_the_answer_as_its_format_says(answer, answer_format, truth):
    assert prepare.ground_truth_of(answer, answer_format) == truth


def test_download_offline_is_one_line_error(tmp_path):
    p = run_script("prepare.py", "download", "--local_dir", str(tmp_path / "d"), timeout=300)
    assert_one_line_error(p, "AI-ModelScope/MATH-lighteval", "modelscope")


def test_every_script_has_help():
    for script in ("prepare.py", "convert.py", "grpo.py", "plot.py"):
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
    rewards, correct, timed_out = prepare.score_responses(responses, truths, num_workers=2, timeout_s=1)
    assert rewards == [1.0 if i < 3 else 0.0 for i in range(200)] + [0.0, 0.0]
    assert correct == [r == 1.0 for r in rewards]     # math_reward: right is scoring 1
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
    rewards, _, timed_out = prepare.score_responses(responses, truths, num_workers=2, timeout_s=1, stall_s=3,
                                                    reward_fn=reward_hangs_on_marker)
    elapsed = time.time() - t
    prepare.close_reward_workers()
    assert rewards == [0.0 if i == 5 else 1.0 for i in range(64)]
    assert timed_out == 1
    assert 3 <= elapsed < 30                   # waited out the stall once, then went on


def test_score_responses_survives_a_worker_that_dies():
    responses = [f"\\boxed{{{i}}}" for i in range(32)]
    responses[7] = "DIE"
    rewards, _, timed_out = prepare.score_responses(responses, [str(i) for i in range(32)], num_workers=2,
                                                    reward_fn=reward_dies_on_marker)
    again, _, _ = prepare.score_responses(["\\boxed{2}"] * 4, ["2"] * 4, num_workers=2, reward_fn=reward_dies_on_marker)
    prepare.close_reward_workers()
    assert rewards == [0.0 if i == 7 else 1.0 for i in range(32)] and timed_out == 1
    assert again == [1.0] * 4                  # the dead worker was replaced


def test_close_reward_workers_stops_the_worker_processes():
    import multiprocessing
    prepare.close_reward_workers()             # an earlier test's workers would be reused, not started
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
    assert p.returncode == 0 and p.stdout.strip() == "([1.0, 1.0, 1.0, 1.0], [True, True, True, True], 0)"


# ==============================================================================================
# The reward plug-in: grpo.py --reward MODULE:FUNCTION
# ==============================================================================================
def reward_is_the_response(response, ground_truth, **extra):
    """A reward whose score is written in the response: "1.1" scores 1.1. Module level, as the
    workers import reward functions by name."""
    return float(response)


def reward_is_the_response_top_1_1(response, ground_truth, **extra):
    return float(response)


reward_is_the_response_top_1_1.top_score = 1.1


def reward_is_the_response_and_right_above_half(response, ground_truth, **extra):
    return float(response), float(response) > 0.5


def reward_raises_on_marker(response, ground_truth, **extra):
    if response == "RAISE":
        return 1 / 0
    return 1.0


def reward_returns_none(response, ground_truth, **extra):
    return None


def test_reward_and_correct_takes_a_pair_as_given_and_a_float_as_right_at_the_top_score():
    assert prepare.reward_and_correct(1.0) == (1.0, True)              # math_reward's right answer
    assert prepare.reward_and_correct(0.0) == (0.0, False)
    assert prepare.reward_and_correct(0.1) == (0.1, False)
    assert prepare.reward_and_correct(1.1) == (1.1, True)
    assert prepare.reward_and_correct((1.1, True)) == (1.1, True)
    assert prepare.reward_and_correct((1.0, False)) == (1.0, False)    # the function's word, not the score's
    assert prepare.reward_and_correct(1.0, top_score=1.1) == (1.0, False)
    for bad in (None, "1", float("nan"), (1.0,), ("1", True)):
        with pytest.raises(ValueError):
            prepare.reward_and_correct(bad)


def score_with(reward_fn, texts, num_workers=2):
    """grpo.score on samples whose response decodes to `texts`, through the reward workers."""
    import types
    import grpo
    args = types.SimpleNamespace(toy_token=None, reward_workers=num_workers, reward_fn=reward_fn)
    tokenizer = types.SimpleNamespace(batch_decode=lambda ids, skip_special_tokens: ["".join(t) for t in ids])
    samples = [{"response_ids": [t], "truth": "1"} for t in texts]
    assert grpo.score(samples, args, tokenizer) == 0
    return samples


@pytest.mark.parametrize("reward_fn,correct", [
    (reward_is_the_response, [True, True, False]),                    # a float is right from top_score 1.0 on
    (reward_is_the_response_top_1_1, [True, False, False]),           # ... or from the top_score it declares
    (reward_is_the_response_and_right_above_half, [True, True, False]),   # a pair: the function says
])
def test_accuracy_is_the_share_the_reward_counts_right_not_the_share_scoring_one(reward_fn, correct):
    import grpo
    samples = score_with(reward_fn, ["1.1", "1.0", "0.1"])
    assert [s["score"] for s in samples] == [1.1, 1.0, 0.1] and [s["correct"] for s in samples] == correct
    assert grpo.share_correct(samples) == pytest.approx(sum(correct) / 3)        # 0.667 where two are right


def test_gsm8k_reward_is_right_on_the_last_number_and_adds_a_tenth_for_a_box():
    import gsm8k_reward
    assert gsm8k_reward.reward("2 + 3 = 5, so \\boxed{1,005}.", "1005") == (1.1, True)
    assert gsm8k_reward.reward("That makes 1,005 apples.", "1005") == (1.0, True)
    assert gsm8k_reward.reward("\\boxed{1004}", "1005") == (0.1, False)
    assert gsm8k_reward.reward("It is 1005, no: 7.", "1005") == (0.0, False)    # the last number counts
    assert gsm8k_reward.reward("no number", "1005") == (0.0, False)
    assert gsm8k_reward.reward("-2.50", "-2.5") == (1.0, True)


def test_gsm8k_reward_in_the_readme_is_the_one_in_its_file():
    readme = open(os.path.join(HERE, "README.md")).read()
    block = readme.split("`\\boxed{}` earns 0.1 more:\n\n", 1)[1].split("\n\n", 1)[0]
    code = "\n".join(line[4:] for line in block.splitlines())
    assert code.startswith("def reward(") and code in open(os.path.join(HERE, "gsm8k_reward.py")).read()


def test_a_reward_plug_in_runs_in_the_workers_through_grpo_flags_and_score():
    """--reward gsm8k_reward:reward as grpo.py resolves it, scored by grpo.score in worker processes."""
    import grpo
    args = grpo.parse_args(["--check-flags", "--reward", "gsm8k_reward:reward"])
    samples = score_with(args.reward_fn, ["so \\boxed{1}", "it is 1.", "\\boxed{2}", "none"])
    prepare.close_reward_workers()
    assert [(s["score"], s["correct"]) for s in samples] == [(1.1, True), (1.0, True), (0.1, False), (0.0, False)]
    assert grpo.share_correct(samples) == 0.5


@pytest.mark.parametrize("reward_fn,words", [
    (reward_raises_on_marker, ["test_grpo:reward_raises_on_marker raised ZeroDivisionError: division by zero"]),
    (reward_returns_none, ["test_grpo:reward_returns_none returned None", "(float, bool)"]),
])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_reward_that_raises_stops_the_scoring_with_one_line_naming_it(reward_fn, words, num_workers):
    from convert import UserError
    with pytest.raises(UserError) as e:
        score_with(reward_fn, ["1", "RAISE", "1"], num_workers=num_workers)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)
    if num_workers:
        assert prepare._WORKERS == []                     # stopped: no stale answer is scored later
    assert [s["score"] for s in score_with(prepare.math_reward, ["\\boxed{1}"] * 3, num_workers)] == [1.0] * 3
    prepare.close_reward_workers()


@pytest.mark.parametrize("spec,words", [
    ("gsm8k_reward", ["'gsm8k_reward' is not MODULE:FUNCTION"]),
    ("no_such_module:reward", ["cannot import no_such_module", "No module named 'no_such_module'"]),
    ("gsm8k_reward:no_such_function", ["gsm8k_reward", "has no function no_such_function"]),
    ("prepare:INSTRUCTION", ["prepare.INSTRUCTION is a str, not a function"]),
])
def test_a_bad_reward_flag_is_one_line_from_check_flags(spec, words):
    assert_one_line_error(run_script("grpo.py", "--check-flags", "--reward", spec), "--reward", spec, *words)


def test_reward_modules_are_found_by_name_and_refused_when_the_workers_could_not_call_them(tmp_path, monkeypatch):
    from convert import UserError
    (tmp_path / "my_rewards.py").write_text(
        "def two_args(response, ground_truth):\n    return 1.0\n"
        "lam = lambda response, ground_truth, **extra: 1.0\n"
        "def ok(response, ground_truth, **extra):\n    return 1.0\n"
        "def odd_top(response, ground_truth, **extra):\n    return 1.0\n"
        "odd_top.top_score = 'high'\n")
    monkeypatch.setattr(sys, "path", sys.path[:])         # load_reward adds the current folder
    monkeypatch.chdir(tmp_path)                           # found from the current folder, as documented
    assert prepare.load_reward("my_rewards:ok").__name__ == "ok"
    for spec, words in (("my_rewards.py:ok", "name the module, not its file (my_rewards:ok)"),
                        ("my_rewards:two_args", "cannot be called as two_args(response, ground_truth, timeout_s=...)"),
                        ("my_rewards:lam", "the reward workers cannot import it by name"),
                        ("my_rewards:odd_top", "odd_top.top_score is 'high', not a number")):
        with pytest.raises(UserError, match=re.escape(words)):
            prepare.load_reward(spec)
    sys.modules.pop("my_rewards", None)


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


def test_all_equal_fractional_group_gets_exactly_zero_advantage():
    """Eight rewards of 0.7 in float32: their mean is one unit in the last place off, which
    divided by std + eps used to give every sample +0.0059. Overlong penalties give such rewards
    too: answers of 90 tokens with budget 100, buffer 30 get 1 - 2/3 (scored 1) or -2/3 (scored 0)."""
    import torch
    import grpo
    assert grpo.group_advantages(torch.full((8,), 0.7), 8).tolist() == [0.0] * 8
    pen = grpo.overlong_penalty(torch.full((8,), 90), torch.full((8,), 100), 30, 1.0)
    for rewards in (1.0 + pen, pen, torch.full((16,), 0.1), torch.full((8,), 1 / 3)):
        n = len(rewards)
        assert grpo.group_advantages(rewards, n).tolist() == [0.0] * n
        assert grpo.group_advantages(rewards, n, norm_by_std=False).tolist() == [0.0] * n
        assert grpo.informative_groups(rewards, n).tolist() == [False]
    # one differing sample: mean 0.6375, std 0.1768 -> 0.0625 / 0.1768 and -0.4375 / 0.1768
    mixed = grpo.group_advantages(torch.tensor([0.7] * 7 + [0.2]), 8)
    assert mixed.tolist() == pytest.approx([0.3535] * 7 + [-2.4747], abs=1e-4)


def test_advantage_eps_is_1e_5():
    """Rewards [1, 0]: A = 0.5 / (std 0.70711 + 1e-5) = 0.70710 (verl's 1e-6 and TRL's 1e-4 differ
    from it in the fifth digit)."""
    import math
    import torch
    import grpo
    adv = grpo.group_advantages(torch.tensor([1.0, 0.0]), 2)
    assert float(adv[0]) == pytest.approx(0.5 / (math.sqrt(0.5) + 1e-5), rel=1e-6)
    assert float(adv[0]) != pytest.approx(0.5 / (math.sqrt(0.5) + 1e-6), rel=1e-6)


def test_single_sample_group_gets_zero_advantage():
    import torch
    import grpo
    assert grpo.group_advantages(torch.tensor([1.0, 0.0, 0.5]), 1).tolist() == [0.0, 0.0, 0.0]


def ref_policy_loss(logp, old, adv, mask, low, high, kl_coef, ref):
    import math
    total, n, clipped = 0.0, 0, 0
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(min(logp[b][t] - old[b][t], 10.0))
            s1, s2 = ratio * adv[b], min(max(ratio, 1 - low), 1 + high) * adv[b]
            d = max(-20.0, min(20.0, ref[b][t] - logp[b][t]))
            total += -min(s1, s2) + kl_coef * min(math.exp(d) - d - 1, 10.0)
            clipped += s2 < s1
            n += 1
    return total, n, clipped


def test_policy_loss_matches_reference_on_random_inputs():
    import torch
    import grpo
    torch.manual_seed(0)
    for low, high in ((0.2, 0.2), (0.2, 0.28)):
        for trial in range(5):
            B, S = 4, 7
            logp, old, ref = (-torch.rand(B, S) * 3 for _ in range(3))
            adv = torch.randn(B)
            mask = (torch.rand(B, S) < 0.7).float()
            mask[0] = 0                                   # a fully masked row contributes nothing
            loss, stats = grpo.policy_loss(logp, old, adv, mask, low, high, 0.1, ref)
            r_loss, r_n, r_clip = ref_policy_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), low, high,
                                                  0.1, ref.tolist())
            assert float(loss) == pytest.approx(r_loss, rel=1e-5, abs=1e-5)
            assert float(stats["loss_tokens"]) == r_n and float(stats["clip_frac"]) == r_clip


def test_policy_loss_worked_examples_of_its_docstring():
    """A=+1, ratio 1.5, clip 0.2 -> -1.2 (clipped); A=-1, ratio 1.5 -> 1.5 (never clipped toward harm)."""
    import math
    import torch
    import grpo
    one = torch.ones(1, 1)
    loss, stats = grpo.policy_loss(torch.full((1, 1), math.log(1.5)), torch.zeros(1, 1), torch.tensor([1.0]), one)
    assert float(loss) == pytest.approx(-1.2) and float(stats["clip_frac"]) == 1
    loss, stats = grpo.policy_loss(torch.full((1, 1), math.log(1.5)), torch.zeros(1, 1), torch.tensor([-1.0]), one)
    assert float(loss) == pytest.approx(1.5) and float(stats["clip_frac"]) == 0


def test_clip_higher_leaves_more_room_above_than_below():
    """DAPO's asymmetric clip, 0.2 below and 0.28 above: ratio 1.3 with A=+1 is cut at 1.28, and
    ratio 0.7 with A=-1 at 0.8."""
    import math
    import torch
    import grpo
    logp = torch.tensor([[math.log(1.3)], [math.log(0.7)]])
    loss, stats = grpo.policy_loss(logp, torch.zeros(2, 1), torch.tensor([1.0, -1.0]), torch.ones(2, 1), 0.2, 0.28)
    assert float(loss) == pytest.approx(-1.28 + 0.8) and float(stats["clip_frac"]) == 2
    loss, _ = grpo.policy_loss(logp, torch.zeros(2, 1), torch.tensor([1.0, -1.0]), torch.ones(2, 1), 0.2, 0.35)
    assert float(loss) == pytest.approx(-1.3 + 0.8)                 # 1.3 is inside a 0.35 clip


def test_dual_clip_caps_the_loss_of_a_negative_advantage_token():
    """A = -1, ratio 4: the PPO clip leaves the loss at 4.0; dual clip C = 3 caps it at 3 * |A| = 3.0,
    counted in clip_frac_dual (verl's pg_clipfrac_lower), not in clip_frac; the capped token's
    gradient is 0."""
    import math
    import torch
    import grpo
    logp = torch.full((1, 1), math.log(4.0), requires_grad=True)
    loss, stats = grpo.policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1))
    assert float(loss.detach()) == pytest.approx(4.0) and float(stats["clip_frac_dual"]) == 0
    loss, stats = grpo.policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), clip_ratio_c=3.0)
    assert float(loss.detach()) == pytest.approx(3.0) and float(stats["pg_loss"]) == pytest.approx(3.0)
    assert float(stats["clip_frac_dual"]) == 1 and float(stats["clip_frac"]) == 0
    loss.backward()
    assert float(logp.grad) == 0.0
    loss, _ = grpo.policy_loss(logp.detach(), torch.zeros(1, 1), torch.tensor([-0.5]), torch.ones(1, 1), clip_ratio_c=3.0)
    assert float(loss) == pytest.approx(1.5)                        # the cap scales with |A|: 3 * 0.5


def test_dual_clip_leaves_positive_advantages_and_ratios_below_c_alone():
    """C = 3: A = +1, ratio 4 -> -1.2 (the PPO clip's, as without C); A = -1, ratio 2 -> 2.0 (under 3)."""
    import math
    import torch
    import grpo
    logp = torch.tensor([[math.log(4.0)], [math.log(2.0)]])
    adv = torch.tensor([1.0, -1.0])
    with_c, stats = grpo.policy_loss(logp, torch.zeros(2, 1), adv, torch.ones(2, 1), clip_ratio_c=3.0)
    without, _ = grpo.policy_loss(logp, torch.zeros(2, 1), adv, torch.ones(2, 1))
    assert float(with_c) == float(without) == pytest.approx(-1.2 + 2.0) and float(stats["clip_frac_dual"]) == 0


def test_dual_clip_is_off_by_default_and_its_c_must_exceed_one():
    import grpo
    assert grpo.parse_args(["--check-flags"]).clip_ratio_c is None
    assert grpo.parse_args(["--check-flags", "--clip-ratio-c", "3"]).clip_ratio_c == 3.0
    assert_one_line_error(run_script("grpo.py", "--check-flags", "--clip-ratio-c", "0.5"), "--clip-ratio-c must be > 1")


def test_log_ratio_is_clamped_at_10():
    """logp - old_logp = 15 with A = +1 and no clip: the ratio is exp(10), not exp(15)."""
    import torch
    import grpo
    loss, stats = grpo.policy_loss(torch.full((1, 1), 15.0), torch.zeros(1, 1), torch.tensor([1.0]), torch.ones(1, 1),
                                   1.0, 1e9)
    assert float(stats["ratio"]) == pytest.approx(math.exp(10)) and float(loss) == pytest.approx(-math.exp(10))


def test_policy_loss_of_unchanged_policy_is_minus_token_weighted_advantage():
    import torch
    import grpo
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, stats = grpo.policy_loss(logp, logp, torch.tensor([2.0, -1.0]), mask)
    assert float(loss) == -(2.0 * 2 - 1.0 * 1) and float(stats["loss_tokens"]) == 3 and float(stats["clip_frac"]) == 0


def test_loss_weights_worked_example_of_each_aggregation():
    """Two answers of 1 and 3 tokens (and a filtered-out row), norm_len 4."""
    import torch
    import grpo
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1], [0, 0, 0]])
    w, n = grpo.loss_weights(mask, "token-mean", 4)
    assert w.tolist() == mask.tolist() and int(n) == 4
    w, n = grpo.loss_weights(mask, "seq-mean-token-mean", 4)
    assert w.flatten().tolist() == pytest.approx([1, 0, 0] + [1 / 3] * 3 + [0, 0, 0]) and int(n) == 2
    w, n = grpo.loss_weights(mask, "seq-mean-token-sum-norm", 4)
    assert w.tolist() == mask.tolist() and int(n) == 8
    # the same per-token losses [1 | 3 3 3]: token-mean 10/4, GRPO's seq-mean (1 + 3) / 2, Dr. GRPO 10/8
    loss = torch.tensor([[1.0, 0, 0], [3, 3, 3], [0, 0, 0]])
    means = [float((loss * w).sum() / n) for w, n in (grpo.loss_weights(mask, a, 4) for a in
                                                     ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"))]
    assert means == pytest.approx([2.5, 2.0, 1.25])


def test_seq_mean_token_sum_norm_divides_by_the_response_budget():
    """Dr. GRPO's constant is --max-len - --max-prompt-len (2048 - 1024 = 1024 by default), not the
    padded width: token losses [1 | 3 3 3] give 10 / (2 * 1024) at width 3 and at width 8 (verl
    without actor.loss_scale_factor divides by the width: 10 / (2 * 3) at width 3)."""
    import torch
    import grpo
    L = grpo.norm_len(grpo.parse_args(["--check-flags"]))
    assert L == 1024
    for width in (3, 8):
        mask, loss = torch.zeros(2, width), torch.zeros(2, width)
        mask[0, 0], mask[1, :3] = 1, 1
        loss[0, 0], loss[1, :3] = 1, 3
        w, n = grpo.loss_weights(mask, "seq-mean-token-sum-norm", L)
        assert int(n) == 2048 and float((loss * w).sum() / n) == pytest.approx(10 / 2048)


def test_overlong_filtered_answer_is_left_out_of_the_seq_mean_denominator():
    """Two answers with A = 1, the second truncated and filtered (its mask emptied): the loss is
    the first answer's, -1.0, under every aggregation (TRL's grpo and dr_grpo divide by both rows:
    -0.5 and -1 / (2 * norm_len))."""
    import torch
    import grpo
    logp = torch.full((2, 2), -1.0)
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    for agg, expected in (("token-mean", -1.0), ("seq-mean-token-mean", -1.0), ("seq-mean-token-sum-norm", -2 / 4)):
        w, n = grpo.loss_weights(mask, agg, 4)
        loss, _ = grpo.policy_loss(logp, logp, torch.tensor([1.0, 1.0]), w)
        assert float(loss / n) == pytest.approx(expected), agg
    assert int(grpo.loss_weights(mask, "seq-mean-token-mean", 4)[1]) == 1       # one answer, not two


def test_logged_entropy_is_a_token_mean_under_every_loss_agg():
    """Entropies [1 | 3 3 3] at the response tokens: the logged entropy is (1 + 9) / 4 = 2.5 under
    each --loss-agg, while the loss of the same numbers is 2.5, 2.0 and 1.25 (verl's actor/entropy
    follows the loss: 2.0 under seq-mean-token-mean)."""
    import torch
    import grpo
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 1]])
    ent = torch.tensor([[1.0, 0, 0], [3, 3, 3]])
    for agg, loss_mean in (("token-mean", 2.5), ("seq-mean-token-mean", 2.0), ("seq-mean-token-sum-norm", 1.25)):
        w, n = grpo.loss_weights(mask, agg, 4)
        _, stats = grpo.policy_loss(ent, ent, torch.zeros(2), w)        # only for loss_tokens
        red = {"loss": float((ent * w).sum()), "normaliser": float(n), "loss_tokens": float(stats["loss_tokens"]),
               "entropy": float(grpo.masked_sum(ent, (w > 0).float())), "pg_loss": 0.0, "clip_frac": 0.0,
               "clip_frac_dual": 0.0, "neg_logp": 0.0, "ratio": 0.0, "logp_diff_tokens": 0.0, "tis_weight": 0.0}
        m = grpo.step_metrics(red, {"grad_norm": 0.0, "update_skipped": 0.0, "optimizer_steps": 1.0}, False)
        assert m["entropy"] == pytest.approx(2.5) and m["loss"] == pytest.approx(loss_mean), agg


def test_informative_groups_are_those_whose_rewards_differ():
    import torch
    import grpo
    keep = grpo.informative_groups(torch.tensor([1.0, 1, 0, 1, 0, 0, 0.5, 0.25]), 2)
    assert keep.tolist() == [False, True, False, True]


def test_overlong_penalty_ramps_over_the_last_buffer_tokens():
    import torch
    import grpo
    pen = grpo.overlong_penalty(torch.tensor([50, 80, 90, 100]), torch.tensor([100, 100, 100, 100]), 20, 1.0)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0])
    # each sample's own budget: a 60-token answer to a prompt that left 70 tokens is in its buffer
    assert grpo.overlong_penalty(torch.tensor([60]), torch.tensor([70]), 20, 0.5).tolist() == pytest.approx([-0.25])


def test_each_prompt_may_be_answered_with_what_is_left_of_max_len():
    import types
    import grpo
    args = types.SimpleNamespace(max_len=20, tis_cap=0.0, filter_groups=False)
    assert grpo.rollout_requests([[1] * 3, [1] * 10], args, 0) == [(17, 0), (10, None)]
    assert grpo.rollout_requests([[1] * 3, [1] * 10], args, 1) == [(17, None), (10, None)]   # later rounds
    args.filter_groups = True                               # the first round's asking group may be dropped
    assert grpo.rollout_requests([[1] * 3, [1] * 10], args, 1) == [(17, 0), (10, None)]
    args.tis_cap = 2.0                                      # TIS needs vLLM's log-probs of every sample
    assert grpo.rollout_requests([[1] * 3, [1] * 10], args, 1) == [(17, 0), (10, 0)]


def test_rewards_are_shaped_by_the_overlong_switches():
    import types
    import grpo
    args = types.SimpleNamespace(overlong_buffer=10, overlong_penalty=1.0, overlong_filter=True)
    samples = [{"score": 1.0, "response_ids": [1] * 5, "budget": 20, "truncated": False},
               {"score": 1.0, "response_ids": [1] * 15, "budget": 20, "truncated": False},
               {"score": 0.0, "response_ids": [1] * 20, "budget": 20, "truncated": True}]
    grpo.shape_rewards(samples, args)
    assert [s["reward"] for s in samples] == pytest.approx([1.0, 0.5, -1.0])
    assert [s["in_loss"] for s in samples] == [1.0, 1.0, 0.0]            # the truncated answer leaves the loss
    args = types.SimpleNamespace(overlong_buffer=0, overlong_penalty=1.0, overlong_filter=False)
    grpo.shape_rewards(samples, args)
    assert [s["reward"] for s in samples] == [1.0, 1.0, 0.0] and all(s["in_loss"] == 1.0 for s in samples)


def test_dynamic_sampling_keeps_whole_groups_whose_rewards_differ():
    import grpo
    samples = [{"reward": r, "id": i} for i, r in enumerate([1, 1, 0, 1, 0, 0, 1, 0])]
    assert [s["id"] for s in grpo.keep_informative(samples, 2)] == [2, 3, 6, 7]


def test_tis_weights_are_the_capped_probability_ratio():
    import math
    import torch
    import grpo
    w = grpo.tis_weights(torch.tensor([math.log(0.5), math.log(0.9)]), torch.tensor([math.log(0.4), math.log(0.1)]), 2.0)
    assert w.tolist() == pytest.approx([1.25, 2.0])


def test_mini_batches_cover_every_row_once_in_near_equal_parts():
    import random
    import grpo
    parts = grpo.mini_batch_rows(10, 4, random.Random(0))
    assert sorted(i for p in parts for i in p) == list(range(10)) and sorted(len(p) for p in parts) == [2, 2, 3, 3]
    assert grpo.mini_batch_rows(3, 8, random.Random(0)) and len(grpo.mini_batch_rows(3, 8, random.Random(0))) == 3


def test_logp_diff_tripwire_examples():
    import grpo
    assert grpo.logp_diff_verdict([0.8, 1.2, 0.5], 0.1, 0.25) == "stop"       # two models from the start
    assert grpo.logp_diff_verdict([0.8, 1.2, 0.5], 0.1, 0.0) == "warn"        # --logp-diff-stop 0: never stop
    assert grpo.logp_diff_verdict([0.8, 0.01], 0.1, 0.25) == "ok"
    assert grpo.logp_diff_verdict([0.01, 0.3], 0.1, 0.25) == "warn"
    assert grpo.logp_diff_verdict([0.01, 0.02, 0.01, 0.9], 0.1, 0.25) == "warn"  # later jumps warn, never stop


def test_logp_diff_stop_is_a_one_line_error_naming_the_causes():
    import types
    import grpo
    from convert import UserError
    args = types.SimpleNamespace(logp_diff_warn=0.1, logp_diff_stop=0.25)
    with pytest.raises(UserError) as e:
        grpo.check_logp_diff([0.4, 1.8, 0.9], args, 0)
    assert "RoPE" in str(e.value) and "weight sync" in str(e.value) and "\n" not in str(e.value)
    grpo.check_logp_diff([0.004, 0.001], args, 0)                             # bf16 noise passes


def test_rollout_seeds_differ_by_step_stream_and_prompt_and_repeat_exactly():
    import grpo
    seeds = {grpo.rollout_seed(1234, step, stream, i) for step in range(20) for stream in range(4) for i in range(64)}
    assert len(seeds) == 20 * 4 * 64 and all(0 <= x < 2**62 for x in seeds)    # vLLM keeps int64 seeds
    assert grpo.rollout_seed(1234, 7, 1, 2) == grpo.rollout_seed(1234, 7, 1, 2)


def test_prompts_are_taken_in_order_and_reshuffled_without_skipping():
    import grpo
    state = {"order": list(range(10)), "cursor": 0, "epoch": 0}
    first = grpo.take_prompts(state, 4, 0) + grpo.take_prompts(state, 4, 0)
    wrap = grpo.take_prompts(state, 4, 0)                   # 2 left in epoch 0, then 2 of epoch 1
    assert first == list(range(8)) and wrap[:2] == [8, 9] and state["epoch"] == 1 and state["cursor"] == 2
    assert sorted(state["order"]) == list(range(10))


def test_kl_k3_is_zero_at_equal_policies_and_positive_elsewhere():
    import torch
    import grpo
    x = torch.tensor([-1.0, -2.0])
    assert grpo.kl_k3(x, x).tolist() == [0.0, 0.0]
    assert (grpo.kl_k3(x, x + torch.tensor([0.5, -0.5])) > 0).all()


def test_kl_gradient_is_the_k3_gradient_not_trls_ratio_corrected_one():
    """ref - logp = 1, on-policy, kl_coef 1: k3 = e - 2, dL/dlogp = -(e - 1) = -1.718 (verl's
    low_var_kl). TRL with use_bias_correction_kl multiplies k3 by the ratio (1 in value): its
    gradient is -(e - 1) + (e - 2) = -1.0."""
    import math
    import torch
    import grpo
    logp = torch.full((1, 1), -2.0, requires_grad=True)
    ref = torch.full((1, 1), -1.0)
    loss, stats = grpo.policy_loss(logp, logp.detach(), torch.zeros(1), torch.ones(1, 1), kl_coef=1.0, ref_logp=ref)
    loss.backward()
    assert float(stats["kl"]) == pytest.approx(math.e - 2) and float(logp.grad) == pytest.approx(-(math.e - 1))
    logp.grad = None
    ratio = torch.exp(logp - logp.detach())
    (grpo.kl_k3(logp, ref) * ratio).sum().backward()                    # the bias-corrected form, for contrast
    assert float(logp.grad) == pytest.approx(-1.0)


def test_kl_k3_is_clamped_at_10():
    """ref - logp = 5: k3 = e^5 - 6 = 142.4, clamped to 10 (as verl's low_var_kl; TRL does not clamp)."""
    import torch
    import grpo
    assert float(grpo.kl_k3(torch.tensor(-6.0), torch.tensor(-1.0))) == 10.0


def test_masked_mean_of_empty_mask_is_zero():
    import torch
    import grpo
    assert float(grpo.masked_mean(torch.ones(3), torch.zeros(3))) == 0.0
    assert float(grpo.masked_mean(torch.tensor([1.0, 3.0, 100.0]), torch.tensor([1.0, 1.0, 0.0]))) == 2.0


def test_make_batch_aligns_targets_and_mask_with_response_tokens():
    import grpo
    b = grpo.make_batch([{"prompt_ids": [5, 6], "response_ids": [7, 8], "rollout_logp": [-0.5, -0.25]},
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
    """Let megatron-core 0.16.1 train and run forwards on a CPU-only torch: what `grpo.py --device
    cpu` does to Megatron (convert.megatron_training_on_cpu, on top of convert.megatron_on_cpu), for
    the helpers below that build trainers themselves."""
    import convert
    convert.megatron_training_on_cpu()


def torchrun(*args, nproc, env=None, timeout=600):
    """`python -m torch.distributed.run --nproc_per_node NPROC ARGS` on a free rendezvous port, so
    that test runs side by side on one host (or next to a user's job) never share one. Every
    torchrun the tests start goes through here."""
    import convert
    return run_script("-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                      "--master_port", str(convert.free_port()), *args, env=env, timeout=timeout)


def run_shimmed(script, *args, nproc=1, timeout=600):
    """Run one of our scripts on CPU through the shims: `python test_grpo.py SCRIPT ARGS`, under
    torchrun (gloo) when nproc > 1."""
    if nproc == 1:
        return run_script("test_grpo.py", script, *args, timeout=timeout)
    return torchrun("test_grpo.py", script, *args, nproc=nproc, env={"OMP_NUM_THREADS": "1"}, timeout=timeout)


def run_convert(*args, nproc=1, timeout=600):
    """convert.py exactly as a user on a CPU host runs it (USE_CUDA=false among ARGS): `python
    convert.py ARGS`, or under torchrun with gloo when nproc > 1. No test shim is involved."""
    if nproc == 1:
        return run_script("convert.py", *args, timeout=timeout)
    return torchrun("convert.py", *args, nproc=nproc, env={"OMP_NUM_THREADS": "1"}, timeout=timeout)


def tiny_qwen_config(tied):
    # RoPE base 10000, not Qwen2.5's 1e6 (convert.py's old fallback): a reader that misses the base
    # builds Megatron with another one, and the logits tests show it.
    return dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=128, hidden_size=48,
                intermediate_size=64, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0,
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
    """HF tiny models (tied and untied), their mcore conversions by the CLI on CPU, a token batch and
    HF logits. The models are saved as transformers 5 saves them: the RoPE base only under
    `rope_parameters`, no top-level `rope_theta`."""
    import torch
    root = tmp_path_factory.mktemp("convert")
    out = {"root": root}
    torch.manual_seed(1)
    tokens = torch.randint(0, 128, (2, 16))
    torch.save(tokens, root / "tokens.pt")
    for tied in (True, False):
        tag = "tied" if tied else "untied"
        model = make_tiny_hf(str(root / f"hf_{tag}"), tied, seed=2 if tied else 3)
        saved = json.loads((root / f"hf_{tag}" / "config.json").read_text())
        assert "rope_theta" not in saved and saved["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
        with torch.no_grad():
            torch.save(model(tokens).logits, root / f"ref_{tag}.pt")
        p = run_convert("custom", str(root / f"hf_{tag}"), str(root / f"mc_{tag}"), "false", "false", "fp32")
        assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.mark.parametrize("tied", [True, False])
def test_hf_to_mcore_to_hf_round_trip_is_bit_exact(tiny_ckpts, tied):
    import torch
    root, tag = tiny_ckpts["root"], "tied" if tied else "untied"
    p = run_convert("custom", str(root / f"mc_{tag}"), str(root / f"back_{tag}"), "true", "false", "fp32",
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
    """The tiny models' config.json names their RoPE base (10000) only under `rope_parameters`, as
    transformers 5 writes it: Megatron is built with that base, so fp32 logits agree."""
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
    """HF -> mcore at TP=2 (`torchrun convert.py`, 2 gloo processes on CPU); that checkpoint gives
    the same logits at TP=2 and at PP=2 (dist_checkpointing reshards), and exports back to HF
    bit-exactly at PP=2."""
    import torch
    root = tiny_ckpts["root"]
    for tag in ("tied", "untied"):
        hf, mc = root / f"hf_{tag}", root / f"mc_tp2_{tag}"
        p = run_convert("custom", str(hf), str(mc), "false", "false", "fp32", "--tp", "2", nproc=2)
        assert p.returncode == 0, p.stderr[-3000:]
        ref = torch.load(root / f"ref_{tag}.pt")
        for tp, pp in ((2, 1), (1, 2)):
            out = root / f"logits_{tag}_{tp}{pp}.pt"
            p = run_shimmed("logits", str(mc), str(hf / "config.json"), str(root / "tokens.pt"), str(out),
                            str(tp), str(pp), nproc=2)
            assert p.returncode == 0, p.stderr[-3000:]
            assert (torch.load(out) - ref).abs().max() < 1e-4, (tag, tp, pp)
        back = root / f"back_pp2_{tag}"
        p = run_convert("custom", str(mc), str(back), "true", "false", "fp32", str(hf), "--pp", "2", nproc=2)
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


def test_convert_with_use_cuda_true_and_no_gpu_is_one_line_error(tiny_ckpts, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = run_convert("custom", str(tiny_ckpts["root"] / "hf_tied"), str(tmp_path / "o"), "false", "true", "bf16")
    assert_one_line_error(p, "USE_CUDA=true", "USE_CUDA=false")
    assert not os.path.exists(tmp_path / "o")


def test_single_process_conversion_needs_no_fixed_port(tiny_ckpts, tmp_path):
    """One process outside torchrun rendezvous on a free port: with port 29511 (the old fixed one)
    taken, the conversion still runs, as two conversions side by side on one host must."""
    import socket
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 29511))
        holder.listen()
    except OSError:
        pass                                   # someone else holds it already: just as good
    try:
        p = run_convert("custom", str(tiny_ckpts["root"] / "hf_tied"), str(tmp_path / "mc"), "false", "false", "fp32")
    finally:
        holder.close()
    assert p.returncode == 0, p.stderr[-3000:]
    assert os.path.isfile(tmp_path / "mc" / "metadata.json")


def test_convert_refuses_a_save_dir_that_is_inside_or_contains_its_input(tmp_path):
    """SAVE_DIR is replaced as a whole: pointing it at the input, even through a trailing slash, a
    relative path or a symlink, or at a folder inside or around it, would destroy the user's
    checkpoint. With or without --force: one line, and the input is untouched."""
    hf, mc = tmp_path / "outer" / "hf", tmp_path / "mc"
    hf.mkdir(parents=True)
    mc.mkdir()
    (hf / "config.json").write_text(json.dumps(tiny_qwen_config(True)))
    (hf / "model.safetensors").write_bytes(b"weights")
    (mc / "metadata.json").write_text("{}")
    (tmp_path / "link").symlink_to(hf)
    before = {p: p.read_bytes() for p in (hf / "config.json", hf / "model.safetensors", mc / "metadata.json")}
    force = "--force"
    cases = [
        ([str(hf), str(hf), "false"], "is LOAD_DIR"),                     # without --force: the old message
        ([str(hf), str(hf), "false", force], "is LOAD_DIR"),              # invited the user to pass it
        ([str(hf), str(hf) + "/", "false", force], "is LOAD_DIR"),
        ([str(hf), os.path.relpath(hf, HERE), "false", force], "is LOAD_DIR"),   # run_script's cwd is HERE
        ([str(hf), str(tmp_path / "link"), "false", force], "is LOAD_DIR"),
        ([str(hf), str(hf / "mc"), "false", force], "is inside LOAD_DIR"),
        ([str(hf), str(tmp_path / "outer"), "false", force], "contains LOAD_DIR"),
        ([str(mc), str(hf), "true", force], "is HF_DIR"),                 # Megatron -> HF over its HF_DIR
        ([str(mc), str(tmp_path / "outer"), "true", force], "contains HF_DIR"),
    ]
    for (load, save, mg2hf, *flags), words in cases:
        p = run_script("convert.py", "custom", load, save, mg2hf, "false", "fp32", str(hf), *flags)
        assert_one_line_error(p, words, "choose a SAVE_DIR outside it")
        assert {p: p.read_bytes() for p in before} == before, save
        assert sorted(os.listdir(hf)) == ["config.json", "model.safetensors"] and not os.path.exists(str(hf) + ".tmp")


def test_rope_base_is_read_as_transformers_reads_it(tmp_path):
    """vLLM reads config.json through transformers: convert.py must find the same RoPE base in
    every layout, transformers 4's top-level `rope_theta`, transformers 5's `rope_parameters`, the
    legacy `rope_scaling`, and none at all (transformers' default, not Qwen2.5's 1e6)."""
    from transformers import Qwen2Config
    import convert
    qwen25_05b = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
                  "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
                  "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21,
                  "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
                  "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
                  "torch_dtype": "bfloat16", "transformers_version": "4.43.1", "use_cache": True,
                  "use_sliding_window": False, "vocab_size": 151936}      # Qwen2.5-0.5B-Instruct's config.json
    tiny = {k: v for k, v in tiny_qwen_config(True).items() if k != "rope_theta"}
    layouts = {
        "Qwen2.5-0.5B": (qwen25_05b, 1e6),
        "transformers 4": (dict(tiny, rope_theta=5e5, rope_scaling=None), 5e5),
        "transformers 5": (dict(tiny, rope_parameters={"rope_theta": 5e5, "rope_type": "default"}), 5e5),
        "legacy rope_scaling": (dict(tiny, rope_theta=5e5, rope_scaling={"type": "default"}), 5e5),
        "no base": (tiny, 10000.0),
    }
    for name, (cfg, base) in layouts.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg))
        assert Qwen2Config.from_dict(dict(cfg)).rope_parameters["rope_theta"] == base, name   # what vLLM gets
        assert convert.resolve_config("custom", str(path))["rope_theta"] == base, name


@pytest.mark.parametrize("rope", [
    {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},  # Qwen2.5's long context
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}},
    {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_theta": 10000.0}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
])
def test_rope_other_than_plain_rope_is_refused(tmp_path, rope):
    """Megatron's GPTModel with rotary_base computes plain RoPE; transformers and vLLM would scale it."""
    import convert
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(tiny_qwen_config(True), **rope)))
    with pytest.raises(convert.UserError, match="RoPE variant our Megatron build does not reproduce"):
        convert.resolve_config("custom", str(path))


def test_two_different_rope_bases_are_refused(tmp_path):
    """transformers 5 takes the nested base over the top-level one; a reader that takes the other
    would run another model: neither is guessed."""
    import convert
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(tiny_qwen_config(True), rope_theta=1e6,
                                    rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})))
    with pytest.raises(convert.UserError, match="two RoPE bases"):
        convert.resolve_config("custom", str(path))


@pytest.mark.parametrize("fields,words,harmless", [
    # a window shorter than the sequences the model takes, and one no sequence reaches
    ({"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 2}, "sliding_window=64",
     {"use_sliding_window": True, "sliding_window": 256, "max_window_layers": 2}),
    ({"hidden_act": "gelu"}, "hidden_act=gelu", {"hidden_act": "silu"}),
    ({"head_dim": 16}, "head_dim=16", {"head_dim": 8}),           # tiny: hidden 48 / 6 heads = 8
    ({"is_causal": False}, "is_causal=false", {"is_causal": True}),
])
def test_config_fields_megatron_would_ignore_are_refused(tmp_path, fields, words, harmless):
    """Fields transformers (and vLLM) honour for a Qwen2 and our Megatron build would not are
    refused; the same fields with values that change nothing pass, and so does attention_bias,
    which Qwen2 in transformers and vLLM ignores (q/k/v always have biases)."""
    import convert
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(tiny_qwen_config(True), **fields)))
    with pytest.raises(convert.UserError, match=words):
        convert.resolve_config("custom", str(path))
    path.write_text(json.dumps(dict(tiny_qwen_config(True), attention_bias=False, **harmless)))
    assert convert.resolve_config("custom", str(path))["hidden_size"] == 48


def test_convert_refuses_scaled_rope_in_one_line_and_writes_nothing(tmp_path):
    hf = tmp_path / "hf"
    make_tiny_hf(str(hf), True)
    cfg = json.loads((hf / "config.json").read_text())
    for rope, words in ((dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
                         ["rope_scaling", "yarn"]),
                        (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
                         ["rope_parameters", "linear"])):
        (hf / "config.json").write_text(json.dumps(dict(cfg, **rope)))
        p = run_script("convert.py", "custom", str(hf), str(tmp_path / "mc"), "false", "false", "fp32")
        assert_one_line_error(p, *words, "does not reproduce")
        assert not os.path.exists(tmp_path / "mc") and not os.path.exists(tmp_path / "mc.tmp")


def count_keys(obj, key):
    """How many times `key` occurs as a dict key anywhere in a JSON value."""
    if isinstance(obj, dict):
        return sum((k == key) + count_keys(v, key) for k, v in obj.items())
    return sum(count_keys(v, key) for v in obj) if isinstance(obj, list) else 0


def test_hf_export_config_names_the_source_rope_base_once(tmp_path):
    """The export's config.json (write_hf, from the resolved config) holds one RoPE base, and
    transformers 5 reads it back as the source's base, for a source in either layout."""
    from transformers import AutoConfig
    import convert
    t5 = tmp_path / "t5"
    make_tiny_hf(str(t5), True)                                  # rope_parameters only
    t4 = tmp_path / "t4"
    t4.mkdir()
    (t4 / "config.json").write_text(json.dumps(dict(tiny_qwen_config(True), rope_theta=5e5, rope_scaling=None)))
    for src in (t5, t4):
        out = tmp_path / f"{src.name}_export"
        cfg = convert.resolve_config("custom", str(src / "config.json"))
        convert.write_hf(iter(()), str(out), cfg, str(src), "fp32")
        written = json.loads((out / "config.json").read_text())
        assert count_keys(written, "rope_theta") == 1, written
        want = AutoConfig.from_pretrained(src).rope_parameters["rope_theta"]
        assert AutoConfig.from_pretrained(out).rope_parameters["rope_theta"] == want == (1e4 if src == t5 else 5e5)


def test_hf_export_config_names_the_written_dtype(tmp_path):
    """transformers 5 saves `dtype`; the export of bf16 weights from an fp32 source must not keep
    the source's `dtype: float32` next to its own `torch_dtype` (transformers reads `dtype` first)."""
    import torch
    from transformers import AutoConfig
    import convert
    src = tmp_path / "hf"
    make_tiny_hf(str(src), True)
    assert json.loads((src / "config.json").read_text())["dtype"] == "float32"
    convert.write_hf(iter(()), str(tmp_path / "out"), convert.resolve_config("custom", str(src / "config.json")),
                     str(src), "bf16")
    assert AutoConfig.from_pretrained(tmp_path / "out").dtype == torch.bfloat16


def test_hf_export_keeps_the_tokenizer_and_its_chat_template(tmp_path):
    """transformers 5 keeps the chat template in chat_template.jinja: the export must carry it
    (and every other tokenizer file), so the exported policy formats chats as the source did.
    The source's weights and config.json are not copied: the export writes its own."""
    from transformers import AutoTokenizer
    import convert
    src = tmp_path / "hf"
    make_tiny_hf(str(src), True)
    make_tiny_tokenizer(str(src), ["What is 2 + 2? The answer is \\boxed{4}."] * 20)
    assert os.path.isfile(src / "chat_template.jinja")           # where transformers 5 saves the template
    out = tmp_path / "out"
    convert.write_hf(iter(()), str(out), convert.resolve_config("custom", str(src / "config.json")), str(src), "fp32")
    chat = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3 + 3?"}]
    want = AutoTokenizer.from_pretrained(src).apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    got = AutoTokenizer.from_pretrained(out).apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert got == want and want.endswith("<|im_start|>assistant\n")
    source_files = set(os.listdir(src)) - {"config.json", "model.safetensors"}
    assert source_files <= set(os.listdir(out)) and "model.safetensors" not in os.listdir(out)
    assert all((out / f).read_bytes() == (src / f).read_bytes() for f in source_files)


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
    assert r["stats"]["loss_tokens"] == r["ref_tokens"] == r["stats"]["normaliser"] == 6
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
                        "--max-len", "8", "--max-prompt-len", "4", "--micro-batch-tokens", "8", *flags, nproc=nproc)
        assert p.returncode == 0, p.stderr[-3000:]
        res.append(json.loads(out.read_text()))
    assert res[1]["before"] == pytest.approx(res[0]["before"], abs=1e-4)
    assert res[1]["after"] == pytest.approx(res[0]["after"], abs=1e-3)
    assert res[1]["stats"]["loss"] == pytest.approx(res[0]["stats"]["loss"], abs=1e-5)
    assert res[1]["stats"]["grad_norm"] == pytest.approx(res[0]["stats"]["grad_norm"], rel=1e-4)


# Several GRPO switches, each on a fresh trainer from the same checkpoint, in one CPU process per
# layout (see variants_main); the tests below read what it measured.
@pytest.fixture(scope="module")
def variants(tiny_ckpts, tmp_path_factory):
    root, out = tiny_ckpts["root"], tmp_path_factory.mktemp("variants")
    res = {}
    for name, nproc, flags in (("tp1", 1, []), ("dp2", 2, []), ("tp2", 2, ["--tp", "2"])):
        p = run_shimmed("variants", str(root / "mc_untied"), str(root / "hf_untied"), str(out / name), *flags, nproc=nproc)
        assert p.returncode == 0, p.stderr[-3000:]
        res[name] = [json.loads((out / f"{name}.{r}.json").read_text()) for r in range(nproc)]
    return res


def job_loss(ranks, key):
    """The batch loss as Megatron forms it: all ranks' weighted sums over all ranks' normalisers."""
    return sum(r[key]["loss"] for r in ranks) / sum(r[key]["normaliser"] for r in ranks)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_loss_aggregation_is_exact_over_micro_batches_and_data_parallel_ranks(variants, agg):
    one = variants["tp1"][0]
    assert one[f"{agg}/one-mb"]["normaliser"] == {"token-mean": 10, "seq-mean-token-mean": 4,
                                                  "seq-mean-token-sum-norm": 4 * 6}[agg]   # 10 tokens, 4 answers
    ref_loss = one[f"{agg}/one-mb"]["loss"] / one[f"{agg}/one-mb"]["normaliser"]
    ref_norm = one[f"{agg}/one-mb"]["grad_norm"]
    assert job_loss([one], f"{agg}/row-mbs") == pytest.approx(ref_loss, rel=1e-5)
    assert one[f"{agg}/row-mbs"]["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)
    dp2 = variants["dp2"]                                                  # each rank trains on half the rows
    assert job_loss(dp2, f"{agg}/row-mbs") == pytest.approx(ref_loss, rel=1e-5)
    assert dp2[0][f"{agg}/row-mbs"]["grad_norm"] == pytest.approx(ref_norm, rel=1e-5)


def test_the_aggregations_weigh_long_and_short_answers_differently(variants):
    one = variants["tp1"][0]
    norms = {agg: one[f"{agg}/one-mb"]["grad_norm"]
             for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")}
    assert len({round(v, 6) for v in norms.values()}) == 3


def test_chunked_log_probs_match_the_whole_micro_batch(variants):
    for layout in ("tp1", "tp2"):
        r = variants[layout][0]
        assert r["chunk3"]["loss"] == pytest.approx(r["nochunk"]["loss"], rel=1e-5)
        assert r["chunk3"]["grad_norm"] == pytest.approx(r["nochunk"]["grad_norm"], rel=1e-5)


def test_entropy_matches_a_softmax_over_the_full_vocabulary(variants):
    for layout in ("tp1", "tp2"):
        r = variants[layout][0]
        assert r["chunk3"]["entropy"] / r["chunk3"]["loss_tokens"] == pytest.approx(r["reference_entropy"], rel=1e-4)


def test_several_updates_per_batch_make_the_clip_fire(variants):
    r = variants["tp1"][0]
    assert r["m2e2"]["optimizer_steps"] == 4 and r["nochunk"]["optimizer_steps"] == 1
    assert r["m2e2"]["clip_frac"] > 0 and r["nochunk"]["clip_frac"] == 0     # one step: ratio 1, no clip


def test_tis_weights_scale_each_token_by_the_capped_ratio(variants):
    r = variants["tp1"][0]                           # vLLM said each token was half as likely: ratio 2, cap 1.5
    assert r["tis"]["tis_weight"] / r["tis"]["loss_tokens"] == pytest.approx(1.5, rel=1e-5)
    assert r["tis"]["loss"] == pytest.approx(1.5 * r["nochunk"]["loss"], rel=1e-5)


def test_norms_and_biases_are_not_weight_decayed(variants):
    r = variants["tp1"][0]["decay"]                  # zero advantages: only the weight decay acts
    assert r["decayed"] and all(abs(f - 0.95) < 1e-6 for f in r["decayed"].values())   # lr 0.1 x wd 0.5
    assert r["kept"] and all(r["kept"].values())     # RMSNorm weights and qkv biases unchanged


def test_memory_plan_counts_the_parameters_each_rank_holds(variants):
    for layout in ("tp1", "tp2"):
        for rank in variants[layout]:
            assert rank["params_held"] == pytest.approx(rank["params_planned"], rel=1e-9)


def test_memory_plan_activation_bytes_match_what_the_layers_keep(variants):
    """The plan counts what the GPU keeps (test_gpu_memory_plan_activations_match_what_the_gpu_keeps);
    on the CPU each of a layer's two RMSNorms keeps two fp32 copies of its input (8 bytes per
    element) where the fused CUDA kernel keeps its bf16 input (2): 12 h per layer more, at any TP."""
    for layout in ("tp1", "tp2"):
        r = variants[layout][0]
        assert r["act_measured"] == pytest.approx(r["act_planned"] + 12 * r["hidden"], rel=0.03), layout


def plan_for(size, gpu_gib, *flags):
    """grpo's memory plan of a Qwen2.5 size on one GPU; returns (plan, the settings it picked)."""
    import memory
    import grpo
    import convert
    args = grpo.parse_args(["--memory-plan", size, "--gpu-gib", str(gpu_gib), *flags])
    plan = memory.plan_and_pick_defaults(args, convert.qwen_config(size), 1, None, host_bytes=0)
    return plan, plan["settings"]


def test_memory_plan_turns_levers_on_only_as_the_gpu_gets_smaller():
    big, s_big = plan_for("3B", 200)
    assert s_big == {"micro_batch_tokens": 16384, "recompute": "none", "grad_reduce_dtype": "fp32",
                     "adam_moments": "gpu", "logits_chunk_tokens": 0}      # nothing to trade on a big GPU
    levers = []
    for gib in (80, 64, 52, 46):
        plan, s = plan_for("3B", gib)
        assert plan["train_peak"] <= 0.9 * gib * 2**30                    # at least 10% of the GPU free
        levers.append((s["adam_moments"] == "host", s["grad_reduce_dtype"] == "bf16", s["recompute"] == "full",
                       -s["micro_batch_tokens"], s["logits_chunk_tokens"] > 0))
    assert levers == sorted(levers) and levers[0] != levers[-1]            # ever more levers, never fewer


def test_memory_plan_keeps_what_the_user_set():
    _, s = plan_for("3B", 80, "--micro-batch-tokens", "16384", "--grad-reduce-dtype", "fp32")
    assert s["micro_batch_tokens"] == 16384 and s["grad_reduce_dtype"] == "fp32" and s["recompute"] == "full"


def test_a_layout_that_cannot_fit_is_refused_naming_one_that_does():
    p = run_script("grpo.py", "--memory-plan", "72B", "--gpu-gib", "80")
    assert_one_line_error(p, "TP 1 x PP 1 does not fit", "use --tp")
    tp, pp = (int(x) for x in p.stderr.split("use --tp ")[1].split(" --pp ")[0:1] + [p.stderr.split(" --pp ")[1].split()[0]])
    p = run_script("grpo.py", "--memory-plan", "72B", "--gpu-gib", "80", "--tp", str(tp), "--pp", str(pp),
                   "--world-size", str(tp * pp))
    assert p.returncode == 0 and "update peak" in p.stdout, p.stderr


def variants_main(argv):
    """`test_grpo.py variants CKPT HF_DIR OUT_PREFIX [flags]`: GRPO updates of a hand-made batch
    (two prompts, two answers each, 1 to 4 response tokens) under several switches, each from a
    fresh trainer; writes OUT_PREFIX.RANK.json. With DP 2 each rank takes half the rows."""
    import memory
    import math
    import torch
    import convert
    import grpo
    ckpt, hf_dir, out = argv[:3]
    flags = ["--grad-clip", "1e9", *argv[3:]]             # clip never acts, but the norm is computed
    cfg = convert.resolve_config("custom", os.path.join(hf_dir, "config.json"))
    base = cpu_trainer_args(ckpt, hf_dir, *flags)
    convert.init_distributed(base.tp, base.pp, use_cuda=False)
    from megatron.core import parallel_state as ps
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    samples = [{"prompt_ids": [5, 9, 3], "response_ids": [11, 12, 13, 14], "advantage": 1.0},
               {"prompt_ids": [5, 9, 3], "response_ids": [21], "advantage": -1.0},
               {"prompt_ids": [7, 2], "response_ids": [31, 32], "advantage": 0.5},
               {"prompt_ids": [7, 2], "response_ids": [41, 42, 43], "advantage": -0.5}]
    mine = samples[dp_rank * 4 // dp:(dp_rank + 1) * 4 // dp]
    res = {}

    def update(key, extra, old_pass=False, rollout_shift=None):
        args = cpu_trainer_args(ckpt, hf_dir, *flags, *extra)
        model, optimizer = grpo.build_trainer(cfg, args, dtype=torch.float32, device="cpu")
        batch = grpo.make_batch(mine)
        if old_pass or rollout_shift is not None:
            batch["old_logp"] = grpo.compute_logprobs(model, batch, args)
        if rollout_shift is not None:                     # vLLM's log-probs, shifted by a known amount
            batch["rollout_logp"] = batch["old_logp"] + rollout_shift
            batch["has_rollout_logp"][:] = 1
        res[key] = grpo.train_on_batch(model, optimizer, batch, args, random.Random(0))
        return model, args

    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        # norm_len 6 = max-len 9 - max-prompt-len 3 (the constant of Dr. GRPO)
        common = ["--loss-agg", agg, "--max-len", "9", "--max-prompt-len", "3", "--micro-batch-tokens"]
        update(f"{agg}/one-mb", common + ["64"])
        update(f"{agg}/row-mbs", common + ["9"])          # rows of 4-7 tokens: one row per micro batch
    model, args = update("nochunk", ["--logits-chunk-tokens", "0"])
    update("chunk3", ["--logits-chunk-tokens", "3"])
    update("m2e2", ["--mini-batches", "2", "--epochs", "2", "--lr", "0.05"], old_pass=True)
    update("tis", ["--tis-cap", "1.5", "--logits-chunk-tokens", "0"], rollout_shift=-math.log(2.0))
    # the entropy of the initial policy at the response positions, from plain full-vocabulary logits
    fresh, _ = grpo.build_trainer(cfg, args, dtype=torch.float32, device="cpu")
    batch = grpo.make_batch(mine)
    with torch.no_grad():
        logits = fresh(batch["tokens"], torch.arange(batch["tokens"].shape[1]).expand_as(batch["tokens"]), None)
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
        logp = torch.log_softmax(gather_from_tensor_model_parallel_region(logits).float(), dim=-1)
        ent = -(logp.exp() * logp).sum(-1)
    res["reference_entropy"] = float((ent * batch["mask"]).sum() / batch["mask"].sum())
    res["params_held"] = sum(p.numel() for p in fresh.parameters())
    res["params_planned"] = memory.params_per_rank(cfg, args.tp, args.pp)
    # weight decay alone: zero advantages, AdamW's decoupled decay p *= 1 - lr * wd
    args = cpu_trainer_args(ckpt, hf_dir, *flags, "--lr", "0.1", "--weight-decay", "0.5")
    model, optimizer = grpo.build_trainer(cfg, args, dtype=torch.float32, device="cpu")
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    grpo.train_on_batch(model, optimizer, grpo.make_batch([dict(s, advantage=0.0) for s in mine]), args, random.Random(0))
    after = dict(model.module.named_parameters())
    res["decay"] = {"decayed": {n: float((after[n] / before[n]).median()) for n in before if before[n].dim() == 2},
                    "kept": {n: bool(torch.equal(after[n], before[n])) for n in before
                             if "norm" in n or n.endswith(".bias")}}
    # activations kept for the backward, bytes per token and layer, against the plan's formula (bf16)
    res["act_measured"] = saved_bytes_per_layer(cfg, args.tp, "cpu")[0]
    res["act_planned"] = memory.activation_bytes(cfg, args.tp)
    res["hidden"] = cfg["hidden_size"]
    with open(f"{out}.{torch.distributed.get_rank()}.json", "w") as f:
        json.dump(res, f)
    convert.shutdown_distributed()


def saved_bytes_per_layer(cfg, tp, device, tokens=64):
    """Bytes per token that one layer of this shape keeps for its backward in bf16 (tensors saved
    by autograd, counted by storage, parameters excluded): a 2-layer model's count minus a 1-layer
    model's, so the embedding and the final norm cancel. Returns (bytes, [(bytes, dtype, shape)]
    of what the 1-layer model keeps, largest first)."""
    import torch
    import convert
    import grpo
    counts = {}
    for layers in (1, 2):
        c = dict(cfg, num_hidden_layers=layers)
        model = convert.build_model(c, convert.transformer_config(c, torch.bfloat16, tp, 1,
                                                                  use_cpu_initialization=device == "cpu"))
        model.to(device)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), str(t.dtype), list(t.shape))
            return t
        ids = torch.randint(0, cfg["vocab_size"], (1, tokens), device=device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            grpo.forward_hidden(model, ids, torch.arange(tokens, device=device).unsqueeze(0))
        counts[layers] = (sum(v[0] for v in saved.values()), sorted(saved.values(), reverse=True))
        del model
    return (counts[2][0] - counts[1][0]) / tokens, counts[1][1]


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tiny_tokenizer(path, texts, vocab_size=400, split_digits=False):
    """A small BPE tokenizer with Qwen's chat markers and a ChatML template, trained offline on
    `texts` (no hub): stands in for Qwen2.5's tokenizer in tests. split_digits: every digit its
    own token, as in Qwen2.5's tokenizer (arithmetic is learnable digit by digit)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def test_prompts_are_chat_templated_and_long_ones_dropped(math_dir, tmp_path):
    import grpo
    out = str(tmp_path / "data")
    assert run_script("prepare.py", "--input_dir", math_dir, "--local_dir", out).returncode == 0
    rows = prepare.load_prompt_file(os.path.join(out, "train.json"))
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
    from convert import UserError
    bad = tmp_path / "train.json"
    bad.write_text('{"prompt": [], "reward_model": {"ground_truth": "1"}}\n{"oops": 1}\n')
    with pytest.raises(UserError, match="line 2"):
        prepare.load_prompt_file(str(bad))
    with pytest.raises(UserError, match="not found"):
        prepare.load_prompt_file(str(tmp_path / "none.json"))


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


def write_metrics(path, steps, torn=False):
    path.write_text("".join(json.dumps({"step": s, "reward": s / 10}) + "\n" for s in steps)
                    + ('{"step": 9, "rew' if torn else ""))


def metric_steps(path):
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_drops_metrics_of_steps_that_will_be_redone(tmp_path):
    import grpo
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, range(0, 6))
    grpo.restore_metrics(str(path), 3)
    assert metric_steps(path) == [0, 1, 2, 3]          # the initial evaluation (step 0) stays with its run


def test_a_run_killed_before_its_first_checkpoint_restarts_its_log(tmp_path):
    import grpo
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, range(0, 3), torn=True)
    grpo.restore_metrics(str(path), 0)                  # nothing to resume: steps 1.. are redone
    assert path.read_text() == "" and not os.path.exists(str(path) + ".tmp")


def test_a_torn_last_metrics_line_is_dropped(tmp_path):
    import grpo
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, range(1, 4), torn=True)
    grpo.restore_metrics(str(path), 3)
    assert metric_steps(path) == [1, 2, 3]


def test_the_line_of_a_checkpointed_step_is_put_back_when_the_run_died_before_logging_it(tmp_path):
    import grpo
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, range(1, 4))                    # killed after saving step 4, before its line
    grpo.restore_metrics(str(path), 4, {"step": 4, "reward": 0.4})
    assert metric_steps(path) == [1, 2, 3, 4]
    grpo.restore_metrics(str(path), 4, {"step": 4, "reward": 99})   # a logged line is never replaced
    assert json.loads(path.read_text().splitlines()[-1])["reward"] == 0.4


def make_checkpoint_dirs(root, steps, tmp=()):
    for s in steps:
        os.makedirs(root / "checkpoints" / f"step_{s:06d}")
        (root / "checkpoints" / f"step_{s:06d}" / "train_state.json").write_text(json.dumps({"step": s}))
    for s in tmp:
        os.makedirs(root / "checkpoints" / f"step_{s:06d}.tmp")


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    import grpo
    make_checkpoint_dirs(tmp_path, (2, 10, 4), tmp=(12,))
    found = grpo.complete_checkpoints(str(tmp_path / "checkpoints"))
    assert [s for s, _ in found] == [2, 4, 10]          # by step number, the half-written save ignored
    assert [os.path.basename(p) for p in grpo.checkpoints_to_prune(found, 2)] == ["step_000002"]


def test_no_resume_into_a_folder_with_another_run_is_refused(tmp_path):
    import grpo
    from convert import UserError
    grpo.check_out_dir(str(tmp_path / "new"), resume=False)      # a fresh folder is fine
    make_checkpoint_dirs(tmp_path, (20,))
    grpo.check_out_dir(str(tmp_path), resume=True)               # resuming it is fine
    with pytest.raises(UserError, match="step 20"):
        grpo.check_out_dir(str(tmp_path), resume=False)


def test_a_finished_run_without_checkpoints_is_not_overwritten(tmp_path):
    import grpo
    from convert import UserError
    os.makedirs(tmp_path / "final")
    with pytest.raises(UserError, match="finished run"):
        grpo.check_out_dir(str(tmp_path), resume=True)


def test_prompt_set_fingerprint_changes_with_any_prompt_ground_truth_or_order():
    import grpo
    rows = [([1, 2, 3], "4"), ([5, 6], "\\frac{1}{2}"), ([7], "8")]
    fp = grpo.prompt_set_fingerprint(rows)
    assert fp["rows"] == 3 and len(fp["sha256"]) == 16 and fp == grpo.prompt_set_fingerprint([r for r in rows])
    for other in (rows[:2], [([1, 2, 3], "5")] + rows[1:], [([1, 2, 4], "4")] + rows[1:], rows[::-1]):
        assert grpo.prompt_set_fingerprint(other) != fp


def test_resume_on_another_prompt_set_is_refused_naming_both():
    """The saved data order of 7,500 MATH prompts fed to 16 GSM8K ones ran past the end
    (IndexError) mid-run; now the resume stops at once, naming both sets and the --data folder."""
    import grpo
    from convert import UserError
    math, gsm8k = {"rows": 7500, "sha256": "a1b2c3d4e5f60718"}, {"rows": 16, "sha256": "0f1e2d3c4b5a6978"}
    with pytest.raises(UserError) as e:
        grpo.check_prompt_set(math, gsm8k, "dataset/gsm8k")
    for w in ("7500 prompts", "a1b2c3d4e5f60718", "--data dataset/gsm8k gives 16", "0f1e2d3c4b5a6978", "new --out"):
        assert w in str(e.value)
    grpo.check_prompt_set(math, dict(math), "dataset/MATH-lighteval")     # the same set: resumes
    grpo.check_prompt_set(None, gsm8k, "dataset/gsm8k")                   # a checkpoint from before fingerprints


def test_no_resume_refusal_is_one_line_before_anything_starts(tiny_ckpts, tmp_path):
    root = tiny_ckpts["root"]
    make_checkpoint_dirs(tmp_path, (20,))
    p = run_script("grpo.py", "--load", str(root / "mc_tied"), "--hf-dir", str(root / "hf_tied"), "--out", str(tmp_path),
                   "--no-resume")
    assert_one_line_error(p, str(tmp_path / "checkpoints"), "--no-resume")
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_000020"]


def test_wandb_offline_run_is_written_and_the_key_never_printed(tmp_path):
    """enable_wandb without network: WANDB_MODE=offline gives a local run folder (to `wandb sync`
    later); the API key appears in no output."""
    code = ("import sys, types, grpo; "
            "args = types.SimpleNamespace(wandb_project='p', wandb_name='n', out=sys.argv[1]); "
            "run = grpo.start_wandb(args, {'hidden_size': 8}, 0); run.log({'reward': 0.5}, step=1); run.finish(); "
            "print('run', run.id)")
    p = run_script("-c", code, str(tmp_path), env={"WANDB_MODE": "offline", "WANDB_API_KEY": "sk-very-secret-0123456789"},
                   timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "sk-very-secret" not in p.stdout + p.stderr
    run_id = p.stdout.split("run ")[-1].strip()
    assert (tmp_path / "wandb_id.txt").read_text() == run_id
    assert any(d.startswith("offline-run-") and d.endswith(run_id) for d in os.listdir(tmp_path / "wandb"))


def test_plot_draws_the_curves_of_several_runs(tmp_path):
    for name, acc in (("grpo", [0.2, 0.4, 0.6]), ("control", [0.2, 0.21, 0.19])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(
            "".join(json.dumps({"step": 5 * i, "eval_accuracy": a, "reward": a}) + "\n" for i, a in enumerate(acc))
            + '{"step": 15, "rew')                                  # a run killed mid-line still plots
    out = tmp_path / "curve.png"
    p = run_script("plot.py", str(tmp_path / "grpo" / "metrics.jsonl"), f"lr 0={tmp_path / 'control' / 'metrics.jsonl'}",
                   "--out", str(out))
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not os.path.exists(str(out) + ".tmp.png")
    assert_one_line_error(run_script("plot.py", str(tmp_path / "nope.jsonl")), "nope.jsonl not found")
    assert_one_line_error(run_script("plot.py", str(tmp_path / "grpo" / "metrics.jsonl"), "--metrics", "kl"), "kl")


def test_prompts_that_do_not_divide_over_data_parallel_ranks_are_refused():
    import grpo
    from convert import UserError
    assert grpo.rollout_layout(64, 8, 2, 1) == (4, 4)             # 4 engines, 4 data-parallel ranks
    assert grpo.rollout_layout(8, 8, 2, 2) == (4, 2)              # PP stages roll out as extra engines
    with pytest.raises(UserError, match="multiple of 8"):
        grpo.rollout_layout(12, 8, 1, 1)                           # 4 prompts would never be trained on
    with pytest.raises(UserError, match="multiple of 8"):
        grpo.rollout_layout(4, 8, 1, 1)                            # fewer prompts than ranks


def test_check_flags_validates_the_layout_without_files_or_gpus():
    p = run_script("grpo.py", "--check-flags", "--prompts-per-step", "12", env={"WORLD_SIZE": "8"})
    assert_one_line_error(p, "--prompts-per-step 12", "multiple of 8")
    p = run_script("grpo.py", "--check-flags", "--prompts-per-step", "16", "--tp", "2", env={"WORLD_SIZE": "8"})
    assert p.returncode == 0 and "flags ok" in p.stdout, p.stderr
    assert_one_line_error(run_script("grpo.py", "--check-flags", "--stepz", "3"), "--stepz")


def test_gpu_out_of_memory_in_any_phase_is_one_line_naming_its_knobs(monkeypatch, capsys):
    import memory
    import torch
    import grpo

    def run_out_of_memory(args):
        with grpo.phase({"args": args, "gpu": False, "times": {}}, 3, "update"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.35 GiB")
    monkeypatch.setattr(grpo, "run", run_out_of_memory)
    with pytest.raises(SystemExit) as e:
        grpo.main(["--benchmark", "0.5B"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "'update'" in err[0] and "--micro-batch-tokens" in err[0]
    assert "--recompute full" in err[0]
    assert memory.out_of_memory_hint(RuntimeError("CUDA Error: out of memory at cumem_allocator.cpp:163"), "wake vLLM")
    assert memory.out_of_memory_hint(ValueError("Free memory on device (3/79 GiB) on startup is less than desired GPU "
                                              "memory utilization (0.9, 71 GiB)"), "start vLLM") is not None
    assert memory.out_of_memory_hint(KeyError("weights"), "update") is None


def test_other_errors_keep_their_traceback(monkeypatch):
    import grpo

    def broken(args):
        raise KeyError("weights")
    monkeypatch.setattr(grpo, "run", broken)
    with pytest.raises(KeyError):
        grpo.main(["--benchmark", "0.5B"])


def test_benchmark_mode_runs_the_documented_workload_without_a_checkpoint():
    """README: 128 prompts x 8 samples, 256-token prompts, exactly 1024 new tokens each, one warm-up
    step, then --benchmark-steps timed steps; --benchmark-prompts scales the prompt count."""
    import grpo
    a = grpo.parse_args(["--benchmark", "0.5B", "--steps", "99", "--prompts-per-step", "2"])
    assert (a.prompts_per_step, a.n_samples_per_prompt, a.toy_prompt_len, a.max_len - a.toy_prompt_len) == (128, 8, 256, 1024)
    assert a.steps == 1 + a.benchmark_steps and a.load is None and a.save_interval == 0 and not a.resume
    assert grpo.parse_args(["--benchmark", "7B", "--benchmark-prompts", "32"]).prompts_per_step == 32


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
        (["--load", mc, "--hf-dir", hf, "--micro-batch-tokens", "1000"], ["--micro-batch-tokens 1000", "--max-len 2048"]),
        (["--load", mc, "--hf-dir", hf, "--temperature", "0"], ["--temperature must be > 0"]),
        (["--load", mc, "--hf-dir", hf, "--mini-batches", "0"], ["--mini-batches must be >= 1"]),
        (["--load", mc, "--hf-dir", hf, "--tis-cap", "0.5"], ["--tis-cap must be >= 1"]),
        (["--load", mc, "--hf-dir", hf, "--clip-ratio-low", "1.5"], ["--clip-ratio-low must be < 1"]),
        (["--load", mc, "--hf-dir", hf, "--overlong-buffer", "5000"], ["--overlong-buffer"]),
    ]
    for args, words in cases:
        assert_one_line_error(run_script("grpo.py", *args), *words)
    import torch
    if not torch.cuda.is_available():
        assert_one_line_error(run_script("grpo.py", "--load", mc, "--hf-dir", hf), "needs CUDA", "--device cpu")


def cpu_trainer_args(ckpt, hf_dir, *flags):
    """grpo's arguments for a CPU trainer test: the memory settings that grpo.py's memory plan
    would pick on a GPU are given explicitly (flags later in the list win)."""
    import grpo
    return grpo.parse_args(["--load", ckpt, "--hf-dir", hf_dir, "--lr", "1e-3", "--kl-log-interval", "0",
                            "--micro-batch-tokens", "8192", "--recompute", "none", "--grad-reduce-dtype", "fp32",
                            "--adam-moments", "gpu", *flags])


def trainstep_main(argv):
    """`test_grpo.py trainstep CKPT HF_DIR OUT_JSON [grpo flags]`: one GRPO update on CPU of a
    hand-made batch: one prompt, a completion with advantage +1 and one with -1."""
    import torch
    import convert
    import grpo
    ckpt, hf_dir, out = argv[:3]
    args = cpu_trainer_args(ckpt, hf_dir, *argv[3:])
    cfg = convert.resolve_config("custom", os.path.join(hf_dir, "config.json"))
    convert.init_distributed(args.tp, args.pp, use_cuda=False)
    model, optimizer = grpo.build_trainer(cfg, args, dtype=torch.float32, device="cpu")   # loads args.load
    samples = [{"prompt_ids": [5, 9, 3], "response_ids": [11, 12, 13, 14], "advantage": 1.0,
                "rollout_logp": [-1.0] * 4},                # stand-ins for vLLM's log-probs
               {"prompt_ids": [5, 9, 3], "response_ids": [21, 22], "advantage": -1.0, "rollout_logp": None}]
    batch = grpo.make_batch(samples)
    # the same step twice from the same checkpoint: with a separate old-log-prob pass, and with
    # the default (old = the update's own forward, detached); they must land on the same weights
    twin, twin_opt = grpo.build_trainer(cfg, args, dtype=torch.float32, device="cpu")
    twin_stats = grpo.train_on_batch(twin, twin_opt, dict(batch), args, random.Random(0))
    before = grpo.compute_logprobs(model, batch, args)
    batch["old_logp"] = before
    stats = grpo.train_on_batch(model, optimizer, batch, args, random.Random(0))
    after = grpo.compute_logprobs(model, batch, args)
    after_twin = grpo.compute_logprobs(twin, batch, args)
    # the reference: the same loss from the pure function on the same log-probs (ratio = 1)
    ref_loss, ref_stats = grpo.policy_loss(before, before, batch["advantages"], batch["mask"])
    m = batch["mask"]
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:   # a last stage
        with open(out, "w") as f:
            json.dump({"stats": stats, "ref_loss": float(ref_loss), "ref_tokens": float(ref_stats["loss_tokens"]),
                       "ref_neg_logp": float(ref_stats["neg_logp"]), "twin_stats": twin_stats,
                       "ref_logp_diff": float(((before[0] + 1.0).abs() * m[0]).sum()),   # row 0 only
                       "twin_max_diff": float(((after_twin - after) * m).abs().max()),
                       "step_size": float(((after - before) * m).abs().max()),
                       "before": [float((before[i] * m[i]).sum()) for i in range(2)],
                       "after": [float((after[i] * m[i]).sum()) for i in range(2)]}, f)
    convert.shutdown_distributed()


# ==============================================================================================
# The loop on the CPU: grpo.py --device cpu, the TorchEngine, every layout rehearsed
# ==============================================================================================
def cpu_tiny_model(path, vocab_size=64, texts=None, seed=0):
    """A random 2-layer Qwen2 of hidden 64 (2 KV heads: TP 2 splits them) saved in `path`, small
    enough for a whole GRPO run on the CPU in seconds. With `texts`, a tiny tokenizer trained on
    them goes there too, and its size (rounded up to 64) is the vocabulary."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    if texts is not None:
        vocab_size = (len(make_tiny_tokenizer(path, texts)) + 63) // 64 * 64
    cfg = dict(tiny_qwen_config(True), vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(Qwen2Config(**cfg)).save_pretrained(path)
    return cfg


@pytest.fixture(scope="module")
def cpu_model(tmp_path_factory):
    """The tiny model in HF form and converted to Megatron (fp32: the CPU trains in fp32)."""
    root = tmp_path_factory.mktemp("cpu_model")
    cpu_tiny_model(str(root / "hf"))
    p = run_convert("custom", str(root / "hf"), str(root / "mc"), "false", "false", "fp32")
    assert p.returncode == 0, p.stderr[-3000:]
    return root


def engine_for(hf_dir, max_num_seqs=64):
    import grpo
    engine = grpo.TorchEngine(str(hf_dir), max_num_seqs, seed=0)
    from transformers import AutoModelForCausalLM
    engine.load_weights(AutoModelForCausalLM.from_pretrained(str(hf_dir)).state_dict().items())
    return engine


def test_cpu_engine_draws_each_sample_from_its_own_seed_whatever_its_batch(cpu_model):
    import grpo
    engine = engine_for(cpu_model / "hf")
    prompts = [[5, 9, 3], [7, 1, 2, 8, 4], [11]]
    reqs = [grpo.sampling_request(3, 1.0, 6, [], seed=100 * k) for k in range(3)]
    together = engine.generate(prompts, reqs)
    assert [len(s) for s in together] == [3, 3, 3] and all(len(x[0]) == 6 for s in together for x in s)
    assert engine.generate([prompts[1]], [reqs[1]]) == [together[1]]          # alone: the same samples
    assert engine_for(cpu_model / "hf", max_num_seqs=1).generate(prompts, reqs) == together   # one row at a time
    # sample j is drawn with seed + j, as vLLM does: sample 1 of seed 100 is sample 0 of seed 101
    assert engine.generate([prompts[1]], [grpo.sampling_request(1, 1.0, 6, [], seed=101)])[0][0] == together[1][1]
    assert engine.generate([prompts[1]], [grpo.sampling_request(3, 1.0, 6, [], seed=7)]) != [together[1]]


def test_cpu_engine_log_probs_are_the_sampled_tokens_after_temperature(cpu_model):
    import torch
    import grpo
    from transformers import AutoModelForCausalLM
    engine = engine_for(cpu_model / "hf")
    prompt = [5, 9, 3, 12]
    (samples,) = engine.generate([prompt], [grpo.sampling_request(2, 0.7, 8, [], logprobs=0, seed=3)])
    hf = AutoModelForCausalLM.from_pretrained(str(cpu_model / "hf")).float().eval()
    for ids, logps, finish in samples:
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1]
        expected = torch.log_softmax(logits / 0.7, -1)[torch.arange(len(ids)), torch.tensor(ids)]
        assert finish == "length" and len(logps) == 8
        assert torch.allclose(torch.tensor(logps), expected, atol=1e-5), (logps, expected)
    assert engine.generate([prompt], [grpo.sampling_request(1, 0.7, 8, [], seed=3)])[0][0][1] is None   # not asked


def test_cpu_engine_greedy_takes_the_most_likely_token_and_top_k_1_is_greedy(cpu_model):
    import torch
    import grpo
    from transformers import AutoModelForCausalLM
    engine = engine_for(cpu_model / "hf")
    prompt = [5, 9, 3]
    greedy = engine.generate([prompt], [grpo.sampling_request(1, 0.0, 8, [])])[0][0][0]
    hf = AutoModelForCausalLM.from_pretrained(str(cpu_model / "hf")).float().eval()
    ids = list(prompt)
    for _ in range(8):
        with torch.no_grad():
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    assert greedy == ids[3:]
    top1 = engine.generate([prompt], [grpo.sampling_request(1, 1.0, 8, [], top_k=1, seed=5)])[0][0][0]
    assert top1 == greedy


def test_cpu_engine_stops_at_a_stop_token_keeps_it_and_says_why(cpu_model, tmp_path):
    import grpo
    engine = engine_for(cpu_model / "hf")
    greedy = engine.generate([[5, 9, 3]], [grpo.sampling_request(1, 0.0, 8, [])])[0][0]
    assert greedy[2] == "length"
    stop = greedy[0][3]
    first = greedy[0].index(stop)
    out = engine.generate([[5, 9, 3]], [grpo.sampling_request(1, 0.0, 8, [stop])])[0][0]
    assert out[0] == greedy[0][:first + 1] and out[2] == "stop"
    # the stop token is also the last token allowed: "stop", as vLLM's check_stop tests stop tokens first
    assert engine.generate([[5, 9, 3]], [grpo.sampling_request(1, 0.0, first + 1, [stop])])[0][0] == (out[0], None, "stop")
    # the generation config's eos stops too, as in vLLM, unless the request ignores it
    hf = tmp_path / "hf"
    shutil.copytree(cpu_model / "hf", hf)
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}))
    eos_engine = engine_for(hf)
    assert eos_engine.generate([[5, 9, 3]], [grpo.sampling_request(1, 0.0, 8, [])])[0][0] == out
    assert eos_engine.generate([[5, 9, 3]], [grpo.sampling_request(1, 0.0, 8, [], ignore_eos=True)])[0][0] == greedy


def test_sample_token_draws_only_from_the_top_p_nucleus_with_its_renormalised_log_prob():
    import math
    import torch
    import grpo
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    req = grpo.sampling_request(1, 1.0, 1, [], top_p=0.7)
    g = torch.Generator().manual_seed(0)
    draws = [grpo.sample_token(logits, req, g) for _ in range(200)]
    assert {t for t, _ in draws} == {0, 1}                       # 0.5 + 0.3 reaches 0.7: the nucleus
    assert all(abs(lp - math.log([0.5, 0.3][t] / 0.8)) < 1e-5 for t, lp in draws)
    req_k = grpo.sampling_request(1, 1.0, 1, [], top_k=3)
    assert {grpo.sample_token(logits, req_k, g)[0] for _ in range(300)} == {0, 1, 2}


# Every layout of the same toy run: the rehearsal of TP, PP and DP on gloo. Every request's seed
# comes from its prompt's place in the step, so each layout must draw the samples of TP 1.
LAYOUTS = {"tp1": (1, []), "tp2": (2, ["--tp", "2"]), "pp2": (2, ["--pp", "2"]), "dp2": (2, []),
           "tp2pp2": (4, ["--tp", "2", "--pp", "2"])}
LAYOUT_RUN = ["--device", "cpu", "--toy-token", "7", "--prompts-per-step", "8", "--n-samples-per-prompt", "4",
              "--max-len", "24", "--toy-prompt-len", "8", "--max-prompt-len", "8", "--lr", "1e-2",
              "--eval-interval", "0", "--kl-log-interval", "2"]


def grpo_cpu(model_root, out, *flags, nproc=1):
    """grpo.py --device cpu on the tiny model, as a user runs it (no test shim): under torchrun
    (gloo) for several processes. Returns its metrics rows."""
    args = ["grpo.py", "--load", str(model_root / "mc"), "--hf-dir", str(model_root / "hf"), "--out", str(out),
            *LAYOUT_RUN, *flags]
    p = torchrun(*args, nproc=nproc, env={"OMP_NUM_THREADS": "1"}) if nproc > 1 else run_script(*args)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return read_metrics(os.path.join(out, "metrics.jsonl"))


@pytest.fixture(scope="module")
def layout_runs(cpu_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {name: grpo_cpu(cpu_model, root / name, "--steps", "3", *flags, nproc=nproc)
            for name, (nproc, flags) in LAYOUTS.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_on_cpu_checks_its_weight_sync_exactly_in_every_step(layout_runs, layout):
    # fp32 on both sides: the engine and Megatron compute the same model, so after every sync
    # (TP shards gathered, PP stages broadcast, qkv and gate-up split) the log-probs agree to rounding
    diffs = [m["logp_diff"] for m in layout_runs[layout]]
    assert len(diffs) == 3 and max(diffs) < 1e-4, diffs


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "tp1"])
def test_every_layout_on_cpu_trains_on_the_samples_of_tp1_with_its_losses(layout_runs, layout):
    ref, run = layout_runs["tp1"], layout_runs[layout]
    assert [m["rollout_digest"] for m in run] == [m["rollout_digest"] for m in ref]
    assert [m["reward"] for m in run] == [m["reward"] for m in ref]
    for key in ("loss", "pg_loss", "entropy", "neg_logp", "grad_norm"):
        assert [m[key] for m in run] == pytest.approx([m[key] for m in ref], rel=1e-4, abs=1e-6), key
    assert run[1]["kl"] == pytest.approx(ref[1]["kl"], rel=1e-4, abs=1e-7)     # the reference model, step 2
    assert ref[2]["reward"] > ref[0]["reward"]                                  # and it trained


def test_a_run_checkpointed_at_dp2_resumes_at_dp1_and_draws_what_it_would_have(cpu_model, layout_runs, tmp_path):
    out = tmp_path / "run"
    grpo_cpu(cpu_model, out, "--steps", "2", "--save-interval", "1", nproc=2)
    resumed = grpo_cpu(cpu_model, out, "--steps", "3", "--save-interval", "1")
    ref = layout_runs["tp1"]
    assert [m["step"] for m in resumed] == [1, 2, 3]
    assert [m["rollout_digest"] for m in resumed] == [m["rollout_digest"] for m in ref]
    assert resumed[2]["grad_norm"] == pytest.approx(ref[2]["grad_norm"], rel=1e-4)   # Adam's state came along


def test_toy_task_learns_on_cpu_through_the_whole_loop(cpu_model, tmp_path):
    rows = grpo_cpu(cpu_model, tmp_path / "run", "--steps", "12", "--prompts-per-step", "16",
                    "--n-samples-per-prompt", "8", "--max-len", "40", "--save-interval", "0")
    rewards = [m["reward"] for m in rows]
    print("toy reward by step:", " ".join(f"{r:.3f}" for r in rewards))
    assert rewards[0] < 0.05                          # a random policy: about 1 token in 64
    assert sum(rewards[-3:]) / 3 > 0.5
    assert max(m["logp_diff"] for m in rows) < 1e-4
    assert os.path.isfile(tmp_path / "run" / "final" / "metadata.json")


PARITY_REWARD = """
def reward(response, ground_truth, **extra):
    right = len(response) % 2 == 1
    return (1.1 if right else 0.1), right
"""


def test_a_reward_plug_in_drives_the_cpu_loop_and_a_resume_on_other_prompts_stops(tmp_path):
    """GSM8K-shaped data through prepare.py, a reward module found on PYTHONPATH, the whole loop on
    the CPU: the metrics count what the reward marks right (its scores are 1.1 and 0.1, so no
    sample scores exactly 1), and a resume on another prompt set stops in one line, on its own resumes."""
    import pandas as pd
    src, data = tmp_path / "gsm8k", tmp_path / "data"
    os.makedirs(src / "main")
    pd.DataFrame(gsm8k_rows(8)).to_parquet(src / "main" / "train-00000-of-00001.parquet")
    pd.DataFrame(gsm8k_rows(4)).to_parquet(src / "main" / "test-00000-of-00001.parquet")
    p = run_script("prepare.py", "--input_dir", str(src), "--local_dir", str(data), "--subdir", "main",
                   "--question_column", "question", "--answer_column", "answer", "--answer_format", "gsm8k")
    assert p.returncode == 0, p.stderr
    texts = [r["prompt"][0]["content"] for r in read_jsonl(data / "train.json")]
    cpu_tiny_model(str(tmp_path / "hf"), texts=texts * 5)
    p = run_convert("custom", str(tmp_path / "hf"), str(tmp_path / "mc"), "false", "false", "fp32")
    assert p.returncode == 0, p.stderr[-3000:]
    (tmp_path / "rewards").mkdir()
    (tmp_path / "rewards" / "parity_reward.py").write_text(PARITY_REWARD)
    env = {"PYTHONPATH": str(tmp_path / "rewards"), "OMP_NUM_THREADS": "1"}
    flags = ["grpo.py", "--device", "cpu", "--load", str(tmp_path / "mc"), "--hf-dir", str(tmp_path / "hf"),
             "--reward", "parity_reward:reward", "--out", str(tmp_path / "out"), "--prompts-per-step", "4",
             "--n-samples-per-prompt", "4", "--max-len", "96", "--max-prompt-len", "80", "--kl-log-interval", "0",
             "--eval-interval", "1", "--eval-prompts", "4", "--save-interval", "1", "--reward-workers", "2"]
    p = run_script(*flags, "--data", str(data), "--steps", "1", env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    ev0, m = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert 0 < m["accuracy"] and m["score"] == pytest.approx(0.1 + m["accuracy"])   # was: share scoring 1 = 0
    assert ev0["eval_score"] == pytest.approx(0.1 + ev0["eval_accuracy"])
    evals = read_jsonl(tmp_path / "out" / "eval" / "step_000001.jsonl")
    assert len(evals) == 4 and all(e["score"] == (1.1 if e["correct"] else 0.1) for e in evals)
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "test"):
        (other / f"{split}.json").write_text("".join(open(data / f"{split}.json").readlines()[:4]))
    p = run_script(*flags, "--data", str(other), "--steps", "2", env=env)
    assert_one_line_error(p, "trained on 8 prompts", f"--data {other} gives 4", "new --out")
    p = run_script(*flags, "--data", str(data), "--steps", "2", env=env)       # its own prompt set: resumes
    assert p.returncode == 0 and "resuming after step 1" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]
    assert [x["step"] for x in read_metrics(tmp_path / "out" / "metrics.jsonl")] == [0, 1, 2]


@pytest.mark.parametrize("flag", [["--gpu-memory-utilization", "0.5"], ["--sleep-level", "1"], ["--ref-on-gpu"],
                                  ["--adam-moments", "host"], ["--grad-reduce-dtype", "bf16"], ["--gpu-gib", "80"],
                                  ["--recompute", "full"],
                                  ["--benchmark", "0.5B"]])
def test_gpu_only_flags_are_refused_with_device_cpu(flag):
    assert_one_line_error(run_script("grpo.py", "--check-flags", "--device", "cpu", *flag), flag[0], "--device cpu")


# ==============================================================================================
# run.sh
# ==============================================================================================
def run_sh_env(env=None):
    """This process's environment without run.sh's settings, plus `env`."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("MODEL_SIZE", "TP", "PP", "WANDB_API_KEY", "enable_wandb", "DRY_RUN", "MASTER_PORT", "DEVICE",
                      "REWARD")}
    e.update(env or {})
    return e


def run_sh(*args, env=None, timeout=60):
    return subprocess.run(["bash", "run.sh", *args], cwd=HERE, capture_output=True, text=True, env=run_sh_env(env),
                          timeout=timeout)


def test_run_sh_help_documents_every_variable():
    p = run_sh("--help")
    assert p.returncode == 0
    for var in ("MODEL_SIZE", "MODEL_DIR", "DATA_DIR", "CKPT_DIR", "GPUS_PER_NODE", "TP", "PP", "NNODES",
                "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "enable_wandb", "wandb_project", "WANDB_API_KEY", "REWARD"):
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


def test_run_sh_runs_72b_over_two_nodes_and_converts_on_one(tmp_path):
    """72B fits 80 GB GPUs only with two pipeline stages (the memory plan): 16 GPUs; the conversion
    runs on node 0 alone with TP only, and training loads it at TP x PP."""
    env = {"MODEL_SIZE": "72B", "NNODES": "2", "CKPT_DIR": str(tmp_path / "ck"), "DATA_DIR": str(tmp_path / "d"),
           "MODEL_DIR": str(tmp_path / "m")}
    p = run_sh("--dry-run", env=env)
    assert p.returncode == 0, p.stderr
    cmds = [line[2:] for line in p.stdout.splitlines() if line.startswith("+ ")]
    convert = [c for c in cmds if "convert.py" in c]
    train = [c for c in cmds if "grpo.py" in c and "--check-flags" not in c]
    assert all("--nproc_per_node 8 " in c and "--tp 8 --pp 1" in c for c in convert) and len(convert) == 2
    assert "--nnodes 2" in train[0] and "--tp 8 --pp 2" in train[0]
    assert_one_line_error(run_sh("--dry-run", env=dict(env, NNODES="1")), "8 GPUs cannot be split", "TP=8 x PP=2")


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


def test_run_sh_on_cpu_prepares_converts_trains_and_exports_a_model_that_generates(math_dir, tmp_path):
    """`DEVICE=cpu bash run.sh` on a tiny model with a tokenizer and generated MATH parquet files:
    the whole pipeline without a GPU (the math reward, the chat template, an evaluation), and
    the export loads in transformers and generates."""
    import convert
    from transformers import AutoModelForCausalLM, AutoTokenizer
    texts = [r["problem"] for r in math_rows(20, "train")] + ["\\boxed{12} The answer is"] * 20
    model_dir = str(tmp_path / "model")
    cpu_tiny_model(model_dir, texts=texts * 5)
    ck = tmp_path / "ck"
    settings = dict(DEVICE="cpu", MODEL_SIZE="custom", MODEL_DIR=model_dir, DATA_DIR=math_dir, CKPT_DIR=str(ck),
                    MASTER_PORT=str(convert.free_port()))
    p = run_sh("--steps", "2", "--prompts-per-step", "4", "--n-samples-per-prompt", "4", "--max-len", "192",
               "--max-prompt-len", "128", "--eval-interval", "2", "--eval-prompts", "4", "--reward-workers", "1",
               env=settings, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "DEVICE=cpu" in p.stdout and "--device cpu" in p.stdout
    assert "convert.py custom " + model_dir + " " + str(ck / "mcore") + " false false bf16" in p.stdout
    rows = read_metrics(ck / "grpo" / "metrics.jsonl")
    assert [m["step"] for m in rows] == [0, 1, 2] and "eval_accuracy" in rows[0] and "eval_accuracy" in rows[2]
    assert all(m["logp_diff"] < 1e-4 for m in rows[1:])
    tok = AutoTokenizer.from_pretrained(str(ck / "hf"))
    model = AutoModelForCausalLM.from_pretrained(str(ck / "hf"))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8


@pytest.mark.parametrize("env,words", [
    ({"MODEL_SIZE": "9B"}, ["MODEL_SIZE=9B"]),
    ({"TP": "3"}, ["TP=3", "divisible by 3"]),
    ({"GPUS_PER_NODE": "x"}, ["GPUS_PER_NODE=x is not a number"]),
    ({"enable_wandb": "yes"}, ["enable_wandb=yes"]),
    ({"GPUS_PER_NODE": "2", "TP": "4", "NNODES": "2"}, ["TP=4 is more than GPUS_PER_NODE=2"]),
    ({"MODEL_SIZE": "custom", "MODEL_DIR": "/nonexistent"}, ["MODEL_SIZE=custom needs MODEL_DIR"]),
    ({"DEVICE": "gpu"}, ["DEVICE=gpu", "cuda or cpu"]),
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


def test_run_sh_stops_at_a_grpo_flag_typo_with_grpo_errors_line_before_step_1(math_dir, tmp_path):
    env = done_steps_1_and_2(tmp_path)
    shutil.rmtree(env["DATA_DIR"])
    shutil.copytree(math_dir, env["DATA_DIR"])         # parquet only: step 1 would write train.json
    p = run_sh("--stepz", "5", env=env)
    assert_one_line_error(p, "--stepz")
    assert p.stderr.strip().splitlines()[-1] == run_script("grpo.py", "--stepz", "5").stderr.strip().splitlines()[-1]
    assert not os.path.exists(os.path.join(env["DATA_DIR"], "train.json"))


def test_run_sh_stops_at_prompts_that_do_not_divide_over_the_gpus_before_step_1(math_dir, tmp_path):
    env = done_steps_1_and_2(tmp_path)
    shutil.rmtree(env["DATA_DIR"])
    shutil.copytree(math_dir, env["DATA_DIR"])
    p = run_sh("--prompts-per-step", "12", env=dict(env, GPUS_PER_NODE="8"))
    assert_one_line_error(p, "--prompts-per-step 12", "multiple of 8")
    assert not os.path.exists(os.path.join(env["DATA_DIR"], "train.json"))


def test_run_sh_passes_reward_to_grpo_and_its_flag_check(tmp_path):
    p = run_sh("--dry-run", env={"REWARD": "gsm8k_reward:reward", "CKPT_DIR": str(tmp_path / "ck"),
                                 "DATA_DIR": str(tmp_path / "data")})
    assert p.returncode == 0, p.stderr
    grpo_cmds = [line for line in p.stdout.splitlines() if line.startswith("+ ") and "grpo.py" in line]
    assert len(grpo_cmds) == 2 and all("--reward gsm8k_reward:reward " in c for c in grpo_cmds)
    assert "REWARD=gsm8k_reward:reward" in p.stdout.splitlines()[0]
    assert "--reward prepare:math_reward " in run_sh("--dry-run", env={"CKPT_DIR": str(tmp_path / "ck")}).stdout


def test_run_sh_stops_at_a_bad_reward_before_step_1(math_dir, tmp_path):
    env = done_steps_1_and_2(tmp_path)
    shutil.rmtree(env["DATA_DIR"])
    shutil.copytree(math_dir, env["DATA_DIR"])         # parquet only: step 1 would write train.json
    p = run_sh(env=dict(env, REWARD="gsm8k_reward:no_such_function"))
    assert_one_line_error(p, "--reward gsm8k_reward:no_such_function", "has no function no_such_function")
    assert not os.path.exists(os.path.join(env["DATA_DIR"], "train.json"))


@pytest.mark.parametrize("layout", [["main/train-00000-of-00001.parquet", "main/test-00000-of-00001.parquet"],
                                    ["train.json"]])
def test_run_sh_stops_on_a_data_dir_it_does_not_recognise_instead_of_downloading_into_it(tmp_path, layout):
    data = tmp_path / "gsm8k"
    for f in layout:
        (data / f).parent.mkdir(parents=True, exist_ok=True)
        (data / f).write_text("")
    p = run_sh("--dry-run", env={"DATA_DIR": str(data), "CKPT_DIR": str(tmp_path / "ck")})
    assert_one_line_error(p, f"DATA_DIR={data} holds neither train.json + test.json", "prepare.py")
    assert "prepare.py download " not in p.stdout
    assert sorted(str(f.relative_to(data)) for f in data.rglob("*") if f.is_file()) == sorted(layout)


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
    p = torchrun("grpo.py", "--load", str(tmp_path / "mc"),
                 "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--toy-token", "7",
                 "--steps", "30", "--prompts-per-step", "32", "--n-samples-per-prompt", "8", "--max-len", "40",
                 "--toy-prompt-len", "8", "--max-prompt-len", "8", "--lr", "1e-3", "--eval-interval", "0",
                 "--gpu-memory-utilization", "0.3", nproc=1, timeout=900)
    print(p.stdout[-6000:])
    assert p.returncode == 0, p.stderr[-5000:]
    m = read_metrics(tmp_path / "out" / "metrics.jsonl")
    rewards = [x["reward"] for x in m]
    print("reward curve:", " ".join(f"{r:.3f}" for r in rewards))
    print("logp diff:", " ".join(f"{x['logp_diff']:.4f}" for x in m))
    assert len(m) == 30
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.1
    assert max(x["logp_diff"] for x in m) < 0.02


# ----------------------------------------------------------------------------------------------
# A model that can be taught: arithmetic in MATH-lighteval's layout, a small Qwen2 given partial
# skill by a short supervised warm-up, then GRPO through run.sh (prepare, convert, train)
# ----------------------------------------------------------------------------------------------
ARITH_OPS = {"Addition": ("+", (0, 99), (0, 99)), "Subtraction": ("-", (0, 99), (0, 99)),
             "Multiplication": ("\\times", (0, 99), (0, 9))}


def arith_row(op, a, b, boxed=None):
    """One MATH-lighteval row: "What is $a - b$?", solved in one line that ends in \\boxed{}."""
    sym = ARITH_OPS[op][0]
    value = a + b if op == "Addition" else a - b if op == "Subtraction" else a * b
    return {"problem": f"What is ${a} {sym} {b}$?", "level": f"Level {len(str(max(a, b)))}", "type": op,
            "solution": f"${a} {sym} {b} = {value}$. The answer is $\\boxed{{{value if boxed is None else boxed}}}$."}


def arith_rows(n_train, n_test, seed=0):
    """Distinct problems, half of them subtractions (b <= a), a quarter each sums and products;
    no test problem is in train."""
    rng, seen, rows = random.Random(seed), set(), []
    kinds = ["Subtraction", "Subtraction", "Addition", "Multiplication"]
    while len(rows) < n_train + n_test:
        op = kinds[len(rows) % 4]
        (_, (a0, a1), (b0, b1)) = ARITH_OPS[op]
        a, b = rng.randint(a0, a1), rng.randint(b0, b1)
        a, b = (max(a, b), min(a, b)) if op == "Subtraction" else (a, b)
        if (op, a, b) not in seen:
            seen.add((op, a, b))
            rows.append(arith_row(op, a, b))
    rng.shuffle(rows)
    return rows[:n_train], rows[n_train:]


def arith_warmup(train_rows, wrong_share=0.8, seed=0):
    """The supervised warm-up's answers: the train problems' solutions, except that `wrong_share`
    of the subtractions box the sum while their worked equation shows the difference. The model
    learns to compute and to box, and for subtraction mostly to box the wrong number: a skill it
    has but does not use, which GRPO, rewarded on the box alone, can bring out (most of the gain
    is subtraction; a warm-up on right answers only left GRPO too little room, on CPU)."""
    rng = random.Random(seed + 1)
    out = []
    for r in train_rows:
        if r["type"] == "Subtraction" and rng.random() < wrong_share:
            a, b = (int(x) for x in r["problem"][9:-2].split(" - "))
            r = arith_row("Subtraction", a, b, boxed=a + b)
        out.append(r)
    return out


def build_arithmetic(root, n_train=3000, n_test=512, sft_steps=1000, seed=0):
    """root/data: MATH-lighteval-shaped parquet files; root/model: a 2-layer Qwen2 (hidden 256) with
    a digit-splitting tokenizer and a ChatML template, after a supervised warm-up on
    arith_warmup's answers (AdamW, lr 1e-3, 64 answers per step; seconds on a GPU). The prompts
    are prepare.py's, the instruction included."""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen2Config, Qwen2ForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train, test = arith_rows(n_train, n_test, seed)
    write_math_parquet(os.path.join(root, "data"), "train", train)
    write_math_parquet(os.path.join(root, "data"), "test", test)
    warm = arith_warmup(train, seed=seed)
    prompts = [prepare.make_row(r["problem"], r["solution"], r["level"], r["type"], "train", i)["prompt"]
               for i, r in enumerate(warm)]
    texts = [m[0]["content"] + " " + r["solution"] for m, r in zip(prompts, warm)]
    model_dir = os.path.join(root, "model")
    tok = make_tiny_tokenizer(model_dir, texts * 2, vocab_size=320, split_digits=True)
    torch.manual_seed(seed)
    cfg = dict(tiny_qwen_config(True), vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=256,
               intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=512)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).to(device)
    pairs = []
    for messages, r in zip(prompts, warm):
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        pairs.append((prompt, tok(r["solution"] + "<|im_end|>", add_special_tokens=False)["input_ids"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    rng = random.Random(seed)
    for step in range(1, sft_steps + 1):
        for g in opt.param_groups:
            g["lr"] = 1e-3 * min(1.0, step / 20)
        batch = [pairs[rng.randrange(len(pairs))] for _ in range(64)]
        L = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((64, L), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((64, L), -100, dtype=torch.long)
        for i, (p, a) in enumerate(batch):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p):len(p) + len(a)] = torch.tensor(a)   # the loss on the answer only
        logits = model(input_ids=ids.to(device)).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.save_pretrained(model_dir)
    return os.path.join(root, "data"), model_dir


def arithmetic_main(argv):
    """`python test_grpo.py arithmetic DIR [SFT_STEPS]`: DIR/data and DIR/model for run.sh (README)."""
    data, model = build_arithmetic(argv[0], sft_steps=int(argv[1]) if len(argv) > 1 else 1000)
    print(f"wrote {data} and {model}")


# run.sh's flags for it: size and schedule only (the learning rate is the test's or the control's)
GRPO_TEACHES = ["--steps", "30", "--prompts-per-step", "64", "--n-samples-per-prompt", "8", "--max-len", "128",
                "--max-prompt-len", "96", "--eval-interval", "10", "--eval-prompts", "512", "--eval-temperature", "0",
                "--save-interval", "0"]


def teach_arithmetic(tmp_path, runs):
    """`bash run.sh` (MODEL_SIZE=custom) on the arithmetic set and model of build_arithmetic, one
    run per (name, extra flags); returns {name: metrics rows}, and prints each run's greedy test
    accuracy and reward by step."""
    import convert
    t0 = time.time()
    data, model = build_arithmetic(str(tmp_path))
    print(f"data and warm-up: {time.time() - t0:.0f}s")
    out = {}
    for name, flags in runs:
        t = time.time()
        env = dict(MODEL_SIZE="custom", GPUS_PER_NODE="1", MODEL_DIR=model, DATA_DIR=data,
                   CKPT_DIR=str(tmp_path / name), MASTER_PORT=str(convert.free_port()), PYTHONUNBUFFERED="1")
        p = run_sh(*GRPO_TEACHES, *flags, env=env, timeout=600)
        print(p.stdout[-2500:])
        assert p.returncode == 0, p.stderr[-5000:]
        out[name] = read_metrics(tmp_path / name / "grpo" / "metrics.jsonl")
        print(f"{name}: {time.time() - t:.0f}s")
        if os.environ.get("GRPO_TEST_OUT"):                     # for the README's curve
            shutil.copy(tmp_path / name / "grpo" / "metrics.jsonl", os.path.join(os.environ["GRPO_TEST_OUT"],
                                                                                   f"{name}.jsonl"))
        curve = " ".join(f"{x['step']}:{x['eval_accuracy']:.3f}" for x in out[name] if "eval_accuracy" in x)
        print(f"{name} greedy test accuracy by step:", curve)
        print(f"{name} reward by step:", " ".join(f"{x['reward']:.2f}" for x in out[name] if x["step"] > 0))
    return out


def accuracy_curve(rows):
    return [(x["step"], x["eval_accuracy"]) for x in rows if "eval_accuracy" in x]


@gpu
def test_gpu_grpo_teaches_arithmetic_through_the_math_path(tmp_path):
    """The proof that the pipeline teaches: a small model with partial arithmetic skill (see
    arith_warmup), trained by `bash run.sh` exactly as a user runs it (prepare.py's prompts and
    instruction, convert.py, torchrun grpo.py, math-verify's reward on the last box, greedy
    evaluation on 512 held-out problems). Test accuracy must rise by 25 points, the reward must
    rise, vLLM and Megatron must agree on every step, and a control with --lr 0 must stay flat."""
    runs = teach_arithmetic(tmp_path, [("grpo", ["--lr", "3e-4"]), ("control", ["--lr", "0"])])
    curves = {name: accuracy_curve(m) for name, m in runs.items()}
    grpo = runs["grpo"]
    steps = [x for x in grpo if x["step"] > 0]
    ev = [x for x in grpo if "eval_accuracy" in x]
    first_rollout = steps[0]
    print(f"evaluation at step 0: {ev[0]['time_eval_generate']:.2f}s for {ev[0]['eval_generated_tokens']:.0f} "
          f"tokens; rollout of step 1: {first_rollout['time_rollout']:.2f}s for {first_rollout['generated_tokens']} tokens")
    print("logp diff:", " ".join(f"{x['logp_diff']:.4f}" for x in steps))
    assert len(curves["grpo"]) == 4 and curves["grpo"][0][0] == 0
    assert curves["grpo"][-1][1] - curves["grpo"][0][1] >= 0.25                       # it learns
    assert abs(curves["control"][-1][1] - curves["control"][0][1]) <= 0.02             # lr 0 does not
    assert sum(x["reward"] for x in steps[-5:]) / 5 > sum(x["reward"] for x in steps[:5]) / 5 + 0.1
    assert max(x["logp_diff"] for x in steps) < 0.02
    # the evaluation generates about as many tokens as a rollout (512 answers each): at most 1.5x its time
    for e in ev:
        per_token = e["time_eval_generate"] / e["eval_generated_tokens"]
        rollout_per_token = sum(x["time_rollout"] for x in steps) / sum(x["generated_tokens"] for x in steps)
        assert per_token <= 1.5 * rollout_per_token, (e["step"], per_token, rollout_per_token)


@gpu
def test_gpu_grpo_teaches_arithmetic_with_dapo_switches(tmp_path):
    """The same teaching run with four updates per rollout batch (the clip acts), DAPO's
    clip-higher and dynamic sampling (groups whose answers all score alike are replaced by fresh
    prompts): the model still learns, the clip fires, and the filter drops groups."""
    m = teach_arithmetic(tmp_path, [("dapo", ["--lr", "3e-4", "--mini-batches", "4", "--clip-ratio-high", "0.28",
                                              "--filter-groups"])])["dapo"]
    curve = accuracy_curve(m)
    steps = [x for x in m if x["step"] > 0]
    print("clip_frac:", " ".join(f"{x['clip_frac']:.3f}" for x in steps))
    print("filter dropped / rounds:", " ".join(f"{x['filter_dropped_frac']:.2f}/{x['filter_rounds']}" for x in steps))
    diffs = [x["logp_diff"] for x in steps if "logp_diff" in x]
    print(f"logp diff ({len(diffs)} of {len(steps)} steps kept a group with vLLM's log-probs):",
          " ".join(f"{d:.4f}" for d in diffs))
    assert curve[-1][1] - curve[0][1] >= 0.25
    assert all(x["optimizer_steps"] == 4 for x in steps) and max(x["clip_frac"] for x in steps) > 0
    assert max(x["filter_dropped_frac"] for x in steps) > 0
    assert len(diffs) >= len(steps) // 2 and max(diffs) < 0.02


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory):
    """The toy task's random 2-layer Qwen2 (vocab 64), converted once for the runs that share it."""
    root = tmp_path_factory.mktemp("toy")
    gpu_tiny_model(str(root / "hf"), vocab_size=64)
    p = run_script("convert.py", "custom", str(root / "hf"), str(root / "mc"), "false", "true", "bf16")
    assert p.returncode == 0, p.stderr[-3000:]
    return root


@gpu
@pytest.mark.parametrize("switches", [
    ["--mini-batches", "4", "--epochs", "2"],                  # several updates per batch: the clip acts
    ["--mini-batches", "2", "--clip-ratio-high", "0.28"],       # DAPO's clip-higher
    ["--loss-agg", "seq-mean-token-mean"],                      # GRPO paper's aggregation
    ["--loss-agg", "seq-mean-token-sum-norm", "--no-std-norm"],  # Dr. GRPO
    ["--filter-groups"],                                        # DAPO's dynamic sampling
    ["--overlong-buffer", "8"],                                 # DAPO's soft overlong penalty
    ["--tis-cap", "2"],                                         # truncated importance sampling
], ids=lambda s: " ".join(s))
def test_gpu_toy_task_learns_with_each_grpo_switch(toy_model, tmp_path, switches):
    """One short toy run per switch: the reward still climbs (the toy's answers all run to their
    budget, so --overlong-filter would leave nothing to train on; its CPU tests cover it)."""
    p = torchrun("grpo.py", "--load", str(toy_model / "mc"), "--hf-dir", str(toy_model / "hf"), "--out",
                 str(tmp_path / "out"), "--toy-token", "7", "--steps", "10", "--prompts-per-step", "32",
                 "--n-samples-per-prompt", "8", "--max-len", "40", "--toy-prompt-len", "8", "--max-prompt-len", "8",
                 "--lr", "1e-3", "--eval-interval", "0", "--gpu-memory-utilization", "0.3", "--max-num-seqs", "256",
                 *switches, nproc=1, timeout=900)
    print(p.stdout[-3000:])
    assert p.returncode == 0, p.stderr[-5000:]
    m = read_metrics(tmp_path / "out" / "metrics.jsonl")
    rewards = [x["reward"] for x in m]
    print(" ".join(switches), "reward:", " ".join(f"{r:.3f}" for r in rewards), "| clip_frac:",
          " ".join(f"{x['clip_frac']:.3f}" for x in m), "| entropy:", " ".join(f"{x['entropy']:.2f}" for x in m))
    assert len(m) == 10 and sum(rewards[-3:]) / 3 > sum(rewards[:2]) / 2 + 0.2
    if "--mini-batches" in switches:
        assert max(x["clip_frac"] for x in m) > 0 and m[0]["optimizer_steps"] > 1
    if "--tis-cap" in switches:
        assert all(0.5 < x["tis_weight_mean"] <= 2.0 for x in m)


@gpu
def test_gpu_adam_moments_in_host_memory_update_as_on_the_gpu(toy_model, tmp_path):
    """--adam-moments host streams each tensor's moments through the GPU in optimizer.step(): two
    updates land on the same weights as with the moments on the GPU, and between steps the
    moments are host tensors."""
    out = tmp_path / "adam.json"
    p = torchrun("test_grpo.py", "adam", str(toy_model / "mc"), str(toy_model / "hf"), str(out), nproc=1, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    print(r)
    assert r["moments_on_host"] and r["max_param_diff"] < 1e-6 and r["grad_norms_gpu"] == pytest.approx(r["grad_norms_host"])


@gpu
def test_gpu_streamed_adam_step_is_adamw_with_its_moments_on_the_gpu():
    """streamed_adam_step (two copy streams, events, the room rule) against a plain AdamW whose
    moments never leave the GPU: tensors of very different sizes, the biggest 64 M parameters
    (256 MB a moment, long enough in flight for a missing wait to show as a wrong number), and
    neighbours that do and do not fit in its room together; four steps with fresh gradients, a
    parameter without a gradient in one of them. Weights and moments bitwise equal, and the
    moments at home in page-locked host memory between steps."""
    import memory
    import types
    import torch
    torch.manual_seed(0)
    shapes = [(2048, 4096), (7,), (8192, 8192), (4096, 8192), (3, 5), (4096, 4096), (1024,)]
    init = [torch.randn(s, device="cuda") for s in shapes]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, foreach=False)
    streamed = [torch.nn.Parameter(t.clone()) for t in init]
    plain = [torch.nn.Parameter(t.clone()) for t in init]
    opt_s, opt_p = torch.optim.AdamW(streamed, **kw), torch.optim.AdamW(plain, **kw)
    memory.stream_adam_moments(types.SimpleNamespace(optimizer=opt_s))
    for step in range(4):
        for i, (a, b) in enumerate(zip(streamed, plain)):
            g = None if (step == 2 and i == 3) else torch.randn_like(a)
            a.grad, b.grad = g, None if g is None else g.clone()
        opt_s.step()
        opt_p.step()
        for a, b in zip(streamed, plain):
            assert torch.equal(a, b)
            sa, sb = opt_s.state[a], opt_p.state[b]
            for k in memory.MOMENTS:
                assert not sa[k].is_cuda and sa[k].is_pinned() and torch.equal(sa[k], sb[k].cpu())


@gpu
def test_gpu_memory_plan_activations_match_what_the_gpu_keeps(tmp_path):
    """The memory plan's activation bytes against the GPU: what megatron-core's layers keep for
    the backward per token and layer, counted for every Qwen2.5 shape, and the peak of a real
    update's forward+backward (8192-token micro batch, the 7B shape cut to 2 and 4 layers)
    against the plan's activations + logits."""
    out = tmp_path / "act.json"
    p = run_script("test_grpo.py", "actbytes", str(out), timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    print(json.dumps(r, indent=1))
    for size, x in r["per_layer"].items():
        assert x["measured"] == pytest.approx(x["planned"], rel=0.05), size
    pk = r["peak"]
    assert pk["4"]["measured"] == pytest.approx(pk["4"]["planned"], rel=0.10)
    assert pk["4"]["measured"] - pk["2"]["measured"] == pytest.approx(pk["4"]["planned"] - pk["2"]["planned"], rel=0.10)


def actbytes_main(argv):
    """`test_grpo.py actbytes OUT_JSON` (GPU): (1) bytes per token that one layer keeps for its
    backward (saved tensors, counted by storage, parameters excluded), as the difference between
    a 2-layer and a 1-layer model of each Qwen2.5 shape; (2) the GPU memory a forward+backward of
    an 8192-token micro batch adds at its peak (grpo's update_step, stopped before the optimizer
    step), for the 7B shape with 2 and 4 layers."""
    import memory
    import torch
    import convert
    import grpo
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    out = argv[0]
    convert.init_distributed(1, 1, use_cuda=True)
    model_parallel_cuda_manual_seed(0)
    res = {"per_layer": {}, "peak": {}}
    for size in convert.QWEN25:
        measured, kept = saved_bytes_per_layer(convert.qwen_config(size), 1, "cuda", tokens=1024)
        res["per_layer"][size] = {"measured": measured, "planned": memory.activation_bytes(convert.qwen_config(size), 1)}
        if size == "7B":
            res["kept_7B"] = kept
        torch.cuda.empty_cache()
    for layers in (2, 4):
        cfg = dict(convert.qwen_config("7B"), num_hidden_layers=layers)
        args = grpo.parse_args(["--benchmark", "7B", "--micro-batch-tokens", "8192", "--logits-chunk-tokens", "2048",
                                "--recompute", "none",
                                "--grad-reduce-dtype", "fp32", "--adam-moments", "gpu", "--kl-log-interval", "0"])
        model, optimizer = grpo.build_trainer(cfg, args)
        samples = [{"prompt_ids": torch.randint(0, 150000, (256,)).tolist(),
                    "response_ids": torch.randint(0, 150000, (768,)).tolist(), "advantage": (-1.0) ** i}
                   for i in range(8)]                     # 8 rows of 1024 tokens: one 8192-token micro batch
        batch = grpo.make_batch(samples)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        a0 = torch.cuda.memory_allocated()
        seen = {}

        def stop_before_step(model, optimizer, args):
            seen["peak"] = torch.cuda.max_memory_allocated() - a0
            return True, 0.0
        step = grpo.optimizer_step
        grpo.optimizer_step = stop_before_step
        try:
            grpo.update_step(model, optimizer, batch, args)
        finally:
            grpo.optimizer_step = step
        plan = memory.plan_and_pick_defaults(args, cfg, 1, 80 * 2**30, host_bytes=0)   # every setting given
        res["peak"][str(layers)] = {"measured": seen["peak"] / 2**30,
                                    "planned": (plan["parts"]["activations"] + plan["parts"]["logits"]) / 2**30}
        del model, optimizer
        torch.cuda.empty_cache()
    with open(out, "w") as f:
        json.dump(res, f)
    convert.shutdown_distributed()


def adam_main(argv):
    """`test_grpo.py adam CKPT HF_DIR OUT_JSON` (GPU): two updates with the Adam moments on the GPU
    and with them streamed from host memory, from the same checkpoint."""
    import memory
    import convert
    import grpo
    ckpt, hf_dir, out = argv[:3]
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    cfg = convert.resolve_config("custom", os.path.join(hf_dir, "config.json"))
    convert.init_distributed(1, 1, use_cuda=True)
    model_parallel_cuda_manual_seed(0)                  # Megatron's TP RNG, as grpo.run() sets it
    batch = grpo.make_batch([{"prompt_ids": [5, 9, 3], "response_ids": [11, 12, 13, 14], "advantage": 1.0},
                             {"prompt_ids": [5, 9, 3], "response_ids": [21, 22], "advantage": -1.0}])
    res = {}
    for where in ("gpu", "host"):
        args = cpu_trainer_args(ckpt, hf_dir, "--adam-moments", where, "--lr", "1e-3")
        model, optimizer = grpo.build_trainer(cfg, args)
        norms = [grpo.train_on_batch(model, optimizer, batch, args, random.Random(k))["grad_norm"] for k in range(2)]
        res[where] = [p.detach().float().clone() for p in model.parameters()]
        res["grad_norms_" + where] = norms
        states = [st for inner in memory.torch_optimizers(optimizer) for st in inner.state.values()]
        if where == "host":
            res["moments_on_host"] = bool(states) and all(not st["exp_avg"].is_cuda and not st["exp_avg_sq"].is_cuda
                                                          for st in states)
    res["max_param_diff"] = max(float((a - b).abs().max()) for a, b in zip(res.pop("gpu"), res.pop("host")))
    with open(out, "w") as f:
        json.dump(res, f)
    convert.shutdown_distributed()


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
    p = torchrun("grpo.py", "--load", str(tmp_path / "mc_bf16"),
                 "--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--model-size", "0.5B",
                 "--toy-token", "7", "--steps", "3", "--prompts-per-step", "32", "--n-samples-per-prompt", "16",
                 "--max-len", "1280", "--toy-prompt-len", "256", "--max-prompt-len", "256", "--eval-interval", "0",
                 nproc=1, timeout=900)
    print(p.stdout[-6000:])
    assert p.returncode == 0, p.stderr[-5000:]
    m = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert len(m) == 3 and all(math.isfinite(x["loss"]) for x in m)
    assert max(x["logp_diff"] for x in m) < 0.02


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
    p = torchrun("grpo.py", "--load", str(tmp_path / "mc"),
                 "--hf-dir", str(tmp_path / "hf"), "--data", data, "--out", str(tmp_path / "out"),
                 "--steps", "2", "--prompts-per-step", "8", "--n-samples-per-prompt", "4", "--max-len", "256",
                 "--max-prompt-len", "128", "--eval-interval", "2", "--eval-prompts", "7",
                 "--gpu-memory-utilization", "0.3", "--kl-log-interval", "2", nproc=1, timeout=900)
    print(p.stdout[-4000:])
    assert p.returncode == 0, p.stderr[-5000:]
    assert "prompts: 20 train (0 dropped" in p.stdout
    ev0, *m = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert ev0["step"] == 0 and [x["step"] for x in m] == [1, 2]        # step 0: the evaluation before training
    assert "eval_accuracy" in m[1] and 0.0 <= m[1]["eval_accuracy"] <= 1.0 and ev0["eval_temperature"] == 0.6
    evals = [json.loads(line) for line in open(tmp_path / "out" / "eval" / "step_000002.jsonl")]
    for x in (ev0, m[1]):
        print(f"eval at step {x['step']}: generate {x['time_eval_generate']:.1f}s for {x['eval_generated_tokens']:.0f} "
              f"tokens, score {x['time_eval_score']:.1f}s")
    print(f"rollouts: {m[0]['time_rollout']:.1f}s and {m[1]['time_rollout']:.1f}s for {m[0]['generated_tokens']} and "
          f"{m[1]['generated_tokens']} tokens; first answer: {evals[0]['response'][:300]!r}")
    assert ev0["time_eval_generate"] < 20          # FlashInfer's first-use JIT made it 85-114 s
    assert len(evals) == 7 and sum(e["score"] for e in evals) / 7 == pytest.approx(m[1]["eval_accuracy"])
    assert all(0.0 <= x["reward"] <= 1.0 and x["logp_diff"] < 0.02 for x in m)
    assert "kl" not in m[0] and "kl" in m[1]                       # --kl-log-interval 2
    if m[0]["score_std"] == 0:
        # all samples scored alike -> zero advantages -> zero gradient: the policy must still be
        # the loaded one (a bf16 optimizer built before loading would reset it to its random init)
        assert m[0]["grad_norm"] == 0 and m[1]["kl"] < 1e-3


@gpu
def test_gpu_run_sh_end_to_end_killed_in_step_4_resumes_redoes_step_3_alike_and_exports(math_dir, tmp_path):
    """`bash run.sh` as a user runs it, on a tiny random model and generated MATH parquet files:
    prepare, convert, train with a checkpoint every 2 steps; SIGKILL to the whole job once step 3
    is logged; the rerun skips the done steps, resumes after step 2, redoes step 3 drawing the same
    samples (the same rollout digest), finishes step 5, exports to HF, and vLLM loads the export."""
    import signal
    import convert
    texts = [r["problem"] for r in math_rows(20, "train")] + ["\\boxed{12} The answer is"] * 20
    model_dir = str(tmp_path / "model")
    gpu_tiny_model(model_dir, texts=texts * 5)
    ck = tmp_path / "ck"
    settings = dict(MODEL_SIZE="custom", GPUS_PER_NODE="1", MODEL_DIR=model_dir, DATA_DIR=math_dir, CKPT_DIR=str(ck),
                    MASTER_PORT=str(convert.free_port()), PYTHONUNBUFFERED="1")
    flags = ["--steps", "5", "--save-interval", "2", "--keep-last", "2", "--prompts-per-step", "8",
             "--n-samples-per-prompt", "4", "--max-len", "256", "--max-prompt-len", "128", "--eval-interval", "0",
             "--gpu-memory-utilization", "0.3"]
    metrics = ck / "grpo" / "metrics.jsonl"
    log1 = open(tmp_path / "run1.log", "w")
    job = subprocess.Popen(["bash", "run.sh", *flags], cwd=HERE, env=run_sh_env(settings), stdout=log1,
                           stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert job.poll() is None, open(tmp_path / "run1.log").read()[-5000:]
        assert time.time() - t0 < 600, "no step 3 within 600 s"
        time.sleep(0.02)
    # step 3 is logged: step 4 is under way. kill -9 the whole job: torchrun starts its workers in
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
    first = [json.loads(line) for line in metrics.read_text().splitlines()]
    print(open(tmp_path / "run1.log").read()[-3000:])
    print(f"killed with {len(first)} steps logged; checkpoints: {sorted(os.listdir(ck / 'grpo' / 'checkpoints'))}")
    assert [m["step"] for m in first] == [1, 2, 3]
    assert sorted(os.listdir(ck / "grpo" / "checkpoints")) == ["step_000002"]
    p = run_sh(*flags, env=settings, timeout=900)
    print(p.stdout[-5000:])
    assert p.returncode == 0, p.stderr[-5000:]
    assert p.stdout.count("= skip:") == 3                        # data, model, conversion
    assert "resuming after step 2" in p.stdout
    second = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["step"] for m in second] == [1, 2, 3, 4, 5]       # none lost, none repeated
    print("step 3 rollout digest, killed run vs resumed run:", first[2]["rollout_digest"], second[2]["rollout_digest"])
    assert second[2]["rollout_digest"] == first[2]["rollout_digest"]     # the redone step drew the same samples
    assert second[:2] == first[:2]
    assert sorted(os.listdir(ck / "grpo" / "checkpoints")) == ["step_000004", "step_000005"]
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
    import memory
    import torch
    out = []
    for inner in memory.torch_optimizers(optimizer):
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
    args = cpu_trainer_args(ckpt, hf_dir, *[a for a in argv[4:] if a != "--bf16"])
    cfg = convert.resolve_config("custom", os.path.join(hf_dir, "config.json"))
    convert.init_distributed(args.tp, args.pp, use_cuda=False)
    model, optimizer = grpo.build_trainer(cfg, args, dtype=dtype, device="cpu")
    batch = grpo.make_batch([{"prompt_ids": [5, 9, 3], "response_ids": [11, 12, 13], "advantage": 1.0},
                             {"prompt_ids": [5, 9, 3], "response_ids": [21, 22], "advantage": -1.0}])
    batch["old_logp"] = grpo.compute_logprobs(model, batch, args)
    root = os.path.join(out, "checkpoints")
    for step in (1, 2, 3):
        grpo.train_on_batch(model, optimizer, batch, args, random.Random(step))
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
    grpo.train_on_batch(model, optimizer, batch, args, random.Random(4))
    grpo.train_on_batch(fresh, fresh_opt, batch, args, random.Random(4))
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
    helpers = {"logits": logits_main, "trainstep": trainstep_main, "ckpt": ckpt_main, "variants": variants_main,
               "adam": adam_main, "arithmetic": arithmetic_main, "actbytes": actbytes_main}
    if argv[0] in helpers:
        return helpers[argv[0]](argv[1:])
    importlib.import_module(argv[0].removesuffix(".py")).main(argv[1:])


if __name__ == "__main__":
    shim_main(sys.argv[1:])
