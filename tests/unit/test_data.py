"""Pretraining data: tokenizers, preprocessing to Megatron indexed datasets, the stdlib corpus, GPT datasets
and blends through Megatron-Core, resumable micro-batches, clear errors for missing/corrupt files, and a
two-process gloo world building the same data on every rank."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy
import pytest
import torch

from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.megatron_dataset import _PAD_TOKEN_ID

from megatron_mtp.data import stdlib_corpus
from megatron_mtp.data.datasets import MicroBatchIterator, build_gpt_datasets, causal_attention_mask, parse_blend
from megatron_mtp.data.indexed import check_indexed_dataset, find_input_files, write_indexed_dataset
from megatron_mtp.data.tokenizers import NO_PAD_ID, ByteTokenizer, HuggingFaceTokenizer, build_tokenizer
from mp_world import run_world

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "Grüße, 世界! naïve café\n",
    "The quick brown fox jumps over the lazy dog. " * 20,
    "",
    "import os\nprint(os.getcwd())\n" * 5,
]


def write_inputs(directory) -> list:
    """Two .txt documents and a .jsonl with three (one blank line in between); returns the paths in order."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, name) for name in ("a.txt", "b.txt", "c.jsonl")]
    for path, text in zip(paths[:2], TEXTS[:2]):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    with open(paths[2], "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": TEXTS[2], "id": 1}) + "\n\n")
        f.write(json.dumps({"text": TEXTS[3]}) + "\n")
        f.write(json.dumps({"text": TEXTS[4]}) + "\n")
    return paths


@pytest.fixture(scope="module")
def byte_dataset(tmp_path_factory):
    """A byte-level dataset of ~40 documents of ~300 tokens; returns its prefix."""
    directory = tmp_path_factory.mktemp("byte_dataset")
    lines = [json.dumps({"text": f"document {i}: " + TEXTS[i % len(TEXTS)] * (1 + i % 3)}) for i in range(40)]
    (directory / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prefix = str(directory / "docs")
    write_indexed_dataset([str(directory / "docs.jsonl")], prefix, ByteTokenizer(), show_progress=False)
    return prefix


def train_hf_tokenizer(path, special_tokens=("<|endoftext|>", "<pad>")) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=list(special_tokens), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TEXTS * 3, trainer)
    tokenizer.save(str(path))


# ----------------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_megatron_interface():
    tokenizer = build_tokenizer("ByteLevel", None)
    assert isinstance(tokenizer, ByteTokenizer)
    for text in TEXTS:
        ids = tokenizer.tokenize(text)
        assert ids == list(text.encode("utf-8")) and tokenizer.detokenize(ids + [tokenizer.eod]) == text
    assert tokenizer.vocab_size == 257 and tokenizer.eod == 256 and len(tokenizer.vocab) == 257
    assert tokenizer.detokenize([0xC3]) == "\ufffd"
    assert tokenizer.pad == NO_PAD_ID == _PAD_TOKEN_ID
    json.dumps(tokenizer.unique_identifiers)  # core hashes it into its cache file names
    with pytest.raises(ValueError, match="--tokenizer-type ByteLevel takes no --tokenizer-model"):
        build_tokenizer("ByteLevel", "tokenizer.json")
    with pytest.raises(ValueError, match="unknown --tokenizer-type 'GPT2BPE'.*ByteLevel, HuggingFaceTokenizer"):
        build_tokenizer("GPT2BPE", None)


def test_huggingface_tokenizer_end_to_end(tmp_path):
    path = tmp_path / "tokenizer.json"
    train_hf_tokenizer(path)
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(path))
    assert isinstance(tokenizer, HuggingFaceTokenizer)
    assert tokenizer.eod == tokenizer.vocab["<|endoftext|>"] and tokenizer.pad == tokenizer.vocab["<pad>"]
    assert tokenizer.vocab_size == len(tokenizer.vocab) <= 320
    for text in TEXTS:
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    assert len(tokenizer.tokenize(TEXTS[2])) < len(TEXTS[2])  # merges were learned

    counts = write_indexed_dataset(write_inputs(tmp_path / "in"), str(tmp_path / "hf"), tokenizer, show_progress=False)
    dataset = IndexedDataset(str(tmp_path / "hf"))
    assert counts["documents"] == len(dataset) == 5 and dataset.index.dtype == numpy.uint16
    for document, text in zip(dataset, TEXTS):
        assert document.tolist() == tokenizer.tokenize(text) + [tokenizer.eod]


