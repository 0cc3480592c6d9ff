"""DeepSeek-V3 tests (a package, so its test modules do not clash with tests/unit by name)."""
