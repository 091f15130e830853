/* netcompiler/fastcall.c: the fast path of Net.forward, as a small CPython extension.

   Net.forward through cffi spends about 1.5 us in Python at batch 1 (checking the array,
   ffi.from_buffer, the libffi call, slicing and copying the outputs): more than any layer
   of LeNet-5 but two.  A Forward object here is bound to one network's context once; its
   run(x) does the same checks and the same call in C:

       out = fast.run(x)   # None: not an array this path takes; Python's general path runs

   It takes only an exact numpy.ndarray of the network's dtype, native byte order, aligned,
   C-contiguous, shaped (n, *input_shape) with 1 <= n <= the samples the activations hold.
   Anything else returns None and Net.forward checks, converts or raises as it always did.

   Built by build.load_fastcall() against this interpreter's and numpy's headers, cached
   like the networks; without those headers Net.forward keeps the cffi path. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <stdint.h>
#include <string.h>

/* NAME_forward(ctx, x, idx, n, training), called through the address cffi gives, as cffi's own
   call does: at the ABI level, with ctx and x as plain pointers */
typedef int (*forward_fn)(void *ctx, const void *x, const int64_t *idx, int n, int training);

typedef struct {
    PyObject_HEAD
    forward_fn fn;
    void *ctx;
    const char *outs;       /* sample 0's outputs in the activation block */
    Py_ssize_t stride;      /* bytes from one sample's outputs to the next sample's */
    Py_ssize_t out_bytes;   /* one sample's outputs */
    int typenum, in_ndim, out_ndim;
    npy_intp capacity;      /* samples the activation block holds */
    npy_intp in_shape[NPY_MAXDIMS], out_dims[NPY_MAXDIMS + 1]; /* out_dims[0]: n, set per call */
    PyObject *keep;         /* owners of ctx, outs and fn: kept alive as long as this object */
} Forward;

static int read_shape(PyObject *tuple, npy_intp *dims, int *ndim, const char *what)
{
    if (!PyTuple_Check(tuple) || PyTuple_GET_SIZE(tuple) < 1 || PyTuple_GET_SIZE(tuple) >= NPY_MAXDIMS) {
        PyErr_Format(PyExc_ValueError, "%s must be a tuple of 1 to %d sizes", what, NPY_MAXDIMS - 1);
        return -1;
    }
    *ndim = (int)PyTuple_GET_SIZE(tuple);
    for (int i = 0; i < *ndim; i++) {
        dims[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(tuple, i));
        if (dims[i] < 1) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "%s has a size < 1", what);
            return -1;
        }
    }
    return 0;
}

/* Forward(fn, ctx, outs, stride, dtype, capacity, in_shape, out_shape, keep); fn, ctx and outs
   are addresses (ints), stride in bytes, dtype a numpy dtype. */
static int Forward_init(Forward *self, PyObject *args, PyObject *kwds)
{
    unsigned long long fn, ctx, outs;
    Py_ssize_t stride, capacity;
    PyArray_Descr *dtype = NULL;
    PyObject *in_shape, *out_shape, *keep;
    static char *kwlist[] = {"fn", "ctx", "outs", "stride", "dtype", "capacity", "in_shape", "out_shape", "keep", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "KKKnO&nOOO", kwlist, &fn, &ctx, &outs, &stride,
                                     PyArray_DescrConverter, &dtype, &capacity, &in_shape, &out_shape, &keep))
        return -1;
    self->typenum = dtype->type_num;
    Py_DECREF(dtype);
    if (self->typenum != NPY_FLOAT && self->typenum != NPY_DOUBLE) {
        PyErr_SetString(PyExc_ValueError, "dtype must be float32 or float64");
        return -1;
    }
    if (!fn || !ctx || !outs || stride < 0 || capacity < 1) {
        PyErr_SetString(PyExc_ValueError, "null address, negative stride or capacity < 1");
        return -1;
    }
    int out_ndim;
    if (read_shape(in_shape, self->in_shape, &self->in_ndim, "in_shape") < 0 ||
        read_shape(out_shape, self->out_dims + 1, &out_ndim, "out_shape") < 0)
        return -1;
    self->out_ndim = out_ndim + 1;
    npy_intp count = 1;
    for (int i = 1; i <= out_ndim; i++)
        count *= self->out_dims[i];
    self->out_bytes = (Py_ssize_t)count * (self->typenum == NPY_FLOAT ? 4 : 8);
    self->fn = (forward_fn)(uintptr_t)fn;
    self->ctx = (void *)(uintptr_t)ctx;
    self->outs = (const char *)(uintptr_t)outs;
    self->stride = stride;
    self->capacity = capacity;
    Py_XSETREF(self->keep, Py_NewRef(keep));
    return 0;
}

