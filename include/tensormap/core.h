// The torch-free core of tensormap: the file format, its reader and its writer.
#pragma once

#include "tensormap/dtype.h"
#include "tensormap/error.h"
#include "tensormap/file.h"
#include "tensormap/format.h"
#include "tensormap/sharded.h"
#include "tensormap/writer.h"
