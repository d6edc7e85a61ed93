"""NVIDIA facts that both sides of envcheck use — host/ (this machine) and image/ (an image at
rest) import them, never each other: the CUDA toolkit → minimum driver table and the
NVIDIA_REQUIRE_CUDA rule (cuda.py), the driver version in /proc (driver.py), and the failure
catalog that maps an error text to the broken link (catalog.py).
"""
