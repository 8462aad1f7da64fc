# The worker for GPU nodes (deploy/k8s/overlays/gpu), on NVIDIA's CUDA base
# images (Ubuntu 24.04: the same gRPC 1.51 and Abseil as Debian bookworm);
# the build compiles the CUDA targets where nvcc is present. There are none
# yet: until a CUDA backend lands, this image runs the CPU kernels and the
# GPU it is given sits idle.
#   docker build -f deploy/docker/worker-gpu.Dockerfile -t psa-serve/worker-gpu:0.1.0 .

FROM nvidia/cuda:12.6.3-devel-ubuntu24.04 AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config libabsl-dev libicu-dev \
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler libssl-dev \
      nlohmann-json3-dev libcpp-httplib-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPSA_NATIVE=OFF \
      -DPSA_BUILD_TESTS=OFF -DPSA_BUILD_BENCH=OFF \
 && ninja -C /build psa-worker

FROM nvidia/cuda:12.6.3-runtime-ubuntu24.04
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      libgrpc++1.51t64 libprotobuf32t64 libicu74 libssl3t64 libgomp1 \
      libabsl20220623t64 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 psa
USER 10001
COPY --from=build /build/compute_worker/psa-worker /usr/local/bin/
EXPOSE 7200 9200
ENTRYPOINT ["/usr/local/bin/psa-worker"]
