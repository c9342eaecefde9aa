"""Step 1 of the pipeline: get MATH-lighteval and a Qwen2.5 checkpoint, write the prompt set.

    # download (modelscope; needs network)
    python prepare.py download --local_dir dataset/MATH-lighteval
    python prepare.py download-model --model Qwen/Qwen2.5-7B-Instruct --local_dir Qwen2.5-7B-Instruct
    # preprocess: dataset/MATH-lighteval/data/{train,test}-*.parquet -> train.json, test.json
    python prepare.py --input_dir dataset/MATH-lighteval --local_dir dataset/MATH-lighteval
    # another data set: its layout in flags (README: Your own task), e.g. GSM8K
    python prepare.py download --dataset openai-mirror/gsm8k --local_dir dataset/gsm8k
    python prepare.py --input_dir dataset/gsm8k --subdir main --question_column question \\
        --answer_column answer --answer_format gsm8k --data_source openai/gsm8k

Each output line is one prompt in the layout the reference pipeline (ChatLearn / verl) uses:

    {"data_source": "DigitalLearningGmbH/MATH-lighteval",
     "prompt": [{"role": "user", "content": "<problem> Let's think step by step and output
                 the final answer within \\boxed{}."}],
     "ability": "math",
     "reward_model": {"style": "rule", "ground_truth": "<content of the solution's last box>"},
     "extra_info": {"split": "train", "index": 0, "level": "Level 2", "type": "Algebra"}}

The ground truth is what the *reference solution* put in its last \\boxed{}; the reward in
grpo.py pulls the last box out of the *model's* answer with the same `last_boxed`, so both
sides of the comparison are extracted by one function.

This module also holds the reward (`math_reward`, `score_responses`, and the contract any reward
function meets: `reward_and_correct`): it is plain Python with no GPU imports, so the reward's
worker processes start fast and tests import it cheaply.
"""
import argparse
import atexit
import collections
import glob
import importlib
import inspect
import json
import math
import multiprocessing
import multiprocessing.connection
import numbers
import os
import pickle
import signal
import sys
import threading
import time
import types

DATA_SOURCE = "DigitalLearningGmbH/MATH-lighteval"
MODELSCOPE_DATASET = "AI-ModelScope/MATH-lighteval"
# The instruction the reference example appends; the reward only looks inside \boxed{}, so
# the model has to learn to put its answer there.
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
COLUMNS = ("problem", "level", "type", "solution")


class UserError(Exception):
    """Bad input from the user: main() prints it as one line and exits 1."""


def die(msg):
    """A user mistake or an unreachable resource: one line on stderr, exit code 1, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def one_line_errors(parser):
    """argparse prints its usage block before a bad flag's message; we print the message alone."""
    parser.error = lambda msg: die(f"{msg} (see --help)")
    return parser


# ----------------------------------------------------------------------------------------------
# Answer extraction
# ----------------------------------------------------------------------------------------------
def last_boxed(text):
    """Content of the last \\boxed{...} or \\fbox{...} in `text`, braces matched; None if there is
    no box or the last one is never closed.

    Braces are counted, not regex-matched, because answers nest them (\\frac{1}{2}). The *last*
    box counts: solutions box intermediate results too, and a model that corrects itself boxes
    its final answer last. An unclosed last box (a response cut off by the token budget) is no
    answer, even if an earlier box was complete: we do not guess what the model meant.

    Example:
        last_boxed(r"so \\boxed{1} or rather \\boxed{\\frac{1}{2}}.")  ->  r"\\frac{1}{2}"
        last_boxed(r"\\boxed{1} then \\boxed{\\frac{1}{2")             ->  None
    """
    if not text:
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


