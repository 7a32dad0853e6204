/* test_ptload.c: the zip reader, the restricted pickle VM and the checkpoint
 * resolver, on small archives built here byte by byte. */
#define _DEFAULT_SOURCE
#include "mlu_test.h"

#include <stdlib.h>
#include <unistd.h>

#include "core/alloc.h"
#include "core/pickle_read.h"
#include "core/ptload_file.h"
#include "core/zipread.h"

typedef struct {
    uint8_t data[8192];
    size_t len;
} bytes;

static void put(bytes *b, const void *p, size_t n)
{
    memcpy(b->data + b->len, p, n);
    b->len += n;
}
static void put16(bytes *b, unsigned v)
{
    uint8_t x[2] = {(uint8_t)v, (uint8_t)(v >> 8)};
    put(b, x, 2);
}
static void put32(bytes *b, uint32_t v)
{
    put16(b, v & 0xFFFF);
    put16(b, v >> 16);
}

typedef struct {
    const char *name;
    const void *data;
    size_t len;
} rec;

/* A stored zip of the records (no data descriptors, CRC 0 as torch allows). */
static void build_zip(bytes *z, const rec *r, int n)
{
    size_t off[16], cd, cd_size;
    int i;
    z->len = 0;
    for (i = 0; i < n; i++) {
        off[i] = z->len;
        put32(z, 0x04034B50); put16(z, 20); put16(z, 0); put16(z, 0); put32(z, 0); put32(z, 0);
        put32(z, (uint32_t)r[i].len); put32(z, (uint32_t)r[i].len); put16(z, (unsigned)strlen(r[i].name)); put16(z, 0);
        put(z, r[i].name, strlen(r[i].name));
        put(z, r[i].data, r[i].len);
    }
    cd = z->len;
    for (i = 0; i < n; i++) {
        put32(z, 0x02014B50); put16(z, 20); put16(z, 20); put16(z, 0); put16(z, 0); put32(z, 0); put32(z, 0);
        put32(z, (uint32_t)r[i].len); put32(z, (uint32_t)r[i].len); put16(z, (unsigned)strlen(r[i].name));
        put16(z, 0); put16(z, 0); put16(z, 0); put16(z, 0); put32(z, 0); put32(z, (uint32_t)off[i]);
        put(z, r[i].name, strlen(r[i].name));
    }
    cd_size = z->len - cd;
    put32(z, 0x06054B50); put16(z, 0); put16(z, 0); put16(z, (unsigned)n); put16(z, (unsigned)n);
    put32(z, (uint32_t)cd_size); put32(z, (uint32_t)cd); put16(z, 0);
}

#define S(lit) lit, sizeof(lit) - 1

/* {'w': _rebuild_tensor_v2(('storage', FloatStorage, '0', 'cpu', 4), 0, (2, 2), (2, 1), False, OrderedDict())} */
static const char PICKLE[] =
    "\x80\x02}q\x00X\x01\x00\x00\x00wq\x01" "ctorch._utils\n_rebuild_tensor_v2\nq\x02"
    "((X\x07\x00\x00\x00storageq\x03" "ctorch\nFloatStorage\nq\x04X\x01\x00\x00\x00" "0q\x05X\x03\x00\x00\x00" "cpuq\x06K\x04tq\x07Q"
    "K\x00K\x02K\x02\x86q\x08K\x02K\x01\x86q\x09\x89" "ccollections\nOrderedDict\nq\x0a)Rq\x0btq\x0cRq\x0ds.";

static const float VALUES[4] = {1.0f, 2.0f, -3.0f, 0.5f};

static mlu_status open_pickle(bytes *z, const char *pkl, size_t pkl_len, const void *d0, size_t d0_len, mlu_pt *pt,
                              mlu_error *err)
{
    rec r[3] = {{"a/data.pkl", pkl, pkl_len}, {"a/data/0", d0, d0_len}, {"a/version", "3\n", 2}};
    mlu_rd rd;
    build_zip(z, r, 3);
    mlu_error_clear(err);
    mlu_rd_mem(&rd, z->data, z->len);
    return mlu_pt_open(pt, &rd, 1, err);
}

