"""Draw per-depth MTP loss and acceptance curves of a training run to a PNG.

    python tools/plot_mtp.py --json-log runs/demo/metrics.jsonl --output runs/demo/mtp.png
    python tools/plot_mtp.py --tensorboard-dir runs/demo/tb --output mtp.png

Reads the pretrain script's ``--json-log`` (training lines) or its ``--tensorboard-dir`` scalars.
"""

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from typing import Dict, List, Tuple

Series = Dict[str, List[Tuple[int, float]]]
_MTP_KEY = re.compile(r"^mtp_(\d+)_(loss|acc|acc_main)$")


def read_json_log(path: str) -> Series:
    series: Series = defaultdict(list)
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error})") from None
            if record.get("split", "train") != "train":
                continue
            for key, value in record.items():
                if key == "lm_loss" or _MTP_KEY.match(key):
                    series[key].append((record["iteration"], value))
    return series


def read_tensorboard(directory: str) -> Series:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(directory, size_guidance={"scalars": 0})
    accumulator.Reload()
    series: Series = {}
    for tag in accumulator.Tags()["scalars"]:
        key = tag.replace(" ", "_")
        if key == "lm_loss" or _MTP_KEY.match(key):
            series[key] = [(event.step, event.value) for event in accumulator.Scalars(tag)]
    return series


def plot(series: Series, output: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({int(m.group(1)) for key in series if (m := _MTP_KEY.match(key))})
    if "lm_loss" not in series and not depths:
        raise ValueError("no lm_loss or mtp_* metrics found to plot")
    figure, (loss_axis, acc_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    if "lm_loss" in series:
        loss_axis.plot(*zip(*series["lm_loss"]), label="next token (main)", color="black")
    for depth in depths:
        color = f"C{depth - 1}"
        if f"mtp_{depth}_loss" in series:
            loss_axis.plot(*zip(*series[f"mtp_{depth}_loss"]), label=f"depth {depth} (token t+{depth + 1})", color=color)
        if f"mtp_{depth}_acc" in series:
            acc_axis.plot(*zip(*series[f"mtp_{depth}_acc"]), label=f"depth {depth} vs label", color=color)
        if f"mtp_{depth}_acc_main" in series:
            acc_axis.plot(*zip(*series[f"mtp_{depth}_acc_main"]), "--", label=f"depth {depth} vs main greedy", color=color)
    loss_axis.set(xlabel="iteration", ylabel="cross-entropy", title="loss per depth")
    acc_axis.set(xlabel="iteration", ylabel="top-1 agreement", title="acceptance per depth", ylim=(0, 1))
    for axis in (loss_axis, acc_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    figure.savefig(output, dpi=110)
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--json-log", help="The pretrain script's --json-log file.")
    source.add_argument("--tensorboard-dir", help="The pretrain script's --tensorboard-dir.")
    parser.add_argument("--output", required=True, help="PNG file to write.")
    parser.add_argument("--title", default="multi-token prediction")
    args = parser.parse_args(argv)
    source_path = args.json_log or args.tensorboard_dir
    if not os.path.exists(source_path):
        parser.error(f"{source_path} does not exist")
    series = read_json_log(args.json_log) if args.json_log else read_tensorboard(args.tensorboard_dir)
    plot(series, args.output, args.title)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
