// File I/O for the v2flow-rt C++ clients: .npy arrays (NumPy format 1.0/2.0, little-endian, C order) and
// binary PPM images (P6, maxval 255). No dependency beyond the C++17 standard library.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace v2flow {

// An n-d array as read from / written to a .npy file: dtype "f4" (float32), "i8" (int64) or "u1" (uint8).
struct Array {
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<char> data;
};

inline size_t item_size(const std::string& dtype, const std::string& path) {
  if (dtype == "f4") return 4;
  if (dtype == "i8") return 8;
  if (dtype == "u1") return 1;
  throw std::runtime_error(path + ": unsupported .npy dtype '" + dtype + "' (the clients read float32 '<f4', int64 "
                           "'<i8' and uint8 '|u1'; convert with numpy's astype)");
}

// A non-negative decimal integer read from a file header (a .npy shape entry, a PPM width), or a one-line
// error naming the file and the field (std::stoll said "stoll" and took "-1" or "12abc").
inline int64_t parse_count(const std::string& text, const std::string& path, const std::string& what) {
  const size_t start = text.find_first_not_of(' '), end = text.find_last_not_of(' ');
  const std::string t = start == std::string::npos ? "" : text.substr(start, end - start + 1);
  if (t.empty() || t.size() > 12 || t.find_first_not_of("0123456789") != std::string::npos)
    throw std::runtime_error(path + ": " + what + " must be a non-negative integer below 10^12, got '" + t + "'");
  return std::stoll(t);
}

// Bytes from the stream's position to the end of the file.
inline int64_t bytes_left(std::ifstream& f) {
  const std::streampos here = f.tellg();
  f.seekg(0, std::ios::end);
  const std::streampos end = f.tellg();
  f.seekg(here);
  return static_cast<int64_t>(end - here);
}

// The byte count of `dims` items of `item` bytes, refused before anything is allocated when the rest of the file
// cannot hold it: a damaged header must be an error, not an allocation of gigabytes.
inline size_t data_bytes(const std::vector<int64_t>& dims, size_t item, int64_t available, const std::string& path,
                         const std::string& what) {
  for (int64_t d : dims)
    if (d == 0) return 0;
  const auto truncated = [&] {
    return std::runtime_error(path + ": truncated " + what + " (the header asks for more bytes than the file's " +
                              std::to_string(available) + ")");
  };
  int64_t need = static_cast<int64_t>(item);
  for (int64_t d : dims) {
    if (need > available / d) throw truncated();   // need * d > available, checked without overflowing
    need *= d;
  }
  if (need > available) throw truncated();
  return static_cast<size_t>(need);
}

inline std::string header_field(const std::string& header, const std::string& key, const std::string& path) {
  size_t k = header.find("'" + key + "'");
  if (k == std::string::npos) throw std::runtime_error(path + ": .npy header has no '" + key + "'");
  size_t colon = header.find(':', k);
  size_t start = header.find_first_not_of(' ', colon + 1);
  size_t end = header[start] == '(' ? header.find(')', start) + 1 : header.find_first_of(",}", start);
  return header.substr(start, end - start);
}

inline Array load_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open");
  char magic[6];
  f.read(magic, 6);
  if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + ": not a .npy file");
  unsigned char version[2];
  f.read(reinterpret_cast<char*>(version), 2);
  uint32_t header_len = 0;
  if (version[0] == 1) {
    unsigned char b[2];
    f.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4];
    f.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t(b[3]) << 24);
  }
  std::string header(header_len, ' ');
  f.read(&header[0], header_len);
  if (!f) throw std::runtime_error(path + ": truncated .npy header");
  if (header_field(header, "fortran_order", path).find("False") == std::string::npos)
    throw std::runtime_error(path + ": Fortran-ordered arrays are not supported (save with np.ascontiguousarray)");
  std::string descr = header_field(header, "descr", path);   // e.g. '<f4'
  if (descr.size() < 5 || (descr[1] != '<' && descr[1] != '|'))
    throw std::runtime_error(path + ": dtype " + descr + " is not little-endian");
  Array a;
  a.dtype = descr.substr(2, descr.size() - 3);
  std::string shape = header_field(header, "shape", path);    // e.g. (2, 64)
  std::stringstream ss(shape.substr(1, shape.size() - 2));
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.find_first_not_of(' ') != std::string::npos) a.shape.push_back(parse_count(item, path, ".npy shape entry"));
  }
  a.data.resize(data_bytes(a.shape, item_size(a.dtype, path), bytes_left(f), path, ".npy data"));
  f.read(a.data.data(), static_cast<std::streamsize>(a.data.size()));
  if (!f) throw std::runtime_error(path + ": truncated .npy data");
  return a;
}