static void test_good(void)
{
    static bytes z;
    mlu_pt pt;
    mlu_error err;
    const mlu_pk_node *root;
    const mlu_pk_tensor *t;
    float out[4];

    CHECK(open_pickle(&z, S(PICKLE), VALUES, sizeof(VALUES), &pt, &err) == MLU_OK);
    if (err.code != MLU_OK) {
        fprintf(stderr, "%s\n", err.text);
        return;
    }
    root = &pt.vm.nodes[pt.root];
    CHECK(root->kind == MLU_PKN_DICT && root->len == 2);
    CHECK(pt.vm.n_tensors == 1 && pt.vm.n_storages == 1);
    t = &pt.vm.tensors[0];
    CHECK(t->ndim == 2 && t->shape[0] == 2 && t->stride[0] == 2 && t->end_bytes == 16);
    CHECK(strcmp(mlu_torch_dtypes[t->dtype].name, "float32") == 0);
    CHECK(mlu_pt_storage_in_place(&pt, 0, 1) == 1);
    CHECK(mlu_pt_storage_fill(&pt, 0, (uint8_t *)out, &err) == MLU_OK);
    CHECK(memcmp(out, VALUES, sizeof(out)) == 0);
    mlu_pt_close(&pt);
}

static void expect_fail(const char *pkl, size_t len, mlu_status code, const char *word)
{
    static bytes z;
    mlu_pt pt;
    mlu_error err;
    mlu_status st = open_pickle(&z, pkl, len, VALUES, sizeof(VALUES), &pt, &err);
    CHECK(st == code);
    CHECK(strstr(err.text, word) != NULL);
    if (st != code || strstr(err.text, word) == NULL)
        fprintf(stderr, "  got %s: %s (wanted '%s')\n", mlu_status_name(st), err.text, word);
    if (st == MLU_OK)
        mlu_pt_close(&pt);
}

static void test_rejections(void)
{
    expect_fail(S("\x80\x02" "cos\nsystem\nX\x02\x00\x00\x00ls\x85R."), MLU_EUNSAFE, "os.system");
    expect_fail(S("\x80\x02" "c__builtin__\neval\n."), MLU_EUNSAFE, "__builtin__.eval");
    expect_fail(S("\x80\x02]K\x01K\x02s."), MLU_EUNSAFE, "SETITEM");
    expect_fail(S("\x80\x02}K\x01" "a."), MLU_EUNSAFE, "APPEND");
    expect_fail(S("\x80\x02}}b."), MLU_EUNSAFE, "BUILD");
    expect_fail(S("\x80\x02N\x95."), MLU_EUNSAFE, "opcode 0x95");
    expect_fail(S("\x80\x02h\x03."), MLU_EFORMAT, "memo");
    expect_fail(S("\x80\x02R."), MLU_EFORMAT, "underflow");
    expect_fail(S("\x80\x02N"), MLU_EFORMAT, "truncated");
    /* the view needs 5 floats of a 4-float storage */
    expect_fail(S("\x80\x02" "ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
                  "X\x01\x00\x00\x00" "0X\x03\x00\x00\x00" "cpuK\x04tQK\x01K\x04\x85K\x01\x85\x89" "ccollections\nOrderedDict\n)RtR."),
                MLU_EFORMAT, "out of bounds");
    /* the storage claims 8 floats, the record holds 4 */
    expect_fail(S("\x80\x02" "ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
                  "X\x01\x00\x00\x00" "0X\x03\x00\x00\x00" "cpuK\x08tQK\x00K\x04\x85K\x01\x85\x89" "ccollections\nOrderedDict\n)RtR."),
                MLU_EFORMAT, "mismatch");
}

/* ------------------------------------------------ tensor metadata flags */

