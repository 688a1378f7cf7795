// v2flow-tokenize: images → visual token ids with one call of the tokenize package (no Python at run time).
//
//   v2flow-tokenize tokenize.pt2 --out ids.npy IMAGE.ppm [IMAGE.ppm ...]
//   v2flow-tokenize tokenize.pt2 --out ids.npy --images images.npy      (float32 [B, 3, S, S] in [-1, 1])
//
// PPM images must be S×S (the model's size: crop and resize them first); they are mapped to [-1, 1] as
// x / 127.5 − 1, channels first. Writes int64 [B, N] ids.
#include <iostream>

#include "options.hpp"
#include "package.hpp"

using namespace v2flow;

int main(int argc, char** argv) {
  try {
    if (argc < 4) {
      std::cerr << "usage: v2flow-tokenize PACKAGE.pt2 --out IDS.npy (IMAGE.ppm ... | --images IMAGES.npy)\n";
      return 2;
    }
    const std::string package = argv[1];
    const Options opt = parse_options(argc, argv, 2, {"--out", "--images"}, true);
    const std::vector<std::string>& ppms = opt.positional;
    if (!opt.has("--out") || ppms.empty() != opt.has("--images"))
      throw std::runtime_error("give --out and either PPM images or --images IMAGES.npy");
    Package pkg(package);
    if (pkg.stage() != "tokenize") throw std::runtime_error(package + " is the '" + pkg.stage() + "' package");
    const int64_t size = pkg.dim("images", 2);
    at::Tensor images;
    if (opt.has("--images")) {
      images = to_tensor(load_npy(opt.get("--images")));
    } else {
      images = torch::empty({static_cast<int64_t>(ppms.size()), 3, size, size});
      for (size_t b = 0; b < ppms.size(); ++b) {
        Image im = load_ppm(ppms[b]);
        if (im.width != size || im.height != size)
          throw std::runtime_error(ppms[b] + ": " + std::to_string(im.width) + "x" + std::to_string(im.height) +
                                   ", the model takes " + std::to_string(size) + "x" + std::to_string(size));
        at::Tensor hwc = torch::from_blob(im.rgb.data(), {size, size, 3}, at::kByte).to(at::kFloat);
        images[b] = hwc.permute({2, 0, 1}) / 127.5 - 1.0;
      }
    }
    std::vector<at::Tensor> result = pkg.run({{"images", images}});
    save_npy(opt.get("--out"), from_tensor(result.at(0)));
    std::cout << "wrote " << opt.get("--out") << ": " << result[0].size(0) << " image(s) x " << result[0].size(1) << " tokens\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "v2flow-tokenize: error: " << e.what() << "\n";
    return 2;
  }
}