def test_huggingface_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="HuggingFaceTokenizer needs --tokenizer-model"):
        build_tokenizer("HuggingFaceTokenizer", None)
    with pytest.raises(ValueError, match="--tokenizer-model .*missing.json: no such file"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "missing.json"))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="--tokenizer-model: cannot load tokenizer file .*garbage.json"):
        build_tokenizer("HuggingFaceTokenizer", str(garbage))
    no_eod = tmp_path / "no_eod.json"
    train_hf_tokenizer(no_eod, special_tokens=("<|end|>",))
    with pytest.raises(ValueError, match=r"no_eod.json has no end-of-document token .*--eod-token"):
        build_tokenizer("HuggingFaceTokenizer", str(no_eod))
    tokenizer = build_tokenizer("HuggingFaceTokenizer", str(no_eod), eod_token="<|end|>")
    assert tokenizer.eod == tokenizer.vocab["<|end|>"] and tokenizer.pad == NO_PAD_ID


# ---------------------------------------------------------------------------------------- preprocessing


def test_preprocess_txt_and_jsonl_read_back_with_megatron_core(tmp_path):
    tokenizer = ByteTokenizer()
    paths = write_inputs(tmp_path / "in")
    counts = write_indexed_dataset(paths, str(tmp_path / "out" / "ds"), tokenizer, show_progress=False)
    expected = [tokenizer.tokenize(text) + [tokenizer.eod] for text in TEXTS]
    assert counts == {
        "files": 3,
        "documents": 5,
        "tokens": sum(map(len, expected)),
        "skipped_empty_documents": 0,
    }
    dataset = IndexedDataset(str(tmp_path / "out" / "ds"))
    assert [document.tolist() for document in dataset] == expected
    assert dataset.index.dtype == numpy.uint16 and dataset.document_indices.tolist() == list(range(6))
    assert sorted(os.listdir(tmp_path / "out")) == ["ds.bin", "ds.idx"]  # no temporary files left
    assert check_indexed_dataset(str(tmp_path / "out" / "ds")) == (5, counts["tokens"], numpy.uint16)

    counts = write_indexed_dataset(paths, str(tmp_path / "noeod"), tokenizer, append_eod=False, show_progress=False)
    assert counts["documents"] == 4 and counts["skipped_empty_documents"] == 1  # the empty document
    no_eod = IndexedDataset(str(tmp_path / "noeod"))  # keep it alive: its items are views of its mmap
    assert no_eod[0].tolist() == tokenizer.tokenize(TEXTS[0])
    assert find_input_files([str(tmp_path / "in")]) == sorted(paths)


def test_preprocess_errors_name_file_and_line_and_leave_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    output = str(tmp_path / "out" / "ds")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: expected a JSON object with a string under 'text' .*int"):
        write_indexed_dataset([str(bad)], output, ByteTokenizer(), show_progress=False)
    bad.write_text('{"text": "fine"}\n{"text": "x"\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        write_indexed_dataset([str(bad)], output, ByteTokenizer(), show_progress=False)
    with pytest.raises(ValueError, match=r"bad.jsonl:1: .* has no 'body' \(keys: text\)"):
        write_indexed_dataset([str(bad)], output, ByteTokenizer(), json_key="body", show_progress=False)
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not valid UTF-8"):
        write_indexed_dataset([str(tmp_path / "latin1.txt")], output, ByteTokenizer(), show_progress=False)
    with pytest.raises(ValueError, match=r"unsupported input file type .*notes.md"):
        write_indexed_dataset([str(tmp_path / "notes.md")], output, ByteTokenizer(), show_progress=False)
    with pytest.raises(FileNotFoundError, match=r"--input .*nowhere: no such file or directory"):
        find_input_files([str(tmp_path / "nowhere")])
    assert os.listdir(tmp_path / "out") == []  # a failed run leaves no dataset and no temporary file


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preprocess_cli(tmp_path, capsys):
    write_inputs(tmp_path / "in")
    prefix = str(tmp_path / "cli")
    result = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(tmp_path / "in"), "--output-prefix", prefix],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "3 files, 5 documents" in result.stdout and f"wrote {prefix}.bin and {prefix}.idx" in result.stdout
    assert "tokenize" in result.stderr  # the progress bar
    dataset = IndexedDataset(prefix)
    assert dataset[1].tolist() == ByteTokenizer().tokenize(TEXTS[1]) + [256]

    tool = load_tool("preprocess_data")
    help_text = tool.build_parser().format_help()
    for flag in ("--input", "--output-prefix", "--json-key", "--tokenizer-type", "--tokenizer-model", "--no-append-eod"):
        assert flag in help_text
    assert tool.main(["--input", str(tmp_path / "in"), "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer"]) == 2
    assert "error: --tokenizer-type HuggingFaceTokenizer needs --tokenizer-model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ GPT datasets