/* A pickle of one tensor: _rebuild_tensor_v2 over ('storage', torch.<cls>,
 * '0', 'cpu', numel), offset 0, size (1,), stride (1,), then the pickle
 * bytes `md` (md_len of them) as the metadata argument, or no metadata
 * argument when md is NULL.  With `v3` (cls NULL), _rebuild_tensor_v3 over
 * an UntypedStorage of numel bytes viewed as torch.<v3>. */
static void flag_pickle(bytes *b, const char *cls, const char *v3, unsigned numel, const char *md, size_t md_len)
{
    b->len = 0;
    put(b, S("\x80\x02"));
    put(b, S("ctorch._utils\n_rebuild_tensor_v"));
    put(b, v3 ? "3\n" : "2\n", 2);
    put(b, S("((X\x07\x00\x00\x00storage"));
    if (v3) {
        put(b, S("ctorch.storage\nUntypedStorage\n"));
    } else {
        put(b, S("ctorch\n"));
        put(b, cls, strlen(cls));
        put(b, S("\n"));
    }
    put(b, S("X\x01\x00\x00\x00" "0X\x03\x00\x00\x00" "cpuK"));
    put(b, &(uint8_t){(uint8_t)numel}, 1);
    put(b, S("tQK\x00K\x01\x85K\x01\x85\x89" "ccollections\nOrderedDict\n)R"));
    if (v3) {
        put(b, S("ctorch\n"));
        put(b, v3, strlen(v3));
        put(b, S("\n"));
    }
    if (md != NULL)
        put(b, md, md_len);
    put(b, S("tR."));
}

#define CONJ_T "X\x04\x00\x00\x00" "conj\x88"
#define CONJ_F "X\x04\x00\x00\x00" "conj\x89"
#define NEG_T "X\x03\x00\x00\x00" "neg\x88"
#define NEG_F "X\x03\x00\x00\x00" "neg\x89"

/* Opens the one-tensor pickle (over VALUES: 16 bytes) and returns its
 * status; on success *flags and *dtype are the tensor's. */
static mlu_status open_flags(const char *cls, const char *v3, unsigned numel, const char *md, size_t md_len,
                             unsigned *flags, int *dtype, mlu_error *err)
{
    static bytes pk, z;
    mlu_pt pt;
    mlu_status st;

    flag_pickle(&pk, cls, v3, numel, md, md_len);
    st = open_pickle(&z, (const char *)pk.data, pk.len, VALUES, sizeof(VALUES), &pt, err);
    if (st == MLU_OK) {
        CHECK(pt.vm.n_tensors == 1);
        *flags = pt.vm.tensors[0].flags;
        *dtype = pt.vm.tensors[0].dtype;
        mlu_pt_close(&pt);
    }
    return st;
}

static void expect_flags(const char *cls, unsigned numel, const char *md, size_t md_len, unsigned want)
{
    mlu_error err;
    unsigned flags = 99;
    int dtype = -1;
    mlu_status st = open_flags(cls, NULL, numel, md, md_len, &flags, &dtype, &err);

    CHECK(st == MLU_OK);
    CHECK(flags == want);
    if (st != MLU_OK || flags != want)
        fprintf(stderr, "  %s: %s, flags %u (wanted %u)\n", cls, st == MLU_OK ? "ok" : err.text, flags, want);
}

static void expect_flags_fail(const char *cls, const char *v3, unsigned numel, const char *md, size_t md_len,
                              const char *word)
{
    mlu_error err;
    unsigned flags = 0;
    int dtype = -1;
    mlu_status st = open_flags(cls, v3, numel, md, md_len, &flags, &dtype, &err);

    CHECK(st == MLU_EFORMAT);
    CHECK(strstr(err.text, word) != NULL);
    if (st != MLU_EFORMAT || strstr(err.text, word) == NULL)
        fprintf(stderr, "  got %s: %s (wanted '%s')\n", mlu_status_name(st), err.text, word);
}

