// The torch-free core of tensormap (libtensormap): every format it reads and writes,
// conversion between them, and process memory figures.
#pragma once

#include "tensormap/checkpoint.h"
#include "tensormap/convert.h"
#include "tensormap/dtype.h"
#include "tensormap/edit.h"
#include "tensormap/error.h"
#include "tensormap/file.h"
#include "tensormap/format.h"
#include "tensormap/interrupt.h"
#include "tensormap/process_memory.h"
#include "tensormap/remote.h"
#include "tensormap/sharded.h"
#include "tensormap/torch_save.h"
#include "tensormap/verify.h"
#include "tensormap/writer.h"
