"""Each report's JSON Schema is generated from its one typed definition (envcheck/schemas.py):
the shipped files are what the definitions make, and real reports validate against them and
read back into equal objects."""

from __future__ import annotations

import json

import jsonschema
import pytest

from envcheck import schemas
from envcheck.image.report import ImageReport
from envcheck.report import read_report, to_json


@pytest.mark.parametrize("schema", sorted(schemas.REPORTS))
def test_the_shipped_schema_is_the_one_the_definition_makes(schema):
    """A field added to a definition without `python -m envcheck.schemas` fails here."""
    assert schemas.committed(schema) == schemas.text(schema), (
        f"envcheck/data/schemas/{schemas.file_name(schema)} is stale: run "
        "`python -m envcheck.schemas`")


@pytest.mark.parametrize("schema", sorted(schemas.REPORTS))
def test_each_schema_names_itself(schema):
    body = json.loads(schemas.committed(schema))
    jsonschema.Draft202012Validator.check_schema(body)
    assert body["$id"] == schema
    assert body["$defs"][body["$ref"].split("/")[-1]]["properties"]["schema"]["enum"] == [schema]


@pytest.mark.parametrize("layers", [True, False])
def test_an_inspect_image_report_validates_and_reads_back(tmp_path, layers):
    from envcheck.image.inspect import inspect_image
    from scripts import cuda_image

    cuda_image.build_layout(tmp_path / "layout", tag="t")
    report = inspect_image(f"oci:{tmp_path / 'layout'}:t", layers=layers, file_globs=(
        ("usr/local/cuda*/compat/*", "nothing/*") if layers else ()),
        driver_version="550.54.15", jobs=1)
    document = json.loads(json.dumps(to_json(report)))
    jsonschema.validate(document, json.loads(schemas.committed("envcheck.image/v1")))
    assert read_report(ImageReport, document) == report
    assert document["requirement"]["cases"] and ("libraries" in document) is layers
