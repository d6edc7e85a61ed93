"""`envcheck gpu-smoke`: will this image, on this host, really compute on the GPU — and compute
correctly? The chain (chain.py) runs the host probes (host/), the daemon and the containers
(passthrough.py) and the bundled model test; judge.py reads the model test's report and decides
the verdict; report.py is the report's one definition; render.py its text."""

from envcheck.gpu_smoke.chain import gpu_smoke

__all__ = ["gpu_smoke"]
