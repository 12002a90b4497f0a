// TENSORMAP_EXPORT marks what the shared libraries export. Everything else (every
// detail:: class, every internal helper) is hidden: the libraries build with
// -fvisibility=hidden, so the ABI is exactly the marked declarations.
#pragma once

#if defined(TENSORMAP_BUILDING_LIBRARY)
#define TENSORMAP_EXPORT __attribute__((visibility("default")))
#else
#define TENSORMAP_EXPORT
#endif
