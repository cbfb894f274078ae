// Runs a TVM Relax VM library on one float32 input read from a file and writes its first output.
// Built with the target's cross compiler by targets/tvm_emulate.py, so that a cross-compiled model
// can be checked under qemu user-mode emulation against ONNX Runtime on this machine.
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;
using ffi::Tensor;

struct CPUAlloc {
  void AllocData(DLTensor* t) { t->data = std::malloc(ffi::GetDataSize(*t)); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: vm_run MODEL.so INPUT.bin D0,D1,... OUTPUT.bin\n";
    return 2;
  }
  std::vector<int64_t> shape;
  std::stringstream ss(argv[3]);
  for (std::string d; std::getline(ss, d, ',');) shape.push_back(std::stoll(d));
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<float> in(n);
  std::ifstream fin(argv[2], std::ios::binary);
  fin.read(reinterpret_cast<char*>(in.data()), n * sizeof(float));
  if (!fin) {
    std::cerr << "vm_run: could not read " << n << " floats from " << argv[2] << "\n";
    return 2;
  }
  DLDevice cpu{kDLCPU, 0};
  ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  // (device type, id, allocator type) for the host; 2 = pooled allocator.
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2, static_cast<int>(kDLCPU), 0, 2);
  Tensor x = Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape(shape), DLDataType{kDLFloat, 32, 1}, cpu);
  std::memcpy(x.data_ptr(), in.data(), n * sizeof(float));
  ffi::Any ret = vm->GetFunction("main").value()(x);
  Tensor y;
  if (auto t = ret.try_cast<Tensor>()) {
    y = t.value();
  } else {
    y = ret.cast<ffi::Array<ffi::Any>>()[0].cast<Tensor>();
  }
  if (y.dtype().code != kDLFloat || y.dtype().bits != 32) {
    std::cerr << "vm_run: the first output is not float32\n";
    return 1;
  }
  std::cout << "shape";
  for (int i = 0; i < y.ndim(); ++i) std::cout << " " << y.shape()[i];
  std::cout << "\n";
  std::ofstream fout(argv[4], std::ios::binary);
  fout.write(static_cast<const char*>(y.data_ptr()), y.numel() * sizeof(float));
  return fout ? 0 : 1;
}
