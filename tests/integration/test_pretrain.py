"""The pretrain script end to end on CPU: multi-process runs, resume after a kill, checkpoints across
TP/PP, atomic saves, and clear errors for bad data and checkpoints."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--lr-warmup-iters", "2",
    "--log-interval", "1", "--eval-interval", "0", "--eval-iters", "4", "--mtp-num-layers", "2", "--split", "60,40,0",
    "--tokenizer-type", "ByteLevel", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--min-lr", "2e-4", "--lr-decay-style", "cosine",
    "--adam-beta2", "0.95",
    # The byte-level vocabulary (257) pads to 320 at TP 1 and 2 alike, so checkpoints move between them.
    "--make-vocab-size-divisible-by", "160",
]


def _command(nproc, args):
    """One process runs the script as plain ``python`` (it makes a world of one itself; saves torchrun's start);
    more run under torchrun."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port", str(free_port())]
    return launcher + ["-m", "megatron_mtp.pretrain"] + TINY + list(args)


def run(nproc, args, data, check=True, timeout=600):
    args = ["--data-path", data["prefix"], "--data-cache-path", data["cache"], *args]
    result = subprocess.run(
        _command(nproc, args), capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    if check and result.returncode != 0:
        raise AssertionError(f"pretrain failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def read_log(path, split="train"):
    with open(path) as f:
        return {r["iteration"]: r for r in map(json.loads, f) if r["split"] == split}


@pytest.fixture(scope="module")
def initial_weights(tiny_data, tmp_path_factory):
    """A one-process checkpoint to start from: each PP stage initializes its layers from another RNG state."""
    save = tmp_path_factory.mktemp("initial") / "ckpt"
    run(1, ["--train-iters", "1", "--lr-warmup-iters", "0", "--save", str(save)], tiny_data)
    return ["--load", str(save), "--finetune"]


@pytest.fixture(scope="module")
def one_process_log(tiny_data, tmp_path_factory, initial_weights):
    """The training metrics of 4 steps from ``initial_weights`` on one process: the parallel runs' reference."""
    log = tmp_path_factory.mktemp("one_process") / "log.jsonl"
    run(1, ["--train-iters", "4", *initial_weights, "--json-log", str(log)], tiny_data)
    return read_log(log)


@pytest.mark.parametrize(
    "parallel",
    [["--tensor-model-parallel-size", "2"], ["--pipeline-model-parallel-size", "2"], ["--use-distributed-optimizer"],
     ["--context-parallel-size", "2"]],
    ids=["tp2", "pp2", "dp2-distributed-optimizer", "cp2"],
)
def test_two_process_run_trains_like_one_process_and_saves(tiny_data, tmp_path, parallel, initial_weights, one_process_log):
    save = tmp_path / "ckpt"
    out = run(2, [*parallel, "--train-iters", "4", *initial_weights, "--save", str(save), "--save-interval", "2",
                  "--json-log", str(tmp_path / "log.jsonl"), "--tensorboard-dir", str(tmp_path / "tb")], tiny_data)
    assert "iteration 4/4 | lm loss" in out.stdout and "mtp_2 loss" in out.stdout
    assert f"saved checkpoint at iteration 4 to {save}/iter_0000004" in out.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert sorted(p.name for p in save.iterdir() if p.name.startswith("iter_")) == ["iter_0000002", "iter_0000004"]
    log = read_log(tmp_path / "log.jsonl")
    assert sorted(log) == sorted(one_process_log) == [1, 2, 3, 4]
    for iteration in log:
        for key in ("lm_loss", "mtp_1_loss", "mtp_2_loss", "mtp_1_acc", "mtp_2_acc", "grad_norm"):
            assert log[iteration][key] == pytest.approx(one_process_log[iteration][key], abs=1e-5), (iteration, key)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path / "tb"))


def test_gradient_accumulation_fusion_trains_as_without_it(tiny_data, tmp_path):
    """Megatron-LM's default (fusion on: weight gradients added into main_grad by the CPU bridge's stand-in for
    apex's kernel) against --no-gradient-accumulation-fusion: the same losses and gradient norms."""
    logs = {}
    for label, flags in (("fused", []), ("unfused", ["--no-gradient-accumulation-fusion"])):
        logs[label] = tmp_path / f"{label}.jsonl"
        out = run(1, ["--train-iters", "3", *flags, "--json-log", str(logs[label])], tiny_data).stdout
        assert f"gradient-accumulation fusion {'on' if label == 'fused' else 'off'}" in out
    fused, unfused = read_log(logs["fused"]), read_log(logs["unfused"])
    assert sorted(fused) == [1, 2, 3]
    for iteration in fused:
        for key in ("lm_loss", "mtp_1_loss", "mtp_2_loss", "grad_norm"):
            assert fused[iteration][key] == pytest.approx(unfused[iteration][key], rel=1e-6), (iteration, key)


