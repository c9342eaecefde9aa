"""The reward of the README's GSM8K example: `grpo.py --reward gsm8k_reward:reward` (run.sh: REWARD=).

An answer is right when its last number equals the ground truth (the number after "####" that
`prepare.py --answer_format gsm8k` wrote); a \\boxed{} earns 0.1 more, a nudge toward the format
the instruction asks for. The reward returns (score, correct), so `accuracy` counts right answers
whether boxed (1.1) or not (1.0), and a wrong answer's 0.1 is never one of them.
"""
import re


def last_number(text):
    """The last number in text, thousands commas removed: "1,000 apples at $2.50" -> "2.50"."""
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return found[-1].replace(",", "") if found else None


def reward(response, ground_truth, **extra):
    number = last_number(response)
    try:
        correct = number is not None and float(number) == float(ground_truth)
    except (TypeError, ValueError):          # a ground truth that is not a number: nothing equals it
        correct = False
    return (1.0 if correct else 0.0) + (0.1 if "\\boxed{" in response else 0.0), correct