# ----------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------
def math_reward(response, ground_truth, timeout_s=5):
    """1.0 if the last box of `response` is mathematically equal to `ground_truth`, else 0.0.

    Both sides go through math-verify as "\\boxed{...}" so that equal values written differently
    match: 1/2 = 0.5 = \\dfrac12, 1,000 = 1000, x=3 vs 3, 90^\\circ vs 90, intervals, tuples.
    math-verify parses LaTeX into sympy; no model text is ever eval'ed.

    Never raises and never hangs: sympy can loop for minutes on adversarial input, so each parse
    and compare is bounded by math-verify's SIGALRM timeout (main thread only; elsewhere it runs
    unbounded and `score_responses`' stall limit is the guard), and any error scores 0.
    """
    pred_box = last_boxed(response)
    if pred_box is None or ground_truth is None:
        return 0.0
    from math_verify import parse, verify
    t = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse("\\boxed{" + ground_truth + "}", parsing_timeout=t)
        pred = parse("\\boxed{" + pred_box + "}", parsing_timeout=t)
        if not gold or not pred:
            return 0.0
        return 1.0 if verify(gold, pred, timeout_seconds=t) else 0.0
    except BaseException:  # math-verify's TimeoutException, sympy errors, RecursionError
        return 0.0


# The contract of a reward function, ours or a plug-in's (grpo.py --reward MODULE:FUNCTION):
#     FUNCTION(response: str, ground_truth, **extra) -> float | (float, bool)
# extra holds timeout_s, the seconds one parse or comparison may take. A (score, correct) pair
# says which answers are right; a plain float is right when it reaches FUNCTION.top_score
# (default 1.0): math_reward's 1.0 is right, its 0.0 is not.
class RewardError(Exception):
    """A reward function raised, or returned something that is not a reward: a bug to fix, not an
    answer to score 0 (that would train on it in silence)."""


def reward_name(reward_fn):
    return f"{getattr(reward_fn, '__module__', '?')}:{getattr(reward_fn, '__qualname__', repr(reward_fn))}"


def reward_and_correct(value, top_score=1.0):
    """(score, correct) from what a reward function returned: a (score, correct) pair as given; a
    plain number is correct when it reaches top_score. ValueError for anything else (None, NaN).

    Example:
        reward_and_correct(1.0)                  ->  (1.0, True)     # math_reward's right answer
        reward_and_correct(0.1)                  ->  (0.1, False)
        reward_and_correct((1.1, True))          ->  (1.1, True)     # right, and boxed: +0.1
        reward_and_correct(1.0, top_score=1.1)   ->  (1.0, False)
    """
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], numbers.Real):
        score, correct = float(value[0]), bool(value[1])
    elif isinstance(value, numbers.Real):
        score = float(value)
        correct = score >= top_score
    else:
        raise ValueError(f"returned {value!r:.80}; a reward is a float or a (float, bool) pair")
    if not math.isfinite(score):
        raise ValueError(f"returned the score {score}; a reward must be a finite number")
    return score, correct


