"""The pretrain script's flags against Megatron-LM's own parser: every flag both have must take the same values
(argparse action, dest, type, nargs, const; our choices a subset of Megatron-LM's, outside a listed extension)
and have the same default. Megatron-LM's parser is built from its ``megatron/training/arguments.py`` at the
commit matching the installed Megatron-Core (``$MEGATRON_LM_DIR``, else ``../shared/megatron-lm/core_*<X.Y>*`` beside
the repository, which CI provides: missing, the test fails).

``megatron.training``'s ``__init__`` imports the whole training loop (triton, fused kernels); the test loads
only ``arguments.py`` and what it imports, with the package's training-loop names left undefined.
"""

import argparse
import glob
import importlib
import os
import sys
import types
import typing

import pytest

import megatron.core

from megatron_mtp.training.arguments import build_parser

SHARED_MEGATRON_LM = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "megatron-lm")
OUR_EXTRA_CHOICES = {"--tokenizer-type": {"ByteLevel"}}
"""Values only we accept for a shared flag (Megatron-LM's values we accept mean the same)."""


def _megatron_lm_dir() -> str:
    if os.environ.get("MEGATRON_LM_DIR"):
        return os.environ["MEGATRON_LM_DIR"]
    release = ".".join(megatron.core.__version__.split(".")[:2])
    found = sorted(glob.glob(os.path.join(SHARED_MEGATRON_LM, f"core_*{release}*")))
    if not found:
        pytest.fail(f"no Megatron-LM files for megatron-core {release} in {SHARED_MEGATRON_LM}: set MEGATRON_LM_DIR")
    return found[0]


@pytest.fixture(scope="module")
def megatron_lm_parser():
    root = _megatron_lm_dir()
    saved = {name: module for name, module in sys.modules.items() if name.startswith("megatron.training")}
    package = types.ModuleType("megatron.training")
    package.__path__ = [os.path.join(root, "megatron", "training")]
    submodules = {name.removesuffix(".py") for name in os.listdir(package.__path__[0])}

    def training_loop_name(name):
        if name in submodules or name.startswith("__"):
            raise AttributeError(name)
        return None

    package.__getattr__ = training_loop_name
    if not hasattr(typing, "override"):  # Megatron-LM 0.19 imports it; Python 3.12+ only
        import typing_extensions

        typing.override = typing_extensions.override
    sys.path.insert(0, root)
    try:
        for name in saved:
            del sys.modules[name]
        sys.modules["megatron.training"] = package
        arguments = importlib.import_module("megatron.training.arguments")
        parser = arguments.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    finally:
        sys.path.remove(root)
        for name in [name for name in sys.modules if name.startswith("megatron.training")]:
            del sys.modules[name]
        sys.modules.update(saved)
    return parser


def _by_flag(parser: argparse.ArgumentParser) -> dict:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_shared_flags_mean_the_same_and_have_megatron_lms_defaults(megatron_lm_parser):
    theirs = _by_flag(megatron_lm_parser)
    ours = {flag: action for flag, action in _by_flag(build_parser()).items() if action.help != argparse.SUPPRESS}
    shared = sorted(set(ours) & set(theirs) - {"-h", "--help"})
    assert len(shared) > 50
    differences = []
    for flag in shared:
        our, their = ours[flag], theirs[flag]
        for field in ("dest", "default", "type", "nargs", "const"):
            if getattr(our, field) != getattr(their, field):
                differences.append(f"{flag} {field}: ours {getattr(our, field)!r}, Megatron-LM {getattr(their, field)!r}")
        if type(our) is not type(their):
            differences.append(f"{flag} action: ours {type(our).__name__}, Megatron-LM {type(their).__name__}")
        extra = set(our.choices or ()) - set(their.choices or ()) - OUR_EXTRA_CHOICES.get(flag, set())
        if extra or (our.choices is None) != (their.choices is None):
            differences.append(f"{flag} choices: ours {our.choices}, Megatron-LM {their.choices}")
    assert not differences, "\n".join(differences)


def test_a_megatron_lm_command_line_parses_to_megatron_lms_values(megatron_lm_parser):
    """A pretrain_gpt.py-style command line: both parsers read each shared flag to the same value."""
    argv = [
        "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--group-query-attention", "--num-query-groups", "2", "--swiglu",
        "--disable-bias-linear", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "20", "--lr", "3e-4",
        "--lr-decay-style", "cosine", "--data-path", "1", "a", "--split", "99,1,0", "--data-cache-path", "cache",
        "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "tokenizer.json", "--bf16",
        "--no-gradient-accumulation-fusion", "--moe-aux-loss-coeff", "1e-2", "--mtp-num-layers", "1",
    ]
    ours = vars(build_parser().parse_args(argv))
    theirs = vars(megatron_lm_parser.parse_known_args(argv)[0])
    for dest in set(ours) & set(theirs):
        assert ours[dest] == theirs[dest], dest
