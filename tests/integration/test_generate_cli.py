"""``python -m megatron_mtp.generate`` on checkpoints of the pretrain script: speculative text equals greedy text,
the statistics are printed, and bad input is refused with a clear error before any model is built."""

import re
import subprocess
import sys

import pytest

from megatron_mtp import generate
from test_pretrain import REPO, run

PROMPT = "def parse(self, text):\n    "
MODEL_FLAGS = ["--seq-length", "64", "--make-vocab-size-divisible-by", "160"]  # the TINY flags' that set shapes


@pytest.fixture(scope="module")
def checkpoints(tiny_data, tmp_path_factory):
    """Two-step checkpoints: sequential MTP D=2 (the TINY flags) and one without MTP."""
    root = tmp_path_factory.mktemp("generate")
    paths = dict(mtp=str(root / "mtp"), plain=str(root / "plain"))
    run(1, ["--train-iters", "2", "--lr-warmup-iters", "1", "--save", paths["mtp"]], tiny_data)
    run(1, ["--train-iters", "2", "--lr-warmup-iters", "1", "--mtp-num-layers", "0", "--save", paths["plain"]], tiny_data)
    return paths


def _generate(arguments):
    result = subprocess.run(
        [sys.executable, "-m", "megatron_mtp.generate", *MODEL_FLAGS, *arguments],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    text, _, stats = result.stdout.rpartition("\n\n[")
    return text, stats


def test_speculative_text_equals_greedy_text(checkpoints):
    common = ["--load", checkpoints["mtp"], "--prompt", PROMPT, "--max-new-tokens", "24"]
    greedy_text, greedy_stats = _generate(common)
    speculative_text, speculative_stats = _generate(common + ["--speculative"])
    assert speculative_text == greedy_text and speculative_text.startswith(PROMPT)
    assert "tokens/s" in greedy_stats and "1.00 tokens per main forward" in greedy_stats
    assert "[acceptance per draft position: " in speculative_stats


@pytest.mark.parametrize(
    "checkpoint,arguments,message",
    [
        ("plain", ["--speculative"], "has none"),
        ("mtp", ["--speculative", "--num-draft-tokens", "3"], "only 2 sequential MTP depths.*--reuse-last-mtp-depth"),
        ("mtp", ["--mtp-mode", "parallel"], "mtp_mode: checkpoint 'sequential', this run 'parallel'"),
        ("mtp", ["--prompt-file", "PROMPT_FILE"], r"prompt \(70 tokens\) plus 8 new tokens exceed"),
    ],
)
def test_bad_input_is_refused(checkpoints, tmp_path, capsys, checkpoint, arguments, message):
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("x" * 70)
    arguments = [str(prompt_file) if a == "PROMPT_FILE" else a for a in arguments]
    if "--prompt-file" not in arguments:
        arguments += ["--prompt", PROMPT]
    with pytest.raises(SystemExit):
        generate.main(["--load", checkpoints[checkpoint], *MODEL_FLAGS, "--max-new-tokens", "8", *arguments])
    assert re.search(message, capsys.readouterr().err)