/* The metadata dict of _rebuild_tensor_v2/v3: torch's 'conj' and 'neg' bits
 * are recorded on the tensor; anything else is a format error naming it. */
static void test_tensor_flags(void)
{
    const unsigned C = MLU_PT_FLAG_CONJ;
    char longkey[8 + 200 + 4];
    mlu_error err;
    unsigned flags = 0;
    int dtype = -1;

    /* none, None, {} */
    expect_flags("FloatStorage", 4, NULL, 0, 0);
    expect_flags("FloatStorage", 4, S("N"), 0);
    expect_flags("FloatStorage", 4, S("}"), 0);
    /* what torch writes: {'conj': True}, {'neg': True}, {'neg': True, 'conj': True} */
    expect_flags("ComplexFloatStorage", 2, S("}" CONJ_T "s"), C);
    expect_flags("ComplexDoubleStorage", 1, S("}" CONJ_T "s"), C);
    expect_flags("FloatStorage", 4, S("}" NEG_T "s"), MLU_PT_FLAG_NEG);
    expect_flags("DoubleStorage", 2, S("}" NEG_T "s"), MLU_PT_FLAG_NEG);
    expect_flags("ComplexFloatStorage", 2, S("}(" NEG_T CONJ_T "u"), C | MLU_PT_FLAG_NEG);
    /* torch sets the bit of a key whatever its value: False too, a key given twice too */
    expect_flags("ComplexFloatStorage", 2, S("}" CONJ_F "s"), C);
    expect_flags("ComplexFloatStorage", 2, S("}" CONJ_T "s" CONJ_F "s"), C);
    expect_flags("FloatStorage", 4, S("}(" NEG_F NEG_F "u"), MLU_PT_FLAG_NEG);
    /* an OrderedDict of flags (torch takes any dict); integers torch can negate */
    expect_flags("FloatStorage", 4, S("ccollections\nOrderedDict\n)R" NEG_T "s"), MLU_PT_FLAG_NEG);
    expect_flags("LongStorage", 2, S("}" NEG_T "s"), MLU_PT_FLAG_NEG);
    expect_flags("ByteStorage", 16, S("}" NEG_T "s"), MLU_PT_FLAG_NEG);
    expect_flags("FloatStorage", 4, S("}U\x03neg\x88s"), MLU_PT_FLAG_NEG); /* a SHORT_BINSTRING key is a str too */
    /* v3: the dtype argument decides */
    CHECK(open_flags(NULL, "complex64", 16, S("}" CONJ_T "s"), &flags, &dtype, &err) == MLU_OK && flags == C &&
          strcmp(mlu_torch_dtypes[dtype].name, "complex64") == 0);
    CHECK(open_flags(NULL, "complex32", 16, S("}(" CONJ_T NEG_T "u"), &flags, &dtype, &err) == MLU_OK &&
          flags == (C | MLU_PT_FLAG_NEG));
    CHECK(open_flags(NULL, "bfloat16", 16, S("}" NEG_T "s"), &flags, &dtype, &err) == MLU_OK && flags == MLU_PT_FLAG_NEG);

    /* a flag on a dtype it cannot apply to (v2 resolves the dtype from the storage) */
    expect_flags_fail("FloatStorage", NULL, 4, S("}" CONJ_T "s"), "has the conj flag (a conjugate view) but is float32");
    expect_flags_fail("FloatStorage", NULL, 4, S("}" CONJ_F "s"), "has the conj flag (a conjugate view) but is float32");
    expect_flags_fail("LongStorage", NULL, 2, S("}" CONJ_T "s"), "has the conj flag (a conjugate view) but is int64");
    expect_flags_fail("BoolStorage", NULL, 16, S("}" NEG_T "s"), "has the neg flag (a negative view) but is bool (torch cannot negate bool)");
    expect_flags_fail("BoolStorage", NULL, 16, S("}" NEG_F "s"), "has the neg flag (a negative view) but is bool (torch cannot negate bool)");
    expect_flags_fail(NULL, "uint16", 16, S("}" NEG_T "s"), "cannot negate uint16");
    expect_flags_fail(NULL, "float8_e4m3fn", 16, S("}" NEG_T "s"), "cannot negate float8_e4m3fn");
    expect_flags_fail(NULL, "bfloat16", 16, S("}" CONJ_T "s"), "conj flag (a conjugate view) but is bfloat16");
    /* keys and values */
    expect_flags_fail("FloatStorage", NULL, 4, S("}X\x03\x00\x00\x00" "foo\x88s"), "unknown tensor metadata flag 'foo'");
    expect_flags_fail("FloatStorage", NULL, 4, S("}X\x04\x00\x00\x00" "Conj\x88s"), "unknown tensor metadata flag 'Conj'");
    expect_flags_fail("FloatStorage", NULL, 4, S("}X\x00\x00\x00\x00\x88s"), "unknown tensor metadata flag ''");
    expect_flags_fail("FloatStorage", NULL, 4, S("}(" NEG_T "X\x02\x00\x00\x00" "_x\x88u"), "flag '_x'");
    expect_flags_fail("FloatStorage", NULL, 4, S("}X\x03\x00\x00\x00" "negK\x01s"), "flag 'neg' is a int, not a bool");
    expect_flags_fail("ComplexFloatStorage", NULL, 2, S("}" "X\x04\x00\x00\x00" "conjNs"), "flag 'conj' is a None");
    expect_flags_fail("ComplexFloatStorage", NULL, 2, S("}" "X\x04\x00\x00\x00" "conjX\x04\x00\x00\x00Trues"),
                      "is a str, not a bool");
    expect_flags_fail("FloatStorage", NULL, 4, S("}K\x01\x88s"), "tensor metadata key is a int, not a str");
    /* not a dict */
    expect_flags_fail("FloatStorage", NULL, 4, S("]"), "tensor metadata is a list, not a dict");
    expect_flags_fail("FloatStorage", NULL, 4, S("K\x01"), "tensor metadata is a int, not a dict");
    expect_flags_fail("FloatStorage", NULL, 4, S("\x88"), "tensor metadata is a bool");
    expect_flags_fail("FloatStorage", NULL, 4, S("ccollections\nOrderedDict\n)R}b"), "dict with attributes");
    /* a long key is quoted in part */
    memcpy(longkey, "}X\xc8\x00\x00\x00", 6);
    memset(longkey + 6, 'k', 200);
    memcpy(longkey + 206, "\x88s", 2);
    expect_flags_fail("FloatStorage", NULL, 4, longkey, 208, "flag 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk...'");
}

