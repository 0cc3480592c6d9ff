import json
import subprocess
import sys

import pytest

sys.path.insert(0, "tools")
from plot_mtp import read_json_log, read_tensorboard  # noqa: E402


def _write_log(path):
    with open(path, "w") as f:
        for it in range(1, 6):
            f.write(json.dumps({"iteration": it, "split": "train", "lm_loss": 5 - it * 0.5, "mtp_1_loss": 6 - it * 0.5,
                                "mtp_1_acc": 0.1 * it, "mtp_1_acc_main": 0.12 * it, "lr": 1e-3}) + "\n")
        f.write(json.dumps({"iteration": 5, "split": "validation", "lm_loss": 9.0}) + "\n")


def test_plot_from_json_log_writes_a_png(tmp_path):
    log = tmp_path / "metrics.jsonl"
    _write_log(log)
    series = read_json_log(str(log))
    assert series["mtp_1_acc"][-1] == (5, 0.5) and len(series["lm_loss"]) == 5  # validation line skipped
    output = tmp_path / "out" / "mtp.png"
    subprocess.run([sys.executable, "tools/plot_mtp.py", "--json-log", str(log), "--output", str(output)], check=True)
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_reads_tensorboard_scalars(tmp_path):
    from megatron_mtp.training.metrics_log import MetricsLog

    log = MetricsLog(train_iters=3, tensorboard_dir=str(tmp_path / "tb"))
    for it in range(1, 4):
        log.log(it, {"lm_loss": 3.0 / it, "mtp_1_loss": 4.0 / it, "mtp_1_acc": 0.2 * it, "mtp_1_acc_main": 0.3 * it})
    log.close()
    series = read_tensorboard(str(tmp_path / "tb"))
    assert [step for step, _ in series["mtp_1_acc"]] == [1, 2, 3]
    assert series["lm_loss"][0][1] == pytest.approx(3.0)


def test_bad_json_line_names_the_file_and_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"iteration": 1, "lm_loss": 1.0}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        read_json_log(str(log))
