"""moepass.kernels — Triton kernels for the canonical MoE and quantized ops (added by the kernels issue)."""