// Writes PATH through `write` into PATH.tmp, then renames it into place: a failed write leaves neither a
// partial PATH nor the temporary file.
template <typename Write>
inline void write_atomically(const std::string& path, Write write) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) throw std::runtime_error(path + ": cannot write");
    write(f);
    if (!f) {
      f.close();
      std::remove(tmp.c_str());
      throw std::runtime_error(path + ": write failed");
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error(path + ": cannot rename into place");
  }
}

inline void save_npy(const std::string& path, const Array& a) {
  std::string shape = "(";
  for (size_t i = 0; i < a.shape.size(); ++i) {
    shape += std::to_string(a.shape[i]);
    if (a.shape.size() == 1) shape += ",";              // a 1-tuple, as Python writes it
    else if (i + 1 < a.shape.size()) shape += ", ";
  }
  shape += ")";
  std::string endian = a.dtype == "u1" ? "|" : "<";
  std::string header = "{'descr': '" + endian + a.dtype + "', 'fortran_order': False, 'shape': " + shape + ", }";
  while ((10 + header.size() + 1) % 64 != 0) header += ' ';
  header += '\n';
  write_atomically(path, [&](std::ofstream& f) {
    f.write("\x93NUMPY\x01\x00", 8);
    uint16_t len = static_cast<uint16_t>(header.size());
    char b[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
    f.write(b, 2);
    f.write(header.data(), static_cast<std::streamsize>(header.size()));
    f.write(a.data.data(), static_cast<std::streamsize>(a.data.size()));
  });
}

// A binary PPM (P6, maxval 255) as uint8 [H, W, 3].
struct Image {
  int64_t height = 0, width = 0;
  std::vector<uint8_t> rgb;
};

inline int64_t ppm_token(std::istream& f, const std::string& path, const char* what) {
  std::string tok;
  while (f >> tok) {
    if (tok[0] == '#') {
      std::string rest;
      std::getline(f, rest);
      continue;
    }
    return parse_count(tok, path, std::string("PPM ") + what);
  }
  throw std::runtime_error(path + ": truncated PPM header");
}

inline Image load_ppm(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error(path + ": cannot open");
  std::string magic;
  f >> magic;
  if (magic != "P6") throw std::runtime_error(path + ": not a binary PPM (P6)");
  Image im;
  im.width = ppm_token(f, path, "width");
  im.height = ppm_token(f, path, "height");
  if (ppm_token(f, path, "maxval") != 255) throw std::runtime_error(path + ": only maxval 255 PPMs are supported");
  f.get();   // the single whitespace after maxval
  im.rgb.resize(data_bytes({im.height, im.width, 3}, 1, bytes_left(f), path, "PPM data"));
  f.read(reinterpret_cast<char*>(im.rgb.data()), static_cast<std::streamsize>(im.rgb.size()));
  if (!f) throw std::runtime_error(path + ": truncated PPM data");
  return im;
}

inline void save_ppm(const std::string& path, const Image& im) {
  write_atomically(path, [&](std::ofstream& f) {
    f << "P6\n" << im.width << " " << im.height << "\n255\n";
    f.write(reinterpret_cast<const char*>(im.rgb.data()), static_cast<std::streamsize>(im.rgb.size()));
  });
}

}  // namespace v2flow
