"""The files an ONNX graph makes onnxruntime read besides itself: the `location` of every tensor stored as external
data, wherever the tensor sits (initializers, constants in node attributes, subgraphs, functions, training graphs).

Read straight from protobuf's wire format, so the runtime needs no onnx package, and checked by us because
onnxruntime before 1.24 follows any location it is given, `/etc/passwd` included. Only the fields that can hold a
tensor are descended into; weights are skipped over, not read.
"""

from __future__ import annotations

from collections.abc import Iterator

# For each message of onnx.proto (by the name used here): its fields that hold a message which can hold a
# tensor, field number -> that message. A TensorProto's field 13 is `external_data`, a list of key/value entries.
CHILDREN: dict[str, dict[int, str]] = {
    "model": {7: "graph", 20: "training", 25: "function"},
    "training": {1: "graph", 2: "graph"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node", 11: "attribute"},  # its nodes, and its attributes' default values
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
    "entry": {},
}
ENTRY_KEY, ENTRY_VALUE = 1, 2
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5


def _varint(data: memoryview, i: int, end: int, most: int = 10) -> tuple[int, int]:
    """A varint of at most `most` bytes: protobuf reads tags and lengths as 32-bit varints (5 bytes), and what it
    would read differently from us is refused, so that no field can hide from this check."""
    value = shift = 0
    while True:
        if i >= end or shift >= 7 * most:
            raise ValueError("a truncated or overlong varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(data: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, start, end of the value) of each field of one message."""
    i = start
    while i < end:
        tag, i = _varint(data, i, end, most=5)
        if tag >= 1 << 32:
            raise ValueError("a field tag beyond 32 bits")
        field, wire = tag >> 3, tag & 7
        if wire == VARINT:
            _, j = _varint(data, i, end)
        elif wire == LENGTH:
            size, i = _varint(data, i, end, most=5)
            if size >= 1 << 31:
                raise ValueError("a length beyond 31 bits")
            j = i + size
        elif wire in (FIXED64, FIXED32):
            j = i + (8 if wire == FIXED64 else 4)
        else:
            raise ValueError(f"wire type {wire}, which ONNX graphs do not use")
        if field == 0 or j > end:
            raise ValueError("a field runs past the end of its message")
        yield field, wire, i, j
        i = j


def external_locations(data: bytes) -> set[str]:
    """Every external-data location an ONNX model (its serialized bytes) names. ValueError if it is not one."""
    view = memoryview(data)
    found: set[str] = set()
    stack = [("model", 0, len(view))]  # a stack, not recursion: nesting depth is the file's to choose
    while stack:
        kind, start, end = stack.pop()
        if kind == "entry":
            entry = {f: bytes(view[s:e]) for f, w, s, e in _fields(view, start, end) if w == LENGTH}
            if entry.get(ENTRY_KEY) == b"location":
                try:
                    found.add(entry.get(ENTRY_VALUE, b"").decode("utf-8"))
                except UnicodeDecodeError:
                    raise ValueError("an external-data location that is not UTF-8") from None
            continue
        children = CHILDREN[kind]
        for field, wire, s, e in _fields(view, start, end):
            if wire == LENGTH and field in children:
                stack.append((children[field], s, e))
    return found
