#!/usr/bin/env bash
# Build llama.cpp once, portable (no -march=native: its AMX path segfaults on quantized models on some
# Xeons), from the llama.cpp tree that the pinned llama-cpp-python sdist vendors. The converter script,
# the quantize/imatrix/perplexity tools and the shared library the Python bindings load all come from
# this one tree, so converter, quantizer and runtime are always the same llama.cpp version.
#
# Usage: scripts/build-llama-cpp.sh PYTHON DEST
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
# shellcheck source=scripts/llama-cpp-flags.sh
source "$(dirname "${BASH_SOURCE[0]}")/llama-cpp-flags.sh"

python=${1:?usage: build-llama-cpp.sh PYTHON DEST}
dest=${2:?usage: build-llama-cpp.sh PYTHON DEST}
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)
sdist="$dest/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
src="$dest/src"
build="$dest/build"

if [ ! -f "$sdist" ]; then
  "$python" -m pip download --quiet --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$dest"
fi
echo "$SDIST_SHA256  $sdist" | sha256sum --check --quiet

if [ ! -d "$src" ]; then
  tmp=$(mktemp -d "$dest/src.XXXX")
  tar xzf "$sdist" -C "$tmp" --strip-components=1
  mv "$tmp" "$src"
fi

generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S "$src/vendor/llama.cpp" -B "$build" "${generator[@]}" "${LLAMA_CPP_CMAKE_FLAGS[@]}" >/dev/null
cmake --build "$build" -j "$(nproc)" --target "${LLAMA_CPP_TARGETS[@]}"

# A toolchain that links libstdc++ statically into each library (seen: a GPU image's /opt/gcc as $CXX) gives a
# libllama that the tools use fine but that crashes inside the Python bindings; refuse it here, not at validation.
if [ "$(uname -s)" = Linux ] && command -v readelf >/dev/null \
   && ! readelf -d "$build/bin/libllama.so" | grep -q 'libstdc++'; then
  echo "build-llama-cpp: $build/bin/libllama.so links libstdc++ statically (compiler: ${CXX:-c++}), which crashes" \
       "in the Python bindings; rebuild with the system compiler: rm -rf $build && CXX=/usr/bin/g++" \
       "CC=/usr/bin/gcc $0 $*" >&2
  exit 1
fi

# The Python bindings without a second compile: they load the libllama built above.
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "$python" -m pip install --quiet "$src"
# The gguf-py the converter was written against (newer than the registry's gguf 0.19.0, which it fails with).
"$python" -m pip install --quiet --no-deps "$src/vendor/llama.cpp/gguf-py"

cat > "$dest/BUILD_INFO.json" <<JSON
{"llama_cpp_python": "$LLAMA_CPP_PYTHON_VERSION", "sdist_sha256": "$SDIST_SHA256",
 "cmake_flags": "GGML_NATIVE=OFF BUILD_SHARED_LIBS=ON${LLAMA_CPP_CUDA_ARCHS:+ GGML_CUDA=ON CUDA_ARCHITECTURES=$LLAMA_CPP_CUDA_ARCHS $(nvcc --version | tail -1)}"}
JSON
echo "llama.cpp built in $build (llama-cpp-python $LLAMA_CPP_PYTHON_VERSION)"