/* A parameter of a flagged tensor keeps the flags (its own record). */
static void test_parameter_flags(void)
{
    static const char pkl[] =
        "\x80\x02" "ctorch._utils\n_rebuild_parameter\n(" "ctorch._utils\n_rebuild_tensor_v2\n"
        "((X\x07\x00\x00\x00storagectorch\nComplexFloatStorage\nX\x01\x00\x00\x00" "0X\x03\x00\x00\x00" "cpuK\x02tQ"
        "K\x00K\x02\x85K\x01\x85\x89" "ccollections\nOrderedDict\n)R}" CONJ_T "stR"
        "\x88" "ccollections\nOrderedDict\n)RtR.";
    static bytes z;
    mlu_pt pt;
    mlu_error err;
    long n;
    int ok = 0;

    CHECK(open_pickle(&z, S(pkl), VALUES, sizeof(VALUES), &pt, &err) == MLU_OK);
    if (err.code != MLU_OK) {
        fprintf(stderr, "%s\n", err.text);
        return;
    }
    CHECK(pt.vm.n_tensors == 2);
    CHECK(pt.vm.tensors[1].is_parameter && pt.vm.tensors[1].requires_grad);
    CHECK(pt.vm.tensors[1].flags == MLU_PT_FLAG_CONJ);
    mlu_pt_close(&pt);
    /* every allocation failing in turn: out of memory, never another error */
    for (n = 0; n < 400 && !ok; n++) {
        mlu_status st;
        mlu_alloc_fail_after(n);
        st = open_pickle(&z, S(pkl), VALUES, sizeof(VALUES), &pt, &err);
        mlu_alloc_fail_after(-1);
        CHECK(st == MLU_OK || st == MLU_ENOMEM);
        if (st == MLU_OK) {
            ok = 1;
            CHECK(pt.vm.tensors[1].flags == MLU_PT_FLAG_CONJ);
            mlu_pt_close(&pt);
        }
    }
    CHECK(ok && n > 3);
}

