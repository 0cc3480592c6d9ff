"""The pretrain script with --bf16 on CPU under torchrun: bf16 parameters, fp32 main_grad and fp32 main
parameters in the checkpoint; the distributed optimizer at DP=2; resume bit for bit; clear errors where a
checkpoint cannot resume (see the README's limitation for the distributed optimizer without TE/apex)."""

import math

import torch
from torch.distributed.checkpoint import FileSystemReader

from test_pretrain import read_log, run

BF16 = "bf16 parameters, fp32 main parameters, fp32 main_grad"
LOSSES = ("lm_loss", "mtp_1_loss", "mtp_2_loss")


def _saved_dtypes(directory):
    """{key: dtype} of the tensors in a torch_dist checkpoint directory."""
    metadata = FileSystemReader(str(directory)).read_metadata()
    return {key: item.properties.dtype for key, item in metadata.state_dict_metadata.items() if hasattr(item, "properties")}


def test_bf16_distributed_optimizer_trains_saves_bf16_weights_with_fp32_state(tiny_data, tmp_path):
    save, log = tmp_path / "ckpt", tmp_path / "train.jsonl"
    out = run(2, ["--bf16", "--use-distributed-optimizer", "--train-iters", "4", "--eval-interval", "4",
                  "--eval-iters", "2", "--save", str(save), "--json-log", str(log)], tiny_data)
    assert "world 2 (TP 1, PP 1, DP 2)" in out.stdout and BF16 in out.stdout
    train = read_log(log)
    assert all(math.isfinite(train[i][k]) for i in train for k in LOSSES)
    assert all(train[4][k] < train[1][k] for k in LOSSES), train

    dtypes = _saved_dtypes(save / "iter_0000004")
    weights = {k: d for k, d in dtypes.items() if k.startswith(("embedding.", "decoder.", "mtp.", "output_layer."))}
    optimizer = {k: d for k, d in dtypes.items() if k.startswith("optimizer.state.")}
    assert weights and set(weights.values()) == {torch.bfloat16}
    assert optimizer and set(optimizer.values()) == {torch.float32}  # fp32 main params and Adam moments

    refused = run(2, ["--bf16", "--use-distributed-optimizer", "--train-iters", "6", "--load", str(save)], tiny_data, check=False)
    assert refused.returncode != 0 and "--use-distributed-optimizer needs TransformerEngine or apex" in refused.stderr

    weights_only = tmp_path / "weights.jsonl"
    run(2, ["--bf16", "--use-distributed-optimizer", "--train-iters", "4", "--load", str(save), "--finetune",
            "--skip-train", "--eval-iters", "2", "--json-log", str(weights_only)], tiny_data)
    saved_run, reloaded = read_log(log, "validation")[4], read_log(weights_only, "validation")[0]
    assert {k: reloaded[k] for k in LOSSES} == {k: saved_run[k] for k in LOSSES}


def test_bf16_resume_is_bit_exact_and_a_precision_change_is_refused(tiny_data, tmp_path):
    save = tmp_path / "ckpt"
    common = ["--bf16", "--pipeline-model-parallel-size", "2", "--train-iters", "4"]
    run(2, [*common, "--save", str(save), "--save-interval", "2", "--json-log", str(tmp_path / "straight.jsonl")], tiny_data)
    (save / "latest_checkpointed_iteration.txt").write_text("2")  # go back to the checkpoint of iteration 2
    out = run(2, [*common, "--load", str(save), "--json-log", str(tmp_path / "resumed.jsonl")], tiny_data)
    assert "resumed from" in out.stdout and "at iteration 2" in out.stdout and BF16 in out.stdout
    straight, resumed = read_log(tmp_path / "straight.jsonl"), read_log(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == [3, 4]
    keys = [k for k in straight[4] if k == "lm_loss" or k.startswith("mtp_")]
    for iteration in resumed:
        assert {k: resumed[iteration][k] for k in keys} == {k: straight[iteration][k] for k in keys}, iteration

    fp32 = run(1, ["--train-iters", "4", "--load", str(save)], tiny_data, check=False)
    assert fp32.returncode != 0 and "holds the state of ['Float16OptimizerWithFloat16Params']" in fp32.stderr
