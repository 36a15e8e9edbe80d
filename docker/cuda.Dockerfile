# CUDA image: denoised built with `--features cuda`, ONNX Runtime from PyPI's onnxruntime-gpu (CUDA 13,
# cuDNN 9). Workers configured as `cuda:N` fail at start-up if the CUDA provider cannot load.
#   docker build -f docker/cuda.Dockerfile -t denoised:cuda .
#   docker run --gpus all -p 8080:8080 -v denoised-data:/data denoised:cuda
FROM rust:1.95-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends pkg-config && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --features cuda && cp target/release/denoised /usr/local/bin/denoised

FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/ort && /opt/ort/bin/pip install --no-cache-dir --no-deps onnxruntime-gpu==1.31.1 \
 && useradd --system --home /data denoised && mkdir -p /data && chown denoised /data
COPY --from=build /usr/local/bin/denoised /usr/local/bin/denoised
COPY models /app/models
COPY docker/config.toml /app/config.toml
ENV ORT_DYLIB_PATH=/opt/ort/lib/python3.12/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 \
    DENOISED_WORKERS__0__DEVICE=cuda:0
USER denoised
WORKDIR /app
EXPOSE 8080
ENV DENOISED_CONFIG=/app/config.toml
ENTRYPOINT ["denoised"]
CMD ["serve"]
