"""Print (one per line, a requirements file) the pip requirements of pyproject.toml (runtime
deps + JAX for the chosen extra), so the Dockerfile can install dependencies in a layer of their
own, before the sources."""

import sys
import tomllib

with open(sys.argv[1], "rb") as handle:
    project = tomllib.load(handle)["project"]
extra = sys.argv[2] if len(sys.argv) > 2 else "cpu"
requirements = list(project["dependencies"])
if extra == "cuda12":
    requirements += project["optional-dependencies"]["cuda12"]
elif extra != "cpu":
    sys.exit(f"JAX_EXTRA must be cuda12 or cpu, not {extra!r}")
print("\n".join(requirements))
