// The Python entry point of personvlad._C.  Importing the module runs the
// static TORCH_LIBRARY / TORCH_LIBRARY_IMPL initialisers of the other
// translation units; the module itself exposes nothing (use torch.ops.personvlad).
// Kept apart from the op sources so CMake can build them against libtorch
// without Python.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "personvlad compiled ops (see torch.ops.personvlad)", -1, nullptr};
  return PyModule_Create(&module_def);
}
