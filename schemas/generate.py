"""Generate the JSON Schema files of the wire contract from the pydantic models.

``python -m schemas.generate`` rewrites the files; ``python -m schemas.generate --check``
only compares and exits 1 when a file is missing or differs (for CI). The output is
deterministic: sorted keys, two-space indent, a trailing newline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pydantic.json_schema import models_json_schema

from schemas.models import CONTRACT_VERSION, ErrorReply, RerankReply, RerankRequest

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_DIR = Path(__file__).resolve().parent
REQUEST_FILE = "rerank-request.schema.json"
REPLY_FILE = "rerank-reply.schema.json"


def _schema_id(file_name: str) -> str:
    return f"urn:kafka-rerank:schemas:v{CONTRACT_VERSION}:{file_name}"


def build_request_schema() -> dict[str, Any]:
    """The JSON Schema of a request record's value."""
    schema = RerankRequest.model_json_schema(mode="validation")
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": _schema_id(REQUEST_FILE),
        **schema,
        "title": "RerankRequest",
        "x-contract-version": CONTRACT_VERSION,
    }


def build_reply_schema() -> dict[str, Any]:
    """The JSON Schema of a reply record's value: a success or an error reply."""
    _, defs = models_json_schema(
        [(RerankReply, "validation"), (ErrorReply, "validation")],
        ref_template="#/$defs/{model}",
    )
    return {
        "$schema": SCHEMA_DIALECT,
        "$id": _schema_id(REPLY_FILE),
        "title": "RerankReplyRecord",
        "description": (
            "Reply to a rerank request, wire contract version 1: either a success "
            "(results sorted by relevance_score, best first, cut to top_n) or an error."
        ),
        "x-contract-version": CONTRACT_VERSION,
        "oneOf": [{"$ref": "#/$defs/RerankReply"}, {"$ref": "#/$defs/ErrorReply"}],
        "$defs": defs["$defs"],
    }


def render(schema: dict[str, Any]) -> str:
    """Serialize a schema the way the files on disk are written."""
    return json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def expected_files() -> dict[str, str]:
    """File name -> the exact text that file must have."""
    return {
        REQUEST_FILE: render(build_request_schema()),
        REPLY_FILE: render(build_reply_schema()),
    }


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) the schema files; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on drift")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help="output folder")
    args = parser.parse_args(argv)
    stale = []
    for name, text in expected_files().items():
        path = args.dir / name
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(name)
        if not args.check:
            path.write_text(text, encoding="utf-8")
    if args.check and stale:
        print(f"schema files out of date: {', '.join(stale)}; run python -m schemas.generate")
        return 1
    for name in stale:
        print(f"wrote {args.dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