static void test_zip_damage(void)
{
    static bytes z;
    mlu_pt pt;
    mlu_error err;
    size_t cut;

    CHECK(open_pickle(&z, S(PICKLE), VALUES, sizeof(VALUES), &pt, &err) == MLU_OK);
    mlu_pt_close(&pt);
    for (cut = 0; cut < z.len; cut += 7) {
        mlu_rd rd;
        mlu_rd_mem(&rd, z.data, cut);
        mlu_error_clear(&err);
        CHECK(mlu_pt_open(&pt, &rd, 1, &err) != MLU_OK);
        CHECK(err.text[0] != '\0');
    }
}

/* Every prefix of the archive and of the pickle, each in a heap buffer of
 * exactly its size (so that AddressSanitizer sees a read one byte past the
 * input): only the whole archive opens, and its storage reads back. */
static void test_exact_buffers(void)
{
    static bytes z;
    mlu_pt pt;
    mlu_error err;
    size_t cut;
    float out[4];

    CHECK(open_pickle(&z, S(PICKLE), VALUES, sizeof(VALUES), &pt, &err) == MLU_OK);
    mlu_pt_close(&pt);
    for (cut = 1; cut <= z.len; cut++) {
        uint8_t *buf = malloc(cut);
        mlu_rd rd;
        mlu_status st;
        CHECK(buf != NULL);
        if (buf == NULL)
            return;
        memcpy(buf, z.data, cut);
        mlu_rd_mem(&rd, buf, cut);
        mlu_error_clear(&err);
        st = mlu_pt_open(&pt, &rd, 1, &err);
        CHECK((st == MLU_OK) == (cut == z.len));
        if (st == MLU_OK) {
            CHECK(mlu_pt_storage_fill(&pt, 0, (uint8_t *)out, &err) == MLU_OK);
            CHECK(memcmp(out, VALUES, sizeof(out)) == 0);
            mlu_pt_close(&pt);
        }
        free(buf);
    }
    for (cut = 1; cut <= sizeof(PICKLE) - 1; cut++) {
        uint8_t *buf = malloc(cut);
        mlu_pk_vm vm;
        size_t pos = 0;
        uint32_t root;
        mlu_status st;
        CHECK(buf != NULL);
        if (buf == NULL)
            return;
        memcpy(buf, PICKLE, cut);
        mlu_pk_vm_init(&vm);
        mlu_error_clear(&err);
        st = mlu_pk_run(&vm, buf, cut, &pos, 0, &root, &err);
        CHECK((st == MLU_OK) == (cut == sizeof(PICKLE) - 1));
        CHECK(st == MLU_OK || strstr(err.text, "truncated") != NULL);
        mlu_pk_vm_free(&vm);
        free(buf);
    }
}

/* The last record's payload ends exactly where the central directory
 * starts: that loads; declared one byte longer (in the directory and the
 * local header) it is refused, never read into the directory. */