def load_reward(spec):
    """The reward function that --reward MODULE:FUNCTION names; UserError in one line when it cannot
    be imported or called, so that --check-flags (run.sh's step 0) stops a typo before any download.

    MODULE is imported by name, from the current folder or PYTHONPATH: the reward worker processes
    import it again by that name (forkserver sends functions by reference), so FUNCTION must be a
    `def` at MODULE's top level. It is called as FUNCTION(response, ground_truth, timeout_s=...)
    and returns a float or a (float, correct) pair (see reward_and_correct)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise UserError(f"--reward {spec!r} is not MODULE:FUNCTION (e.g. prepare:math_reward)")
    if module_name.endswith(".py") or os.sep in module_name:
        raise UserError(f"--reward {spec}: name the module, not its file ({os.path.basename(module_name).removesuffix('.py')}:{name}), "
                        "and run from its folder or put that folder on PYTHONPATH")
    if os.getcwd() not in sys.path:      # a script's imports see its own folder, not the current one
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise UserError(f"--reward {spec}: cannot import {module_name} ({type(e).__name__}: {e}); it must be importable "
                        "from the current folder or PYTHONPATH") from None
    if not hasattr(module, name):
        raise UserError(f"--reward {spec}: {module_name} ({module.__file__}) has no function {name}")
    fn = getattr(module, name)
    if not callable(fn):
        raise UserError(f"--reward {spec}: {module_name}.{name} is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind("response", "ground truth", timeout_s=5)
    except TypeError as e:
        raise UserError(f"--reward {spec}: it cannot be called as {name}(response, ground_truth, timeout_s=...) ({e}); "
                        f"define it as def {name}(response, ground_truth, **extra)") from None
    except ValueError:
        pass                             # no signature to read (a builtin): its first call will tell
    try:
        pickle.dumps(fn)
    except Exception as e:
        raise UserError(f"--reward {spec}: the reward workers cannot import it by name ({e}); define it with def at the "
                        f"top level of {module_name}") from None
    if not isinstance(getattr(fn, "top_score", 1.0), (int, float)):
        raise UserError(f"--reward {spec}: {name}.top_score is {fn.top_score!r}, not a number")
    return fn


def judge(reward_fn, response, ground_truth, timeout_s):
    """(score, correct) of one answer; RewardError naming reward_fn when it raises or returns no reward."""
    try:
        value = reward_fn(response, ground_truth, timeout_s=timeout_s)
    except Exception as e:
        raise RewardError(f"the reward function {reward_name(reward_fn)} raised {type(e).__name__}: {_short(e)}") from None
    try:
        return reward_and_correct(value, getattr(reward_fn, "top_score", 1.0))
    except ValueError as e:
        raise RewardError(f"the reward function {reward_name(reward_fn)} {e}") from None


# How long a reward worker may go without finishing an answer before it is declared hung, by
# default: math_reward runs at most two parses and four comparisons (gold and answer each parse
# to a sympy form and a string), each cut off by SIGALRM after timeout_s, so a worker alive in
# Python finishes any answer within 6 * timeout_s; the 10 s on top is slack for the unguarded
# rest (box extraction, IPC) on a busy machine. Only a hang SIGALRM cannot reach gets past it.
def default_stall_s(timeout_s):
    return 6 * timeout_s + 10


# A worker must import math-verify (sympy: seconds on a busy node) before it says "ready"; one
# that has not after this long is broken, and scoring stops with an error instead of waiting.
WORKER_START_S = 300

_WORKERS = []          # the live reward workers, reused across steps
_WORKERS_KEY = None    # (num_workers, reward_fn) they were started for


def _reward_worker(conn, reward_fn):
    """One reward process. Says "ready" once its imports are done, then scores the answers the
    parent sends, [(index, response, ground_truth), ...], and sends each reward back the moment it
    is known: the parent then knows exactly which answer a silent worker is stuck on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the trainer's to handle; it stops us
    import math_verify  # noqa: F401  (before "ready": a slow import is not a hung answer)
    conn.send("ready")
    while True:
        try:
            items, timeout_s = conn.recv()
        except EOFError:                           # the parent is gone
            return
        for i, response, truth in items:
            try:
                conn.send((i, judge(reward_fn, response, truth, timeout_s)))
            except RewardError as e:               # a bug in reward_fn: the parent stops the run
                conn.send((i, str(e)))


def _start_worker(reward_fn):
    # "forkserver": workers fork from a clean server process that never touched CUDA or vLLM
    # (forking the trainer itself is unsafe). The server imports the main script (__main__)
    # without running its `if __name__ == "__main__"` block.
    ctx = multiprocessing.get_context("forkserver")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=_reward_worker, args=(child_conn, reward_fn), daemon=True)
    proc.start()
    child_conn.close()
    return types.SimpleNamespace(proc=proc, conn=conn, ready=False, items=collections.deque(),
                                 since=time.monotonic())


def _stop_worker(w):
    w.proc.kill()       # SIGKILL: a hung worker may block every other signal
    w.proc.join()
    w.conn.close()


def close_reward_workers():
    """Stop the reward workers (the trainer calls this at the end; atexit does it otherwise).

    Without it the processes are torn down in interpreter shutdown, in whatever order the modules
    go, which is where multiprocessing's Pool used to print "Exception ignored in Pool.__del__"."""
    global _WORKERS, _WORKERS_KEY
    for w in _WORKERS:
        _stop_worker(w)
    _WORKERS, _WORKERS_KEY = [], None