def test_moe_aux_losses_are_logged_per_layer_as_megatron_logs_them(tiny_data, tmp_path):
    """MoE decoder and MTP layers with a load-balancing loss and the z-loss at PP=2: the step line, the JSON log and
    TensorBoard carry Megatron-Core's aux-loss log, which the last rank writes after summing it over the stages:
    decoder layers 0-1 (stage 0), 2-3 (stage 1), then the two MTP layers."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    moe = ["--num-layers", "4", "--num-experts", "4", "--disable-bias-linear", "--moe-aux-loss-coeff", "1e-2",
           "--moe-z-loss-coeff", "1e-3", "--moe-per-layer-logging"]
    logs = ["--json-log", str(tmp_path / "log.jsonl"), "--tensorboard-dir", str(tmp_path / "tb")]
    out = run(2, ["--pipeline-model-parallel-size", "2", *moe, "--train-iters", "3", *logs], tiny_data)
    assert "iteration 3/3 | lm loss" in out.stdout and "load_balancing_loss" in out.stdout and "z_loss" in out.stdout
    log = read_log(tmp_path / "log.jsonl")
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    layers = 4 + 2
    for name in ("load_balancing_loss", "z_loss"):
        assert sorted(tag for tag in tags if tag.startswith(f"moe/{name}_layer_")) == sorted(
            f"moe/{name}_layer_{i}" for i in range(layers)
        )
        for iteration in (1, 2, 3):
            per_layer = [_scalar(events, f"moe/{name}_layer_{i}", iteration) for i in range(layers)]
            assert all(value > 0 for value in per_layer), (name, iteration, per_layer)
            mean = _scalar(events, name, iteration)
            assert mean == pytest.approx(sum(per_layer) / layers, rel=1e-6), (name, iteration)
            assert log[iteration][name] == pytest.approx(mean, rel=1e-6), (name, iteration)


def _scalar(events, tag, step):
    (value,) = [event.value for event in events.Scalars(tag) if event.step == step]
    return value


def _kill_tree(pid):
    """SIGKILL a launcher and every process under it (torchrun starts workers in their own sessions)."""
    import psutil

    parent = psutil.Process(pid)
    for process in [*parent.children(recursive=True), parent]:
        process.kill()


@pytest.mark.parametrize("parallel", [["--tensor-model-parallel-size", "2"], ["--context-parallel-size", "2"]], ids=["tp2", "cp2"])
def test_resume_after_kill_is_bit_exact(tiny_data, tmp_path, parallel):
    common = [*parallel, "--train-iters", "12"]
    run(2, [*common, "--json-log", str(tmp_path / "straight.jsonl")], tiny_data)

    save = tmp_path / "ckpt"
    args = ["--data-path", tiny_data["prefix"], "--data-cache-path", tiny_data["cache"], *common,
            "--save", str(save), "--save-interval", "4", "--json-log", str(tmp_path / "killed.jsonl")]
    job = subprocess.Popen(_command(2, args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in job.stdout:
        if "saved checkpoint at iteration 4" in line:
            _kill_tree(job.pid)
            break
    job.wait(timeout=60)
    assert job.returncode != 0, "the job should have been killed"
    killed_at = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert killed_at in (4, 8) and "iteration 12/12" not in (tmp_path / "killed.jsonl").read_text()

    out = run(2, [*common, "--load", str(save), "--save", str(save), "--json-log", str(tmp_path / "resumed.jsonl")], tiny_data)
    assert f"at iteration {killed_at} ({killed_at * 4} samples consumed)" in out.stdout
    straight, resumed = read_log(tmp_path / "straight.jsonl"), read_log(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == list(range(killed_at + 1, 13))
    keys = [k for k in straight[12] if k == "lm_loss" or k.startswith("mtp_")]
    for iteration in resumed:
        assert {k: resumed[iteration][k] for k in keys} == {k: straight[iteration][k] for k in keys}, iteration


def test_virtual_pipeline_resumes_bit_exact_and_trains_like_one_process(tiny_data, tmp_path):
    """PP=2 x 2 virtual stages (4 layers, one per stage) saves at iteration 2. Resumed there, with the same split
    given as Megatron-Core's layout (MTP beside the loss), it repeats iterations 3-4 bit for bit; resumed by one
    process (no virtual stages; model and optimizer state) it trains them alike."""
    four_layers = ["--num-layers", "4", "--train-iters", "4"]
    save, logs = tmp_path / "ckpt", {name: tmp_path / f"{name}.jsonl" for name in ("straight", "layout", "one")}
    run(2, [*four_layers, "--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
            "--save", str(save), "--save-interval", "2", "--json-log", str(logs["straight"])], tiny_data)
    (save / "latest_checkpointed_iteration.txt").write_text("2")  # resume from the first of the two checkpoints
    out = run(2, [*four_layers, "--pipeline-model-parallel-size", "2", "--pipeline-model-parallel-layout", "Et|t|t|tmmL",
                  "--load", str(save), "--json-log", str(logs["layout"])], tiny_data)
    assert "PP 2 x 2 virtual" in out.stdout and "resumed from" in out.stdout
    run(1, [*four_layers, "--load", str(save), "--json-log", str(logs["one"])], tiny_data)
    straight, layout, one = (read_log(logs[name]) for name in ("straight", "layout", "one"))
    assert sorted(layout) == sorted(one) == [3, 4]
    keys = ["lm_loss", "mtp_1_loss", "mtp_2_loss", "mtp_1_acc", "mtp_2_acc", "grad_norm"]
    for iteration in (3, 4):
        assert {k: layout[iteration][k] for k in keys} == {k: straight[iteration][k] for k in keys}, iteration
        for key in keys:
            assert one[iteration][key] == pytest.approx(straight[iteration][key], abs=1e-5), (iteration, key)


def test_checkpoint_saved_at_tp2_loads_at_tp1_and_pp2_with_the_same_loss(tiny_data, tmp_path):
    save = tmp_path / "ckpt"
    run(2, ["--tensor-model-parallel-size", "2", "--train-iters", "3", "--save", str(save)], tiny_data)
    losses = {}
    for name, nproc, parallel in [("tp2", 2, ["--tensor-model-parallel-size", "2"]), ("tp1", 1, []),
                                  ("pp2", 2, ["--pipeline-model-parallel-size", "2"])]:
        log = tmp_path / f"{name}.jsonl"
        run(nproc, [*parallel, "--train-iters", "3", "--load", str(save), "--skip-train", "--eval-iters", "2",
                    "--json-log", str(log)], tiny_data)
        losses[name] = read_log(log, split="validation")[3]
    for name in ("tp1", "pp2"):
        for key in ("lm_loss", "mtp_1_loss", "mtp_2_loss"):
            assert losses[name][key] == pytest.approx(losses["tp2"][key], abs=1e-5), (name, key)


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tiny_data, tmp_path):
    save = tmp_path / "ckpt"
    args = ["--data-path", tiny_data["prefix"], "--data-cache-path", tiny_data["cache"], *TINY,
            "--train-iters", "4", "--save", str(save), "--save-interval", "2"]
    with open(tmp_path / "killed.log", "w") as output:
        # Own session, output to a file: the checkpoint writer's helper process outlives the killed trainer.
        job = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "integration", "kill_during_save.py"), *args],
                               stdout=output, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
                               env={**os.environ, "KILL_AT_ITERATION": "4"})
        try:
            assert job.wait(timeout=300) == -9, (tmp_path / "killed.log").read_text()[-3000:]
        finally:
            try:
                os.killpg(job.pid, 9)
            except ProcessLookupError:
                pass
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (save / "iter_0000004.partial").is_dir() and not (save / "iter_0000004").exists()
    out = run(1, ["--train-iters", "4", "--load", str(save), "--save", str(save)], tiny_data)
    assert "at iteration 2" in out.stdout and "saved checkpoint at iteration 4" in out.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert not (save / "iter_0000004.partial").exists()


def test_bad_data_and_checkpoints_fail_clearly(tiny_data, tmp_path):
    missing = run(1, ["--train-iters", "3", "--data-path", str(tmp_path / "nope")], tiny_data, check=False)
    assert missing.returncode != 0 and "--data-path" in missing.stderr and "nope" in missing.stderr

    corrupt = tmp_path / "corrupt"
    shutil.copy(tiny_data["prefix"] + ".bin", str(corrupt) + ".bin")
    with open(tiny_data["prefix"] + ".idx", "rb") as f:
        head = f.read(20)
    with open(str(corrupt) + ".idx", "wb") as f:
        f.write(head)
    bad_index = run(1, ["--train-iters", "3", "--data-path", str(corrupt)], tiny_data, check=False)
    assert bad_index.returncode != 0 and "corrupt.idx" in bad_index.stderr

    empty = tmp_path / "empty"
    empty.mkdir()
    no_checkpoint = run(1, ["--train-iters", "3", "--load", str(empty)], tiny_data, check=False)
    assert no_checkpoint.returncode != 0 and f"--load {empty}: no checkpoint there" in no_checkpoint.stderr

    save = tmp_path / "ckpt"
    run(1, ["--train-iters", "3", "--save", str(save)], tiny_data)
    shape = run(1, ["--train-iters", "4", "--load", str(save), "--hidden-size", "32"], tiny_data, check=False)
    assert shape.returncode != 0 and "saved for a different model" in shape.stderr and "hidden_size: checkpoint 64, this run 32" in shape.stderr
    distributed = run(1, ["--train-iters", "4", "--load", str(save), "--use-distributed-optimizer"], tiny_data, check=False)
    assert distributed.returncode != 0 and "--use-distributed-optimizer needs TransformerEngine or apex" in distributed.stderr
    mode = run(1, ["--train-iters", "4", "--load", str(save), "--mtp-mode", "parallel"], tiny_data, check=False)
    assert mode.returncode != 0 and "mtp_mode: checkpoint 'sequential', this run 'parallel'" in mode.stderr


def test_finetune_checks_the_model_signature(tiny_data, tmp_path):
    save = tmp_path / "ckpt"
    run(1, ["--train-iters", "3", "--save", str(save)], tiny_data)
    other = ["--hidden-size", "32", "--mtp-num-layers", "1", "--mtp-mode", "parallel"]
    mismatch = run(1, ["--train-iters", "3", "--load", str(save), "--finetune", *other], tiny_data, check=False)
    assert mismatch.returncode != 0 and "saved for a different model" in mismatch.stderr
    for difference in ("hidden_size: checkpoint 64, this run 32", "mtp_num_layers: checkpoint 2, this run 1",
                       "mtp_mode: checkpoint 'sequential', this run 'parallel'"):
        assert difference in mismatch.stderr, mismatch.stderr[-3000:]

    # A checkpoint from another tool records no signature: it loads with a warning, names and shapes still checked.
    common = save / "iter_0000003" / "common.pt"
    state = torch.load(common, weights_only=False)
    del state["signature"]
    torch.save(state, common)
    unsigned = run(1, ["--train-iters", "3", "--load", str(save), "--finetune"], tiny_data)
    assert "records no model signature" in unsigned.stderr and "training starts at iteration 0" in unsigned.stdout
    shape = run(1, ["--train-iters", "3", "--load", str(save), "--finetune", "--hidden-size", "32"], tiny_data, check=False)
    assert shape.returncode != 0 and "records no model signature" in shape.stderr
    assert "Global shape mismatch" in shape.stderr, shape.stderr[-3000:]


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    """An indexed dataset of 60 documents of 8 to 70 bytes: every 64-token sample holds eods."""
    root = tmp_path_factory.mktemp("short_documents")
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 71, (60,), generator=generator).tolist()
    with open(root / "docs.jsonl", "w") as f:
        for index, length in enumerate(lengths):
            f.write(json.dumps({"text": (f"document {index}: " + "abcdefghij" * 8)[:length]}) + "\n")
    prefix = str(root / "short")
    subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(root / "docs.jsonl"),
         "--output-prefix", prefix],
        check=True, capture_output=True,
    )
    return dict(prefix=prefix, cache=str(root / "cache"))


def test_reset_attention_mask_trains_packed_documents_at_tp2_like_one_process(short_documents, tmp_path):
    """--reset-position-ids --reset-attention-mask --eod-mask-loss: each micro-batch runs as packed documents, so
    depth k counts only targets inside their document (recounted here from the same samples); TP=2 with SP
    gives one process's metrics."""
    from megatron_mtp.data.datasets import MicroBatchIterator
    from megatron_mtp.data.tokenizers import build_tokenizer
    from megatron_mtp.pretrain import build_datasets
    from megatron_mtp.training.arguments import parse_args
    from packed_batches import targets_per_depth

    flags = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss", "--train-iters", "2",
             "--lr-warmup-iters", "0"]
    logs = {}
    for nproc, parallel in ((1, []), (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"])):
        logs[nproc] = tmp_path / f"{nproc}.jsonl"
        run(nproc, [*flags, *parallel, "--json-log", str(logs[nproc])], short_documents)
    one, two = read_log(logs[1]), read_log(logs[2])
    assert sorted(one) == sorted(two) == [1, 2]
    for iteration in one:
        for key in ("lm_loss", "mtp_1_loss", "mtp_2_loss", "mtp_2_tokens", "grad_norm"):
            assert two[iteration][key] == pytest.approx(one[iteration][key], abs=1e-5), (iteration, key)

    args = parse_args([*TINY, *flags, "--data-path", short_documents["prefix"],
                       "--data-cache-path", short_documents["cache"]])
    tokenizer = build_tokenizer("ByteLevel")
    _, train_set, _ = build_datasets(args, tokenizer, 4)
    samples = MicroBatchIterator(train_set, 0, 4, 0, 1)
    for iteration in (1, 2):
        step = next(samples)
        assert (step["tokens"] == tokenizer.eod).any(dim=1).all()
        expected = targets_per_depth(step["tokens"], step["loss_mask"], tokenizer.eod, 2)
        assert [one[iteration][f"mtp_{k}_tokens"] for k in (1, 2)] == expected