static void test_record_at_the_directory(void)
{
    static bytes z;
    rec r[3] = {{"a/data.pkl", PICKLE, sizeof(PICKLE) - 1}, {"a/version", "3\n", 2}, {"a/data/0", VALUES, sizeof(VALUES)}};
    mlu_pt pt;
    mlu_error err;
    mlu_rd rd;
    size_t lfh, cd;
    uint8_t *buf;

    build_zip(&z, r, 3);
    lfh = (30 + strlen(r[0].name) + r[0].len) + (30 + strlen(r[1].name) + r[1].len);
    cd = lfh + 30 + strlen(r[2].name) + r[2].len;
    CHECK(memcmp(z.data + cd, "PK\x01\x02", 4) == 0);
    buf = malloc(z.len);
    CHECK(buf != NULL);
    if (buf == NULL)
        return;
    memcpy(buf, z.data, z.len);
    mlu_rd_mem(&rd, buf, z.len);
    mlu_error_clear(&err);
    CHECK(mlu_pt_open(&pt, &rd, 1, &err) == MLU_OK);
    if (err.code == MLU_OK)
        mlu_pt_close(&pt);
    /* one byte more in the local header and in the third directory entry */
    buf[lfh + 18] = (uint8_t)(sizeof(VALUES) + 1);
    buf[lfh + 22] = (uint8_t)(sizeof(VALUES) + 1);
    {
        size_t e = cd, i;
        for (i = 0; i < 2; i++)
            e += 46 + strlen(r[i].name);
        CHECK(memcmp(buf + e, "PK\x01\x02", 4) == 0);
        buf[e + 20] = (uint8_t)(sizeof(VALUES) + 1);
        buf[e + 24] = (uint8_t)(sizeof(VALUES) + 1);
    }
    mlu_error_clear(&err);
    CHECK(mlu_pt_open(&pt, &rd, 1, &err) == MLU_EFORMAT);
    CHECK(strstr(err.text, "runs past the end of the data") != NULL);
    free(buf);
}

/* A file cut by another process after fstat: the parser is given the old
 * size, reads with pread and must report the short read, never fault. */
static void test_truncated_after_open(void)
{
    static bytes z;
    char path[] = "/tmp/mlu_test_ptload_XXXXXX";
    mlu_pt pt;
    mlu_error err;
    size_t cut;
    int fd = mkstemp(path), ok_parse = 0;
    float out[4];

    CHECK(fd >= 0);
    if (fd < 0)
        return;
    unlink(path);
    CHECK(open_pickle(&z, S(PICKLE), VALUES, sizeof(VALUES), &pt, &err) == MLU_OK);
    mlu_pt_close(&pt);
    for (cut = 0; cut < z.len; cut++) {
        mlu_rd rd;
        mlu_status st;
        CHECK(ftruncate(fd, 0) == 0);
        CHECK(pwrite(fd, z.data, z.len, 0) == (ssize_t)z.len);
        mlu_rd_fd(&rd, fd, z.len);  /* the size fstat gave before the cut */
        CHECK(ftruncate(fd, (off_t)cut) == 0);
        mlu_error_clear(&err);
        st = mlu_pt_open(&pt, &rd, cut & 1, &err);
        if (st == MLU_OK) {
            /* the cut only took storage bytes: filling the storage reports it */
            ok_parse++;
            mlu_error_clear(&err);
            st = mlu_pt_storage_fill(&pt, 0, (uint8_t *)out, &err);
            mlu_pt_close(&pt);
        }
        CHECK(st == MLU_EFORMAT);
        CHECK(strstr(err.text, "truncated") != NULL || strstr(err.text, "shrank") != NULL);
        if (st != MLU_EFORMAT)
            fprintf(stderr, "  cut %zu: %s: %s\n", cut, mlu_status_name(st), err.text);
    }
    /* with the real size, an intact file still loads from the descriptor */
    {
        mlu_rd rd;
        CHECK(ftruncate(fd, 0) == 0);
        CHECK(pwrite(fd, z.data, z.len, 0) == (ssize_t)z.len);
        mlu_rd_fd(&rd, fd, z.len);
        mlu_error_clear(&err);
        CHECK(mlu_pt_open(&pt, &rd, 1, &err) == MLU_OK);
        if (err.code == MLU_OK) {
            CHECK(mlu_pt_storage_fill(&pt, 0, (uint8_t *)out, &err) == MLU_OK);
            CHECK(memcmp(out, VALUES, sizeof(out)) == 0);
            /* cut inside the storage after the parse: the copy reports it */
            CHECK(ftruncate(fd, 40) == 0);
            CHECK(mlu_pt_storage_fill(&pt, 0, (uint8_t *)out, &err) == MLU_EFORMAT);
            CHECK(strstr(err.text, "shrank") != NULL);
            mlu_pt_close(&pt);
        }
    }
    CHECK(ok_parse == 0);  /* this archive's storage lies before its directory: any cut breaks the parse */
    close(fd);
}