def score_responses(responses, ground_truths, num_workers=4, timeout_s=5, stall_s=None, reward_fn=math_reward):
    """Rewards for a batch, scored in `num_workers` processes: (scores, correct, timed_out).

    scores: one float per response; correct: one bool per response, which the reward counts as
    right (see reward_and_correct). timed_out: how many of them scored 0 (not correct) because
    their worker hung or died on them (the caller logs it; it should stay 0). A reward_fn that
    raises or returns no reward stops the batch with RewardError naming it.

    Why processes: math-verify's timeouts use SIGALRM, which only fires in a main thread, and
    one slow sympy comparison must not stall a rank that 7 others wait for at the next
    collective. The workers are started once and reused across steps.

    Why one answer can cost only itself: each worker holds a few answers at a time and reports
    each reward as it finishes, so the parent knows which answer a worker is on. A worker that
    finishes nothing for `stall_s` seconds (default `default_stall_s(timeout_s)`, past anything
    SIGALRM lets through) is hung inside C code: it is killed, that one answer scores 0 and is
    counted, its other answers go to the remaining workers, and a new worker takes its place.
    A worker that dies is handled the same way. The others keep scoring meanwhile: a hung answer
    delays its batch by about `stall_s`, and hangs in different workers overlap.

    num_workers=0 scores in this process (math_reward's own timeouts only; timed_out is 0).
    reward_fn: the task's reward (grpo.py --reward), called as reward_fn(response, ground_truth,
    timeout_s=timeout_s); the workers import it by name, so it must be defined at module level.

    Example (2 workers; the second answer sends sympy into a loop SIGALRM cannot break):
        score_responses([r"\\boxed{2}", <hang>, r"\\boxed{3}"], ["2", "1", "4"], num_workers=2)
        -> ([1.0, 0.0, 0.0], [True, False, False], 1)        # after about stall_s seconds
    """
    global _WORKERS, _WORKERS_KEY
    assert len(responses) == len(ground_truths)
    if num_workers <= 0 or len(responses) == 0:
        judged = [judge(reward_fn, r, g, timeout_s) for r, g in zip(responses, ground_truths)]
        return [s for s, _ in judged], [c for _, c in judged], 0
    stall_s = default_stall_s(timeout_s) if stall_s is None else stall_s
    if _WORKERS_KEY != (num_workers, reward_fn):
        close_reward_workers()
        _WORKERS = [_start_worker(reward_fn) for _ in range(num_workers)]
        _WORKERS_KEY = (num_workers, reward_fn)
    # Answers go out a few at a time: one per message would cost a round trip each, and the
    # whole batch in one message would leave idle workers at the end. A worker holds up to two
    # messages, so the next one is already there when it finishes one.
    per_message = max(1, min(16, len(responses) // (4 * num_workers)))
    todo = collections.deque(range(len(responses)))    # indices not yet sent to a worker
    rewards, left, timed_out = [None] * len(responses), len(responses), 0

    def replace(w):
        _stop_worker(w)
        _WORKERS[_WORKERS.index(w)] = _start_worker(reward_fn)

    def lost(w):
        """w hung or died holding answers: the one it was on scores 0 and is counted, the others
        go back in the queue, and a fresh worker takes its slot."""
        nonlocal left, timed_out
        i = w.items.popleft()
        rewards[i], left, timed_out = (0.0, False), left - 1, timed_out + 1
        todo.extendleft(reversed(w.items))
        replace(w)

    try:
        while left:
            now = time.monotonic()
            for w in _WORKERS:
                while w.ready and todo and len(w.items) <= per_message:
                    if not w.items:
                        w.since = now                  # idle until now: its clock starts here
                    batch = [todo.popleft() for _ in range(min(per_message, len(todo)))]
                    try:
                        w.conn.send(([(i, responses[i], ground_truths[i]) for i in batch], timeout_s))
                    except OSError:                    # it died; the receive below finds out
                        todo.extendleft(reversed(batch))
                        break
                    w.items.extend(batch)
            limits = [w.since + (stall_s if w.ready else WORKER_START_S) for w in _WORKERS if w.items or not w.ready]
            ready = multiprocessing.connection.wait([w.conn for w in _WORKERS], max(0.0, min(limits) - now))
            # A short answer is scored in far less than this pause: collecting for a moment lets one
            # wake-up of this process read many rewards, instead of one wake-up per answer taking
            # CPU from the workers.
            time.sleep(0.005)
            for conn in ready:
                w = next(w for w in _WORKERS if w.conn is conn)
                while True:                            # all that this worker has sent so far
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):        # it died (killed, or crashed in C code)
                        if not w.ready:
                            raise RuntimeError("a reward worker died while starting (is the main script's top level "
                                               "safe to import? forkserver imports it)")
                        if w.items:
                            lost(w)
                        else:
                            replace(w)
                        break
                    w.since = time.monotonic()
                    if msg == "ready":
                        w.ready = True
                    else:
                        i, reward = msg
                        if isinstance(reward, str):    # reward_fn raised: judge's message
                            raise RewardError(reward)
                        w.items.remove(i)
                        rewards[i], left = reward, left - 1
                    if not conn.poll():
                        break
            now = time.monotonic()
            for w in list(_WORKERS):
                if w.items and now - w.since > stall_s:
                    lost(w)                            # hung where SIGALRM cannot reach
                elif not w.ready and now - w.since > WORKER_START_S:
                    raise RuntimeError(f"a reward worker did not start within {WORKER_START_S} s")
    except BaseException:
        # Ctrl-C or a bug mid-batch: the workers still hold answers of this batch, whose rewards
        # would arrive in the next call. Start clean instead.
        close_reward_workers()
        raise
    return [s for s, _ in rewards], [c for _, c in rewards], timed_out


# Registered after multiprocessing's own exit handler (multiprocessing.connection, imported above,
# installs it), so this runs first: that one would SIGTERM the workers and wait, and a hung
# worker may be deaf to SIGTERM.
atexit.register(close_reward_workers)


# ----------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------
# How the ground truth is taken from a data set's answer column (prepare.py --answer_format).
ANSWER_FORMATS = ("boxed", "gsm8k", "whole")
SKIPPED_BECAUSE = {"boxed": "no boxed answer or empty problem", "gsm8k": "no answer after #### or empty problem",
                   "whole": "empty answer or problem"}


def ground_truth_of(answer, answer_format):
    """The ground truth in a reference answer, or None if it has none: "boxed" (MATH) takes the
    content of the last \\boxed{}; "gsm8k" the text after the last "####", without thousands
    commas (as verl's gsm8k preprocessing); "whole" the whole answer (a data set whose answer
    column is the final answer already).

    Example:
        ground_truth_of("... $\\boxed{\\frac{1}{2}}$.", "boxed")                 ->  "\\frac{1}{2}"
        ground_truth_of("She has 3 + 2 = <<3+2=5>>5 apples.\\n#### 1,005", "gsm8k")   ->  "1005"
        ground_truth_of(" 42 ", "whole")                                           ->  "42"
    """
    if answer_format == "whole" and isinstance(answer, int):
        answer = str(answer)
    if not isinstance(answer, str):
        return None
    if answer_format == "boxed":
        truth = last_boxed(answer)
    elif answer_format == "gsm8k":
        truth = answer.rpartition("####")[2].replace(",", "").strip() if "####" in answer else None
    else:
        truth = answer.strip()
    return truth if truth and truth.strip() else None


def make_row(problem, solution, level, type_, split, index, answer_format="boxed", instruction=INSTRUCTION,
             data_source=DATA_SOURCE):
    """One output record, or None when the row cannot be used (empty problem, no ground truth)."""
    if not isinstance(problem, str) or not problem.strip():
        return None
    truth = ground_truth_of(solution, answer_format)
    if truth is None:
        return None
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": problem + " " + instruction if instruction else problem}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": truth},
        "extra_info": {"split": split, "index": index, "level": level, "type": type_},
    }


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


