/* rollwire.features._simd: the two byte shuffles of a new image's turn, in AVX-512 VBMI or AVX2, and
 * the view of PIL's memory they read.
 *
 * - rgbx_memory: a read-only buffer over an RGB PIL image's own RGBX bytes, from its Arrow C export
 *   (what pixels.rgbx_pixels otherwise reads with ctypes: 5 us, not 8-11); on any CPU.
 * - patchify_rgbx: PIL's RGBX pixels (R, G, B, a pad byte) -> Qwen-VL's uint8 patch rows
 *   (C, T, P, P) in HF's patch order, each frame the same. AVX-512 VBMI: one permute of a patch
 *   row's p pixels (vpermb) puts each channel's p bytes in one lane, masked stores write them to
 *   every frame. AVX2: in-lane shuffles, a dword permute and two unpacks do the same for 16 pixels.
 * - pack_rgb: RGBX -> packed RGB bytes (what Image.tobytes() gives for an RGB image), the input of
 *   the image id's hash: 16 pixels a permute (AVX-512 VBMI), 8 a shuffle (AVX2).
 *
 * numpy moves these bytes in short runs and casts (about 2.3x a copy for the patchify) and PIL packs
 * one pixel at a time; both are the same bytes (tests/test_simd.py holds every level to it). Built as
 * an optional extension (setup.py): where it is missing, or the CPU has neither (`level()` is None),
 * rollwire takes the numpy and PIL paths. The GIL is released while the bytes move.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ROLLWIRE_X86 1
#include <immintrin.h>
#endif

#define MAX_PATCH 16  /* a patch row of up to 16 RGBX pixels is one 64-byte vector */
#define MAX_FRAMES 16

