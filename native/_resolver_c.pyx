# cython: language_level=3
"""Key resolver, compiled twin of stockhold._resolver_py (import `stockhold.resolver`, not this).

Same answers, same FieldViolations (paths and wording), same errors as the pure module for
every input; the result types are the pure module's own classes. Speed comes from one fast
path: exact `str` fields that are ASCII, printable and within their bounds (the usual SKU,
spec, barcode, warehouse and order id) are escaped into a C buffer, hashed there (CRC-32) and
turned into keys with one allocation each. Anything else (non-ASCII text, a violation, a
`str` subclass, an odd type) takes the slow path: the pure module's algorithm, compiled, with
Python semantics throughout.

One known difference: a line or unit triple of the wrong shape (not 5 or 3 items) raises the
same exception type as the twin, worded by Cython ("need more than 3 values to unpack").
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItemWithError, PyDict_SetItem
from cpython.list cimport PyList_CheckExact, PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact, PyLong_FromSsize_t
from cpython.object cimport PyObject, PyObject_GetItem
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport (
    PyTuple_CheckExact,
    PyTuple_GET_ITEM,
    PyTuple_GET_SIZE,
    PyTuple_New,
    PyTuple_SET_ITEM,
)
from cpython.unicode cimport PyUnicode_AsUTF8String, PyUnicode_CheckExact, PyUnicode_FindChar
from libc.string cimport memcpy

import hashlib
import unicodedata
import zlib

from stockhold import _resolver_py as _py
from stockhold import constants as c
from stockhold._resolver_py import AdjustmentKeys, OrderKeys, ResolvedOrder, Unit
from stockhold.errors import FieldViolation, invalid

cdef extern from *:
    """
    #include <stdint.h>
    #include <stdlib.h>
    #include <string.h>

    /* CRC-32 (zlib's: reflected 0xEDB88320, init and final xor 0xFFFFFFFF), slicing by 8.
       Bytes are combined explicitly, so the result does not depend on the byte order. */
    static uint32_t sh_crc_tab[8][256];

    static void sh_crc_init(void) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            sh_crc_tab[0][i] = c;
        }
        for (uint32_t i = 0; i < 256; i++)
            for (int t = 1; t < 8; t++)
                sh_crc_tab[t][i] = (sh_crc_tab[t - 1][i] >> 8) ^ sh_crc_tab[0][sh_crc_tab[t - 1][i] & 0xFF];
    }

    static uint32_t sh_crc32(const char *data, Py_ssize_t n) {
        const unsigned char *p = (const unsigned char *)data;
        uint32_t c = 0xFFFFFFFFu;
        while (n >= 8) {
            c ^= (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
            c = sh_crc_tab[7][c & 0xFF] ^ sh_crc_tab[6][(c >> 8) & 0xFF]
              ^ sh_crc_tab[5][(c >> 16) & 0xFF] ^ sh_crc_tab[4][c >> 24]
              ^ sh_crc_tab[3][p[4]] ^ sh_crc_tab[2][p[5]] ^ sh_crc_tab[1][p[6]] ^ sh_crc_tab[0][p[7]];
            p += 8;
            n -= 8;
        }
        while (n-- > 0) c = sh_crc_tab[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
        return c ^ 0xFFFFFFFFu;
    }

    /* 1 if o is an exact str, ASCII, of lo..hi characters, all printable (0x20..0x7E: what
       str.isprintable accepts among ASCII); else 0. Never raises. */
    static int sh_ascii_ok(PyObject *o, Py_ssize_t lo, Py_ssize_t hi) {
        if (!PyUnicode_CheckExact(o)) return 0;
    #if PY_VERSION_HEX < 0x030C0000
        if (!PyUnicode_IS_READY(o)) return 0;
    #endif
        if (!PyUnicode_IS_ASCII(o)) return 0;
        Py_ssize_t n = PyUnicode_GET_LENGTH(o);
        if (n < lo || n > hi) return 0;
        const Py_UCS1 *s = PyUnicode_1BYTE_DATA(o);
        for (Py_ssize_t i = 0; i < n; i++)
            if (s[i] < 0x20 || s[i] > 0x7E) return 0;
        return 1;
    }

    /* 1 if o is an exact, ready, ASCII str. */
    static int sh_is_ascii(PyObject *o) {
        if (!PyUnicode_CheckExact(o)) return 0;
    #if PY_VERSION_HEX < 0x030C0000
        if (!PyUnicode_IS_READY(o)) return 0;
    #endif
        return PyUnicode_IS_ASCII(o);
    }

    #define sh_ascii_data(o) ((const char *)PyUnicode_1BYTE_DATA(o))
    #define sh_len(o) PyUnicode_GET_LENGTH(o)

    /* Which ASCII characters escape() encodes, and as what: %25 %3A %7B %7D. */
    static const unsigned char sh_special[256] = {['%'] = 1, [':'] = 2, ['{'] = 3, ['}'] = 4};
    static const char sh_code[5][2] = {{0, 0}, {'2', '5'}, {'3', 'A'}, {'7', 'B'}, {'7', 'D'}};

    /* The escape of ASCII text (see escape()) written to out, which holds 3 * n bytes;
       returns the number of bytes written. */
    static Py_ssize_t sh_escape(const char *s, Py_ssize_t n, char *out) {
        char *o = out;
        for (Py_ssize_t i = 0; i < n; i++) {
            unsigned char ch = (unsigned char)s[i];
            unsigned char k = sh_special[ch];
            if (!k) {
                *o++ = (char)ch;
            } else {
                o[0] = '%'; o[1] = sh_code[k][0]; o[2] = sh_code[k][1];
                o += 3;
            }
        }
        return o - out;
    }

    /* How many of n ASCII characters escape() encodes. */
    static Py_ssize_t sh_specials(const char *s, Py_ssize_t n) {
        Py_ssize_t k = 0;
        for (Py_ssize_t i = 0; i < n; i++) k += sh_special[(unsigned char)s[i]] != 0;
        return k;
    }

    /* Decimal digits of v >= 0 written to out (room for 20); returns their number. */
    static Py_ssize_t sh_digits(long long v, char *out) {
        char tmp[24];
        Py_ssize_t n = 0;
        do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
        for (Py_ssize_t i = 0; i < n; i++) out[i] = tmp[n - 1 - i];
        return n;
    }

    /* escape() of an exact ASCII str holding k characters to encode (k > 0). */
    static PyObject *sh_escape_str(PyObject *text, Py_ssize_t k) {
        Py_ssize_t n = PyUnicode_GET_LENGTH(text);
        PyObject *u = PyUnicode_New(n + 2 * k, 127);
        if (u == NULL) return NULL;
        sh_escape((const char *)PyUnicode_1BYTE_DATA(text), n, (char *)PyUnicode_1BYTE_DATA(u));
        return u;
    }

    /* A new ASCII str: a (an ASCII str, or NULL) then n1 bytes at s1 then n2 bytes at s2. */
    static PyObject *sh_ascii_str(PyObject *a, const char *s1, Py_ssize_t n1,
                                  const char *s2, Py_ssize_t n2) {
        Py_ssize_t na = a ? PyUnicode_GET_LENGTH(a) : 0;
        PyObject *u = PyUnicode_New(na + n1 + n2, 127);
        if (u == NULL) return NULL;
        char *d = (char *)PyUnicode_1BYTE_DATA(u);
        if (na) memcpy(d, PyUnicode_1BYTE_DATA(a), (size_t)na);
        if (n1) memcpy(d + na, s1, (size_t)n1);
        if (n2) memcpy(d + na + n1, s2, (size_t)n2);
        return u;
    }

    /* BLAKE2b (RFC 7693), unkeyed, as hashlib.blake2b(data, digest_size=outlen). */
    typedef struct {
        uint8_t b[128];  /* input buffer */
        uint64_t h[8];   /* chained state */
        uint64_t t[2];   /* total number of bytes */
        size_t c;        /* bytes in b */
        size_t outlen;
    } sh_b2b;

    static const uint64_t sh_b2b_iv[8] = {
        0x6A09E667F3BCC908ULL, 0xBB67AE8584CAA73BULL, 0x3C6EF372FE94F82BULL,
        0xA54FF53A5F1D36F1ULL, 0x510E527FADE682D1ULL, 0x9B05688C2B3E6C1FULL,
        0x1F83D9ABFB41BD6BULL, 0x5BE0CD19137E2179ULL};

    static const uint8_t sh_b2b_sigma[12][16] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
        {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
        {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
        {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
        {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
        {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
        {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
        {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
        {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
        {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
        {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

    #define SH_ROTR64(x, y) (((x) >> (y)) ^ ((x) << (64 - (y))))
    #define SH_B2B_G(a, b, c, d, x, y) do { \
            v[a] = v[a] + v[b] + (x); v[d] = SH_ROTR64(v[d] ^ v[a], 32); \
            v[c] = v[c] + v[d];       v[b] = SH_ROTR64(v[b] ^ v[c], 24); \
            v[a] = v[a] + v[b] + (y); v[d] = SH_ROTR64(v[d] ^ v[a], 16); \
            v[c] = v[c] + v[d];       v[b] = SH_ROTR64(v[b] ^ v[c], 63); \
        } while (0)

    static uint64_t sh_load64(const uint8_t *p) {
        return (uint64_t)p[0] | ((uint64_t)p[1] << 8) | ((uint64_t)p[2] << 16)
             | ((uint64_t)p[3] << 24) | ((uint64_t)p[4] << 32) | ((uint64_t)p[5] << 40)
             | ((uint64_t)p[6] << 48) | ((uint64_t)p[7] << 56);
    }

    static void sh_b2b_compress(sh_b2b *ctx, int last) {
        uint64_t v[16], m[16];
        for (int i = 0; i < 8; i++) { v[i] = ctx->h[i]; v[i + 8] = sh_b2b_iv[i]; }
        v[12] ^= ctx->t[0];
        v[13] ^= ctx->t[1];
        if (last) v[14] = ~v[14];
        for (int i = 0; i < 16; i++) m[i] = sh_load64(&ctx->b[8 * i]);
        for (int i = 0; i < 12; i++) {
            const uint8_t *s = sh_b2b_sigma[i];
            SH_B2B_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
            SH_B2B_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
            SH_B2B_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
            SH_B2B_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
            SH_B2B_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
            SH_B2B_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
            SH_B2B_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
            SH_B2B_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
        }
        for (int i = 0; i < 8; i++) ctx->h[i] ^= v[i] ^ v[i + 8];
    }

    static void sh_b2b_init(sh_b2b *ctx, size_t outlen) {
        for (int i = 0; i < 8; i++) ctx->h[i] = sh_b2b_iv[i];
        ctx->h[0] ^= 0x01010000ULL ^ (uint64_t)outlen;
        ctx->t[0] = ctx->t[1] = 0;
        ctx->c = 0;
        ctx->outlen = outlen;
    }

    static void sh_b2b_update(sh_b2b *ctx, const char *in, size_t n) {
        const uint8_t *p = (const uint8_t *)in;
        while (n > 0) {
            if (ctx->c == 128) {  /* full, and more input follows: not the last block */
                ctx->t[0] += 128;
                if (ctx->t[0] < 128) ctx->t[1]++;
                sh_b2b_compress(ctx, 0);
                ctx->c = 0;
            }
            size_t k = 128 - ctx->c;
            if (k > n) k = n;
            memcpy(ctx->b + ctx->c, p, k);
            ctx->c += k;
            p += k;
            n -= k;
        }
    }

    static void sh_b2b_final(sh_b2b *ctx, uint8_t *out) {
        ctx->t[0] += ctx->c;
        if (ctx->t[0] < ctx->c) ctx->t[1]++;
        memset(ctx->b + ctx->c, 0, 128 - ctx->c);
        sh_b2b_compress(ctx, 1);
        for (size_t i = 0; i < ctx->outlen; i++) out[i] = (uint8_t)(ctx->h[i >> 3] >> (8 * (i & 7)));
    }

    /* A canonical line (see resolve_order) in a C buffer. */
    typedef struct { const char *p; Py_ssize_t n; } sh_entry;

    /* The order of Python's str comparison, for ASCII: bytes, then the shorter first. */
    static int sh_entry_cmp(const void *x, const void *y) {
        const sh_entry *a = (const sh_entry *)x, *b = (const sh_entry *)y;
        int r = memcmp(a->p, b->p, (size_t)(a->n < b->n ? a->n : b->n));
        if (r) return r;
        return (a->n > b->n) - (a->n < b->n);
    }

    /* blake2b(b"\x01".join(sorted(entries) + [tail]), digest_size=16).hexdigest(), all
       ASCII, as a str. Sorts the entries in place. */
    static PyObject *sh_fingerprint(sh_entry *e, Py_ssize_t n, const char *tail, Py_ssize_t ntail) {
        static const char hexd[] = "0123456789abcdef";
        sh_b2b ctx;
        uint8_t digest[16];
        if (n > 1) qsort(e, (size_t)n, sizeof(sh_entry), sh_entry_cmp);
        sh_b2b_init(&ctx, 16);
        for (Py_ssize_t i = 0; i < n; i++) {
            sh_b2b_update(&ctx, e[i].p, (size_t)e[i].n);
            sh_b2b_update(&ctx, "\x01", 1);
        }
        sh_b2b_update(&ctx, tail, (size_t)ntail);
        sh_b2b_final(&ctx, digest);
        PyObject *u = PyUnicode_New(32, 127);
        if (u == NULL) return NULL;
        char *d = (char *)PyUnicode_1BYTE_DATA(u);
        for (int i = 0; i < 16; i++) {
            d[2 * i] = hexd[digest[i] >> 4];
            d[2 * i + 1] = hexd[digest[i] & 15];
        }
        return u;
    }

    /* hashlib.blake2b(data, digest_size=16).hexdigest() of bytes, for the tests. */
    static PyObject *sh_blake2b_16(const char *data, Py_ssize_t n) {
        return sh_fingerprint(NULL, 0, data, n);
    }

    /* An instance of a NamedTuple class (a tuple subclass without slots of its own, checked
       at import) built the way its __new__ does, tuple.__new__(cls, items), minus the Python
       call: allocate through the class, then store the items. */
    static PyObject *sh_record(PyObject *cls, Py_ssize_t n, PyObject **items) {
        PyTypeObject *t = (PyTypeObject *)cls;
        PyObject *r = t->tp_alloc(t, n);
        if (r == NULL) return NULL;
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_INCREF(items[i]);
            PyTuple_SET_ITEM(r, i, items[i]);
        }
        return r;
    }
    static PyObject *sh_record4(PyObject *cls, PyObject *a, PyObject *b, PyObject *c, PyObject *d) {
        PyObject *items[4] = {a, b, c, d};
        return sh_record(cls, 4, items);
    }
    static PyObject *sh_record5(PyObject *cls, PyObject *a, PyObject *b, PyObject *c, PyObject *d,
                                PyObject *e) {
        PyObject *items[5] = {a, b, c, d, e};
        return sh_record(cls, 5, items);
    }
    static PyObject *sh_record6(PyObject *cls, PyObject *a, PyObject *b, PyObject *c, PyObject *d,
                                PyObject *e, PyObject *f) {
        PyObject *items[6] = {a, b, c, d, e, f};
        return sh_record(cls, 6, items);
    }
    """
    void sh_crc_init()
    unsigned long sh_crc32(const char *data, Py_ssize_t n) nogil
    bint sh_ascii_ok(object o, Py_ssize_t lo, Py_ssize_t hi)
    bint sh_is_ascii(object o)
    const char *sh_ascii_data(object o)
    Py_ssize_t sh_len(object o)
    Py_ssize_t sh_escape(const char *s, Py_ssize_t n, char *out)
    Py_ssize_t sh_specials(const char *s, Py_ssize_t n)
    Py_ssize_t sh_digits(long long v, char *out)
    object sh_escape_str(object text, Py_ssize_t k)
    ctypedef struct sh_entry:
        const char *p
        Py_ssize_t n
    object sh_fingerprint(sh_entry *e, Py_ssize_t n, const char *tail, Py_ssize_t ntail)
    object sh_blake2b_16(const char *data, Py_ssize_t n)
    object sh_ascii_str(PyObject *a, const char *s1, Py_ssize_t n1, const char *s2, Py_ssize_t n2)
    object sh_record4(object cls, object a, object b, object c, object d)
    object sh_record5(object cls, object a, object b, object c, object d, object e)
    object sh_record6(object cls, object a, object b, object c, object d, object e, object f)


sh_crc_init()

# Building records without calling their class is only sound for plain NamedTuples.
for _cls in (Unit, OrderKeys, AdjustmentKeys, ResolvedOrder):
    if not (
        _cls.__bases__ == (tuple,)
        and _cls.__basicsize__ == tuple.__basicsize__
        and _cls.__itemsize__ == tuple.__itemsize__
        and _cls.__dictoffset__ == 0
        and _cls.__weakrefoffset__ == 0
    ):
        raise ImportError(f"stockhold._resolver_c: {_cls.__name__} is not a plain NamedTuple")

# Bounds and key words, read once from the one place that defines them.
cdef Py_ssize_t MAX_ORDER_ID = c.MAX_ORDER_ID
cdef Py_ssize_t MAX_SKU = c.MAX_SKU
cdef Py_ssize_t MAX_SPEC = c.MAX_SPEC
cdef Py_ssize_t MAX_BARCODE = c.MAX_BARCODE
cdef Py_ssize_t MAX_WAREHOUSE = c.MAX_WAREHOUSE
cdef long long MAX_QUANTITY = c.MAX_QUANTITY
cdef Py_ssize_t MAX_LINES = c.MAX_LINES
cdef Py_ssize_t MAX_ADJUSTMENT_ID = c.MAX_ADJUSTMENT_ID
cdef str STOCK = c.STOCK
cdef str ORDER = c.ORDER
cdef str EXPIRY = c.EXPIRY
cdef str EVENTS = c.EVENTS
cdef str ADJUSTMENT = c.ADJUSTMENT
cdef str META_PARTITIONS = c.META_PARTITIONS
cdef str SKU = c.SKU
# The same words as ASCII bytes, followed by the separator, for the fast key builders.
cdef bytes STOCK_SEP = (c.STOCK + ":").encode("ascii")
cdef bytes ORDER_SEP = (c.ORDER + ":").encode("ascii")

cdef object _ESCAPES = _py._ESCAPES
cdef object _normalize = unicodedata.normalize
cdef object _blake2b = hashlib.blake2b
cdef object _zlib_crc32 = zlib.crc32

cdef object _HEAD = slice(None, c.MAX_LINES)
cdef object _Unit = Unit
cdef object _OrderKeys = OrderKeys
cdef object _AdjustmentKeys = AdjustmentKeys
cdef object _ResolvedOrder = ResolvedOrder

# Fixed buffers of the fast path, sized for the bounds in constants (checked below).
cdef enum:
    # Escaped key text: a canonical unit id (three fields, every character encoded into
    # three bytes, two separators: 578 bytes at 64 characters each) or an order id (384).
    BUF = 1024
    # A canonical line: its unit id, the escaped warehouse, two NULs and the quantity's
    # digits (779 bytes).
    LINE_MAX = 800
    # Orders of up to this many lines keep their canonical lines on the stack.
    SMALL_ORDER = 12

if (
    3 * (MAX_SKU + MAX_SPEC + MAX_BARCODE) + 2 > BUF
    or 3 * max(MAX_ORDER_ID, MAX_ADJUSTMENT_ID) > BUF
    or 3 * (MAX_SKU + MAX_SPEC + MAX_BARCODE + MAX_WAREHOUSE) + 4 + len(str(MAX_QUANTITY))
    > LINE_MAX
):
    raise ImportError("stockhold._resolver_c: the bounds in constants outgrew BUF or LINE_MAX")


# -- text -----------------------------------------------------------------------------------
cdef object _escape(object text):
    cdef Py_ssize_t n, k
    if sh_is_ascii(text):
        n = sh_len(text)
        k = sh_specials(sh_ascii_data(text), n)
        return text if k == 0 else sh_escape_str(text, k)
    if PyUnicode_CheckExact(text):
        n = sh_len(text)
        if (
            PyUnicode_FindChar(text, 0x25, 0, n, 1) == -1
            and PyUnicode_FindChar(text, 0x3A, 0, n, 1) == -1
            and PyUnicode_FindChar(text, 0x7B, 0, n, 1) == -1
            and PyUnicode_FindChar(text, 0x7D, 0, n, 1) == -1
        ):
            return text
    return text.translate(_ESCAPES)


cdef object _check_text(object value, object path, object lo, object hi, object out,
                        bint normalise):
    # The reference check_text, compiled: Python semantics for any value, bound and path.
    if normalise and not value.isascii():
        value = _normalize("NFC", value)
    n = len(value)
    if n < lo:
        out.append(FieldViolation(path, "must not be empty" if lo == 1 else f"at least {lo} chars"))
    elif n > hi:
        out.append(FieldViolation(path, f"at most {hi} characters (got {n})"))
    elif not value.isprintable():
        out.append(FieldViolation(path, "must be printable text (no control characters)"))
    return value


cdef inline object _text(object value, object base, str field, Py_ssize_t lo, Py_ssize_t hi,
                         object out, bint normalise):
    # check_text for this module's own callers; the path is f"{base}{field}", or base itself
    # when field is None, and is only built when the fast check does not settle it.
    if sh_ascii_ok(value, lo, hi):
        return value
    return _check_text(value, base if field is None else f"{base}{field}", lo, hi, out, normalise)


cdef int _check_int(object value, object path, object lo, object hi, object out) except -1:
    # The reference check_int, compiled.
    if not lo <= value <= hi:
        out.append(FieldViolation(path, f"must be within {lo}..{hi} (got {value})"))
    return 0


cdef inline long long _small_int(object value, long long lo, long long hi) except? -2:
    # value as a C integer when it is an exact int within lo..hi (lo >= 0), else -1.
    cdef int overflow = 0
    cdef long long v
    if not PyLong_CheckExact(value):
        return -1
    v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow or v < lo or v > hi:
        return -1
    return v


cdef long long _crc_of(object ident) except -1:
    # zlib.crc32(ident.encode()), without the calls when ident is a str.
    cdef bytes b
    if sh_is_ascii(ident):
        return sh_crc32(sh_ascii_data(ident), sh_len(ident))
    if PyUnicode_CheckExact(ident):
        b = PyUnicode_AsUTF8String(ident)
        return sh_crc32(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))
    raw = ident.encode()
    if PyBytes_CheckExact(raw):
        return sh_crc32(PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))
    return _zlib_crc32(raw)


def escape(text):
    """Percent-encode the characters that are key syntax (`%`, `:`, `{`, `}`)."""
    return _escape(text)


def check_text(value, path, lo, hi, out, normalise=True):
    """Validate printable text of lo..hi characters; NFC-normalise it; record any violation."""
    cdef bint norm = normalise
    cdef long long a, b
    a = _small_int(lo, 0, 0x3FFFFFFF)
    b = _small_int(hi, 0, 0x3FFFFFFF)
    if a >= 0 and b >= 0 and sh_ascii_ok(value, a, b):
        return value
    return _check_text(value, path, lo, hi, out, norm)


def check_int(value, path, lo, hi, out):
    """Record a violation unless lo <= value <= hi."""
    _check_int(value, path, lo, hi, out)


# -- the resolver ---------------------------------------------------------------------------
cdef class KeyResolver:
    """Builds every Redis key; the only place that knows the key layout (see constants)."""

    cdef public object prefix
    cdef object _partitions  # as given; the `partitions` property reads and writes it
    cdef Py_ssize_t _n  # the same as a C integer when it is a positive int, else 0
    cdef list _tags  # "<prefix>:{p<N>}:" of every partition, built once as in the twin

    def __init__(self, prefix=c.DEFAULT_KEY_PREFIX, partitions=c.DEFAULT_PARTITIONS):
        self.prefix = prefix
        self.partitions = partitions
        self._tags = [f"{prefix}:{{p{p}}}:" for p in range(partitions)]

    @property
    def partitions(self):
        return self._partitions

    @partitions.setter
    def partitions(self, value):
        self._partitions = value
        self._n = <Py_ssize_t>_small_int(value, 1, 0x7FFFFFFF)
        if self._n < 0:
            self._n = 0

    # -- partitions -------------------------------------------------------------------------
    cdef Py_ssize_t _fast_partition(self, unsigned long crc):
        # The partition of a CRC when C arithmetic gives the twin's answer and it has a tag.
        cdef Py_ssize_t p
        if self._n == 0 or self._tags is None:
            return -1
        p = <Py_ssize_t>(crc % <unsigned long>self._n)
        if p >= PyList_GET_SIZE(self._tags):
            return -1
        return p

    cdef object _place(self, object ident, Py_ssize_t *fast):
        # (partition, tag) of a canonical id: the twin's partition_of(ident), then _tags[p].
        cdef long long crc = _crc_of(ident)
        cdef Py_ssize_t p = self._fast_partition(<unsigned long>crc)
        fast[0] = p
        if p >= 0:
            return PyLong_FromSsize_t(p)
        return crc % self.partitions

    def partition_of(self, ident):
        """Stable partition of a canonical id: CRC-32 of its UTF-8 bytes, mod the count."""
        cdef Py_ssize_t fast = -1
        return self._place(ident, &fast)

    def expiry_key(self, partition):
        """The expiry index (zset of order id -> deadline) of a partition."""
        return self._tags[partition] + EXPIRY

    def events_key(self, partition):
        """The event stream of a partition."""
        return self._tags[partition] + EVENTS

    def meta_partitions_key(self):
        """Where the deployment's partition count is recorded."""
        return f"{self.prefix}:{META_PARTITIONS}"

    def sku_key(self, sku):
        """The policy + sales-bucket hash of a (normalised) SKU, in the SKU's own partition."""
        sid = _escape(sku)
        return f"{self._tags[self.partition_of(sid)]}{SKU}:{sid}"

    def meta_key(self, name):
        """A deployment-wide key such as `constants.META_CONTENTION` (the `{meta}` slot)."""
        return f"{self.prefix}:{name}"

    # -- sales units ------------------------------------------------------------------------
    def unit(self, sku, spec, barcode, path="unit", out=None):
        """Resolve one sales unit.

        Violations go to `out` when given (the caller raises once for all fields); without
        it, any violation raises INVALID_ARGUMENT at once.
        """
        found = [] if out is None else out
        unit = self._unit_fast(sku, spec, barcode)
        if unit is None:
            unit = self._unit_slow(sku, spec, barcode, path, found)
        if out is None and found:
            raise invalid(found)
        return unit

    cdef object _unit_fast(self, object sku, object spec, object barcode):
        # The unit when all three fields are valid ASCII; None otherwise.
        cdef char buf[BUF]
        cdef Py_ssize_t n, ns
        if not (
            sh_ascii_ok(sku, 1, MAX_SKU)
            and sh_ascii_ok(spec, 0, MAX_SPEC)
            and sh_ascii_ok(barcode, 0, MAX_BARCODE)
        ):
            return None
        n = sh_escape(sh_ascii_data(sku), sh_len(sku), buf)
        ns = n  # the escaped SKU: it places the unit (in its SKU's partition)
        buf[n] = c':'
        n += 1
        n += sh_escape(sh_ascii_data(spec), sh_len(spec), buf + n)
        buf[n] = c':'
        n += 1
        n += sh_escape(sh_ascii_data(barcode), sh_len(barcode), buf + n)
        uid = sh_ascii_str(NULL, buf, n, NULL, 0)
        return self._unit_from(sku, spec, barcode, uid, sh_crc32(buf, ns), buf, n)

    cdef object _unit_from(self, object sku, object spec, object barcode, object uid,
                           unsigned long crc, const char *raw, Py_ssize_t nraw):
        # The Unit of checked ASCII fields whose escaped SKU hashes to crc; (raw, nraw) is
        # its canonical id.
        cdef Py_ssize_t fp = self._fast_partition(crc)
        cdef bytes sep = STOCK_SEP
        if fp >= 0:
            tag = <object>PyList_GET_ITEM(self._tags, fp)
            p = PyLong_FromSsize_t(fp)
            if sh_is_ascii(tag):
                stock_key = sh_ascii_str(<PyObject *>tag, PyBytes_AS_STRING(sep),
                                         PyBytes_GET_SIZE(sep), raw, nraw)
            else:
                stock_key = f"{tag}{STOCK}:{uid}"
        else:
            p = crc % self.partitions
            stock_key = f"{self._tags[p]}{STOCK}:{uid}"
        return sh_record6(_Unit, sku, spec, barcode, uid, p, stock_key)

    cdef object _unit_slow(self, object sku, object spec, object barcode, object base,
                           object out):
        # The twin's _unit, compiled: violations to out, the unit built all the same.
        cdef Py_ssize_t fp = -1
        sku = _text(sku, base, ".sku", 1, MAX_SKU, out, True)
        spec = _text(spec, base, ".spec", 0, MAX_SPEC, out, True)
        barcode = _text(barcode, base, ".barcode", 0, MAX_BARCODE, out, True)
        esku = _escape(sku)
        uid = f"{esku}:{_escape(spec)}:{_escape(barcode)}"
        p = self._place(esku, &fp)
        tag = <object>PyList_GET_ITEM(self._tags, fp) if fp >= 0 else self._tags[p]
        return sh_record6(_Unit, sku, spec, barcode, uid, p, f"{tag}{STOCK}:{uid}")

    def units(self, triples, path="units"):
        """Resolve many units at once (availability reads), collecting every violation."""
        cdef list out = []
        cdef list units = []
        cdef Py_ssize_t i = 0
        for triple in triples:
            if PyTuple_CheckExact(triple) and PyTuple_GET_SIZE(triple) == 3:
                s = <object>PyTuple_GET_ITEM(triple, 0)
                sp = <object>PyTuple_GET_ITEM(triple, 1)
                b = <object>PyTuple_GET_ITEM(triple, 2)
            else:
                s, sp, b = triple
            unit = self._unit_fast(s, sp, b)
            if unit is None:
                unit = self._unit_slow(s, sp, b, f"{path}[{i}]", out)
            units.append(unit)
            i += 1
        if out:
            raise invalid(out)
        return units

    # -- orders and adjustments -------------------------------------------------------------
    def order(self, order_id, path="order_id", out=None):
        """Resolve an order id (opaque: validated, not normalised); `out` as for `unit`."""
        found = [] if out is None else out
        keys = self._order(order_id, path, found)
        if out is None and found:
            raise invalid(found)
        return keys

    cdef object _order(self, object order_id, object path, object out):
        cdef char buf[BUF]
        cdef Py_ssize_t n, fp = -1
        cdef bytes sep = ORDER_SEP
        if sh_ascii_ok(order_id, 1, MAX_ORDER_ID):
            n = sh_escape(sh_ascii_data(order_id), sh_len(order_id), buf)
            fp = self._fast_partition(sh_crc32(buf, n))
            if fp >= 0:
                tag = <object>PyList_GET_ITEM(self._tags, fp)
                if sh_is_ascii(tag):
                    return sh_record5(
                        _OrderKeys,
                        order_id,
                        PyLong_FromSsize_t(fp),
                        sh_ascii_str(<PyObject *>tag, PyBytes_AS_STRING(sep),
                                     PyBytes_GET_SIZE(sep), buf, n),
                        tag + EXPIRY,
                        tag + EVENTS,
                    )
        else:
            _text(order_id, path, None, 1, MAX_ORDER_ID, out, False)
        oid = _escape(order_id)
        p = self._place(oid, &fp)
        tag = <object>PyList_GET_ITEM(self._tags, fp) if fp >= 0 else self._tags[p]
        return sh_record5(_OrderKeys, order_id, p, f"{tag}{ORDER}:{oid}", tag + EXPIRY, tag + EVENTS)

    def adjustment(self, adjustment_id, path="adjustment_id", out=None):
        """Resolve an adjustment id (opaque: validated, not normalised); `out` as for `unit`."""
        cdef Py_ssize_t fp = -1
        found = [] if out is None else out
        _text(adjustment_id, path, None, 1, MAX_ADJUSTMENT_ID, found, False)
        if out is None and found:
            raise invalid(found)
        aid = _escape(adjustment_id)
        p = self._place(aid, &fp)
        tag = <object>PyList_GET_ITEM(self._tags, fp) if fp >= 0 else self._tags[p]
        return sh_record4(_AdjustmentKeys, adjustment_id, p, f"{tag}{ADJUSTMENT}:{aid}", tag + EVENTS)

    def resolve_order(self, order_id, lines, hold_seconds, max_hold_seconds):
        """Validate and resolve a whole Reserve in one call.

        `lines` holds (sku, spec, barcode, warehouse, quantity) tuples. Every violation is
        collected and raised together as INVALID_ARGUMENT.
        """
        cdef list out = []
        cdef dict index = {}
        cdef list units = []
        cdef list resolved = []
        cdef list slow = []  # canonical forms (str) of the lines that took the slow path
        cdef Py_ssize_t i, count, m, used = 0, nfast = 0
        # Canonical forms of fast lines, in C: the text and where each one is in it.
        cdef char stack_text[SMALL_ORDER * LINE_MAX]
        cdef sh_entry stack_entries[SMALL_ORDER]
        cdef char *text = stack_text
        cdef sh_entry *entries = stack_entries
        keys = self._order(order_id, "order_id", out)
        count = len(lines)
        if not 1 <= count <= MAX_LINES:
            out.append(FieldViolation("lines", f"must hold 1..{MAX_LINES} lines (got {len(lines)})"))
        if hold_seconds != 0:
            _check_int(hold_seconds, "hold_seconds", 1, max_hold_seconds, out)
        seq = PyObject_GetItem(lines, _HEAD)  # lines[:MAX_LINES], exactly as Python does it
        try:
            if PyList_CheckExact(seq) or PyTuple_CheckExact(seq):
                # A new list, or an immutable tuple: its items are fixed, and counted.
                count = len(seq)
                if count > SMALL_ORDER:
                    text = <char *>PyMem_Malloc(count * LINE_MAX)
                    entries = <sh_entry *>PyMem_Malloc(count * sizeof(sh_entry))
                    if text is NULL or entries is NULL:
                        raise MemoryError()
                for i in range(count):
                    m = self._line(i, seq[i], out, index, units, resolved, slow, text + used)
                    if m >= 0:
                        entries[nfast].p = text + used
                        entries[nfast].n = m
                        nfast += 1
                        used += m
            else:
                # Any other sequence is iterated line by line, as the twin does.
                i = 0
                for line in seq:
                    self._line(i, line, out, index, units, resolved, slow, NULL)
                    i += 1
            if out:
                raise invalid(out)
            hold = str(hold_seconds)
            if not slow and sh_is_ascii(hold):
                fp = sh_fingerprint(entries, nfast, sh_ascii_data(hold), sh_len(hold))
            else:
                # Some line is not plain ASCII: the twin's way, on Python strings.
                canon = [sh_ascii_str(NULL, entries[i].p, entries[i].n, NULL, 0) for i in range(nfast)]
                canon.extend(slow)
                canon.sort()
                canon.append(hold)
                fp = _blake2b("\x01".join(canon).encode(), digest_size=16).hexdigest()
        finally:
            if text != stack_text:
                PyMem_Free(text)
            if entries != stack_entries:
                PyMem_Free(entries)
        return sh_record5(_ResolvedOrder, keys, tuple(units), tuple(resolved), hold_seconds, fp)

    cdef Py_ssize_t _line(self, Py_ssize_t i, object line, list out, dict index, list units,
                          list resolved, list slow, char *dst) except -2:
        # One line of resolve_order: its unit (deduplicated) and resolved form. Its canonical
        # form goes to dst (at most LINE_MAX bytes; the length is returned) for a plain ASCII
        # line when dst is given, else to `slow` as a str (-1 is returned).
        cdef char buf[BUF]
        cdef char own[LINE_MAX]
        cdef char *start = dst
        cdef Py_ssize_t n, ns, m = -1
        cdef long long q
        cdef PyObject *found
        if start is NULL:
            start = own
        if PyTuple_CheckExact(line) and PyTuple_GET_SIZE(line) == 5:
            sku = <object>PyTuple_GET_ITEM(line, 0)
            spec = <object>PyTuple_GET_ITEM(line, 1)
            barcode = <object>PyTuple_GET_ITEM(line, 2)
            warehouse = <object>PyTuple_GET_ITEM(line, 3)
            qty = <object>PyTuple_GET_ITEM(line, 4)
        else:
            sku, spec, barcode, warehouse, qty = line
        q = -1
        if (
            sh_ascii_ok(sku, 1, MAX_SKU)
            and sh_ascii_ok(spec, 0, MAX_SPEC)
            and sh_ascii_ok(barcode, 0, MAX_BARCODE)
            and sh_ascii_ok(warehouse, 0, MAX_WAREHOUSE)
        ):
            q = _small_int(qty, 1, MAX_QUANTITY)
        if q > 0:
            # Fast: canonical id, then (only for a new unit) partition and stock key.
            n = sh_escape(sh_ascii_data(sku), sh_len(sku), buf)
            ns = n
            buf[n] = c':'
            n += 1
            n += sh_escape(sh_ascii_data(spec), sh_len(spec), buf + n)
            buf[n] = c':'
            n += 1
            n += sh_escape(sh_ascii_data(barcode), sh_len(barcode), buf + n)
            uid = sh_ascii_str(NULL, buf, n, NULL, 0)
            found = PyDict_GetItemWithError(index, uid)
            if found is NULL:
                k = PyLong_FromSsize_t(len(units))
                units.append(self._unit_from(sku, spec, barcode, uid, sh_crc32(buf, ns), buf, n))
                PyDict_SetItem(index, uid, k)
            else:
                k = <object>found
            wh = warehouse
            # f"{unit_id}\x00{escape(wh)}\x00{qty}"
            memcpy(start, buf, n)
            m = n
            start[m] = 0
            m += 1
            m += sh_escape(sh_ascii_data(wh), sh_len(wh), start + m)
            start[m] = 0
            m += 1
            m += sh_digits(q, start + m)
            if dst is NULL:
                slow.append(sh_ascii_str(NULL, start, m, NULL, 0))
                m = -1
        else:
            # Slow: the twin's loop body, compiled.
            base = f"lines[{i}]"
            unit = self._unit_fast(sku, spec, barcode)
            if unit is None:
                unit = self._unit_slow(sku, spec, barcode, f"{base}.unit", out)
            wh = _text(warehouse, base, ".warehouse", 0, MAX_WAREHOUSE, out, True)
            q = _small_int(qty, 1, MAX_QUANTITY)
            if q < 0:
                _check_int(qty, f"{base}.quantity", 1, MAX_QUANTITY, out)
            uid = unit[3]
            k = index.get(uid)
            if k is None:
                k = index[uid] = len(units)
                units.append(unit)
            slow.append(f"{uid}\x00{_escape(wh)}\x00{qty}")
        t = PyTuple_New(3)
        Py_INCREF(k)
        PyTuple_SET_ITEM(t, 0, k)
        Py_INCREF(wh)
        PyTuple_SET_ITEM(t, 1, wh)
        Py_INCREF(qty)
        PyTuple_SET_ITEM(t, 2, qty)
        resolved.append(t)
        return m


def _crc32(data):
    """CRC-32 of bytes by this module's own code (the tests compare it with zlib.crc32)."""
    cdef bytes b = bytes(data)
    return sh_crc32(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


def _blake2b_16(data):
    """BLAKE2b-128 hex digest of bytes by this module's own code (the tests compare it)."""
    cdef bytes b = bytes(data)
    return sh_blake2b_16(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


__all__ = [
    "AdjustmentKeys",
    "KeyResolver",
    "OrderKeys",
    "ResolvedOrder",
    "Unit",
    "check_int",
    "check_text",
    "escape",
]