def write_jsonl(rows, path):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_prompt_set(outputs, local_dir):
    """Write {"train": rows, "test": rows} as local_dir/train.json and test.json, both or neither.

    run.sh takes the data step as done when both files exist, so a half-finished write must
    never leave a pair that looks complete (a new train.json next to a stale test.json). The order:
    remove the old train.json, then the old test.json (from here on no complete pair exists);
    write both to .tmp files; rename test, then train *last*: train.json appears only once its
    test.json from the same run is in place. A failure (disk full, unwritable folder) removes
    the .tmp files this run made and ends in one line.
    """
    final = {split: os.path.join(local_dir, f"{split}.json") for split in ("train", "test")}
    made = []
    try:
        for split in ("train", "test"):
            if os.path.lexists(final[split]):
                os.remove(final[split])
        for split in ("train", "test"):
            tmp = final[split] + ".tmp"
            made.append(tmp)          # before open: a half-written file is ours to remove too
            write_jsonl(outputs[split], tmp)
        os.replace(final["test"] + ".tmp", final["test"])
        os.replace(final["train"] + ".tmp", final["train"])
    except OSError as e:
        for tmp in made:
            if os.path.isfile(tmp):
                os.remove(tmp)
        die(f"cannot write {e.filename or local_dir}: {e.strerror or e}; no prompt set was written to {local_dir}")


