# The one place the pinned llama.cpp build's flags and targets are written; sourced by scripts/build-llama-cpp.sh
# and bench/gpu-setup.sh. Portable (no -march=native: its AMX path segfaults on quantized models on some Xeons),
# shared libraries for the Python bindings, no network code, no examples or tests.
LLAMA_CPP_CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON)
LLAMA_CPP_TARGETS=(llama llama-quantize llama-imatrix llama-perplexity llama-gguf-split)
# With CUDA: LLAMA_CPP_CUDA_ARCHS="80;86;89;90" (Ampere, Ada, Hopper) builds the same tree with the CUDA backend;
# the flags go into BUILD_INFO.json and so into every cache key and record made with that build.
if [ -n "${LLAMA_CPP_CUDA_ARCHS:-}" ]; then
  LLAMA_CPP_CMAKE_FLAGS+=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${LLAMA_CPP_CUDA_ARCHS}")
fi
