"""The dev/smoke image: the one `envcheck build` makes from docker/Dockerfile and `gpu-smoke`
runs by default, and the bases it is built on (CUDA on a GPU host; `gpu-smoke --build-missing`
takes a slim Python base on a host without a GPU)."""

DEV_IMAGE = "envcheck-dev:latest"
CUDA_BASE = "nvidia/cuda:12.8.0-cudnn-devel-ubuntu24.04"
CPU_BASE = "python:3.12-slim-bookworm"  # a host without a GPU needs no CUDA libraries
