// The Python extension module oclear_ext._C. It exports nothing itself: importing it runs the
// static TORCH_LIBRARY registrations of csrc/ops/*.cpp, which make the ops visible as
// torch.ops.oclear.*. Plain CPython API (no pybind11) keeps this translation unit cheap to build.
#include <Python.h>

static PyModuleDef oclear_module = {PyModuleDef_HEAD_INIT, "_C",
                                    "oclear_ext kernels (registered as torch.ops.oclear.*)", -1,
                                    nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&oclear_module); }