#ifdef ROLLWIRE_X86
/* the first RGBX pixel of patch k in HF's order: merged blocks row by row, then m x m patches in each */
static inline const uint8_t *patch_pixels(const uint8_t *src, Py_ssize_t k, Py_ssize_t width, int p, int m) {
    const Py_ssize_t per_block = (Py_ssize_t)m * m, blocks_across = width / ((Py_ssize_t)p * m);
    const Py_ssize_t block = k / per_block, inner = k % per_block;
    const Py_ssize_t y = (block / blocks_across * m + inner / m) * p, x = (block % blocks_across * m + inner % m) * p;
    return src + 4 * (y * width + x);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi")))
static void patchify_avx512(const uint8_t *src, uint8_t *out, Py_ssize_t height, Py_ssize_t width,
                            int p, int m, int t) {
    uint8_t order[64];
    for (int k = 0; k < 16; k++) {
        order[k] = (uint8_t)(4 * k);
        order[16 + k] = (uint8_t)(4 * k + 1);
        order[32 + k] = (uint8_t)(4 * k + 2);
        order[48 + k] = (uint8_t)(4 * k + 3);
    }
    const __m512i perm = _mm512_loadu_si512((const void *)order);
    const __mmask16 mask = (__mmask16)((1u << p) - 1);
    const Py_ssize_t pp = (Py_ssize_t)p * p, plane = (Py_ssize_t)t * pp, row_bytes = 3 * plane;
    const Py_ssize_t stride = 4 * width, patches = height * width / pp;
    for (Py_ssize_t k = 0; k < patches; k++) {
        const uint8_t *s = patch_pixels(src, k, width, p, m);
        uint8_t *o = out + k * row_bytes;
        for (int i = 0; i < p; i++, s += stride) {
            __m512i q = _mm512_permutexvar_epi8(perm, _mm512_maskz_loadu_epi32(mask, s));
            __m128i r = _mm512_castsi512_si128(q);
            __m128i g = _mm512_extracti32x4_epi32(q, 1);
            __m128i b = _mm512_extracti32x4_epi32(q, 2);
            uint8_t *d = o + (Py_ssize_t)i * p;
            for (int f = 0; f < t; f++, d += pp) {
                _mm_mask_storeu_epi8(d, mask, r);
                _mm_mask_storeu_epi8(d + plane, mask, g);
                _mm_mask_storeu_epi8(d + 2 * plane, mask, b);
            }
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512vbmi")))
static void pack_avx512(const uint8_t *src, uint8_t *dst, Py_ssize_t n) {
    uint8_t order[64] = {0};
    for (int k = 0; k < 16; k++) {
        order[3 * k] = (uint8_t)(4 * k);
        order[3 * k + 1] = (uint8_t)(4 * k + 1);
        order[3 * k + 2] = (uint8_t)(4 * k + 2);
    }
    const __m512i perm = _mm512_loadu_si512((const void *)order);
    Py_ssize_t k = 0;
    for (; k + 16 <= n; k += 16)
        _mm512_mask_storeu_epi8(dst + 3 * k, 0xFFFFFFFFFFFFull,
                                _mm512_permutexvar_epi8(perm, _mm512_loadu_si512((const void *)(src + 4 * k))));
    for (; k < n; k++) {
        dst[3 * k] = src[4 * k];
        dst[3 * k + 1] = src[4 * k + 1];
        dst[3 * k + 2] = src[4 * k + 2];
    }
}

__attribute__((target("avx2")))
static void patchify_avx2(const uint8_t *src, uint8_t *out, Py_ssize_t height, Py_ssize_t width,
                          int p, int m, int t) {
    /* in each 128-bit lane, 4 pixels -> R0-3 G0-3 B0-3 X0-3; then the dwords across lanes ->
       R0-7 G0-7 B0-7 X0-7 (64 bits each); two such vectors unpack into R0-15, G0-15, B0-15 */
    const __m256i lane_order = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                                0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m256i dword_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    int32_t words[16];
    for (int k = 0; k < 16; k++)
        words[k] = k < p ? -1 : 0;
    const __m256i lo_mask = _mm256_loadu_si256((const __m256i *)words);
    const __m256i hi_mask = _mm256_loadu_si256((const __m256i *)(words + 8));
    const Py_ssize_t pp = (Py_ssize_t)p * p, plane = (Py_ssize_t)t * pp, row_bytes = 3 * plane;
    const Py_ssize_t stride = 4 * width, patches = height * width / pp;
    for (Py_ssize_t k = 0; k < patches; k++) {
        const uint8_t *s = patch_pixels(src, k, width, p, m);
        uint8_t *o = out + k * row_bytes;
        for (int i = 0; i < p; i++, s += stride) {
            __m256i a = _mm256_maskload_epi32((const int *)s, lo_mask);
            __m256i b = p > 8 ? _mm256_maskload_epi32((const int *)s + 8, hi_mask) : _mm256_setzero_si256();
            a = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(a, lane_order), dword_order);
            b = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(b, lane_order), dword_order);
            __m256i lo = _mm256_unpacklo_epi64(a, b), hi = _mm256_unpackhi_epi64(a, b);
            __m128i channel[3] = {_mm256_castsi256_si128(lo), _mm256_castsi256_si128(hi),
                                  _mm256_extracti128_si256(lo, 1)};
            /* a 16-byte store spills past the row into this plane's later rows, which are
               written after it; where it would leave the plane, the row goes by memcpy */
            int wide = i * p + 16 <= pp;
            uint8_t *d = o + (Py_ssize_t)i * p;
            for (int f = 0; f < t; f++, d += pp)
                for (int c = 0; c < 3; c++) {
                    if (wide) {
                        _mm_storeu_si128((__m128i *)(d + c * plane), channel[c]);
                    } else {
                        uint8_t row[16];
                        _mm_storeu_si128((__m128i *)row, channel[c]);
                        memcpy(d + c * plane, row, (size_t)p);
                    }
                }
        }
    }
}

__attribute__((target("avx2")))
static void pack_avx2(const uint8_t *src, uint8_t *dst, Py_ssize_t n) {
    const __m256i order = _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,
                                           0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
    Py_ssize_t k = 0;
    for (; k + 10 <= n; k += 8) {  /* 8 pixels a step; the second store ends at 3k + 28 <= 3n */
        __m256i v = _mm256_shuffle_epi8(_mm256_loadu_si256((const __m256i *)(src + 4 * k)), order);
        _mm_storeu_si128((__m128i *)(dst + 3 * k), _mm256_castsi256_si128(v));
        _mm_storeu_si128((__m128i *)(dst + 3 * k + 12), _mm256_extracti128_si256(v, 1));
    }
    for (; k < n; k++) {
        dst[3 * k] = src[4 * k];
        dst[3 * k + 1] = src[4 * k + 1];
        dst[3 * k + 2] = src[4 * k + 2];
    }
}

static int cpu_level(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi"))
        return 2;
    return __builtin_cpu_supports("avx2") ? 1 : 0;
}
#else
static int cpu_level(void) { return 0; }
#endif

static const char *LEVELS[] = {"none", "avx2", "avx512vbmi"};
static int best = 0;   /* what this CPU runs */
static int level = 0;  /* what the kernels use: `best` unless `use` chose a lower one */

typedef void (*patchify_fn)(const uint8_t *, uint8_t *, Py_ssize_t, Py_ssize_t, int, int, int);
typedef void (*pack_fn)(const uint8_t *, uint8_t *, Py_ssize_t);
#ifdef ROLLWIRE_X86
static const patchify_fn PATCHIFY[] = {NULL, patchify_avx2, patchify_avx512};
static const pack_fn PACK[] = {NULL, pack_avx2, pack_avx512};
#else
static const patchify_fn PATCHIFY[] = {NULL, NULL, NULL};
static const pack_fn PACK[] = {NULL, NULL, NULL};
#endif

/* 0 with a RuntimeError naming the call when no level runs (the kernels' tables hold NULL there) */
static int have_level(const char *what) {
    if (PATCHIFY[level] != NULL && PACK[level] != NULL)
        return 1;
    PyErr_Format(PyExc_RuntimeError, "%s needs AVX2 or AVX-512 VBMI (see _simd.level())", what);
    return 0;
}

/* src (read) and dst (written), both C-contiguous, or a TypeError and neither held */
static int get_buffers(PyObject *src_obj, Py_buffer *src, PyObject *dst_obj, Py_buffer *dst, const char *dst_name) {
    if (PyObject_GetBuffer(src_obj, src, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "src must be a C-contiguous buffer");
        return -1;
    }
    if (PyObject_GetBuffer(dst_obj, dst, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(src);
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous writable buffer", dst_name);
        return -1;
    }
    return 0;
}

static PyObject *patchify_rgbx(PyObject *self, PyObject *args) {
    PyObject *src_obj, *out_obj;
    Py_ssize_t height, width;
    int p, m, t;
    if (!PyArg_ParseTuple(args, "OOnniii", &src_obj, &out_obj, &height, &width, &p, &m, &t))
        return NULL;
    if (!have_level("patchify_rgbx"))
        return NULL;
    const patchify_fn run = PATCHIFY[level];
    if (p < 1 || p > MAX_PATCH || m < 1 || t < 1 || t > MAX_FRAMES || height <= 0 || width <= 0
            || height % ((Py_ssize_t)p * m) || width % ((Py_ssize_t)p * m)) {
        PyErr_Format(PyExc_ValueError, "patchify_rgbx: bad geometry %zdx%zd, patch %d, merge %d, frames %d",
                     width, height, p, m, t);
        return NULL;
    }
    if (width > PY_SSIZE_T_MAX / 4 / height || 3 * (Py_ssize_t)t > PY_SSIZE_T_MAX / width / height) {
        PyErr_SetString(PyExc_ValueError, "patchify_rgbx: image too large");
        return NULL;
    }
    Py_buffer src, out;
    if (get_buffers(src_obj, &src, out_obj, &out, "out") < 0)
        return NULL;
    PyObject *result = NULL;
    if (src.len != 4 * width * height || out.len != 3 * (Py_ssize_t)t * width * height) {
        PyErr_Format(PyExc_ValueError, "patchify_rgbx: src has %zd bytes (want %zd), out %zd (want %zd)",
                     src.len, 4 * width * height, out.len, 3 * (Py_ssize_t)t * width * height);
    } else {
        Py_BEGIN_ALLOW_THREADS
        run((const uint8_t *)src.buf, (uint8_t *)out.buf, height, width, p, m, t);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *pack_rgb(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    Py_ssize_t start, count;
    if (!PyArg_ParseTuple(args, "OnnO", &src_obj, &start, &count, &dst_obj))
        return NULL;
    if (!have_level("pack_rgb"))
        return NULL;
    const pack_fn run = PACK[level];
    Py_buffer src, dst;
    if (get_buffers(src_obj, &src, dst_obj, &dst, "dst") < 0)
        return NULL;
    PyObject *result = NULL;
    if (start < 0 || count < 0 || src.len % 4 || start > src.len / 4 || count > src.len / 4 - start
            || count > dst.len / 3) {
        PyErr_Format(PyExc_ValueError, "pack_rgb: pixels [%zd, +%zd) of a %zd-byte RGBX buffer into %zd bytes",
                     start, count, src.len, dst.len);
    } else {
        Py_BEGIN_ALLOW_THREADS
        run((const uint8_t *)src.buf + 4 * start, (uint8_t *)dst.buf, count);
        Py_END_ALLOW_THREADS
        result = PyLong_FromSsize_t(3 * count);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

/* --- a view of an RGB PIL image's own memory, through its Arrow C export ---------------------------- */

struct ArrowSchema {
    const char *format, *name, *metadata;
    int64_t flags, n_children;
    struct ArrowSchema **children, *dictionary;
    void (*release)(struct ArrowSchema *);
    void *private_data;
};

struct ArrowArray {
    int64_t length, null_count, offset, n_buffers, n_children;
    const void **buffers;
    struct ArrowArray **children, *dictionary;
    void (*release)(struct ArrowArray *);
    void *private_data;
};

typedef struct {
    PyObject_HEAD
    PyObject *export;  /* the (schema, array) capsules: they keep PIL's memory alive */
    void *address;
    Py_ssize_t len;
} PixelMemory;

static int memory_getbuffer(PyObject *obj, Py_buffer *view, int flags) {
    PixelMemory *self = (PixelMemory *)obj;
    return PyBuffer_FillInfo(view, obj, self->address, self->len, 1, flags);  /* read-only */
}

static void memory_dealloc(PyObject *obj) {
    Py_XDECREF(((PixelMemory *)obj)->export);
    Py_TYPE(obj)->tp_free(obj);
}

static PyBufferProcs memory_buffer = {memory_getbuffer, NULL};

static PyTypeObject PixelMemoryType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rollwire.features._simd.PixelMemory",
    .tp_basicsize = sizeof(PixelMemory),
    .tp_dealloc = memory_dealloc,
    .tp_as_buffer = &memory_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An RGB PIL image's RGBX bytes, read-only, holding the image's Arrow export.",
};

static PyObject *rgbx_memory(PyObject *self, PyObject *args) {
    PyObject *image;
    Py_ssize_t width, height;
    if (!PyArg_ParseTuple(args, "Onn", &image, &width, &height))
        return NULL;
    if (width <= 0 || height <= 0 || width > PY_SSIZE_T_MAX / 4 / height)
        Py_RETURN_NONE;
    PyObject *mode = PyObject_GetAttrString(image, "mode");  /* RGBA exports the same layout */
    int rgb = mode != NULL && PyUnicode_Check(mode) && PyUnicode_CompareWithASCIIString(mode, "RGB") == 0;
    Py_XDECREF(mode);
    if (!rgb) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *export = PyObject_CallMethod(image, "__arrow_c_array__", NULL);
    if (export == NULL) {  /* e.g. rows not in one block: no view */
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (!PyTuple_Check(export) || PyTuple_GET_SIZE(export) != 2) {
        Py_DECREF(export);
        Py_RETURN_NONE;
    }
    struct ArrowSchema *schema = PyCapsule_GetPointer(PyTuple_GET_ITEM(export, 0), "arrow_schema");
    struct ArrowArray *array = schema ? PyCapsule_GetPointer(PyTuple_GET_ITEM(export, 1), "arrow_array") : NULL;
    if (array == NULL) {
        PyErr_Clear();
        Py_DECREF(export);
        Py_RETURN_NONE;
    }
    int64_t n = (int64_t)width * height;
    struct ArrowArray *child = array->n_children == 1 && array->children ? array->children[0] : NULL;
    int ok = schema->format && strcmp(schema->format, "+w:4") == 0 && schema->n_children == 1
        && schema->children && schema->children[0] && schema->children[0]->format
        && strcmp(schema->children[0]->format, "C") == 0
        && array->length == n && array->offset == 0 && array->null_count == 0 && child
        && child->n_buffers == 2 && child->buffers && child->offset == 0 && child->length == 4 * n
        && child->null_count == 0 && child->buffers[1] != NULL;
    if (!ok) {
        Py_DECREF(export);
        Py_RETURN_NONE;
    }
    PixelMemory *memory = PyObject_New(PixelMemory, &PixelMemoryType);
    if (memory == NULL) {
        Py_DECREF(export);
        return NULL;
    }
    memory->export = export;
    memory->address = (void *)child->buffers[1];
    memory->len = (Py_ssize_t)(4 * n);
    return (PyObject *)memory;
}

static PyObject *level_name(int k) {
    return k ? PyUnicode_FromString(LEVELS[k]) : Py_NewRef(Py_None);
}

static PyObject *get_level(PyObject *self, PyObject *unused) { return level_name(level); }

static PyObject *get_best(PyObject *self, PyObject *unused) { return level_name(best); }

static PyObject *use(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name))
        return NULL;
    for (int k = 0; k < 3; k++)
        if (strcmp(name, LEVELS[k]) == 0) {
            if (k > best) {
                PyErr_Format(PyExc_ValueError, "this CPU does not run %s (best: %s)", name, LEVELS[best]);
                return NULL;
            }
            PyObject *previous = level_name(level);
            level = k;
            return previous;
        }
    PyErr_Format(PyExc_ValueError, "unknown level %s (none, avx2, avx512vbmi)", name);
    return NULL;
}

static PyMethodDef methods[] = {
    {"level", get_level, METH_NOARGS, "level(): the byte shuffles in use: 'avx512vbmi', 'avx2' or None."},
    {"best", get_best, METH_NOARGS, "best(): the best level this CPU runs, or None."},
    {"use", use, METH_VARARGS,
     "use(name): run the shuffles at 'avx512vbmi', 'avx2' or 'none' (at most best()); returns the previous level. "
     "For tests and side-by-side benchmarks."},
    {"rgbx_memory", rgbx_memory, METH_VARARGS,
     "rgbx_memory(image, width, height): a read-only buffer over an RGB PIL image's RGBX bytes (its Arrow "
     "export, kept alive with it), or None when PIL does not export that layout."},
    {"patchify_rgbx", patchify_rgbx, METH_VARARGS,
     "patchify_rgbx(src, out, height, width, p, m, t): RGBX bytes (H*W*4) -> uint8 rows (N, 3, t, p*p) in out."},
    {"pack_rgb", pack_rgb, METH_VARARGS,
     "pack_rgb(src, start, count, dst) -> bytes written: RGBX pixels [start, start+count) packed as RGB into dst."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_simd", "AVX-512 VBMI byte shuffles for image rows.",
                                    -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__simd(void) {
    if (PyType_Ready(&PixelMemoryType) < 0)
        return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL)
        return NULL;
    best = level = cpu_level();
    if (PyModule_AddIntConstant(mod, "MAX_PATCH", MAX_PATCH) < 0
            || PyModule_AddIntConstant(mod, "MAX_FRAMES", MAX_FRAMES) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
