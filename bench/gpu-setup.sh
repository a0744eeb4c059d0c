# Prepare an offline GPU machine for the GPU benchmarks; source it from the repository root:
#
#     . bench/gpu-setup.sh
#
# It expects a carry folder (default .gpu-carry, git-ignored; bench/gpu_carry.py writes its whl/) holding what the
# machine lacks and cannot download:
#   whl/            wheels for Python 3.12 (Prefect, hydra, llm-compressor, moto, ...), installed into /tmp/site
#   site/           (optional) pure-Python packages copied as they are (the llama_cpp bindings, without a library)
#   llama-src.txz   (optional: without it no llama.cpp is built) the llama.cpp tree vendored by the pinned
#                   llama-cpp-python sdist (scripts/build-llama-cpp.sh), as `bench/gpu_carry.py --pools` writes it
#   BUILD_INFO.json that build's pin, as scripts/build-llama-cpp.sh writes it
# and builds llama.cpp there with the same flags as scripts/build-llama-cpp.sh, so converter, quantizer and the
# bindings' library are one version. Exports PYTHONPATH and QUANTMILL_LLAMA_CPP.
carry=${CARRY:-.gpu-carry}
# Sourced again (say, to build llama.cpp after a first pass without it), the wheels are not installed twice: a
# process already importing from /tmp/site would see its packages replaced under it.
if [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$carry"/whl/*.whl || return 1
  touch /tmp/site/.installed
fi
[ -d "$carry/site" ] && cp -r "$carry"/site/* /tmp/site/
tree=$(ls "$carry"/llama-src.t?z 2>/dev/null | head -1)
if [ -z "$tree" ]; then  # the calibrated-quantizer benchmark needs no llama.cpp
  export PYTHONPATH=/tmp/site:$PWD
  echo "gpu-setup: wheels in /tmp/site; no llama-src.txz in $carry, so no llama.cpp (GGUF recipes will not run)"
  return 0
fi
mkdir -p /tmp/llama/src/vendor
tar xf "$tree" -C /tmp/llama/src/vendor
cp "$carry/BUILD_INFO.json" /tmp/llama/
if [ -n "${LLAMA_CPP_CUDA_ARCHS:-}" ]; then  # the CUDA build says so in its pin, as scripts/build-llama-cpp.sh does
  python3 - "$LLAMA_CPP_CUDA_ARCHS" "$(nvcc --version | tail -1)" <<'PY'
import json, sys
p = "/tmp/llama/BUILD_INFO.json"
info = json.load(open(p))
info["cmake_flags"] += f" GGML_CUDA=ON CUDA_ARCHITECTURES={sys.argv[1]} {sys.argv[2]}"
json.dump(info, open(p, "w"))
PY
fi
# The distribution's compiler: a toolchain that links libstdc++ statically into each library (the GPU image's
# /opt/gcc, its $CXX) makes libllama crash inside the Python bindings (std::stringstream in print_info).
. scripts/llama-cpp-flags.sh
CC=/usr/bin/gcc CXX=/usr/bin/g++ cmake -S /tmp/llama/src/vendor/llama.cpp -B /tmp/llama/build \
  "${LLAMA_CPP_CMAKE_FLAGS[@]}" >/tmp/llama/cmake.log 2>&1 || return 1
cmake --build /tmp/llama/build -j "$(nproc)" --target "${LLAMA_CPP_TARGETS[@]}" >/tmp/llama/build.log 2>&1 \
  || { tail -30 /tmp/llama/build.log; return 1; }
export PYTHONPATH=/tmp/site:$PWD:/tmp/llama/src/vendor/llama.cpp/gguf-py
export QUANTMILL_LLAMA_CPP=/tmp/llama
echo "gpu-setup: wheels in /tmp/site, llama.cpp built in /tmp/llama/build"
