"""The JSON Schemas of envcheck's reports, generated from their typed definitions (the
definitions are the contract; the schemas under envcheck/data/schemas/ are for readers in other
languages, and a test keeps them equal to what this module generates).

    python -m envcheck.schemas            # rewrite envcheck/data/schemas/*.json
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import msgspec

from envcheck.build import BuildReport
from envcheck.fleet.aggregate import FleetReport
from envcheck.gpu_smoke.report import SmokeReport
from envcheck.image.report import ImageReport
from model.report import ModelReport

REPORTS = {"envcheck.smoke/v1": SmokeReport, "envcheck.fleet/v1": FleetReport,
           "envcheck.image/v1": ImageReport, "envcheck.build/v1": BuildReport,
           "envcheck.model-smoke/v2": ModelReport}


def file_name(schema: str) -> str:
    """envcheck.smoke/v1 -> smoke.v1.json"""
    return schema.removeprefix("envcheck.").replace("/", ".") + ".json"


def generate(schema: str) -> dict:
    """The JSON Schema (draft 2020-12) of the report named `schema`."""
    body = msgspec.json.schema(REPORTS[schema])
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": schema, **body}


def text(schema: str) -> str:
    return json.dumps(generate(schema), indent=2, sort_keys=True) + "\n"


def committed(schema: str) -> str:
    """The schema file shipped with the package."""
    return (resources.files("envcheck") / "data" / "schemas" / file_name(schema)).read_text()


def main() -> None:
    folder = Path(__file__).resolve().parent / "data" / "schemas"
    folder.mkdir(parents=True, exist_ok=True)
    for schema in REPORTS:
        (folder / file_name(schema)).write_text(text(schema))
        print(folder / file_name(schema))


if __name__ == "__main__":
    main()
