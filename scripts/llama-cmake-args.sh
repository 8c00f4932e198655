#!/usr/bin/env bash
# Prints the CMAKE_ARGS for building llama-cpp-python on this machine's CPU family without
# native detection. GGML_NATIVE=OFF keeps -march=native (and with it AMX, which died with SIGILL
# on the first decode here) out of the build; AVX-512 is enabled only where the CPU reports it.
set -euo pipefail
args="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
if grep -qw avx512f /proc/cpuinfo 2>/dev/null && [ "${THINFLEET_NO_AVX512:-0}" != 1 ]; then
  args="$args -DGGML_AVX512=ON"
else
  args="$args -DGGML_AVX512=OFF"
fi
# Only the library the Python package loads: no multimodal, tools, tests, server or curl.
args="$args -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
args="$args -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF"
echo "$args"
