"""Names an spmd_moe vLLM checkpoint is recognised by (shared by the plugin and the checkpoint builder)."""

SPMD_CONFIG_NAME = "spmd_moe.json"  # beside config.json: the layer config and format version
SPMD_FORMAT = "spmd_moe"
SPMD_ARCH = "SpmdQwen3MoeForCausalLM"
NATIVE_ARCH = "Qwen3MoeForCausalLM"
