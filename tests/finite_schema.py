"""A nested JSON schema (objects, an array, enums, a boolean, required fields) whose language
is finite under compact JSON: even a random model ends a document in it, so a constrained
output must parse and validate, and stays short on the CPU."""

SCHEMA = {
    "type": "object",
    "properties": {
        "user": {"type": "object", "properties": {"role": {"enum": ["admin", "user", "guest"]},
                                                  "active": {"type": "boolean"}},
                 "required": ["role", "active"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 2},
    },
    "required": ["user", "tags"], "additionalProperties": False,
}
