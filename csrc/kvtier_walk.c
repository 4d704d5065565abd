/* The first pass of the global index's Score, in C: look every block of a prompt up in a space's
 * key -> holder-mask table and report where the holders change.
 *
 *   walk(table: dict[int, int], blocks: bytes | list[bytes] | list[int]) -> (held, points, masks)
 *
 * `blocks` is the prompt's kvtier block hashes concatenated (16 bytes each), a list of hashes
 * (16 bytes, or 8-byte index keys), or a list of index keys. A block's index key is the first 8
 * bytes of its hash, big-endian (kvtier.events.model.index_key). `held` is the number of leading
 * blocks present in `table`; `points` are 0 and every i < held whose mask differs from block
 * i-1's (none when held is 0); `masks` the masks at those points. Same result as the Python walk
 * in kvtier.index.memory (tests/index/test_walk.py compares them). Built on first use by
 * kvtier.native; the index falls back to Python without a compiler.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static uint64_t be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = (v << 8) | p[i];
    return v;
}

/* The index key of item i as a new reference, or NULL with an exception set. */
static PyObject *key_at(PyObject *blocks, Py_ssize_t i, int joined) {
    if (joined) return PyLong_FromUnsignedLongLong(be64((const unsigned char *)PyBytes_AS_STRING(blocks) + 16 * i));
    PyObject *item = PyList_GET_ITEM(blocks, i);
    if (PyBytes_Check(item)) {
        Py_ssize_t n = PyBytes_GET_SIZE(item);
        if (n != 16 && n != 8) {
            PyErr_Format(PyExc_ValueError, "a block hash has 16 bytes (or 8 as an index key), got %zd", n);
            return NULL;
        }
        return PyLong_FromUnsignedLongLong(be64((const unsigned char *)PyBytes_AS_STRING(item)));
    }
    if (PyLong_CheckExact(item)) {
        Py_INCREF(item);
        return item;
    }
    PyErr_Format(PyExc_TypeError, "a block is a hash (bytes) or an index key (int), got %s", Py_TYPE(item)->tp_name);
    return NULL;
}

static PyObject *walk(PyObject *self, PyObject *args) {
    PyObject *table, *blocks;
    if (!PyArg_ParseTuple(args, "O!O", &PyDict_Type, &table, &blocks)) return NULL;
    int joined = PyBytes_Check(blocks);
    Py_ssize_t count;
    if (joined) {
        if (PyBytes_GET_SIZE(blocks) % 16) {
            PyErr_Format(PyExc_ValueError, "joined block hashes must be a multiple of 16 bytes, got %zd", PyBytes_GET_SIZE(blocks));
            return NULL;
        }
        count = PyBytes_GET_SIZE(blocks) / 16;
    } else if (PyList_Check(blocks)) {
        count = PyList_GET_SIZE(blocks);
    } else {
        PyErr_SetString(PyExc_TypeError, "blocks must be bytes or a list");
        return NULL;
    }
    PyObject *points = PyList_New(0), *masks = PyList_New(0);
    if (points == NULL || masks == NULL) goto fail;
    PyObject *previous = NULL; /* borrowed from table; the table is not changed during the call (the caller holds the index lock) */
    Py_ssize_t held = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *key = key_at(blocks, i, joined);
        if (key == NULL) goto fail;
        PyObject *mask = PyDict_GetItemWithError(table, key);
        Py_DECREF(key);
        if (mask == NULL) {
            if (PyErr_Occurred()) goto fail;
            break;
        }
        held = i + 1;
        int same = 0;
        if (previous != NULL) {
            same = mask == previous ? 1 : PyObject_RichCompareBool(mask, previous, Py_EQ);
            if (same < 0) goto fail;
        }
        if (!same) {
            PyObject *index = PyLong_FromSsize_t(i);
            if (index == NULL || PyList_Append(points, index) < 0 || PyList_Append(masks, mask) < 0) {
                Py_XDECREF(index);
                goto fail;
            }
            Py_DECREF(index);
        }
        previous = mask;
    }
    if (!joined) { /* validate the rest too: a malformed query is refused whatever it holds */
        for (Py_ssize_t i = held + 1; i < count; i++) {
            PyObject *key = key_at(blocks, i, 0);
            if (key == NULL) goto fail;
            Py_DECREF(key);
        }
    }
    return Py_BuildValue("(nNN)", held, points, masks);
fail:
    Py_XDECREF(points);
    Py_XDECREF(masks);
    return NULL;
}

static PyMethodDef methods[] = {
    {"walk", walk, METH_VARARGS, "walk(table, blocks) -> (held, points, masks)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kvtier_walk", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kvtier_walk(void) { return PyModule_Create(&module); }
