"""Regenerates tests/cases/safetensors/invalid/<case>/{input,error}.

Each case is one way a safetensors file can be malformed; `error` holds a
piece of the message mlutils must give.  Run: python3 tests/cases/safetensors/make_invalid.py
"""
import json
import os
import shutil
import struct

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "invalid")


def header(text, pad=True):
    raw = text.encode("utf-8") if isinstance(text, str) else text
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def file(obj, data=b"", raw=None):
    text = raw if raw is not None else json.dumps(obj, separators=(",", ":"))
    return header(text) + data


CASES = {
    "empty_file": (b"", "header too small"),
    "too_small": (b"\x08\x00\x00\x00\x00", "header too small"),
    "header_too_large": (struct.pack("<Q", 100_000_001) + b"{}" + b" " * 6, "header too large"),
    "header_length_max": (struct.pack("<Q", 2**64 - 1) + b"{}", "header too large"),
    "header_length_past_eof": (struct.pack("<Q", 1000) + b"{}      ", "invalid header length"),
    "invalid_utf8": (header(b'{"a\xff":{}}'), "not valid UTF-8 (byte offset 11)"),
    "invalid_utf8_surrogate": (header(b'{"\xed\xa0\x80":{}}'), "not valid UTF-8"),
    "truncated_json": (header('{"a":{"dtype":"F32"'), "not valid JSON"),
    "nul_padding": (struct.pack("<Q", 8) + b"{}\x00\x00\x00\x00\x00\x00", "not valid JSON"),
    "trailing_garbage": (header('{}x'), "not valid JSON"),
    "not_an_object": (header("[]"), "header must be a JSON object, found an array"),
    "duplicate_key": (
        header('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
               '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}') + b"\x00" * 8,
        "duplicate object key",
    ),
    "metadata_not_object": (file({"__metadata__": "pt"}), "__metadata__ must be an object of strings, found a string"),
    "metadata_number_value": (file({"__metadata__": {"epoch": 3}}), "__metadata__ value of key 'epoch' must be a string, found an integer"),
    "metadata_nested": (file({"__metadata__": {"cfg": {"a": "b"}}}), "must be a string, found an object"),
    "entry_not_object": (file({"w": [1, 2]}), "tensor 'w': entry must be an object"),
    "missing_dtype": (file({"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "tensor 'w': missing field 'dtype'"),
    "missing_shape": (file({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8), "tensor 'w': missing field 'shape'"),
    "missing_offsets": (file({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "tensor 'w': missing field 'data_offsets'"),
    "dtype_not_string": (file({"w": entry(dtype=7)}, b"\0" * 8), "tensor 'w': dtype must be a string"),
    "unknown_dtype": (file({"w": entry(dtype="F128")}, b"\0" * 8), "tensor 'w': unknown dtype 'F128'"),
    "lowercase_dtype": (file({"w": entry(dtype="f32")}, b"\0" * 8), "unknown dtype 'f32'"),
    "negative_dim": (file({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
                     "tensor 'w': shape[0] must be a non-negative integer, found a negative integer"),
    "real_dim": (file(None, b"\0" * 8, raw='{"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}'),
                 "shape[0] must be a non-negative integer, found a real number"),
    "shape_not_array": (file({"w": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, b"\0" * 8),
                        "tensor 'w': shape must be an array"),
    "dim_too_big_for_json": (file(None, b"", raw='{"w":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,0]}}'),
                             "shape[0] must be a non-negative integer, found an integer above 2^64-1"),
    # the number grammar of the reference (serde_json reading u64): -0 is a float to it
    "negative_zero_dim": (file(None, b"", raw='{"w":{"dtype":"U8","shape":[0,-0],"data_offsets":[0,0]}}'),
                          "tensor 'w': shape[1] must be a non-negative integer, found a negative integer"),
    "negative_zero_begin": (file(None, b"", raw='{"w":{"dtype":"U8","shape":[0],"data_offsets":[-0,0]}}'),
                            "found a negative integer as begin"),
    "negative_zero_end": (file(None, b"", raw='{"w":{"dtype":"U8","shape":[0],"data_offsets":[0,-0]}}'),
                          "found a negative integer as end"),
    "leading_zero_dim": (file(None, b"", raw='{"w":{"dtype":"U8","shape":[00],"data_offsets":[0,0]}}'), "not valid JSON"),
    "leading_zero_offset": (file(None, b"\0", raw='{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,01]}}'), "not valid JSON"),
    "plus_dim": (file(None, b"\0", raw='{"w":{"dtype":"U8","shape":[+1],"data_offsets":[0,1]}}'), "not valid JSON"),
    "exponent_dim": (file(None, b"\0", raw='{"w":{"dtype":"U8","shape":[1e0],"data_offsets":[0,1]}}'),
                     "shape[0] must be a non-negative integer, found a real number"),
    "exponent_offset": (file(None, b"\0", raw='{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1E0]}}'),
                        "found a real number as end"),
    "real_offset": (file(None, b"\0", raw='{"w":{"dtype":"U8","shape":[1],"data_offsets":[0.0,1]}}'),
                    "found a real number as begin"),
    "huge_offset": (file(None, b"", raw='{"w":{"dtype":"U8","shape":[0],"data_offsets":[0,18446744073709551616]}}'),
                    "found an integer above 2^64-1 as end"),
    "real_overflow_dim": (file(None, b"", raw='{"w":{"dtype":"U8","shape":[1e400],"data_offsets":[0,0]}}'), "not valid JSON"),
    "offset_past_u64_range": (file(None, b"", raw='{"w":{"dtype":"U8","shape":[0],"data_offsets":[18446744073709551615,0]}}'),
                              "tensor 'w': invalid data_offsets [18446744073709551615, 0]: expected it to begin at 0"),
    "nesting_too_deep": (file(None, b"", raw='{"w":{"dtype":"U8","shape":[0],"data_offsets":[0,0],"x":'
                                             + "[" * 126 + "]" * 126 + "}}"),
                         "header nests arrays and objects deeper than 127 levels"),
    "negative_offset": (file({"w": entry(offsets=(-8, 0))}), "tensor 'w': data_offsets must be [begin, end]"),
    "offsets_one_number": (file({"w": entry(offsets=(0,))}, b"\0" * 8), "data_offsets must be [begin, end]"),
    "offsets_three_numbers": (file({"w": entry(offsets=(0, 8, 8))}, b"\0" * 8), "data_offsets must be [begin, end]"),
    "gap_at_start": (file({"w": entry(offsets=(4, 12))}, b"\0" * 12), "tensor 'w': invalid data_offsets [4, 12]: expected it to begin at 0"),
    "gap_between": (file({"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))}, b"\0" * 20),
                    "tensor 'b': invalid data_offsets [12, 20]: expected it to begin at 8"),
    "overlap": (file({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, b"\0" * 12),
                "tensor 'b': invalid data_offsets [4, 12]: expected it to begin at 8"),
    "end_before_begin": (file({"a": entry(offsets=(0, 8)), "b": entry(shape=(0,), offsets=(8, 4))}, b"\0" * 8),
                         "tensor 'b': invalid data_offsets [8, 4]: the end comes before the beginning"),
    "nelem_overflow": (file({"w": {"dtype": "U8", "shape": [2**32, 2**32, 2], "data_offsets": [0, 0]}}),
                       "tensor 'w': the element count of its shape overflows 64 bits"),
    "nbits_overflow": (file({"w": {"dtype": "U64", "shape": [2**61], "data_offsets": [0, 0]}}),
                       "tensor 'w': the bit size of its shape overflows 64 bits"),
    "misaligned_f4": (file({"w": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, b"\0\0"),
                      "tensor 'w': misaligned slice: 3 elements of F4 are 12 bits"),
    "misaligned_f6": (file({"w": {"dtype": "F6_E2M3", "shape": [2, 3], "data_offsets": [0, 5]}}, b"\0" * 5),
                      "misaligned slice: 6 elements of F6_E2M3 are 36 bits"),
    "size_mismatch": (file({"w": entry(shape=(2,), offsets=(0, 4))}, b"\0" * 4),
                      "tensor 'w': shape and dtype F32 need 8 bytes but data_offsets [0, 4] hold 4"),
    "size_mismatch_scalar": (file({"w": entry(shape=(), offsets=(0, 8))}, b"\0" * 8), "need 4 bytes but data_offsets [0, 8] hold 8"),
    "trailing_bytes": (file({"w": entry()}, b"\0" * 9), "incomplete buffer: the tensors' data ends at byte 8"),
    "polyglot_tail": (file({}, b"PK\x05\x06" + b"\0" * 18), "incomplete buffer: the tensors' data ends at byte 0"),
    "missing_bytes": (file({"w": entry()}, b"\0" * 7), "incomplete buffer"),
}


def main():
    if os.path.isdir(HERE):
        shutil.rmtree(HERE)
    for name, (data, error) in sorted(CASES.items()):
        d = os.path.join(HERE, name)
        os.makedirs(d)
        with open(os.path.join(d, "input"), "wb") as f:
            f.write(data)
        with open(os.path.join(d, "error"), "w", encoding="utf-8") as f:
            f.write(error + "\n")
    print(f"{len(CASES)} cases in {HERE}")


if __name__ == "__main__":
    main()