static void test_alloc_failures(void)
{
    static bytes z;
    long n;
    int ok = 0;
    for (n = 0; n < 400 && !ok; n++) {
        mlu_pt pt;
        mlu_error err;
        mlu_status st;
        mlu_alloc_fail_after(n);
        st = open_pickle(&z, S(PICKLE), VALUES, sizeof(VALUES), &pt, &err);
        mlu_alloc_fail_after(-1);
        if (st == MLU_OK) {
            ok = 1;
            mlu_pt_close(&pt);
        } else {
            CHECK(st == MLU_ENOMEM);
            if (st != MLU_ENOMEM) fprintf(stderr, "  n=%ld %s: %s\n", n, mlu_status_name(st), err.text);
        }
    }
    CHECK(ok && n > 3);
}

static void test_byteswap(void)
{
    uint8_t b[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    mlu_pt_byteswap(b, 8, 4);
    CHECK(b[0] == 4 && b[3] == 1 && b[4] == 8);
    mlu_pt_byteswap(b, 8, 2);
    CHECK(b[0] == 3 && b[1] == 4);
}

/* The NumPy and ml_dtypes lookups find each row by its own columns. */
static void test_dtype_lookups(void)
{
    int i, rows = 0;
    for (i = 0; i < MLU_TORCH_N_DTYPES; i++) {
        const mlu_torch_dtype *d = &mlu_torch_dtypes[i];
        if (d->numpy != NULL) {
            const char *np = d->numpy[0] == '<' ? d->numpy + 1 : d->numpy;
            char kind = np[0] == '?' ? 'b' : np[0];
            CHECK(mlu_torch_dtype_of_numpy(kind, d->itemsize) == i);
            rows++;
        }
        if (d->ml_dtypes != NULL) {
            CHECK(mlu_torch_dtype_of_ml_dtypes(d->ml_dtypes, d->itemsize) == i);
            CHECK(mlu_torch_dtype_of_ml_dtypes(d->ml_dtypes, d->itemsize + 1) == -1);
        }
    }
    CHECK(rows == 14);
    CHECK(mlu_torch_dtype_of_numpy('f', 4) == mlu_torch_dtype_named("float32"));
    CHECK(mlu_torch_dtype_of_numpy('b', 1) == mlu_torch_dtype_named("bool"));
    CHECK(mlu_torch_dtype_of_numpy('c', 16) == mlu_torch_dtype_named("complex128"));
    CHECK(mlu_torch_dtype_of_numpy('f', 16) == -1);  /* long double */
    CHECK(mlu_torch_dtype_of_numpy('M', 8) == -1);   /* datetime64 */
    CHECK(mlu_torch_dtype_of_ml_dtypes("float4_e2m1fn", 1) == -1);
}

int main(void)
{
    test_good();
    test_rejections();
    test_tensor_flags();
    test_parameter_flags();
    test_zip_damage();
    test_truncated_after_open();
    test_exact_buffers();
    test_record_at_the_directory();
    test_alloc_failures();
    test_byteswap();
    test_dtype_lookups();
    return TEST_DONE("test_ptload");
}
