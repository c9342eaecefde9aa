"""The specification of prepare.py, convert.py and grpo.py, as tests.

    python -m pytest -q test_grpo.py            # CPU: everything but the `gpu` tests
    python -m pytest -q -m gpu test_grpo.py     # on a CUDA machine with vllm installed

Nothing is downloaded: the fixtures write MATH-lighteval-shaped parquet files and tiny random
Qwen2-shaped checkpoints into pytest's tmp dirs.
"""
import json
import os
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


def test_download_offline_is_one_line_error(tmp_path):
    p = run_script("prepare.py", "download", "--local_dir", str(tmp_path / "d"), timeout=300)
    assert_one_line_error(p, "AI-ModelScope/MATH-lighteval", "modelscope")


def test_every_script_has_help():
    for script in ("prepare.py",):
        p = run_script(script, "--help")
        assert p.returncode == 0 and "usage" in p.stdout.lower(), script


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
    rewards = prepare.score_responses(responses, truths, num_workers=2, timeout_s=1)
    assert rewards == [1.0 if i < 3 else 0.0 for i in range(200)] + [0.0, 0.0]
