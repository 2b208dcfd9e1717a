#!/usr/bin/env bash
# Download, here where pip works, the cp312 wheels that bench/gpu_bench.py needs on the GPU machine (Python 3.12,
# torch 2.11, no network) and that its image lacks or has in another version, into .whl/ (git-ignored; carried by
# the device run: see bench/gpu_run.sh). The image has torch, torchaudio, numpy, scipy, safetensors, accelerate,
# einops, onnxruntime, numba, scikit-learn, prometheus-client, anyio, regex, pyyaml, ... (device/KINDS.md).
# qwen-tts 0.1.1 pins transformers 4.57.3, which needs huggingface-hub < 1.0 and tokenizers <= 0.23.0.
# sox: 1.4.1, the newest with a wheel (qwen-tts imports it; it runs the sox program only when used).
# PyAV and Babel are too big to carry: server.py imports them only where a request needs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(
  qwen-tts==0.1.1 transformers==4.57.3 huggingface-hub==0.36.2 tokenizers==0.22.2
  librosa==0.11.0 audioread==3.1.0 pooch==1.9.0 platformdirs==4.14.9 decorator==5.3.1 sox==1.4.1
  soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 soxr==1.1.0
  fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 opentelemetry-api==1.45.2 loguru==0.7.3 python-multipart==0.0.34 sniffio==1.3.1
)
rm -rf .whl && mkdir .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${PACKAGES[@]}"
ls .whl
du -sh .whl
