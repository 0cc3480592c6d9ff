"""Multi-token prediction for Megatron-Core."""