/* run(x): the outputs for x as a new array, or None when x is not an array this path takes */
static PyObject *Forward_run(Forward *self, PyObject *x)
{
    if (!self->fn) {
        PyErr_SetString(PyExc_RuntimeError, "Forward object not initialised");
        return NULL;
    }
    if (!PyArray_CheckExact(x))
        Py_RETURN_NONE;
    PyArrayObject *a = (PyArrayObject *)x;
    if (PyArray_TYPE(a) != self->typenum || PyArray_NDIM(a) != self->in_ndim + 1 ||
        !PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a) || !PyArray_ISNOTSWAPPED(a))
        Py_RETURN_NONE;
    const npy_intp *dims = PyArray_DIMS(a);
    for (int i = 0; i < self->in_ndim; i++)
        if (dims[i + 1] != self->in_shape[i])
            Py_RETURN_NONE;
    const npy_intp n = dims[0];
    if (n < 1 || n > self->capacity)
        Py_RETURN_NONE;
    int rc;
    const void *data = PyArray_DATA(a);
    Py_BEGIN_ALLOW_THREADS /* as cffi's call does; the caller, Net.forward, holds the Net's lock */
    rc = self->fn(self->ctx, data, NULL, (int)n, 0);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_Format(PyExc_RuntimeError, "forward failed (%d samples)", (int)n);
        return NULL;
    }
    self->out_dims[0] = n;
    PyObject *out = PyArray_SimpleNew(self->out_ndim, self->out_dims, self->typenum);
    if (!out)
        return NULL;
    char *dst = PyArray_BYTES((PyArrayObject *)out);
    for (npy_intp s = 0; s < n; s++)
        memcpy(dst + s * self->out_bytes, self->outs + s * self->stride, (size_t)self->out_bytes);
    return out;
}

static int Forward_traverse(Forward *self, visitproc visit, void *arg)
{
    Py_VISIT(self->keep);
    return 0;
}

static int Forward_clear(Forward *self)
{
    Py_CLEAR(self->keep);
    self->fn = NULL;
    return 0;
}

static void Forward_dealloc(Forward *self)
{
    PyObject_GC_UnTrack(self);
    Forward_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Forward_methods[] = {
    {"run", (PyCFunction)Forward_run, METH_O, "run(x) -> outputs, or None when x needs the general path"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ForwardType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "netcompiler_fastcall.Forward",
    .tp_doc = "A network's evaluation forward bound once: run(x) checks x and calls it in C.",
    .tp_basicsize = sizeof(Forward),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Forward_init,
    .tp_dealloc = (destructor)Forward_dealloc,
    .tp_traverse = (traverseproc)Forward_traverse,
    .tp_clear = (inquiry)Forward_clear,
    .tp_methods = Forward_methods,
};

static struct PyModuleDef fastcall_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "netcompiler_fastcall",
    .m_doc = "Net.forward's fast path (see fastcall.c).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit_netcompiler_fastcall(void)
{
    import_array();
    if (PyType_Ready(&ForwardType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastcall_module);
    if (!m)
        return NULL;
    if (PyModule_AddObjectRef(m, "Forward", (PyObject *)&ForwardType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