def check_output_dir(local_dir):
    """Create local_dir if needed; one line if it is a file or not writable, before any reading."""
    if os.path.exists(local_dir) and not os.path.isdir(local_dir):
        die(f"--local_dir {local_dir} is a file; pass a folder for train.json and test.json")
    try:
        os.makedirs(local_dir, exist_ok=True)
    except OSError as e:
        die(f"cannot create --local_dir {local_dir}: {e.strerror or e}")
    if not os.access(local_dir, os.W_OK | os.X_OK):
        die(f"--local_dir {local_dir} is not writable")


def split_files(folder, split):
    """(loader, files) of one split in folder: {split}-*.parquet (the HF layout), else {split}.jsonl
    or {split}-*.jsonl; (None, []) when there are none."""
    for loader, patterns in (("parquet", [f"{split}-*.parquet"]), ("json", [f"{split}.jsonl", f"{split}-*.jsonl"])):
        found = sorted(f for pattern in patterns for f in glob.glob(os.path.join(folder, pattern)))
        if found:
            return loader, found
    return None, []


def preprocess(input_dir, local_dir, subdir="data", question_column="problem", answer_column="solution",
               answer_format="boxed", instruction=INSTRUCTION, data_source=DATA_SOURCE):
    """Read {train,test}-*.parquet (or .jsonl) under input_dir/subdir; write train.json and test.json.

    The defaults read MATH-lighteval; the arguments read another data set's layout (see main).
    Returns {split: (written, skipped)}. Bad rows are skipped and counted, never fatal: one odd
    row in 7500 should not stop a training run. A split with no row left is: an empty prompt set
    means the columns or the answer format are wrong, and nothing is written.
    """
    if not os.path.isdir(input_dir):
        die(f"input folder {input_dir} does not exist; run `python prepare.py download --local_dir {input_dir}` first")
    folder = os.path.join(input_dir, subdir)
    files = {split: split_files(folder, split) for split in ("train", "test")}
    for split, (_, found) in files.items():
        if not found:
            die(f"no {split}-*.parquet or {split}.jsonl under {folder}; expected MATH-lighteval's layout "
                f"data/{{train,test}}-*.parquet, or pass the folder that holds them with --subdir")
    check_output_dir(local_dir)
    import datasets
    from tqdm import tqdm
    datasets.disable_progress_bars()
    summary, outputs = {}, {}
    for split, (loader, found) in files.items():
        try:
            ds = datasets.load_dataset(loader, data_files=found, split="train")
        except Exception as e:
            die(f"cannot read {split} {loader} files in {folder}: {str(e).splitlines()[0]}")
        missing = [c for c in (question_column, answer_column) if c not in ds.column_names]
        if missing:
            die(f"{split} {loader} files lack the column(s) {', '.join(missing)}; columns are {', '.join(ds.column_names)} "
                "(--question_column and --answer_column name yours)")
        rows, skipped = [], 0
        for index, ex in enumerate(tqdm(ds, desc=f"{split}", unit="row", file=sys.stderr)):
            row = make_row(ex.get(question_column), ex.get(answer_column), ex.get("level"), ex.get("type"), split, index,
                           answer_format, instruction, data_source)
            if row is None:
                skipped += 1
            else:
                rows.append(row)
        if not rows:
            die(f"no usable {split} row in {folder}: all {skipped} skipped ({SKIPPED_BECAUSE[answer_format]}); "
                f"check --question_column {question_column} --answer_column {answer_column} --answer_format {answer_format}; "
                f"nothing was written")
        outputs[split] = rows
        summary[split] = (len(rows), skipped)
    # Both splits are read and checked before anything is written.
    write_prompt_set(outputs, local_dir)
    return summary


