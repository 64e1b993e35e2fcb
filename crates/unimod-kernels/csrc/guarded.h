// How every C entry point of UniMoD-rs's libtorch shims (unimod-kernels, unimod-dist) reports
// failure: no C++ exception crosses the boundary; the message goes into the caller's buffer and
// the entry point returns -1 (0 on success).
#pragma once

#include <cstddef>
#include <cstring>
#include <exception>

namespace unimod {

// Copies `msg` into the caller's buffer (always NUL-terminated) and returns -1.
inline int fail(const char* msg, char* err, size_t err_len) {
  if (err_len > 0) {
    std::strncpy(err, msg, err_len - 1);
    err[err_len - 1] = '\0';
  }
  return -1;
}

// Runs `f`: 0, or -1 with the message of what it threw.
template <typename F>
int guarded(char* err, size_t err_len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    return fail(e.what(), err, err_len);
  } catch (...) {
    return fail("unknown C++ exception", err, err_len);
  }
}

}  // namespace unimod
