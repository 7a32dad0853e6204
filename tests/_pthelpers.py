"""Hand-built PyTorch checkpoint pieces for the ptload tests: a pickle opcode
emitter and a zip writer that can produce zip64 records, deflated records and
any record order (so no test file has to be produced by running a pickle)."""
import struct
import zlib


# ---------------------------------------------------------------- pickles

def proto(n=2):
    return b"\x80" + bytes([n])


def glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def ustr(s):
    b = s.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(b)) + b


def pint(i):
    if 0 <= i < 256:
        return b"K" + bytes([i])
    if 0 <= i < 65536:
        return b"M" + struct.pack("<H", i)
    if -(2 ** 31) <= i < 2 ** 31:
        return b"J" + struct.pack("<i", i)
    n = (i.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + i.to_bytes(n, "little", signed=True)


def pfloat(x):
    return b"G" + struct.pack(">d", x)


def tup(*items):
    if not items:
        return b")"
    if len(items) <= 3:
        return b"".join(items) + bytes([0x84 + len(items)])
    return b"(" + b"".join(items) + b"t"


def ints(seq):
    return tup(*[pint(v) for v in seq])


NONE, TRUE, FALSE, STOP, REDUCE, BUILD, MARK = b"N", b"\x88", b"\x89", b".", b"R", b"b", b"("


def odict():
    return glob("collections", "OrderedDict") + b")" + REDUCE


def pid(cls, key, numel, location="cpu", legacy=False):
    mod, name = cls.rsplit(".", 1)
    fields = [ustr("storage"), glob(mod, name), ustr(key), ustr(location), pint(numel)]
    if legacy:
        fields.append(NONE)
    return b"(" + b"".join(fields) + b"tQ"


def tensor_v2(cls, key, numel, offset, size, stride, legacy=False, requires_grad=False):
    return (glob("torch._utils", "_rebuild_tensor_v2") + b"(" + pid(cls, key, numel, legacy=legacy) + pint(offset)
            + ints(size) + ints(stride) + (TRUE if requires_grad else FALSE) + odict() + b"t" + REDUCE)


def tensor_v3(key, nbytes, dtype, offset, size, stride):
    return (glob("torch._utils", "_rebuild_tensor_v3") + b"(" + pid("torch.storage.UntypedStorage", key, nbytes)
            + pint(offset) + ints(size) + ints(stride) + FALSE + odict() + glob("torch", dtype) + b"t" + REDUCE)


def dict_of(pairs, ordered=False):
    out = odict() if ordered else b"}"
    if pairs:
        out += b"(" + b"".join(k + v for k, v in pairs) + b"u"
    return out


def state_dict_pickle(entries, legacy=False, metadata=True):
    """entries: (name, storage class, key, numel, offset, size, stride)."""
    body = proto() + odict()
    if entries:
        body += b"("
        for name, cls, key, numel, off, size, stride in entries:
            body += ustr(name) + tensor_v2(cls, key, numel, off, size, stride, legacy=legacy)
        body += b"u"
    if metadata:
        body += dict_of([(ustr("_metadata"), dict_of([(ustr(""), dict_of([(ustr("version"), pint(1))]))]))]) + BUILD
    return body + STOP


# ------------------------------------------------------------------- zips

def zip_build(records, zip64=False, comment=b"", align=None):
    """records: list of (name, data, method) with method 0 (stored) or 8 (deflated); `align` pads
    each payload to that boundary with torch's "FB" extra field."""
    out = bytearray()
    central = bytearray()
    for name, data, method in records:
        nb = name.encode()
        payload = data if method == 0 else zlib.compress(data, 9)[2:-4]
        crc = zlib.crc32(data)
        off = len(out)
        lextra = struct.pack("<HHQQ", 1, 16, len(data), len(payload)) if zip64 else b""
        if align:
            start = off + 30 + len(nb) + len(lextra) + 4
            pad = -start % align
            lextra += b"FB" + struct.pack("<H", pad) + b"Z" * pad
        if zip64:
            out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 45, 0, method, 0, 0, crc, 0xFFFFFFFF, 0xFFFFFFFF,
                               len(nb), len(lextra)) + nb + lextra
        else:
            out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(payload), len(data),
                               len(nb), len(lextra)) + nb + lextra
        out += payload
        if zip64:
            cextra = struct.pack("<HHQQQ", 1, 24, len(data), len(payload), off)
            central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 45, 45, 0, method, 0, 0, crc, 0xFFFFFFFF,
                                   0xFFFFFFFF, len(nb), len(cextra), 0, 0, 0, 0, 0xFFFFFFFF) + nb + cextra
        else:
            central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc, len(payload),
                                   len(data), len(nb), 0, 0, 0, 0, 0, off) + nb
    cd_off = len(out)
    out += central
    n = len(records)
    if zip64:
        e64 = len(out)
        out += struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, n, n, len(central), cd_off)
        out += struct.pack("<IIQI", 0x07064B50, 0, e64, 1)
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, len(comment))
    else:
        out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, n, n, len(central), cd_off, len(comment))
    return bytes(out + comment)


def pt_file(pkl, storages=None, prefix="archive", extra=(), byteorder=b"little", version=b"3\n", zip64=False,
            deflate=(), order=None, align=64):
    """A zip checkpoint: data.pkl, byteorder, data/<key>..., version, plus `extra` (name, data)."""
    recs = [("data.pkl", pkl)]
    if byteorder is not None:
        recs.append(("byteorder", byteorder))
    for k, v in (storages or {}).items():
        recs.append((f"data/{k}", v))
    if version is not None:
        recs.append(("version", version))
    recs.extend(extra)
    if order is not None:
        recs = order(recs)
    return zip_build([(f"{prefix}/{n}" if prefix else n, d, 8 if n in deflate else 0) for n, d in recs], zip64=zip64,
                     align=align)


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def legacy_file(obj_pickle, storages, little_endian=True):
    """storages: list of (key, element count, bytes) in key-list order."""
    out = proto() + pint(LEGACY_MAGIC) + STOP
    out += proto() + pint(1001) + STOP
    out += proto() + dict_of([(ustr("protocol_version"), pint(1001)),
                              (ustr("little_endian"), TRUE if little_endian else FALSE),
                              (ustr("type_sizes"), dict_of([(ustr("short"), pint(2)), (ustr("int"), pint(4)),
                                                            (ustr("long"), pint(8))]))]) + STOP
    out += obj_pickle
    out += proto() + b"]" + (b"(" + b"".join(ustr(k) for k, _, _ in storages) + b"e" if storages else b"") + STOP
    for _, count, data in storages:
        out += struct.pack("<q", count) + data
    return bytes(out)