# ----------------------------------------------------------------------------------------------
# Downloads (modelscope, as in the reference example)
# ----------------------------------------------------------------------------------------------
def _short(e):
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def modelscope_download(kind, repo_id, local_dir):
    """Download a modelscope data set (kind "data set") or model (kind "model") into local_dir;
    any failure (no network, unknown id) is one line naming what could not be reached."""
    try:
        from modelscope.hub.snapshot_download import dataset_snapshot_download, snapshot_download
    except ImportError:
        die("modelscope is not installed: pip install modelscope")
    fetch = dataset_snapshot_download if kind == "data set" else snapshot_download
    try:
        fetch(repo_id, local_dir=local_dir)
    except Exception as e:
        die(f"could not download {kind} {repo_id} from modelscope.cn ({type(e).__name__}: {_short(e)}); "
            f"check the network and the name, or copy the files to {local_dir} by hand")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("download", "download-model"):
        cmd, rest = argv[0], argv[1:]
        p = one_line_errors(argparse.ArgumentParser(prog=f"prepare.py {cmd}"))
        if cmd == "download":
            p.description = f"Download {MODELSCOPE_DATASET} from modelscope."
            p.add_argument("--local_dir", default="dataset/MATH-lighteval", help="where the parquet files go")
            p.add_argument("--dataset", default=MODELSCOPE_DATASET, help="modelscope data set id")
            a = p.parse_args(rest)
            modelscope_download("data set", a.dataset, a.local_dir)
        else:
            p.description = "Download a Qwen2.5 checkpoint (HF format) from modelscope."
            p.add_argument("--model", default="Qwen/Qwen2.5-7B-Instruct", help="modelscope model id")
            p.add_argument("--local_dir", default=None, help="target folder (default: the model's name)")
            a = p.parse_args(rest)
            modelscope_download("model", a.model, a.local_dir or a.model.split("/")[-1])
        print(f"downloaded to {a.local_dir or a.model.split('/')[-1]}")
        return
    p = one_line_errors(argparse.ArgumentParser(
        description="Turn MATH-lighteval parquet files (or another data set's, with the layout flags) into the GRPO "
                    "prompt set (train.json, test.json). Subcommands: `download` (a data set) and `download-model` "
                    "(a Qwen2.5 checkpoint); see `prepare.py download --help`."))
    p.add_argument("--input_dir", default="dataset/MATH-lighteval", help="the data set's folder (MATH-lighteval: data/{train,test}-*.parquet in it)")
    p.add_argument("--local_dir", default=None, help="output folder for train.json/test.json (default: input_dir)")
    g = p.add_argument_group("another data set's layout (defaults: MATH-lighteval's)")
    g.add_argument("--subdir", default="data",
                   help="folder under input_dir with {train,test}-*.parquet or {train,test}.jsonl (GSM8K: main; . for input_dir)")
    g.add_argument("--question_column", default="problem", help="column holding the question")
    g.add_argument("--answer_column", default="solution", help="column holding the reference answer")
    g.add_argument("--answer_format", default="boxed", choices=ANSWER_FORMATS,
                   help="where the ground truth is in the answer: its last \\boxed{} (MATH), the text after #### "
                        "(GSM8K), or the whole answer")
    g.add_argument("--instruction", default=INSTRUCTION, help="appended to each question after a space ('' for none)")
    g.add_argument("--data_source", default=DATA_SOURCE, help="the records' data_source field")
    a = p.parse_args(argv)
    out = a.local_dir or a.input_dir
    summary = preprocess(a.input_dir, out, a.subdir, a.question_column, a.answer_column, a.answer_format,
                         a.instruction, a.data_source)
    print("wrote " + ", ".join(f"{out}/{s}.json: {n} rows ({k} skipped: {SKIPPED_BECAUSE[a.answer_format]})"
                               for s, (n, k) in summary.items()))


if __name__ == "__main__":
    main()
