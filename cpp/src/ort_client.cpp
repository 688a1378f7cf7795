// v2flow-ort: one Run of a v2flow-rt one-call ONNX graph with ONNX Runtime's C++ API (optional target:
// -DONNXRUNTIME_ROOT=...). Generic over the graph: each input is read from a .npy file by name.
//
//   v2flow-ort tokenize.fp32.onnx   --in images=images.npy --out ids.npy
//   v2flow-ort detokenize.fp32.onnx --in ids=ids.npy --in orders=orders.npy --in noise=noise.npy \
//              [--in cfg_scale=scale.npy] --out images.npy [--threads N]
//
// The graphs' I/O contract (names, dtypes, shapes, how to make orders and noise) is in README.md.
#include <onnxruntime_cxx_api.h>

#include <iostream>
#include <map>

#include "io.hpp"

using namespace v2flow;

namespace {

ONNXTensorElementDataType element_type(const std::string& dtype) {
  if (dtype == "f4") return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  if (dtype == "i8") return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  throw std::runtime_error("inputs must be float32 or int64 arrays, got " + dtype);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 4) {
      std::cerr << "usage: v2flow-ort GRAPH.onnx --in NAME=FILE.npy ... --out OUT.npy [--threads N]\n";
      return 2;
    }
    std::map<std::string, Array> inputs;
    std::string out;
    int threads = 0;
    for (int i = 2; i + 1 < argc; i += 2) {
      std::string key = argv[i], value = argv[i + 1];
      if (key == "--in") {
        size_t eq = value.find('=');
        if (eq == std::string::npos) throw std::runtime_error("--in takes NAME=FILE.npy, got " + value);
        inputs[value.substr(0, eq)] = load_npy(value.substr(eq + 1));
      } else if (key == "--out") {
        out = value;
      } else if (key == "--threads") {
        const int64_t n = parse_count(value, "--threads", "the intra-op thread count (0: ONNX Runtime's default)");
        if (n > 4096) throw std::runtime_error("--threads: at most 4096, got " + value);
        threads = static_cast<int>(n);
      } else {
        throw std::runtime_error("unknown option " + key);
      }
    }
    Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "v2flow-ort");
    Ort::SessionOptions options;
    options.SetIntraOpNumThreads(threads);
    options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    Ort::Session session(env, argv[1], options);
    Ort::AllocatorWithDefaultOptions allocator;
    Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);

    std::vector<Ort::AllocatedStringPtr> name_holders;
    std::vector<const char*> in_names, out_names;
    std::vector<Ort::Value> values;
    for (size_t i = 0; i < session.GetInputCount(); ++i) {
      name_holders.push_back(session.GetInputNameAllocated(i, allocator));
      std::string name = name_holders.back().get();
      auto it = inputs.find(name);
      if (it == inputs.end()) throw std::runtime_error(std::string(argv[1]) + " needs input '" + name + "' (--in " + name + "=FILE.npy)");
      Array& a = it->second;
      values.push_back(Ort::Value::CreateTensor(memory, a.data.data(), a.data.size(), a.shape.data(), a.shape.size(),
                                                element_type(a.dtype)));
      in_names.push_back(name_holders.back().get());
    }
    for (size_t i = 0; i < session.GetOutputCount(); ++i) {
      name_holders.push_back(session.GetOutputNameAllocated(i, allocator));
      out_names.push_back(name_holders.back().get());
    }
    std::vector<Ort::Value> results = session.Run(Ort::RunOptions{nullptr}, in_names.data(), values.data(),
                                                  values.size(), out_names.data(), 1);
    Ort::TensorTypeAndShapeInfo info = results[0].GetTensorTypeAndShapeInfo();
    Array result;
    result.shape = info.GetShape();
    bool is_float = info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    result.dtype = is_float ? "f4" : "i8";
    result.data.resize(info.GetElementCount() * (is_float ? 4 : 8));
    std::memcpy(result.data.data(), results[0].GetTensorRawData(), result.data.size());
    save_npy(out, result);
    std::cout << "wrote " << out << " (" << out_names[0] << ")\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "v2flow-ort: error: " << e.what() << "\n";
    return 2;
  }
}
