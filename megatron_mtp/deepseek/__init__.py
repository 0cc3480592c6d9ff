"""DeepSeek-V3 on Megatron-Core: HF config translation, model builder, HF<->Megatron tensor mapping."""
