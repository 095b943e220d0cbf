{
  "targets": [
    {
      "target_name": "blockrelay",
      "sources": [
        "native/addon.cc",
        "native/block-hashing.cc",
        "native/checksum.cc",
        "native/dirty-map.cc",
        "native/file-extents.cc",
        "native/file-lock.cc",
        "native/hrl-appender.cc",
        "native/page-cache.cc",
        "native/positioned-writes.cc",
        "native/tap-transmission.cc",
        "native/xxhash64.cc"
      ],
      "include_dirs": ["<!(node -p \"require('node-addon-api').include_dir\")"],
      "defines": [
        "NAPI_VERSION=8",
        "NODE_ADDON_API_DISABLE_DEPRECATED",
        "NAPI_DISABLE_CPP_EXCEPTIONS"
      ],
      "cflags!": ["-fno-exceptions"],
      "cflags_cc!": ["-fno-exceptions"],
      "cflags_cc": ["-std=c++17", "-O3", "-Wall", "-Wextra"],
      "xcode_settings": {
        "CLANG_CXX_LANGUAGE_STANDARD": "c++17",
        "GCC_OPTIMIZATION_LEVEL": "3"
      }
    }
  ]
}
