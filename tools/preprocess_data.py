#!/usr/bin/env python3
"""Tokenize .txt/.jsonl files into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx) for --data-path.

Example:
    python tools/preprocess_data.py --input corpus/ extra.jsonl --output-prefix data/my_corpus
"""

import argparse
import sys
from typing import List, Optional

from megatron_mtp.data.indexed import find_input_files, write_indexed_dataset
from megatron_mtp.data.tokenizers import DEFAULT_EOD_TOKENS, TOKENIZER_TYPES, build_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Documents are written in the order of --input (directories sorted). Progress goes to stderr.",
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="one or more files or directories. A .txt file is one document; a .jsonl file is one document "
        "per line (a JSON object, text under --json-key). A directory means every *.txt and *.jsonl below it, "
        "recursively, in sorted order.",
    )
    parser.add_argument(
        "--output-prefix",
        required=True,
        metavar="PREFIX",
        help="write PREFIX.bin and PREFIX.idx (creating the directory); pass PREFIX to training as --data-path",
    )
    parser.add_argument("--json-key", default="text", help="the field holding the text in .jsonl lines (default: text)")
    parser.add_argument(
        "--tokenizer-type",
        default="ByteLevel",
        choices=TOKENIZER_TYPES,
        help="ByteLevel: UTF-8 bytes, end-of-document id 256, vocabulary 257, no file needed (default). "
        "HuggingFaceTokenizer: a tokenizers-library tokenizer.json given by --tokenizer-model.",
    )
    parser.add_argument(
        "--tokenizer-model", metavar="FILE", help="the tokenizer.json for --tokenizer-type HuggingFaceTokenizer"
    )
    parser.add_argument(
        "--eod-token",
        metavar="TOKEN",
        help=f"HuggingFaceTokenizer only: the end-of-document token; default: the first of {', '.join(DEFAULT_EOD_TOKENS)} "
        "that the tokenizer has",
    )
    parser.add_argument(
        "--no-append-eod",
        dest="append_eod",
        action="store_false",
        help="do not append the end-of-document token after each document (appended by default)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.eod_token)
        input_files = find_input_files(args.input)
        counts = write_indexed_dataset(
            input_files,
            args.output_prefix,
            tokenizer,
            json_key=args.json_key,
            append_eod=args.append_eod,
            show_progress=not args.quiet,
        )
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{counts['files']} files, {counts['documents']} documents, {counts['tokens']} tokens "
        f"({counts['skipped_empty_documents']} empty documents skipped), tokenizer {tokenizer.name}\n"
        f"wrote {args.output_prefix}.bin and {args.output_prefix}.idx"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