def test_gpt_dataset_sample_alignment(byte_dataset, tmp_path):
    documents = [document.tolist() for document in IndexedDataset(byte_dataset)]
    stream = sum(documents, [])
    train, valid, test = build_gpt_datasets([byte_dataset], "90,10,0", 32, ByteTokenizer(), 1234, (300, 20, 0), str(tmp_path))
    assert test is None and len(train) >= 300 and len(valid) >= 20
    sample = train[7]
    assert sample["tokens"].shape == sample["labels"].shape == sample["loss_mask"].shape == (32,)
    assert sample["tokens"].dtype == sample["labels"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.float32
    assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
    assert torch.equal(sample["position_ids"], torch.arange(32)) and bool(sample["loss_mask"].all())
    # the 33 tokens of a sample are contiguous in the documents joined in *some* order: check each piece
    window = sample["tokens"].tolist() + sample["labels"][-1:].tolist()
    pieces = "".join(map(chr, window)).split(chr(256))
    text_stream = "".join(map(chr, stream))
    assert all(piece in text_stream for piece in pieces)
    again, _, _ = build_gpt_datasets([byte_dataset], "90,10,0", 32, ByteTokenizer(), 1234, (300, 20, 0), str(tmp_path))
    assert torch.equal(again[7]["tokens"], sample["tokens"])  # loaded from core's cache, same order


def test_blends_with_weights(byte_dataset, tmp_path):
    assert parse_blend(["a"]) == (["a"], [1.0])
    assert parse_blend(["a", "b"]) == (["a", "b"], [1.0, 1.0])
    assert parse_blend(["0.25", "a", "0.75", "b"]) == (["a", "b"], [0.25, 0.75])
    with pytest.raises(ValueError, match="--data-path: weight -1.0 for b must be positive"):
        parse_blend(["1", "a", "-1", "b"])

    other = str(tmp_path / "other")
    write_indexed_dataset(write_inputs(tmp_path / "in"), other, ByteTokenizer(), show_progress=False)
    for cache_dir in (str(tmp_path / "cache"), None):
        train, valid, _ = build_gpt_datasets(
            ["1", byte_dataset, "3", other], "90,10,0", 16, ByteTokenizer(), 7, (400, 40, 0), cache_dir
        )
        dataset_ids = numpy.array([train[i]["dataset_id"] for i in range(len(train))])
        assert len(train) == 400 and abs((dataset_ids == 1).mean() - 0.75) < 0.01
        assert torch.equal(train[3]["tokens"][1:], train[3]["labels"][:-1])
    equal, _, _ = build_gpt_datasets([byte_dataset, other], "90,10,0", 16, ByteTokenizer(), 7, (400, 40, 0), None)
    assert abs(numpy.mean([equal[i]["dataset_id"] for i in range(len(equal))]) - 0.5) < 0.01


def test_micro_batches_are_resumable_and_shard_data_parallel_ranks(tmp_path):
    prefix = str(tmp_path / "small")
    write_indexed_dataset(write_inputs(tmp_path / "in"), prefix, ByteTokenizer(), show_progress=False)
    train, _, _ = build_gpt_datasets([prefix], "1", 16, ByteTokenizer(), 3, (50, 0, 0), str(tmp_path))
    mbs, dp = 2, 3

    def batches(rank, consumed, count):
        iterator = MicroBatchIterator(train, consumed, mbs, rank, dp)
        return [next(iterator) for _ in range(count)], iterator.consumed_samples

    uninterrupted, consumed = batches(1, 0, 12)
    assert consumed == 12 * mbs * dp
    resumed, _ = batches(1, 5 * mbs * dp, 7)
    for a, b in zip(uninterrupted[5:], resumed):
        assert all(torch.equal(a[key], b[key]) for key in a)
    batch = uninterrupted[0]
    assert batch["tokens"].shape == (mbs, 16) and batch["loss_mask"].dtype == torch.float32
    assert batch["attention_mask"].shape == (1, 1, 16, 16) and batch["attention_mask"].dtype == torch.bool
    assert torch.equal(batch["attention_mask"][0, 0], ~torch.ones(16, 16, dtype=torch.bool).tril())
    # rank r of step s holds global samples s*mbs*dp + r*mbs + [0, mbs); past the end they wrap around
    global_samples = [[b["tokens"] for b in batches(rank, 0, 12)[0]] for rank in range(dp)]
    for step in range(12):
        for rank in range(dp):
            for i in range(mbs):
                g = step * mbs * dp + rank * mbs + i
                assert torch.equal(global_samples[rank][step][i], train[g % len(train)]["tokens"])
    assert 12 * mbs * dp > len(train)  # the loop above did wrap around
    with pytest.raises(ValueError, match="consumed_samples 5 must be a non-negative multiple of .* = 6"):
        MicroBatchIterator(train, 5, mbs, 0, dp)
    assert torch.equal(causal_attention_mask(3)[0, 0], torch.tensor([[0, 1, 1], [0, 0, 1], [0, 0, 0]]).bool())


def test_missing_and_corrupt_files_give_clear_errors(byte_dataset, tmp_path):
    def build(prefix, split="90,10,0"):
        return build_gpt_datasets([prefix], split, 16, ByteTokenizer(), 1, (10, 2, 0), str(tmp_path / "cache"))

    def copy(name):
        for suffix in (".bin", ".idx"):
            with open(byte_dataset + suffix, "rb") as source:
                (tmp_path / (name + suffix)).write_bytes(source.read())
        return str(tmp_path / name)

    with pytest.raises(FileNotFoundError, match=r"--data-path .*/nothing: .*/nothing.bin: no such file"):
        build(str(tmp_path / "nothing"))
    prefix = copy("no_idx")
    os.remove(prefix + ".idx")
    with pytest.raises(FileNotFoundError, match=r"--data-path .*no_idx: .*no_idx.idx: no such file"):
        build(prefix)

    prefix = copy("garbage")
    (tmp_path / "garbage.idx").write_bytes(b"this is not an index at all, " * 4)
    with pytest.raises(ValueError, match=r"--data-path .*garbage: .*garbage.idx: not a Megatron index file"):
        build(prefix)
    prefix = copy("short")
    (tmp_path / "short.idx").write_bytes((tmp_path / "short.idx").read_bytes()[:20])
    with pytest.raises(ValueError, match=r"short.idx: truncated Megatron index \(20 bytes\)"):
        build(prefix)
    prefix = copy("truncated")
    (tmp_path / "truncated.idx").write_bytes((tmp_path / "truncated.idx").read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"truncated.idx: .* bytes, but an index of 40 sequences .*truncated"):
        build(prefix)
    prefix = copy("short_bin")
    (tmp_path / "short_bin.bin").write_bytes((tmp_path / "short_bin.bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"short_bin.bin: .* bytes, but .*short_bin.idx describes"):
        build(prefix)

    with pytest.raises(ValueError, match=r"--split '90,10,0.1' leaves the test split no document .*40 documents"):
        build_gpt_datasets([byte_dataset], "90,10,0.1", 16, ByteTokenizer(), 1, (10, 2, 2), None)
    with pytest.raises(ValueError, match=r"--split 'train': expected up to 3 comma-separated"):
        build(byte_dataset, split="train")
    assert check_indexed_dataset(byte_dataset).sequences == 40


# ---------------------------------------------------------------------------------------- stdlib corpus


def make_fake_stdlib(root) -> list:
    files = {
        "os.py": "import sys\n",
        "json/__init__.py": "from .decoder import JSONDecoder\n",
        "json/decoder.py": "class JSONDecoder: pass\n",
        "site-packages/numpy/__init__.py": "raise ImportError\n",
        "__pycache__/os.py": "# not source\n",
        "json/README.txt": "not python\n",
    }
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        with open(os.path.join(root, name), "w") as f:
            f.write(text)
    with open(os.path.join(root, "latin1.py"), "wb") as f:
        f.write("# -*- coding: latin-1 -*-\ns = 'café'\n".encode("latin-1"))
    return ["json/__init__.py", "json/decoder.py", "latin1.py", "os.py"]


def test_stdlib_corpus_builds_once_and_is_reused(tmp_path, monkeypatch):
    expected = make_fake_stdlib(str(tmp_path / "lib"))
    monkeypatch.setattr(stdlib_corpus, "stdlib_directory", lambda: str(tmp_path / "lib"))
    assert stdlib_corpus.stdlib_source_files() == [str(tmp_path / "lib" / name) for name in expected]
    tokenizer = ByteTokenizer()
    prefix = stdlib_corpus.prepare_stdlib_corpus(str(tmp_path / "cache"), tokenizer, show_progress=False)
    version = f"{sys.version_info.major}{sys.version_info.minor}"
    assert prefix == str(tmp_path / "cache" / f"stdlib_py{version}_bytelevel")
    documents = [tokenizer.detokenize(document) for document in IndexedDataset(prefix)]
    assert documents[0] == "from .decoder import JSONDecoder\n" and documents[3] == "import sys\n"
    assert documents[2] == "# -*- coding: latin-1 -*-\ns = 'caf\ufffd'\n"
    stamps = [os.stat(prefix + suffix).st_mtime_ns for suffix in (".bin", ".idx")]

    def must_not_rebuild():
        raise AssertionError("the cached corpus should have been reused")

    monkeypatch.setattr(stdlib_corpus, "stdlib_source_files", must_not_rebuild)
    assert stdlib_corpus.prepare_stdlib_corpus(str(tmp_path / "cache"), tokenizer, show_progress=False) == prefix
    assert stamps == [os.stat(prefix + suffix).st_mtime_ns for suffix in (".bin", ".idx")]
    monkeypatch.undo()

    monkeypatch.setattr(stdlib_corpus, "stdlib_directory", lambda: str(tmp_path / "lib"))
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"garbage!!")
    assert stdlib_corpus.prepare_stdlib_corpus(str(tmp_path / "cache"), tokenizer, show_progress=False) == prefix
    assert check_indexed_dataset(prefix).sequences == 4  # a corrupt cache is rebuilt


def test_real_stdlib_is_found_and_default_cache_dir(monkeypatch, tmp_path):
    import sysconfig

    files = stdlib_corpus.stdlib_source_files()
    root = sysconfig.get_paths()["stdlib"]
    relative = [os.path.relpath(path, root) for path in files]
    assert "os.py" in relative and os.path.join("json", "__init__.py") in relative and len(files) > 500
    assert relative == sorted(relative)
    assert not any(part in ("site-packages", "__pycache__") for path in relative for part in path.split(os.sep))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert stdlib_corpus.default_cache_dir() == str(tmp_path / "megatron_mtp")


# ------------------------------------------------------------------------------------- distributed (gloo)


def _distributed_build(fake_stdlib: str, cache_dir: str, micro_batch_size: int):
    stdlib_corpus.stdlib_directory = lambda: fake_stdlib
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
    prefix = stdlib_corpus.prepare_stdlib_corpus(cache_dir, ByteTokenizer(), show_progress=False)
    train, valid, _ = build_gpt_datasets(
        ["1", prefix, "2", prefix], "80,20,0", 8, ByteTokenizer(), 5, (64, 8, 0), os.path.join(cache_dir, "idx")
    )
    batch = next(MicroBatchIterator(train, 0, micro_batch_size, rank, world_size))
    return prefix, batch["tokens"], len(train), len(valid)


def test_two_gloo_ranks_build_the_same_data(tmp_path):
    make_fake_stdlib(str(tmp_path / "lib"))
    results = run_world(_distributed_build, 2, str(tmp_path / "lib"), str(tmp_path / "cache"), 2)
    (prefix0, tokens0, *sizes0), (prefix1, tokens1, *sizes1) = results
    assert prefix0 == prefix1 and sizes0 == sizes1
    reference = build_gpt_datasets(
        ["1", prefix0, "2", prefix0], "80,20,0", 8, ByteTokenizer(), 5, (64, 8, 0), str(tmp_path / "cache" / "idx")
    )[0]
    assert torch.equal(torch.cat([tokens0, tokens1]), next(MicroBatchIterator(reference, 0, 4, 0, 1))["tokens"])
