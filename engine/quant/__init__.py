"""Quantized weights and the linear methods that multiply by them without an fp32 copy.

- ``weight``: the ``QuantizedWeight`` protocol every stored format follows, and ``Weight``
  (a dense tensor or a quantized one), what ``engine.weights`` hands the model;
- ``ggml``: GGUF's block formats (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) as ``GGMLWeight``, with the
  torch reference that dequantizes to exactly the floats ``gguf.quants.dequantize`` gives;
- ``fp8``: block-scaled FP8 (Hugging Face ``quant_method: fp8``) as ``FP8Weight``;
- ``gguf_native``: a GGUF file's tensors as ``GGMLWeight``s over the memory-mapped file;
- ``cpu_kernels``: the C kernels (``engine/kernels/cpu_quant_gemm.c``), dequantizing in the matmul;
- ``triton_kernels``: the same for the GPU;
- ``method``: the seam ``engine.linear.make_linear`` calls for a quantized weight.
"""
